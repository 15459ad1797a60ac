"""Simulated nodes for the launcher's tests: one `python -m launch.cluster` process per node,
each on its own loopback address (node r on 127.0.0.<r+1>), output in a log file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SimNode:
    """`python -m launch.cluster ... --node-rank rank` with its output in `<logs>/node<rank>-<n>.log`."""

    def __init__(self, rank: int, nnodes: int, port: int, logs: Path, secret: str, *args: str):
        logs.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.log = logs / f"node{rank}-{len(list(logs.glob(f'node{rank}-*.log')))}.log"
        env = {**os.environ, "ASYSTEM_SECRET": secret, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "launch.cluster", "--nnodes", str(nnodes), "--node-rank", str(rank),
               "--head", f"127.0.0.1:{port}", "--addr", f"127.0.0.{rank + 1}", *args]
        with open(self.log, "w") as out:
            # SIGINT as by default even when pytest runs as a background job (which a shell
            # starts with SIGINT ignored, inherited): the Ctrl-C tests send it.
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.seen: set[int] = {self.proc.pid}

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> str:
        """Until `needle` is in the output; the output. Fails if the node exits first."""
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            self.remember()
            if self.proc.poll() is not None:
                raise AssertionError(f"node{self.rank} exited with {self.proc.returncode} before "
                                     f"printing {needle!r}:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"node{self.rank} did not print {needle!r} within {timeout}s:\n"
                                     f"{self.text()[-4000:]}")
            time.sleep(0.3)
        return self.text()

    def wait(self, timeout: float, others: tuple[SimNode, ...] = ()) -> int:
        """Its exit status, noting the processes of it (and of `others`) meanwhile."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            for node in (self, *others):
                node.remember()
            if time.monotonic() > deadline:
                raise AssertionError(f"node{self.rank} did not exit within {timeout}s:\n{self.text()[-4000:]}")
            time.sleep(0.3)
        return self.proc.returncode

    def agent(self) -> psutil.Process:
        """Its node agent (the launcher's child running actors.agent)."""
        for child in psutil.Process(self.proc.pid).children():
            if "actors.agent" in " ".join(child.cmdline()):
                return child
        raise LookupError(f"node{self.rank} has no agent process")

    def remember(self) -> None:
        """Note every process of this node's tree, to check later that all are gone."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        self.seen.update(p.pid for p in tree)

    def left_behind(self) -> list[int]:
        return [pid for pid in self.seen if _alive(pid)]

    def kill_all(self) -> None:
        self.remember()
        for pid in self.seen:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(nodes: list[SimNode], timeout: float = 60.0) -> list[int]:
    """Wait until every process of these nodes exited; the pids still alive then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(n.left_behind() for n in nodes):
            return []
        time.sleep(0.3)
    return [pid for n in nodes for pid in n.left_behind()]
