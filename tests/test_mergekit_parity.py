"""Parity with mergekit 0.1.5: the same merged tensors on the same tiny models.

End to end (both tools read the same HF folders and write a merged model): `average`
(mergekit `linear`), `task_arithmetic` and `ties`, with shared and per-expert weights and
densities. DARE draws its masks from torch's global RNG in mergekit's graph order, so whole
models cannot agree bit for bit; DARE is compared per tensor instead: mergekit's own
generalized-task-arithmetic merge, with `torch.manual_seed` set before each expert's mask to the
seed supermerge derives for that (expert, tensor), against supermerge's method.

Needs the `compare` extra (`pip install mergekit==0.1.5`); skipped without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

mergekit = pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge as mergekit_run_merge  # noqa: E402
from mergekit.merge_methods import generalized_task_arithmetic as mk_gta  # noqa: E402
from mergekit.merge_methods import registry as mk_registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from supermerge.config import config_from_dict  # noqa: E402
from supermerge.io.checkpoint import Checkpoint  # noqa: E402
from supermerge.merge import run_merge  # noqa: E402
from supermerge.methods import build_method  # noqa: E402
from supermerge.methods.base import tensor_seed  # noqa: E402
from supermerge.methods.sparsify import Rescale, random_drop  # noqa: E402

pytestmark = pytest.mark.slow

REL_TOL = 1e-5  # max |ours - mergekit| / max |mergekit|, per tensor, fp32
EXPERT_NAMES = ("code", "math", "chat")
DELTA_SCALE = 2e-3  # std of an expert's task vector, ~10% of the base weights' std (0.02)
SEED = 7


@dataclass(frozen=True)
class TinyModels:
    """A tiny Llama base and its experts as HF folders (fp32 model.safetensors + config.json)."""

    base: Path
    experts: dict[str, Path]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Base: every weight ~ N(0, 0.02^2), norms ~ 1 + N(0, 0.02^2); expert = base + N(0, 2e-3^2)."""
    root = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02 + ("norm" in name))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.save_pretrained(root / "base")
    experts = {}
    for expert in EXPERT_NAMES:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(base[name] + torch.randn(param.shape, generator=generator) * DELTA_SCALE)
        model.save_pretrained(root / expert)
        experts[expert] = root / expert
    return TinyModels(root / "base", experts)


@dataclass(frozen=True)
class Case:
    """One merge, said in both tools' terms.

    Attributes:
        ours: supermerge method name.
        theirs: mergekit merge_method name.
        shared: method-level parameters (same YAML names in both tools).
        per_expert: expert name -> {weight, density} overrides (mergekit: model `parameters`).
    """

    ours: str
    theirs: str
    shared: dict[str, Any]
    per_expert: dict[str, dict[str, float]]


CASES = {
    "average_per_expert_weights": Case(
        "average", "linear", {}, {"code": {"weight": 1.0}, "math": {"weight": 0.5}, "chat": {"weight": 2.0}}
    ),
    "task_arithmetic_per_expert_weights_lambda": Case(
        "task_arithmetic",
        "task_arithmetic",
        {"lambda": 0.9},
        {"code": {"weight": 0.3}, "math": {"weight": 0.5}, "chat": {"weight": 0.7}},
    ),
    "task_arithmetic_shared_weight_normalized": Case(
        "task_arithmetic", "task_arithmetic", {"weight": 0.6, "normalize": True, "lambda": 1.5}, {}
    ),
    "ties_shared_density": Case("ties", "ties", {"density": 0.4, "weight": 1.0}, {}),
    "ties_per_expert_weights_densities_lambda": Case(
        "ties",
        "ties",
        {"lambda": 0.8},
        {
            "code": {"weight": 1.0, "density": 0.5},
            "math": {"weight": 0.5, "density": 0.2},
            "chat": {"weight": 0.7, "density": 0.9},
        },
    ),
}


def merge_with_mergekit(models: TinyModels, case: Case, out: Path) -> Path:
    """Merge with mergekit's Python API, in fp32, offline; returns the output folder."""
    entries = [
        {"model": str(path), **({"parameters": case.per_expert[n]} if n in case.per_expert else {})}
        for n, path in models.experts.items()
    ]
    config: dict[str, Any] = {"merge_method": case.theirs, "models": entries, "dtype": "float32"}
    if case.theirs != "linear":  # linear averages the listed models only, like our `average`
        config["base_model"] = str(models.base)
    if case.shared:
        config["parameters"] = case.shared
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=True)
    mergekit_run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return out


def merge_with_supermerge(models: TinyModels, case: Case, out: Path) -> Path:
    """Merge with supermerge's engine, fp32 output; returns the output folder."""
    raw = {
        "base": str(models.base),
        "experts": [
            {"name": n, "path": str(path), **case.per_expert.get(n, {})} for n, path in models.experts.items()
        ],
        "method": {"name": case.ours, **case.shared},
        "output": str(out),
        "dtype": "float32",
        "seed": SEED,
    }
    run_merge(config_from_dict(raw, out.parent), progress=False)
    return out


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs| (unitless; 0 when both are all zeros)."""
    scale = theirs.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((ours - theirs).abs().max() / scale).item()


def max_relative_error(ours_dir: Path, theirs_dir: Path) -> float:
    """Compare two merged models tensor by tensor; they must hold the same names, shapes, dtypes."""
    ours, theirs = Checkpoint(ours_dir), Checkpoint(theirs_dir)
    assert sorted(ours.names) == sorted(theirs.names)
    worst = 0.0
    for name in theirs.names:
        a, b = ours.read(name), theirs.read(name)
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, name
        error = relative_error(a, b)
        assert error <= REL_TOL, f"{name}: relative error {error:.3g}"
        worst = max(worst, error)
    return worst


@pytest.mark.parametrize("case_name", list(CASES))
def test_whole_model_merge_matches_mergekit_tensor_for_tensor(
    tiny_models: TinyModels,
    tmp_path: Path,
    case_name: str,
    record_property: pytest.RecordProperty,
) -> None:
    case = CASES[case_name]
    theirs = merge_with_mergekit(tiny_models, case, tmp_path / "mergekit")
    ours = merge_with_supermerge(tiny_models, case, tmp_path / "supermerge")
    record_property("max_rel_err", max_relative_error(ours, theirs))


@pytest.mark.parametrize("shape", [(7,), (64, 64), (1000, 333)])
@pytest.mark.parametrize("seed", [0, 123456789, 2**63 - 1])
def test_random_drop_draws_the_mask_of_mergekit_bernoulli_after_manual_seed(
    shape: tuple[int, ...], seed: int
) -> None:
    tau = torch.randn(shape, generator=torch.Generator().manual_seed(seed % 2**32))
    torch.manual_seed(seed)
    theirs = sparsify(tau, 0.3, SparsificationMethod.random, rescale_norm=RescaleNorm.l1)
    ours = random_drop(tau, 0.3, Rescale.L1, seed)
    assert torch.equal(ours != 0, theirs != 0)
    assert relative_error(ours, theirs) <= REL_TOL


def seeded_mergekit_sparsify(seeds: Iterator[int]):
    """mergekit's `sparsify`, with torch.manual_seed(next seed) before each call (one per expert)."""

    def wrapped(tensor: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        torch.manual_seed(next(seeds))
        return sparsify(tensor, **kwargs)

    return wrapped


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_merge_of_each_tensor_matches_mergekit_given_the_same_per_expert_seeds(
    tiny_models: TinyModels,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    rescale: bool,
    record_property: pytest.RecordProperty,
) -> None:
    weights = {"code": 1.0, "math": 0.5, "chat": 0.7}
    densities = {"code": 0.5, "math": 0.2, "chat": 0.9}
    shared = {"lambda": 0.8, "normalize": method == "dare_ties", "rescale": rescale}
    ours_method = build_method(
        method,
        shared,
        [{"name": n, "weight": weights[n], "density": densities[n]} for n in EXPERT_NAMES],
        SEED,
    )
    theirs_method = mk_registry.get(method)
    base_ckpt = Checkpoint(tiny_models.base)
    expert_ckpts = [Checkpoint(tiny_models.experts[n]) for n in EXPERT_NAMES]
    worst = 0.0
    for name in base_ckpt.names:
        base = base_ckpt.read(name)
        experts = [c.read(name) for c in expert_ckpts]
        seeds = iter([tensor_seed(SEED, n, name) for n in EXPERT_NAMES])
        monkeypatch.setattr(mk_gta, "sparsify", seeded_mergekit_sparsify(seeds))
        group = TensorGroup.from_tensors(
            [base, *experts], ids=["base", *EXPERT_NAMES], base_index=0, name=name
        )
        (theirs,) = theirs_method([group], parameters={**shared, "weight": weights, "density": densities})
        assert next(seeds, None) is None, "mergekit drew a mask per expert"
        ours = ours_method.merge(name, base, [e - base for e in experts])
        error = relative_error(ours, theirs)
        assert error <= REL_TOL, f"{name}: relative error {error:.3g}"
        worst = max(worst, error)
    record_property("max_rel_err", worst)
