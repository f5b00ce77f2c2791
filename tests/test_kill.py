"""Real `supermerge merge` processes SIGKILLed at random moments: the output is absent or complete,
the next run succeeds and leaves no temporary folder, and a learned run resumes to the W of an
uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from supermerge.io.checkpoint import Checkpoint
from tests.jobs import write_config

PARAMS_PER_TENSOR = 2**22  # 16 MiB in fp32
TENSORS = 6  # ~100 MiB per model: base + 2 experts read, ~100 MiB written in 5 shards
RUN_TIMEOUT_S = 300


def merge_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "supermerge", "-q", "merge", str(config), *extra]


def run_to_end(argv: list[str]) -> float:
    """Run a command to completion (it must succeed); returns its wall time in seconds."""
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return time.perf_counter() - start


def run_and_kill(argv: list[str], after_s: float) -> None:
    """Start a command in its own session and SIGKILL its whole group `after_s` seconds later
    (or let it finish first)."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        proc.wait(timeout=after_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def leftovers(output: Path) -> list[str]:
    """Temporary files or folders of a run beside the output."""
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(5)
    base = {f"layer.{i}.weight": torch.randn(PARAMS_PER_TENSOR, generator=gen) for i in range(TENSORS)}
    folders = []
    for name, scale in (("base", 0.0), ("e0", 0.01), ("e1", 0.02)):
        folder = root / name
        folder.mkdir()
        state = {n: t + scale * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        save_file(state, str(folder / "model.safetensors"))
        folders.append(folder)
    return folders[0], folders[1:]


@pytest.mark.slow
def test_a_merge_killed_at_random_moments_leaves_nothing_or_a_complete_output(
    big_models, tmp_path: Path, seed: int
) -> None:
    base, experts = big_models
    output = tmp_path / "merged"
    doc = {
        "base": str(base),
        "experts": [{"name": p.name, "path": str(p)} for p in experts],
        "method": {"name": "ties", "density": 0.5},
        "output": str(output),
        "shard_size": "20MB",
    }
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(doc))
    full_s = run_to_end(merge_command(config))
    reference = {n: Checkpoint(output).read(n) for n in Checkpoint(output).names}
    rng = random.Random(seed)
    for kill in range(5):  # five moments per run; each CI run draws new ones (its seed)
        after = rng.uniform(0.0, full_s)
        run_and_kill(merge_command(config, "--overwrite"), after)
        if output.exists():  # complete: every tensor there, as the uninterrupted run wrote it
            merged = Checkpoint(output)
            assert sorted(merged.names) == sorted(reference), f"kill {kill} at {after:.2f} s"
            for name, tensor in reference.items():
                assert torch.equal(merged.read(name), tensor), f"kill {kill} at {after:.2f} s: {name}"
        run_to_end(merge_command(config, "--overwrite"))
        assert leftovers(output) == [], f"kill {kill} at {after:.2f} s"
        assert all(torch.equal(Checkpoint(output).read(n), t) for n, t in reference.items())


def saved_step(state: Path) -> int:
    """The step of a training-state checkpoint (0 while there is none)."""
    try:
        return torch.load(state, weights_only=True)["step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return 0


@pytest.mark.slow
def test_a_learned_merge_killed_at_random_steps_resumes_to_the_uninterrupted_w(
    toy, tmp_path: Path, seed: int
) -> None:
    steps = 30
    run_to_end(merge_command(write_config(tmp_path, toy, "whole", steps=steps, checkpoint_every=1)))
    killed = write_config(tmp_path, toy, "killed", steps=steps, checkpoint_every=1)
    state = tmp_path / "killed.run" / "root.state.pt"
    targets = sorted(random.Random(seed).sample(range(1, steps), 3))
    for target in targets:  # each run resumes the last one and SIGKILLs itself once it has saved `target`
        env = os.environ | {"SUPERMERGE_TEST_KILL": f"0:{target + 1}"}  # as it starts step target + 1
        proc = subprocess.run(
            merge_command(killed, "--resume"), env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert saved_step(state) == target
    # then SIGKILLed from outside at a random moment (maybe while it writes a checkpoint; or it
    # finishes first), and resumed to the end
    run_and_kill(merge_command(killed, "--resume"), random.Random(seed).uniform(0.5, 3.0))
    if not (tmp_path / "killed").exists():
        run_to_end(merge_command(killed, "--resume"))
    whole, resumed = Checkpoint(tmp_path / "whole"), Checkpoint(tmp_path / "killed")
    for name in whole.names:
        assert torch.equal(whole.read(name), resumed.read(name)), name
    assert leftovers(tmp_path / "killed") == [] and not (tmp_path / "killed.run").exists()
