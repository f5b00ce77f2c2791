"""Causal-LM inputs: a prompt and its completion as token ids, and which tokens are the completion.

Every causal-LM path (learning W, distillation targets, fine-tuning experts, evaluation) encodes
text the same way:
- prompt: the tokenizer's own special tokens (e.g. BOS) added; with `chat`, the prompt is the
  user turn of the tokenizer's chat template with the generation prompt appended;
- completion: tokenised without special tokens, then the EOS token, so that a model learns to
  stop and greedy generation of a right completion ends there;
- too long: the prompt loses tokens from its left (a leading BOS kept), the completion is kept
  (cut only if it alone exceeds `max_length - 1`).
A batch is right-padded: `input_ids`, `attention_mask` and `completion_mask` [B, T], the last 1
on the completion's tokens. The logits that predict completion token t are read at position
t - 1 (`predicting_positions`), so a loss touches only those rows, never [B, T, vocab].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Encoded = tuple[list[int], int]  # token ids, number of prompt tokens


def prompt_text(tokenizer, prompt: str, chat: bool) -> str:
    """The prompt as the model reads it: with `chat`, the tokenizer's chat template around it."""
    if not chat:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template: the base model's tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt (see the module docstring)."""
    text = prompt_text(tokenizer, prompt, chat)
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def encode(tokenizer, prompt: str, completion: str, max_length: int, chat: bool = False) -> Encoded:
    """Ids of prompt + completion + EOS, cut to `max_length`, and the number of prompt tokens."""
    head = encode_prompt(tokenizer, prompt, chat)
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        tail = tail + [tokenizer.eos_token_id]
    tail = tail[: max(1, max_length - 1)]
    room = max_length - len(tail)
    if len(head) > room:
        keep_bos = bool(head) and head[0] == tokenizer.bos_token_id and room > 1
        head = head[:1] + head[len(head) - room + 1 :] if keep_bos else head[len(head) - room :]
    return head + tail, len(head)


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `completion_mask` [B, T] (int64)."""
    width = max(len(ids) for ids, _ in encoded)
    batch = {
        k: torch.zeros(len(encoded), width, dtype=torch.int64) for k in ("attention_mask", "completion_mask")
    }
    batch["input_ids"] = torch.full((len(encoded), width), pad_id, dtype=torch.int64)
    for b, (ids, n_prompt) in enumerate(encoded):
        batch["input_ids"][b, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][b, : len(ids)] = 1
        batch["completion_mask"][b, n_prompt : len(ids)] = 1
    return batch


def pad_id(tokenizer) -> int:
    """The id right padding uses (never read: padded positions are masked out)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return token_id
    return 0


def predicting_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions whose logits predict a completion token (the one after them)."""
    out = torch.zeros_like(completion_mask, dtype=torch.bool)
    out[:, :-1] = completion_mask[:, 1:].bool()
    return out


def completion_targets(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """[M] the completion tokens, in the order of `predicting_positions`' True entries."""
    return input_ids[:, 1:][completion_mask[:, 1:].bool()]


def completion_lengths(completion_mask: torch.Tensor) -> torch.Tensor:
    """[B] completion tokens per example (their rows in [M] are consecutive, in batch order)."""
    return completion_mask[:, 1:].sum(1)
