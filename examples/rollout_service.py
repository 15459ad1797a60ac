"""A rollout actor inside an aiohttp web service: the service's event loop hosts the ActorSystem.

    python examples/rollout_service.py                   # a tiny random model on :8081
    python examples/rollout_service.py --model DIR       # a transformers model directory
    python examples/rollout_service.py --self-test       # start, stream one completion, stop

    curl -N localhost:8081/generate -d '{"prompt": "2 + 2 =", "max_tokens": 16, "temperature": 0}'

POST /generate answers with one JSON line per chunk of tokens, as the engine produces them
(NDJSON over a chunked response); the last line has the "finish_reason". GET /health says
whether the engine answers. The engine is the RolloutWorker of the training job
(asystem/rollout.py), in a process of its own: if it dies the request gets a 503 (or an
"error" line once streaming began), if it stalls a 504, never a hung connection.

The ActorSystem lives in the app's cleanup context (aiohttp's startup/shutdown hook); in
FastAPI the same code goes into the lifespan function.
"""

from __future__ import annotations

import argparse
import json
import uuid

from aiohttp import ClientSession, web

from actors import ActorDeadError, ActorSystem, AskTimeout, RemoteError
from asystem.engine import SamplingParams
from asystem.rollout import RolloutWorker, WorkerConfig

TOKEN_DEADLINE_S = 60.0  # the longest wait for the next chunk of a response
WORKER = web.AppKey("worker", object)
TOKENIZER = web.AppKey("tokenizer", object)


def make_app(model: str) -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(lambda app: _engine(app, model))
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    return app


async def _engine(app: web.Application, model: str):
    """Start the ActorSystem and the rollout worker with the app; stop them with it."""
    from transformers import AutoTokenizer

    async with ActorSystem() as system:
        config = WorkerConfig(model=model, backend="torch", dtype="float32", max_batch=8).to_dict()
        app[WORKER] = await system.spawn(RolloutWorker, config, where="process", timeout=300.0)
        app[TOKENIZER] = AutoTokenizer.from_pretrained(model)
        yield


async def generate(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
        prompt = body["prompt"]
        sampling = SamplingParams(temperature=float(body.get("temperature", 1.0)),
                                  max_tokens=int(body.get("max_tokens", 32)))
        if not isinstance(prompt, str):
            raise TypeError("prompt must be a string")
    except (ValueError, KeyError, TypeError) as exc:
        return web.json_response({"error": f"expected JSON {{prompt, max_tokens?, temperature?}}: {exc}"},
                                 status=400)
    tokenizer = request.app[TOKENIZER]
    job = {"request_id": uuid.uuid4().hex, "prompt_tokens": tokenizer(prompt)["input_ids"],
           "sampling": sampling.to_dict()}
    chunks = request.app[WORKER].stream("generate", job, timeout=TOKEN_DEADLINE_S)
    response = None
    try:
        async for batch in chunks:
            if response is None:  # the status is decided by the first answer
                response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await response.prepare(request)
            for chunk in batch:
                line = {"text": tokenizer.decode(chunk["tokens"]), "tokens": chunk["tokens"],
                        "finish_reason": chunk["finish_reason"]}
                await response.write(json.dumps(line).encode() + b"\n")
    except (AskTimeout, ActorDeadError, RemoteError) as exc:
        status = 504 if isinstance(exc, AskTimeout) else 503
        if response is None:
            return web.json_response({"error": str(exc)}, status=status)
        await response.write(json.dumps({"error": str(exc)}).encode() + b"\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    try:
        await request.app[WORKER].ask("health", timeout=5.0)
    except (AskTimeout, ActorDeadError, RemoteError) as exc:
        return web.json_response({"ok": False, "error": str(exc)}, status=503)
    return web.json_response({"ok": True})


async def self_test(model: str) -> None:
    """Serve on a free port, ask for one greedy completion and a bad request, stop."""
    runner = web.AppRunner(make_app(model))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/health") as answer:
                print("GET /health", answer.status, await answer.json())
            async with http.post("/generate", json={"prompt": "2 + 2 =", "max_tokens": 8, "temperature": 0}) as answer:
                print("POST /generate", answer.status, answer.headers["Content-Type"])
                async for line in answer.content:
                    print(" ", line.decode().strip())
            async with http.post("/generate", data=b"not json") as answer:
                print("POST /generate (bad body)", answer.status, (await answer.json())["error"][:40])
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a transformers model directory (default: a tiny random Llama)")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        from asystem.models import tiny_llama

        args.model = str(tiny_llama())
    if args.self_test:
        from actors.runtime import run

        run(self_test(args.model))
    else:
        web.run_app(make_app(args.model), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
