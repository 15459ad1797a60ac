"""Actors in other OS processes: spawning them, the child's main, and the system actor.

``spawn(where="process")`` starts ``python -m actors.process`` with the cluster secret in
its environment. The child starts its own ActorSystem, asks the parent's system actor for
what to run (class path and arguments travel as encoded data, never pickled), starts the
actor and reports back. The child process lives exactly as long as its actor:

- the actor stops normally: the process exits with code 0;
- the actor fails for good: code 1 (the parent's supervisor sees the failure);
- the parent process dies (its connection closes): the actor fails and the process
  exits with code 1 by itself;
- SIGTERM or SIGINT: graceful shutdown.

Every step has a deadline; a child that does not come up in time is killed and the
spawn raises SpawnError naming the class, the pid and what was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import uuid
from typing import Any

from .actor import Actor, check_stop_timeout
from .errors import SpawnError
from .ref import ActorRef

log = logging.getLogger(__name__)


def class_path(cls: type) -> str:
    """``module:QualName`` for a class the child process can import."""
    module = cls.__module__
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name  # started with python -m
        elif getattr(main, "__file__", None):
            # A script: the child runs its top level (not its __main__ block), as
            # multiprocessing's spawn does.
            module = "@" + os.path.abspath(main.__file__)
        else:
            raise SpawnError(f"{cls.__qualname__} is defined in an interactive session; "
                             "move it into a module to run it in another process")
    return f"{module}:{cls.__qualname__}"


def _import_module(name: str):
    if not name.startswith("@"):
        return importlib.import_module(name)
    if "__asystem_main__" not in sys.modules:
        import runpy
        import types
        module = types.ModuleType("__asystem_main__")
        module.__dict__.update(runpy.run_path(name[1:], run_name="__asystem_main__"))
        sys.modules["__asystem_main__"] = module
    return sys.modules["__asystem_main__"]


def import_class(path: str) -> type:
    module_name, _, qualname = path.rpartition(":")
    try:
        obj: Any = _import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, OSError) as exc:
        raise SpawnError(f"cannot import actor class {path!r}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, Actor)):
        raise SpawnError(f"{path!r} is not an Actor subclass")
    return obj


class ChildProcess:
    """A process this system started for one actor; reaped when it exits."""

    def __init__(self, system, proc: asyncio.subprocess.Process, ref: ActorRef,
                 stop_timeout: float = 0.0):
        self.system, self.proc, self.ref = system, proc, ref
        self.pid = proc.pid
        self.stop_timeout = stop_timeout  # the actor class's, as the child reported it
        self.exited = asyncio.ensure_future(self._reap())

    async def _reap(self) -> int:
        code = await self.proc.wait()
        self.system._child_processes.discard(self)
        level = logging.INFO if code == 0 else logging.WARNING
        log.log(level, "process %d of %s exited with code %d", self.pid, self.ref, code)
        self.system._target_gone(self.ref.address, None,
                                 f"its process {self.pid} exited with code {code}", code != 0)
        return code

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the child shuts down gracefully), then SIGKILL after ``timeout``, or
        after the actor's ``stop_timeout`` if that is longer.

        A signal, not a message: the address of a dead child may already belong to its
        restarted successor, which a message would reach instead.
        """
        self.system.endpoint.expect_loss(self.ref.address)
        grace = max(timeout, self.stop_timeout)
        for action, wait in ((self.proc.terminate, grace), (self.proc.kill, 5.0)):
            if self.exited.done():
                return
            try:
                action()
            except ProcessLookupError:
                pass
            await asyncio.wait({self.exited}, timeout=wait)
        if self.exited.done():
            return
        log.error("process %d of %s did not exit after SIGKILL", self.pid, self.ref)


async def spawn_elsewhere(system, cls: type, args, kwargs, actor_id: str, name: str | None,
                          where, timeout: float, rebind: str | None = None,
                          env: dict[str, str] | None = None):
    """Start ``cls`` in a new process here (``where="process"``) or through a node agent
    (``where`` is its ref), with ``env`` added to its environment. Returns (ref,
    ChildProcess or None)."""
    path = class_path(cls)
    if where == "process":
        child = await spawn_process(system, path, list(args), kwargs, actor_id, name,
                                    timeout, rebind, env)
        return child.ref, child
    if isinstance(where, ActorRef):
        ref = await where.ask("start_actor", path, list(args), kwargs, actor_id, name, rebind,
                              timeout, env, timeout=timeout + 5)
        return ref.bind(system), None
    raise ValueError(f"where must be 'local', 'process' or a NodeAgent ref, not {where!r}")


async def spawn_process(system, path: str, args: list, kwargs: dict, actor_id: str,
                        name: str | None, timeout: float, rebind: str | None,
                        extra_env: dict[str, str] | None = None) -> ChildProcess:
    loop = asyncio.get_running_loop()
    token = uuid.uuid4().hex
    started = loop.create_future()
    system._launches[token] = ({"cls": path, "args": args, "kwargs": kwargs,
                                "actor_id": actor_id, "name": name, "timeout": timeout,
                                "head": system.head or system.address}, started)
    env = {**os.environ, **(extra_env or {}), "ASYSTEM_SECRET": system.secret.hex(),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors.process", "--parent", system.address, "--token", token,
        "--bind", rebind or _child_bind(system.address), env=env,
        stdin=asyncio.subprocess.DEVNULL)
    exited = asyncio.ensure_future(proc.wait())
    try:
        done, _ = await asyncio.wait({started, exited}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if started in done and started.exception() is None:
            ref, stop_timeout = started.result()
            child = ChildProcess(system, proc, ref.bind(system), stop_timeout)
            system._child_processes.add(child)
            return child
        if started in done:
            raise SpawnError(f"{path} in process {proc.pid}: {started.exception()}")
        if exited in done:
            raise SpawnError(f"process {proc.pid} for {path} exited with code "
                             f"{exited.result()} before its actor started (see its stderr)")
        raise SpawnError(f"process {proc.pid} for {path} did not start its actor within "
                         f"{timeout:g}s")
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    finally:
        system._launches.pop(token, None)
        exited.cancel()


def _child_bind(parent_address: str) -> str:
    if parent_address.startswith("ipc://"):
        return f"ipc://{os.path.dirname(parent_address[6:])}/asystem-{uuid.uuid4().hex[:12]}"
    host = parent_address[len("tcp://"):].rsplit(":", 1)[0]
    return f"tcp://{host}:0"


async def stop_processes(system, timeout: float) -> None:
    await asyncio.gather(*(c.stop(timeout) for c in list(system._child_processes)),
                         return_exceptions=True)


class SystemActor(Actor):
    """The actor every system hosts under the id ``__system__``: it answers other systems
    (process start-up, death watch, the name registry, stop and shutdown requests)."""

    max_concurrency = 64

    async def ping(self) -> str:
        return self.system.address

    async def process_ready(self, token: str, address: str) -> dict:
        launch = self.system._launches.get(token)
        if launch is None:
            raise SpawnError(f"unknown or expired launch token {token}")
        return launch[0]

    async def process_started(self, token: str, address: str, error: str | None,
                              stop_timeout: float = 0.0) -> None:
        launch = self.system._launches.get(token)
        if launch is None or launch[1].done():
            return
        spec, started = launch
        if error is None:
            try:  # checked again: it arrives over the wire
                stop_timeout = check_stop_timeout(stop_timeout, spec["cls"])
            except ValueError as exc:
                error = str(exc)
        if error is None:
            started.set_result((ActorRef(address, spec["actor_id"], spec["name"]), stop_timeout))
        else:
            started.set_exception(SpawnError(error))

    async def watch_actor(self, target_id: str, watcher: ActorRef) -> None:
        self.system.watch(watcher, ActorRef(self.system.address, target_id))

    async def unwatch_actor(self, target_id: str, watcher: ActorRef) -> None:
        self.system.unwatch(watcher, ActorRef(self.system.address, target_id))

    async def stop_actor(self, actor_id: str, timeout: float) -> None:
        await self.system.stop(ActorRef(self.system.address, actor_id), timeout)

    async def register(self, name: str, ref: ActorRef) -> None:
        self.system.register_local(name, ref)

    async def lookup(self, name: str) -> ActorRef | None:
        return self.system._names.get(name)

    async def shutdown(self) -> None:
        self.system.shutdown_requested.set()

    async def on_terminated(self, ref: ActorRef, reason: str) -> None:
        names = self.system._names
        for name, holder in list(names.items()):
            if holder.actor_id == ref.actor_id and holder.address == ref.address:
                del names[name]


# -- the child process's main ------------------------------------------------------------

async def _child_main(args) -> int:
    from .system import ActorSystem
    secret = bytes.fromhex(os.environ.pop("ASYSTEM_SECRET"))
    system = ActorSystem(args.bind, secret=secret)
    try:
        await system.start()
    except Exception as exc:  # e.g. the old port of a restarted child is taken
        log.warning("cannot bind %s (%s); using a new port", args.bind, exc)
        system = ActorSystem(_child_bind(args.bind), secret=secret)
        await system.start()
    parent = system._system_ref(args.parent)
    parent_lost = system.when_lost(args.parent)
    spec = await parent.ask("process_ready", args.token, system.address, timeout=30)
    system.head = spec["head"]
    try:
        cls = import_class(spec["cls"])
        # on_start gets the spawn's whole deadline (an engine may take minutes to load).
        await system.spawn(cls, *spec["args"], actor_id=spec["actor_id"], timeout=spec["timeout"],
                           **spec["kwargs"])
    except Exception as exc:
        await parent.ask("process_started", args.token, system.address,
                         f"{type(exc).__name__}: {exc}", timeout=30)
        await system.shutdown(linger=1.0)
        return 1
    await parent.ask("process_started", args.token, system.address, None, cls.stop_timeout,
                     timeout=30)
    cell = system._cells[spec["actor_id"]]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, system.shutdown_requested.set)
    waits = {cell.stopped, parent_lost, asyncio.ensure_future(system.shutdown_requested.wait())}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if parent_lost.done() and not cell.stopped.done():
        log.warning("parent %s is gone (%s): shutting down", args.parent, parent_lost.result())
        # No one asked this actor to stop: it fails, so that whoever supervises it from
        # elsewhere (it was started through a node agent) restarts it or escalates.
        cell.fail(RuntimeError(f"its parent process at {args.parent} is gone: "
                               f"{parent_lost.result()}"))
        await asyncio.wait({cell.stopped}, timeout=max(10.0, cls.stop_timeout + 5.0))
    failed = cell.stopped.done() and cell.stopped.result()
    await system.shutdown(timeout=10.0, linger=1.0)
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description="asystem actor process (started by spawn)")
    parser.add_argument("--parent", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--bind", required=True)
    args = parser.parse_args()
    from .runtime import configure_logging, run
    configure_logging()
    sys.exit(run(_child_main(args)))


if __name__ == "__main__":
    main()
