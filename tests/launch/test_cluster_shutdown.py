"""Ctrl-C on the head stops every node: here while the head waits for a node that never
comes, with one node joined (launchers and agents only, so it is quick)."""

from __future__ import annotations

import os
import signal

import pytest

from .nodes import SimNode, free_port, wait_gone


@pytest.mark.timeout(180)
def test_ctrl_c_on_the_head_stops_every_node(tmp_path):
    port, secret = free_port(), os.urandom(32).hex()
    head = SimNode(0, 3, port, tmp_path, secret, "--config", "tiny")
    node1 = SimNode(1, 3, port, tmp_path, secret, "--config", "tiny")
    try:
        head.wait_for("node1 joined: ", 120)
        node1.remember()
        head.remember()
        assert len(head.seen) >= 2 and len(node1.seen) >= 2, "launchers and their agents"
        os.kill(head.proc.pid, signal.SIGINT)
        assert head.wait(90, others=(node1,)) == 130
        assert node1.wait(60) == 0, node1.text()[-3000:]
        out = head.text()
        assert "stopping every node (Ctrl-C or SIGTERM on the head)" in out
        assert "node2" not in out.split("stopping every node")[1], "a node that never joined is not waited for"
        assert wait_gone([head, node1], 30) == [], "processes left behind"
    finally:
        head.kill_all()
        node1.kill_all()
