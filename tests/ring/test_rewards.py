"""The verifiers: what each one rewards, and the clear errors for what it cannot score."""

from __future__ import annotations

import math
import threading

import pytest
import reasoning_gym

from ring.rewards import (
    CodeCase,
    NeedsSandbox,
    code_cases,
    code_reward,
    load_verifier,
    score,
)
from ring.tasks import TaskItem, make_task_source

HERE = "tests.ring.test_rewards"


def item(verifier: str, answer: str | None = "42", **metadata) -> TaskItem:
    return TaskItem("t-1", "question?", answer, verifier, metadata)


def length_reward(item, response):  # a custom verifier, named by import path below
    return len(response) / 10


async def async_reward(item, response):
    return 1.0


def nan_reward(item, response):
    return math.nan


@pytest.mark.parametrize("response, expected", [
    ("The answer is 42", 1.0), ("  42. ", 1.0), ("I think 41", 0.0), ("", 0.0),
    ("<answer>42</answer> (not 41)", 1.0),
])
def test_exact_match_on_the_extracted_answer(response, expected):
    assert score(item("exact"), response) == expected


def test_exact_match_normalises_case_and_space():
    capital = item("exact", "New  Delhi", extract="last_line")
    assert score(capital, "Thinking...\n  new delhi. ") == 1.0
    assert score(capital, "new delhi\nDelhi") == 0.0


@pytest.mark.parametrize("answer, response, expected", [
    ("\\frac{1}{2}", "so it is 0.5", 1.0),
    ("\\frac{1}{2}", "The answer is $\\boxed{\\frac{2}{4}}$.", 1.0),
    ("0.5", "it is 1/2", 1.0),
    ("\\frac{1}{2}", "it is 1/3", 0.0),
    ("3", "no idea", 0.0),
    ("\\{1, 2\\}", "$\\boxed{\\{2, 1\\}}$", 1.0),
])
def test_math_equivalence(answer, response, expected):
    assert score(item("math", answer), response) == expected


def test_math_works_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(score(item("math", "0.25"), "1/4")))
    worker.start()
    worker.join(30)
    assert results == [1.0]


def test_reasoning_gym_items_use_the_generators_own_scorer():
    spec = {"kind": "reasoning_gym", "name": "basic_arithmetic", "seed": 3, "size": 20,
            "config": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}}
    dataset = reasoning_gym.create_dataset("basic_arithmetic", seed=3, size=200, **spec["config"])
    for task in make_task_source(spec):
        entry = dataset[int(task.item_id.rsplit("/", 1)[1])]
        for response, extracted in ((f"So the result is {task.answer}.", task.answer),
                                    ("Hmm, 99999", "99999"), ("<answer>-0</answer>", "-0")):
            assert score(task, response) == dataset.score_answer(extracted, entry)
        assert score(task, f"= {task.answer}") == 1.0


def test_custom_verifiers_by_import_path():
    assert score(item(f"{HERE}:length_reward"), "12345") == 0.5
    with pytest.raises(TypeError, match="async"):
        score(item(f"{HERE}:async_reward"), "x")
    with pytest.raises(ValueError, match="finite"):
        score(item(f"{HERE}:nan_reward"), "x")
    with pytest.raises(ValueError, match="pkg.module:function"):
        load_verifier("no_colon")
    with pytest.raises(ModuleNotFoundError):
        score(item("no_such_module_xyz:f"), "x")


def test_code_needs_the_sandbox():
    with pytest.raises(NeedsSandbox, match="asystem.reward.Scorer"):
        score(item("code", None, tests="def check(c): pass"), "x")


def test_humaneval_programs_accept_a_completion_or_a_whole_function():
    task = make_task_source({"kind": "humaneval"}, split="all").by_id("HumanEval/2")
    prompt, tests = task.metadata["prompt"], task.metadata["tests"]
    body = "    return number % 1.0\n"
    [completion] = code_cases(task, body)
    assert completion.source == prompt + body + "\n\n" + tests + "\n\ncheck(truncate_number)\n"
    whole = "```python\ndef truncate_number(number: float) -> float:\n" + body + "```"
    [case] = code_cases(task, "Sure:\n" + whole + "\nDone.")
    assert case.source.startswith(prompt + "\n\ndef truncate_number(number: float) -> float:\n" + body)
    assert case.source.endswith("check(truncate_number)\n") and case.expected_stdout is None


def test_io_programs_and_how_they_are_judged():
    task = item("code", None, io_tests=[{"stdin": "1 2", "stdout": "3\n"}, {"stdin": "2 2", "stdout": "4"}])
    cases = code_cases(task, "```python\nprint(sum(map(int, input().split())))\n```")
    assert cases == [CodeCase("print(sum(map(int, input().split())))\n", "1 2", "3\n"),
                     CodeCase("print(sum(map(int, input().split())))\n", "2 2", "4")]
    assert code_reward(cases, [(True, "3  \n"), (True, "4\n\n")]) == 1.0
    assert code_reward(cases, [(True, "3\n"), (True, "5\n")]) == 0.0
    assert code_reward(cases, [(True, "3\n"), (False, "4\n")]) == 0.0  # crashed after printing
    with pytest.raises(ValueError, match="tests"):
        code_cases(item("code", None), "print(1)")
