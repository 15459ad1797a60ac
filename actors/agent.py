"""NodeAgent: starts actor processes on its host for the rest of the cluster.

Run one per node (``python -m actors.agent --head tcp://HEAD:PORT``, with the cluster secret
in ``ASYSTEM_SECRET``, hex). It registers itself under the name ``agent/<node>`` with the
head's registry; any system can then ``spawn(cls, where=agent_ref)`` (which calls ``start_actor``). The agent is the OS
parent of the processes it starts: they exit when it dies, and it stops them when it stops.
Supervision stays with whoever asked for the spawn: it watches the new actor and restarts it
through the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import sys

from .actor import Actor
from .process import spawn_process
from .system import check_env


class NodeAgent(Actor):
    max_concurrency = 16

    def __init__(self, node: str):
        self.node = node
        self._ports_given: collections.deque[int] = collections.deque(maxlen=1024)

    async def start_actor(self, cls_path: str, args: list, kwargs: dict, actor_id: str,
                    name: str | None, rebind: str | None, timeout: float,
                    env: dict | None = None):
        """Start ``cls_path`` in a new process on this node, with ``env`` added to its
        environment; returns its ref."""
        if rebind is not None and not rebind.startswith(self._host_prefix()):
            rebind = None  # that address belonged to another node
        child = await spawn_process(self.system, cls_path, args, kwargs, actor_id, name,
                                    timeout, rebind, None if env is None else check_env(env))
        return child.ref

    async def free_port(self) -> int:
        """A TCP port free on every interface of this node now, for a rendezvous that a
        process here will bind (a process group's store). Not one of the last 1024 this
        agent handed out, so that requests close together never get the same port; another
        program may still take it before it is bound."""
        for _ in range(64):
            with socket.socket() as sock:
                sock.bind(("", 0))
                port = sock.getsockname()[1]
            if port not in self._ports_given:
                self._ports_given.append(port)
                return port
        raise RuntimeError(f"node {self.node}: no fresh free port after 64 tries")

    async def info(self) -> dict:
        return {"node": self.node, "pid": os.getpid(), "address": self.system.address,
                "cpus": os.cpu_count(),
                "children": sorted(c.pid for c in self.system._child_processes)}

    def _host_prefix(self) -> str:
        return self.system.address.rsplit(":", 1)[0]


async def _agent_main(args) -> int:
    from .system import ActorSystem
    secret = bytes.fromhex(os.environ["ASYSTEM_SECRET"])
    system = ActorSystem(args.bind, secret=secret, head=args.head, advertise=args.advertise)
    await system.start()
    node = args.node or socket.gethostname()
    await system.spawn(NodeAgent, node, name=f"agent/{node}", timeout=30)
    print(f"node agent {node} at {system.address}", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, system.shutdown_requested.set)
    waits = [asyncio.ensure_future(system.shutdown_requested.wait())]
    if args.head:
        waits.append(system.when_lost(args.head))  # head gone: nothing left to serve
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    await system.shutdown(timeout=10.0)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="asystem node agent")
    parser.add_argument("--bind", default="tcp://0.0.0.0:0")
    parser.add_argument("--advertise", help="the host other nodes reach this one by")
    parser.add_argument("--head", help="address of the head system (name registry)")
    parser.add_argument("--node", help="node name (default: hostname)")
    args = parser.parse_args()
    if args.bind.startswith("tcp://0.0.0.0") and not args.advertise:
        args.advertise = socket.gethostbyname(socket.gethostname())
    from .runtime import configure_logging, run
    configure_logging()
    sys.exit(run(_agent_main(args)))


if __name__ == "__main__":
    main()
