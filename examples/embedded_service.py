"""Embedding asystem actors in an existing asyncio web service.

The service owns the event loop; the ActorSystem joins it (no thread, no loop of its own)
and hosts a scoring actor in a child process. HTTP requests are answered by asking that
actor, with a deadline, so a slow or dead actor turns into a 504/503, never a hung request.

    python examples/embedded_service.py             # serve on http://127.0.0.1:8080
    python examples/embedded_service.py --self-test # start, query itself once, stop

The same shape works inside aiohttp or FastAPI: start the ActorSystem in the app's startup
hook (``await system.start()``) and shut it down in the shutdown hook.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from urllib.parse import parse_qs, urlsplit

from actors import Actor, ActorDeadError, ActorSystem, AskTimeout, run


class Scorer(Actor):
    """Runs in its own process; stands in for a reward model or a verifier."""

    async def score(self, answer: str, reference: str) -> dict:
        return {"correct": answer.strip() == reference.strip(), "pid": os.getpid()}


async def handle(system: ActorSystem, scorer, reader, writer) -> None:
    request_line = (await reader.readline()).decode(errors="replace").split()
    while (await reader.readline()).strip():  # skip headers
        pass
    status, body = "404 Not Found", {"error": "try /score?answer=4&reference=4"}
    if len(request_line) >= 2 and urlsplit(request_line[1]).path == "/score":
        query = {k: v[0] for k, v in parse_qs(urlsplit(request_line[1]).query).items()}
        try:
            body = await scorer.ask("score", query.get("answer", ""),
                                    query.get("reference", ""), timeout=2.0)
            status = "200 OK"
        except AskTimeout as exc:
            status, body = "504 Gateway Timeout", {"error": str(exc)}
        except ActorDeadError as exc:
            status, body = "503 Service Unavailable", {"error": str(exc)}
    payload = json.dumps(body).encode()
    writer.write(f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    writer.close()


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    return response.decode()


async def main(port: int, self_test: bool) -> None:
    async with ActorSystem() as system:  # joins the running loop
        scorer = await system.spawn(Scorer, where="process", timeout=60)
        server = await asyncio.start_server(
            lambda r, w: handle(system, scorer, r, w), "127.0.0.1", port)
        port = server.sockets[0].getsockname()[1]
        async with server:
            if self_test:
                print(await http_get(port, "/score?answer=4&reference=4"))
                return
            print(f"serving on http://127.0.0.1:{port}/score?answer=4&reference=4")
            await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    run(main(0 if args.self_test else args.port, args.self_test))
