"""Verifiers: a response to a `TaskItem` becomes a reward.

`score(item, response)` is synchronous and serves every verifier that needs no sandbox;
`asystem.reward.Scorer` serves them all, code included, and `asystem.reward.RewardPool`
spreads them over reward actors. By `item.verifier`:

- "exact": 1.0 when the extracted answer equals the reference after normalising both
  (surrounding space and a final period dropped, inner whitespace collapsed, case folded),
  else 0.0.
- "math": 1.0 when math-verify finds the response's final answer equivalent to the
  reference (`parse` + `verify`: fractions, decimals, LaTeX, sets...), else 0.0. The last
  8,000 characters of the response are parsed; parsing is bounded by math-verify's own
  timeouts (SIGALRM, so only on the main thread; elsewhere it runs unbounded).
- "reasoning_gym": the generator's own `score_answer(extracted answer, entry)`, in [0, 1]
  (some generators give partial credit).
- "code": the response's program against the item's tests, in the sandbox: all pass ->
  1.0, else 0.0. `code_cases` builds the programs, `code_reward` judges their results.
  `score` raises `NeedsSandbox` for these.
- "pkg.module:function": `function(item, response)` returning a number, or an awaitable
  of one (which `score` refuses with TypeError; the Scorer awaits it). Imported once per
  process.

A reward is a finite float; a verifier that returns anything else raises ValueError.
The answer is extracted as `item.metadata["extract"]` says (ring.tasks.extract_answer).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ring.tasks import TaskItem, extract_answer, extract_code

MATH_TAIL_CHARS = 8000


class NeedsSandbox(RuntimeError):
    """A code item: its reward comes from running it (asystem.reward.Scorer)."""


def score(item: TaskItem, response: str) -> float:
    """The reward for `response`; see the module docstring for each verifier."""
    if item.verifier == "code":
        raise NeedsSandbox(f"{item.item_id}: code items run in the sandbox; use asystem.reward.Scorer")
    if item.verifier in _BUILTIN:
        return check_reward(item, _BUILTIN[item.verifier](item, response))
    value = load_verifier(item.verifier)(item, response)
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: do not leave a warning behind
        raise TypeError(f"{item.item_id}: {item.verifier} is async; use asystem.reward.Scorer")
    return check_reward(item, value)


def check_reward(item: TaskItem, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{item.item_id}: verifier {item.verifier} returned {value!r}, not a finite number")
    return float(value)


@functools.cache
def load_verifier(path: str) -> Callable[[TaskItem, str], Any]:
    """The function at "pkg.module:function" (dots after the colon reach attributes)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"custom verifier must be 'pkg.module:function', got {path!r}")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"custom verifier {path} is not callable")
    return target


def normalize(text: str) -> str:
    return " ".join(text.strip().removesuffix(".").split()).casefold()


def exact_match(item: TaskItem, response: str) -> float:
    if item.answer is None:
        raise ValueError(f"{item.item_id}: the exact verifier needs a reference answer")
    found = extract_answer(response, item.metadata.get("extract", "auto"), item.answer)
    return float(found is not None and normalize(found) == normalize(item.answer))


def math_equivalent(item: TaskItem, response: str) -> float:
    from math_verify import parse, verify

    if item.answer is None:
        raise ValueError(f"{item.item_id}: the math verifier needs a reference answer")
    # math-verify bounds its work with SIGALRM, which only the main thread may use.
    bounded = threading.current_thread() is threading.main_thread()
    limits = {} if bounded else {"parsing_timeout": None}
    # References are usually bare LaTeX (\{1, 2\}), which math-verify reads only inside $...$.
    bare = "$" not in item.answer and "\\boxed" not in item.answer
    gold = (bare and parse(f"${item.answer}$", **limits)) or parse(item.answer, **limits)
    if not gold:
        raise ValueError(f"{item.item_id}: math-verify cannot parse the reference {item.answer!r}")
    answer = parse(response[-MATH_TAIL_CHARS:], **limits)
    return float(bool(answer) and verify(gold, answer, **({} if bounded else {"timeout_seconds": None})))


@functools.lru_cache(maxsize=64)
def _reasoning_gym_dataset(name: str, config_json: str):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=1, seed=0, **json.loads(config_json))


def reasoning_gym_score(item: TaskItem, response: str) -> float:
    meta = item.metadata
    try:
        name, config, entry = meta["dataset"], meta["config"], meta["entry"]
    except KeyError as exc:
        raise ValueError(f"{item.item_id}: a reasoning_gym item needs metadata {exc}") from None
    dataset = _reasoning_gym_dataset(name, json.dumps(config, sort_keys=True))
    answer = extract_answer(response, meta.get("extract", "auto"), item.answer)
    return dataset.score_answer(answer, entry)


_BUILTIN = {"exact": exact_match, "math": math_equivalent, "reasoning_gym": reasoning_gym_score}


# -- code -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeCase:
    """One program to run for a code item; it passes when it exits 0 in time and, if
    `expected_stdout` is set, prints that (compared line by line, trailing space ignored)."""

    source: str
    stdin: str = ""
    expected_stdout: str | None = None


def code_cases(item: TaskItem, response: str) -> list[CodeCase]:
    """The programs that decide a code item, from its metadata:

    - "tests" (+ "entry_point", "prompt"): HumanEval style. One program: the prompt (for
      its imports and, when the response only completes the body, its signature), the
      response's code, the tests, then `check(entry_point)`.
    - "io_tests": [{"stdin": ..., "stdout": ...}, ...]: the response's code run once per
      case, its output compared with the expected one.
    """
    code = extract_code(response)
    meta = item.metadata
    if "tests" in meta:
        entry = meta.get("entry_point")
        prompt = meta.get("prompt", "")
        defines = entry is not None and f"def {entry}(" in code
        # A completion continues the prompt's function; a whole function replaces it.
        program = (prompt + "\n\n" + code) if defines else (prompt + code)
        program += "\n\n" + meta["tests"] + (f"\n\ncheck({entry})\n" if entry else "\n")
        return [CodeCase(program)]
    if "io_tests" in meta:
        return [CodeCase(code, str(case.get("stdin", "")), str(case["stdout"])) for case in meta["io_tests"]]
    raise ValueError(f"{item.item_id}: a code item needs metadata 'tests' or 'io_tests'")


def case_passed(case: CodeCase, ok: bool, stdout: str) -> bool:
    if not ok:
        return False
    if case.expected_stdout is None:
        return True
    lines = (lambda text: [line.rstrip() for line in text.strip().splitlines()])
    return lines(stdout) == lines(case.expected_stdout)


def code_reward(cases: list[CodeCase], outcomes: list[tuple[bool, str]]) -> float:
    """1.0 when every case passed (`outcomes`: (execution ok, stdout) per case), else 0.0."""
    return float(all(case_passed(c, ok, out) for c, (ok, out) in zip(cases, outcomes, strict=True)))
