"""Parity with mergekit 0.1.5 for the geometric methods: slerp, nuslerp, multislerp, karcher,
model_stock.

End to end: mergekit's and supermerge's merges of the tiny Llama folders of
tests/test_mergekit_parity.py, compared tensor by tensor (1e-5 relative, fp32). A mergekit config
without `base_model` is said in supermerge's terms as the config reader says it: its first model
is the base and also an expert (task vector zero), with `use_base: false`. Per tensor: mergekit's
registered method objects against supermerge's on tensors built to reach each fallback (colinear,
antipodal, zero, singular). Bad parameters: a ConfigError naming the field.

Needs the `compare` extra (`pip install mergekit==0.1.5`); skipped without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

mergekit = pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge as mergekit_run_merge  # noqa: E402
from mergekit.merge_methods import registry as mk_registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

from supermerge.config import config_from_dict  # noqa: E402
from supermerge.errors import ConfigError  # noqa: E402
from supermerge.merge import run_merge  # noqa: E402
from supermerge.methods import build_method  # noqa: E402
from tests import test_mergekit_parity as parity  # noqa: E402

REL_TOL = parity.REL_TOL
tiny_models = parity.tiny_models  # the module-scoped fixture: a tiny Llama base and three experts


@dataclass(frozen=True)
class Case:
    """One merge, said in both tools' terms.

    Attributes:
        method: the method's name (the same in both tools).
        experts: the merged experts of parity.EXPERT_NAMES, in order.
        shared: method-level parameters (the same YAML names in both tools).
        weights: per-expert `weight` (mergekit: each model's `parameters`).
        base_model: whether mergekit gets the tiny base as `base_model` (supermerge: use_base).
    """

    method: str
    experts: tuple[str, ...]
    shared: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    base_model: bool = True


THREE = parity.EXPERT_NAMES
WEIGHTS = {"code": 0.3, "math": 0.9, "chat": 0.5}
CASES = {
    "slerp_t": Case("slerp", ("code",), {"t": 0.3}),
    "slerp_extrapolating_t": Case("slerp", ("math",), {"t": 1.4}),
    "nuslerp_task_vectors_flattened": Case("nuslerp", ("code", "math"), weights=WEIGHTS),
    "nuslerp_task_vectors_row_wise": Case(
        "nuslerp", ("code", "math"), {"nuslerp_flatten": False, "nuslerp_row_wise": True}, WEIGHTS
    ),
    "nuslerp_models_without_base_model": Case("nuslerp", ("code", "math"), weights=WEIGHTS, base_model=False),
    "nuslerp_models_per_row_without_base_model": Case(
        "nuslerp", ("math", "chat"), {"nuslerp_flatten": False}, WEIGHTS, base_model=False
    ),
    "multislerp_task_vectors": Case("multislerp", THREE, weights=WEIGHTS),
    "multislerp_models_without_base_model": Case("multislerp", THREE, weights=WEIGHTS, base_model=False),
    "multislerp_shared_weight_unnormalized_eps": Case(
        "multislerp", THREE, {"weight": 0.4, "normalize_weights": False, "eps": 1e-6}
    ),
    "karcher_with_base_model": Case("karcher", THREE),
    "karcher_without_base_model_max_iter_tol": Case(
        "karcher", THREE, {"max_iter": 3, "tol": 1e-6}, base_model=False
    ),
    "model_stock_per_tensor": Case("model_stock", THREE),
    "model_stock_filter_wise": Case("model_stock", ("code", "chat"), {"filter_wise": True}),
}


def merge_with_mergekit(models: parity.TinyModels, case: Case, out: Path) -> Path:
    """Merge with mergekit's Python API, in fp32, offline; returns the output folder."""
    entries = [
        {
            "model": str(models.experts[n]),
            **({"parameters": {"weight": case.weights[n]}} if case.weights else {}),
        }
        for n in case.experts
    ]
    config: dict[str, Any] = {"merge_method": case.method, "models": entries, "dtype": "float32"}
    if case.base_model:
        config["base_model"] = str(models.base)
    if case.shared:
        config["parameters"] = case.shared
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=True)
    mergekit_run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return out


def merge_with_supermerge(models: parity.TinyModels, case: Case, out: Path) -> Path:
    """Merge with supermerge's engine, fp32 output; without base_model the first expert is the base."""
    method = {"name": case.method, **case.shared, **({} if case.base_model else {"use_base": False})}
    raw = {
        "base": str(models.base if case.base_model else models.experts[case.experts[0]]),
        "experts": [
            {
                "name": n,
                "path": str(models.experts[n]),
                **({"weight": case.weights[n]} if case.weights else {}),
            }
            for n in case.experts
        ],
        "method": method,
        "output": str(out),
        "dtype": "float32",
    }
    run_merge(config_from_dict(raw, out.parent), progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case_name", list(CASES))
def test_whole_model_merge_matches_mergekit_tensor_for_tensor(
    tiny_models: parity.TinyModels,
    tmp_path: Path,
    case_name: str,
    record_property: pytest.RecordProperty,
) -> None:
    case = CASES[case_name]
    theirs = merge_with_mergekit(tiny_models, case, tmp_path / "mergekit")
    ours = merge_with_supermerge(tiny_models, case, tmp_path / "supermerge")
    error = parity.max_relative_error(ours, theirs)
    print(f"max_rel_err={error:.3g}")
    record_property("max_rel_err", error)


def mergekit_tensor(
    method: str, base: torch.Tensor | None, models: list[torch.Tensor], params: dict[str, Any]
) -> torch.Tensor:
    """mergekit's registered method on one tensor group: the models, then the base if any (the
    order of mergekit's plan when base_model is not among the models)."""
    tensors = [*models, *([base] if base is not None else [])]
    group = TensorGroup.from_tensors(
        [t.clone() for t in tensors], base_index=len(models) if base is not None else None, name="w"
    )
    (merged,) = mk_registry.get(method)([group], parameters=params)
    return merged


def supermerge_tensor(
    method: str,
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    params: dict[str, Any],
    weights: list[float] | None = None,
) -> torch.Tensor:
    """supermerge's method on the same tensors; without a base the first model carries them."""
    experts = [{"name": f"m{i}", **({"weight": weights[i]} if weights else {})} for i in range(len(models))]
    if base is None:
        base, params = models[0], {**params, "use_base": False}
    return build_method(method, params, experts).merge("w", base.clone(), [m - base for m in models])


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    assert torch.isfinite(theirs).all()
    error = parity.relative_error(ours, theirs)
    assert error <= REL_TOL, f"relative error {error:.3g}"


@pytest.mark.parametrize("kind", ["generic", "colinear", "antipodal", "zero_base", "nearly_colinear"])
@pytest.mark.parametrize("t", [0.0, 0.25, 1.0])
def test_slerp_matches_mergekit_including_its_linear_fallbacks(
    gen: torch.Generator, kind: str, t: float
) -> None:
    base = torch.randn(48, 32, generator=gen)
    other = {
        "generic": torch.randn(48, 32, generator=gen),
        "colinear": 2.5 * base,  # |cos| = 1 > 0.9995: linear
        "antipodal": -0.5 * base,
        "zero_base": torch.randn(48, 32, generator=gen),
        "nearly_colinear": base + 1e-3 * torch.randn(48, 32, generator=gen),
    }[kind]
    if kind == "zero_base":
        base = torch.zeros_like(base)  # norm below eps: taken as 1
    assert_parity(
        supermerge_tensor("slerp", base, [other], {"t": t}), mergekit_tensor("slerp", base, [other], {"t": t})
    )


@pytest.mark.parametrize(
    "layout", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}]
)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("weights", [[0.3, 0.9], [1.0, -1.0], [2.0, 0.0]])
def test_nuslerp_matches_mergekit_with_colinear_vectors_and_zero_weight_sums(
    gen: torch.Generator, layout: dict[str, bool], with_base: bool, weights: list[float]
) -> None:
    base = torch.randn(40, 24, generator=gen)
    tau = torch.randn(40, 24, generator=gen)
    other = torch.randn(40, 24, generator=gen)
    other[:, :12] = 3 * tau[:, :12]  # colinear columns, and in the flattened tensor ...
    other[:20] = 3 * tau[:20]  # ... and rows: linear for those vectors
    models = [base + tau, base + other] if with_base else [tau, other]
    params = {**layout, "weight": weights}
    theirs = mergekit_tensor("nuslerp", base if with_base else None, models, params)
    ours = supermerge_tensor("nuslerp", base if with_base else None, models, layout, weights)
    assert_parity(ours, theirs)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize(
    "k,weights,shared",
    [
        (1, [0.7], {}),
        (2, [1.0, 1.0], {}),  # antipodal with equal weights: mergekit's linear fallback
        (2, [0.3, 0.3], {"normalize_weights": False}),
        (3, [0.2, -0.5, 1.5], {"normalize_weights": False}),
        (4, [1.0, 2.0, 3.0, 4.0], {"eps": 1e-3}),
    ],
)
def test_multislerp_matches_mergekit_including_one_expert_and_the_antipodal_fallback(
    gen: torch.Generator, with_base: bool, k: int, weights: list[float], shared: dict[str, Any]
) -> None:
    base = torch.randn(33, 17, generator=gen)
    taus = [torch.randn(33, 17, generator=gen) for _ in range(k)]
    if k == 2:  # exactly antipodal, as task vectors and as models
        taus[1], base = -taus[0], torch.zeros_like(base)
    models = [base + tau for tau in taus]
    theirs = mergekit_tensor("multislerp", base if with_base else None, models, {**shared, "weight": weights})
    ours = supermerge_tensor("multislerp", base if with_base else None, models, shared, weights)
    assert_parity(ours, theirs)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("kind", ["generic", "one_zero_model", "all_zero", "identical", "one_model"])
@pytest.mark.parametrize("shared", [{}, {"max_iter": 0}, {"max_iter": 50, "tol": 1e-7}])
def test_karcher_matches_mergekit_including_zero_and_identical_models(
    gen: torch.Generator, with_base: bool, kind: str, shared: dict[str, Any]
) -> None:
    base = torch.randn(29, 11, generator=gen)
    models = [base + torch.randn(29, 11, generator=gen) for _ in range(3)]
    if kind == "one_zero_model":
        models[1] = torch.zeros_like(base)  # norm <= tol: no part in the direction, in the norm
    elif kind == "all_zero":
        base, models = torch.zeros_like(base), [torch.zeros_like(base)] * 3
    elif kind == "identical":
        base, models = models[0], [models[0]] * 3  # every angle < tol: no step
    elif kind == "one_model":
        models = models[:1]
    theirs = mergekit_tensor("karcher", base if with_base else None, models, shared)
    ours = supermerge_tensor("karcher", base if with_base else None, models, shared)
    assert_parity(ours, theirs)


@pytest.mark.parametrize("with_base", [True, False])
def test_karcher_starts_at_the_first_model_when_the_mean_direction_is_zero_like_mergekit(
    gen: torch.Generator, with_base: bool
) -> None:
    """Three models 120 degrees apart in a plane: their unit vectors sum to zero, so the mean
    starts at the first, where the other two pull equally and opposite (no step at tol 1e-5; a
    smaller tol would follow rounding noise off this saddle, in either tool)."""
    a, b = (torch.randn(29, 11, generator=gen) for _ in range(2))
    b -= (a * b).sum() / (a * a).sum() * a
    a, b = a / a.norm(), b / b.norm()
    models = [2 * a, 3 * (-a / 2 + 3**0.5 / 2 * b), 0.5 * (-a / 2 - 3**0.5 / 2 * b)]
    base = torch.zeros_like(a)  # norm <= tol: no part in the direction
    theirs = mergekit_tensor("karcher", base if with_base else None, models, {})
    ours = supermerge_tensor("karcher", base if with_base else None, models, {})
    assert_parity(ours, theirs)
    assert parity.relative_error(ours, a * theirs.norm()) < 1e-5


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(31, 19), (19,), (3, 4, 5)])
@pytest.mark.parametrize("kind", ["generic", "opposed", "first_rows_opposed"])
def test_model_stock_matches_mergekit_including_the_singular_fallback(
    gen: torch.Generator, filter_wise: bool, shape: tuple[int, ...], kind: str
) -> None:
    base = torch.randn(shape, generator=gen)
    taus = [torch.randn(shape, generator=gen) for _ in range(3)]
    if kind != "generic":  # two task vectors, cos = -1: 1 + (k - 1) cos = 0, the base is kept
        rows = (torch.rand(shape[0], generator=gen) < 0.5).reshape(-1, *(1,) * (len(shape) - 1))
        taus = [taus[0], torch.where(rows, -taus[0], taus[1])]  # filter_wise: those rows singular
        if kind == "opposed":
            taus[1] = -taus[0]
    models = [base + tau for tau in taus]
    params = {"filter_wise": filter_wise}
    assert_parity(
        supermerge_tensor("model_stock", base, models, params),
        mergekit_tensor("model_stock", base, models, params),
    )


@pytest.mark.parametrize(
    "method,params,k",
    [
        ("slerp", {"t": 0.4}, 1),
        ("nuslerp", {"weight": 1.0}, 2),
        ("nuslerp", {"weight": 1.0, "use_base": False}, 2),
        ("multislerp", {"weight": 1.0}, 3),
        ("multislerp", {"weight": 1.0, "use_base": False}, 3),
        ("karcher", {}, 3),
        ("karcher", {"use_base": False}, 3),
        ("model_stock", {"filter_wise": True}, 3),
    ],
)
def test_merge_leaves_the_base_untouched_and_returns_fp32_of_its_shape(
    gen: torch.Generator, method: str, params: dict[str, Any], k: int
) -> None:
    base = torch.randn(12, 9, generator=gen)
    kept = base.clone()
    merged = build_method(method, params, [{"name": f"m{i}"} for i in range(k)]).merge(
        "w", base, [torch.randn(12, 9, generator=gen) for _ in range(k)]
    )
    assert torch.equal(base, kept)
    assert merged.shape == base.shape and merged.dtype == torch.float32 and torch.isfinite(merged).all()
    assert merged.data_ptr() != base.data_ptr()


def test_multislerp_refuses_weighted_directions_that_cancel_like_mergekit(gen: torch.Generator) -> None:
    tau = torch.randn(5, 7, generator=gen)
    base = torch.zeros(5, 7)  # the task vectors exactly opposed
    models = [base + tau, base - tau, base + tau]
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        mergekit_tensor("multislerp", base, models, {"weight": [1.0, 2.0, 1.0]})
    with pytest.raises(ConfigError, match="directions is zero") as error:
        supermerge_tensor("multislerp", base, models, {}, [1.0, 2.0, 1.0])
    assert error.value.field == "method.weight"


def test_multislerp_refuses_weights_that_sum_to_zero(gen: torch.Generator) -> None:
    base = torch.randn(5, generator=gen)
    models = [base + torch.randn(5, generator=gen) for _ in range(2)]
    with pytest.raises(ConfigError, match="sum to zero") as error:
        supermerge_tensor("multislerp", base, models, {}, [1.0, -1.0])
    assert error.value.field == "method.weight"


@pytest.mark.parametrize(
    "method,params,experts,field",
    [
        ("slerp", {}, [{}], "method.t"),
        ("slerp", {"t": "half"}, [{}], "method.t"),
        ("slerp", {"t": 0.5, "lambda": 1.0}, [{}], "method.lambda"),
        ("slerp", {"t": 0.5}, [{}, {}], "experts"),
        ("slerp", {"t": 0.5}, [{"weight": 2.0}], "experts[0].weight"),
        ("nuslerp", {}, [{"weight": 1.0}, {}], "experts[1].weight"),
        ("nuslerp", {"weight": 1.0}, [{}, {}, {}], "experts"),
        ("nuslerp", {"weight": 1.0, "nuslerp_flatten": "yes"}, [{}, {}], "method.nuslerp_flatten"),
        ("nuslerp", {"weight": 1.0, "use_base": 0}, [{}, {}], "method.use_base"),
        ("multislerp", {}, [{}], "experts[0].weight"),
        ("multislerp", {"weight": 1.0, "eps": 0.0}, [{}], "method.eps"),
        ("multislerp", {"weight": 1.0, "normalize_weights": 1}, [{}], "method.normalize_weights"),
        ("karcher", {"max_iter": -1}, [{}], "method.max_iter"),
        ("karcher", {"max_iter": 2.5}, [{}], "method.max_iter"),
        ("karcher", {"tol": 0.0}, [{}], "method.tol"),
        ("karcher", {}, [{"weight": 0.5}], "experts[0].weight"),
        ("model_stock", {}, [{}], "experts"),
        ("model_stock", {"filter_wise": "rows"}, [{}, {}], "method.filter_wise"),
        ("model_stock", {"density": 0.5}, [{}, {}], "method.density"),
    ],
)
def test_bad_parameters_are_config_errors_naming_the_field(
    method: str, params: dict[str, Any], experts: list[dict[str, float]], field: str
) -> None:
    with pytest.raises(ConfigError) as error:
        build_method(method, params, [{"name": f"m{i}", **e} for i, e in enumerate(experts)])
    assert error.value.field == field
    assert "\n" not in str(error.value)
