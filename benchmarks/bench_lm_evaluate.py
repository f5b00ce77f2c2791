"""Rank classification's cost (`supermerge.demo.lm_evaluate.choice_scores`): each prompt read once
with its KV cache reused by every choice, against the full-sequence scoring it replaced (every
(example, choice) sequence run whole), in the same process.

The model is a random-init SmolLM2-135M (Llama, 30 layers, hidden 576, vocabulary 49152, tied
embeddings; the cost does not depend on the weights), in float32. The task is `--examples`
synthetic examples of a 32-48-token prompt (~40) and `--choices` choices of 1-2 tokens (+ EOS), as
token ids written out as text (a tokenizer that reads "17 4 9" as [17, 4, 9]). Both ways use the
same `--batch-size` (the CLI's default 16): (example, choice) sequences per forward pass for the
full-sequence way, prompts per forward pass for the cached one. Printed: the largest score
difference, each way's median time over `--repeats` runs (interleaved, order alternated), the
ratio, the device and the machine's load.

    python benchmarks/bench_lm_evaluate.py                      # CPU
    python benchmarks/bench_lm_evaluate.py --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from supermerge.demo.lm_evaluate import choice_scores
from supermerge.demo.lm_finetune import completion_logits
from supermerge.io.completions import Completion
from supermerge.learned.lm_inputs import collate, completion_lengths, completion_targets, encode, pad_id

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip


class IdTokenizer:
    """Text of space-separated token ids, read back as those ids; SmolLM2's special ids, no BOS
    added (as SmolLM2's tokenizer)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(t) for t in text.split()]}


@torch.inference_mode()
def full_sequence_scores(
    model, tokenizer, examples: list[Completion], batch_size: int, max_length: int = 128
):
    """The scoring `choice_scores` replaced: every (example, choice) sequence `encode` writes,
    whole, right-padded, `batch_size` per forward in order of length; the mean log-probability at
    the completion's predicting positions. Per example, [len(choices)] float32 on the CPU."""
    pairs = [(i, c) for i, e in enumerate(examples) for c in e.choices]
    encoded = [encode(tokenizer, examples[i].prompt, c, max_length) for i, c in pairs]
    order = sorted(range(len(pairs)), key=lambda k: len(encoded[k][0]))
    device = next(model.parameters()).device
    means = torch.empty(len(pairs))
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        batch = {k: v.to(device) for k, v in collate([encoded[k] for k in idx], pad_id(tokenizer)).items()}
        logp = completion_logits(model, batch).float().log_softmax(-1)  # [M, vocab]
        targets = completion_targets(batch["input_ids"], batch["completion_mask"])  # [M]
        token_logp = logp.gather(1, targets[:, None])[:, 0].cpu()  # [M]
        lengths = completion_lengths(batch["completion_mask"]).tolist()
        means[idx] = torch.stack([part.mean() for part in token_logp.split(lengths)])
    return list(means.split([len(e.choices) for e in examples]))


def synthetic_examples(n: int, choices: int, vocab: int, seed: int = 0) -> list[Completion]:
    """n examples: a 32-48-token prompt, `choices` distinct choices of 1-2 tokens, the first right."""
    gen = torch.Generator().manual_seed(seed)

    def ids(length: int) -> str:
        return " ".join(str(int(t)) for t in torch.randint(3, vocab, (length,), generator=gen))

    examples = []
    for i in range(n):
        prompt = ids(int(torch.randint(32, 49, (1,), generator=gen)))
        options: list[str] = []
        while len(options) < choices:
            option = ids(int(torch.randint(1, 3, (1,), generator=gen)))
            options += [option] if option not in options else []
        examples.append(Completion(prompt, options[0], tuple(options), line=i + 1))
    return examples


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    cpu = model.group(1) if model else platform.processor()
    return f"cpu: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs each way (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2)).to(device).eval()
    tokenizer = IdTokenizer()
    examples = synthetic_examples(args.examples, args.choices, SMOLLM2["vocab_size"])
    ways = {
        "full sequences": lambda: full_sequence_scores(model, tokenizer, examples, args.batch_size),
        "cached prompts": lambda: choice_scores(model, tokenizer, examples, args.batch_size),
    }

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    print(f"device: {device_name(device)}; load at start {load()}")
    prompt_tokens = sum(len(e.prompt.split()) for e in examples) / len(examples)
    print(f"{args.examples} examples, ~{prompt_tokens:.0f}-token prompts, {args.choices} choices of 1-2 "
          f"tokens (+ EOS), batch size {args.batch_size}")  # fmt: skip
    full, cached = (torch.cat(fn()) for fn in ways.values())  # also the warm-up
    print(f"largest |score difference|: {float((full - cached).abs().max()):.2e}")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.repeats):
        for name in list(ways)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(ways[name]))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name}: median {medians[name]:.3f} s  (runs: {' '.join(f'{x:.3f}' for x in t)})")
    ratio = medians["full sequences"] / medians["cached prompts"]
    print(f"speed-up (full sequences / cached prompts): {ratio:.2f}x; load at end {load()}")


if __name__ == "__main__":
    main()
