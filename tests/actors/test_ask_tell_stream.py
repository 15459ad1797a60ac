"""ask, tell and stream, in this process and across processes, and the typed errors a
caller gets back: the remote exception, an unknown method, wrong arguments."""

from __future__ import annotations

import os

import pytest
import pytest_asyncio
import torch

from actors import (
    ActorRef,
    BadRequestError,
    RemoteError,
    UnknownActorError,
    UnknownMethodError,
)

from .conftest import assert_no_descendants, eventually, new_system
from .sample_actors import Echo, Recorder

# One system and one actor process for the whole module: these tests only call the
# actors, so sharing them saves a process start (seconds) per test.
pytestmark = pytest.mark.asyncio(loop_scope="module")
WHERE = ["local", "process"]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def module_system():
    system = await new_system().start()
    yield system
    await system.shutdown()
    await assert_no_descendants()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def echoes(module_system):
    return {where: await module_system.spawn(Echo, where=where) for where in WHERE}


@pytest.fixture(params=WHERE)
def echo(request, echoes):
    return echoes[request.param]


async def test_ask_runs_in_the_other_process(echoes):
    assert await echoes["process"].ask("pid") != os.getpid()
    assert await echoes["local"].ask("pid") == os.getpid()


async def test_ask_returns_the_result(echo):
    value = {"ints": [1, -2, 2**40], "float": 2.5, "none": None, "flag": True,
             "text": "héllo", "raw": b"\x00\xff", "nested": {"list": [[1], [2, 3]]}}
    assert await echo.ask("echo", value) == value
    assert await echo.ask("add", 2, 3, scale=4) == 20
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(await echo.ask("echo", tensor), tensor)


async def test_refs_travel_inside_messages(module_system, echoes):
    """A ref sent to another process can be called back from there."""
    recorder = await module_system.spawn(Recorder)
    try:
        assert await echoes["process"].ask("call", recorder, "record", "via ask") is None
        await echoes["process"].tell("call", recorder, "record", "via tell")
        async def both_arrived():
            return await recorder.ask("history") == ["via ask", "via tell"]
        await eventually(both_arrived, what="the told call to arrive")
    finally:
        await module_system.stop(recorder)


async def test_tell_returns_before_the_work_is_done(echo):
    await echo.tell("sleep", 0.5)
    # The next ask queues behind the told sleep: the tell itself did not wait for it.
    assert await echo.ask("echo", "after") == "after"


async def test_stream_yields_every_item_in_order(echo):
    assert [x async for x in echo.stream("count", 100, window=3)] == list(range(100))
    assert [x async for x in echo.stream("count", 0)] == []


async def test_stream_error_arrives_after_the_items_before_it(echo):
    seen = []
    with pytest.raises(RemoteError) as info:
        async for x in echo.stream("count_then_fail", 3):
            seen.append(x)
    assert seen == [0, 1, 2]
    assert info.value.remote_type == "KeyError"
    assert await echo.ask("echo", 1) == 1


async def test_remote_error_carries_type_message_and_traceback(echo):
    with pytest.raises(RemoteError) as info:
        await echo.ask("boom", "bad value 42")
    err = info.value
    assert err.remote_type == "ValueError"
    assert err.remote_message == "bad value 42"
    assert "in boom" in err.remote_traceback
    assert "raise ValueError(message)" in err.remote_traceback
    assert "ValueError: bad value 42" in str(err) and "remote traceback" in str(err)
    # The method's exception is the caller's business: the actor keeps serving.
    assert await echo.ask("echo", "still here") == "still here"


async def test_unknown_method_is_refused_and_the_actor_keeps_serving(echo):
    with pytest.raises(UnknownMethodError, match="'nope'") as info:
        await echo.ask("nope")
    assert "echo" in str(info.value)  # it lists what the actor does have
    for method in ("on_start", "_private", "spawn"):  # hooks and helpers are not callable
        with pytest.raises(UnknownMethodError):
            await echo.ask(method)
    with pytest.raises(UnknownMethodError):
        await echo.ask("count", 3)  # a generator method is for stream, not ask
    with pytest.raises(UnknownMethodError):
        async for _ in echo.stream("echo", 3):  # and a coroutine is not a stream
            pass
    await echo.tell("nope")  # fire and forget: the actor logs it, nobody is told
    assert await echo.ask("add", 1, 2) == 3


@pytest.mark.parametrize("args,kwargs", [((1,), {}), ((1, 2, 3), {}), ((1, 2), {"bogus": 1})])
async def test_wrong_arguments_are_a_bad_request(echo, args, kwargs):
    with pytest.raises(BadRequestError, match="wrong arguments for Echo.add"):
        await echo.ask("add", *args, **kwargs)
    assert await echo.ask("add", 1, 2) == 3


async def test_unencodable_values(echoes):
    with pytest.raises(TypeError):
        await echoes["process"].ask("echo", object())
    with pytest.raises(BadRequestError, match="cannot be encoded"):
        await echoes["process"].ask("unencodable")
    assert await echoes["process"].ask("echo", 5) == 5


async def test_unknown_actor(module_system, echoes):
    ghost = ActorRef(echoes["process"].address, "nobody-here", None, module_system)
    with pytest.raises(UnknownActorError, match="nobody-here"):
        await ghost.ask("echo", 1, timeout=5)
    assert await echoes["process"].ask("echo", 2) == 2
