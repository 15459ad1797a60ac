"""An ActorSystem embedded in a loop that already runs another server: both serve at the
same time, neither blocks the other, and shutting the system down leaves the loop and the
server running."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from actors import Actor

from .conftest import assert_no_descendants, new_system
from .sample_actors import Echo, Sleeper


async def http_get(port: int, path: str) -> tuple[str, str]:
    """A minimal HTTP/1.0 client: (status line, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


class WebService:
    """A minimal HTTP/1.0 server on asyncio.start_server; some routes ask actors."""

    def __init__(self):
        self.actors: dict = {}
        self.served = 0

    async def handle(self, reader, writer) -> None:
        path = (await reader.readline()).decode().split()[1]
        while (await reader.readline()).strip():
            pass
        if path == "/health":
            body = "ok"
        elif path.startswith("/echo/"):
            body = await self.actors["echo"].ask("echo", path[len("/echo/"):], timeout=10)
        elif path == "/pid":
            body = str(await self.actors["echo"].ask("pid", timeout=10))
        else:
            body = "?"
        self.served += 1
        writer.write(f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        await writer.drain()
        writer.close()


class Fetcher(Actor):
    """An actor that is itself a client of the web service in the same loop."""

    async def fetch(self, port: int, path: str) -> str:
        return (await http_get(port, path))[1]


async def test_actor_system_and_web_server_share_one_loop():
    sigint_before = signal.getsignal(signal.SIGINT)
    service = WebService()
    server = await asyncio.start_server(service.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        system = await new_system().start()  # joins the running loop; takes nothing over
        try:
            service.actors["echo"] = await system.spawn(Echo, where="process")
            sleeper = await system.spawn(Sleeper)
            fetcher = await system.spawn(Fetcher)

            # Requests that go through an actor in another process, many at once.
            answers = await asyncio.gather(*(http_get(port, f"/echo/n{i}") for i in range(30)))
            assert [body for _, body in answers] == [f"n{i}" for i in range(30)]
            assert all(status == "HTTP/1.0 200 OK" for status, _ in answers)
            assert int((await http_get(port, "/pid"))[1]) != os.getpid()

            # An actor waiting on a long call does not hold up the server...
            nap = asyncio.ensure_future(sleeper.ask("nap", 1.0))
            started = time.monotonic()
            assert (await http_get(port, "/health"))[1] == "ok"
            assert time.monotonic() - started < 0.5
            # ...and an actor can be the server's client, in the same loop.
            assert await fetcher.ask("fetch", port, "/echo/from-an-actor") == "from-an-actor"
            assert await nap == 1.0
        finally:
            await system.shutdown()
        await assert_no_descendants()

        # The system is gone; the loop and the server go on.
        assert (await http_get(port, "/health"))[1] == "ok"
        assert signal.getsignal(signal.SIGINT) is sigint_before
        assert not asyncio.get_running_loop().is_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_two_systems_in_one_loop_talk_to_each_other():
    """Embedding twice (e.g. two services in one process) works too."""
    secret = os.urandom(32)  # one cluster: one secret
    async with new_system(secret=secret) as first, new_system(secret=secret) as second:
        echo = await second.spawn(Echo)
        remote = echo.bind(first)  # the same actor, called through the first system
        assert remote.address == second.address != first.address
        assert await remote.ask("echo", "across systems") == "across systems"
        assert [x async for x in remote.stream("count", 3)] == [0, 1, 2]
