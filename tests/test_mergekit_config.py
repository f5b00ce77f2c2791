"""mergekit configs as they are: `supermerge merge CONFIG OUT` against mergekit 0.1.5's own run.

Real-world-shaped mergekit YAML (slerp with per-layer gradients and filters, ties and dare_ties
with per-model densities and weights, della, model_stock, a passthrough layer stack, linear
without a base_model) on tiny Llama folders (6 layers, with a tokenizer), run unchanged through
the CLI and through mergekit's `run_merge` on the same file; every tensor compared (1e-5
relative in fp32, bit for bit where mergekit computes in bfloat16).

Seeded methods (dare_ties, della) draw their masks from torch's global generator in mergekit, in
its graph's order; here mergekit's `sparsify` is wrapped so that it calls `torch.manual_seed`
with the seed supermerge derives for the same (expert, tensor) before each expert's mask (as
tests/test_mergekit_parity.py does per tensor), so whole models compare tensor for tensor.

Also: the native YAML `supermerge convert` writes merges to the same tensors; the config every
output records reruns to the same output (training-free and learned); the model card; refused
input (unknown field, union tokenizer, LoRA reference, missing output path).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from supermerge.cli import main
from supermerge.io.checkpoint import Checkpoint
from supermerge.methods.base import tensor_seed

LAYERS = 6
EXPERTS = ("code", "math", "chat")
DELTA_SCALE = 2e-3  # std of a task vector, ~10% of the base weights' std (0.02)
REL_TOL = 1e-5  # max |ours - mergekit| / max |mergekit| per tensor (fp32)


@dataclass(frozen=True)
class Family:
    """Tiny Llama folders (model.safetensors, config.json, a tokenizer): a base and three experts."""

    base: Path
    experts: dict[str, Path]

    def paths(self) -> dict[str, str]:
        return {"base": str(self.base), **{n: str(p) for n, p in self.experts.items()}}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer of `vocab_size` tokens (what mergekit copies or rebuilds)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)


def build_family(root: Path, dtype: torch.dtype, seed: int = 3) -> Family:
    """Base: weights ~ N(0, 0.02^2), norms ~ 1 + N(0, 0.02^2); expert = base + N(0, 2e-3^2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02 + ("norm" in name))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    folders = {}
    for name in ("base", *EXPERTS):
        if name != "base":
            with torch.no_grad():
                for n, param in model.named_parameters():
                    param.copy_(base[n] + torch.randn(param.shape, generator=generator) * DELTA_SCALE)
        model.to(dtype).save_pretrained(root / name)
        model.float()
        write_tokenizer(root / name, config.vocab_size)
        folders[name] = root / name
    return Family(folders.pop("base"), folders)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return build_family(tmp_path_factory.mktemp("tiny_llama"), torch.float32)


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """The same family stored in bfloat16, as most published models are."""
    return build_family(tmp_path_factory.mktemp("tiny_llama_bf16"), torch.bfloat16)


# Real-world-shaped configs: {base}, {code}, {math}, {chat} are the tiny folders.
CONFIGS = {
    "slerp_gradients_and_filters": """
slices:
  - sources:
      - model: {code}
        layer_range: [0, 6]
      - model: {math}
        layer_range: [0, 6]
merge_method: slerp
base_model: {code}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "ties_per_model_density_and_weight": """
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {code}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {math}
    parameters:
      density: [1, 0.7, 0.1]
      weight: [0, 0.3, 0.7, 1]
  - model: {chat}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""",
    "dare_ties_per_model_density_and_weight": """
models:
  - model: {base}
  - model: {code}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {math}
    parameters:
      density: 0.53
      weight: 0.3
  - model: {chat}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: float32
tokenizer_source: base
""",
    "della_per_model_density_and_weight": """
models:
  - model: {code}
    parameters:
      weight: 1
      density: 0.7
  - model: {math}
    parameters:
      weight: 0.5
      density: 0.4
merge_method: della
base_model: {base}
parameters:
  epsilon: 0.1
  lambda: 1.0
  normalize: true
dtype: float32
""",
    "della_linear_per_model_epsilon": """
models:
  - model: {code}
    parameters:
      weight: 1.0
      density: 0.7
      epsilon: 0.2
  - model: {math}
    parameters:
      weight: 0.6
      density: 0.4
      epsilon: 0.05
merge_method: della_linear
base_model: {base}
dtype: float32
""",
    "breadcrumbs_per_model_gamma": """
models:
  - model: {code}
    parameters:
      weight: 1.0
      density: 0.7
      gamma: 0.05
  - model: {math}
    parameters:
      weight: 0.5
      density: 0.5
      gamma: [0.0, 0.2]
  - model: {chat}
    parameters:
      weight: 0.8
      density: 0.9
merge_method: breadcrumbs_ties
base_model: {base}
dtype: float32
""",
    "model_stock": """
models:
  - model: {code}
  - model: {math}
  - model: {chat}
merge_method: model_stock
base_model: {base}
dtype: float32
""",
    "passthrough_layer_stack": """
slices:
  - sources:
    - model: {code}
      layer_range: [0, 4]
  - sources:
    - model: {math}
      layer_range: [2, 6]
merge_method: passthrough
dtype: float32
""",
    "passthrough_self_stack_scaled_projections": """
slices:
  - sources:
    - model: {chat}
      layer_range: [0, 4]
  - sources:
    - model: {chat}
      layer_range: [2, 6]
      parameters:
        scale:
          - filter: o_proj
            value: 0.0
          - filter: down_proj
            value: 0.0
          - value: 1.0
merge_method: passthrough
dtype: float32
""",
    "linear_without_base_model": """
models:
  - model: {code}
    parameters:
      weight: 1.0
  - model: {math}
    parameters:
      weight: 0.5
  - model: {chat}
    parameters:
      weight: [0.2, 1.0]
merge_method: linear
dtype: float32
""",
    "ties_in_a_slice_with_per_source_parameters": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 6]
      - model: {code}
        layer_range: [0, 6]
        parameters:
          density: 0.5
          weight: [0.2, 0.8]
      - model: {math}
        layer_range: [0, 6]
        parameters:
          density: 0.4
          weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: true
dtype: float32
""",
    "task_arithmetic_two_slices_of_shifted_ranges": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
      - model: {code}
        layer_range: [0, 3]
        parameters:
          weight: 1.0
  - sources:
      - model: {base}
        layer_range: [2, 6]
      - model: {math}
        layer_range: [1, 5]
        parameters:
          weight:
            - filter: layers.2.
              value: 2.0
            - value: 0.5
    parameters:
      lambda: [0.5, 1.0]
merge_method: task_arithmetic
base_model: {base}
dtype: float32
""",
    "nuslerp_without_base_model": """
models:
  - model: {code}
    parameters:
      weight: 0.3
  - model: {math}
    parameters:
      weight: 0.7
merge_method: nuslerp
parameters:
  nuslerp_flatten: false
dtype: float32
""",
    "karcher_with_base_model_as_one_more_model": """
models:
  - model: {code}
  - model: {math}
merge_method: karcher
base_model: {base}
parameters:
  max_iter: 20
dtype: float32
""",
}
# mergekit computes in its `dtype`: these give its bfloat16 tensors bit for bit
BF16_CONFIGS = {
    "task_arithmetic_bf16": """
models:
  - model: {code}
    parameters:
      weight: 0.7
  - model: {math}
    parameters:
      weight: 0.3
merge_method: task_arithmetic
base_model: {base}
parameters:
  lambda: 0.9
dtype: bfloat16
""",
    "ties_bf16": """
models:
  - model: {code}
    parameters:
      density: 0.5
      weight: 0.7
  - model: {math}
    parameters:
      density: 0.3
      weight: 0.3
  - model: {chat}
    parameters:
      density: 0.6
      weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
""",
    "dare_ties_bf16": """
models:
  - model: {base}
  - model: {code}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {math}
    parameters:
      density: 0.6
      weight: 0.35
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: bfloat16
""",
}


def write_config(folder: Path, text: str, models: Family) -> Path:
    path = folder / "mergekit.yaml"
    path.write_text(text.format(**models.paths()))
    return path


def mergekit_merge(config: Path, out: Path) -> Path:
    """mergekit's run on the config file, as `mergekit-yaml CONFIG OUT` runs it (CPU, offline)."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(write_model_card=False, quiet=True, lazy_unpickle=True)
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(config.read_text())), str(out), options=options
    )
    return out


@pytest.fixture
def seeded_mergekit(monkeypatch: pytest.MonkeyPatch) -> None:
    """mergekit's random sparsification seeded per (expert, tensor) as supermerge seeds it (seed 0;
    the experts are named after their folders)."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    draw = gta.sparsify
    merge_group = gta.GeneralizedTaskArithmeticMerge.merge_group

    def seeded_merge_group(self, group, **parameters):
        order: Iterator[str] = iter([Path(e.id.model.path).name for e in group.non_base])

        def sparsify(tensor: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            torch.manual_seed(tensor_seed(0, next(order), group.metadata.name))
            return draw(tensor, **kwargs)

        monkeypatch.setattr(gta, "sparsify", sparsify)
        try:
            return merge_group(self, group, **parameters)
        finally:
            monkeypatch.setattr(gta, "sparsify", draw)

    monkeypatch.setattr(gta.GeneralizedTaskArithmeticMerge, "merge_group", seeded_merge_group)


def supermerge(*argv: str) -> None:
    assert main(["-q", *argv]) == 0


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = theirs.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((ours.double() - theirs.double()).abs().max() / scale).item()


def compare(ours_dir: Path, theirs_dir: Path, exact: bool = False) -> float:
    """Every tensor of two outputs (same names, shapes, dtypes): the largest relative error, each
    at most REL_TOL (bit for bit when `exact`)."""
    ours, theirs = Checkpoint(ours_dir), Checkpoint(theirs_dir)
    assert sorted(ours.names) == sorted(theirs.names)
    worst = 0.0
    for name in theirs.names:
        a, b = ours.read(name), theirs.read(name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if exact:
            assert torch.equal(a, b), f"{name}: {(a.double() - b.double()).abs().max().item():.3g} off"
        error = relative_error(a, b)
        assert error <= REL_TOL, f"{name}: relative error {error:.3g}"
        worst = max(worst, error)
    return worst


def needs(method: str) -> None:
    from supermerge.methods import REGISTRY

    if method not in REGISTRY:
        pytest.skip(f"method '{method}' is not registered yet")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CONFIGS))
def test_real_world_mergekit_config_runs_unchanged_to_mergekits_tensors(
    family: Family, tmp_path: Path, case: str, seeded_mergekit: None, record_property: pytest.RecordProperty
) -> None:
    text = CONFIGS[case]
    needs({"linear": "average"}.get(method := yaml.safe_load(text)["merge_method"], method))
    config = write_config(tmp_path, text, family)
    theirs = mergekit_merge(config, tmp_path / "mergekit")
    supermerge("merge", str(config), str(tmp_path / "supermerge"))
    record_property("max_rel_err", compare(tmp_path / "supermerge", theirs))
    ours_config = json.loads((tmp_path / "supermerge" / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    assert ours_config["num_hidden_layers"] == their_config["num_hidden_layers"]


@pytest.mark.slow
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=["fp32_storage", "bf16_storage"])
@pytest.mark.parametrize("case", list(BF16_CONFIGS))
def test_bf16_merge_is_mergekits_bit_for_bit(
    request: pytest.FixtureRequest, tmp_path: Path, case: str, storage: torch.dtype, seeded_mergekit: None
) -> None:
    from supermerge.methods import REGISTRY

    if not getattr(REGISTRY["ties"], "computes_in_dtype", False):
        pytest.skip("the task-arithmetic methods do not compute in the merge dtype yet (computes_in_dtype)")
    models = request.getfixturevalue("family" if storage == torch.float32 else "bf16_family")
    config = write_config(tmp_path, BF16_CONFIGS[case], models)
    theirs = mergekit_merge(config, tmp_path / "mergekit")
    supermerge("merge", str(config), str(tmp_path / "supermerge"))
    compare(tmp_path / "supermerge", theirs, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=["fp32_storage", "bf16_storage"])
def test_bf16_slerp_with_gradients_is_mergekits_to_its_rounding(
    request: pytest.FixtureRequest, tmp_path: Path, storage: torch.dtype
) -> None:
    """slerp computes in fp32 on the rounded models in both tools; only fp32 rounding noise may
    move an element to the next bfloat16 value (or off a cancellation to about 0)."""
    models = request.getfixturevalue("family" if storage == torch.float32 else "bf16_family")
    text = CONFIGS["slerp_gradients_and_filters"].replace("dtype: float32", "dtype: bfloat16")
    config = write_config(tmp_path, text, models)
    theirs = Checkpoint(mergekit_merge(config, tmp_path / "mergekit"))
    supermerge("merge", str(config), str(tmp_path / "supermerge"))
    ours = Checkpoint(tmp_path / "supermerge")
    differ = total = 0
    for name in theirs.names:
        a, b = ours.read(name), theirs.read(name)
        assert a.dtype == b.dtype == torch.bfloat16
        step = (torch.finfo(torch.bfloat16).eps * b.double().abs()).clamp_min(1e-6 * b.double().abs().max())
        assert ((a.double() - b.double()).abs() <= step).all(), name
        differ, total = differ + int((a != b).sum()), total + b.numel()
    assert differ <= total * 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CONFIGS))
def test_converted_native_config_merges_to_the_same_tensors(
    family: Family, tmp_path: Path, case: str
) -> None:
    text = CONFIGS[case]
    needs({"linear": "average"}.get(method := yaml.safe_load(text)["merge_method"], method))
    config = write_config(tmp_path, text, family)
    supermerge("merge", str(config), str(tmp_path / "direct"))
    supermerge("convert", str(config), str(tmp_path / "native.yaml"), "--output", str(tmp_path / "converted"))
    native = yaml.safe_load((tmp_path / "native.yaml").read_text())
    assert "merge_method" not in native and native["output"] == str(tmp_path / "converted")
    supermerge("merge", str(tmp_path / "native.yaml"))
    compare(tmp_path / "converted", tmp_path / "direct", exact=True)


@pytest.mark.slow
def test_recorded_config_of_a_mergekit_merge_reruns_to_the_same_output(
    family: Family, tmp_path: Path
) -> None:
    config = write_config(tmp_path, CONFIGS["passthrough_self_stack_scaled_projections"], family)
    supermerge("merge", str(config), str(tmp_path / "first"))
    supermerge("merge", str(tmp_path / "first" / "supermerge_config.yaml"), str(tmp_path / "again"))
    compare(tmp_path / "again", tmp_path / "first", exact=True)
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()


def test_model_card_names_method_parameters_experts_sources_and_version(
    family: Family, tmp_path: Path
) -> None:
    from supermerge import __version__

    config = write_config(tmp_path, CONFIGS["ties_per_model_density_and_weight"], family)
    supermerge("merge", str(config), str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    head, metadata, body = card.split("---\n", 2)
    assert head == "" and yaml.safe_load(metadata) == {
        "base_model": [],
        "tags": ["merge", "supermerge"],
        "library_name": "transformers",
    }
    assert "Method: `ties` (normalize: true)" in body and f"supermerge {__version__}" in body
    assert f"Base model: `{family.base}`" in body
    assert f"| math | `{family.experts['math']}` | density: [1, 0.7, 0.1], weight: [0, 0.3, 0.7, 1] |" in body
    recorded = (tmp_path / "out" / "supermerge_config.yaml").read_text()
    assert recorded.rstrip() in card


def test_model_card_lists_hub_ids_of_models_in_the_hub_cache(family: Family, tmp_path: Path) -> None:
    import shutil

    cache = tmp_path / "hub" / "models--acme--tiny-base" / "snapshots" / "0123abc"
    shutil.copytree(family.base, cache)
    text = CONFIGS["model_stock"].replace("{base}", str(cache))
    config = write_config(tmp_path, text, family)
    supermerge("merge", str(config), str(tmp_path / "out"))
    metadata = (tmp_path / "out" / "README.md").read_text().split("---\n")[1]
    assert yaml.safe_load(metadata)["base_model"] == ["acme/tiny-base"]


def mergekit_evaluate(setting: Any, tensor: str, t: float) -> Any:
    pytest.importorskip("mergekit")
    from mergekit.config import ParameterSetting, evaluate_setting
    from pydantic import TypeAdapter

    return evaluate_setting(tensor, TypeAdapter(ParameterSetting).validate_python(setting), t, validate=float)


def random_setting(gen: torch.Generator) -> Any:
    """A scalar, a gradient of 1 to 6 stops, or 1 to 3 filters (some matching every name)."""

    def number() -> float:
        return round(torch.rand((), generator=gen).item() * 4 - 2, 3)

    def gradient_or_scalar() -> Any:
        n = int(torch.randint(0, 7, (), generator=gen))
        return number() if n == 0 else [number() for _ in range(n)]

    kind = int(torch.randint(0, 3, (), generator=gen))
    if kind < 2:
        return gradient_or_scalar() if kind else number()
    filters = ["self_attn", "mlp", "q_proj", "layers.1.", "*", None, "norm"]
    conditions = []
    for _ in range(int(torch.randint(1, 4, (), generator=gen))):
        chosen = filters[int(torch.randint(0, len(filters), (), generator=gen))]
        conditions.append({"value": gradient_or_scalar(), **({"filter": chosen} if chosen else {})})
    return conditions


def test_settings_resolve_as_mergekits_evaluate_setting(gen: torch.Generator) -> None:
    from supermerge.methods.settings import evaluate, parse_setting

    names = [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.3.mlp.up_proj.weight",
        "model.norm.weight",
    ]
    for _ in range(300):
        raw = random_setting(gen)
        setting = parse_setting(raw, "t")
        for name in names:
            t = torch.rand((), generator=gen).item() if torch.rand((), generator=gen) < 0.8 else 1.0
            assert evaluate(setting, name, t) == mergekit_evaluate(raw, name, t), (raw, name, t)


def assert_refused(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> None:
    """Exit code 2, one line `supermerge: error: ...` holding every needle, no output folder."""
    code = main(["-q", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("supermerge: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    if len(argv) > 2 and argv[0] == "merge":
        assert not Path(argv[2]).exists()


TIES = CONFIGS["ties_per_model_density_and_weight"]
BAD_CONFIGS = {  # (config text, what the error must say)
    "unknown_field": (TIES + "foo: 1\n", ["field 'foo'", "unknown field"]),
    "union_tokenizer": (TIES + "tokenizer_source: union\n", ["field 'tokenizer_source'", "union"]),
    "lora_reference": (
        TIES.replace("model: {math}", "model: {math}+{chat}"),
        ["field 'models[2].model'", "LoRA", "not supported"],
    ),
    "lora_reference_in_a_slice": (
        CONFIGS["passthrough_layer_stack"].replace("model: {math}", "model: {math}+/loras/x"),
        ["field 'slices[1].sources[0].model'", "LoRA"],
    ),
    "hub_id_that_is_no_folder": (
        TIES.replace("model: {chat}", "model: acme/not-here"),
        ["field 'models[3].model'", "does not download"],
    ),
    "revision": (
        TIES.replace("model: {code}", "model: {code}@main"),
        ["field 'models[1].model'", "revision"],
    ),
    "modules": (
        "modules:\n  text:\n    models:\n      - model: {code}\nmerge_method: linear\n",
        ["field 'modules'", "not supported"],
    ),
    "tokenizer_block": (TIES + "tokenizer:\n  source: base\n", ["field 'tokenizer'", "tokenizer_source"]),
    "models_and_slices": (
        TIES + "slices:\n  - sources:\n      - model: {code}\n        layer_range: [0, 6]\n",
        ["field 'models'", "either models or slices"],
    ),
    "unsupported_method": (
        TIES.replace("merge_method: ties", "merge_method: arcee_fusion"),
        ["field 'merge_method'", "'arcee_fusion' is not supported"],
    ),
    "ties_without_base_model": (
        TIES.replace("base_model: {base}", "").replace("  - model: {base}\n", ""),
        ["field 'base_model'", "needs a base_model"],
    ),
    "unknown_model_parameter": (
        TIES.replace("density: 0.5\n", "density: 0.5\n      densty: 0.4\n"),
        ["field 'models[1].parameters.densty'", "unknown parameter"],
    ),
    "gradient_stop_out_of_range": (
        TIES.replace("density: [1, 0.7, 0.1]", "density: [1, 0.7, 1.5]"),
        ["field 'models[2].parameters.density'", "1.5"],
    ),
    "unknown_filter_key": (
        CONFIGS["slerp_gradients_and_filters"].replace("- filter: mlp", "- filtr: mlp"),
        ["field 'parameters.t[1].filtr'", "unknown field"],
    ),
    "bad_method_parameter": (
        TIES.replace("normalize: true", "normalise: true"),
        ["field 'parameters.normalise'"],
    ),
    "float64": (TIES.replace("dtype: float32", "dtype: float64"), ["field 'dtype'", "float64"]),
    "passthrough_of_two_sources": (
        CONFIGS["slerp_gradients_and_filters"].replace("merge_method: slerp", "merge_method: passthrough"),
        ["field 'slices[0].sources'", "one source per slice"],
    ),
    "slerp_slice_without_the_base": (
        CONFIGS["slerp_gradients_and_filters"].replace("base_model: {code}", "base_model: {chat}"),
        ["field 'slices[0].sources'", "base_model among the sources"],
    ),
    "layer_range_past_the_model": (
        CONFIGS["passthrough_layer_stack"].replace("[2, 6]", "[4, 8]"),
        ["math: no layer 6", "slices[1].sources[0].layer_range is [4, 8]; it has 6"],
    ),
    "tokenizer_of_a_model_not_merged": (
        TIES + "tokenizer_source: /elsewhere/model\n",
        ["field 'tokenizer_source'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_mergekit_config_is_one_line_naming_the_field(
    capsys: pytest.CaptureFixture, family: Family, tmp_path: Path, case: str
) -> None:
    text, needles = BAD_CONFIGS[case]
    config = write_config(tmp_path, text, family)
    assert_refused(capsys, ["merge", str(config), str(tmp_path / "out")], *needles)


def test_mergekit_config_without_out_path_is_refused(
    capsys: pytest.CaptureFixture, family: Family, tmp_path: Path
) -> None:
    config = write_config(tmp_path, TIES, family)
    assert_refused(capsys, ["merge", str(config)], "needs the output folder", "OUT_PATH")


def test_models_whose_vocabulary_differs_from_the_tokenizer_source_are_refused(
    capsys: pytest.CaptureFixture, family: Family, tmp_path: Path
) -> None:
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(family.experts["chat"], odd)
    doc = json.loads((odd / "tokenizer.json").read_text())
    doc["model"]["vocab"]["w7"], doc["model"]["vocab"]["w8"] = 8, 7
    (odd / "tokenizer.json").write_text(json.dumps(doc))
    text = TIES.replace("{chat}", str(odd)) + "tokenizer_source: base\n"
    config = write_config(tmp_path, text, family)
    assert_refused(
        capsys, ["merge", str(config), str(tmp_path / "out")], str(odd), "vocabulary", "does not re-align"
    )


def test_convert_refuses_to_write_over_its_input(
    capsys: pytest.CaptureFixture, family: Family, tmp_path: Path
) -> None:
    config = write_config(tmp_path, TIES, family)
    before = config.read_text()
    assert_refused(
        capsys, ["convert", str(config), str(tmp_path / "." / config.name)], "is the mergekit config"
    )
    assert config.read_text() == before


def test_convert_refuses_a_native_config(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    native = tmp_path / "native.yaml"
    native.write_text("base: b\nexperts: [e]\nmethod: average\noutput: o\n")
    assert_refused(capsys, ["convert", str(native), str(tmp_path / "out.yaml")], "not a mergekit config")
    assert not (tmp_path / "out.yaml").exists()


def test_convert_names_the_mergekit_field_of_a_bad_value(
    capsys: pytest.CaptureFixture, family: Family, tmp_path: Path
) -> None:
    config = write_config(tmp_path, TIES.replace("density: 0.33", "density: -1"), family)
    assert_refused(capsys, ["convert", str(config), str(tmp_path / "n.yaml")], "models[3].parameters.density")
    assert not (tmp_path / "n.yaml").exists()
