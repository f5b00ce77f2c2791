"""Shared fixtures: tiny checkpoints on disk in every supported layout."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from supermerge.demo.toy import build_toy_suite
from tests.jobs import assert_clean_success, run_job, write_config

if not torch.cuda.is_available():  # Triton runs on the CPU only in its interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

TensorDict = dict[str, torch.Tensor]


def random_state(seed: int, shapes: dict[str, tuple[int, ...]] | None = None) -> TensorDict:
    """Fresh random fp32 weights (never zeros), one tensor per name."""
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {
        "embed.weight": (50, 16),
        "layer.0.linear.weight": (16, 16),
        "layer.0.linear.bias": (16,),
        "layer.1.linear.weight": (24, 16),
        "layer.1.norm.weight": (24,),
    }
    return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}


def perturbed(state: TensorDict, seed: int, scale: float = 0.1) -> TensorDict:
    """An 'expert': state plus a random task vector of relative size `scale`."""
    gen = torch.Generator().manual_seed(seed)
    return {n: t + scale * t.std() * torch.randn(t.shape, generator=gen) for n, t in state.items()}


def write_folder(path: Path, state: TensorDict, config: dict | None = None, shards: int = 1) -> Path:
    """Write `state` as an HF-style folder: model.safetensors, or `shards` files + index."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, str(path / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "toy", "hidden_size": 16}))
    return path


SEED_ENV_VAR = "SUPERMERGE_TEST_SEED"


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test, or $SUPERMERGE_TEST_SEED's to replay one. It is printed, so
    pytest shows it with a failure: rerun that test with SUPERMERGE_TEST_SEED=<seed>."""
    seed = int(os.environ.get(SEED_ENV_VAR) or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed}")
    return seed


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    """A generator seeded with the test's `seed`."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def base_state(seed: int) -> TensorDict:
    """Random base weights from the test's `seed` (offset: not the draws `gen` starts with)."""
    return random_state(seed + 1)


@pytest.fixture
def make_models(tmp_path: Path, base_state: TensorDict) -> Callable[..., tuple[Path, list[Path]]]:
    """Factory: writes base + k experts as folders under tmp_path; returns (base, experts)."""

    def make(k: int = 3, shards: int = 1, edit: Callable[[int, TensorDict], None] | None = None):
        base = write_folder(tmp_path / "base", base_state, shards=shards)
        experts = []
        for i in range(k):
            state = perturbed(base_state, seed=100 + i)
            if edit is not None:
                edit(i, state)
            experts.append(write_folder(tmp_path / f"expert{i}", state, shards=shards))
        return base, experts

    return make


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[..., Path]:
    """Factory: writes a merge YAML for base + experts; extra keys override the defaults."""
    import yaml

    def write(base: Path, experts: list[Path], **overrides) -> Path:
        doc = {
            "base": str(base),
            "experts": [{"name": p.name, "path": str(p)} for p in experts],
            "method": {"name": "task_arithmetic", "lambda": 0.5},
            "output": str(tmp_path / "merged"),
        }
        doc.update(overrides)
        path = tmp_path / "merge.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The toy suite (4 tasks) the multi-process tests merge."""
    return build_toy_suite(tmp_path_factory.mktemp("toy"), n_tasks=4, seed=11)


@pytest.fixture(scope="session")
def reference(toy, tmp_path_factory) -> dict[str, Path]:
    """One-process flat and hierarchical merges: what every launch must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    outputs = {}
    for kind, method in (("flat", {}), ("tree", {"group_size": 2})):
        config = write_config(folder, toy, kind, **method)
        assert_clean_success(run_job("none", 1, config))
        outputs[kind] = folder / kind
    return outputs
