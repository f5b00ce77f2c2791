"""Tiny random causal LMs on disk (Llama tied and untied, Qwen2) with a byte-level tokenizer, their
experts, and generative task files: the whole causal-LM path in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 256  # 253 bytes-as-tokens' worth of the byte alphabet + 3 specials (ids 0..2)
SPECIALS = ("<pad>", "<s>", "</s>")


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte one token, ids 3..258 clipped to the
    vocabulary (bytes above 252 never occur in the tests' ASCII text); <pad>=0, <s>=1 (BOS, added
    to every text), </s>=2 (EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    printable = sorted(alphabet)[: VOCAB - len(SPECIALS)]
    vocab = {t: i for i, t in enumerate(SPECIALS)} | {c: i + len(SPECIALS) for i, c in enumerate(printable)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" + (
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def tiny_config(family: str = "llama", tied: bool = False, layers: int = 2):
    """A transformers config of a 2-layer model with a 256-token vocabulary."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return Qwen2Config(**common) if family == "qwen2" else LlamaConfig(**common)


def write_lm(path: Path, model, tokenizer) -> Path:
    """Save a model and the tokenizer as a Hugging Face folder (model.safetensors)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_lm(
    path: Path, seed: int, family: str = "llama", tied: bool = False, dtype: torch.dtype = torch.float32
) -> Path:
    """A random tiny causal LM folder (fresh weights from `seed`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied)).to(dtype)
    return write_lm(path, model, byte_tokenizer())


def lm_expert(base: Path, path: Path, seed: int, scale: float = 0.05) -> Path:
    """An 'expert' of `base`: every weight plus a random task vector of relative size `scale`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return write_lm(path, model, AutoTokenizer.from_pretrained(base))


def write_completion_task(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def choice_task(path: Path, seed: int, n: int = 12, split: bool = False) -> Path:
    """A task scored by choices: 'word? -> yes / no' rows (all validation unless `split`)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        answer = ["yes", "no"][int(torch.randint(2, (1,), generator=gen))]
        row = {"prompt": f"is {i} {answer}?", "completion": f" {answer}", "choices": [" yes", " no"]}
        if split:
            row["split"] = ("train", "test")[i % 2]
        rows.append(row)
    return write_completion_task(path, rows)


def generation_task(path: Path, seed: int, n: int = 12) -> Path:
    """A task scored by exact match: 'copy: abc ->' rows with the text as the completion."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        word = "".join(chr(97 + int(c)) for c in torch.randint(26, (3,), generator=gen))
        rows.append({"prompt": f"copy {word}:", "completion": f" {word}"})
    return write_completion_task(path, rows)
