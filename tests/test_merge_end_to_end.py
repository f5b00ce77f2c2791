"""`supermerge merge` end to end: sharded outputs that transformers loads, heads, dtypes, formats;
the model card and the recorded config (rerun to the same tensors, training-free and learned);
per-tensor parameter settings, slices, compute_dtype, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
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


def cli(*argv: str) -> None:
    from supermerge.cli import main

    assert main(["-q", *argv]) == 0


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {n: ckpt.read(n) for n in ckpt.names}


def assert_same_tensors(a: Path, b: Path) -> None:
    ours, theirs = tensors(a), tensors(b)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def write_doc(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_every_output_carries_a_model_card_and_the_config_that_made_it(tmp_path, bert_models) -> None:
    from supermerge import __version__
    from supermerge.config import load_config

    base, experts = bert_models
    cfg, _ = merge(tmp_path, base, experts, method={"name": "ties", "density": 0.4, "lambda": 0.8})
    card = (cfg.output / "README.md").read_text()
    _, metadata, body = card.split("---\n", 2)
    assert yaml.safe_load(metadata)["tags"] == ["merge", "supermerge"]
    assert "Method: `ties` (density: 0.4, lambda: 0.8)" in body and f"supermerge {__version__}" in body
    for expert in experts:
        assert f"| {expert.name} | `{expert}` |" in body
    recorded = load_config(cfg.output / "supermerge_config.yaml")
    assert recorded.record() == cfg.record() and recorded.output == cfg.output
    assert json.loads((cfg.output / "supermerge_merge.json").read_text())["config"] == cfg.record()


def test_recorded_config_reruns_to_the_same_tensors(tmp_path, make_models) -> None:
    base, experts = make_models(k=2)
    doc = {
        "base": "base",  # relative paths: recorded absolute
        "experts": [
            {"name": "a", "path": "expert0", "weight": [0.2, 1.0]},
            {"name": "b", "path": "expert1", "weight": [{"filter": "bias", "value": 0.5}, {"value": 1.5}]},
        ],
        "method": {
            "name": "task_arithmetic",
            "lambda": [{"filter": "embed", "value": 0.1}, {"value": [1, 0.5]}],
        },
        "output": "first",
    }
    cli("merge", str(write_doc(tmp_path / "merge.yaml", doc)))
    cli("merge", str(tmp_path / "first" / "supermerge_config.yaml"), str(tmp_path / "again"))
    assert_same_tensors(tmp_path / "again", tmp_path / "first")


def test_recorded_config_of_a_learned_merge_reruns_to_the_same_tensors(tmp_path) -> None:
    from supermerge.demo.toy import FACTORY, build_toy_suite

    toy = build_toy_suite(tmp_path / "suite", seed=5, n_val=32, n_test=1)
    doc = {
        "base": str(toy.base),
        "experts": [{"name": t, "path": str(p)} for t, p in toy.experts.items()],
        "data_dir": str(toy.validation[next(iter(toy.validation))].parent),
        "method": {"name": "supermerge", "steps": 3, "lr": 0.05, "validation_size": 32, "impl": "torch"},
        "model": {"kind": "torch_module", "factory": FACTORY},
        "heads": ["head.*"],
        "output": str(tmp_path / "first"),
    }
    cli("merge", str(write_doc(tmp_path / "merge.yaml", doc)))
    recorded = yaml.safe_load((tmp_path / "first" / "supermerge_config.yaml").read_text())
    assert {e["name"]: e["data"] for e in recorded["experts"]} == {
        t: str(p) for t, p in toy.validation.items()
    }
    cli("merge", str(tmp_path / "first" / "supermerge_config.yaml"), str(tmp_path / "again"))
    assert_same_tensors(tmp_path / "again", tmp_path / "first")
    for task in toy.experts:
        assert (tmp_path / "again" / "heads" / f"{task}.safetensors").is_file()


def test_out_path_on_the_command_line_overrides_the_configs_output(tmp_path, make_models, write_yaml) -> None:
    base, experts = make_models(k=2)
    cli("merge", str(write_yaml(base, experts)), str(tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / "model.safetensors").is_file() and not (tmp_path / "merged").exists()


def test_parameter_settings_resolve_per_tensor_by_filter_and_depth(tmp_path, make_models, base_state) -> None:
    """lambda 0 on biases, else 0.2 -> 1.0 over the two layers (t = 0, 1), 0.2 outside them."""
    base, experts = make_models(k=2)
    lam = [{"filter": "bias", "value": 0}, {"value": [0.2, 1.0]}]
    doc = {
        "base": str(base),
        "experts": [{"path": str(p)} for p in experts],
        "method": {"name": "task_arithmetic", "lambda": lam},
        "output": str(tmp_path / "out"),
    }
    cli("merge", str(write_doc(tmp_path / "merge.yaml", doc)))
    expected_lambda = {
        "embed.weight": 0.2,
        "layer.0.linear.weight": 0.2,
        "layer.0.linear.bias": 0.0,
        "layer.1.linear.weight": 1.0,
        "layer.1.norm.weight": 1.0,
    }
    out, mine = tensors(tmp_path / "out"), [tensors(p) for p in experts]
    for name, b in base_state.items():
        ref = b + expected_lambda[name] * sum(e[name] - b for e in mine)
        torch.testing.assert_close(out[name], ref, rtol=1e-6, atol=1e-6, msg=name)


def layered_state(seed: int, layers: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(10, 4, generator=gen)}
    for i in range(layers):
        state[f"model.layers.{i}.mlp.weight"] = torch.randn(4, 4, generator=gen)
        state[f"model.layers.{i}.norm.weight"] = torch.randn(4, generator=gen)
    state["model.norm.weight"] = torch.randn(4, generator=gen)
    state["lm_head.weight"] = torch.randn(10, 4, generator=gen)
    return state


def test_slices_stack_layer_ranges_renamed_in_place_with_the_layer_count(tmp_path, seed) -> None:
    from tests.conftest import write_folder

    config = {"model_type": "toy", "hidden_size": 4, "num_hidden_layers": 4}
    states = {n: layered_state(seed + i, 4) for i, n in enumerate(("base", "a", "b"))}
    folders = {n: write_folder(tmp_path / n, s, config) for n, s in states.items()}
    doc = {
        "base": str(folders["base"]),
        "experts": [{"name": n, "path": str(folders[n])} for n in ("a", "b")],
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 3]}]},
            {"sources": [{"model": "b", "layer_range": [1, 4]}], "scale": [{"filter": "mlp", "value": 0.5}]},
        ],
        "method": {"name": "passthrough"},
        "output": str(tmp_path / "out"),
    }
    cli("merge", str(write_doc(tmp_path / "merge.yaml", doc)))
    out = tensors(tmp_path / "out")
    a, b = states["a"], states["b"]
    expected = {"model.embed_tokens.weight": a["model.embed_tokens.weight"]}
    for i in range(3):
        for part in ("mlp", "norm"):
            expected[f"model.layers.{i}.{part}.weight"] = a[f"model.layers.{i}.{part}.weight"]
            scale = 0.5 if part == "mlp" else 1.0
            expected[f"model.layers.{3 + i}.{part}.weight"] = b[f"model.layers.{1 + i}.{part}.weight"] * scale
    expected |= {n: b[n] for n in ("model.norm.weight", "lm_head.weight")}
    assert out.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(out[name], tensor), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_compute_dtype_rounds_the_inputs_and_fp32_stays_the_default(tmp_path, make_models) -> None:
    """average of fp32 models: by default from the fp32 weights; with compute_dtype bfloat16 from
    the weights rounded to bfloat16 (as mergekit loads them), either way in fp32 arithmetic."""
    base, experts = make_models(k=2)
    mine = [tensors(p) for p in experts]
    for compute in (None, "bfloat16"):
        doc = {
            "base": str(base),
            "experts": [{"path": str(p)} for p in experts],
            "method": {"name": "average"},
            "compute_dtype": compute,
            "output": str(tmp_path / f"out-{compute}"),
        }
        cli("merge", str(write_doc(tmp_path / "merge.yaml", doc)))
        out = tensors(tmp_path / f"out-{compute}")
        for name, tensor in out.items():
            inputs = [e[name] if compute is None else e[name].bfloat16().float() for e in mine]
            torch.testing.assert_close(tensor, (inputs[0] + inputs[1]) / 2, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(tensors(tmp_path / "out-None")[n], t) for n, t in out.items())


def test_tokenizer_names_the_model_whose_tokenizer_files_the_output_carries(tmp_path, make_models) -> None:
    base, experts = make_models(k=2)
    for i, folder in enumerate([base, *experts]):
        (folder / "vocab.txt").write_text("[UNK]\nhello\nworld\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 100 + i}))
    doc = {
        "base": str(base),
        "experts": [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(experts)],
        "method": "average",
        "tokenizer": "e1",
        "output": str(tmp_path / "out"),
    }
    cli("merge", str(write_doc(tmp_path / "merge.yaml", doc)))
    carried = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert carried == {"model_max_length": 102}
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
