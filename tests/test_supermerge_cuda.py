"""On a GPU the engine runs the Triton kernels; results equal the CPU path's up to fp32 rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from supermerge.config import config_from_dict
from supermerge.demo.toy import FACTORY, build_toy_suite
from supermerge.io.checkpoint import Checkpoint
from supermerge.learned_merge import run_learned_merge
from supermerge.merge import run_merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def toy_doc(root: Path, suite, device: str, output: str, method: dict) -> dict:
    base, experts, val = suite.base, suite.experts, suite.validation
    return {
        "base": str(base),
        "experts": [{"name": t, "path": str(p), "data": str(val[t])} for t, p in experts.items()],
        "method": method,
        "model": {"kind": "torch_module", "factory": FACTORY},
        "heads": ["head.*"],
        "device": device,
        "output": str(root / output),
    }


def test_learned_merge_on_cuda_uses_triton_and_matches_cpu(tmp_path: Path, monkeypatch, seed: int) -> None:
    suite = build_toy_suite(tmp_path / "suite", seed=seed)
    method = {"name": "supermerge", "steps": 30, "lr": 0.05, "validation_size": 128}
    calls = []
    from supermerge.kernels import autograd as triton_autograd

    real = triton_autograd.GroupedWeightedSumFunction.apply
    monkeypatch.setattr(
        triton_autograd.GroupedWeightedSumFunction, "apply", lambda *a: calls.append(1) or real(*a)
    )
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = config_from_dict(toy_doc(tmp_path, suite, device, device, method), tmp_path)
        summary = run_learned_merge(cfg, progress=False)
        runs[device] = json.loads((Path(summary.output) / "coefficients.json").read_text())["effective"]
        if device == "cuda":
            assert summary.peak_cuda_bytes and summary.peak_cuda_bytes > 0
    assert calls, "the CUDA run did not go through the Triton kernel"
    for task in runs["cpu"]:
        torch.testing.assert_close(
            torch.tensor(runs["cuda"][task]), torch.tensor(runs["cpu"][task]), atol=1e-4, rtol=1e-4
        )
    cpu, gpu = Checkpoint(tmp_path / "cpu"), Checkpoint(tmp_path / "cuda")
    for name in cpu.names:
        torch.testing.assert_close(gpu.read(name), cpu.read(name), atol=1e-4, rtol=1e-4)


def test_ties_on_cuda_matches_cpu(tmp_path: Path) -> None:
    suite = build_toy_suite(tmp_path / "suite", seed=1)
    method = {"name": "ties", "density": 0.5}
    for device in ("cpu", "cuda"):
        run_merge(
            config_from_dict(toy_doc(tmp_path, suite, device, device, method), tmp_path), progress=False
        )
    cpu, gpu = Checkpoint(tmp_path / "cpu"), Checkpoint(tmp_path / "cuda")
    for name in cpu.names:
        torch.testing.assert_close(gpu.read(name), cpu.read(name), rtol=1e-6, atol=1e-6)


def test_dare_on_cuda_repeats_for_the_same_seed(tmp_path: Path) -> None:
    """DARE draws masks from the device's generator: reproducible per device and seed."""
    suite = build_toy_suite(tmp_path / "suite", seed=2)
    method = {"name": "dare_ties", "density": 0.5}
    for run in ("one", "two"):
        run_merge(config_from_dict(toy_doc(tmp_path, suite, "cuda", run, method), tmp_path), progress=False)
    one, two = Checkpoint(tmp_path / "one"), Checkpoint(tmp_path / "two")
    for name in one.names:
        assert torch.equal(one.read(name), two.read(name)), name
