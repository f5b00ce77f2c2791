"""PEFT adapters as experts: LoRA and IA3 read as the task vectors PEFT's merge_and_unload makes,
merged alone or beside dense experts, and every adapter we cannot merge refused by name.

The reference is PEFT itself: each adapter is merged into its base with `merge_and_unload` and
saved as a dense expert; the adapter's task vector must equal (dense expert - base) per tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from supermerge.cli import main
from supermerge.errors import InputError
from supermerge.io.adapters import AdapterCheckpoint
from supermerge.io.checkpoint import Checkpoint
from tests.lm import byte_tokenizer, tiny_lm, write_lm

peft = pytest.importorskip("peft")


def make_adapter(base: Path, path: Path, config, seed: int) -> tuple[Path, Path]:
    """An adapter of `base` with random weights (both LoRA factors, IA3 vectors away from 1), and
    the dense expert PEFT's merge_and_unload makes of it: (adapter folder, dense folder)."""
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_l" in name or p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "ia3_l" in name else 0.0))
    model.save_pretrained(path)
    dense = write_lm(path.with_name(path.name + "-dense"), model.merge_and_unload(), byte_tokenizer())
    return path, dense


def lora(**overrides):
    settings = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16}, init_lora_weights=False,
    )  # fmt: skip
    return peft.LoraConfig(**(settings | overrides))


ADAPTERS: dict[str, Callable[[], object]] = {
    "lora_rank_and_alpha_patterns_embedding": lambda: lora(),
    "lora_rslora": lambda: lora(use_rslora=True),
    "lora_bias_all": lambda: lora(bias="all", target_modules=["q_proj", "o_proj"]),
    "lora_lm_head_saved_whole": lambda: lora(target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "ia3_with_feedforward": lambda: peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm(tmp_path_factory.mktemp("adapters") / "base", seed=0)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_adapter_task_vectors_equal_peft_merge_and_unload(base: Path, tmp_path: Path, kind: str) -> None:
    adapter, dense = make_adapter(base, tmp_path / kind, ADAPTERS[kind](), seed=1)
    base_ckpt = Checkpoint(base)
    ours, theirs = AdapterCheckpoint(adapter, base_ckpt), Checkpoint(dense)
    changed = 0
    for name in base_ckpt.names:
        want = theirs.read(name).float() - base_ckpt.read(name).float()
        got = ours.task_vector(name)
        scale = max(want.abs().max().item(), 1e-30)
        assert (got - want).abs().max().item() <= 1e-5 * scale + 1e-7, name
        assert torch.allclose(ours.read(name), theirs.read(name), rtol=1e-5, atol=1e-6), name
        changed += bool(want.abs().max() > 0)
    assert changed == len(ours.deltas)  # every tensor PEFT changed, and only those


def run_cli(*argv: str) -> int:
    return main(["-q", *argv])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "average"])
def test_merge_of_adapters_and_a_dense_expert_equals_the_merge_of_their_dense_experts(
    base: Path, tmp_path: Path, method: str
) -> None:
    lora_adapter, lora_dense = make_adapter(base, tmp_path / "lora", ADAPTERS["lora_rslora"](), seed=2)
    ia3_adapter, ia3_dense = make_adapter(base, tmp_path / "ia3", ADAPTERS["ia3_with_feedforward"](), seed=3)
    dense_expert = tiny_lm(tmp_path / "dense", seed=4)  # a full fine-tune, as far as merging goes
    params = {"name": method, **({"lambda": 0.7} if method != "average" else {})}
    params |= {"density": 0.5} if method == "ties" else {}

    def merge(experts: list[Path], out: Path) -> Checkpoint:
        doc = {
            "base": str(base),
            "experts": [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(experts)],
            "method": params,
            "output": str(out),
        }
        (tmp_path / "merge.yaml").write_text(yaml.safe_dump(doc))
        assert run_cli("merge", str(tmp_path / "merge.yaml")) == 0
        return Checkpoint(out)

    ours = merge([lora_adapter, ia3_adapter, dense_expert], tmp_path / "from_adapters")
    theirs = merge([lora_dense, ia3_dense, dense_expert], tmp_path / "from_dense")
    for name in theirs.names:
        a, b = ours.read(name).float(), theirs.read(name).float()
        assert (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0), name


def edit_config(adapter: Path, **changes) -> None:
    file = adapter / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"use_dora": True}, "use_dora is set"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported"),
        ({"auto_mapping": {"base_model_class": "GPT2LMHeadModel"}}, "made for another architecture"),
        ({"layer_replication": [[0, 2]]}, "layer_replication is set"),
    ],
    ids=["dora", "loha", "other_architecture", "layer_replication"],
)
def test_adapters_we_cannot_merge_are_refused_naming_the_field(
    base: Path, tmp_path: Path, change: dict, needle: str
) -> None:
    adapter, _ = make_adapter(base, tmp_path / "lora", ADAPTERS["lora_rslora"](), seed=5)
    edit_config(adapter, **change)
    with pytest.raises(InputError, match="adapter_config.json") as error:
        AdapterCheckpoint(adapter, Checkpoint(base))
    assert needle in str(error.value)


def test_an_adapter_of_another_shape_is_refused_naming_the_tensor(base: Path, tmp_path: Path) -> None:
    from tests.lm import tiny_config

    other = tmp_path / "wider"
    config = tiny_config()
    config.intermediate_size = 96
    from transformers import AutoModelForCausalLM

    write_lm(other, AutoModelForCausalLM.from_config(config), byte_tokenizer())
    adapter, _ = make_adapter(other, tmp_path / "lora", lora(target_modules=["down_proj"]), seed=6)
    with pytest.raises(InputError, match=r"down_proj.*update for 'model.layers.0.mlp.down_proj.weight'"):
        AdapterCheckpoint(adapter, Checkpoint(base))


def test_a_merge_with_a_bad_adapter_exits_2_with_one_line_and_writes_nothing(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    adapter, _ = make_adapter(base, tmp_path / "lora", ADAPTERS["lora_rslora"](), seed=7)
    edit_config(adapter, use_dora=True)
    doc = {
        "base": str(base),
        "experts": [{"name": "a", "path": str(adapter)}],
        "method": {"name": "task_arithmetic"},
        "output": str(tmp_path / "out"),
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(doc))
    capsys.readouterr()  # what making the adapter printed
    assert run_cli("merge", str(tmp_path / "merge.yaml")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use_dora is set" in err[0]
    assert not (tmp_path / "out").exists()
