"""Per-task accuracy of a model folder with the tasks' heads.

Heads: `heads/<task>.safetensors` of a merged output, or, for an expert folder (whose config
names its `supermerge_task`), its own `classifier.*` tensors. Class ids follow the task file's
class order (the order `supermerge finetune` trains heads with). Tasks without a head are
reported as skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from supermerge.demo.finetune import HEAD
from supermerge.io.checkpoint import Checkpoint, Tensors
from supermerge.io.taskfile import TaskFile
from supermerge.learned.task_models import HFEncoderModel, ModelSpec

log = logging.getLogger(__name__)


def task_heads(model_dir: Path, ckpt: Checkpoint, tasks: list[str]) -> dict[str, Tensors]:
    """The head of every task that has one in `model_dir` (see module docstring)."""
    heads = {}
    own_task = (ckpt.config or {}).get("supermerge_task")
    for task in tasks:
        path = model_dir / "heads" / f"{task}.safetensors"
        if path.is_file():
            stored = Checkpoint(path)
            heads[task] = {n: stored.read(n) for n in stored.names}
        elif task == own_task:
            heads[task] = {n: ckpt.read(n) for n in ckpt.names if n.startswith(f"{HEAD}.")}
    return heads


@torch.inference_mode()
def evaluate_model(
    model_dir: str | Path,
    tasks: dict[str, TaskFile],
    split: str = "test",
    batch_size: int = 64,
    max_length: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Accuracy per task on `split` for the tasks that have a head in `model_dir`."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    ckpt = Checkpoint(model_dir)
    model = HFEncoderModel(ModelSpec(head=HEAD, max_length=max_length), ckpt)
    body = {n: ckpt.read(n).to(device) for n in ckpt.names if not n.startswith(f"{HEAD}.")}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heads = task_heads(model_dir, ckpt, list(tasks))
    skipped = sorted(set(tasks) - set(heads))
    if skipped:
        log.info("no head in %s for %s: skipped", model_dir, ", ".join(skipped))
    accuracy = {}
    for name in tqdm(list(heads), desc="evaluate", unit="task", disable=not progress):
        examples = tasks[name].splits[split]
        labels = torch.tensor(tasks[name].label_ids(split), device=device)
        head = {n: t.to(device) for n, t in heads[name].items()}
        # Batches of similar lengths (padding is per batch): the order changes no prediction.
        encoded = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
        fields = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        order = sorted(range(len(examples)), key=lambda i: len(encoded["input_ids"][i]))
        correct = 0
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            batch = tokenizer.pad({k: [encoded[k][i] for i in idx] for k in fields}, return_tensors="pt")
            batch = batch.to(device)
            predicted = model.logits(body, head, dict(batch)).argmax(-1)
            correct += int((predicted == labels[idx]).sum())
        accuracy[name] = correct / len(examples)
    return accuracy
