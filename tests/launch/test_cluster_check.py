"""`asystem cluster --check` over three simulated nodes: every probe sees its place, the
trainer ranks' process group and the weight group span the nodes (gloo), every node's
output reaches the head, and every node stops at the end."""

from __future__ import annotations

import json
import os

import pytest

from .nodes import SimNode, free_port, wait_gone


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_check_over_three_nodes(tmp_path):
    port, secret = free_port(), os.urandom(32).hex()
    args = ["--check", "--check-mb", "4", "--config", "tiny", "trainer_ranks=2", "rollout.workers=2",
            "reward.workers=1", "cluster.trainer.nodes=[1,2]", "cluster.trainer.per_node=1",
            "cluster.env={NCCL_DEBUG: WARN}"]
    nodes = [SimNode(r, 3, port, tmp_path, secret, *args) for r in (1, 2, 0)]
    head = nodes[-1]
    try:
        assert head.wait(540, others=tuple(nodes[:2])) == 0, head.text()[-5000:]
        for node in nodes[:2]:
            assert node.wait(60) == 0, node.text()[-3000:]
        out = head.text()
        result = json.loads(out.strip().splitlines()[-1] if out.strip().endswith("}") else
                            next(line for line in reversed(out.splitlines()) if line.startswith("{")))
        assert result["failures"] == [] and result["processes"] == 5 and result["allreduce"] == 3.0
        assert "trainer process group over ['node1', 'node2']: all-reduce gave 3 on every rank" in out
        assert "weight group (gloo) from trainer rank 0 on node1 to 2 rollout slot(s)" in out
        for rank in (1, 2):
            assert f"[node{rank}] node agent node{rank} at tcp://127.0.0.{rank + 1}:" in out, \
                "a node's output is printed on the head"
        assert "trainer 1: node2 host" in out and "CUDA_VISIBLE_DEVICES=''" in out
        assert "stopping every node (the job ended)" in out
        assert wait_gone(nodes, 60) == [], "processes left behind"
    finally:
        for node in nodes:
            node.kill_all()
