"""`asystem cluster`: one command per node runs a training job over several nodes.

    # SLURM, one task per node (node ranks, the head and its port come from SLURM_*):
    srun --nodes=4 --ntasks-per-node=1 asystem cluster --config gpu model.path=/models/m
    # torchrun-style variables (MASTER_ADDR, MASTER_PORT, NODE_RANK, NNODES):
    asystem cluster --config gpu ...
    # explicit flags, e.g. on plain SSH hosts:
    asystem cluster --nnodes 2 --node-rank 0 --head 10.0.0.1 --config gpu ...   # on 10.0.0.1
    asystem cluster --nnodes 2 --node-rank 1 --head 10.0.0.1 --config gpu ...   # on the other

Flags win over torchrun-style variables, which win over SLURM's. Every node needs the same
cluster secret in ASYSTEM_SECRET (hex; `openssl rand -hex 32`) and the same arguments.

Each node runs its node agent (actors/agent.py) as a child process; the agent starts the
job's processes there, pinned to their GPUs (asystem/placement.py). Node rank 0 is the head:
it keeps the cluster's registry at HEAD:PORT, waits for every node to join, prints where
everything runs, runs the single controller (asystem/job.py with asystem/cluster.py) and
prints every node's output, each line prefixed with [node name]: a node's launcher reads
its agent's output (which its processes share) and sends it to the head.

Shutdown: when the job ends or fails, or the head gets Ctrl-C or SIGTERM, the head tells
every node to stop and waits (bounded) for them to go; a node stops its agent (SIGTERM,
then SIGKILL), which stops its processes. A node that loses the head, or whose agent dies,
stops by itself. Exit status: 0 done; 1 the job failed or was stopped (a lost trainer rank:
the message names the checkpoint `--resume` goes on from); 2 bad arguments or environment;
130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors import Actor, ActorError, ActorRef, ActorSystem
from transport.endpoint import Heartbeat

log = logging.getLogger(__name__)

DEFAULT_PORT = 29400
AGENT_START_S = 60.0  # an agent prints its address within this (imports, bind, registration)
STOP_S = 30.0  # how long a node's processes get to stop before SIGKILL
_LINE_END = re.compile(rb"\r\n|\r|\n")


class LaunchError(RuntimeError):
    """Arguments or environment that cannot make a cluster; exit status 2."""


# -- who am I: node rank, node count, the head ----------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    """This node's place in the cluster."""

    rank: int
    nnodes: int
    head: str
    """The head's address (node rank 0), where the registry listens."""
    port: int
    addr: str
    """This node's address: its agent and processes bind there, others reach them there."""
    source: str
    """Where rank, count and head came from: flags, torchrun variables, SLURM, one node."""

    @property
    def name(self) -> str:
        return f"node{self.rank}"

    @property
    def registry(self) -> str:
        return f"tcp://{self.head}:{self.port}"


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,7],cpu5") as host names, in order."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", text.strip()):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not last:
                hosts.append(prefix + first)
                continue
            hosts.extend(f"{prefix}{i:0{len(first)}d}" for i in range(int(first), int(last) + 1))
    return hosts


def _int(value: str | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{what} must be an integer, got {value!r}") from None


def resolve_node(args: argparse.Namespace, environ: dict[str, str]) -> NodeSpec:
    """Node rank, node count, head and port from flags, torchrun variables or SLURM."""
    rank, nnodes, head, port, source = 0, 1, "127.0.0.1", DEFAULT_PORT, "one node"
    if "SLURM_JOB_ID" in environ and "SLURM_NNODES" in environ:
        hosts = expand_nodelist(environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", ""))
        if not hosts:
            raise LaunchError("SLURM_JOB_NODELIST is empty or missing")
        rank = _int(environ.get("SLURM_NODEID"), "SLURM_NODEID") or 0
        nnodes = _int(environ["SLURM_NNODES"], "SLURM_NNODES")
        head = hosts[0]
        # One port per job, so that jobs sharing nodes do not collide.
        port = 20000 + _int(environ["SLURM_JOB_ID"], "SLURM_JOB_ID") % 20000
        source = "SLURM"
    if "MASTER_ADDR" in environ:
        head = environ["MASTER_ADDR"]
        rank = _int(environ.get("NODE_RANK"), "NODE_RANK") or 0
        nnodes = _int(environ.get("NNODES"), "NNODES") or 1
        port = _int(environ.get("MASTER_PORT"), "MASTER_PORT") or DEFAULT_PORT
        source = "torchrun variables"
    flags = [args.node_rank, args.nnodes, args.head, args.port]
    if any(f is not None for f in flags):
        source = "flags"
    rank = rank if args.node_rank is None else args.node_rank
    nnodes = nnodes if args.nnodes is None else args.nnodes
    if args.head is not None:
        head, _, given_port = args.head.partition(":")
        port = _int(given_port, "--head port") or port
    port = port if args.port is None else args.port
    if not (nnodes >= 1 and 0 <= rank < nnodes):
        raise LaunchError(f"node rank {rank} is not within 0..{nnodes - 1} (from {source})")
    if not 0 < port < 65536:
        raise LaunchError(f"port {port} is not a TCP port (from {source})")
    head_ip = _ip(head)
    addr = _ip(args.addr) if args.addr else (head_ip if rank == 0 else route_to(head_ip))
    return NodeSpec(rank, nnodes, head_ip, port, addr, source)


def _ip(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise LaunchError(f"cannot resolve {host!r}: {exc}") from None


def route_to(host: str) -> str:
    """This host's address on the interface that reaches `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 9))
        return sock.getsockname()[0]


def gpu_ids(flag: str | None, environ: dict[str, str]) -> tuple[str, ...]:
    """This node's GPUs as CUDA_VISIBLE_DEVICES names them: `--gpus` (a count or a list),
    else CUDA_VISIBLE_DEVICES (set by SLURM's GPU binding), else nvidia-smi's count."""
    if flag is not None:
        if flag.isdigit():
            return tuple(str(i) for i in range(int(flag)))
        return tuple(g for g in flag.split(",") if g)
    if "CUDA_VISIBLE_DEVICES" in environ:
        return tuple(g for g in environ["CUDA_VISIBLE_DEVICES"].split(",") if g)
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi -L failed (%s): this node counts as having no GPU", exc)
        return ()
    return tuple(str(i) for i, line in enumerate(l for l in listed.stdout.splitlines() if l.startswith("GPU ")))


# -- the actors a launcher hosts -----------------------------------------------------------


class LogSink(Actor):
    """On the head: prints the output lines of the nodes, each prefixed with [node]."""

    max_concurrency = 16

    async def lines(self, node: str, lines: list[str]) -> None:
        sys.stdout.write("".join(f"[{node}] {line}\n" for line in lines))
        sys.stdout.flush()


class NodeLauncher(Actor):
    """A node's launcher as the head sees it: what the node has, and its off switch.

    Spawned "local" (arguments by reference): `info` plain data, `on_shutdown(reason)`."""

    def __init__(self, info: dict[str, Any], on_shutdown):
        self._info, self._on_shutdown = info, on_shutdown

    async def info(self) -> dict[str, Any]:
        return self._info

    async def shutdown(self, reason: str) -> None:
        self._on_shutdown(reason)


class LogForwarder:
    """Sends output lines to the head's LogSink in batches, one batch in flight.

    At most `limit` lines wait: beyond that the oldest are dropped, counted, and a line
    says how many. A batch the head does not take within `timeout` is printed here
    instead (and counted), so that nothing vanishes silently.
    """

    def __init__(self, node: str, sink: ActorRef, limit: int = 10_000, timeout: float = 10.0):
        self.node, self.sink, self.timeout = node, sink, timeout
        self.lines: deque[str] = deque(maxlen=limit)
        self.dropped = self.printed_here = 0
        self._more = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    def add(self, line: str) -> None:
        if len(self.lines) == self.lines.maxlen:
            self.dropped += 1
        self.lines.append(line)
        self._more.set()

    async def _run(self) -> None:
        while True:
            await self._more.wait()
            self._more.clear()
            await self._send()

    async def _send(self) -> None:
        batch = [self.lines.popleft() for _ in range(min(len(self.lines), 500))]
        if self.dropped:
            batch.append(f"[{self.dropped} output lines of {self.node} dropped: the head did not keep up]")
            self.dropped = 0
        if not batch:
            return
        try:
            await self.sink.ask("lines", self.node, batch, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - the head is slow or gone: keep the lines here
            self.printed_here += len(batch)
            sys.stderr.write("".join(f"[{self.node}, not sent to the head: {exc}] {line}\n" for line in batch))
        if self.lines:
            self._more.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is left (bounded by `timeout`), then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.lines:
                    await self._send()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class AgentProcess:
    """This node's agent (`python -m actors.agent`), its output read line by line.

    The agent runs in a session of its own, so that Ctrl-C reaches the launcher, which
    stops it in order; the processes it starts share its output.
    """

    def __init__(self, spec: NodeSpec, secret: bytes, on_line):
        self.spec, self.secret, self.on_line = spec, secret, on_line
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""
        self._reader: asyncio.Task | None = None

    async def start(self) -> str:
        """Start it; returns its address once it is up (within AGENT_START_S)."""
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "ASYSTEM_SECRET": self.secret.hex(),
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "actors.agent", "--bind", f"tcp://{self.spec.addr}:0",
            "--head", self.spec.registry, "--node", self.spec.name, env=env, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        up = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read(up))
        done, _ = await asyncio.wait({up, self._reader}, timeout=AGENT_START_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if up not in done:
            await self.stop()
            what = "exited" if self.proc.returncode is not None else f"did not start within {AGENT_START_S:g}s"
            raise LaunchError(f"the node agent of {self.spec.name} {what} (its output is above)")
        self.address = up.result()
        return self.address

    async def _read(self, up: asyncio.Future) -> None:
        # Chunks, not readline: a progress bar redraws itself with "\r" and never ends a
        # line, and a reader that gave up would leave the pipe full and every writer stuck.
        pending = b""
        while chunk := await self.proc.stdout.read(1 << 16):
            *lines, pending = _LINE_END.split(pending + chunk)
            if len(pending) > 1 << 16:  # a line that long is cut, not held forever
                lines.append(pending)
                pending = b""
            for raw in lines:
                self._line(raw.decode(errors="replace"), up)
        self._line(pending.decode(errors="replace"), up)

    def _line(self, line: str, up: asyncio.Future) -> None:
        if not line.strip():
            return
        if not up.done() and line.startswith("node agent "):
            up.set_result(line.rsplit(" at ", 1)[1])
        self.on_line(line)

    async def wait(self) -> int:
        """Until it exits (its output read to the end); its exit code."""
        await asyncio.gather(self._reader, return_exceptions=True)
        return await self.proc.wait()

    async def stop(self, timeout: float = STOP_S) -> None:
        """SIGTERM (it stops its processes), then SIGKILL of its whole session."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log.warning("the node agent of %s did not stop within %gs: killing it", self.spec.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


# -- the head ----------------------------------------------------------------------------


def say(message: str) -> None:
    """A message of the launcher on the head, for the user: on stdout, marked [cluster]."""
    print(f"[cluster] {message}", flush=True)


async def _join(system: ActorSystem, spec: NodeSpec, head_info: dict[str, Any], timeout: float) -> list:
    """Wait for every node's launcher and agent to register; returns the Nodes by rank."""
    from asystem.placement import Node

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    nodes: dict[int, Node] = {}
    while len(nodes) < spec.nnodes:
        for rank in sorted(set(range(spec.nnodes)) - set(nodes)):
            launcher = await system.lookup(f"launcher/node{rank}") if rank else None
            agent = await system.lookup(f"agent/node{rank}")
            if agent is None or (rank and launcher is None):
                continue
            try:
                info = await launcher.ask("info", timeout=30.0) if rank else head_info
            except ActorError as exc:  # it went away meanwhile: it may come again
                say(f"node{rank} registered but does not answer ({exc}); still waiting for it")
                continue
            nodes[rank] = Node(f"node{rank}", rank, info["addr"], tuple(info["gpus"]), agent)
            say(f"node{rank} joined: {info['hostname']} ({info['addr']}), {len(info['gpus'])} GPUs, "
                f"agent at {agent.address}")
        if len(nodes) < spec.nnodes:
            if loop.time() > deadline:
                missing = [f"node{r}" for r in range(spec.nnodes) if r not in nodes]
                raise LaunchError(f"{', '.join(missing)} did not join within {timeout:g}s: run `asystem "
                                  f"cluster` there with the same ASYSTEM_SECRET, node count and head "
                                  f"({spec.registry})")
            await asyncio.sleep(0.5)
    return [nodes[r] for r in range(spec.nnodes)]


async def _stop_nodes(system: ActorSystem, spec: NodeSpec, reason: str, timeout: float = STOP_S + 10) -> None:
    """Tell every other node to stop, and wait (bounded) until its launcher is gone."""
    launchers = [ref for ref in await asyncio.gather(
        *(system.lookup(f"launcher/node{r}", timeout=5.0) for r in range(1, spec.nnodes)),
        return_exceptions=True) if isinstance(ref, ActorRef)]
    agents = [await system.lookup(f"agent/node{r}", timeout=5.0) for r in range(spec.nnodes)]
    for ref in [*launchers, *(a for a in agents if a is not None)]:
        system.endpoint.expect_loss(ref.address)  # stopped on purpose: not news
    gone = [system.when_lost(ref.address) for ref in launchers]
    told = await asyncio.gather(*(ref.ask("shutdown", reason, timeout=10.0) for ref in launchers),
                                return_exceptions=True)
    for ref, result in zip(launchers, told):
        if isinstance(result, BaseException):
            say(f"could not tell {ref.name} to stop: {result}")
    if gone:
        _, late = await asyncio.wait(gone, timeout=timeout)
        for ref, future in zip(launchers, gone):
            if future in late:
                say(f"{ref.name} did not stop within {timeout:g}s")


async def run_head(spec: NodeSpec, config, secret: bytes, args: argparse.Namespace) -> int:
    cfg = config.cluster
    system = ActorSystem(f"tcp://{spec.addr}:{spec.port}", secret=secret,
                         heartbeat=Heartbeat(cfg.heartbeat_s, cfg.dead_after_s))
    try:
        await system.start()
    except Exception as exc:  # noqa: BLE001 - the transport says why (port taken, no such address)
        raise LaunchError(f"the head cannot listen at {spec.registry}: {exc}; another job may use the "
                          "port: choose one with --port") from None
    agent = AgentProcess(spec, secret, lambda line: print(f"[{spec.name}] {line}", flush=True))
    reason = "the job ended"
    try:
        await system.spawn(LogSink, name="cluster/logs")
        say(f"head of {spec.nnodes} node(s) at {spec.registry} (from {spec.source}); "
            f"waiting up to {cfg.join_timeout_s:g}s for the nodes to join")
        await agent.start()
        nodes = await _join(system, spec, _node_info(spec, args), cfg.join_timeout_s)
        if args.check:
            from .cluster_check import run_check

            code = await run_check(system, config, _cluster(spec, secret, nodes), args.check_mb)
        else:
            code = await _run_job(config, _cluster(spec, secret, nodes))
        reason = "the job failed" if code else reason
        return code
    except BaseException as exc:
        reason = "Ctrl-C or SIGTERM on the head" if isinstance(exc, asyncio.CancelledError) else f"{exc}"
        raise
    finally:
        say(f"stopping every node ({reason})")
        await _stop_nodes(system, spec, reason)
        await agent.stop()
        await system.shutdown()


def _cluster(spec: NodeSpec, secret: bytes, nodes: list):
    from asystem.cluster import Cluster
    from asystem.placement import passed_env

    return Cluster(nodes=nodes, head=spec.registry, host=spec.addr, secret=secret,
                   pass_env=passed_env(dict(os.environ)), report=say)


async def _run_job(config, cluster) -> int:
    """Run the training job; a lost trainer rank stops it (see the module docstring)."""
    from asystem import checkpoint
    from asystem.job import train

    from .train import _train

    stopped: list[str] = []
    job = asyncio.ensure_future(_train(functools.partial(train, cluster=cluster), config))

    def stop_job(why: str) -> None:
        if not job.done() and not stopped:
            stopped.append(why)
            say(f"stopping the job: {why}")
            job.cancel()
    cluster.stop_job = stop_job
    try:
        return await job
    except asyncio.CancelledError:
        if not stopped:
            raise  # Ctrl-C: not ours to explain
    except Exception as exc:  # reported below, with the way back in
        log.error("the job failed", exc_info=exc)
        stopped.append(f"{type(exc).__name__}: {exc}")
    latest = checkpoint.latest(Path(config.run.out))
    again = ("run the same command with --resume to go on from it" if latest else
             "there is no checkpoint yet: a new run starts over")
    say(f"the job stopped: {stopped[0]}. The newest checkpoint is {latest or 'none'}: {again}.")
    return 1


def _node_info(spec: NodeSpec, args: argparse.Namespace) -> dict[str, Any]:
    return {"rank": spec.rank, "addr": spec.addr, "hostname": socket.gethostname(),
            "gpus": list(gpu_ids(args.gpus, dict(os.environ))), "pid": os.getpid()}


# -- the other nodes -------------------------------------------------------------------------


async def _wait_for_head(system: ActorSystem, spec: NodeSpec, timeout: float) -> ActorRef:
    """Until the head answers and its LogSink is registered (retried until `timeout`); the sink."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            sink = await system.lookup("cluster/logs", timeout=5.0)
            if sink is not None:
                return sink
            problem = "it has no log sink yet"
        except Exception as exc:  # noqa: BLE001 - not up yet, or not reachable: retried until the deadline
            problem = str(exc)
        if loop.time() > deadline:
            raise LaunchError(f"no head at {spec.registry} within {timeout:g}s ({problem}): is node rank 0 "
                              "running with the same ASYSTEM_SECRET?")
        await asyncio.sleep(1.0)


async def run_node(spec: NodeSpec, config, secret: bytes, args: argparse.Namespace) -> int:
    cfg = config.cluster
    system = ActorSystem(f"tcp://{spec.addr}:0", secret=secret, head=spec.registry,
                         heartbeat=Heartbeat(cfg.heartbeat_s, cfg.dead_after_s))
    await system.start()
    agent = forwarder = None
    told = asyncio.get_running_loop().create_future()  # the head's reason to stop this node
    try:
        forwarder = LogForwarder(spec.name, await _wait_for_head(system, spec, cfg.join_timeout_s))
        agent = AgentProcess(spec, secret, forwarder.add)
        await agent.start()
        await system.spawn(NodeLauncher, _node_info(spec, args),
                           lambda reason: told.done() or told.set_result(reason), name=f"launcher/{spec.name}")
        waits = {"told": told, "head lost": system.when_lost(spec.registry),
                 "agent exited": asyncio.ensure_future(agent.wait())}
        done, _ = await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
        why = next(k for k, f in waits.items() if f in done)
        if why == "told":
            log.info("%s: stopping: %s", spec.name, told.result())
            return 0
        detail = waits[why].result()
        message = f"{spec.name}: the head is lost ({detail})" if why == "head lost" else \
            f"{spec.name}: its node agent exited with code {detail}"
        forwarder.add(f"{message}; this node leaves the cluster")
        log.error("%s; this node leaves the cluster", message)
        return 1
    finally:
        if agent is not None:
            await agent.stop()
        if forwarder is not None:
            await forwarder.close()
        await system.shutdown()


# -- the command -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", default=None, help="a YAML file, or a recipe in ring/recipes (tiny, gpu)")
    p.add_argument("--resume", action="store_true", help="go on from the newest checkpoint in run.out")
    p.add_argument("--nnodes", type=int, help="number of nodes (else NNODES or SLURM_NNODES; default 1)")
    p.add_argument("--node-rank", type=int, help="this node's rank, 0 = the head (else NODE_RANK or SLURM_NODEID)")
    p.add_argument("--head", help="HOST[:PORT] of node rank 0 (else MASTER_ADDR, or SLURM's first node)")
    p.add_argument("--port", type=int, help=f"the head's port (else MASTER_PORT; SLURM: 20000 + job id %% 20000; "
                   f"default {DEFAULT_PORT})")
    p.add_argument("--addr", help="this node's address for the others (default: the one that reaches the head)")
    p.add_argument("--gpus", help="this node's GPUs: a count or ids (default: CUDA_VISIBLE_DEVICES, nvidia-smi)")
    p.add_argument("--check", action="store_true",
                   help="check the cluster instead of training: placement, GPUs, the trainer group and the "
                        "weight broadcast across nodes (launch/cluster_check.py)")
    p.add_argument("--check-mb", type=int, default=64, help="size of the weights the check broadcasts")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. trainer_ranks=8 cluster.dead_after_s=20")
    return p


async def launch(args: argparse.Namespace) -> int:
    """Run this node's part of the cluster with the parsed arguments; the exit status."""
    main = asyncio.current_task()
    terminated = []

    def on_sigterm() -> None:  # scancel, or the head's stop of a node's tree: like Ctrl-C
        terminated.append(True)
        main.cancel()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        spec = resolve_node(args, dict(os.environ))
        config = _load(args)
        secret = _secret(spec)
        return await (run_head if spec.rank == 0 else run_node)(spec, config, secret, args)
    except LaunchError as exc:
        print(f"asystem cluster: {exc}", file=sys.stderr, flush=True)
        return 2
    except asyncio.CancelledError:
        if terminated:
            return 128 + signal.SIGTERM
        raise


def _load(args: argparse.Namespace):
    from asystem.config import ConfigError, load_config
    from asystem.train_config import TrainConfig

    from .train import recipe_path

    try:
        return load_config(TrainConfig, recipe_path(args.config), [*args.overrides, *(["run.resume=true"] if args.resume else [])])
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None


def _secret(spec: NodeSpec) -> bytes:
    raw = os.environ.get("ASYSTEM_SECRET")
    if raw is None:
        if spec.nnodes > 1:
            raise LaunchError("set ASYSTEM_SECRET (hex, e.g. `openssl rand -hex 32`) to the same value on every node")
        return os.urandom(32)
    try:
        secret = bytes.fromhex(raw)
    except ValueError:
        raise LaunchError("ASYSTEM_SECRET must be hex") from None
    if len(secret) < 16:
        raise LaunchError("ASYSTEM_SECRET must hold at least 16 bytes (32 hex digits)")
    return secret


def main(argv: list[str] | None = None) -> int:
    from actors.runtime import configure_logging, run

    parser = argparse.ArgumentParser(prog="python -m launch.cluster",
                                     description="Run a training job over several nodes (docs/cluster.md).")
    args = add_arguments(parser).parse_args(argv)
    configure_logging()
    return run(launch(args))


if __name__ == "__main__":
    sys.exit(main())
