"""A job's view of its nodes (asystem/cluster.py): a node agent that stops answering
heartbeats is declared dead within the configured interval, with a message naming the node
and what ran there; its places go elsewhere, and a trainer rank there stops the job."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from actors import ActorSystem
from asystem.cluster import Cluster, watch_node
from asystem.config import from_dict
from asystem.placement import Node, Placement
from asystem.train_config import ClusterConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
async def test_a_frozen_node_is_declared_dead_and_its_trainer_rank_stops_the_job():
    config = from_dict(ClusterConfig, {"trainer": {"nodes": [1]}, "heartbeat_s": 0.5, "dead_after_s": 2.0})
    cluster_args = {"head": "", "host": "127.0.0.1", "secret": os.urandom(32)}
    options = {**Cluster([], **cluster_args).system_options(config), "head": None}  # its own registry
    system = await ActorSystem(**options).start()
    assert system.heartbeat.timeout == 2.0, "the job's heartbeats follow cluster.dead_after_s"
    env = {**os.environ, "ASYSTEM_SECRET": system.secret.hex(), "PYTHONPATH": str(ROOT)}
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.agent", "--bind", "tcp://127.0.0.2:0", "--head", system.address,
        "--node", "node1", env=env, stdout=asyncio.subprocess.PIPE)
    try:
        assert b"node agent node1" in await asyncio.wait_for(agent.stdout.readline(), 60)
        nodes = [Node("node0", 0, "127.0.0.1", (), "agent0"),
                 Node("node1", 1, "127.0.0.2", (), await system.lookup("agent/node1"))]
        placement = Placement(config, nodes)
        placement.plan({"trainer": 1, "rollout": 2})
        messages: list[str] = []
        stops: list[str] = []
        cluster = Cluster(nodes, **cluster_args, report=messages.append, stop_job=stops.append)
        await watch_node(system, nodes[1], placement, cluster, config)
        assert not placement.dead

        os.kill(agent.pid, signal.SIGSTOP)  # alive, connected, silent: only heartbeats can tell
        async with asyncio.timeout(60):
            while "node1" not in placement.dead:
                await asyncio.sleep(0.1)
        [declared, *_] = messages
        assert "node node1 (127.0.0.2) is declared dead" in declared
        assert "dead after 2s without one" in declared and "It ran: trainer 0, rollout 1." in declared
        assert stops == ["trainer rank(s) [0] were on the lost node node1"]
        moved = placement.place("rollout", 1)
        assert moved.node.name == "node0", "a lost node gets no process again"
    finally:
        agent.kill()  # SIGKILL works on a stopped process
        await agent.wait()
        await system.shutdown()
