"""Who is who in a cluster: node rank, node count, head and port from SLURM, from
torchrun-style variables or from flags (flags win), and this node's GPUs."""

from __future__ import annotations

import pytest

from launch.cluster import (
    LaunchError,
    _secret,
    add_arguments,
    expand_nodelist,
    gpu_ids,
    resolve_node,
)


def _args(*argv: str):
    import argparse

    return add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "3", "SLURM_NODEID": "2",
         "SLURM_JOB_NODELIST": "localhost,127.0.0.[2-3]"}


def test_slurm_nodelists_expand_in_order():
    assert expand_nodelist("gpu[01-03,7],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]
    assert expand_nodelist("a1,b[9-10]") == ["a1", "b9", "b10"]
    assert expand_nodelist("node[001-002]") == ["node001", "node002"]


def test_under_slurm_the_first_node_is_the_head_and_the_port_follows_the_job():
    spec = resolve_node(_args("--addr", "127.0.0.3"), SLURM)
    assert (spec.rank, spec.nnodes, spec.head, spec.source) == (2, 3, "127.0.0.1", "SLURM")
    assert spec.port == 20000 + 4242 and spec.registry == "tcp://127.0.0.1:24242"
    assert spec.name == "node2" and spec.addr == "127.0.0.3"


def test_torchrun_variables_win_over_slurm_and_flags_over_both():
    env = {**SLURM, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "NODE_RANK": "1", "NNODES": "2"}
    spec = resolve_node(_args(), env)
    assert (spec.rank, spec.nnodes, spec.port, spec.source) == (1, 2, 29999, "torchrun variables")
    assert spec.addr == "127.0.0.1", "the address that reaches the head"
    spec = resolve_node(_args("--node-rank", "0", "--nnodes", "4", "--head", "127.0.0.1:31000"), env)
    assert (spec.rank, spec.nnodes, spec.port, spec.source) == (0, 4, 31000, "flags")


def test_no_cluster_variables_means_one_node_on_this_host():
    spec = resolve_node(_args(), {})
    assert (spec.rank, spec.nnodes, spec.head, spec.addr, spec.source) == (0, 1, "127.0.0.1", "127.0.0.1", "one node")


@pytest.mark.parametrize("argv, env, message", [
    (["--node-rank", "3", "--nnodes", "2"], {}, "node rank 3 is not within 0..1"),
    ([], {"MASTER_ADDR": "127.0.0.1", "NODE_RANK": "x"}, "NODE_RANK must be an integer"),
    (["--head", "no-such-host.invalid"], {}, "cannot resolve 'no-such-host.invalid'"),
    (["--port", "70000"], {}, "port 70000 is not a TCP port"),
])
def test_bad_settings_are_named(argv, env, message):
    with pytest.raises(LaunchError, match=message):
        resolve_node(_args(*argv), env)


def test_gpus_from_the_flag_from_slurms_binding_or_none():
    assert gpu_ids("4", {}) == ("0", "1", "2", "3")
    assert gpu_ids("2,5", {}) == ("2", "5")
    assert gpu_ids(None, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == ("4", "5", "6", "7")
    assert gpu_ids(None, {"CUDA_VISIBLE_DEVICES": ""}) == ()


def test_several_nodes_need_one_shared_secret(monkeypatch):
    two = resolve_node(_args("--nnodes", "2"), {})
    monkeypatch.delenv("ASYSTEM_SECRET", raising=False)
    with pytest.raises(LaunchError, match="set ASYSTEM_SECRET"):
        _secret(two)
    assert len(_secret(resolve_node(_args(), {}))) == 32, "one node makes its own"
    monkeypatch.setenv("ASYSTEM_SECRET", "abcd")
    with pytest.raises(LaunchError, match="at least 16 bytes"):
        _secret(two)
    monkeypatch.setenv("ASYSTEM_SECRET", "zz" * 16)
    with pytest.raises(LaunchError, match="must be hex"):
        _secret(two)
