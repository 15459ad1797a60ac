"""The runnable examples the docs point to must keep running."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_service_answers_over_http():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embedded_service.py"), "--self-test"],
        capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "200 OK" in out.stdout
    assert '"correct": true' in out.stdout
