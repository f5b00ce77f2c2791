"""Parity with mergekit 0.1.5 for the sparsifying methods, and the exact magnitude trim.

End to end: breadcrumbs, breadcrumbs_ties, sce, TIES with rescale, unnormalised `linear`, merged
by both tools from the tiny Llama folders of tests/test_mergekit_parity.py and compared tensor by
tensor (1e-5 relative, fp32), supermerge's trims replaying std::sort on every tensor (SMALL set
to 16: the tiny tensors would otherwise take the argsort path). DELLA draws its masks from
torch's global RNG in mergekit, so it is compared per tensor as DARE is: mergekit's own merge with
`torch.manual_seed` set to supermerge's seed of each (expert, tensor) before each expert's mask.

In half precision (bf16, fp16) the task-arithmetic family computes as mergekit does: per tensor,
the same merged tensors bit for bit.

The magnitude trims (TIES, Model Breadcrumbs) against mergekit's `magnitude` and
`magnitude_outliers`, bit for bit, on tensors full of equal magnitudes (small integers, bf16,
fp16, fp32 differences of bf16 weights): which of the entries tied at the cut are kept is what
torch's CPU sort (libstdc++ std::sort) leaves, and supermerge must keep the same ones without
sorting. Also libstdc++'s heapsort, which
std::sort falls back to past its depth limit: against torch.topk (std::partial_sort), and end to
end on an input built to drive std::sort to its depth limit (McIlroy's adversary).

Needs the `compare` extra (`pip install mergekit==0.1.5`); skipped without it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

mergekit = pytest.importorskip("mergekit")

from mergekit.merge_methods import generalized_task_arithmetic as mk_gta  # noqa: E402
from mergekit.merge_methods import registry as mk_registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.sparsify import RescaleNorm, magnitude, magnitude_outliers  # noqa: E402

from supermerge.errors import ConfigError  # noqa: E402
from supermerge.io.checkpoint import Checkpoint  # noqa: E402
from supermerge.kernels import sorted_range_cpu  # noqa: E402
from supermerge.methods import REGISTRY, build_method  # noqa: E402
from supermerge.methods import sparsify as sp  # noqa: E402
from supermerge.methods.base import tensor_seed  # noqa: E402
from supermerge.methods.sparsify import Rescale, magnitude_outliers_trim, magnitude_trim  # noqa: E402
from tests import test_mergekit_parity as parity  # noqa: E402

REL_TOL = parity.REL_TOL
SEED = parity.SEED
EXPERTS = parity.EXPERT_NAMES
tiny_models = parity.tiny_models  # the module-scoped fixture: a tiny Llama base and three experts

WEIGHTS = {"code": 1.0, "math": 0.5, "chat": 0.7}
DENSITIES = {"code": 0.5, "math": 0.3, "chat": 0.9}
PER_EXPERT = {n: {"weight": WEIGHTS[n], "density": DENSITIES[n]} for n in EXPERTS}

CASES = {
    "breadcrumbs_per_expert_weights_densities_gamma_lambda": parity.Case(
        "breadcrumbs", "breadcrumbs", {"gamma": 0.05, "lambda": 0.9}, PER_EXPERT
    ),
    "breadcrumbs_per_expert_gammas": parity.Case(
        "breadcrumbs",
        "breadcrumbs",
        {"lambda": 0.9},
        {n: {**PER_EXPERT[n], "gamma": g} for n, g in zip(EXPERTS, [0.0, 0.05, 0.2], strict=True)},
    ),
    "breadcrumbs_default_gamma_rescaled_int8_mask": parity.Case(
        "breadcrumbs", "breadcrumbs", {"density": 0.4, "weight": 0.8, "rescale": True, "int8_mask": True}, {}
    ),
    "breadcrumbs_ties_per_expert_normalized": parity.Case(
        "breadcrumbs_ties", "breadcrumbs_ties", {"gamma": 0.02, "normalize": True}, PER_EXPERT
    ),
    "breadcrumbs_ties_outliers_reduced_to_keep_density": parity.Case(
        "breadcrumbs_ties", "breadcrumbs_ties", {"density": 0.97, "gamma": 0.1, "weight": 1.0}, {}
    ),
    "ties_rescaled_int8_mask": parity.Case(
        "ties", "ties", {"density": 0.3, "weight": 0.8, "rescale": True, "int8_mask": True}, {}
    ),
    "sce_select_topk": parity.Case("sce", "sce", {"select_topk": 0.4}, {}),
    "sce_defaults": parity.Case("sce", "sce", {}, {}),
    "average_unnormalized": parity.Case(
        "average", "linear", {"normalize": False}, {n: {"weight": WEIGHTS[n]} for n in EXPERTS}
    ),
}


@pytest.fixture(params=["compiled", "torch_ops"])
def replay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which replay of std::sort runs the large CPU trims: the compiled one or the one in torch
    operations (what runs without a C++ compiler, and on other devices)."""
    if request.param == "compiled" and sorted_range_cpu.library() is None:
        pytest.skip("no C++ compiler here: the compiled trim is not built")
    if request.param == "torch_ops":
        monkeypatch.setattr(sorted_range_cpu, "supports", lambda flat: False)
    return request.param


@pytest.fixture
def replayed_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every magnitude trim replays std::sort, however small the tensor."""
    monkeypatch.setattr(sp, "SMALL", 16)


@pytest.mark.slow
@pytest.mark.parametrize("case_name", list(CASES))
def test_whole_model_merge_matches_mergekit_tensor_for_tensor(
    tiny_models: parity.TinyModels,
    tmp_path: Path,
    replayed_trims: None,
    case_name: str,
    record_property: pytest.RecordProperty,
) -> None:
    case = CASES[case_name]
    theirs = parity.merge_with_mergekit(tiny_models, case, tmp_path / "mergekit")
    ours = parity.merge_with_supermerge(tiny_models, case, tmp_path / "supermerge")
    record_property("max_rel_err", parity.max_relative_error(ours, theirs))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("rescale", [True, False])
def test_della_merge_of_each_tensor_matches_mergekit_given_the_same_per_expert_seeds(
    tiny_models: parity.TinyModels,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    rescale: bool,
    record_property: pytest.RecordProperty,
) -> None:
    shared = {"lambda": 0.8, "rescale": rescale}
    densities = {"code": 0.5, "math": 0.3, "chat": 0.8}  # each +- its epsilon within (0, 1)
    epsilons = {"code": 0.1, "math": 0.05, "chat": 0.15}
    entries = [
        {"name": n, "weight": WEIGHTS[n], "density": densities[n], "epsilon": epsilons[n]} for n in EXPERTS
    ]
    ours_method = build_method(method, shared, entries, SEED)
    theirs_method = mk_registry.get(method)
    per_model = {"weight": WEIGHTS, "density": densities, "epsilon": epsilons}
    base_ckpt = Checkpoint(tiny_models.base)
    expert_ckpts = [Checkpoint(tiny_models.experts[n]) for n in EXPERTS]
    worst = 0.0
    for name in base_ckpt.names:
        base = base_ckpt.read(name)
        experts = [c.read(name) for c in expert_ckpts]
        seeds = iter([tensor_seed(SEED, n, name) for n in EXPERTS])
        monkeypatch.setattr(mk_gta, "sparsify", parity.seeded_mergekit_sparsify(seeds))
        group = TensorGroup.from_tensors([base, *experts], ids=["base", *EXPERTS], base_index=0, name=name)
        (theirs,) = theirs_method([group], parameters={**shared, **per_model})
        assert next(seeds, None) is None, "mergekit drew a mask per expert"
        ours = ours_method.merge(name, base, [e - base for e in experts])
        error = parity.relative_error(ours, theirs)
        assert error <= REL_TOL, f"{name}: relative error {error:.3g}"
        worst = max(worst, error)
    record_property("max_rel_err", worst)


LOW_PRECISION_CASES = {
    "task_arithmetic": {"lambda": 0.9},
    "ties": {"int8_mask": True},
    "dare_linear": {"rescale": True},
    "dare_ties": {"lambda": 0.8},
    "breadcrumbs": {"gamma": 0.05, "rescale": True},
    "breadcrumbs_ties": {"gamma": 0.02, "normalize": True},
    "della": {"epsilon": 0.1},
    "della_linear": {"epsilon": 0.1, "lambda": 1.3},
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", list(LOW_PRECISION_CASES))
def test_merge_in_half_precision_is_mergekits_bit_for_bit(
    tiny_models: parity.TinyModels, monkeypatch: pytest.MonkeyPatch, method: str, dtype: torch.dtype
) -> None:
    """mergekit computes these methods in the merge dtype: given the same rounded inputs (and
    the same seeds for the random drops), every merged tensor is the same, bit for bit."""
    shared = LOW_PRECISION_CASES[method]
    densities = {"code": 0.5, "math": 0.3, "chat": 0.8}
    per_expert = {"weight": WEIGHTS} | ({"density": densities} if method != "task_arithmetic" else {})
    entries = [{"name": n, **{k: v[n] for k, v in per_expert.items()}} for n in EXPERTS]
    ours_method = build_method(method, shared, entries, SEED)
    assert ours_method.computes_in_dtype
    theirs_method = mk_registry.get(method)
    per_model = {k: dict.fromkeys(EXPERTS, v) for k, v in shared.items() if k in ("gamma", "epsilon")}
    base_ckpt = Checkpoint(tiny_models.base)
    expert_ckpts = [Checkpoint(tiny_models.experts[n]) for n in EXPERTS]
    for name in base_ckpt.names:
        base = base_ckpt.read(name).to(dtype)
        experts = [c.read(name).to(dtype) for c in expert_ckpts]
        seeds = iter([tensor_seed(SEED, n, name) for n in EXPERTS])
        monkeypatch.setattr(mk_gta, "sparsify", parity.seeded_mergekit_sparsify(seeds))
        group = TensorGroup.from_tensors([base, *experts], ids=["base", *EXPERTS], base_index=0, name=name)
        (theirs,) = theirs_method([group], parameters={**shared, **per_expert, **per_model})
        ours = ours_method.merge(name, base, [e - base for e in experts])
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs), f"{name}: {int((ours != theirs).sum())} elements differ"


# --- the magnitude trims, bit for bit ------------------------------------------------------------


def tied_values(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A task vector full of equal magnitudes, none zero (so a kept entry shows as nonzero)."""
    if kind == "small_integers":  # 6 values, 3 magnitudes
        values = torch.randint(1, 4, shape, generator=gen) * (
            torch.randint(0, 2, shape, generator=gen) * 2 - 1
        )
        return values.float()
    if kind == "bf16":  # ~N(0, 0.01^2) in bf16: 8 bits of mantissa, many equal magnitudes
        return (torch.randn(shape, generator=gen) * 0.01).bfloat16()
    if kind == "fp16":  # 11 bits of mantissa
        return (torch.randn(shape, generator=gen) * 0.01).half()
    if kind == "fp32_of_bf16":  # what an fp32 merge of bf16 checkpoints sees: differences of bf16
        a, b = torch.randn(shape, generator=gen).bfloat16(), torch.randn(shape, generator=gen).bfloat16()
        values = a.float() - b.float()
        return values.masked_fill_(values == 0, 1.0)
    assert kind == "fp32"
    return torch.randn(shape, generator=gen)


KINDS = ["small_integers", "bf16", "fp16", "fp32_of_bf16", "fp32"]
LARGE = (384, 257)  # above SMALL: the replay path
DENSITIES_EDGE = [1e-5, 0.1, 0.37, 0.5, 0.9, 1 - 1e-5]


def assert_same_entries(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours != 0, theirs != 0), f"{int(((ours != 0) ^ (theirs != 0)).sum())} entries differ"
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("chunk", [sp.CHUNK, 1000], ids=["chunk_default", "chunk_1000"])
@pytest.mark.parametrize("density", DENSITIES_EDGE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("replay")
def test_magnitude_trim_keeps_mergekits_entries_ties_included(
    kind: str, density: float, chunk: int, monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    monkeypatch.setattr(sp, "CHUNK", chunk)
    tau = tied_values(kind, LARGE, gen)
    assert_same_entries(magnitude_trim(tau.clone(), density), magnitude(tau, density))


@pytest.mark.parametrize("shape", [(5,), (17,), (64, 64)])
@pytest.mark.parametrize("density", [0.01, 0.5, 0.99])
def test_magnitude_trim_of_small_tensors_keeps_mergekits_entries(
    shape: tuple[int, ...], density: float, gen: torch.Generator
) -> None:
    tau = tied_values("small_integers", shape, gen)
    assert_same_entries(magnitude_trim(tau.clone(), density), magnitude(tau, density))


@pytest.mark.parametrize(
    ("density", "gamma"), [(0.1, 0.01), (0.5, 0.0), (0.5, 0.2), (0.9, 0.05), (0.99, 0.5)]
)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("replay")
def test_outlier_trim_keeps_mergekits_entries_ties_included(
    kind: str, density: float, gamma: float, gen: torch.Generator
) -> None:
    tau = tied_values(kind, LARGE, gen)
    ours = magnitude_outliers_trim(tau.clone(), density, gamma)
    assert_same_entries(ours, magnitude_outliers(tau, density, gamma=gamma))


@pytest.mark.parametrize("kind", ["small_integers", "bf16", "fp32"])
@pytest.mark.usefixtures("replay")
def test_rescaled_trims_match_mergekits_l1_rescale_bit_for_bit(kind: str, gen: torch.Generator) -> None:
    tau = tied_values(kind, LARGE, gen)
    assert_same_entries(
        magnitude_trim(tau.clone(), 0.3, Rescale.L1), magnitude(tau, 0.3, rescale_norm=RescaleNorm.l1)
    )
    ours = magnitude_outliers_trim(tau.clone(), 0.3, 0.05, Rescale.L1)
    assert_same_entries(ours, magnitude_outliers(tau, 0.3, rescale_norm=RescaleNorm.l1, gamma=0.05))


@pytest.mark.usefixtures("replay")
def test_trims_of_float64_order_as_mergekit_does_in_float32(gen: torch.Generator) -> None:
    """mergekit sorts |tau| as float32 on the CPU: float64 values that round to the same float32
    tie."""
    tau = tied_values("fp32", LARGE, gen).double()
    tau += torch.randint(0, 3, LARGE, generator=gen).double() * 1e-12  # below float32's resolution
    assert_same_entries(magnitude_trim(tau.clone(), 0.4), magnitude(tau, 0.4))
    assert_same_entries(
        magnitude_outliers_trim(tau.clone(), 0.4, 0.1), magnitude_outliers(tau, 0.4, gamma=0.1)
    )


@pytest.mark.usefixtures("replay")
def test_large_trims_sort_nothing(monkeypatch: pytest.MonkeyPatch, gen: torch.Generator) -> None:
    tau = tied_values("bf16", LARGE, gen)
    theirs = magnitude(tau, 0.2)

    def no_argsort(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("argsort called")

    monkeypatch.setattr(torch, "argsort", no_argsort)
    threads = torch.get_num_threads()
    assert_same_entries(magnitude_trim(tau.clone(), 0.2), theirs)
    assert torch.get_num_threads() == threads  # the replay's one thread is given back


def test_this_torch_sorts_as_the_replay_does_and_another_would_be_argsorted(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    assert sp.replay_matches_torch()  # torch 2.x with libstdc++: the replay's own check passes
    monkeypatch.setattr(sp, "replay_matches_torch", lambda: False)
    argsorts = []
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: argsorts.append(1) or argsort(*a, **k))
    tau = tied_values("bf16", LARGE, gen)
    assert_same_entries(magnitude_trim(tau.clone(), 0.3), magnitude(tau, 0.3))
    assert len(argsorts) == 2  # mergekit's and the fallback's


def test_libstdcxx_heap_select_and_sort_is_torch_topk_partial_sort(gen: torch.Generator) -> None:
    """torch.topk(k) with 64 k <= n runs std::partial_sort on (value, index) pairs."""
    values = torch.randint(0, 20, (5000,), generator=gen).float()
    for k in (1, 7, 78):
        items = list(enumerate(values.tolist()))
        sp.heap_select_and_sort(items, k, operator.gt)
        assert [i for i, _ in items[:k]] == torch.topk(values, k).indices.tolist()


def std_sort(items: list, before: Callable[[Any, Any], bool]) -> list:
    """A model of libstdc++'s std::sort (introsort), to build the adversary's input."""

    def partition_loop(first: int, last: int, depth: int) -> None:
        while last - first > sp.INSERTION_RANGE:
            if depth == 0:
                part = [(None, x) for x in items[first:last]]
                sp.heap_select_and_sort(part, len(part), before)
                items[first:last] = [x for _, x in part]
                return
            depth -= 1
            a, b, c = first + 1, first + (last - first) // 2, last - 1
            if before(items[a], items[b]):
                pick = b if before(items[b], items[c]) else (c if before(items[a], items[c]) else a)
            elif before(items[a], items[c]):
                pick = a
            else:
                pick = c if before(items[b], items[c]) else b
            items[first], items[pick] = items[pick], items[first]
            lo, hi = first + 1, last
            while True:
                while before(items[lo], items[first]):
                    lo += 1
                hi -= 1
                while before(items[first], items[hi]):
                    hi -= 1
                if lo >= hi:
                    break
                items[lo], items[hi] = items[hi], items[lo]
                lo += 1
            partition_loop(lo, last, depth)
            last = lo

    partition_loop(0, len(items), 2 * (len(items).bit_length() - 1))
    for i in range(1, len(items)):  # the final insertion sort
        x, j = items[i], i
        while j > 0 and before(x, items[j - 1]):
            items[j] = items[j - 1]
            j -= 1
        items[j] = x
    return items


def quicksort_adversary(n: int) -> list[int]:
    """McIlroy's adversary ("A killer adversary for quicksort", 1999) against std_sort: values
    that drive the partitions to the depth limit."""
    gas, solid, candidate = n, [0], [0]
    values = [gas] * n

    def less(x: int, y: int) -> bool:
        if values[x] == gas and values[y] == gas:
            frozen = x if x == candidate[0] else y
            values[frozen], solid[0] = solid[0], solid[0] + 1
        if values[x] == gas:
            candidate[0] = x
        elif values[y] == gas:
            candidate[0] = y
        return values[x] < values[y]

    std_sort(list(range(n)), less)
    return values


@pytest.mark.parametrize("tie", [1, 2], ids=["distinct", "pairs_tied"])
@pytest.mark.parametrize("descending", [True, False])
def test_trim_replays_std_sorts_heapsort_past_its_depth_limit(
    tie: int, descending: bool, replay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 2000
    adversarial = torch.tensor([v // tie + 1 for v in quicksort_adversary(n)], dtype=torch.float32)
    magnitudes = adversarial if not descending else adversarial.max() + 1 - adversarial  # same path
    monkeypatch.setattr(sp, "SMALL", 16)
    heapsorts, heapsort_order = [], sp.heapsort_order
    monkeypatch.setattr(sp, "heapsort_order", lambda *a: heapsorts.append(1) or heapsort_order(*a))
    for lo, hi in [(0, n // 3), (n // 5, n // 2), (0, 1)]:
        order = torch.argsort(magnitudes, descending=descending)
        kept = torch.zeros(n, dtype=torch.bool)
        kept[order[lo:hi]] = True
        ours = sp.keep_sorted_range_(magnitudes.clone(), lo, hi, descending)
        assert torch.equal(ours != 0, kept)
    if replay == "torch_ops":  # the compiled replay's heapsort is not observable from here
        assert heapsorts, "the adversary did not reach std::sort's depth limit"


def test_sparsifying_methods_are_registered_under_mergekits_names() -> None:
    assert {"breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"} <= set(REGISTRY)
    for name in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"):
        assert name in mk_registry._METHODS


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("breadcrumbs", {"gamma": 1.5}, "method.gamma"),
        ("breadcrumbs_ties", {"density": 0.0}, "method.density"),
        ("della", {"density": 0.9, "epsilon": 0.15}, "method.epsilon"),
        ("della_linear", {"density": 0.1, "epsilon": 0.1}, "method.epsilon"),
        ("della", {"rescale": "l3"}, "method.rescale"),
        ("sce", {"select_topk": 0.0}, "method.select_topk"),
        ("sce", {"weight": 1.0}, "method.weight"),
        ("ties", {"int8_mask": "yes"}, "method.int8_mask"),
    ],
)
def test_bad_parameters_name_the_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build_method(name, params, [{"name": n} for n in EXPERTS])


def test_della_accepts_an_epsilon_that_only_full_density_would_break() -> None:
    build_method("della", {"density": 1.0, "epsilon": 0.5}, [{"name": n} for n in EXPERTS])
