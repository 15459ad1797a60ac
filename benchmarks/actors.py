"""Actor calls against their baselines, raw pyzmq and Ray, all measured in the same run.

Three figures, each between two processes on this host:

1. Round trip with one call in flight. Ours: ``await ref.ask("echo", payload)`` to an Echo
   actor spawned with ``where="process"``. Raw pyzmq: a blocking DEALER here and a blocking
   ROUTER echo server in another process, with CURVE on as in ours (and off, for
   reference), sending frames of exactly the sizes of our request's frames. Ray: an actor
   method call, ``ray.get(actor.echo.remote(payload))``.
2. Pipelined rate with 64 calls in flight. Ours: 64 coroutines, each looping over asks.
   Raw: one DEALER that keeps 64 requests outstanding. Ray: 64 outstanding refs, each
   replaced by a new call as ``ray.wait`` returns it.
3. Round trip of a 64 MiB tensor. Ours: ask echo of a float32 torch tensor (out-of-band,
   zero-copy frames both ways). Raw: the tensor's buffer sent with ``copy=False`` and echoed
   back with ``copy=False``. Reported as MB/s moved: 2 x 64 MiB per round trip.

The machine is noisy, so nothing is compared with numbers from another run: repetitions
are interleaved (ours, raw, ours, raw, ...) so that a slow spell hits every contender, and
each figure is the median over repetitions; the table also shows the range. Each
measurement runs for about the same time for every contender (its call count is sized from
the warm-up).

Two phases, because Ray's daemons (GCS, raylet, its workers) keep polling while Ray is up,
and on a small virtual machine that changes the figures of everyone else, not the same way
each time (2026-12-04, 2 cores, five full runs: our round trip -8% to +20%, raw pyzmq's
-8% to +8%, against the phase before Ray started). First, before Ray starts,
ours and raw pyzmq are measured on a quiet machine. Then Ray starts, and ours, raw pyzmq
(CURVE) and Ray are measured again, interleaved: the ratios against Ray come from that
phase, and the ``*_ray_up`` ratios give ours against raw pyzmq on busy cores. A ratio
against raw pyzmq meets its target only if it does in both phases. Ray is optional: without
it (or with ``--no-ray``) its figures are null, ``ray_note`` says why, and the targets
against raw pyzmq are judged on the quiet phase alone.

    .venv/bin/python benchmarks/actors.py [--quick] [--no-ray]

Prints a table and, as its last line, one JSON object with the figures and the ratios
``rtt_ratio_vs_zmq``, ``rtt_ratio_vs_ray`` (ours / baseline round trip: lower is better),
``pipelined_ratio_vs_zmq``, ``pipelined_ratio_vs_ray`` and ``bandwidth_ratio_vs_zmq``
(ours / baseline rate: higher is better). The ``vs_zmq`` ratios compare with raw pyzmq
with CURVE, like for like; ``*_vs_zmq_nocurve`` compare with unencrypted raw pyzmq;
``*_vs_zmq_ray_up`` with raw pyzmq (CURVE) while Ray's daemons run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled; ahead of benchmarks/

import zmq  # noqa: E402

from actors import Actor  # noqa: E402

WINDOW = 64  # calls in flight for the pipelined figure
SMALL = b"x" * 16  # the payload of a small call
BIG_BYTES = 64 << 20
BOTH_PHASES = ("rtt_ratio_vs_zmq", "pipelined_ratio_vs_zmq")
TARGETS = {  # ratio name -> (comparison, bound), from issue 2
    "rtt_ratio_vs_zmq": ("<=", 1.5),
    "rtt_ratio_vs_ray": ("<=", 0.25),
    "pipelined_ratio_vs_zmq": (">=", 0.5),
    "pipelined_ratio_vs_ray": (">=", 5.0),
    "bandwidth_ratio_vs_zmq": (">=", 0.7),
}


class Echo(Actor):
    """The callee of our figures (spawned in its own process)."""

    async def echo(self, value):
        return value


class RayEcho:
    """The callee of Ray's figures (wrapped with ray.remote when Ray is there)."""

    def echo(self, value):
        return value


@dataclass(frozen=True)
class Plan:
    reps: int  # interleaved repetitions of the round-trip and pipelined figures
    seconds: float  # the length of one round-trip or pipelined measurement
    big_reps: int  # interleaved repetitions of the 64 MiB figure
    big_calls: int  # 64 MiB round trips per repetition
    warmup: int  # small calls before measuring


FULL = Plan(reps=7, seconds=1.0, big_reps=5, big_calls=2, warmup=500)
QUICK = Plan(reps=3, seconds=0.25, big_reps=2, big_calls=1, warmup=200)


# -- raw pyzmq: the echo server (a child process) ---------------------------------------

def serve_raw(server_secret: str | None) -> None:
    """Echo on two ROUTERs until stdin closes (the parent is done or gone): one for small
    messages (plain recv/send), one for big ones (copy=False both ways). Prints the ports."""
    ctx = zmq.Context()
    ports = []
    for big in (False, True):
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        if server_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = server_secret.encode()
        ports.append(sock.bind_to_random_port("tcp://127.0.0.1"))
        threading.Thread(target=_echo_forever, args=(sock, big), daemon=True).start()
    print(json.dumps(ports), flush=True)
    try:
        sys.stdin.read()  # EOF: the parent closed the pipe or died
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group
        pass
    os._exit(0)  # daemon threads sit in blocking recv; nothing to flush


def _echo_forever(sock: zmq.Socket, big: bool) -> None:
    try:
        if big:
            while True:
                sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
        while True:
            sock.send_multipart(sock.recv_multipart())
    except zmq.ZMQError:
        return


class RawServer:
    """A raw echo server process, and this process's DEALERs to it (after ``connect``)."""

    def __init__(self, curve: bool):
        self.server_keys = zmq.curve_keypair() if curve else None
        self.client_keys = zmq.curve_keypair() if curve else None
        self.small = self.big = None
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--raw-server",
             self.server_keys[1].decode() if curve else "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def connect(self, ctx: zmq.Context) -> None:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"raw echo server exited with code {self.proc.wait()}")
        self.small, self.big = (self._dealer(ctx, port) for port in json.loads(line))

    def _dealer(self, ctx: zmq.Context, port: int) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if self.server_keys is not None:
            sock.curve_serverkey = self.server_keys[0]
            sock.curve_publickey, sock.curve_secretkey = self.client_keys
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def close(self) -> None:
        for sock in (self.small, self.big):
            if sock is not None:
                sock.close(linger=0)
        _end_process(self.proc)


def _end_process(proc: subprocess.Popen) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()  # stdin EOF asks the server to exit
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def raw_rtt(sock: zmq.Socket, parts: list, n: int) -> float:
    send, recv = sock.send_multipart, sock.recv_multipart
    start = time.perf_counter()
    for _ in range(n):
        send(parts)
        recv()
    return (time.perf_counter() - start) / n


def raw_pipelined(sock: zmq.Socket, parts: list, n: int) -> float:
    send, recv = sock.send_multipart, sock.recv_multipart
    start = time.perf_counter()
    for _ in range(WINDOW):
        send(parts)
    for _ in range(n - WINDOW):
        recv()
        send(parts)
    for _ in range(WINDOW):
        recv()
    return n / (time.perf_counter() - start)


def raw_big(sock: zmq.Socket, buffer: memoryview, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        sock.send(buffer, copy=False)
        sock.recv(copy=False)
    return (time.perf_counter() - start) / n


# -- ours ---------------------------------------------------------------------------------

async def ours_rtt(ref, n: int) -> float:
    ask = ref.ask
    start = time.perf_counter()
    for _ in range(n):
        await ask("echo", SMALL)
    return (time.perf_counter() - start) / n


async def ours_pipelined(ref, n: int) -> float:
    per_worker = max(1, n // WINDOW)

    async def worker():
        for _ in range(per_worker):
            await ref.ask("echo", SMALL)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(WINDOW)))
    return per_worker * WINDOW / (time.perf_counter() - start)


async def ours_big(ref, tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        back = await ref.ask("echo", tensor, timeout=120)
    elapsed = (time.perf_counter() - start) / n
    assert back.shape == tensor.shape and back.dtype == tensor.dtype
    return elapsed


class Ours:
    """An ActorSystem on its own loop in this process, and an Echo actor in a child."""

    def __init__(self):
        from actors.runtime import new_event_loop
        self.runner = asyncio.Runner(loop_factory=new_event_loop)
        self.system = None
        try:
            self.ref = self.runner.run(self._start())
        except BaseException:
            self.close()
            raise

    async def _start(self):
        from actors import ActorSystem
        self.system = await ActorSystem().start()
        return await self.system.spawn(Echo, where="process", timeout=60)

    def request_sizes(self) -> tuple[int, int]:
        """The sizes of our request's frames (header, body) for a small ask."""
        from transport import codec
        from transport.envelope import Envelope, Kind, pack_header
        env = Envelope(Kind.CALL, 1 << 20, self.system.address, self.ref.actor_id, "echo",
                       int(self.system.default_timeout * 1000))
        return len(pack_header(env)), len(codec.encode([[SMALL], {}])[0])

    def run(self, coro):
        return self.runner.run(coro)

    def close(self) -> None:
        try:
            if self.system is not None:
                self.runner.run(self.system.shutdown(timeout=5))
        finally:
            self.runner.close()


# -- Ray ----------------------------------------------------------------------------------

class Ray:
    def __init__(self):
        import logging

        import ray
        self.ray = ray
        # Quieter logs and no worker output in our stdout: nothing that changes its speed.
        # ray.init can swallow a KeyboardInterrupt, and installs a SIGTERM handler that
        # would skip our cleanup: note Ctrl-C ourselves, and put our SIGTERM handler back.
        interrupted = []

        def on_sigint(*_):
            interrupted.append(True)
            raise KeyboardInterrupt

        sigint = signal.signal(signal.SIGINT, on_sigint)
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        finally:
            signal.signal(signal.SIGINT, sigint)
            signal.signal(signal.SIGTERM, sigterm)
        if interrupted:
            raise KeyboardInterrupt
        self.actor = ray.remote(RayEcho).remote()

    def rtt(self, n: int) -> float:
        get, echo = self.ray.get, self.actor.echo.remote
        start = time.perf_counter()
        for _ in range(n):
            get(echo(SMALL))
        return (time.perf_counter() - start) / n

    def pipelined(self, n: int) -> float:
        get, wait, echo = self.ray.get, self.ray.wait, self.actor.echo.remote
        start = time.perf_counter()
        pending = [echo(SMALL) for _ in range(WINDOW)]
        sent, done = WINDOW, 0
        while pending:
            ready, pending = wait(pending, num_returns=1)
            get(ready)
            done += 1
            if sent < n:
                pending.append(echo(SMALL))
                sent += 1
        return done / (time.perf_counter() - start)

    def close(self) -> None:
        self.ray.shutdown()


# -- the run ------------------------------------------------------------------------------

def progress(message: str) -> None:
    print(f"[actors benchmark] {message}", file=sys.stderr, flush=True)


def calls_for(seconds_per_call: float, plan: Plan, lowest: int = 50) -> int:
    return max(lowest, min(500_000, int(plan.seconds / seconds_per_call)))


class Bench:
    def __init__(self, plan: Plan, use_ray: bool):
        self.plan = plan
        self.use_ray = use_ray
        self.ray_note: str | None = None
        self.ctx = zmq.Context()
        self.raw: dict[str, RawServer] = {}  # "zmq" (CURVE), "zmq_nocurve"
        self.ours: Ours | None = None
        self.ray: Ray | None = None
        self.samples: dict[tuple[str, str], list[float]] = {}

    def start(self) -> None:
        progress("starting: raw pyzmq echo servers, our Echo actor, Ray")
        for name, curve in (("zmq", True), ("zmq_nocurve", False)):
            self.raw[name] = RawServer(curve)  # starts while ours does
        self.ours = Ours()
        for raw in self.raw.values():
            raw.connect(self.ctx)

    def start_ray(self) -> None:
        if not self.use_ray:
            self.ray_note = "skipped (--no-ray)"
            return
        progress("starting Ray")
        try:
            self.ray = Ray()
        except ImportError:
            self.ray_note = "ray is not installed (pip install ray, or the 'bench' extra)"
        except Exception as exc:  # e.g. no shared memory for its object store
            self.ray_note = f"ray did not start: {type(exc).__name__}: {exc}"

    def close(self) -> None:
        for part in (self.ray, self.ours, *self.raw.values()):
            if part is None:
                continue
            try:
                part.close()
            except BaseException as exc:  # keep cleaning up; say what went wrong
                print(f"cleanup of {type(part).__name__} failed: {exc!r}", file=sys.stderr)
        self.ctx.destroy(linger=0)  # closes any socket a failure left open

    def record(self, figure: str, who: str, value: float) -> None:
        self.samples.setdefault((figure, who), []).append(value)

    def run(self) -> None:
        plan, ours = self.plan, self.ours
        header, body = ours.request_sizes()
        parts = [b"h" * header, b"b" * body]
        rtt = {"ours": lambda n: ours.run(ours_rtt(ours.ref, n))}
        pipelined = {"ours": lambda n: 1 / ours.run(ours_pipelined(ours.ref, n))}
        for name, raw in self.raw.items():
            rtt[name] = functools.partial(raw_rtt, raw.small, parts)
            pipelined[name] = lambda n, raw=raw: 1 / raw_pipelined(raw.small, parts, n)
        progress("warming up")
        rtt_n, pipe_n = self.sized(rtt, pipelined)
        self.small_calls("", rtt, pipelined, rtt_n, pipe_n)

        progress(f"64 MiB round trips, {plan.big_reps} repetitions")
        import torch
        tensor = torch.ones(BIG_BYTES // 4, dtype=torch.float32)
        buffer = memoryview(tensor.numpy()).cast("B")
        mb = 2 * BIG_BYTES / 1e6
        big = {"ours": lambda n: mb / ours.run(ours_big(ours.ref, tensor, n))}
        for name, raw in self.raw.items():
            big[name] = lambda n, raw=raw: mb / raw_big(raw.big, buffer, n)
        for f in big.values():
            f(1)
        self.measure("bandwidth", {who: functools.partial(f, plan.big_calls)
                                   for who, f in big.items()}, plan.big_reps)

        self.start_ray()
        if self.ray is None:
            return
        progress("warming up Ray")  # its workers start on the first calls
        ray_rtt = {"ray": self.ray.rtt}
        ray_pipelined = {"ray": lambda n: 1 / self.ray.pipelined(n)}
        ray_rtt_n, ray_pipe_n = self.sized(ray_rtt, ray_pipelined)
        self.small_calls("_ray_up", {who: rtt[who] for who in ("ours", "zmq")} | ray_rtt,
                         {who: pipelined[who] for who in ("ours", "zmq")} | ray_pipelined,
                         rtt_n | ray_rtt_n, pipe_n | ray_pipe_n)

    def sized(self, rtt: dict, pipelined: dict) -> tuple[dict, dict]:
        """Warm up every path (connections, CURVE handshakes, Ray's workers) and size each
        contender's measurements to take about plan.seconds: the call counts of its round
        trips and of its pipelined calls (each function returns seconds per call)."""
        plan = self.plan
        return ({who: calls_for(f(plan.warmup), plan) for who, f in rtt.items()},
                {who: calls_for(f(plan.warmup * 4), plan, 2 * WINDOW)
                 for who, f in pipelined.items()})

    def small_calls(self, phase: str, rtt: dict, pipelined: dict, rtt_n: dict,
                    pipe_n: dict) -> None:
        """The round-trip and pipelined figures of one phase ("": Ray not started;
        "_ray_up": Ray running), for the contenders given (functions of a call count)."""
        plan = self.plan
        note = " (Ray running)" if phase else ""
        progress(f"round trips, {plan.reps} repetitions{note}")
        self.measure(f"rtt{phase}", {who: functools.partial(f, rtt_n[who])
                                     for who, f in rtt.items()}, plan.reps)
        progress(f"pipelined calls, {plan.reps} repetitions{note}")
        self.measure(f"pipelined{phase}", {who: lambda f=f, n=pipe_n[who]: 1 / f(n)
                                           for who, f in pipelined.items()}, plan.reps)

    def measure(self, figure: str, contenders: dict, reps: int) -> None:
        """``reps`` rounds of every contender; the order rotates from round to round, so
        that none always runs first (or right after a particular other one)."""
        order = list(contenders)
        for rep in range(reps):
            for who in order[rep % len(order):] + order[:rep % len(order)]:
                self.record(figure, who, contenders[who]())

    def median(self, figure: str, who: str) -> float | None:
        values = self.samples.get((figure, who))
        return statistics.median(values) if values else None


def _ratio(ours: float | None, base: float | None) -> float | None:
    return None if ours is None or base is None else round(ours / base, 3)


def summarize(bench: Bench, plan: Plan, quick: bool, seconds: float) -> dict:
    med = bench.median
    result: dict = {}
    for phase, who in PHASED:
        rtt = med(f"rtt{phase}", who)
        result[f"rtt_us_{who}{phase}"] = None if rtt is None else round(rtt * 1e6, 1)
        rate = med(f"pipelined{phase}", who)
        result[f"pipelined_per_s_{who}{phase}"] = None if rate is None else round(rate)
    for who in ("ours", "zmq", "zmq_nocurve"):
        result[f"bandwidth_mb_s_{who}"] = round(med("bandwidth", who))
    for phase, base, name in (("", "zmq", "zmq"), ("", "zmq_nocurve", "zmq_nocurve"),
                              ("_ray_up", "ray", "ray"), ("_ray_up", "zmq", "zmq_ray_up")):
        result[f"rtt_ratio_vs_{name}"] = _ratio(med(f"rtt{phase}", "ours"),
                                                med(f"rtt{phase}", base))
        result[f"pipelined_ratio_vs_{name}"] = _ratio(med(f"pipelined{phase}", "ours"),
                                                      med(f"pipelined{phase}", base))
    for base in ("zmq", "zmq_nocurve"):
        result[f"bandwidth_ratio_vs_{base}"] = _ratio(med("bandwidth", "ours"),
                                                      med("bandwidth", base))
    # A ratio against raw pyzmq meets its target only if it does in both phases: Ray's
    # daemons keep the cores busy, which changes the ratio (see the module docstring).
    result["targets_met"] = {
        name: _met(result[name], *bound) if name not in BOTH_PHASES
        else _met_both(result[name], result[f"{name}_ray_up"], *bound)
        for name, bound in TARGETS.items()}
    result["ray_note"] = bench.ray_note
    result["quick"] = quick
    result["repetitions"] = plan.reps
    result["repetitions_bandwidth"] = plan.big_reps
    result["seconds"] = round(seconds, 1)
    return result


def _met(value: float | None, comparison: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value <= bound if comparison == "<=" else value >= bound


def _met_both(quiet: float | None, ray_up: float | None, comparison: str,
              bound: float) -> bool | None:
    met = [_met(value, comparison, bound) for value in (quiet, ray_up) if value is not None]
    return all(met) if met else None


# (phase, contender) of the small-call figures: before Ray starts, then with Ray running.
PHASED = (("", "ours"), ("", "zmq"), ("", "zmq_nocurve"),
          ("_ray_up", "ours"), ("_ray_up", "zmq"), ("_ray_up", "ray"))
LABELS = {"ours": "ours (asystem ask)", "zmq": "raw pyzmq, CURVE",
          "zmq_nocurve": "raw pyzmq, no CURVE (reference)", "ray": "Ray actor call"}
FIGURES = (("rtt", "round trip, 1 call in flight (us, lower is better)", 1e6, ".1f"),
           ("pipelined", f"pipelined, {WINDOW} in flight (calls/s, higher is better)", 1, ".0f"),
           ("bandwidth", "64 MiB tensor round trip (MB/s moved, 2 x 64 MiB; higher is better)",
            1, ".0f"),
           ("rtt_ray_up", "with Ray running: round trip, 1 call in flight (us)", 1e6, ".1f"),
           ("pipelined_ray_up", f"with Ray running: pipelined, {WINDOW} in flight (calls/s)",
            1, ".0f"))


def table(bench: Bench, result: dict) -> str:
    lines = [f"{'':<36}{'median':>12}{'min':>12}{'max':>12}"]
    for figure, title, scale, fmt in FIGURES:
        lines.append(title)
        for who, label in LABELS.items():
            values = bench.samples.get((figure, who))
            if not values:
                if figure.endswith("_ray_up") and who == "ray":
                    lines.append(f"  {label:<34}{'n/a':>12}   {bench.ray_note}")
                continue
            cells = (statistics.median(values), min(values), max(values))
            lines.append(f"  {label:<34}" + "".join(f"{v * scale:>12{fmt}}" for v in cells))
    lines.append("")
    lines.append(f"{'ratio (ours / baseline)':<36}{'value':>12}{'target':>12}{'met':>12}")
    for name, (comparison, bound) in TARGETS.items():
        value, met = result[name], result["targets_met"][name]
        shown = "n/a" if value is None else f"{value:.3f}"
        verdict = "n/a" if met is None else ("yes" if met else "NO")
        lines.append(f"  {name:<34}{shown:>12}{comparison + ' ' + str(bound):>12}{verdict:>12}")
    for name in ("rtt_ratio_vs_zmq_nocurve", "pipelined_ratio_vs_zmq_nocurve",
                 "bandwidth_ratio_vs_zmq_nocurve", "rtt_ratio_vs_zmq_ray_up",
                 "pipelined_ratio_vs_zmq_ray_up"):
        shown = "n/a" if result[name] is None else f"{result[name]:.3f}"
        lines.append(f"  {name:<34}{shown:>12}{'(reference)':>12}")
    lines.append("rtt ratios: lower is better; pipelined and bandwidth ratios: higher is better")
    lines.append("a target against raw pyzmq is met only if its *_ray_up ratio (busy cores, "
                 "Ray running) meets it too")
    return "\n".join(lines)


def main() -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 minute)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray baseline")
    parser.add_argument("--raw-server", metavar="SECRET_KEY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server is not None:  # internal: the raw pyzmq echo server's process
        serve_raw(None if args.raw_server == "-" else args.raw_server)
        return None
    os.chdir(ROOT)  # the actor's child process must import the package, not this file
    # SIGTERM ends the run as Ctrl-C does (KeyboardInterrupt, or a cancelled task inside
    # the event loop), through the finally below, which stops every process started here.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    plan = QUICK if args.quick else FULL
    began = time.perf_counter()
    bench = Bench(plan, use_ray=not args.no_ray)
    try:
        bench.start()
        bench.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        bench.close()
    result = summarize(bench, plan, args.quick, time.perf_counter() - began)
    print(table(bench, result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
