"""SuperMerge: gradients, the known-best merge of the toy suite, hierarchy, resume, memory, bad data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from supermerge.cli import main
from supermerge.config import config_from_dict
from supermerge.demo.toy import FACTORY, build_toy_suite, toy_accuracy
from supermerge.io.checkpoint import Checkpoint
from supermerge.learned.body import MergedBody
from supermerge.learned.coefficients import CoefficientLayout
from supermerge.learned.trainer import CoefficientTrainer
from supermerge.learned_merge import load_inputs, run_learned_merge
from supermerge.merge import run_merge
from supermerge.taskvectors.store import TaskVectorStore


@pytest.fixture
def toy_pair(tmp_path: Path, seed: int):
    """A fresh two-task toy suite from the test's printed `seed` (conftest's `toy` has four tasks)."""
    return build_toy_suite(tmp_path / "suite", seed=seed)


def toy_doc(tmp_path: Path, toy, **method) -> dict:
    base, experts, val = toy.base, toy.experts, toy.validation
    return {
        "base": str(base),
        "experts": [{"name": t, "path": str(p), "data": str(val[t])} for t, p in experts.items()],
        "method": {"name": "supermerge", "steps": 40, "lr": 0.05, "validation_size": 128} | method,
        "model": {"kind": "torch_module", "factory": FACTORY},
        "heads": ["head.*"],
        "output": str(tmp_path / "merged"),
    }


def merged_accuracy(out: Path, test) -> dict[str, float]:
    ckpt = Checkpoint(out)
    body = {n: ckpt.read(n) for n in ckpt.names}
    return {t: toy_accuracy(body, load_file(str(out / "heads" / f"{t}.safetensors")), *test[t]) for t in test}


def test_w_gradient_matches_finite_differences_in_float64(tmp_path: Path, gen: torch.Generator) -> None:
    """dLoss/dW through the whole step (merge, per-task losses, leaf gradient) vs central differences."""
    suite = build_toy_suite(tmp_path / "s", seed=3, n_val=16, n_test=1, dtype=torch.float64)
    doc = toy_doc(tmp_path, suite, validation_size=16, batch_size=5, impl="torch")
    run = load_inputs(config_from_dict(doc, tmp_path), torch.device("cpu"))
    source = run.source
    store = TaskVectorStore.build(source, torch.float64)
    body = MergedBody(store, CoefficientLayout.build(store.names), init=0.3, impl="torch")
    w = torch.randn(body.w.shape, generator=gen, dtype=torch.float64) * 0.5
    body.w = torch.nn.Parameter(w)  # W is fp32 in use
    trainer = CoefficientTrainer(
        body, run.model, list(run.tasks.values()), run.fixed, run.params.train_config()
    )

    def loss() -> float:
        body.w.grad = None
        return sum(trainer.losses_and_grad().values()) / len(run.tasks)

    loss()
    analytic = body.w.grad.clone()
    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    for idx in torch.cartesian_prod(torch.arange(body.w.shape[0]), torch.arange(body.w.shape[1])):
        i, j = int(idx[0]), int(idx[1])
        with torch.no_grad():
            body.w[i, j] += eps
        up = loss()
        with torch.no_grad():
            body.w[i, j] -= 2 * eps
        down = loss()
        with torch.no_grad():
            body.w[i, j] += eps
        numeric[i, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_finds_the_known_best_merge_and_beats_task_arithmetic(tmp_path: Path, seed: int) -> None:
    """Four tasks: each expert's useful layer should get ~0.9 and its noise layer ~0."""
    suite = build_toy_suite(tmp_path / "suite4", n_tasks=4, seed=seed)
    summary = run_learned_merge(
        config_from_dict(toy_doc(tmp_path, suite, steps=100), tmp_path), progress=False
    )
    out = Path(summary.output)
    record = json.loads((out / "coefficients.json").read_text())
    c = {t: dict(zip(record["columns"], row, strict=True)) for t, row in record["effective"].items()}
    for i, task in enumerate(suite.experts):
        assert c[task][f"branches.{i}.weight"] > 0.7, (task, c[task])
        assert abs(c[task][f"branches.{(i + 1) % 4}.weight"]) < 0.25, (task, c[task])
    ours = merged_accuracy(out, suite.test)
    best_ta = 0.0
    for lam in (0.3, 0.5, 0.7, 1.0):
        doc = toy_doc(tmp_path, suite) | {"method": {"name": "task_arithmetic", "lambda": lam}}
        doc["output"] = str(tmp_path / f"ta{lam}")
        run_merge(config_from_dict(doc, tmp_path), progress=False)
        acc = merged_accuracy(tmp_path / f"ta{lam}", suite.test)
        best_ta = max(best_ta, sum(acc.values()) / len(acc))
    mean = sum(ours.values()) / len(ours)
    assert mean > 0.85 and mean > best_ta + 0.1, (ours, best_ta)
    for name in ("coefficients.png", "loss.png", "validation_accuracy.json", "supermerge_merge.json"):
        assert (out / name).is_file(), name
    assert summary.validation_accuracy == json.loads((out / "validation_accuracy.json").read_text())


@pytest.mark.parametrize("granularity, columns", [("task", 1), ("block", 4)])
def test_coarser_granularities_share_coefficients(tmp_path: Path, toy_pair, granularity, columns) -> None:
    doc = toy_doc(tmp_path, toy_pair, granularity=granularity, blocks=[r"branches\.\d\."], steps=3)
    run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    record = json.loads((tmp_path / "merged" / "coefficients.json").read_text())
    assert len(record["columns"]) == columns
    assert set(record["tensors"].values()) == set(record["columns"])


def test_group_size_at_least_k_trains_the_flat_merge_alone(tmp_path: Path, toy_pair) -> None:
    flat = toy_doc(tmp_path, toy_pair, steps=8)
    run_learned_merge(config_from_dict(flat, tmp_path), progress=False)
    tree = toy_doc(tmp_path, toy_pair, steps=8, group_size=2) | {"output": str(tmp_path / "tree")}
    run_learned_merge(config_from_dict(tree, tmp_path), progress=False)
    (node,) = json.loads((tmp_path / "tree" / "coefficients.json").read_text())["nodes"]
    assert node["node"] == "root" and node["children"] == ["a", "b"]
    a, b = Checkpoint(tmp_path / "merged"), Checkpoint(tmp_path / "tree")
    for name in a.names:
        assert torch.equal(a.read(name), b.read(name)), name


def test_hierarchical_merge_trains_a_tree_and_multiplies_coefficients_along_its_paths(
    tmp_path: Path, toy
) -> None:
    """Four tasks, group_size 2: two level-0 nodes merge two experts each, the root merges those two
    intermediates; a task's effective coefficient is its node's coefficient times that node's at the
    root, and the output is the base plus effective coefficient x task vector."""
    doc = toy_doc(tmp_path, toy, steps=4, group_size=2)
    run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    record = json.loads((tmp_path / "merged" / "coefficients.json").read_text())
    nodes = {r["node"]: r for r in record["nodes"]}
    assert sorted(nodes) == ["level0-node0", "level0-node1", "root"]
    level0, root = [nodes["level0-node0"], nodes["level0-node1"]], nodes["root"]
    assert sorted(t for node in level0 for t in node["children"]) == sorted(toy.experts)
    assert all(len(node["children"]) == 2 and node["leaves"] == node["children"] for node in level0)
    assert root["children"] == ["level0-node0", "level0-node1"]
    assert sorted(root["leaves"]) == sorted(toy.experts)
    for task, effective in record["effective"].items():
        (node,) = [node for node in level0 if task in node["children"]]
        lower = node["coefficients"][node["children"].index(task)]
        upper = root["coefficients"][root["children"].index(node["node"])]
        assert effective == pytest.approx([a * b for a, b in zip(lower, upper, strict=True)], rel=1e-12)
        assert effective != pytest.approx(lower)  # the root's coefficients are not all 1

    base, merged = Checkpoint(toy.base), Checkpoint(tmp_path / "merged")
    experts = {t: Checkpoint(p) for t, p in toy.experts.items()}
    assert sorted(record["tensors"]) == sorted(n for n in base.names if not n.startswith("head."))
    for name, column in record["tensors"].items():
        j = record["columns"].index(column)
        b = base.read(name).double()
        expected = b + sum(
            c[j] * (experts[t].read(name).double() - b) for t, c in record["effective"].items()
        )
        torch.testing.assert_close(merged.read(name).double(), expected, rtol=1e-5, atol=1e-6)


def test_resume_after_a_crash_ends_with_the_same_w(tmp_path: Path, toy_pair, monkeypatch) -> None:
    doc = toy_doc(tmp_path, toy_pair, steps=12, checkpoint_every=5)
    run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    uninterrupted = json.loads((tmp_path / "merged" / "coefficients.json").read_text())["effective"]

    crashed = doc | {"output": str(tmp_path / "crashed")}
    real = CoefficientTrainer.losses_and_grad
    calls = {"n": 0}

    def crash_at_step_8(self):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated kill")
        return real(self)

    monkeypatch.setattr(CoefficientTrainer, "losses_and_grad", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        run_learned_merge(config_from_dict(crashed, tmp_path), progress=False)
    monkeypatch.setattr(CoefficientTrainer, "losses_and_grad", real)
    assert not (tmp_path / "crashed").exists()
    state = torch.load(tmp_path / "crashed.run" / "root.state.pt", weights_only=False)
    assert state["step"] == 5
    with pytest.raises(Exception, match="--resume"):
        run_learned_merge(config_from_dict(crashed, tmp_path), progress=False)
    run_learned_merge(config_from_dict(crashed, tmp_path), resume=True, progress=False)
    resumed = json.loads((tmp_path / "crashed" / "coefficients.json").read_text())["effective"]
    assert resumed == uninterrupted
    assert not (tmp_path / "crashed.run").exists()


def write_many_experts(tmp_path: Path, toy_pair, k: int) -> dict:
    """k experts: the toy's two, repeated with fresh perturbations, each with its own data."""
    experts, val = toy_pair.experts, toy_pair.validation
    doc = toy_doc(tmp_path, toy_pair, steps=2)
    entries = []
    for i in range(k):
        task = "ab"[i % 2]
        src = load_file(str(experts[task] / "model.safetensors"))
        gen = torch.Generator().manual_seed(i)
        state = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in src.items()}
        folder = tmp_path / f"k{k}" / f"e{i}"
        folder.mkdir(parents=True)
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"))
        entries.append({"name": f"e{i}", "path": str(folder), "data": str(val[task])})
    doc["experts"] = entries
    return doc


def test_hierarchical_peak_memory_is_flat_in_k_while_flat_merging_grows(tmp_path: Path, toy_pair) -> None:
    flat, tree = {}, {}
    for k in (4, 8):
        doc = write_many_experts(tmp_path, toy_pair, k)
        doc["output"] = str(tmp_path / f"k{k}" / "flat")
        flat[k] = run_learned_merge(config_from_dict(doc, tmp_path), progress=False).peak_tensor_bytes
        doc["output"] = str(tmp_path / f"k{k}" / "tree")
        doc["method"] = doc["method"] | {"group_size": 2}
        tree[k] = run_learned_merge(config_from_dict(doc, tmp_path), progress=False).peak_tensor_bytes
        nodes = json.loads((tmp_path / f"k{k}" / "tree" / "coefficients.json").read_text())["nodes"]
        assert len(nodes) == k - 1 and all(len(n["children"]) == 2 for n in nodes)  # k - 1 pair merges
    n_bytes = sum(math.prod(s) for s in [(16, 8), (16,)] * 4) * 4  # the toy body: 4 branches
    for k in (4, 8):
        assert flat[k] == (k + 1) * n_bytes + 2 * n_bytes  # k task vectors + base, merged + grad
        assert tree[k] == (2 + 1) * n_bytes + 2 * n_bytes  # g = 2 task vectors + base, merged + grad
    assert flat[8] > 2 * tree[8]


def assert_refused(capsys, tmp_path: Path, doc: dict, *needles: str) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(doc))
    code = main(["-q", "merge", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("supermerge: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not Path(doc["output"]).exists()


def test_empty_validation_set_is_refused(capsys, tmp_path: Path, toy_pair) -> None:
    torch.save({"x": torch.zeros(0, 8), "y": torch.zeros(0, dtype=torch.int64)}, tmp_path / "empty.pt")
    doc = toy_doc(tmp_path, toy_pair)
    doc["experts"][1]["data"] = str(tmp_path / "empty.pt")
    assert_refused(capsys, tmp_path, doc, "empty.pt", "no validation examples", "'b'")


def test_label_out_of_range_for_the_head_is_refused(capsys, tmp_path: Path, toy_pair) -> None:
    y = torch.arange(20) % 4
    y[7] = 9
    torch.save({"x": torch.ones(20, 8), "y": y}, tmp_path / "bad.pt")
    doc = toy_doc(tmp_path, toy_pair)
    doc["experts"][0]["data"] = str(tmp_path / "bad.pt")
    assert_refused(capsys, tmp_path, doc, "bad.pt", "example 7", "label 9", "4 classes")


def test_task_names_of_data_and_experts_must_match(capsys, tmp_path: Path, toy_pair) -> None:
    val = toy_pair.validation
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for task, src in val.items():
        (data_dir / f"{task}.pt").write_bytes(src.read_bytes())
    (data_dir / "c.pt").write_bytes(val["a"].read_bytes())
    doc = toy_doc(tmp_path, toy_pair) | {"data_dir": str(data_dir)}
    for e in doc["experts"]:
        del e["data"]
    assert_refused(capsys, tmp_path, doc, "data_dir", "task 'c' has data but no expert")
    (data_dir / "c.pt").unlink()
    (data_dir / "b.pt").unlink()
    assert_refused(capsys, tmp_path, doc, "experts[1].data", "task 'b' has no validation data")


def test_early_stop_ends_the_run_after_patience_steps_without_improvement(tmp_path: Path, toy_pair) -> None:
    doc = toy_doc(tmp_path, toy_pair, steps=50, lr=1e-9, early_stop_patience=2, early_stop_min_delta=1.0)
    run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    (node,) = json.loads((tmp_path / "merged" / "coefficients.json").read_text())["nodes"]
    assert len(node["losses"]) == 3  # the first step sets the best loss, two more without gain


def test_hf_encoder_kind_needs_a_config_and_the_named_head(capsys, tmp_path: Path, toy_pair) -> None:
    from tests.test_merge_end_to_end import add_head, tiny_bert

    doc = toy_doc(tmp_path, toy_pair) | {"model": {"kind": "hf_encoder"}}
    assert_refused(capsys, tmp_path, doc, "model.kind", "config.json")

    base = tiny_bert(tmp_path / "bert")
    expert = tiny_bert(tmp_path / "bert_expert", seed=1)
    add_head(expert, classes=3, seed=0)
    (tmp_path / "v.jsonl").write_text('{"text": "a b c", "label": 1}\n')
    capsys.readouterr()  # drop transformers' save progress bars
    doc = doc | {
        "base": str(base),
        "experts": [{"name": "t", "path": str(expert), "data": str(tmp_path / "v.jsonl")}],
        "model": {"kind": "hf_encoder", "head": "score"},
        "heads": ["classifier.*"],
    }
    assert_refused(capsys, tmp_path, doc, "bert_expert", "no head tensor 'score.weight'")


def test_distillation_finds_the_known_best_merge_without_labels(tmp_path: Path, seed: int) -> None:
    """The label-free objective on a classifier: each task's expert logits as targets (labels
    never read) lead to the same answer as cross entropy: useful layers kept, noise layers off."""
    suite = build_toy_suite(tmp_path / "suite4", n_tasks=4, seed=seed)
    for path in suite.validation.values():  # unlabelled inputs: drop y
        torch.save({"x": torch.load(path, weights_only=True)["x"]}, path)
    doc = toy_doc(tmp_path, suite, steps=100, objective="distill", temperature=2.0)
    summary = run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    record = json.loads((Path(summary.output) / "coefficients.json").read_text())
    c = {t: dict(zip(record["columns"], row, strict=True)) for t, row in record["effective"].items()}
    for i, task in enumerate(suite.experts):
        assert c[task][f"branches.{i}.weight"] > 0.7, (task, c[task])
        assert abs(c[task][f"branches.{(i + 1) % 4}.weight"]) < 0.25, (task, c[task])
    ours = merged_accuracy(Path(summary.output), suite.test)
    assert sum(ours.values()) / len(ours) > 0.85, ours
