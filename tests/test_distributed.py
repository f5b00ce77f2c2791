"""The distributed engine: the plan, and real multi-process runs under torchrun, the deepspeed
launcher and accelerate launch (gloo on CPU) against one process, comm flat in k, rank faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from supermerge.cli import main
from supermerge.config import load_config
from supermerge.distributed.plan import ShardPlan
from supermerge.errors import SupermergeError
from tests.jobs import LAUNCH, assert_clean_success, assert_same_merge, fake_slurm, run_job, write_config

# ---------------------------------------------------------------- the plan (no processes)


def make_plan(numels: list[int], k: int, ranks: int, groups: int = 1, itemsize: int = 4) -> ShardPlan:
    names = [f"t{i}" for i in range(len(numels))]
    return ShardPlan(
        names=names,
        numels=numels,
        tasks=[f"task{i}" for i in range(k)],
        ranks=ranks,
        task_groups=groups,
        storage_itemsize=itemsize,
        base_itemsize=4,
        columns=len(numels),
    )


@pytest.mark.parametrize(("ranks", "groups"), [(1, 1), (2, 1), (4, 1), (4, 2), (6, 3), (8, 4)])
def test_plan_covers_every_element_and_task_exactly_once(
    ranks: int, groups: int, gen: torch.Generator
) -> None:
    numels = [int(n) for n in torch.randint(1, 5000, (7,), generator=gen)]
    plan = make_plan(numels, k=5 + groups, ranks=ranks, groups=groups)
    held = torch.zeros(len(plan.tasks), plan.n, dtype=torch.int64)
    starts = [0, *torch.tensor(numels).cumsum(0).tolist()]
    for rank in range(ranks):
        p, q = plan.coords(rank)
        for seg in plan.segments(p):
            for i in plan.task_rows(q):
                held[i, starts[seg.tensor] + seg.lo : starts[seg.tensor] + seg.hi] += 1
    assert bool((held == 1).all())


def test_plan_task_vector_bytes_per_rank_are_total_over_ranks_within_5_percent() -> None:
    numels = [50_000, 16 * 64, 64, 64 * 64, 64, 64 * 200]
    for ranks in (2, 4, 8):
        plan = make_plan(numels, k=8, ranks=ranks, groups=2 if ranks > 2 else 1)
        total = len(plan.tasks) * plan.n * 4
        for rank in range(ranks):
            share = plan.memory(rank)["task vectors"]
            assert abs(share - total / ranks) <= 0.05 * total / ranks, (ranks, rank, share)


def test_plan_tensor_traffic_does_not_grow_with_k() -> None:
    numels = [4096, 64, 4096]
    traffic = {k: make_plan(numels, k=k, ranks=4).comm_per_step() for k in (2, 4, 8, 32)}
    tensor_tags = {tag: b for tag, b in traffic[2].items() if tag != "dW"}
    for k, tags in traffic.items():
        assert {t: b for t, b in tags.items() if t != "dW"} == tensor_tags
        assert tags["dW"] == int(2 * 3 / 4 * k * 3 * 4)


def test_lora_factors_are_held_where_they_take_fewer_values_than_the_part() -> None:
    from supermerge.distributed.plan import held_elements

    n = 64  # rows of 64 elements; rank 4: B's rows touched + all of A
    assert held_elements(4, 0, 64 * 64, n) == 4 * (64 + 64)  # a whole 64 x 64 tensor
    assert held_elements(4, 100, 300, n) == 200  # 3 rows touched: 4 (3 + 64) = 268 > 200 elements
    assert held_elements(4, 64, 64 * 40, n) == 4 * (39 + 64)
    assert held_elements(0, 100, 300, n) == 200 and held_elements(-1, 100, 300, n) == 0


def test_plan_refuses_task_groups_that_do_not_divide_the_ranks() -> None:
    with pytest.raises(SupermergeError, match="task_groups: 3 does not divide the 4 ranks"):
        make_plan([100], k=4, ranks=4, groups=3)
    with pytest.raises(SupermergeError, match="4 groups for only 2 tasks"):
        make_plan([100], k=2, ranks=4, groups=4)


# ---------------------------------------------------------------- real runs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "ranks", "kind", "distributed"),
    [
        # a plain 2-rank torchrun flat merge runs in the slurm test (launch/slurm_torchrun.sbatch)
        ("torchrun", 4, "flat", {"task_groups": 2}),
        ("torchrun", 2, "tree", {}),
        ("torchrun", 4, "tree", {}),
        ("deepspeed", 2, "tree", {}),
        ("accelerate", 2, "flat", {}),
        ("torchrun", 2, "flat", {"gather": "layer"}),
        ("torchrun", 4, "flat", {"task_groups": 2, "gather": "layer"}),
        ("torchrun", 4, "tree", {"gather": "layer"}),
        ("deepspeed", 2, "flat", {"gather": "layer"}),
    ],
)
def test_launch_gives_the_one_process_result(
    launcher: str, ranks: int, kind: str, distributed: dict, toy, reference, tmp_path: Path
) -> None:
    method = {"group_size": 2} if kind == "tree" else {}
    config = write_config(tmp_path, toy, kind, **method, distributed=distributed)
    result = run_job(launcher, ranks, config)
    assert_clean_success(result)
    assert f"on {ranks} ranks" in result.stdout
    assert_same_merge(reference[kind], tmp_path / kind)
    summary = json.loads((tmp_path / kind / "supermerge_merge.json").read_text())["summary"]
    assert summary["ranks"] == ranks
    assert summary["comm_bytes_per_step"]["merged"] > 0
    # every node's task vectors are spread over the ranks that trained it: a rank holds at most
    # its group's ceil(k / Q) tasks over one layer shard of Q pieces of ceil(N / R) elements
    n, q = 576, distributed.get("task_groups", 1)
    for node in json.loads((tmp_path / kind / "coefficients.json").read_text())["nodes"]:
        shares, k, r = node["rank_task_vector_bytes"], len(node["children"]), node["ranks"]
        assert len(shares) == r and sum(shares) == k * n * 4
        groups = q if node["node"] == "root" else 1
        assert max(shares) <= -(-k // groups) * groups * -(-n // r) * 4


@pytest.mark.slow
def test_slurm_script_runs_one_torchrun_per_node_and_gives_the_one_process_result(
    toy, reference, tmp_path: Path
) -> None:
    # two "nodes" on this host: the script's rendezvous (c10d on the first node) and node count
    # are what a cluster would run; only srun and scontrol are stand-ins
    config = write_config(tmp_path, toy, "flat")
    result = run_job("slurm", 2, config, env=fake_slurm(tmp_path / "slurm_bin", nodes=2))
    assert_clean_success(result)
    assert "on 2 ranks" in result.stdout
    assert_same_merge(reference["flat"], tmp_path / "flat")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "ranks", "kind", "gather"),
    [
        ("none", 1, "flat", "body"),
        ("torchrun", 2, "flat", "body"),
        ("deepspeed", 2, "tree", "body"),
        ("torchrun", 2, "flat", "layer"),
    ],
)
def test_task_vectors_offloaded_through_deepspeed_zero3_give_the_same_merge(
    launcher: str, ranks: int, kind: str, gather: str, toy, reference, tmp_path: Path
) -> None:
    method = {"group_size": 2} if kind == "tree" else {}
    distributed = {"offload": "cpu", "prefetch_elements": 100, "gather": gather}
    config = write_config(tmp_path, toy, kind, **method, distributed=distributed)
    result = run_job(launcher, ranks, config)
    assert_clean_success(result)
    assert_same_merge(reference[kind], tmp_path / kind)
    summary = json.loads((tmp_path / kind / "supermerge_merge.json").read_text())["summary"]
    # the k task vectors sit in DeepSpeed's CPU partitions: the rank holds its base piece, and
    # body mode the gathered body and its gradient (fp32 staging included); layer mode its merged
    # piece, its fp32 gradient and one toy branch (144 elements) with its gradient at a time, and
    # the next branch, gathered ahead (gather_ahead: 1, the default)
    n = 576
    piece = -(-n // ranks)
    held = ranks * piece * (4 + 4 + 4) if gather == "body" else piece * (4 + 4) + 144 * (4 + 4) + 144 * 4
    assert summary["peak_tensor_bytes"] == piece * 4 + held


def perturbed_experts(toy, folder: Path, k: int) -> dict[str, Path]:
    """k experts: the toy's four, cycled, each with a fresh random perturbation (never zero)."""
    experts = {}
    for i in range(k):
        src = toy.experts[sorted(toy.experts)[i % 4]]
        state = load_file(str(src / "model.safetensors"))
        gen = torch.Generator().manual_seed(i)
        state = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in state.items()}
        (folder / f"e{i}").mkdir(parents=True)
        save_file(state, str(folder / f"e{i}" / "model.safetensors"))
        experts[f"e{i}"] = folder / f"e{i}"
    return experts


@pytest.mark.slow
@pytest.mark.parametrize("gather", ["body", "layer"])
def test_communication_per_step_does_not_grow_with_k(gather: str, toy, tmp_path: Path) -> None:
    """Body mode: the tensor traffic per step is the same for every k. Layer mode gathers the body
    once per micro-batch pass, and k tasks bring k validation sets (4 micro-batches each here, 2k
    passes per rank): its traffic per pass is the same for every k."""
    measured = {}
    for k in (2, 8):
        experts = perturbed_experts(toy, tmp_path / f"experts{k}", k)
        config = write_config(tmp_path, toy, f"k{k}", experts, steps=2, distributed={"gather": gather})
        assert_clean_success(run_job("torchrun", 2, config))
        summary = json.loads((tmp_path / f"k{k}" / "supermerge_merge.json").read_text())["summary"]
        measured[k] = summary["comm_bytes_per_step"]
    passes = {k: 2 * k if gather == "layer" else 1 for k in measured}
    tensor_traffic = {
        k: {t: b / passes[k] for t, b in m.items() if t not in ("dW", "loss")} for k, m in measured.items()
    }
    assert tensor_traffic[2] == tensor_traffic[8], measured
    assert tensor_traffic[2]["merged"] > 0 and tensor_traffic[2]["grad"] > 0
    # dW is the k x G floats of W, the one term that grows with k (a 2-rank all_reduce sends it once)
    columns = 8
    assert [measured[k]["dW"] for k in (2, 8)] == [k * columns * 4 for k in (2, 8)]


@pytest.mark.slow
@pytest.mark.parametrize(("resume_ranks", "gather"), [(1, "body"), (2, "layer")])
def test_killed_rank_stops_the_job_with_its_name_and_resume_finishes_it(
    resume_ranks: int, gather: str, toy, tmp_path: Path
) -> None:
    settings = {"steps": 10, "checkpoint_every": 2, "distributed": {"gather": gather}}
    uninterrupted = write_config(tmp_path, toy, "whole", **settings)
    assert_clean_success(run_job("torchrun", 2, uninterrupted))
    config = write_config(tmp_path, toy, "killed", **settings)
    failed = run_job("torchrun", 2, config, env={"SUPERMERGE_TEST_KILL": "1:6"})
    assert failed.returncode != 0
    assert "rank 0: rank 1 stopped answering" in failed.stderr, failed.stderr[-3000:]
    assert not (tmp_path / "killed").exists()
    state = torch.load(tmp_path / "killed.run" / "root.state.pt", weights_only=False)
    assert state["step"] == 4  # the last checkpoint before the kill at step 6
    resumed = run_job("torchrun" if resume_ranks > 1 else "none", resume_ranks, config, "--resume")
    assert_clean_success(resumed)
    assert_same_merge(tmp_path / "whole", tmp_path / "killed")


def test_plan_command_prints_each_rank_with_tensors_tasks_bytes_and_traffic(
    toy, tmp_path: Path, capsys
) -> None:
    config = write_config(tmp_path, toy, "planned", distributed={"task_groups": 2, "memory_per_rank": "1MB"})
    assert main(["plan", str(config), "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 rank(s) = 2 layer shard(s) x 2 task group(s)" in out
    for rank in range(4):
        assert f"rank {rank} (layer shard {rank // 2}, task group {rank % 2})" in out
    assert "tasks ['a', 'b']" in out and "tasks ['c', 'd']" in out
    assert "within the 1.00 MiB per rank" in out
    assert "communication per step and rank: merged" in out
    assert not (tmp_path / "planned").exists()


def test_plan_of_layer_gathers_holds_a_piece_and_one_layer_instead_of_the_body(
    toy, tmp_path: Path, capsys
) -> None:
    config = write_config(tmp_path, toy, "planned", distributed={"gather": "layer"})
    assert main(["plan", str(config), "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    assert "merged body" not in out and "merged piece 1.12 KiB" in out  # 288 of the 576 fp32 elements
    assert "largest layer gathered, with its gradient 1.69 KiB" in out  # a 144-element branch x 12 B
    assert "layers gathered ahead (1) 576 B" in out  # the next branch, prefetched
    assert "per micro-batch pass and rank" in out and "largest gather unit 144 elements" in out


def test_plan_of_an_offloaded_store_counts_the_two_staged_layer_groups() -> None:
    numels = [1000, 10, 3000, 10, 500]
    for offload in ("cpu", "nvme"):
        plan = ShardPlan(
            names=[f"t{i}" for i in range(5)],
            numels=numels,
            tasks=["a", "b", "c"],
            ranks=1,
            task_groups=1,
            storage_itemsize=2,
            base_itemsize=4,
            columns=5,
            offload=offload,
            prefetch_elements=1005,
        )
        memory = plan.memory(0)
        assert memory["task vectors"] == 0 and memory[f"task vectors ({offload}, offloaded)"] == 3 * 4520 * 2
        # groups of whole tensors of at least 1005 elements: [1000, 10], [3000], [10, 500]
        assert memory["staged layer groups (2)"] == 2 * 3 * 3000 * 2


@pytest.mark.parametrize("name", sorted(p.name for p in (LAUNCH / "configs").glob("*.yaml")))
def test_launch_configs_are_valid_distributed_blocks(name: str, toy, tmp_path: Path) -> None:
    block = yaml.safe_load((LAUNCH / "configs" / name).read_text())["distributed"]
    if "nvme_path" in block:  # a folder of the user's drive
        block["nvme_path"] = str(tmp_path)
    spec = load_config(write_config(tmp_path, toy, "out", distributed=block)).distributed
    assert spec.offload == block.get("offload", "none") and spec.gather == block.get("gather", "body")
