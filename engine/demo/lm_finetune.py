"""Fine-tuning causal-LM experts: every weight of the base, on a generative task's completions.

An expert is a full fine-tune (AdamW, float32) of the base on its task's train split with the
completion-only next-token loss: prompt and completion are encoded by
`supermerge.learned.lm_inputs` (completion + EOS; with `chat`, the prompt in the tokenizer's
chat template), and the logits are computed only at the M positions that predict a completion
token (`completion_logits`: the decoder's hidden states [B, T, H], gathered to [M, H], through
the output embedding to [M, vocab]), never the full [B, T, vocab]. Batches are length-bucketed
as for the encoder experts.

The expert is written with `save_pretrained` (safetensors; tied input/output embeddings stay
tied, so the file has no separate lm_head) plus the base's tokenizer, into an atomic folder;
its config.json names the task as `supermerge_task`. With `LMLoraFinetuneConfig` the expert is a
PEFT LoRA adapter instead (`peft.get_peft_model`: only the factors train, the base stays frozen),
written as PEFT writes it (adapter_config.json + adapter_model.safetensors, the base named by its
absolute path) plus the tokenizer. Experts are cached by a content hash of the
task file, every file of the base folder (weights, config, tokenizer, chat template) and the
settings, as `supermerge.demo.finetune` does for encoder experts.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from supermerge.demo.finetune import finetune_suite, length_bucketed_batches
from supermerge.errors import InputError, SupermergeError
from supermerge.io.adapters import adapter_config, is_adapter
from supermerge.io.atomic import atomic_folder
from supermerge.io.completions import CompletionTaskFile
from supermerge.learned.lm_inputs import (
    collate,
    completion_targets,
    encode,
    pad_id,
    predicting_positions,
)

log = logging.getLogger(__name__)
LM_CACHE_VERSION = "lm-1"  # part of every causal-LM expert's cache key: bump it when training changes
LORA_CACHE_VERSION = "lm-lora-1"  # the same for LoRA experts
# a base folder's files that can change an expert: weights, config, tokenizer, chat template
_BASE_SUFFIXES = {".safetensors", ".json", ".jinja", ".model", ".txt", ".bin", ".tiktoken"}


@dataclass(frozen=True)
class LMFinetuneConfig:
    """Causal-LM fine-tuning settings.

    Attributes:
        epochs: passes over the (capped) train split.
        lr: AdamW learning rate (every weight of the model).
        batch_size: sequences (prompt + completion) per step.
        max_length: tokens per sequence; a longer prompt loses tokens from its left.
        train_size: at most this many train examples (a seeded subset; None: all).
        seed: seeds the subset and the batch order.
        chat: pose each prompt as the user turn of the tokenizer's chat template.
    """

    epochs: int = 1
    lr: float = 2e-5
    batch_size: int = 8
    max_length: int = 128
    train_size: int | None = 1000
    seed: int = 0
    chat: bool = False


@dataclass(frozen=True)
class LMLoraFinetuneConfig(LMFinetuneConfig):
    """Causal-LM fine-tuning of a LoRA adapter (PEFT) instead of every weight.

    Attributes:
        rank: r of every adapted module (B [out, r], A [r, in]).
        alpha: lora_alpha (the update is alpha / r * B A).
        target_modules: PEFT's `target_modules`: "all-linear" (every linear layer but the output
            head) or module names.
    """

    lr: float = 1e-3
    rank: int = 16
    alpha: float = 32.0
    target_modules: str | tuple[str, ...] = "all-linear"


def is_causal_lm(folder: Path) -> bool:
    """Whether `folder`'s config.json names a causal LM (an `architectures` entry ending in
    "ForCausalLM"), or `folder` is a PEFT adapter for one (its task_type CAUSAL_LM, or the base
    it names is one); False when it has no readable config.json."""
    if is_adapter(folder):
        try:
            settings = adapter_config(folder)
        except InputError:
            return False
        named = settings.get("base_model_name_or_path")
        named_causal = isinstance(named, str) and not is_adapter(Path(named)) and is_causal_lm(Path(named))
        return settings.get("task_type") == "CAUSAL_LM" or named_causal
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(architectures, list) and any(
        isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures
    )


def base_files(base: Path) -> list[Path]:
    """The files of a base folder an expert depends on (weights, configs, tokenizer files, chat
    template), sorted by name: what its cache key hashes."""
    files = sorted(p for p in base.iterdir() if p.is_file() and p.suffix in _BASE_SUFFIXES)
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise InputError(base, "no model weights (*.safetensors) in the base model folder")
    return files


@contextlib.contextmanager
def hf_progress(enabled: bool) -> Iterator[None]:
    """Transformers' own progress bars (loading and writing shards) on or off for the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if enabled != was:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        if enabled != was:
            (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model's decoder stack (`model.model` for Llama, Qwen2, ...): hidden states, no head."""
    return getattr(model, model.base_model_prefix)


def completion_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [M, vocab] at the positions that predict a completion token, in the order of
    `lm_inputs.predicting_positions`' True entries (M = completion tokens in the batch).

    Args:
        model: a causal LM (`AutoModelForCausalLM`).
        batch: `lm_inputs.collate`'s `input_ids`, `attention_mask`, `completion_mask` [B, T].
    """
    hidden = decoder_of(model)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )[0]  # [B, T, H]
    rows = hidden[predicting_positions(batch["completion_mask"])]  # [M, H]
    return model.get_output_embeddings()(rows)  # [M, vocab]


@torch.no_grad()
def check_completion_logits(model: torch.nn.Module) -> None:
    """Refuse a model whose own forward post-processes its logits (a scale, a soft cap): compare
    `completion_logits` with the model's full logits on one short sequence.

    Raises:
        SupermergeError: they differ.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = (torch.arange(8, device=device) * 37 + 3) % vocab
        batch = {
            "input_ids": ids[None],
            "attention_mask": torch.ones(1, 8, dtype=torch.int64, device=device),
            "completion_mask": (torch.arange(8, device=device) >= 4).to(torch.int64)[None],
        }
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = full[predicting_positions(batch["completion_mask"])].float()
        mine = completion_logits(model, batch).float()
        scale = float(expected.abs().max().clamp_min(1.0))
        tol = 1e-3 if full.dtype == torch.float32 else 3e-2  # bfloat16: products rounded to 8 bits
        if not torch.allclose(mine, expected, rtol=tol, atol=tol * scale):
            raise SupermergeError(
                f"{type(model).__name__}: its logits are not its output embedding of its decoder's "
                "hidden states (the architecture post-processes them); not supported"
            )
    finally:
        model.train(was_training)


def finetune_lm_expert(
    base: Path,
    task: CompletionTaskFile,
    out: Path,
    cfg: LMFinetuneConfig,
    progress: bool = True,
    device: str = "cpu",
) -> Path:
    """Fine-tune every weight of the causal LM `base` on `task`'s train split (completion-only
    next-token loss, mean over the batch's completion tokens); write the expert folder at `out`.

    Raises:
        InputError: the task has no train examples.
        SupermergeError: the architecture's logits are not supported (`check_completion_logits`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = task.splits["train"]
    if not examples:
        raise InputError(task.path, 'no train examples to fine-tune on (give rows "split": "train")')
    torch.manual_seed(cfg.seed)
    with hf_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(base)
        # an absolute path: what a LoRA adapter's config names as its base
        model = AutoModelForCausalLM.from_pretrained(base.resolve(), dtype=torch.float32).to(device)
    check_completion_logits(model)
    net = model  # what computes the logits; `model` is what trains and is saved
    if isinstance(cfg, LMLoraFinetuneConfig):
        model = with_lora(model, cfg)
        net = model.get_base_model()  # the causal LM with its LoRA layers in place
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.train_size is not None and len(examples) > cfg.train_size:
        keep = torch.randperm(len(examples), generator=gen)[: cfg.train_size].tolist()
        examples = [examples[i] for i in keep]
    try:
        encoded = [encode(tokenizer, e.prompt, e.completion, cfg.max_length, cfg.chat) for e in examples]
    except ValueError as e:  # no chat template
        raise InputError(base, str(e)) from None
    pad = pad_id(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    bar = tqdm(total=steps, desc=f"finetune {task.name}", unit="step", disable=not progress)
    lengths = [len(ids) for ids, _ in encoded]
    for _ in range(cfg.epochs):
        for idx in length_bucketed_batches(lengths, cfg.batch_size, gen):
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
            logits = completion_logits(net, batch)  # [M, vocab]
            targets = completion_targets(batch["input_ids"], batch["completion_mask"])  # [M]
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    model.eval()
    with atomic_folder(out) as tmp, hf_progress(progress):
        net.config.supermerge_task = task.name  # (a dense expert's config.json; an adapter has none)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def with_lora(model: torch.nn.Module, cfg: LMLoraFinetuneConfig) -> torch.nn.Module:
    """`model` wrapped by PEFT with fresh LoRA factors (B = 0) on `cfg.target_modules`; only the
    factors require gradients."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=0.0,
                      task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, lora)


def finetune_lm_suite(
    base: Path,
    tasks: dict[str, CompletionTaskFile],
    cache_dir: Path,
    cfg: LMFinetuneConfig,
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Path]:
    """One causal-LM expert per task under `cache_dir/experts/<task>-<hash>`, trained only when
    missing (the hash: task file, every file of `base_files(base)`, `cfg`); refused if that
    folder is, contains or lies inside the base or a task file. An `LMLoraFinetuneConfig` makes
    LoRA adapters."""
    return finetune_suite(
        base,
        tasks,
        cache_dir,
        cfg,
        progress,
        train=lambda task, out: finetune_lm_expert(base, task, out, cfg, progress, device),
        files=base_files(base),
        version=LORA_CACHE_VERSION if isinstance(cfg, LMLoraFinetuneConfig) else LM_CACHE_VERSION,
    )
