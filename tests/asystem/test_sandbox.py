"""The sandbox against hostile programs, in each isolation mode this host supports.

Each hostile program must end as a failed execution, leave no process behind, and leave
the sandbox (and this process, its owner) serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

import psutil
import pytest
import pytest_asyncio

from asystem.sandbox import Limits, Sandbox, SandboxError

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET_ENV = "ASYSTEM_TEST_SANDBOX_SECRET"
# Generous enough for a loaded 2-core machine; tests of the wall time itself use less.
FAST = Limits(wall_s=3.0, cpu_s=2.0, processes=16, output_bytes=64 * 1024)
SHORT = Limits(wall_s=0.5, cpu_s=2.0, processes=16, output_bytes=64 * 1024)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["namespaces", "basic"])
async def sandbox(request):
    os.environ[SECRET_ENV] = "do-not-leak"  # the owner's environment must not reach programs
    try:
        sb = await Sandbox(workers=2, limits=FAST, isolation=request.param).start()
    except SandboxError as exc:
        pytest.skip(f"{request.param} isolation is not available here: {exc}")
    finally:
        del os.environ[SECRET_ENV]
    try:
        yield sb
    finally:
        await sb.close()


def sandbox_processes(sb: Sandbox) -> list[psutil.Process]:
    """Processes left below the zygotes or running as an execution's uid."""
    uids = {z["uid"] for z in sb.zygotes() if z["uid"] is not None}
    found = []
    for z in sb.zygotes():
        with contextlib.suppress(psutil.NoSuchProcess):  # a zygote killed by the test
            found += psutil.Process(z["pid"]).children(recursive=True)
    for proc in psutil.process_iter(["uids"]):
        if proc.info["uids"] and proc.info["uids"].real in uids:
            found.append(proc)
    return [p for p in found if _running(p)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def still_serving(sb: Sandbox) -> None:
    """Nothing of the last execution survives, and the sandbox still runs programs."""
    left = sandbox_processes(sb)
    assert not left, f"left behind: {[(p.pid, p.name()) for p in left]}"
    results = await asyncio.gather(*(sb.run("print(6 * 7)") for _ in range(4)))
    assert all(r.ok and r.stdout == "42\n" for r in results), results


async def test_runs_a_program_with_stdin(sandbox):
    result = await sandbox.run("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))",
                               stdin="1 2 3\n" * 20_000)  # larger than a pipe's buffer
    assert result.ok and result.exit_code == 0 and not result.timed_out
    assert result.stdout == f"{6 * 20_000}\n"


async def test_failure_reports_status_and_the_programs_traceback(sandbox):
    result = await sandbox.run("print('before')\nraise SystemExit(3)")
    assert (result.ok, result.reason, result.exit_code, result.stdout) == (False, "exit", 3, "before\n")
    result = await sandbox.run("def f():\n    return 1 / 0\nf()")
    assert result.reason == "exit" and result.exit_code == 1
    assert "ZeroDivisionError" in result.stderr and 'main.py", line 3' in result.stderr
    assert "zygote" not in result.stderr  # the sandbox's own frames are not the program's


async def test_clean_environment_and_private_directory(sandbox):
    result = await sandbox.run("import os\nprint(sorted(os.environ))\nprint(os.listdir('.'))\n"
                               "open('mine.txt', 'w').write('x')\nprint(os.getcwd())")
    assert result.ok, result
    names, files, cwd = result.stdout.splitlines()
    assert SECRET_ENV not in names and eval(names) == ["HOME", "LANG", "PATH", "TMPDIR"]
    assert eval(files) == ["main.py"]
    after = await sandbox.run(f"import os\nprint(os.path.exists({cwd + '/mine.txt'!r}))")
    assert after.stdout == "False\n"  # the next execution gets a fresh directory


async def test_infinite_loop_is_killed_at_the_wall_time(sandbox):
    result = await sandbox.run("import time\nwhile True:\n    time.sleep(0.01)", limits=SHORT)
    assert (result.reason, result.timed_out, result.ok) == ("timeout", True, False)
    assert 0.5 <= result.wall_s < 5.0
    await still_serving(sandbox)


async def test_closing_its_output_does_not_escape_the_wall_time(sandbox):
    result = await sandbox.run("import os, time\nprint('bye', flush=True)\nos.close(1)\nos.close(2)\n"
                               "time.sleep(60)", limits=SHORT)
    assert (result.reason, result.stdout) == ("timeout", "bye\n")


async def test_busy_loop_hits_the_cpu_limit(sandbox):
    result = await sandbox.run("while True:\n    pass", limits=Limits(wall_s=20.0, cpu_s=1.0))
    assert result.timed_out and result.reason == "cpu_time"
    assert result.signal == signal.SIGXCPU
    await still_serving(sandbox)


async def test_fork_bomb_is_contained(sandbox):
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    result = await sandbox.run(bomb, limits=Limits(wall_s=1.0, cpu_s=1.0, processes=16))
    assert not result.ok and result.timed_out
    await still_serving(sandbox)


async def test_memory_bomb_fails_inside_its_limit(sandbox):
    before = psutil.virtual_memory().available
    result = await sandbox.run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))",
                               limits=Limits(memory_mb=256))
    assert result.reason == "exit" and "MemoryError" in result.stderr
    assert psutil.virtual_memory().available > before - (1 << 30)
    await still_serving(sandbox)


async def test_huge_output_is_capped_and_the_program_killed(sandbox):
    result = await sandbox.run("while True:\n    print('x' * 4096)")
    assert result.reason == "output_limit" and not result.ok
    assert result.stdout_truncated and len(result.stdout) == FAST.output_bytes
    result = await sandbox.run("import sys\nsys.stderr.write('e' * (10 << 20))")
    assert result.stderr_truncated and len(result.stderr) == FAST.output_bytes
    await still_serving(sandbox)


async def test_reading_etc_fails(sandbox):
    for program in ("print(open('/etc/passwd').read())", "import os\nprint(os.listdir('/etc'))",
                    "import os\nprint(open('/proc/1/environ').read())"):
        result = await sandbox.run(program)
        assert result.reason == "exit", (program, result)
        assert "root:" not in result.stdout and "passwd" not in result.stdout
    await still_serving(sandbox)


async def test_writing_outside_its_directory_fails(sandbox, tmp_path):
    os.chmod(tmp_path, 0o777)  # even a world-writable host directory stays out of reach
    for target in (tmp_path / "escaped", "/tmp/asystem-sandbox-escaped", "/escaped"):
        result = await sandbox.run(f"open({str(target)!r}, 'w').write('x')")
        assert result.reason == "exit", (target, result)
        assert not os.path.exists(target)
    big = await sandbox.run("open('big', 'wb').write(b'x' * (64 << 20))")  # over file_size_mb
    assert not big.ok
    await still_serving(sandbox)


async def test_sockets_cannot_reach_the_network(sandbox):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for program in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             f"s.sendto(b'x', ('127.0.0.1', {port}))"),
            "import socket\nsocket.socket(socket.AF_INET6).connect(('::1', 80))",
        ):
            result = await sandbox.run(program)
            assert result.reason == "exit", (program, result)
            assert "Error" in result.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    await still_serving(sandbox)


async def test_killing_its_parent_and_others_fails(sandbox):
    zygotes = [z["pid"] for z in sandbox.zygotes()]
    program = ("import os, signal, time\n"
               f"for pid in [1, -1, {os.getpid()}, *{zygotes}]:  # -1: all it may signal\n"
               "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
               "print('others tried', flush=True)\n"
               "os.kill(os.getppid(), signal.SIGKILL)  # 0 in a pid namespace: itself\n"
               "time.sleep(60)  # now unsupervised, it hopes\n")
    result = await sandbox.run(program, limits=Limits(wall_s=1.0))
    assert result.stdout == "others tried\n" and not result.ok  # killed itself, EPERM, or timeout
    assert [z["pid"] for z in sandbox.zygotes()] == zygotes and sandbox.stats().get("zygote_restarts", 0) == 0
    await still_serving(sandbox)


async def test_daemons_are_killed_and_reported(sandbox):
    program = ("import os, time\n"
               "if os.fork() == 0:\n"
               "    os.setsid()\n"
               "    if os.fork() == 0:\n"
               "        time.sleep(60)\n"
               "    os._exit(0)\n"
               "time.sleep(0.2)\n"
               "print('parent exits')\n")
    result = await sandbox.run(program)
    assert result.stdout == "parent exits\n" and result.exit_code == 0
    assert result.left_processes and result.reason == "left_processes" and not result.ok
    await still_serving(sandbox)


async def test_a_cancelled_caller_does_not_disturb_the_next(sandbox):
    before = sandbox.stats()["executions"]
    slow = asyncio.ensure_future(sandbox.run("import time\ntime.sleep(1)\nprint('done')"))
    await asyncio.sleep(0.3)
    slow.cancel()
    results = await asyncio.gather(*(sandbox.run(f"print({i})") for i in range(6)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    # The cancelled execution still runs to its end; the next test must not meet it.
    async with asyncio.timeout(FAST.wall_s + 10):
        while sandbox.stats()["executions"] < before + 7:
            await asyncio.sleep(0.05)


async def test_a_killed_zygote_is_replaced(sandbox):
    running = asyncio.ensure_future(sandbox.run("import time\ntime.sleep(5)"))
    await asyncio.sleep(0.5)
    before = sandbox.stats().get("zygote_restarts", 0)
    busy = [z["pid"] for z in sandbox.zygotes()]
    for pid in busy:  # one of them runs the sleeper; the other is idle
        os.kill(pid, signal.SIGKILL)
    result = await running
    assert result.reason == "sandbox_error" and "died" in result.error
    await still_serving(sandbox)
    assert sandbox.stats()["zygote_restarts"] > before


async def test_isolation_is_reported(sandbox):
    iso = sandbox.isolation
    assert iso["mode"].split()[0] in ("namespaces", "basic")
    assert {"network", "filesystem", "processes", "user"} <= iso.keys()


async def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)
    with pytest.raises(ValueError, match="isolation"):
        Sandbox(isolation="none")
    sb = Sandbox(workers=1)
    with pytest.raises(TypeError, match="str"):
        await sb.run(b"print(1)")
    with pytest.raises(SandboxError, match="closed"):
        await sb.close()
        await sb.run("print(1)")
