"""A sandbox for untrusted Python: isolated executions served by a warm pool of zygotes.

    async with Sandbox(workers=2) as sandbox:
        result = await sandbox.run("print(sum(map(int, input().split())))", stdin="1 2")
        result.ok, result.stdout            # True, "3\\n"

Semantics:

- Every execution is a fresh process forked from a warm zygote (asystem/zygote.py tells
  how it is isolated): its own pid namespace, chroot, uid and network namespace when the
  host allows it ("namespaces" mode), weaker guards otherwise ("basic" mode).
  `Sandbox.isolation` says which mechanisms are in force.
- Limits (`Limits`): wall time, CPU time, address space, processes, file size, open
  files, and the bytes of stdout and of stderr kept. A program over its output cap or its
  wall time is killed; over its CPU time it gets SIGXCPU. Nothing it started outlives it.
- `run` always answers with an `ExecutionResult` for what the program did: a crash, a
  timeout, a killed sandbox process are all results with `ok` False and a `reason`. It
  raises `SandboxError` only when the sandbox itself cannot serve (closed, a zygote that
  cannot be started, no free zygote within `acquire_timeout`), and `ValueError` for input
  it cannot run (`TypeError` for source or stdin that is not text, `ValueError` over 64 MiB).
- At most `workers` executions run at once; more callers wait in arrival order, each up
  to `acquire_timeout`. A caller that is cancelled does not cut its execution short: the
  zygote finishes it within its wall time and then serves the next caller.
- A zygote that dies (killed by the host, or by a program in "basic" mode) is restarted
  for the next execution; the execution it was running reports `reason="sandbox_error"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Self

from asystem import zygote

log = logging.getLogger(__name__)

ZYGOTE_GRACE_S = 10.0
"""How long past an execution's wall time the zygote may take to answer before it is
considered hung and killed (it reaps and reports within milliseconds normally)."""
LEFTOVER_TIMEOUT_S = 5.0
"""How long a killed zygote's execution processes may take to exit before it is reported."""


@dataclass(frozen=True)
class Limits:
    """Per-execution resource limits."""

    wall_s: float = 10.0
    """Wall-clock time from start to kill."""
    cpu_s: float = 10.0
    """CPU seconds per process (RLIMIT_CPU, rounded up to whole seconds): SIGXCPU at the
    limit, SIGKILL a second later."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS); the forked interpreter itself uses ~40 MiB."""
    processes: int = 32
    """Processes and threads of the execution's uid (RLIMIT_NPROC), the program included."""
    file_size_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE)."""
    open_files: int = 64
    """File descriptors per process (RLIMIT_NOFILE)."""
    output_bytes: int = 256 * 1024
    """Bytes of stdout, and of stderr, kept; a program writing more is killed."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")
        if self.open_files < 8:
            raise ValueError(f"Limits.open_files must be >= 8, got {self.open_files}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExecutionResult:
    """What one execution did. `reason` says how it ended, the first that applies:

    "timeout" (wall time), "output_limit", "cpu_time" (SIGXCPU), "left_processes" (it
    exited but left processes running; they were killed), "signal", "exit" (non-zero
    status), "sandbox_error" (the sandbox failed, see `error`), or "ok".
    """

    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None
    reason: str
    timed_out: bool = False
    """The wall time or the CPU time ran out."""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    left_processes: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        """Exited with status 0, in time, within its output cap, leaving nothing behind."""
        return self.reason == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SandboxError(RuntimeError):
    """The sandbox cannot serve: closed, a zygote that does not start, or no free zygote
    before the deadline."""


class Sandbox:
    """A pool of `workers` warm zygotes running untrusted Python (see the module docstring).

    `isolation`: "auto" (namespaces when the host allows, else basic), "namespaces"
    (fail to start otherwise) or "basic". `disk_mb`: the tmpfs each zygote's executions
    write to (namespaces mode). `start_timeout` bounds a zygote's start-up.
    """

    def __init__(self, workers: int = 2, limits: Limits = Limits(), isolation: str = "auto",
                 disk_mb: int = 64, start_timeout: float = 30.0, acquire_timeout: float = 60.0):
        if workers < 1:
            raise ValueError(f"Sandbox.workers must be >= 1, got {workers}")
        if isolation not in ("auto", "namespaces", "basic"):
            raise ValueError(f"Sandbox.isolation must be auto, namespaces or basic, got {isolation!r}")
        self.limits = limits
        self.mode = isolation
        self.disk_mb = disk_mb
        self.start_timeout = start_timeout
        self.acquire_timeout = acquire_timeout
        self.isolation: dict[str, Any] = {}
        self.counters: Counter[str] = Counter()
        self._workers = workers
        self._zygotes: list[_Zygote] = []
        self._idle: asyncio.Queue[_Zygote] = asyncio.Queue()
        self._running: set[asyncio.Task] = set()
        self._base = ""
        self._closed = False

    async def start(self) -> Self:
        """Start every zygote; raises SandboxError if one does not come up in time."""
        self._base = tempfile.mkdtemp(prefix="asystem-sandbox-")
        os.chmod(self._base, 0o711)  # a dropped uid must reach its work directory below
        self._zygotes = [_Zygote(self, i) for i in range(self._workers)]
        try:
            await asyncio.gather(*(z.start() for z in self._zygotes))
        except BaseException:
            await self.close()
            raise
        self.isolation = self._zygotes[0].isolation
        for z in self._zygotes:
            self._idle.put_nowait(z)
        log.info("sandbox: %d zygotes, isolation %s", self._workers, self.isolation)
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def run(self, source: str, stdin: str = "", limits: Limits | None = None) -> ExecutionResult:
        """Run `source` as a Python program with `stdin`; see the module docstring."""
        if not isinstance(source, str) or not isinstance(stdin, str):
            raise TypeError("Sandbox.run: source and stdin must be str")
        source_b, stdin_b = source.encode("utf-8", "replace"), stdin.encode("utf-8", "replace")
        if max(len(source_b), len(stdin_b)) > zygote.MAX_BLOB:
            raise ValueError(f"Sandbox.run: source and stdin are limited to {zygote.MAX_BLOB} bytes")
        if self._closed:
            raise SandboxError("sandbox is closed")
        limits = limits or self.limits
        try:
            async with asyncio.timeout(self.acquire_timeout):
                zyg = await self._idle.get()
        except TimeoutError:
            raise SandboxError(f"sandbox: no free zygote within acquire_timeout="
                               f"{self.acquire_timeout}s ({self._workers} workers busy)") from None
        # The execution runs in its own task: a caller that gives up does not desynchronise
        # the zygote, which is handed back once its answer is in.
        task = asyncio.create_task(self._execute(zyg, source_b, stdin_b, limits))
        self._running.add(task)
        task.add_done_callback(lambda t: self._done(t, zyg))
        return await asyncio.shield(task)

    async def _execute(self, zyg: _Zygote, source: bytes, stdin: bytes, limits: Limits) -> ExecutionResult:
        result = await zyg.execute(source, stdin, limits)
        self.counters["executions"] += 1
        self.counters[f"reason.{result.reason}"] += 1
        return result

    def _done(self, task: asyncio.Task, zyg: _Zygote) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._closed:
            # Its caller may have gone (cancelled): say it here, once.
            log.warning("sandbox: an execution failed: %r", task.exception())
        if not self._closed:
            self._idle.put_nowait(zyg)

    def stats(self) -> dict[str, int]:
        """executions, reason.<reason> counts, zygote_restarts, sandbox_errors, and
        leftover_processes (of killed zygotes, still there after LEFTOVER_TIMEOUT_S)."""
        return dict(self.counters)

    def zygotes(self) -> list[dict[str, Any]]:
        """pid and execution uid (None: the caller's) of each live zygote, for monitoring."""
        return [{"pid": z.proc.pid, "uid": z.isolation.get("uid")} for z in self._zygotes if z.alive]

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking executions, let running ones finish for up to `timeout` seconds,
        stop the zygotes (SIGKILL after `timeout`), remove the temporary directory."""
        if self._closed:
            return
        self._closed = True
        if self._running:
            await asyncio.wait(self._running, timeout=timeout)
        await asyncio.gather(*(z.stop(timeout) for z in self._zygotes), return_exceptions=True)
        if self._base:
            shutil.rmtree(self._base, ignore_errors=True)


class _Zygote:
    """One zygote process and its pipes, as the sandbox sees it."""

    def __init__(self, sandbox: Sandbox, index: int):
        self.sandbox = sandbox
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.isolation: dict[str, Any] = {}

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        sb = self.sandbox
        base = os.path.join(sb._base, f"z{self.index}")
        shutil.rmtree(base, ignore_errors=True)  # what a killed predecessor left
        os.makedirs(base, mode=0o711)
        os.chmod(base, 0o711)
        config = {"mode": sb.mode, "base": base, "disk_mb": sb.disk_mb, "parent_pid": os.getpid()}
        # -I -S: no environment variables, user site or site-packages; an empty environment;
        # a new session, so that a terminal's Ctrl-C reaches the owner, which decides.
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", zygote.__file__, json.dumps(config),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
        try:
            async with asyncio.timeout(sb.start_timeout):
                header, _ = await self._read_frame()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            await self.kill()
            what = "did not answer" if isinstance(exc, TimeoutError) else f"failed ({exc!r})"
            raise SandboxError(f"sandbox zygote {self.index} (pid {self.proc.pid}) {what} within "
                               f"start_timeout={sb.start_timeout}s; isolation={sb.mode}") from None
        self.isolation = header["isolation"]

    async def execute(self, source: bytes, stdin: bytes, limits: Limits) -> ExecutionResult:
        sb = self.sandbox
        frame = zygote.encode_frame({"limits": limits.to_dict()}, source, stdin)
        started = time.monotonic()
        deadline = limits.wall_s + ZYGOTE_GRACE_S
        try:
            async with asyncio.timeout(deadline):
                await self._hand_over(frame)
                header, (out, err) = await self._read_frame()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            why = (f"no answer within wall_s + {ZYGOTE_GRACE_S}s = {deadline}s"
                   if isinstance(exc, TimeoutError) else f"it died ({exc!r})")
            log.warning("sandbox zygote %d (pid %s): %s; restarting it", self.index,
                        self.proc.pid, why)
            await self.kill()
            sb.counters["sandbox_errors"] += 1
            return ExecutionResult("", "", None, None, "sandbox_error",
                                   wall_s=time.monotonic() - started,
                                   error=f"sandbox zygote {self.index}: {why}")
        if header["reason"] == "sandbox_error":
            sb.counters["sandbox_errors"] += 1
            log.warning("sandbox zygote %d: %s", self.index, header.get("error"))
        return ExecutionResult(
            stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
            exit_code=header["exit_code"], signal=header["signal"], reason=header["reason"],
            timed_out=header["timed_out"], wall_s=header["wall_s"], cpu_s=header["cpu_s"],
            stdout_truncated=header.get("stdout_truncated", False),
            stderr_truncated=header.get("stderr_truncated", False),
            left_processes=header["left_processes"], error=header.get("error", ""))

    async def _hand_over(self, frame: bytes) -> None:
        """Send a request and wait until the zygote has taken it. A zygote that died while
        idle (so the program never ran) is replaced and the request sent again, once."""
        for attempt in (1, 2):
            if not self.alive:
                await self._restart()
            try:
                self.proc.stdin.write(frame)
                await self.proc.stdin.drain()
                header, _ = await self._read_frame()
                if header.get("accepted"):
                    return
                raise ValueError(f"unexpected frame {header!r} instead of the acceptance")
            except (asyncio.IncompleteReadError, ConnectionError):
                await self.kill()
                if attempt == 2:
                    raise SandboxError(f"sandbox zygote {self.index} died twice before "
                                       "taking a request") from None

    async def _restart(self) -> None:
        self.sandbox.counters["zygote_restarts"] += 1
        await self.kill()
        await self.start()

    async def _read_frame(self) -> tuple[dict, list[bytes]]:
        reader = self.proc.stdout
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        if length > zygote.MAX_HEADER:
            raise ValueError(f"frame header of {length} bytes")
        header, sizes = zygote.parse_header(await reader.readexactly(length))
        return header, [await reader.readexactly(n) for n in sizes]

    async def kill(self) -> None:
        """SIGKILL to the zygote's process group (it leads its own session): the zygote
        and an execution's pid-namespace init go at once, which kills the namespace; the
        program itself holds a parent-death signal. Returns once the execution's processes
        are gone too, when they run as a dedicated uid (the kernel kills them
        asynchronously, and a dying process can take a while to exit)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()
        uid = self.isolation.get("uid")
        if uid is None:
            return
        deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
        while left := zygote.live_processes_of(uid):
            if time.monotonic() > deadline:
                self.sandbox.counters["leftover_processes"] += len(left)
                log.warning("sandbox zygote %d: processes %s of uid %d still there %.0fs after "
                            "SIGKILL", self.index, left, uid, LEFTOVER_TIMEOUT_S)
                return
            for pid in left:  # they should be dying already; make sure
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.01)

    async def stop(self, timeout: float) -> None:
        """End of input: the zygote exits after its current execution."""
        if not self.alive:
            return
        self.proc.stdin.close()
        try:
            async with asyncio.timeout(timeout):
                await self.proc.wait()
        except TimeoutError:
            await self.kill()
