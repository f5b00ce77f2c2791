"""Causal LMs (`model.kind: hf_causal_lm`) through the rest of the learned-merge engine, on tiny random
Llama (tied and untied) and Qwen2 models: `supermerge plan` and the decoder layers as gather units,
a tied output projection gathered layer by layer, layer gathers on one rank against the whole
body, a hierarchical tree that transformers loads, a tree SIGKILLed twice that resumes bitwise to
the uninterrupted run, and 2 gloo ranks (torchrun with body and layer gathers, DeepSpeed ZeRO CPU
offload) giving the one-process merge with each objective: cross_entropy and entropy flat, distill
in a tree (whose targets the leader computes once for every rank)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from supermerge.cli import main
from supermerge.config import load_config
from supermerge.distributed.comm import Comm
from supermerge.distributed.layer_gather import LayerGather, Owners, find_units
from supermerge.learned.task_models import build_task_model
from supermerge.learned_merge import run_learned_merge
from supermerge.taskvectors.source import open_source
from tests.jobs import TOL, assert_clean_success, run_job, write_lm_config
from tests.lm import choice_task, generation_task, lm_expert, tiny_config, tiny_lm

# a decoder layer of tests.lm's models (hidden 32, 4 heads of 8, 2 key-value heads, MLP 64): q and o
# 32 x 32, k and v 16 x 32, gate, up and down 64 x 32, two norms of 32; Qwen2 adds q, k, v biases
LAYER_ELEMENTS = {"llama": 2 * 1024 + 2 * 512 + 3 * 2048 + 2 * 32, "qwen2": 9280 + 32 + 16 + 16}
# Adam turns a W gradient whose terms nearly cancel into a full lr-sized step, so another float
# summation order (ranks, or a tree's intermediate model read back) moves such a coefficient by up
# to ~1e-5 in a few steps on these tiny LMs; a wrong gradient moves it by ~lr = 0.1
COEFFICIENT_TOL = 1e-4


@dataclass
class Suite:
    """A tiny random causal LM base, k experts of it and one generative task file per expert."""

    folder: Path
    base: Path
    tasks: dict[str, tuple[Path, Path]]  # task -> (expert folder, task file)

    def config(self, folder: Path, output: str, k: int, **method) -> Path:
        tasks = dict(list(self.tasks.items())[:k])
        return write_lm_config(folder, self.base, tasks, output, **method)


def build_suite(folder: Path, family: str = "llama", k: int = 3, tied: bool = False) -> Suite:
    folder.mkdir(parents=True, exist_ok=True)
    base = tiny_lm(folder / "base", 0, family=family, tied=tied)
    tasks = {}
    for i in range(k):
        make = choice_task if i % 2 == 0 else generation_task
        tasks[f"t{i}"] = (lm_expert(base, folder / f"e{i}", i + 1), make(folder / f"t{i}.jsonl", 10 + i))
    return Suite(folder, base, tasks)


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Suite:
    return build_suite(tmp_path_factory.mktemp("lm"))


# the one-process runs every launch is compared with; "tree" is also the kill test's uninterrupted run
REFERENCES = {
    "flat": {"k": 2},
    "entropy": {"k": 2, "objective": "entropy"},
    "tree": {"k": 3, "objective": "distill", "group_size": 2, "steps": 4, "checkpoint_every": 1},
}


@pytest.fixture(scope="module")
def reference(suite: Suite, tmp_path_factory):
    """reference(kind) -> the one-process output folder of REFERENCES[kind], run once per module, in
    this process (a new one spends seconds importing transformers) on one thread, as run_job's
    processes compute (OMP_NUM_THREADS=1): the same floats as `supermerge merge` gives there."""
    folder = tmp_path_factory.mktemp("lm-reference")
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                run_learned_merge(load_config(suite.config(folder, kind, **REFERENCES[kind])), progress=False)
            finally:
                torch.set_num_threads(threads)
            done[kind] = folder / kind
        return done[kind]

    return get


def coefficients(output: Path) -> dict:
    return json.loads((output / "coefficients.json").read_text())


def assert_same_learned_merge(a: Path, b: Path) -> None:
    """The same merged tensors (fp32 sums in another order) and the same W of every node."""
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], atol=TOL, rtol=TOL, msg=name)
    ca, cb = coefficients(a), coefficients(b)
    assert [n["node"] for n in ca["nodes"]] == [n["node"] for n in cb["nodes"]]
    for na, nb in zip(ca["nodes"], cb["nodes"], strict=True):
        assert na["children"] == nb["children"], na["node"]
        wa, wb = torch.tensor(na["coefficients"]), torch.tensor(nb["coefficients"])
        torch.testing.assert_close(wa, wb, atol=COEFFICIENT_TOL, rtol=0, msg=na["node"])
        assert na["losses"][0] != na["losses"][-1], f"{na['node']}: W did not train"
    for task in ca["effective"]:
        ea, eb = torch.tensor(ca["effective"][task]), torch.tensor(cb["effective"][task])
        torch.testing.assert_close(ea, eb, atol=COEFFICIENT_TOL, rtol=0, msg=task)


# ---------------------------------------------------------------- plan and gather units (one process)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_plan_finds_the_decoder_layers_as_gather_units(
    family: str, suite: Suite, tmp_path: Path, capsys
) -> None:
    lm = suite if family == "llama" else build_suite(tmp_path / family, family, k=2)
    config = lm.config(tmp_path, "planned", 2, distributed={"gather": "layer"})
    assert main(["plan", str(config), "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 rank(s) = 2 layer shard(s) x 1 task group(s); k = 2 tasks" in out
    assert "merged body" not in out and "largest layer gathered, with its gradient" in out
    assert f"largest gather unit {LAYER_ELEMENTS[family]:,} elements" in out
    assert not (tmp_path / "planned").exists()
    cfg = load_config(config)
    source = open_source(cfg.base, [(e.name, e.path) for e in cfg.experts], cfg.heads)
    names = list(source.names)
    units = find_units(
        build_task_model(cfg.model, source.base).module, names, [source.base.infos[n].shape for n in names]
    )
    labels = [u.label for u in units]
    assert labels == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    for i in (0, 1):
        layer = units[labels.index(f"model.layers.{i}")]
        assert [names[t] for t in layer.tensors] == [n for n in names if n.startswith(f"model.layers.{i}.")]
        assert layer.numel == LAYER_ELEMENTS[family] and len(layer.runs) == 1
    body_config = lm.config(tmp_path, "planned_body", 2)
    assert main(["plan", str(body_config), "--ranks", "2"]) == 0
    assert "merged body" in capsys.readouterr().out


def test_a_tied_output_projection_is_gathered_with_its_embedding_and_their_gradients_add_up(
    gen: torch.Generator,
) -> None:
    """Layer gathers of a tied Llama (lm_head's weight is the input embedding, one merged tensor):
    the embedding's unit and lm_head's each gather it; the logits and the summed gradient are
    those of the whole body."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(tiny_config("llama", tied=True)).eval()
    skeleton.lm_head.weight = skeleton.model.embed_tokens.weight  # tied as the checkpoint is
    names = [n for n, _ in skeleton.named_parameters()]
    shapes = [tuple(p.shape) for _, p in skeleton.named_parameters()]
    assert "lm_head.weight" not in names
    units = find_units(skeleton, names, shapes)
    labels = [u.label for u in units]
    embedding = names.index("model.embed_tokens.weight")
    assert units[labels.index("lm_head")].tensors == [embedding]
    assert units[labels.index("model.embed_tokens")].tensors == [embedding]

    n = sum(math.prod(s) for s in shapes)
    flat = 0.1 * torch.randn(n, generator=gen)
    inputs = {"input_ids": torch.randint(3, 256, (2, 7), generator=gen)}
    probe = torch.randn(2, 7, 256, generator=gen)
    owners = Owners(Comm(None, [0], 0), n, flat, torch.zeros(n))
    with LayerGather(units, owners, torch.float32).installed():
        logits = functional_call(skeleton, {}, args=(), kwargs=inputs).logits
        (logits * probe).sum().backward()
    whole = flat.clone().requires_grad_()
    parts = whole.split([math.prod(s) for s in shapes])
    params = {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}
    expected = functional_call(skeleton, params, args=(), kwargs=inputs).logits
    (expected * probe).sum().backward()
    torch.testing.assert_close(logits, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        owners.grad_piece, whole.grad, atol=1e-5 * float(whole.grad.abs().max()), rtol=0
    )


@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("llama", True), ("qwen2", False)])
def test_layer_gathers_in_one_process_give_the_merge_of_the_whole_body(
    family: str, tied: bool, tmp_path: Path
) -> None:
    """`gather: layer` on one rank (a ShardedBody of one piece: every unit gathered by the hooks as
    its module runs, the output projection included) learns the W of the whole-body merge."""
    lm = build_suite(tmp_path / "models", family, k=2, tied=tied)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for gather in ("body", "layer"):
            config = lm.config(tmp_path, gather, 2, distributed={"gather": gather})
            run_learned_merge(load_config(config), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert_same_learned_merge(tmp_path / "body", tmp_path / "layer")


# ---------------------------------------------------------------- one process: tree, kill and resume


@pytest.mark.slow
def test_a_hierarchical_merge_writes_the_tree_and_a_model_transformers_loads(reference) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = reference("tree")
    c = coefficients(output)
    nodes = {n["node"]: n for n in c["nodes"]}
    assert list(nodes) == ["level0-node0", "root"]  # 3 tasks in groups of 2: a pair, then the third
    node, root = nodes["level0-node0"], nodes["root"]
    (single,) = set(c["tasks"]) - set(node["children"])
    assert root["children"] == ["level0-node0", single] and c["tasks"] == ["t0", "t1", "t2"]
    for child, row in zip(node["children"], node["coefficients"], strict=True):
        path = torch.tensor(row) * torch.tensor(root["coefficients"][0])
        torch.testing.assert_close(torch.tensor(c["effective"][child]), path)
    torch.testing.assert_close(torch.tensor(c["effective"][single]), torch.tensor(root["coefficients"][1]))
    assert len(c["columns"]) == len(c["effective"]["t0"]) == 21  # one column per tensor

    model, info = AutoModelForCausalLM.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    stored = load_file(str(output / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in stored.items())
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer(["copy abc:"], return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def saved_step(state: Path) -> int:
    return torch.load(state, weights_only=True)["step"]


@pytest.mark.slow
def test_a_tree_killed_in_each_node_resumes_to_the_uninterrupted_merge(
    suite: Suite, reference, tmp_path: Path
) -> None:
    """SIGKILLed (SUPERMERGE_TEST_KILL) at step 3 of the first level's node, then, resumed, at step 2
    of the root (the node finishes steps 3 and 4 first): the last resume reuses the finished node,
    continues the root from its checkpoint and ends bitwise where one uninterrupted run does
    (distill: the cached targets are read back)."""
    whole = reference("tree")
    config = suite.config(tmp_path, "killed", **REFERENCES["tree"])
    run = tmp_path / "killed.run"
    for node, step, finished in (("level0-node0", 3, []), ("root", 2, ["level0-node0"])):
        killed = run_job("none", 1, config, "--resume", env={"SUPERMERGE_TEST_KILL": f"0:{step}"})
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert saved_step(run / f"{node}.state.pt") == step - 1
        assert sorted(p.name for p in (run / "tree").glob("*") if (p / "node.json").exists()) == finished
        assert len(list((run / "targets").glob("*.safetensors"))) == 3
        assert not (tmp_path / "killed").exists()
    assert_clean_success(run_job("none", 1, config, "--resume"))
    assert not run.exists()
    a, b = (
        load_file(str(whole / "model.safetensors")),
        load_file(str(tmp_path / "killed" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    ca, cb = coefficients(whole), coefficients(tmp_path / "killed")
    assert ca["effective"] == cb["effective"]
    assert [n["coefficients"] for n in ca["nodes"]] == [n["coefficients"] for n in cb["nodes"]]
    assert [n["losses"] for n in ca["nodes"]] == [n["losses"] for n in cb["nodes"]]


# ---------------------------------------------------------------- two ranks against one process


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "kind", "distributed"),
    [
        ("torchrun", "flat", {"gather": "body"}),
        ("torchrun", "entropy", {"gather": "body"}),
        ("torchrun", "tree", {"gather": "body"}),
        pytest.param("torchrun", "flat", {"gather": "layer"}),
        ("deepspeed", "flat", {"offload": "cpu", "prefetch_elements": 1000}),
    ],
)
def test_two_ranks_give_the_one_process_merge(
    launcher: str, kind: str, distributed: dict, suite: Suite, reference, tmp_path: Path
) -> None:
    expected = reference(kind)
    settings = REFERENCES[kind]
    result = run_job(launcher, 2, suite.config(tmp_path, kind, **settings, distributed=distributed))
    assert_clean_success(result)
    assert "on 2 ranks" in result.stdout
    assert_same_learned_merge(expected, tmp_path / kind)
    summary = json.loads((tmp_path / kind / "supermerge_merge.json").read_text())["summary"]
    assert summary["ranks"] == 2 and summary["comm_bytes_per_step"]["merged"] > 0
    if settings.get("objective") == "distill":  # the leader computes the targets, the other rank reads them
        k = settings["k"]
        assert result.stderr.count("distillation targets of") == 2 * k, result.stderr[-3000:]
        assert result.stderr.count(": computing with") == k and result.stderr.count(": cached at") == k
