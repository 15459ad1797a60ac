"""Graceful shutdown: queued work is drained, children are stopped, nothing hangs and no
process outlives the system, also when the program is interrupted with Ctrl-C or killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time

import pytest

from actors import ActorDeadError, RemoteError

from .conftest import (
    assert_no_descendants,
    eventually,
    live_descendants,
    new_system,
    pid_alive,
)
from .sample_actors import Echo, Journal, Nest, SerialSleeper, SlowOnStop, StuckOnStop


async def test_async_with_drains_stops_everything_and_leaves_no_process(tmp_path):
    local_log, remote_log = tmp_path / "local.json", tmp_path / "remote.json"
    async with new_system() as system:
        local = await system.spawn(Journal, str(local_log), 0.005)
        remote, nest = await asyncio.gather(  # nest: a process with a process child
            system.spawn(Journal, str(remote_log), 0.005, where="process"),
            system.spawn(Nest, where="process"))
        pids = await nest.ask("pids")
        assert len(pids) == 2 and len(live_descendants()) == 3
        for i in range(50):
            await local.tell("record", i)
            await remote.tell("record", i)
        started = time.monotonic()
    assert time.monotonic() - started < 15
    # Everything told before the shutdown was handled, then on_stop ran.
    assert json.loads(local_log.read_text()) == list(range(50))
    assert json.loads(remote_log.read_text()) == list(range(50))
    await assert_no_descendants()
    assert not any(pid_alive(pid) for pid in pids)


async def test_calls_still_running_at_shutdown_fail_as_dead_and_nothing_hangs():
    system = await new_system().start()
    sleeper = await system.spawn(SerialSleeper, where="process")
    stuck = await system.spawn(StuckOnStop)  # its on_stop never returns
    nap = asyncio.ensure_future(sleeper.ask("nap", 30, timeout=25))
    await eventually(lambda: len(system._pending) >= 1)
    started = time.monotonic()
    await system.shutdown(timeout=1.0)
    assert time.monotonic() - started < 10
    with pytest.raises(ActorDeadError):
        await nap
    with pytest.raises(ActorDeadError):
        await stuck.ask("ping")
    await assert_no_descendants()


async def test_stopping_a_process_actor_is_not_reported_as_a_lost_peer(system, caplog):
    ref = await system.spawn(Echo, where="process")
    assert await ref.ask("echo", 1) == 1  # opens our connection to its process
    await system.stop(ref)
    await eventually(lambda: system.endpoint.counters["peers_lost"] == 1)
    assert "lost" not in "".join(r.message for r in caplog.records if r.levelname == "WARNING")


async def test_a_stopping_actor_refuses_new_calls_at_once(system):
    """While an actor drains its last messages, calls from this process and from others
    fail at once with ActorDeadError instead of waiting for their deadline."""
    sleeper = await system.spawn(SerialSleeper)
    caller = await system.spawn(Echo, where="process")
    await sleeper.tell("nap", 2.0, "last")
    stopping = asyncio.ensure_future(system.stop(sleeper, timeout=10))
    await eventually(lambda: system._cells[sleeper.actor_id].state == "stopping")
    started = time.monotonic()
    with pytest.raises(ActorDeadError):
        await sleeper.ask("log", timeout=10)
    with pytest.raises(RemoteError) as info:
        await caller.ask("call", sleeper, "log", timeout=15)
    assert info.value.remote_type == "ActorDeadError"
    assert time.monotonic() - started < 3, "refused at the deadline, not at once"
    await stopping


SCRIPT = textwrap.dedent("""
    import asyncio
    from actors import ActorSystem, run
    from tests.actors.sample_actors import Nest

    async def main():
        async with ActorSystem() as system:
            nest = await system.spawn(Nest, where="process")  # a child with a child
            print("ready", *await nest.ask("pids"), flush=True)
            await asyncio.Event().wait()

    run(main())
""")


async def start_script(tmp_path, pythonpath):
    script = tmp_path / "service.py"
    script.write_text(SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), env={**os.environ, "PYTHONPATH": pythonpath},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, as a shell job would have
        # A shell starts background jobs with SIGINT ignored, and children inherit that:
        # under `./.ci/run &` the script would never see the Ctrl-C this test sends.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 40)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert line.startswith(b"ready"), (line, await proc.stderr.read())
    return proc, [int(pid) for pid in line.split()[1:]]


async def end_script(proc, pids, how) -> tuple[int, str]:
    started = time.monotonic()
    how()
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
        await eventually(lambda: not any(pid_alive(pid) for pid in pids), timeout=15,
                         what="the script's actor processes to exit")
        for pid in pids:  # should be gone; do not leak them if not
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - started < 20
    return proc.returncode, stderr.decode(errors="replace")


@pytest.mark.parametrize("target", [
    "process", pytest.param("process group", marks=pytest.mark.slow)])
async def test_ctrl_c_shuts_a_program_down_cleanly(tmp_path, pythonpath, target):
    """SIGINT to the program (or, as a terminal's Ctrl-C does, to its whole process group):
    it exits without a traceback and leaves no process behind."""
    proc, pids = await start_script(tmp_path, pythonpath)
    assert len(pids) == 2
    send = (lambda: os.kill(proc.pid, signal.SIGINT)) if target == "process" else (
        lambda: os.killpg(proc.pid, signal.SIGINT))
    code, stderr = await end_script(proc, pids, send)
    assert code in (0, 130, -signal.SIGINT), (code, stderr)
    assert "Traceback" not in stderr, stderr
    await assert_no_descendants()


@pytest.mark.slow
async def test_killing_the_program_takes_its_actor_processes_with_it(tmp_path, pythonpath):
    proc, pids = await start_script(tmp_path, pythonpath)
    code, _ = await end_script(proc, pids, lambda: os.kill(proc.pid, signal.SIGKILL))
    assert code == -signal.SIGKILL
    # (end_script waited for every actor process, grandchild included, to exit by itself.)


@pytest.mark.parametrize("where", ["local", "process"])
async def test_an_actor_whose_cleanup_is_slow_gets_its_stop_timeout(system, tmp_path, where):
    # A stop's timeout of 1 s is shorter than the 3 s cleanup; the class's stop_timeout
    # (30 s) is what bounds it, and a process actor's process is not killed meanwhile.
    done = tmp_path / "done"
    ref = await system.spawn(SlowOnStop, str(done), 3.0, where=where)
    assert await ref.ask("ping") == "pong"
    children = list(system._child_processes)
    await system.stop(ref, timeout=1.0)
    if where == "process":
        [child] = children
        assert await asyncio.wait_for(child.exited, 30) == 0  # exited by itself, not SIGKILL
    assert done.read_text() == "clean"


def test_an_actor_cannot_ask_for_an_unbounded_stop():
    for bad in (1e9, float("inf"), float("nan"), -1, "10", True):
        with pytest.raises(ValueError, match="EndlessCleanup.stop_timeout must be a number of seconds"):
            type("EndlessCleanup", (Echo,), {"stop_timeout": bad})
