"""SuperMerge on the real MiniLM-L6 through the CLI, and resume after kill -9 of a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from supermerge.cli import main
from supermerge.demo.toy import FACTORY, build_toy_suite
from tests.minilm import finetune_minilm, minilm_dir

TASKS = {
    "topic": (["I ate a bowl of rice.", "The pizza was hot.", "She won the match.", "He scored a goal.",
               "Soup with bread.", "The team lost again."], [0, 0, 1, 1, 0, 1]),
    "question": (["Where is the station?", "It is raining.", "Why did it fail?", "The door is open.",
                  "Who called?", "We left early."], [1, 0, 1, 0, 1, 0]),
    "sentiment": (["I love this.", "This is awful.", "What a great day.", "I hate waiting.",
                   "Wonderful news!", "Terrible service."], [1, 0, 1, 0, 1, 0]),
}  # fmt: skip


@pytest.fixture(scope="module")
def minilm_experts(tmp_path_factory) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    src = minilm_dir()
    root = tmp_path_factory.mktemp("minilm")
    experts, data = {}, {}
    for i, (task, (sentences, labels)) in enumerate(TASKS.items()):
        finetune_minilm(src, root / task, sentences, labels, seed=i)
        experts[task] = root / task
        data[task] = root / f"{task}.jsonl"
        data[task].write_text(
            "".join(
                json.dumps({"text": s, "label": y}) + "\n" for s, y in zip(sentences, labels, strict=True)
            )
        )
    return src, experts, data


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [0, 2])
def test_supermerge_on_real_minilm_experts_via_the_cli(
    tmp_path: Path, minilm_experts, capsys, group_size
) -> None:
    from transformers import AutoModel

    src, experts, data = minilm_experts
    doc = {
        "base": str(src),
        "experts": [{"name": t, "path": str(p), "data": str(data[t])} for t, p in experts.items()],
        "method": {"name": "supermerge", "steps": 3, "lr": 0.05, "group_size": group_size},
        "model": {"kind": "hf_encoder", "head": "classifier"},
        "heads": ["classifier.*"],
        "output": str(tmp_path / "merged"),
    }
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(doc))
    assert main(["-q", "merge", str(config)]) == 0
    line = capsys.readouterr().out
    assert "peak RSS" in line and "mean validation accuracy" in line
    out = tmp_path / "merged"
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    coefficients = json.loads((out / "coefficients.json").read_text())
    assert set(coefficients["effective"]) == set(TASKS)
    assert len(coefficients["nodes"]) == (1 if group_size == 0 else 2)
    for name in ("coefficients.png", "loss.png", "heads/topic.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name


def test_kill_9_mid_run_then_resume_reuses_finished_nodes_and_matches(tmp_path: Path) -> None:
    """A real process killed with SIGKILL while training the second tree node; --resume finishes it."""
    suite = build_toy_suite(tmp_path / "suite", seed=5)
    base, experts, val = suite.base, suite.experts, suite.validation
    entries = [
        {"name": f"{t}{i}", "path": str(p), "data": str(val[t])} for i in range(2) for t, p in experts.items()
    ]
    method = {"name": "supermerge", "steps": 150, "lr": 0.05, "group_size": 2, "checkpoint_every": 5}
    doc = {
        "base": str(base), "experts": entries, "method": method, "heads": ["head.*"],
        "model": {"kind": "torch_module", "factory": FACTORY},
    }  # fmt: skip
    for name in ("reference", "killed"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc | {"output": str(tmp_path / name)}))
    assert main(["-q", "merge", str(tmp_path / "reference.yaml")]) == 0

    run_dir = tmp_path / "killed.run"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "supermerge.cli", "-q", "merge", str(tmp_path / "killed.yaml")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "level0-node1.state.pt").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint of the second node within 120 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "tree" / "level0-node0" / "node.json").is_file()
    assert not (tmp_path / "killed").exists()

    assert main(["-q", "merge", str(tmp_path / "killed.yaml"), "--resume"]) == 0
    reference = json.loads((tmp_path / "reference" / "coefficients.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "coefficients.json").read_text())
    assert resumed["effective"] == reference["effective"]
    assert not run_dir.exists()
