"""The runnable examples the docs point to must keep running."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_service_answers_over_http():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embedded_service.py"), "--self-test"],
        capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "200 OK" in out.stdout
    assert '"correct": true' in out.stdout


@pytest.mark.slow
def test_rollout_service_streams_a_completion_over_http():
    """examples/rollout_service.py: a RolloutWorker behind aiohttp, tokens streamed as NDJSON."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "rollout_service.py"), "--self-test"],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GET /health 200 {'ok': True}" in out.stdout
    assert "POST /generate 200 application/x-ndjson" in out.stdout
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("  {")]
    assert len(lines) == 8 and all(len(line["tokens"]) >= 1 for line in lines), out.stdout
    assert [line["finish_reason"] for line in lines][-1] == "length", "8 tokens asked, 8 given"
    assert "POST /generate (bad body) 400" in out.stdout
