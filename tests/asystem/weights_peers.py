"""The other ends of the weight-sync tests: engine ranks (and a trainer rank) in child
processes driven over a pipe, and an actor that takes weights over ZeroMQ.

A `Peer` is a spawned process running `serve`: the test sends it one command at a time as
JSON and reads one JSON reply, so the child never unpickles anything. Replies carry
per-tensor digests, not tensors: two tensors with the same digest are bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import time
from datetime import timedelta
from multiprocessing import forkserver, resource_tracker

import torch
import torch.distributed as dist

from actors import Actor
from asystem.weights import (
    BucketPlan,
    WeightGroup,
    WeightReceiver,
    WeightSender,
    WeightStaging,
    WeightSyncSpec,
)


def digest(t: torch.Tensor) -> str:
    """dtype, shape and the exact bytes of `t`."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode() + data).hexdigest()


def digests(named) -> dict[str, str]:
    return {name: digest(t) for name, t in named}


def synthetic_state(seed: int, tensors: int, numel: int) -> list[tuple[str, torch.Tensor]]:
    """A deterministic bf16 state: the same in every process for the same arguments."""
    gen = torch.Generator().manual_seed(seed)
    return [(f"w{i}", torch.randn(numel, generator=gen).to(torch.bfloat16)) for i in range(tensors)]


# --- the child side -------------------------------------------------------------------


class _Rank:
    """What one child holds between commands."""

    def __init__(self, conn):
        self.conn = conn
        self.group: WeightGroup | None = None

    def join(self, spec: dict, rank: int) -> dict:
        self.group = WeightGroup.join(WeightSyncSpec.from_dict(spec), rank)
        return {"rank": rank}

    def close(self) -> dict:
        self.group.close()
        return {}

    def receive(self, plan: dict, timeout: float, die_at: int | None = None,
                stall_at: int | None = None) -> dict:
        """Receive one update. `die_at`: SIGKILL this process when that bucket arrives.
        `stall_at`: tell the test that bucket arrived, then wait for its "go"."""

        def on_bucket(index: int, named) -> None:
            if index == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if index == stall_at:
                self.conn.send_bytes(json.dumps({"at": index}).encode())
                assert json.loads(self.conn.recv_bytes()) == "go"

        named = WeightReceiver(self.group).receive(BucketPlan.from_dict(plan), timeout, on_bucket=on_bucket)
        return {"version": plan["version"], "digests": digests(named)}

    def send_synthetic(self, plan: dict, seed: int, tensors: int, numel: int, timeout: float) -> dict:
        stats = WeightSender(self.group).send(BucketPlan.from_dict(plan), synthetic_state(seed, tensors, numel),
                                              timeout)
        return {"buckets": stats.buckets}

    def default_group(self, port: int, rank: int, world_size: int) -> dict:
        """Join a default process group (its own store) before any weight group exists."""
        store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        return {"rank": dist.get_rank()}

    def default_all_reduce(self, value: int) -> dict:
        t = torch.tensor([value])
        dist.all_reduce(t)
        return {"sum": int(t.item())}


def serve(conn) -> None:
    """A child's loop: run commands until "exit" or the pipe closes."""
    rank = _Rank(conn)
    while True:
        try:
            command = json.loads(conn.recv_bytes())
        except EOFError:
            return
        if command["name"] == "exit":
            return
        start = time.monotonic()
        try:
            reply = {"ok": getattr(rank, command["name"])(**command["args"])}
        except Exception as e:  # noqa: BLE001 - every failure is the test's to judge
            reply = {"error": type(e).__name__, "message": str(e)}
        reply["seconds"] = time.monotonic() - start
        conn.send_bytes(json.dumps(reply).encode())


# --- the test side --------------------------------------------------------------------


# Children fork from a server that imported torch once, instead of importing it each
# (seconds per child on 2 cores).
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])


def stop_fork_server() -> None:
    """Stop the fork server and the resource tracker it started: other tests check that no
    process outlives them. (Private, stable since Python 3.9; CPython's own tests use them.)"""
    forkserver._forkserver._stop()
    resource_tracker._resource_tracker._stop()


class Peer:
    """A child process running `serve`."""

    def __init__(self):
        ctx = _CONTEXT
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def call(self, name: str, **args) -> None:
        """Start a command; `reply` reads its answer."""
        self.conn.send_bytes(json.dumps({"name": name, "args": args}).encode())

    def reply(self, timeout: float = 60.0) -> dict:
        if not self.conn.poll(timeout):
            raise AssertionError(f"peer pid {self.proc.pid}: no reply within {timeout}s")
        return json.loads(self.conn.recv_bytes())

    def ok(self, timeout: float = 60.0) -> dict:
        reply = self.reply(timeout)
        assert "ok" in reply, f"peer pid {self.proc.pid} failed: {reply}"
        return reply["ok"]

    def go(self) -> None:
        self.conn.send_bytes(json.dumps("go").encode())

    def stop(self) -> None:
        """Ask it to exit; kill it if it does not within a few seconds."""
        if self.proc.is_alive():
            try:
                self.call("exit")
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


# --- the ZeroMQ path ------------------------------------------------------------------


class WeightHolder(Actor):
    """An engine that cannot join a group: it takes weights through asks, the way the
    RolloutWorker does, and answers with the digests of what it serves."""

    def __init__(self):
        self.staging = WeightStaging()
        self.weights: list[tuple[str, torch.Tensor]] = []
        self.version: int | None = None

    async def load_weight_bucket(self, version: int, index: int, plan: dict | None, buffer: torch.Tensor) -> None:
        self.staging.add(version, index, buffer, plan)

    async def commit_weights(self, version: int) -> None:
        self.weights = [(name, t.clone()) for name, t in self.staging.commit(version)]
        self.version = version

    async def serving(self) -> dict:
        return {"version": self.version, "digests": digests(self.weights)}
