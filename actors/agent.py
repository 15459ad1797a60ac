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
import os
import signal
import socket
import sys

from .actor import Actor
from .process import spawn_process


class NodeAgent(Actor):
    max_concurrency = 16

    def __init__(self, node: str):
        self.node = node

    async def start_actor(self, cls_path: str, args: list, kwargs: dict, actor_id: str,
                    name: str | None, rebind: str | None, timeout: float):
        """Start ``cls_path`` in a new process on this node; returns its ref."""
        if rebind is not None and not rebind.startswith(self._host_prefix()):
            rebind = None  # that address belonged to another node
        child = await spawn_process(self.system, cls_path, args, kwargs, actor_id, name,
                                    timeout, rebind)
        return child.ref

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
