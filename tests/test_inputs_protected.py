"""No command writes into or over what it reads; no non-finite number reaches a merge; a learned
run stops cleanly when its loss turns non-finite; a tampered run state is refused, not run."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from supermerge.cli import main
from tests import hooks
from tests.files import tree_hashes
from tests.test_supermerge import toy_doc


def refused(capsys, *argv: str) -> str:
    """Run the CLI; assert exit code 2 and a one-line error, which is returned."""
    code = main(["-q", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("supermerge: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "where", ["base", "base via ..", "base via a symlink", "inside an expert", "contains the base file"]
)
def test_a_merge_refuses_an_output_over_its_inputs_even_with_overwrite(
    capsys, make_models, write_yaml, tmp_path: Path, where: str
) -> None:
    base, experts = make_models(k=2)
    base_ref = base / "model.safetensors" if where == "contains the base file" else base
    (tmp_path / "link").symlink_to(base)
    output, culprit = {
        "base": (base, base),
        "base via ..": (tmp_path / "expert0" / ".." / "base", base),
        "base via a symlink": (tmp_path / "link", base),
        "inside an expert": (experts[1] / "merged", experts[1]),
        "contains the base file": (base, base_ref),
    }[where]
    before = tree_hashes(base, *experts)
    err = refused(capsys, "merge", str(write_yaml(base_ref, experts, output=str(output))), "--overwrite")
    assert str(output) in err and str(culprit) in err and "which this command reads" in err
    assert tree_hashes(base, *experts) == before
    assert not (experts[1] / "merged").exists()
    assert not any(".tmp" in p.name for p in tmp_path.rglob("*"))


def test_a_learned_merge_refuses_an_output_that_holds_its_validation_data(
    capsys, toy, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(toy.validation["a"], data / "a.pt")
    doc = toy_doc(tmp_path, toy, steps=2) | {"output": str(data)}
    doc["experts"][0]["data"] = str(data / "a.pt")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    before = tree_hashes(data)
    err = refused(capsys, "merge", str(tmp_path / "m.yaml"), "--overwrite")
    assert "the output contains the data of task 'a'" in err
    assert tree_hashes(data) == before


def test_finetune_refuses_a_cache_whose_experts_folder_holds_the_suite(capsys, tmp_path: Path) -> None:
    suite = tmp_path / "cache" / "experts"
    suite.mkdir(parents=True)
    rows = [{"text": f"t{i}", "label": i % 2, "split": "test" if i % 4 == 3 else "train"} for i in range(12)]
    (suite / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = tree_hashes(tmp_path)
    (tmp_path / "base").mkdir()
    argv = [
        "finetune",
        "--suite",
        str(suite),
        "--base",
        str(tmp_path / "base"),
        "--cache",
        str(tmp_path / "cache"),
    ]
    err = refused(capsys, *argv)
    assert "the expert cache contains the task file of 'task'" in err and "task.jsonl" in err
    assert tree_hashes(tmp_path) == before


def test_evaluate_refuses_a_json_path_inside_the_model(capsys, make_models, tmp_path: Path) -> None:
    base, _ = make_models(k=1)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "t.jsonl").write_text(json.dumps({"text": "x", "label": 0, "split": "test"}) + "\n")
    before = tree_hashes(base, suite)
    err = refused(capsys, "evaluate", str(base), "--suite", str(suite), "--json", str(base / "acc.json"))
    assert "the JSON output lies inside the model" in err
    assert tree_hashes(base, suite) == before and not (base / "acc.json").exists()


@pytest.mark.parametrize(
    "method, experts, field",
    [
        ({"name": "ties", "lambda": float("nan")}, {}, "method.lambda"),
        ({"name": "ties", "lambda": float("inf")}, {}, "method.lambda"),
        ({"name": "task_arithmetic"}, {"weight": float("-inf")}, "experts[0].weight"),
        ({"name": "supermerge", "lr": float("nan")}, {}, "method.lr"),
    ],
)
def test_non_finite_numbers_in_the_yaml_are_refused(
    capsys, make_models, write_yaml, tmp_path: Path, method: dict, experts: dict, field: str
) -> None:
    base, paths = make_models(k=2)
    config = write_yaml(base, paths, method=method)
    doc = yaml.safe_load(config.read_text())
    doc["experts"][0].update(experts)
    config.write_text(yaml.safe_dump(doc))
    before = tree_hashes(base, *paths, config)
    err = refused(capsys, "merge", str(config))
    assert f"field '{field}'" in err and "finite" in err
    assert not (tmp_path / "merged").exists() and tree_hashes(base, *paths, config) == before


def test_a_learned_run_whose_loss_turns_nan_stops_naming_step_and_task_and_keeps_its_checkpoint(
    capsys, toy, tmp_path: Path, monkeypatch
) -> None:
    steps_before_nan, tasks = 5, list(toy.experts)
    monkeypatch.setattr(hooks, "calls", 0)
    monkeypatch.setattr(hooks, "NAN_FROM_CALL", steps_before_nan * len(tasks) + 1)  # one batch per task
    method = {"objective": "tests.hooks:nan_later", "validation_size": 16, "batch_size": 16}
    doc = toy_doc(tmp_path, toy, steps=10, checkpoint_every=2, **method)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    before = tree_hashes(toy.base, *toy.experts.values(), *map(Path, toy.validation.values()))
    err = refused(capsys, "merge", str(tmp_path / "m.yaml"))
    assert tree_hashes(toy.base, *toy.experts.values(), *map(Path, toy.validation.values())) == before
    assert f"step {steps_before_nan + 1}: the loss of task '{tasks[0]}' is nan" in err, err
    state = torch.load(tmp_path / "merged.run" / "root.state.pt", weights_only=True)
    assert state["step"] == 4 and torch.isfinite(state["w"]).all()
    assert not (tmp_path / "merged").exists()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_tampered_run_state_is_refused_without_running_its_code(capsys, toy, tmp_path: Path) -> None:
    doc = toy_doc(tmp_path, toy, steps=2)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    marker = tmp_path / "code-ran"
    (tmp_path / "merged.run").mkdir()
    (tmp_path / "merged.run" / "root.state.pt").write_bytes(pickle.dumps({"w": _RunsCode(marker)}))
    err = refused(capsys, "merge", str(tmp_path / "m.yaml"), "--resume")
    assert "root.state.pt: not a training state this version reads safely" in err
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_a_run_state_saved_with_torch_optims_adam_is_refused_on_resume_and_kept(
    capsys, toy, tmp_path: Path, monkeypatch
) -> None:
    """A state from before learned/adam.py (torch.optim.Adam's state_dict) is named and refused."""
    tasks = list(toy.experts)
    monkeypatch.setattr(hooks, "calls", 0)
    monkeypatch.setattr(hooks, "NAN_FROM_CALL", 5 * len(tasks) + 1)  # a checkpoint at step 4 is left
    method = {"objective": "tests.hooks:nan_later", "validation_size": 16, "batch_size": 16}
    doc = toy_doc(tmp_path, toy, steps=10, checkpoint_every=2, **method)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    refused(capsys, "merge", str(tmp_path / "m.yaml"))
    path = tmp_path / "merged.run" / "root.state.pt"
    state = torch.load(path, weights_only=True)
    w = state["w"].clone().requires_grad_()
    w.grad = torch.ones_like(w)
    old = torch.optim.Adam([w], lr=0.05)
    old.step()
    torch.save(state | {"optimizer": old.state_dict()}, path)
    before = tree_hashes(path)
    err = refused(capsys, "merge", str(tmp_path / "m.yaml"), "--resume")
    assert "root.state.pt: the saved Adam state has fields ['param_groups', 'state']" in err, err
    assert "start over with --overwrite" in err
    assert tree_hashes(path) == before and not (tmp_path / "merged").exists()
