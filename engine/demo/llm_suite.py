"""The built-in generative suite: the built-in classification tasks posed as short instructions.

Each task of `LLMSuiteSettings.tasks` (`LLMTask`) takes a few classes of one built-in task (see
`supermerge.demo.suite`), asks about its text in a short instruction that lists the answers,
and expects the class's reply (``task.reply`` with the answer filled in, e.g. "This quote is in
Italian.") as the completion. Written as ``<task>.jsonl`` in the format of
`supermerge.io.completions`: lines {"prompt": str, "completion": str, "choices": [str, ...],
"split": "train" | "test"}. A task scored by choices (rank classification over the replies of
its classes) has "choices" on every line; an exact-match task (the greedy generation, stripped,
must equal the reply) has none. No validation rows: the reader carves validation from train.

With `LLMSuiteSettings.chat` (the default) the prompts are meant to be read through the
tokenizer's chat template (the instruction is the user turn, the reply the assistant turn, no
leading space); without it, a prompt ends in ``"\nAnswer:"`` and its completions start with a
space.

Texts longer than the task's `max_chars` are cut at a word boundary, so that prompts stay short
(a forward pass per choice on a CPU). Every class gets the same number of train examples and of
test examples: ``size // classes`` when every class has that many, else the smallest class's
count. Train examples come from the source's train rows (its carved validation included), test
examples from its test rows; a text that two classes or both splits share after cutting is
dropped. Sampling is seeded per task and split, so the test set does not depend on the train
size.

Layout: ``cache/llm_suite/`` holds the task files and `MARKER_NAME`, a JSON marker with the
builder version, the settings and a digest of the source task files, written last; the folder
is built beside its place and renamed into it (`atomic_folder`), so it is complete or absent,
and it is rebuilt when the settings or the source files differ.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from supermerge.errors import SupermergeError
from supermerge.io.atomic import atomic_folder
from supermerge.io.digest import files_digest
from supermerge.io.taskfile import TaskFile, read_suite

log = logging.getLogger(__name__)

BUILDER_VERSION = "supermerge-llm-suite/2"  # 2: test and train sampled by separate generators
MARKER_NAME = "_llm_suite.json"
ANSWER_CUE = "\nAnswer:"  # ends a prompt meant to be read without the chat template
# text cuts (characters) that keep most chat-templated examples within about 64 SmolLM2 tokens
NOUN_CHARS, VERB_CHARS, TOPIC_CHARS, LANGID_CHARS, DRUG_CHARS = 60, 80, 60, 40, 60


@dataclass(frozen=True)
class LLMTask:
    """One generative task made from a built-in classification task.

    Attributes:
        name: the task (its file is ``<name>.jsonl``).
        source: the built-in task whose texts and labels it uses.
        question: the instruction; ``{text}`` is filled with the text, ``{options}`` with the
            answers ("a, b, c or d").
        answers: (label in the source task, the answer the model should give) per class used.
        exact_match: scored by exact match of the generated reply (no choices), else by rank
            classification over the replies of its classes.
        max_chars: longer texts are cut at the last word boundary before this many characters.
        reply: the completion, ``{answer}`` filled with the class's answer (e.g. "This quote is
            in {answer}." to match how a chat model phrases its reply).
    """

    name: str
    source: str
    question: str
    answers: tuple[tuple[str, str], ...]
    exact_match: bool = False
    max_chars: int = 120
    reply: str = "{answer}"

    def options(self) -> str:
        """The answers as a list in words: "a, b, c or d"."""
        words = [answer for _, answer in self.answers]
        return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


DEFAULT_TASKS: tuple[LLMTask, ...] = (
    LLMTask(
        name="noun",
        source="noun",
        question="Is this definition about {options}?\n{text}",
        answers=(("animal", "an animal"), ("plant", "a plant"), ("food", "food"), ("person", "a person")),
        max_chars=NOUN_CHARS,
        reply="This definition is about {answer}.",
    ),
    LLMTask(
        name="verb",
        source="verb",
        question="Is this verb about {options}?\n{text}",
        answers=tuple((c, c) for c in ("motion", "communication", "consumption", "emotion")),
        max_chars=VERB_CHARS,
        reply="This verb is about {answer}.",
    ),
    LLMTask(
        name="topic",
        source="topic",
        question="Is this quote about {options}?\n{text}",
        answers=tuple((c, c) for c in ("computers", "politics", "food", "love")),
        max_chars=TOPIC_CHARS,
        reply="This quote is about {answer}.",
    ),
    LLMTask(
        name="langid",
        source="langid",
        question="Which language is this quote in: {options}?\n{text}",
        answers=(("en", "English"), ("de", "German"), ("es", "Spanish"), ("it", "Italian")),
        exact_match=True,
        max_chars=LANGID_CHARS,
        reply="This quote is in {answer}.",
    ),
)
"""noun, verb, topic (scored by choices) and langid (by exact match), 4 classes each. The replies
are sentences as SmolLM2-135M-Instruct phrases them in a chat turn ("This quote is in
Italian."): with one-word replies its rank classification picked the same class for every
example and its generations never matched."""

DRUG_TASK = LLMTask(
    name="drug",
    source="drug",
    question="Is this drug review {options}?\n{text}",
    answers=tuple((c, c) for c in ("positive", "negative", "neutral")),
    max_chars=DRUG_CHARS,
    reply="This review is {answer}.",
)
"""An optional fifth task (not in `DEFAULT_TASKS`: the base is barely above chance on it)."""


@dataclass(frozen=True)
class LLMSuiteSettings:
    """What the generative suite depends on besides the source files (recorded in the marker).

    Attributes:
        tasks: the tasks to write.
        train_size: train examples per task at most (split evenly over its classes).
        test_size: test examples per task at most (split evenly over its classes).
        seed: seeds the sampling (mixed with each task's name).
        chat: the prompts are meant for the chat template (see the module docstring); the
            default tasks need it (an instruct model ends its turn with EOS, and is scored so).
    """

    tasks: tuple[LLMTask, ...] = field(default=DEFAULT_TASKS)
    train_size: int = 240
    test_size: int = 60
    seed: int = 0
    chat: bool = True


def cut_text(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters, at the last space when there is one in the
    second half of the limit."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def pose(task: LLMTask, text: str, chat: bool) -> str:
    """The prompt asking `task`'s question about `text`."""
    prompt = task.question.format(text=cut_text(text, task.max_chars), options=task.options())
    return prompt if chat else prompt + ANSWER_CUE


def completion_of(task: LLMTask, answer: str, chat: bool) -> str:
    """The completion for an answer: `task.reply` filled in, as is in a chat turn, after a space
    otherwise."""
    reply = task.reply.format(answer=answer)
    return reply if chat else " " + reply


def _check(task: LLMTask, source: TaskFile) -> None:
    labels = [label for label, _ in task.answers]
    answers = [answer for _, answer in task.answers]
    if len(labels) < 2 or len(set(labels)) != len(labels) or len(set(answers)) != len(answers):
        raise SupermergeError(
            f"LLM task {task.name!r}: needs at least 2 classes, distinct labels and answers"
        )
    missing = [label for label in labels if label not in source.classes]
    if missing:
        raise SupermergeError(
            f"LLM task {task.name!r}: labels {missing} are not classes of {source.path} ({source.classes})"
        )
    if not all(a.strip() == a and a for a in answers):
        raise SupermergeError(f"LLM task {task.name!r}: answers must be non-empty without outer spaces")
    try:
        task.question.format(text="", options="")
    except (KeyError, IndexError, ValueError) as e:
        raise SupermergeError(
            f"LLM task {task.name!r}: question cannot be filled with {{text}}, {{options}} ({e})"
        ) from None
    try:
        replies = [task.reply.format(answer=a) for a in answers]
    except (KeyError, IndexError, ValueError) as e:
        raise SupermergeError(
            f"LLM task {task.name!r}: reply cannot be filled with {{answer}} ({e})"
        ) from None
    if len(set(replies)) != len(replies) or not all(r.strip() == r and r for r in replies):
        raise SupermergeError(
            f"LLM task {task.name!r}: replies must be distinct, non-empty, without outer spaces"
        )


def _pools(task: LLMTask, source: TaskFile) -> dict[str, dict[str, list[str]]]:
    """split -> label -> the distinct cut texts of that class (train: the source's train and
    validation), in file order; texts shared by two classes or by both splits dropped."""
    labels = {label for label, _ in task.answers}
    rows = {
        "train": sorted(
            source.splits.get("train", []) + source.splits.get("validation", []), key=lambda e: e.line
        ),
        "test": sorted(source.splits.get("test", []), key=lambda e: e.line),
    }
    owners: dict[str, set[tuple[str, str]]] = {}
    for split, examples in rows.items():
        for e in examples:
            if str(e.label) in labels:
                owners.setdefault(cut_text(e.text, task.max_chars), set()).add((split, str(e.label)))
    pools: dict[str, dict[str, list[str]]] = {s: {label: [] for label, _ in task.answers} for s in rows}
    for text, where in owners.items():
        if len(where) == 1:
            split, label = next(iter(where))
            pools[split][label].append(text)
    return pools


def _sample(pools: dict[str, list[str]], size: int, rng: random.Random) -> list[tuple[str, str]]:
    """`size // classes` texts per class (fewer for all when a class has fewer), shuffled."""
    k = min(size // len(pools), *(len(p) for p in pools.values()))
    chosen = [(text, label) for label, pool in pools.items() for text in rng.sample(pool, k)]
    rng.shuffle(chosen)
    return chosen


def write_llm_suite(
    source_dir: Path, out_dir: Path, settings: LLMSuiteSettings | None = None
) -> dict[str, dict]:
    """Write ``out_dir/<task>.jsonl`` for each task of `settings` from the classification suite in
    `source_dir` (`read_suite` format); no marker, no network.

    Returns per task: {"source", "answers", "scored_by", "train", "test"}.

    Raises:
        SupermergeError: a task names a source task or labels the suite lacks, a class has no
            example in a split, or two tasks share a name.
    """
    settings = settings or LLMSuiteSettings()
    names = [t.name for t in settings.tasks]
    if not names or len(set(names)) != len(names):
        raise SupermergeError(f"LLM suite: needs tasks with distinct names (got {names})")
    sources = read_suite(source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for task in settings.tasks:
        if task.source not in sources:
            raise SupermergeError(f"LLM task {task.name!r}: no task {task.source!r} in {source_dir}")
        source = sources[task.source]
        _check(task, source)
        pools = _pools(task, source)
        empty = [
            f"{label} ({split})" for split, p in pools.items() for label, texts in p.items() if not texts
        ]
        if empty:
            raise SupermergeError(
                f"LLM task {task.name!r}: no usable {source.path} examples of {', '.join(empty)}"
            )
        answer = dict(task.answers)
        choices = [completion_of(task, a, settings.chat) for _, a in task.answers]
        counts = {}
        with (out_dir / f"{task.name}.jsonl").open("w", encoding="utf-8") as f:
            for split, size in (("train", settings.train_size), ("test", settings.test_size)):
                # one generator per split: the test set does not depend on the train size
                rows = _sample(pools[split], size, random.Random(f"{settings.seed}:{task.name}:{split}"))
                counts[split] = len(rows)
                for text, label in rows:
                    row = {
                        "prompt": pose(task, text, settings.chat),
                        "completion": completion_of(task, answer[label], settings.chat),
                    }
                    if not task.exact_match:
                        row["choices"] = choices
                    row["split"] = split
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary[task.name] = {
            "source": task.source,
            "answers": dict(task.answers),
            "scored_by": "exact_match" if task.exact_match else "choices",
            **counts,
        }
        log.info(
            "LLM task %s: %d train, %d test, %s",
            task.name,
            counts["train"],
            counts["test"],
            summary[task.name]["scored_by"],
        )
    return summary


def _source_files(source_dir: Path, settings: LLMSuiteSettings) -> list[Path]:
    return [source_dir / f"{s}.jsonl" for s in sorted({t.source for t in settings.tasks})]


def _marker(settings: LLMSuiteSettings, source_digest: str) -> dict:
    # through JSON so that a marker read back (lists) compares equal to one made now (tuples)
    return json.loads(
        json.dumps({"builder": BUILDER_VERSION, "settings": asdict(settings), "source": source_digest})
    )


def llm_suite_is_complete(suite_dir: Path, settings: LLMSuiteSettings, source_digest: str) -> bool:
    """Whether `suite_dir` holds a finished suite of this builder version, `settings` and source."""
    try:
        marker = json.loads((suite_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = _marker(settings, source_digest)
    return {k: marker.get(k) for k in expected} == expected and all(
        (suite_dir / f"{t.name}.jsonl").is_file() for t in settings.tasks
    )


def build_llm_suite(
    cache: Path,
    progress: bool = True,
    settings: LLMSuiteSettings | None = None,
    source: Path | None = None,
) -> Path:
    """Build (or reuse) the generative suite under `cache` and return ``cache/llm_suite``.

    Args:
        cache: the cache folder (that of `build_builtin_suite`).
        progress: show progress bars (building the built-in suite).
        settings: the tasks, sizes, seed and prompt style (default `LLMSuiteSettings()`).
        source: the classification suite folder to pose; None: the built-in suite, built (or
            reused) under `cache` by `build_builtin_suite`.

    Raises:
        SupermergeError: the source suite cannot be built or lacks what a task needs; no partial
            suite is left behind.
    """
    settings = settings or LLMSuiteSettings()
    cache = Path(cache)
    if source is None:
        from supermerge.demo.suite import build_builtin_suite

        source = build_builtin_suite(cache, progress)
    source = Path(source)
    missing = [p for p in _source_files(source, settings) if not p.is_file()]
    if missing:
        raise SupermergeError(f"LLM suite: missing source task files {', '.join(map(str, missing))}")
    digest = files_digest(_source_files(source, settings))
    suite_dir = cache / "llm_suite"
    if llm_suite_is_complete(suite_dir, settings, digest):
        log.info("LLM suite up to date: %s", suite_dir)
        return suite_dir
    with atomic_folder(suite_dir) as tmp:
        summary = write_llm_suite(source, tmp, settings)
        marker = {**_marker(settings, digest), "tasks": summary}
        (tmp / MARKER_NAME).write_text(
            json.dumps(marker, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    log.info("LLM suite written: %s", suite_dir)
    return suite_dir
