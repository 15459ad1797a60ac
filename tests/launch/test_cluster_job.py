"""A short training job end to end through launch/cluster.py, on nodes simulated as separate
launcher processes on 127.0.0.1-3 (gloo), with a node agent killed with SIGKILL mid-run:

- the node held rollout and reward workers: they start again on the other node allowed
  to them, their rollouts go on as continuations, and the job trains every step once,
  with nothing lost;
- the node held the trainer rank: the job stops cleanly and names the checkpoint; the
  same command with --resume goes on from it, and over both runs every step is trained
  once and every prompt taken is trained or pending.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from asystem.metrics import read_jsonl
from ring.tasks import make_task_source

from .nodes import SimNode, free_port, wait_gone

FAST_FAILURE = ["cluster.heartbeat_s=0.5", "cluster.dead_after_s=3"]


def _trained(out: Path) -> int:
    path = out / "batches.jsonl"
    return max((b["step"] for b in read_jsonl(path)), default=0) if path.exists() else 0


def _checkpoint(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "LATEST").read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return 0


def _wait(check, nodes: list[SimNode], timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        for node in nodes:
            node.remember()
            if node.proc.poll() is not None:
                raise AssertionError(f"node{node.rank} exited with {node.proc.returncode} while waiting for "
                                     f"{what}:\n{node.text()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}\n{nodes[0].text()[-4000:]}")
        time.sleep(0.5)


def _cluster(tmp_path: Path, nnodes: int, *args: str) -> list[SimNode]:
    port, secret = free_port(), os.urandom(32).hex()
    common = ["--config", "tiny", f"run.out={tmp_path / 'run'}", *FAST_FAILURE, *args]
    # The head last: the nodes wait for it, and its port is taken by nothing else meanwhile.
    others = [SimNode(r, nnodes, port, tmp_path / "logs", secret, *common) for r in range(1, nnodes)]
    return [SimNode(0, nnodes, port, tmp_path / "logs", secret, *common), *others]


def _each_step_once_nothing_lost(out: Path, steps: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    batches = read_jsonl(out / "batches.jsonl")
    assert [b["step"] for b in batches] == list(range(1, steps + 1)), "each step trained exactly once"
    ids = [t[0] for b in batches for t in b["trajectories"]]
    assert len(ids) == len(set(ids)), "a trajectory was trained twice"
    trained = {prompt for b in batches for _, prompt in b["trajectories"]}
    source = make_task_source(json.loads((out / "config.yaml").read_text())["task"]["source"])
    taken = {source[i].item_id for i in range(summary["data_position"])}
    assert summary["counters"]["prompts_discarded"] == 0
    accounted = trained | set(summary["pending_prompts"])
    assert taken == accounted, f"lost: {sorted(taken - accounted)[:5]}, unknown: {sorted(accounted - taken)[:5]}"
    return summary


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_node_killed_mid_run_its_workers_move_and_every_step_is_trained(tmp_path):
    # node0: the head, reward 0; node1: trainer 0; node2: rollout 0 (the only one), reward 1.
    steps = 6
    nodes = _cluster(tmp_path, 3, f"run.steps={steps}", "run.checkpoint_every=0", "rollout.workers=1",
                     "reward.workers=2", "cluster.trainer.nodes=[1]", "cluster.rollout.nodes=[1,2]",
                     "cluster.reward.nodes=[0,2]")
    head, node1, node2 = nodes
    out = tmp_path / "run"
    try:
        placed = head.wait_for("started: trainer 0", 600)
        assert "node2      rank 2   127.0.0.3        0 GPUs     rollout 0, reward 1" in placed, placed
        _wait(lambda: _trained(out) >= 2, nodes, 600, "two trained steps")
        node2.remember()
        node2.agent().send_signal(signal.SIGKILL)
        assert head.wait(900, others=(node1,)) == 0, head.text()[-5000:]
        assert node2.wait(60) == 1, "a node whose agent died leaves the cluster with an error"
        assert node1.wait(60) == 0

        text = head.text()
        assert "node node2 (127.0.0.3) is declared dead" in text and "It ran: rollout 0, reward 1." in text
        # The only rollout worker: the job could not go on until it was back, on node1.
        assert "starting it again as rollout 0 on node1 (127.0.0.2, no GPU)" in text
        assert "rollout worker 0 is back at tcp://127.0.0.2:" in text
        assert "reward worker 1 is started again as reward 1 on node0" in text
        assert "[node2] node2: its node agent exited with code -9; this node leaves the cluster" in text
        summary = _each_step_once_nothing_lost(out, steps)
        assert summary["steps"] == steps
        counters = summary["counters"]
        assert counters["rollout_worker_failures"] == 1 and counters["rollout_worker_restarts"] == 1
        assert counters["rollouts_requeued"] >= 1, "its rollouts went on as continuations"
        assert wait_gone(nodes, 60) == [], "processes left behind"
    finally:
        for node in nodes:
            node.kill_all()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_trainers_node_killed_stops_the_job_and_resume_goes_on(tmp_path):
    # Enough steps that the job is still running when the kill takes effect: a tiny step
    # takes about a second, and 6 steps were all trained before the loss was noticed.
    steps = 16
    args = [f"run.steps={steps}", "run.checkpoint_every=2", "cluster.trainer.nodes=[1]",
            "cluster.rollout.nodes=[0]", "cluster.reward.nodes=[0]"]
    nodes = _cluster(tmp_path, 2, *args)
    head, node1 = nodes
    out = tmp_path / "run"
    try:
        _wait(lambda: _checkpoint(out) >= 2 and _trained(out) > _checkpoint(out), nodes, 900,
              "a checkpoint and a step after it")
        node1.remember()
        node1.agent().send_signal(signal.SIGKILL)
        assert head.wait(300) == 1, head.text()[-5000:]
        killed_at = _trained(out)
        assert killed_at < steps, "the job finished before it could be killed; make it longer"
        text = head.text()
        assert "stopping the job: trainer rank" in text
        latest = (out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip())
        assert f"The newest checkpoint is {latest}: run the same command with --resume" in text
        assert wait_gone(nodes, 60) == [], "processes left behind"

        again = _cluster(tmp_path, 2, *args, "--resume")
        try:
            assert again[0].wait(900, others=(again[1],)) == 0, again[0].text()[-5000:]
            assert again[1].wait(60) == 0
        finally:
            for node in again:
                node.kill_all()
        summary = _each_step_once_nothing_lost(out, steps)
        assert summary["resumed_from"]
    finally:
        for node in nodes:
            node.kill_all()
