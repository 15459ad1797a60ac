"""Placement of a job's processes over nodes: GPUs pinned per process, trainer ranks packed,
workers spread, NCCL settings passed on, and new places after a node is lost (or a clear
error when nothing has room)."""

from __future__ import annotations

import pytest

from asystem.config import from_dict
from asystem.placement import NoCapacity, Node, Placement, passed_env
from asystem.train_config import ClusterConfig


def _cluster(**sections) -> ClusterConfig:
    return from_dict(ClusterConfig, sections, "cluster")


def _nodes(*gpus: int) -> list[Node]:
    return [Node(f"node{r}", r, f"10.0.0.{r + 1}", tuple(str(i) for i in range(g)), agent=f"agent{r}")
            for r, g in enumerate(gpus)]


def test_two_gpu_nodes_trainers_packed_workers_spread_each_gpu_once():
    placement = Placement(_cluster(env={"NCCL_SOCKET_IFNAME": "ib0"}), _nodes(4, 4),
                          pass_env=passed_env({"NCCL_DEBUG": "WARN", "HOME": "/root", "NCCL_SOCKET_IFNAME": "eth0"}))
    slots = placement.plan({"trainer": 3, "rollout": 4, "reward": 2})

    assert [s.node.name for s in slots["trainer"]] == ["node0"] * 3
    assert [s.gpus for s in slots["trainer"]] == [("0",), ("1",), ("2",)]
    # The trainer took 3 GPUs of node0: rollouts fill node1 first, then node0's last GPU.
    assert sorted((s.node.name, s.gpus) for s in slots["rollout"]) == [
        ("node0", ("3",)), ("node1", ("0",)), ("node1", ("1",)), ("node1", ("2",))]
    assert sorted(s.node.name for s in slots["reward"]) == ["node0", "node1"]
    assert all(s.gpus == () for s in slots["reward"])

    used = [(s.node.name, g) for s in placement.slots() for g in s.gpus]
    assert len(used) == len(set(used)) == 7, "a GPU was given twice"
    rank0 = slots["trainer"][0]
    assert rank0.where == "agent0" and rank0.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert rank0.env["ASYSTEM_DEVICE"] == "cuda"
    assert rank0.env["NCCL_SOCKET_IFNAME"] == "ib0", "the config's env wins over the launcher's"
    assert rank0.env["NCCL_DEBUG"] == "WARN" and "HOME" not in rank0.env
    reward = slots["reward"][0]
    assert reward.env["CUDA_VISIBLE_DEVICES"] == "" and reward.env["ASYSTEM_DEVICE"] == "cpu"


def test_cpu_nodes_roles_restricted_to_nodes_and_a_per_node_limit():
    placement = Placement(_cluster(trainer={"nodes": [0]}, rollout={"nodes": [1, 2], "per_node": 1},
                                   reward={"nodes": [1, 2]}), _nodes(0, 0, 0))
    slots = placement.plan({"trainer": 2, "rollout": 2, "reward": 2})
    assert [s.node.rank for s in slots["trainer"]] == [0, 0]
    assert sorted(s.node.rank for s in slots["rollout"]) == [1, 2]
    assert sorted(s.node.rank for s in slots["reward"]) == [1, 2]
    assert all(s.gpus == () and s.env["ASYSTEM_DEVICE"] == "cpu" for s in placement.slots())
    with pytest.raises(NoCapacity, match=r"rollout process \(0 GPUs each, at most 1 per node, on nodes \[1, 2\]\)"):
        placement.place("rollout", 2)


def test_after_a_node_loss_its_processes_move_where_there_is_room():
    placement = Placement(_cluster(), _nodes(3, 3, 3))
    placement.plan({"trainer": 2, "rollout": 3, "reward": 3})
    assert [placement.slot("rollout", i).node.name for i in range(3)] == ["node1", "node2", "node0"]
    held = placement.node_lost("node2", "no heartbeat for 10s")
    assert {(s.role, s.index) for s in held} == {("rollout", 1), ("reward", 1)}
    moved = placement.place("rollout", 1)
    assert (moved.node.name, moved.gpus) == ("node1", ("1",))
    assert placement.place("reward", 1).node.name in ("node0", "node1")
    assert "node2" not in {s.node.name for s in placement.slots()}, "a lost node got a process"
    assert "LOST (no heartbeat for 10s)" in placement.describe()


def test_a_crashed_process_restarts_on_its_own_node_with_its_gpus():
    placement = Placement(_cluster(), _nodes(2, 2))
    placement.plan({"rollout": 2})
    before = placement.slot("rollout", 1)
    again = placement.place("rollout", 1)
    assert (again.node, again.gpus) == (before.node, before.gpus)


def test_no_room_after_a_loss_says_what_was_needed_and_what_is_free():
    placement = Placement(_cluster(rollout={"gpus": 2}), _nodes(2, 2))
    placement.plan({"rollout": 2})
    placement.node_lost("node1", "its agent exited")
    with pytest.raises(NoCapacity) as err:
        placement.place("rollout", 1)
    assert "2 GPUs each" in str(err.value) and "node0: 0 GPUs free, 1 rollout" in str(err.value)
    assert placement.slot("rollout", 1) is None


def test_a_plan_that_cannot_fit_and_bad_settings_are_refused_up_front():
    with pytest.raises(NoCapacity, match="trainer"):
        Placement(_cluster(), _nodes(2)).plan({"trainer": 3})
    with pytest.raises(ValueError, match=r"cluster.rollout.nodes: no node of rank \[5\]"):
        Placement(_cluster(rollout={"nodes": [5]}), _nodes(1))
    with pytest.raises(ValueError, match="per_node"):
        Placement(_cluster(reward={"per_node": 0}), _nodes(1))
