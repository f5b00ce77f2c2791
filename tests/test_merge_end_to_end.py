"""`supermerge merge` end to end: sharded outputs that transformers loads, heads, dtypes, formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from supermerge.config import config_from_dict
from supermerge.io.checkpoint import Checkpoint
from supermerge.merge import run_merge
from tests.conftest import perturbed
from tests.minilm import finetune_minilm, minilm_dir


def tiny_bert(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    BertModel(config).save_pretrained(path)
    return path


def add_head(folder: Path, classes: int, seed: int) -> None:
    """Append a task-specific classifier to an expert's weights (as a fine-tune would)."""
    state = load_file(str(folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    state["classifier.weight"] = torch.randn(classes, state["pooler.dense.weight"].shape[0], generator=gen)
    state["classifier.bias"] = torch.randn(classes, generator=gen)
    save_file(state, str(folder / "model.safetensors"))


@pytest.fixture
def bert_models(tmp_path: Path) -> tuple[Path, list[Path]]:
    base = tiny_bert(tmp_path / "base")
    state = load_file(str(base / "model.safetensors"))
    experts = []
    for i in range(3):
        folder = tmp_path / f"expert{i}"
        folder.mkdir()
        save_file(perturbed(state, seed=10 + i), str(folder / "model.safetensors"))
        (folder / "config.json").write_bytes((base / "config.json").read_bytes())
        add_head(folder, classes=2 + i, seed=i)
        experts.append(folder)
    return base, experts


def merge(tmp_path: Path, base: Path, experts: list[Path], **fields):
    doc = {
        "base": str(base),
        "experts": [{"name": p.name, "path": str(p)} for p in experts],
        "method": {"name": "task_arithmetic", "lambda": 0.3},
        "heads": ["classifier.*"],
        "output": str(tmp_path / "merged"),
    } | fields
    cfg = config_from_dict(doc, tmp_path)
    return cfg, run_merge(cfg, progress=False)


def test_sharded_output_loads_in_transformers_with_the_merged_values(tmp_path, bert_models) -> None:
    from transformers import AutoModel

    base, experts = bert_models
    cfg, summary = merge(tmp_path, base, experts, shard_size="20KB")
    files = sorted(p.name for p in cfg.output.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "config.json" in files
    model, info = AutoModel.from_pretrained(cfg.output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    b, es = Checkpoint(base), [Checkpoint(e) for e in experts]
    for name, param in model.state_dict().items():
        ref = b.read(name).double() + 0.3 * sum(e.read(name).double() - b.read(name).double() for e in es)
        torch.testing.assert_close(param.double(), ref, rtol=1e-5, atol=1e-6, msg=name)
    assert summary.tensors == len(b.names) and summary.bytes_read > 3 * b.size_bytes()
    assert summary.bytes_written >= b.size_bytes() and summary.peak_rss_bytes > 0


def test_each_expert_head_is_kept_unmerged(tmp_path, bert_models) -> None:
    base, experts = bert_models
    cfg, _ = merge(tmp_path, base, experts)
    for i, expert in enumerate(experts):
        head = load_file(str(cfg.output / "heads" / f"{expert.name}.safetensors"))
        own = load_file(str(expert / "model.safetensors"))
        assert head["classifier.weight"].shape == (2 + i, 32)
        assert torch.equal(head["classifier.weight"], own["classifier.weight"])
    assert "classifier.weight" not in Checkpoint(cfg.output).names


def test_output_dtype_and_record(tmp_path, bert_models) -> None:
    base, experts = bert_models
    cfg, _ = merge(tmp_path, base, experts, dtype="bfloat16", method={"name": "ties", "density": 0.4})
    out = Checkpoint(cfg.output)
    assert {out.infos[n].dtype for n in out.names if "position_ids" not in n} == {torch.bfloat16}
    record = json.loads((cfg.output / "supermerge_merge.json").read_text())
    assert record["config"]["method"] == {"name": "ties", "density": 0.4}
    assert record["summary"]["tensors"] == len(out.names)


def test_state_dict_and_safetensors_file_inputs_give_the_same_merge(tmp_path, base_state) -> None:
    experts = [perturbed(base_state, seed=i) for i in range(2)]
    torch.save(base_state, tmp_path / "base.pt")
    for i, e in enumerate(experts):
        save_file(e, str(tmp_path / f"e{i}.safetensors"))
    cfg, _ = merge(tmp_path, tmp_path / "base.pt", [tmp_path / f"e{i}.safetensors" for i in range(2)])
    merged = Checkpoint(cfg.output)
    for name, b in base_state.items():
        ref = b + 0.3 * sum(e[name] - b for e in experts)
        torch.testing.assert_close(merged.read(name), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_real_minilm_experts_merge_into_a_loadable_model(tmp_path) -> None:
    from transformers import AutoModel, AutoTokenizer

    src = minilm_dir()
    food = ["I ate a bowl of rice.", "The pizza was hot.", "She won the match.", "He scored a goal."]
    questions = ["Where is the station?", "It is raining.", "Why did it fail?", "The door is open."]
    finetune_minilm(src, tmp_path / "food", food, [0, 0, 1, 1], seed=0)
    finetune_minilm(src, tmp_path / "question", questions, [1, 0, 1, 0], seed=1)
    cfg, _ = merge(
        tmp_path,
        src,
        [tmp_path / "food", tmp_path / "question"],
        method={"name": "ties", "density": 0.5, "lambda": 1.0},
    )
    merged, info = AutoModel.from_pretrained(cfg.output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = AutoModel.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(cfg.output)  # tokenizer files are carried along
    batch = tok(["A man is eating food."], return_tensors="pt")
    with torch.no_grad():
        m, b = merged(**batch).last_hidden_state, base(**batch).last_hidden_state
    assert not torch.equal(m, b)
    assert torch.nn.functional.cosine_similarity(m.flatten(), b.flatten(), dim=0) > 0.9
    assert (cfg.output / "heads" / "food.safetensors").is_file()
