"""Task sources, held-out splits, prompt rendering and answer extraction."""

from __future__ import annotations

import json

import pytest

from ring.tasks import (
    PromptRenderer,
    TaskItem,
    answer_tag,
    boxed,
    extract_answer,
    extract_code,
    last_number,
    make_task_source,
)

EASY = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
ARITHMETIC = {"kind": "reasoning_gym", "name": "basic_arithmetic", "config": EASY, "seed": 0,
              "size": 300}


def test_reasoning_gym_source_has_stable_ids_and_verifiable_items():
    source = make_task_source(ARITHMETIC)
    again = make_task_source(ARITHMETIC)
    bigger = make_task_source({**ARITHMETIC, "size": 400})
    assert len(source) == 300 and [i.to_dict() for i in source] == [i.to_dict() for i in again]
    assert [i.item_id for i in bigger[:300]] == [i.item_id for i in source]  # growing keeps ids
    assert len({i.item_id for i in source}) == 300
    item = source[0]
    assert item.item_id.startswith("basic_arithmetic-s0/") and item.verifier == "reasoning_gym"
    assert item.question.startswith("Calculate") and item.answer == item.metadata["entry"]["answer"]
    assert source.by_id(item.item_id) is item
    other_seed = make_task_source({**ARITHMETIC, "seed": 1})
    assert [i.question for i in other_seed] != [i.question for i in source]


def test_held_out_split_shares_no_question_with_training():
    train = make_task_source(ARITHMETIC)
    held_out = make_task_source({**ARITHMETIC, "size": 50}, split="eval")
    assert len(held_out) == 50 and held_out.split == "eval"
    assert not {i.question for i in train} & {i.question for i in held_out}
    assert not {i.item_id for i in train} & {i.item_id for i in held_out}
    # Disjoint by content, not by luck of the seed: another seed's training split too.
    assert not {i.question for i in make_task_source({**ARITHMETIC, "seed": 7})} & {
        i.question for i in held_out}


def test_humaneval_source_splits_partition_the_problems():
    everything = make_task_source({"kind": "humaneval"}, split="all")
    train = make_task_source({"kind": "humaneval"})
    held_out = make_task_source({"kind": "humaneval"}, split="eval")
    assert len(everything) == 164 and len(train) + len(held_out) == 164
    assert {i.item_id for i in train} | {i.item_id for i in held_out} == {i.item_id for i in everything}
    item = everything.by_id("HumanEval/0")
    assert item.verifier == "code" and item.answer is None
    assert item.metadata["entry_point"] == "has_close_elements" and "def check" in item.metadata["tests"]
    assert "```python\nfrom typing import List" in item.question


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_file_sources_through_datasets(tmp_path, kind):
    rows = [{"problem": f"What is {i} + {i}?", "solution": str(2 * i), "level": i % 3} for i in range(40)]
    path = tmp_path / f"tasks.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    spec = {"kind": kind, "path": str(path), "question_key": "problem", "answer_key": "solution"}
    everything = make_task_source(spec, split="all")
    assert [(i.question, i.answer, i.metadata["level"]) for i in everything] == [
        (r["problem"], r["solution"], r["level"]) for r in rows]
    assert everything[0].verifier == "math" and everything[0].item_id == f"tasks.{kind}/0"
    train, held_out = make_task_source(spec), make_task_source(spec, split="eval")
    assert len(train) + len(held_out) == 40 and not {i.question for i in train} & {i.question for i in held_out}
    with pytest.raises(ValueError, match="no column"):
        make_task_source({"kind": kind, "path": str(path)})  # default columns prompt/answer


@pytest.mark.parametrize("spec, match", [
    ({"kind": "csv"}, "unknown task source kind"),
    ({**ARITHMETIC, "colour": "red"}, "unknown keys"),
    ({"kind": "reasoning_gym", "name": "basic_arithmetic"}, "required"),
    ({**ARITHMETIC, "extract": "first_word"}, "extract"),
    ({**ARITHMETIC, "eval_fraction": 1.5}, "eval_fraction"),
    ({**ARITHMETIC, "size": 0}, "size"),
    ("basic_arithmetic", "dict"),
])
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        make_task_source(spec)


def test_items_round_trip_as_plain_data():
    item = make_task_source(ARITHMETIC)[3]
    data = json.loads(json.dumps(item.to_dict()))
    assert TaskItem.from_dict(data) == item
    with pytest.raises(ValueError, match="keys"):
        TaskItem.from_dict({**data, "extra": 1})
    with pytest.raises(ValueError, match="TaskItem.answer"):
        TaskItem.from_dict({**data, "answer": 3})
    with pytest.raises(ValueError, match="verifier"):
        TaskItem("x", "q", "a", "regex")


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", "42"), ("10-5", "5"), ("x = -3", "-3"), ("so 2 - -1 = 3", "3"),
    ("(-9 / 9) = -1", "-1"), ("1,000.50 apples", "1000.5"), ("1,2,3", "3"), ("3/4 cup", "3/4"),
    ("5.0", "5"), ("-0", "0"), ("no digits", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_other_extractors():
    assert boxed(r"so $\boxed{\frac{1}{2}}$ and \boxed{3}") == "3"
    assert boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}" and boxed("none") is None
    assert answer_tag("<answer>a</answer> then <ANSWER> b </ANSWER>") == "b"
    assert extract_answer("thinking 3\n<answer>7</answer>", reference="7") == "7"
    assert extract_answer("it is 12, not 13\n", reference="12") == "13"  # the last number
    assert extract_answer("Thinking.\nParis\n", reference="Paris") == "Paris"  # the last line
    assert extract_answer("  all of it  ", mode="none") == "all of it"
    with pytest.raises(ValueError, match="extract mode"):
        extract_answer("x", mode="first_word")
    assert extract_code("intro\n```python\ndef f():\n    return 1\n```\nouter ```x``` end") == (
        "def f():\n    return 1\n")
    assert extract_code("print(1)") == "print(1)"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from asystem.models import smollm2
    return AutoTokenizer.from_pretrained(smollm2())


def test_prompts_use_the_models_chat_template(tokenizer):
    item = make_task_source(ARITHMETIC)[0]
    plain = PromptRenderer(tokenizer)
    text = plain.text(item)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{item.question}<|im_end|>" in text
    custom = PromptRenderer(tokenizer, system_prompt="Be brief.",
                            instruction="Give the final answer as a number.")
    text = custom.text(item)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert f"{item.question}\n\nGive the final answer as a number.<|im_end|>" in text
    prompt = custom.prompt(item)
    assert prompt.prompt_id == item.item_id
    assert tokenizer.decode(prompt.tokens) == text
    assert prompt.tokens.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    reply = tokenizer("The answer is 4.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert custom.response_text(reply) == "The answer is 4."
