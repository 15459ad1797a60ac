"""The C3PO++ timing simulation (benchmarks/c3po.py): its gains come from the length tail,
not from the model, and its command line keeps its output contract."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("c3po_benchmark", ROOT / "benchmarks" / "c3po.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up while the class is built
spec.loader.exec_module(bench)


def speedups(setting, sigma, steps=12, warmup=4):
    """Rollout and end-to-end speedups per trained token (steps may differ slightly in size)."""
    phi = round(setting.slots * setting.expected_len())
    sync = bench.run_sync(setting, steps, warmup)
    c3po = bench.run_c3po(setting, steps, warmup, sigma, phi, overlap=False)
    per_token = c3po.tokens / sync.tokens
    return per_token * sync.rollout / c3po.rollout, per_token * sync.e2e / c3po.e2e, c3po


def test_without_a_length_tail_partial_rollouts_gain_nothing():
    flat = bench.Setting(prompts_per_step=4, group_size=4, max_len=4096, median_len=300, prompt_sigma=0, sample_sigma=0)
    rollout, e2e, _ = speedups(flat, sigma=2)
    assert rollout == pytest.approx(1.0, abs=0.1) and e2e == pytest.approx(1.0, abs=0.1)


def test_with_a_long_tail_c3po_is_faster_and_drops_nothing_at_the_derived_sigma():
    tail = bench.Setting(prompts_per_step=8, group_size=4, max_len=4096, median_len=600)
    sigma = bench.default_sigma(tail)
    rollout, e2e, c3po = speedups(tail, sigma)
    assert rollout > 1.8 and e2e > 1.3
    assert c3po.dropped == 0.0 and max(c3po.staleness) <= sigma


def test_command_line_prints_the_json_summary_last(tmp_path):
    out = tmp_path / "c3po.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "c3po.py"),
         "--steps", "5", "--warmup", "2", "--no-sensitivity", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rollout_speedup"] > 1 and result["e2e_speedup"] > 1
    assert "sync" in proc.stdout and "sigma" in proc.stdout  # the table
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.stat().st_size > 0 and result["plot"] == str(out)
