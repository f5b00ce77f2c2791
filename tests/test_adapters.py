"""PEFT adapters as experts: LoRA and IA3 read as the task vectors PEFT's merge_and_unload makes,
merged alone or beside dense experts, and every adapter we cannot merge refused by name.

The reference is PEFT itself: each adapter is merged into its base with `merge_and_unload` and
saved as a dense expert; the adapter's task vector must equal (dense expert - base) per tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from supermerge.cli import main
from supermerge.errors import InputError
from supermerge.io.adapters import AdapterCheckpoint
from supermerge.io.checkpoint import Checkpoint
from tests.lm import byte_tokenizer, tiny_lm, write_lm

peft = pytest.importorskip("peft")


def make_adapter(base: Path, path: Path, config, seed: int) -> tuple[Path, Path]:
    """An adapter of `base` with random weights (both LoRA factors, IA3 vectors away from 1), and
    the dense expert PEFT's merge_and_unload makes of it: (adapter folder, dense folder)."""
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "ia3_l" in name or p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "ia3_l" in name else 0.0))
    model.save_pretrained(path)
    dense = write_lm(path.with_name(path.name + "-dense"), model.merge_and_unload(), byte_tokenizer())
    return path, dense


def lora(**overrides):
    settings = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 16}, init_lora_weights=False,
    )  # fmt: skip
    return peft.LoraConfig(**(settings | overrides))


ADAPTERS: dict[str, Callable[[], object]] = {
    "lora_rank_and_alpha_patterns_embedding": lambda: lora(),
    "lora_rslora": lambda: lora(use_rslora=True),
    "lora_bias_all": lambda: lora(bias="all", target_modules=["q_proj", "o_proj"]),
    "lora_lm_head_saved_whole": lambda: lora(target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "ia3_with_feedforward": lambda: peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm(tmp_path_factory.mktemp("adapters") / "base", seed=0)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_adapter_task_vectors_equal_peft_merge_and_unload(base: Path, tmp_path: Path, kind: str) -> None:
    adapter, dense = make_adapter(base, tmp_path / kind, ADAPTERS[kind](), seed=1)
    base_ckpt = Checkpoint(base)
    ours, theirs = AdapterCheckpoint(adapter, base_ckpt), Checkpoint(dense)
    changed = 0
    for name in base_ckpt.names:
        want = theirs.read(name).float() - base_ckpt.read(name).float()
        got = ours.task_vector(name)
        scale = max(want.abs().max().item(), 1e-30)
        assert (got - want).abs().max().item() <= 1e-5 * scale + 1e-7, name
        assert torch.allclose(ours.read(name), theirs.read(name), rtol=1e-5, atol=1e-6), name
        changed += bool(want.abs().max() > 0)
    assert changed == len(ours.deltas)  # every tensor PEFT changed, and only those


def run_cli(*argv: str) -> int:
    return main(["-q", *argv])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "average"])
def test_merge_of_adapters_and_a_dense_expert_equals_the_merge_of_their_dense_experts(
    base: Path, tmp_path: Path, method: str
) -> None:
    lora_adapter, lora_dense = make_adapter(base, tmp_path / "lora", ADAPTERS["lora_rslora"](), seed=2)
    ia3_adapter, ia3_dense = make_adapter(base, tmp_path / "ia3", ADAPTERS["ia3_with_feedforward"](), seed=3)
    dense_expert = tiny_lm(tmp_path / "dense", seed=4)  # a full fine-tune, as far as merging goes
    params = {"name": method, **({"lambda": 0.7} if method != "average" else {})}
    params |= {"density": 0.5} if method == "ties" else {}

    def merge(experts: list[Path], out: Path) -> Checkpoint:
        doc = {
            "base": str(base),
            "experts": [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(experts)],
            "method": params,
            "output": str(out),
        }
        (tmp_path / "merge.yaml").write_text(yaml.safe_dump(doc))
        assert run_cli("merge", str(tmp_path / "merge.yaml")) == 0
        return Checkpoint(out)

    ours = merge([lora_adapter, ia3_adapter, dense_expert], tmp_path / "from_adapters")
    theirs = merge([lora_dense, ia3_dense, dense_expert], tmp_path / "from_dense")
    for name in theirs.names:
        a, b = ours.read(name).float(), theirs.read(name).float()
        assert (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0), name


def edit_config(adapter: Path, **changes) -> None:
    file = adapter / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"use_dora": True}, "use_dora is set"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported"),
        ({"auto_mapping": {"base_model_class": "GPT2LMHeadModel"}}, "made for another architecture"),
        ({"layer_replication": [[0, 2]]}, "layer_replication is set"),
    ],
    ids=["dora", "loha", "other_architecture", "layer_replication"],
)
def test_adapters_we_cannot_merge_are_refused_naming_the_field(
    base: Path, tmp_path: Path, change: dict, needle: str
) -> None:
    adapter, _ = make_adapter(base, tmp_path / "lora", ADAPTERS["lora_rslora"](), seed=5)
    edit_config(adapter, **change)
    with pytest.raises(InputError, match="adapter_config.json") as error:
        AdapterCheckpoint(adapter, Checkpoint(base))
    assert needle in str(error.value)


def test_an_adapter_of_another_shape_is_refused_naming_the_tensor(base: Path, tmp_path: Path) -> None:
    from tests.lm import tiny_config

    other = tmp_path / "wider"
    config = tiny_config()
    config.intermediate_size = 96
    from transformers import AutoModelForCausalLM

    write_lm(other, AutoModelForCausalLM.from_config(config), byte_tokenizer())
    adapter, _ = make_adapter(other, tmp_path / "lora", lora(target_modules=["down_proj"]), seed=6)
    with pytest.raises(InputError, match=r"down_proj.*update for 'model.layers.0.mlp.down_proj.weight'"):
        AdapterCheckpoint(adapter, Checkpoint(base))


def test_a_merge_with_a_bad_adapter_exits_2_with_one_line_and_writes_nothing(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    adapter, _ = make_adapter(base, tmp_path / "lora", ADAPTERS["lora_rslora"](), seed=7)
    edit_config(adapter, use_dora=True)
    doc = {
        "base": str(base),
        "experts": [{"name": "a", "path": str(adapter)}],
        "method": {"name": "task_arithmetic"},
        "output": str(tmp_path / "out"),
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(doc))
    capsys.readouterr()  # what making the adapter printed
    assert run_cli("merge", str(tmp_path / "merge.yaml")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use_dora is set" in err[0]
    assert not (tmp_path / "out").exists()


def test_learned_merge_through_factors_and_vectors_equals_the_dense_experts_and_holds_no_dense_tau(
    base: Path, tmp_path: Path, gen: torch.Generator
) -> None:
    """The LoRA expert held as factors and the IA3 expert as its vectors (LowRankBody) give the
    merged body and dLoss/dW of the dense path over their merge_and_unload'ed experts."""
    from supermerge.config import config_from_dict
    from supermerge.learned.body import MergedBody
    from supermerge.learned.coefficients import CoefficientLayout
    from supermerge.learned.lowrank_body import LowRankBody
    from supermerge.learned.trainer import CoefficientTrainer
    from supermerge.learned_merge import load_inputs
    from supermerge.taskvectors.lowrank_store import LowRankStore
    from supermerge.taskvectors.store import TaskVectorStore
    from tests.lm import choice_task, generation_task

    lora_adapter, lora_dense = make_adapter(base, tmp_path / "lora", lora(), seed=11)
    ia3_adapter, ia3_dense = make_adapter(base, tmp_path / "ia3", ADAPTERS["ia3_with_feedforward"](), seed=12)
    data = {
        "l": choice_task(tmp_path / "l.jsonl", 3, n=5),
        "i": generation_task(tmp_path / "i.jsonl", 4, n=5),
    }

    def run(experts: dict[str, Path]):
        doc = {
            "base": str(base),
            "experts": [{"name": t, "path": str(p), "data": str(data[t])} for t, p in experts.items()],
            "method": {"name": "supermerge", "steps": 1, "batch_size": 4, "impl": "torch"},
            "model": {"kind": "hf_causal_lm", "max_length": 48},
            "output": str(tmp_path / "merged"),
        }
        return load_inputs(config_from_dict(doc, tmp_path), torch.device("cpu"))

    adapters, dense = run({"l": lora_adapter, "i": ia3_adapter}), run({"l": lora_dense, "i": ia3_dense})
    store = LowRankStore.build(adapters.source)
    layout = CoefficientLayout.build(store.names)
    ours, theirs = LowRankBody(store, layout), MergedBody(TaskVectorStore.build(dense.source), layout)
    w = torch.randn(ours.w.shape, generator=gen)
    for body, inputs in ((ours, adapters), (theirs, dense)):
        body.w = torch.nn.Parameter(w.clone())
        trainer = CoefficientTrainer(
            body, inputs.model, list(inputs.tasks.values()), inputs.fixed, inputs.params.train_config()
        )
        trainer.losses_and_grad()
    for name, merged in ours.merged_tensors().items():
        torch.testing.assert_close(merged, theirs.merged_tensors()[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.w.grad, theirs.w.grad, rtol=1e-4, atol=1e-6)

    parts = dict(zip(store.names, store.tensors, strict=True))
    lora_targets = set(AdapterCheckpoint(lora_adapter, Checkpoint(base)).deltas)
    ia3_targets = AdapterCheckpoint(ia3_adapter, Checkpoint(base)).deltas
    assert {n for n, p in parts.items() if p.lowrank} == lora_targets
    assert all(not p.dense for p in parts.values())  # neither expert is held dense anywhere
    for name in lora_targets:
        m, n = ours.split(store.base_flat)[name].shape
        assert parts[name].b.numel() + parts[name].a.numel() == parts[name].b.shape[1] * (m + n)
    for name, (delta,) in ia3_targets.items():  # one vector per IA3 target: rows, or columns (feedforward)
        m, n = ours.split(store.base_flat)[name].shape
        part = parts[name]
        assert (part.cols, part.col_vectors.shape) == (([1], (1, n)) if delta.feedforward else ([], (0, n)))
        assert (part.rows, part.row_vectors.shape) == (([], (0, m)) if delta.feedforward else ([1], (1, m)))


@pytest.mark.parametrize(("ranks", "groups"), [(3, 1), (4, 2), (2, 2), (24, 1)])
def test_sharded_factor_stores_give_the_dense_shards_sums_and_gradients(
    base: Path, tmp_path: Path, gen: torch.Generator, ranks: int, groups: int
) -> None:
    """Each rank's LowRankShardStore (LoRA as B rows + A over parts cut anywhere in a tensor, IA3
    and dense experts as task-vector parts, untouched tensors as nothing) gives the dense
    ShardStore's weighted sum and coefficient gradient, and holds the bytes the plan counts."""
    from supermerge.distributed.plan import ShardPlan, row_length
    from supermerge.distributed.stores.lowrank import LowRankShardStore, held_rank
    from supermerge.distributed.stores.resident import ShardStore
    from supermerge.taskvectors.source import open_source

    experts = [
        make_adapter(base, tmp_path / "lora", lora(), seed=41)[0],
        make_adapter(base, tmp_path / "ia3", ADAPTERS["ia3_with_feedforward"](), seed=42)[0],
        make_adapter(base, tmp_path / "k_only", lora(target_modules=["k_proj"]), seed=43)[0],
        make_adapter(base, tmp_path / "dense_src", lora(r=2), seed=44)[1],  # a dense expert
    ]
    source = open_source(base, [(f"e{i}", p) for i, p in enumerate(experts)], heads=[])
    infos = source.base.infos
    plan = ShardPlan(
        names=list(source.names), numels=[infos[n].numel for n in source.names],
        tasks=[e.name for e in source.experts], ranks=ranks, task_groups=groups,
        storage_itemsize=4, base_itemsize=4, columns=len(source.names),
        held=tuple(tuple(held_rank(source, n, i) for i in range(source.k)) for n in source.names),
        row_lengths=tuple(row_length(infos[n].shape) for n in source.names),
    )  # fmt: skip
    assert any(h > 0 for row in plan.held for h in row) and any(-1 in row for row in plan.held)
    cpu = torch.device("cpu")
    kept_as = set()  # how LoRA updates were held: factors, or a task vector where factors do not pay
    for rank in range(ranks):
        ours = LowRankShardStore.build(source, plan, rank, torch.float32, cpu)
        for seg, part in zip(plan.segments(plan.coords(rank)[0]), ours.parts, strict=True):
            by_factors = [j for j, i in enumerate(ours.rows) if plan.held[seg.tensor][i] > 0]
            kept_as |= {"factors" if j in part.lowrank else "task vector" for j in by_factors}
        dense = ShardStore.build(source, plan, rank, torch.float32, cpu)
        torch.testing.assert_close(ours.base_piece, dense.base_piece, rtol=0, atol=0)
        segments = len(plan.segments(plan.coords(rank)[0]))
        c = torch.randn(len(ours.rows), segments, generator=gen)
        cotangent = torch.randn(ours.n_local, generator=gen)
        sums, grads = [], []
        for store in (ours, dense):
            coefficients = c.clone().requires_grad_()
            total = store.weighted_sum(coefficients, "torch")
            (total * cotangent).sum().backward()
            sums.append(total.detach())
            grads.append(coefficients.grad)
        torch.testing.assert_close(sums[0], sums[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
        assert ours.task_vector_bytes == plan.task_vector_elements(rank) * 4 < dense.task_vector_bytes
    print(f"factor vs dense bytes over {ranks} ranks: {plan.task_vector_bytes} vs {4 * plan.n * source.k}")
    assert kept_as == ({"factors", "task vector"} if ranks == 24 else {"factors"})  # 24: parts cut small


@pytest.mark.parametrize(
    ("ranks", "gather", "group_size"),
    [(1, "layer", None), (2, "body", None), (2, "layer", None), (2, "body", 2)],
)
def test_lora_experts_sharded_over_ranks_give_the_one_process_merge(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture, ranks: int, gather: str, group_size: int | None
) -> None:
    """LoRA adapters (and a dense expert) merged under torchrun, each rank holding its shard of the
    factors (LowRankShardStore), give the one-process merge, flat or as a tree (group_size 2);
    each rank holds the factor bytes its plan counts, a fraction of the dense task vectors."""
    from supermerge.config import load_config
    from supermerge.io.memory import human_bytes
    from supermerge.learned_merge import run_learned_merge
    from tests.jobs import assert_clean_success, run_job, write_lm_config
    from tests.lm import choice_task, generation_task
    from tests.test_causal_lm_distributed import assert_same_learned_merge, coefficients

    folders = {
        "a": make_adapter(base, tmp_path / "a", lora(), seed=51)[0],
        "b": make_adapter(base, tmp_path / "b", lora(r=8), seed=52)[0],
        "c": make_adapter(base, tmp_path / "c", lora(r=2), seed=53)[1],  # a dense expert
    }
    tasks = {"a": choice_task, "b": generation_task, "c": choice_task}
    experts = {t: (folders[t], tasks[t](tmp_path / f"{t}.jsonl", 7 + i)) for i, t in enumerate(folders)}
    tree = {"group_size": group_size} if group_size else {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_job's ranks compute (OMP_NUM_THREADS=1)
    try:
        one = write_lm_config(tmp_path, base, experts, "one", **tree)
        run_learned_merge(load_config(one), progress=False)
    finally:
        torch.set_num_threads(threads)
    distributed = {"gather": gather}
    config = write_lm_config(tmp_path, base, experts, "sharded", **tree, distributed=distributed)
    capsys.readouterr()
    assert run_cli("plan", str(config), "--ranks", str(ranks)) == 0
    plan = capsys.readouterr().out
    result = run_job("torchrun", ranks, config)
    assert_clean_success(result)
    assert_same_learned_merge(tmp_path / "one", tmp_path / "sharded")
    held = coefficients(tmp_path / "sharded")["nodes"][0]["rank_task_vector_bytes"]
    dense = 4 * 3 * sum(Checkpoint(base).infos[n].numel for n in Checkpoint(base).names)
    print(f"{ranks} rank(s), gather {gather}: task-vector bytes per rank {held}, dense in all {dense}")
    assert len(held) == ranks and sum(held) < 0.6 * dense
    assert "task vectors (LoRA as factors)" in plan
    if group_size is None:  # (a tree's plan shows its root, whose inputs are intermediate models)
        assert all(f"task vectors {human_bytes(b)}," in plan for b in held)  # the plan counts what ranks hold


def test_a_learned_merge_of_ia3_adapters_alone_keeps_them_as_vectors(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supermerge.config import config_from_dict
    from supermerge.learned import node
    from supermerge.learned_merge import run_learned_merge
    from tests.lm import choice_task

    built, original = [], node.LowRankBody

    def recording(store, *args):
        built.append(store)
        return original(store, *args)

    monkeypatch.setattr(node, "LowRankBody", recording)
    adapters = [
        make_adapter(base, tmp_path / f"ia3_{i}", ADAPTERS["ia3_with_feedforward"](), seed=30 + i)[0]
        for i in range(2)
    ]
    data = {t: choice_task(tmp_path / f"{t}.jsonl", s, n=4) for t, s in (("a", 5), ("b", 6))}
    doc = {
        "base": str(base),
        "experts": [
            {"name": t, "path": str(p), "data": str(data[t])} for t, p in zip("ab", adapters, strict=True)
        ],
        "method": {"name": "supermerge", "steps": 2, "batch_size": 4},
        "model": {"kind": "hf_causal_lm", "max_length": 48},
        "output": str(tmp_path / "merged"),
    }
    run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    (store,) = built
    assert store.task_vector_bytes == sum(p.row_vectors.nbytes + p.col_vectors.nbytes for p in store.tensors)
    assert Checkpoint(tmp_path / "merged").names == Checkpoint(base).names


def test_a_learned_merge_of_adapters_runs_end_to_end_with_distillation(base: Path, tmp_path: Path) -> None:
    from supermerge.config import config_from_dict
    from supermerge.learned_merge import run_learned_merge
    from tests.lm import choice_task

    adapter, _ = make_adapter(base, tmp_path / "lora", lora(), seed=13)
    adapter_b, _ = make_adapter(base, tmp_path / "lora_b", lora(use_rslora=True), seed=14)
    data = {t: choice_task(tmp_path / f"{t}.jsonl", s, n=4) for t, s in (("a", 5), ("b", 6))}
    doc = {
        "base": str(base),
        "experts": [
            {"name": t, "path": str(p), "data": str(data[t])} for t, p in (("a", adapter), ("b", adapter_b))
        ],
        "method": {"name": "supermerge", "steps": 2, "batch_size": 4, "objective": "distill"},
        "model": {"kind": "hf_causal_lm", "max_length": 48},
        "output": str(tmp_path / "merged"),
    }
    run_learned_merge(config_from_dict(doc, tmp_path), progress=False)
    assert Checkpoint(tmp_path / "merged").names == Checkpoint(base).names


def test_a_mergekit_config_takes_base_plus_adapter_references(base: Path, tmp_path: Path) -> None:
    """mergekit's `model+lora` on the base_model: the adapter is an expert, as its dense merge is."""
    adapter, dense = make_adapter(base, tmp_path / "lora", lora(), seed=15)
    other = tiny_lm(tmp_path / "other", seed=16)

    def merge(reference: str, out: str) -> Checkpoint:
        config = {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [
                {"model": str(other), "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": reference, "parameters": {"weight": 1.0, "density": 0.7}},
            ],
            "dtype": "float32",
        }
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump(config))
        assert run_cli("merge", str(tmp_path / f"{out}.yaml"), str(tmp_path / out)) == 0
        return Checkpoint(tmp_path / out)

    ours, theirs = merge(f"{base}+{adapter}", "from_adapter"), merge(str(dense), "from_dense")
    for name in theirs.names:
        a, b = ours.read(name).float(), theirs.read(name).float()
        assert (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0), name


@pytest.mark.parametrize(
    ("method", "rank"), [("task_arithmetic", None), ("average", None), ("task_arithmetic", 3)]
)
def test_a_linear_merge_of_lora_adapters_written_as_one_lora_that_peft_loads(
    base: Path, tmp_path: Path, method: str, rank: int | None
) -> None:
    """output_format lora: the merged adapter, loaded by PEFT onto the base and merged, gives the
    dense merge of the same adapters (exactly at full rank; within the reported SVD error)."""
    from transformers import AutoModelForCausalLM

    adapters = [
        make_adapter(base, tmp_path / "a", lora(), seed=21)[0],
        make_adapter(
            base, tmp_path / "b", lora(use_rslora=True, target_modules=["q_proj", "up_proj"]), seed=22
        )[0],
    ]
    params = {"name": method} | ({"lambda": 0.8} if method == "task_arithmetic" else {})

    def merge(out: str, **extra) -> None:
        doc = {
            "base": str(base),
            "experts": [
                {"name": p.name, "path": str(p), "weight": w}
                for p, w in zip(adapters, (1.0, 0.6), strict=True)
            ],
            "method": params,
            "output": str(tmp_path / out),
            **extra,
        }
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump(doc))
        assert run_cli("merge", str(tmp_path / f"{out}.yaml")) == 0

    merge("dense")
    merge("adapter", output_format="lora", **({"lora_rank": rank} if rank else {}))
    record = json.loads((tmp_path / "adapter" / "supermerge_merge.json").read_text())
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    merged = dict(loaded.merge_and_unload().named_parameters())
    dense = Checkpoint(tmp_path / "dense")
    base_ckpt = Checkpoint(base)
    for name in dense.names:
        want, got = dense.read(name).float(), merged[name].detach().float()
        if rank is None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:  # the truncation error, relative to the update, bounds the difference
            update = (want - base_ckpt.read(name).float()).norm()
            assert (got - want).norm() <= record["max_relative_error"] * update * (1 + 1e-4) + 1e-6, name
    if rank is not None:
        assert 0 < record["max_relative_error"] < 1


def test_a_lora_output_of_a_non_linear_method_or_an_ia3_expert_is_refused(
    base: Path, tmp_path: Path, capsys
) -> None:
    ia3, _ = make_adapter(base, tmp_path / "ia3", ADAPTERS["ia3_with_feedforward"](), seed=23)
    doc = {
        "base": str(base),
        "experts": [{"name": "i", "path": str(ia3)}],
        "method": {"name": "task_arithmetic"},
        "output": str(tmp_path / "out"),
        "output_format": "lora",
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert run_cli("merge", str(tmp_path / "m.yaml")) == 2
    assert "every expert to be a LoRA adapter" in capsys.readouterr().err
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc | {"method": {"name": "ties", "density": 0.5}}))
    assert run_cli("merge", str(tmp_path / "m.yaml")) == 2
    assert "field 'output_format'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
