"""The sandbox's warm process: it forks one isolated execution of untrusted Python at a time.

Started by `asystem.sandbox.Sandbox` as `python -I -S zygote.py CONFIG` with an empty
environment, it imports only the standard library, sets up its isolation once, preloads
common modules and then serves requests on stdin/stdout, one at a time. Each execution is a
fresh fork, so start-up costs a few forks instead of a Python start (the report's ~100 ms
figure is the target).

Processes of one execution, "namespaces" mode (needs root: CAP_SYS_ADMIN, CAP_SETUID):

- zygote: own mount + network namespace, set up once: no network interface at all; a
  private tmpfs root with read-only /usr and Python install, and /work. Per execution it
  makes a new pid namespace, feeds stdin, collects stdout/stderr up to the cap, kills at
  the wall time, reaps, reports.
- init, pid 1 of the new pid namespace: `sleep`, spawned by the zygote as root. The
  program cannot signal it; it takes the program's orphans; when the zygote kills it, the
  kernel kills every process left in the namespace.
- program, pid 2 of that namespace, forked from the zygote: chroot, a dedicated uid
  (1000000 + zygote pid), rlimits, clean environment, a fresh work directory; it runs the
  source with exec() in the forked interpreter.

"basic" mode (no namespaces: an unprivileged user, or a container without CAP_SYS_ADMIN):
the zygote is a child subreaper and the program leads its own session, so the zygote
finds and kills everything it leaves behind; the network is closed by a seccomp filter
(socket() for anything but AF_UNIX fails) on x86_64 and aarch64, by an audit hook
elsewhere; the file system only by an audit hook (Python-level opens outside the work
directory fail) and, when started as root, by the dedicated uid. Weaker: see docs/rewards.md.

Wire format (both directions, never pickle): a frame is a 4-byte big-endian length, a JSON
header whose "sizes" lists the lengths of the raw byte blobs that follow, then the blobs.
Requests: header {"limits": {...}}, blobs [source, stdin]. The zygote answers each with
{"accepted": true} as soon as it has read it, then with the result fields and blobs
[stdout, stderr]. The first frame the zygote writes is {"ready": true, "isolation": {...}}.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import struct
import sys
import time

MAX_HEADER = 1 << 20
MAX_BLOB = 64 << 20

# Linux constants (sched.h, prctl.h, mount.h, seccomp.h).
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP = 1, 4, 22
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
UID_BASE = 1_000_000

# Imported once here so that executions find them already loaded (in "basic" mode with a
# dropped uid the Python install may not be readable at all). Each one also makes every
# fork a little slower, so the list holds what test programs commonly use, nothing big.
PRELOAD = (
    "array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal",
    "encodings.idna", "fractions", "functools", "heapq", "itertools", "json", "math",
    "operator", "random", "re", "socket", "statistics", "string", "subprocess", "textwrap",
    "threading", "traceback", "typing",
)

_libc = ctypes.CDLL(None, use_errno=True)


# -- frames ----------------------------------------------------------------------------------


def encode_frame(header: dict, *blobs: bytes) -> bytes:
    head = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    return b"".join([struct.pack(">I", len(head)), head, *blobs])


def parse_header(head: bytes) -> tuple[dict, list[int]]:
    """The header and its blob sizes; ValueError when it is not a valid frame header."""
    header = json.loads(head)
    sizes = header.pop("sizes", None) if isinstance(header, dict) else None
    if not isinstance(sizes, list) or not all(isinstance(s, int) and 0 <= s <= MAX_BLOB for s in sizes):
        raise ValueError("frame header without valid blob sizes")
    return header, sizes


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> tuple[dict, list[bytes]] | None:
    """One frame from a blocking fd; None at end of file."""
    raw = _read_exact(fd, 4)
    if raw is None:
        return None
    (length,) = struct.unpack(">I", raw)
    if length > MAX_HEADER:
        raise ValueError(f"frame header of {length} bytes")
    head = _read_exact(fd, length)
    if head is None:
        return None
    header, sizes = parse_header(head)
    blobs = [_read_exact(fd, s) for s in sizes]
    if any(b is None for b in blobs):
        return None
    return header, blobs


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


ACCEPTED = encode_frame({"accepted": True})


# -- system calls the os module lacks ---------------------------------------------------------


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int | ctypes.c_void_p = 0) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def _close_from(low: int) -> None:
    # close_range(2) is one system call; os.closerange tries every number up to the limit.
    if _libc.syscall(436, low, 0xFFFFFFFF, 0) != 0:
        os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


# -- set-up, once per zygote ------------------------------------------------------------------


def setup(config: dict) -> dict:
    """Enter the isolation `config["mode"]` asks for ("auto", "namespaces" or "basic") and
    return what is in force, for the caller to report."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the sandbox's owner died: so does the zygote
    if os.getppid() != config["parent_pid"]:
        os._exit(1)
    uid = UID_BASE + os.getpid() if os.geteuid() == 0 else None
    mode = config["mode"]
    reason = ""
    if mode in ("auto", "namespaces"):
        try:
            return _setup_namespaces(config, uid)
        except OSError as exc:
            if mode == "namespaces":
                raise
            reason = f" (namespaces unavailable: {exc})"
    return _setup_basic(config, uid, reason)


def _probe_pid_namespace() -> None:
    pid = os.fork()
    if pid == 0:
        try:
            _unshare(CLONE_NEWPID)
            os._exit(0)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(1, "unshare(CLONE_NEWPID) refused")


def _setup_namespaces(config: dict, uid: int | None) -> dict:
    if uid is None:
        raise OSError(1, "namespaces mode needs root (to drop to a dedicated uid afterwards)")
    init = shutil.which("sleep", path="/usr/bin:/bin")
    if init is None:
        raise OSError(2, "no sleep binary for the pid namespaces' init")
    _probe_pid_namespace()
    _unshare(CLONE_NEWNS | CLONE_NEWNET)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    root = os.path.join(config["base"], "root")
    os.makedirs(root, exist_ok=True)
    inodes = max(1024, config["disk_mb"] * 64)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={config['disk_mb']}m,nr_inodes={inodes},mode=755")
    for path in ("/usr", sys.base_prefix, "/lib", "/lib64", "/bin"):
        _expose(path, root)
    os.makedirs(root + "/dev")
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"):
        open(root + dev, "w").close()
        _mount(dev, root + dev, None, MS_BIND)
    os.makedirs(root + "/work", mode=0o711)
    os.chmod(root + "/work", 0o711)
    return {
        "mode": "namespaces", "uid": uid, "root": root, "init": init,
        "network": "own network namespace without interfaces",
        "filesystem": "chroot into a private tmpfs; /usr and the Python install read-only; "
                      f"writable only the execution's directory ({config['disk_mb']} MiB in all)",
        "processes": "pid namespace per execution (its end kills every process in it); "
                     f"RLIMIT_NPROC for uid {uid}",
        "user": f"uid {uid}, no capabilities",
    }


def _expose(path: str, root: str) -> None:
    """Make `path` appear read-only at the same place inside `root` (symlinks copied)."""
    if not os.path.lexists(path) or os.path.lexists(root + path):
        return
    os.makedirs(os.path.dirname(root + path), mode=0o755, exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), root + path)
        return
    os.makedirs(root + path, mode=0o755)
    _mount(path, root + path, None, MS_BIND | MS_REC)
    _mount(None, root + path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _setup_basic(config: dict, uid: int | None, reason: str) -> dict:
    network = ("seccomp filter: socket() other than AF_UNIX fails" if _seccomp_arch()
               else "audit hook: Python-level socket creation fails (weak)")
    user = f"uid {uid}" if uid is not None else f"the caller's uid {os.getuid()} (not root)"
    return {
        "mode": "basic" + reason, "uid": uid, "root": None,
        "network": network,
        "filesystem": "audit hook: Python-level opens outside the execution's directory and "
                      "the Python install fail, and subprocesses and ctypes are refused (weak)",
        "processes": "own session; the zygote is a child subreaper and kills what is left; "
                     "RLIMIT_NPROC" + (f" for uid {uid}" if uid is not None else
                                       " over the caller's current process count"),
        "user": user,
    }


def preload() -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    # Objects that exist now are never collected: the collector in each child then leaves
    # them alone instead of touching (and so copying) every page of the zygote's heap.
    gc.freeze()


# -- one execution -------------------------------------------------------------------------


class Execution:
    """One request: where its directory is, its limits, its source and stdin."""

    def __init__(self, iso: dict, base: str, seq: int, limits: dict, source: bytes, stdin: bytes):
        self.iso, self.limits, self.source, self.stdin = iso, limits, source, stdin
        name = f"e{seq}"
        if iso["root"]:
            self.host_dir = os.path.join(iso["root"], "work", name)
            self.inner_dir = "/work/" + name
        else:
            self.host_dir = self.inner_dir = os.path.join(base, name)
        self.namespaces = iso["mode"] == "namespaces"
        self.uid = iso["uid"]


def execute(ex: Execution, pid_ns: int | None) -> bytes:
    """Run one execution to its end, remove its directory, return the reply frame.

    `pid_ns`: an fd of the zygote's own pid namespace (namespaces mode), to which the next
    child's namespace is reset before a new one is made for it."""
    os.makedirs(ex.host_dir, mode=0o700)
    try:
        with open(os.path.join(ex.host_dir, "main.py"), "wb") as f:
            f.write(ex.source)
        if ex.uid is not None:
            os.chown(ex.host_dir, ex.uid, ex.uid)
        supervisor = _Supervisor(ex, pid_ns)
        header = supervisor.run()
        out, err = supervisor.output()
    except Exception as exc:  # noqa: BLE001 - a fault of the sandbox, reported as such
        header, out, err = {"reason": "sandbox_error", "error": repr(exc), "exit_code": None,
                            "signal": None, "timed_out": False, "wall_s": 0.0, "cpu_s": 0.0,
                            "left_processes": False}, b"", b""
    finally:
        shutil.rmtree(ex.host_dir, ignore_errors=True)
    return encode_frame(header, out, err)


class _Supervisor:
    """Starts the program under its isolation, feeds stdin, collects stdout/stderr up to
    the cap, enforces the wall time, reaps everything and reports."""

    def __init__(self, ex: Execution, pid_ns: int | None):
        self.ex, self.pid_ns = ex, pid_ns
        self.cap = ex.limits["output_bytes"]
        self.stdin = memoryview(ex.stdin)
        self.timed_out = self.killed_for_output = False
        self.status: dict | None = None
        self.child = self.init = self.pidfd = -1

    def run(self) -> dict:
        ex = self.ex
        in_r, self.in_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        child_ends = [in_r, out_w, err_w]
        self.data = {self.out_r: bytearray(), self.err_r: bytearray()}
        self.truncated = {self.out_r: False, self.err_r: False}
        try:
            nproc_base = 0 if ex.uid is not None else _count_user_processes(os.getuid())
            cpu_before = _children_cpu()
            started = time.monotonic()
            if ex.namespaces:
                self.init = self._start_namespace()
            zygote = os.getpid()
            self.child = os.fork()
            if self.child == 0:
                try:
                    for fd in (self.in_w, self.out_r, self.err_r):
                        os.close(fd)
                    # In its pid namespace the program's parent (this zygote) shows as 0.
                    _program(ex, (in_r, out_w, err_w), 0 if ex.namespaces else zygote, nproc_base)
                finally:
                    os._exit(70)
            for fd in child_ends:
                os.close(fd)
            child_ends = []
            self.pidfd = os.pidfd_open(self.child)
            self._pump(started + ex.limits["wall_s"])
            if self.status is None:
                self._reap()
        finally:
            for fd in (*child_ends, self.pidfd, self.out_r, self.err_r, self.in_w):
                _close_quietly(fd)
            self._end_namespace()
        header = {**self.status, "wall_s": time.monotonic() - started,
                  "cpu_s": _children_cpu() - cpu_before,
                  "timed_out": self.timed_out or self.status["signal"] == signal.SIGXCPU,
                  "stdout_truncated": self.truncated[self.out_r],
                  "stderr_truncated": self.truncated[self.err_r]}
        header["reason"] = self._reason(header)
        return header

    def _start_namespace(self) -> int:
        """A new pid namespace for the next child, with `sleep` as its init (pid 1): a
        process the program cannot signal, which takes its orphans, and whose end makes the
        kernel kill everything in the namespace. Spawned, not forked: it costs no copy of
        this interpreter, and it ends by itself a while after the wall time even if this
        zygote is killed first."""
        _check(_libc.setns(self.pid_ns, CLONE_NEWPID), "setns(own pid namespace)")
        _unshare(CLONE_NEWPID)
        lifetime = str(math.ceil(self.ex.limits["wall_s"]) + 10)
        return os.posix_spawn(self.ex.iso["init"], ["sleep", lifetime], {}, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),  # not the control pipes
            (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)])

    def _end_namespace(self) -> None:
        """Kill the namespace's init: the kernel then kills the rest. Its exit waits until
        the program is reaped, so that comes first."""
        if self.init < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init, signal.SIGKILL)
        if self.status is None and self.child > 0:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.child, 0)
        os.waitpid(self.init, 0)
        self.init = -1

    def output(self) -> tuple[bytes, bytes]:
        return bytes(self.data[self.out_r]), bytes(self.data[self.err_r])

    def _pump(self, deadline: float) -> None:
        """Until the child has ended and both pipes are at EOF, or the deadline."""
        poll = select.poll()
        for fd in (self.out_r, self.err_r, self.pidfd):
            poll.register(fd, select.POLLIN)
        if self.stdin:
            os.set_blocking(self.in_w, False)
            poll.register(self.in_w, select.POLLOUT)
        else:
            os.close(self.in_w)
            self.in_w = -1
        open_fds = {self.out_r, self.err_r}
        while open_fds or self.status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                if self.status is None:
                    self.timed_out = True
                    self._kill()
                return
            for fd, _ in poll.poll(left * 1000):
                if fd == self.pidfd:
                    poll.unregister(fd)
                    self._reap()
                    deadline = min(deadline, time.monotonic() + 1.0)  # drain what is buffered
                elif fd == self.in_w:
                    self._feed(poll)
                elif not self._read(fd):
                    poll.unregister(fd)
                    open_fds.discard(fd)

    def _feed(self, poll) -> None:
        try:
            n = os.write(self.in_w, self.stdin[:1 << 16])
        except BlockingIOError:
            n = 0
        except BrokenPipeError:  # the program closed its stdin: the rest is not wanted
            n = len(self.stdin)
        self.stdin = self.stdin[n:]
        if not self.stdin:
            poll.unregister(self.in_w)
            os.close(self.in_w)
            self.in_w = -1

    def _read(self, fd: int) -> bool:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return False
        buf = self.data[fd]
        room = self.cap - len(buf)
        buf += chunk[:room]
        if len(chunk) > room:
            self.truncated[fd] = True
            if not self.killed_for_output and self.status is None:
                self.killed_for_output = True
                self._kill()
        return True

    def _kill(self) -> None:
        try:
            if self.ex.namespaces:
                os.kill(self.init, signal.SIGKILL)  # the whole pid namespace goes
            else:
                os.killpg(self.child, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        """The program has ended or been killed: wait for it, and find what it left."""
        _, status = os.waitpid(self.child, 0)
        code = os.waitstatus_to_exitcode(status)
        if self.ex.namespaces:  # its orphans are the init's children now
            left = any(_running(pid) for pid in _children(self.init))
        else:
            left = _kill_leftovers(self.child)
        self.status = {"exit_code": code if code >= 0 else None,
                       "signal": -code if code < 0 else None, "left_processes": left}

    def _reason(self, h: dict) -> str:
        if self.timed_out:
            return "timeout"
        if self.killed_for_output:
            return "output_limit"
        if h["signal"] == signal.SIGXCPU:
            return "cpu_time"
        if h["left_processes"]:
            return "left_processes"
        if h["signal"] is not None:
            return "signal"
        return "ok" if h["exit_code"] == 0 else "exit"


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _kill_leftovers(pgid: int) -> bool:
    """basic mode: SIGKILL the program's process group and every orphan reparented to the
    zygote (a child subreaper) until none is left. True if any was still running."""
    found = False
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    while True:
        kids = _children(os.getpid())
        if not kids:
            return found
        alive = [pid for pid in kids if not _reaped(pid)]
        found = found or bool(alive)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(p) for p in f.read().split())
    except FileNotFoundError:  # it has ended
        pass
    return kids


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


def _program(ex: Execution, fds: tuple[int, int, int], parent: int, nproc_base: int) -> None:
    """Become the untrusted program: drop everything, then exec() the source."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    _close_from(3)
    os.setsid()
    if ex.namespaces:
        os.chroot(ex.iso["root"])
    os.chdir(ex.inner_dir)
    if ex.uid is not None:
        os.setgroups([])
        os.setgid(ex.uid)
        os.setuid(ex.uid)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
    if os.getppid() != parent:
        os._exit(70)
    _prctl(PR_SET_DUMPABLE, 0)
    _set_limits(ex.limits, nproc_base)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": ex.inner_dir, "TMPDIR": ex.inner_dir,
                       "LANG": "C.UTF-8"})
    if not ex.namespaces:
        _basic_guards(ex.inner_dir)
    _run_source(ex)


def _set_limits(limits: dict, nproc_base: int) -> None:
    cpu = max(1, int(-(-limits["cpu_s"] // 1)))
    mib = 1 << 20
    for res, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU, then SIGKILL a second later
        (resource.RLIMIT_AS, limits["memory_mb"] * mib, limits["memory_mb"] * mib),
        (resource.RLIMIT_NPROC, nproc_base + limits["processes"], nproc_base + limits["processes"]),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mib, limits["file_size_mb"] * mib),
        (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(res, (soft, hard))


def _count_user_processes(uid: int) -> int:
    """Threads of `uid` now: RLIMIT_NPROC counts threads, of every process of the user."""
    count = 0
    for pid in processes_of(uid):
        try:
            count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:  # it has ended meanwhile
            pass
    return count


def processes_of(uid: int) -> list[int]:
    """pids of `uid`'s processes now, zombies included (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:  # it has ended meanwhile
                pass
    return pids


def live_processes_of(uid: int) -> list[int]:
    """pids of `uid`'s processes that have not exited (zombies left out)."""
    return [pid for pid in processes_of(uid) if _running(pid)]


# -- basic mode guards ---------------------------------------------------------------------------


_SECCOMP = {  # machine: (AUDIT_ARCH, __NR_socket, __NR_io_uring_setup)
    "x86_64": (0xC000003E, 41, 425),
    "aarch64": (0xC00000B7, 198, 425),
}


def _seccomp_arch():
    return _SECCOMP.get(platform.machine())


def _basic_guards(work_dir: str) -> None:
    arch = _seccomp_arch()
    if arch:
        _seccomp_no_network(*arch)
    _audit_hook(work_dir, block_sockets=arch is None)


def _seccomp_no_network(audit_arch: int, nr_socket: int, nr_io_uring: int) -> None:
    """A classic-BPF seccomp filter: socket(domain != AF_UNIX) and io_uring_setup fail with
    EACCES; syscalls of another ABI (x32, i386) fail with EPERM; everything else runs."""
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny, wrong_abi = 0x7FFF0000, 0x00050000 | 13, 0x00050000 | 1
    prog = [
        (ld, 0, 0, 4),                 # 0: A = arch
        (jeq, 1, 0, audit_arch),       # 1: native ABI -> 3
        (ret, 0, 0, wrong_abi),        # 2
        (ld, 0, 0, 0),                 # 3: A = syscall number
        (jge, 0, 1, 0x40000000),       # 4: x32 numbers -> 5, else 6
        (ret, 0, 0, wrong_abi),        # 5
        (jeq, 4, 0, nr_io_uring),      # 6: io_uring_setup -> 11
        (jeq, 0, 2, nr_socket),        # 7: socket -> 8, else 10
        (ld, 0, 0, 16),                # 8: A = args[0] (domain)
        (jeq, 0, 1, 1),                # 9: AF_UNIX -> 10, else 11
        (ret, 0, 0, allow),            # 10
        (ret, 0, 0, deny),             # 11
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _check(_libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0), "seccomp filter")


def _audit_hook(work_dir: str, block_sockets: bool) -> None:
    readable = tuple(os.path.realpath(p) + os.sep for p in
                     {sys.base_prefix, sys.prefix, work_dir, "/dev"})
    writable = os.path.realpath(work_dir) + os.sep
    refused = ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
               "ctypes.", "socket.__new__" if block_sockets else "\0")

    def hook(event: str, args: tuple) -> None:
        if event.startswith(refused):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0])) + os.sep
            mode, flags = args[1] or "r", args[2] or 0
            writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
            if not path.startswith(writable if writing else readable):
                raise PermissionError(f"sandbox: opening {args[0]!r} is not allowed")
        elif (event in ("os.listdir", "os.scandir") and isinstance(args[0], (str, bytes))
              and not (os.path.realpath(os.fsdecode(args[0])) + os.sep).startswith(readable)):
            raise PermissionError(f"sandbox: listing {args[0]!r} is not allowed")

    sys.addaudithook(hook)


# -- running the source -----------------------------------------------------------------------


def _run_source(ex: Execution) -> None:
    """Run the program as `python main.py` would, then _exit with its status."""
    import atexit
    import builtins
    import threading
    import traceback
    import types

    path = os.path.join(ex.inner_dir, "main.py")
    # The program's own streams: they live until _exit.
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                      closefd=False, buffering=1)
    sys.argv = [path]
    sys.path[:0] = [ex.inner_dir]
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = path, builtins
    sys.modules["__main__"] = main
    code = 0
    try:
        exec(compile(ex.source, path, "exec"), main.__dict__)  # noqa: S102 - the point
        threading._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:  # noqa: BLE001 - any error of the program is its exit status 1
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # from main.py on
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # the pipe may be gone; the status still counts
                stream.flush()
        os._exit(code)


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


# -- the serving loop ---------------------------------------------------------------------


def main() -> None:
    config = json.loads(sys.argv[1])
    iso = setup(config)
    preload()
    _write_all(1, encode_frame({"ready": True, "isolation": iso}))
    if iso["mode"] == "namespaces":
        pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
    else:
        pid_ns = None
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a program come back here to be killed
    seq = 0
    while True:
        request = read_frame(0)
        if request is None:
            return
        header, blobs = request
        _write_all(1, ACCEPTED)  # tells the owner that a death from now on is this request's
        seq += 1
        ex = Execution(iso, config["base"], seq, header["limits"], blobs[0], blobs[1])
        _write_all(1, execute(ex, pid_ns))


if __name__ == "__main__":
    main()
