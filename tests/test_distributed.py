"""The distributed engine: the plan, and real multi-process runs under torchrun, the deepspeed
launcher and accelerate launch (gloo on CPU) against one process, comm flat in k, rank faults."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from supermerge.cli import main
from supermerge.distributed.plan import ShardPlan
from supermerge.errors import SupermergeError
from supermerge.toy import FACTORY, build_toy_suite

BIN = Path(sys.executable).parent
LAUNCH = Path(__file__).resolve().parent.parent / "launch"
RUN_TIMEOUT_S = 240
TOL = 1e-5  # fp32 sums in another order
# DeepSpeed compiles its CPU comm op on first use (about 45 s): once per machine, not per test
EXTENSIONS = Path(
    os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "supermerge" / "torch_extensions")
)


# ---------------------------------------------------------------- the plan (no processes)


def make_plan(numels: list[int], k: int, ranks: int, groups: int = 1, itemsize: int = 4) -> ShardPlan:
    names = [f"t{i}" for i in range(len(numels))]
    return ShardPlan(names, numels, [f"task{i}" for i in range(k)], ranks, groups, itemsize, 4, len(numels))


@pytest.mark.parametrize(("ranks", "groups"), [(1, 1), (2, 1), (4, 1), (4, 2), (6, 3), (8, 4)])
def test_plan_covers_every_element_and_task_exactly_once(ranks: int, groups: int) -> None:
    numels = [int(n) for n in torch.randint(1, 5000, (7,))]
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


def test_plan_refuses_task_groups_that_do_not_divide_the_ranks() -> None:
    with pytest.raises(SupermergeError, match="task_groups: 3 does not divide the 4 ranks"):
        make_plan([100], k=4, ranks=4, groups=3)
    with pytest.raises(SupermergeError, match="4 groups for only 2 tasks"):
        make_plan([100], k=2, ranks=4, groups=4)


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_suite(tmp_path_factory.mktemp("toy"), n_tasks=4, seed=11)


def write_config(folder: Path, toy, output: str, experts: dict | None = None, **method) -> Path:
    experts = experts or toy.experts
    distributed = method.pop("distributed", None)
    doc = {
        "base": str(toy.base),
        "experts": [
            {"name": t, "path": str(p), "data": str(toy.validation[sorted(toy.validation)[i % 4]])}
            for i, (t, p) in enumerate(experts.items())
        ],
        "method": {"name": "supermerge", "steps": 6, "lr": 0.05, "validation_size": 64, "batch_size": 16}
        | method,
        "model": {"kind": "torch_module", "factory": FACTORY},
        "heads": ["head.*"],
        "output": output,
    }
    if distributed:
        doc["distributed"] = distributed
    path = folder / f"{output}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: str) -> list[str]:
    """One process: the command itself; else the ready script under launch/ (NPROC, PORT env)."""
    if launcher == "none":
        return [str(BIN / "supermerge")]
    return ["bash", str(LAUNCH / f"{launcher}.sh")]


def run_job(
    launcher: str, ranks: int, config: Path, *extra: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `supermerge merge` under a launcher in its own session; kill the whole session on timeout
    and check that no process of it is left."""
    if launcher == "none":
        cmd = [*launch_command(launcher), "-q", "merge", str(config), *extra]
    else:
        cmd = [*launch_command(launcher), str(config), *extra]
    full_env = os.environ | {
        "TORCH_EXTENSIONS_DIR": str(EXTENSIONS), "OMP_NUM_THREADS": "1", "NPROC": str(ranks),
        "PORT": str(free_port()), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=config.parent, env=full_env | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{launcher} job hung for {RUN_TIMEOUT_S} s:\n{err[-3000:]}")
    leftover = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    if leftover:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{launcher} left processes behind: {leftover}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_clean_success(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    for crash in ("Traceback", "terminate called", "Segmentation fault", "core dumped"):
        assert crash not in result.stderr, result.stderr[-4000:]


def assert_same_merge(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], atol=TOL, rtol=TOL, msg=name)
    ca = json.loads((a / "coefficients.json").read_text())["effective"]
    cb = json.loads((b / "coefficients.json").read_text())["effective"]
    for task in ca:
        torch.testing.assert_close(torch.tensor(ca[task]), torch.tensor(cb[task]), atol=TOL, rtol=TOL)


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory) -> dict[str, Path]:
    """One-process flat and hierarchical merges: what every launch must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    outputs = {}
    for kind, method in (("flat", {}), ("tree", {"group_size": 2})):
        config = write_config(folder, toy, kind, **method)
        assert_clean_success(run_job("none", 1, config))
        outputs[kind] = folder / kind
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "ranks", "kind", "distributed"),
    [
        ("torchrun", 2, "flat", {}),
        ("torchrun", 4, "flat", {"task_groups": 2}),
        ("torchrun", 2, "tree", {}),
        ("torchrun", 4, "tree", {}),
        ("deepspeed", 2, "flat", {}),
        ("deepspeed", 2, "tree", {}),
        ("accelerate", 2, "flat", {}),
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
@pytest.mark.parametrize(
    ("launcher", "ranks", "kind"), [("none", 1, "flat"), ("torchrun", 2, "flat"), ("deepspeed", 2, "tree")]
)
def test_task_vectors_offloaded_through_deepspeed_zero3_give_the_same_merge(
    launcher: str, ranks: int, kind: str, toy, reference, tmp_path: Path
) -> None:
    method = {"group_size": 2} if kind == "tree" else {}
    config = write_config(
        tmp_path, toy, kind, **method, distributed={"offload": "cpu", "prefetch_elements": 100}
    )
    result = run_job(launcher, ranks, config)
    assert_clean_success(result)
    assert_same_merge(reference[kind], tmp_path / kind)
    summary = json.loads((tmp_path / kind / "supermerge_merge.json").read_text())["summary"]
    # the k task vectors sit in DeepSpeed's CPU partitions: the rank holds its base piece, the
    # gathered body and its gradient (fp32 staging included), nothing that grows with k
    n = 576
    piece = -(-n // ranks)
    assert summary["peak_tensor_bytes"] == piece * 4 + ranks * piece * (4 + 4 + 4)


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
def test_communication_per_step_does_not_grow_with_k(toy, tmp_path: Path) -> None:
    measured = {}
    for k in (2, 4, 8):
        experts = perturbed_experts(toy, tmp_path / f"experts{k}", k)
        config = write_config(tmp_path, toy, f"k{k}", experts, steps=2)
        assert_clean_success(run_job("torchrun", 2, config))
        summary = json.loads((tmp_path / f"k{k}" / "supermerge_merge.json").read_text())["summary"]
        measured[k] = summary["comm_bytes_per_step"]
    tensor_traffic = {k: {t: b for t, b in m.items() if t not in ("dW", "loss")} for k, m in measured.items()}
    assert tensor_traffic[2] == tensor_traffic[4] == tensor_traffic[8], measured
    assert tensor_traffic[2]["merged"] > 0 and tensor_traffic[2]["grad"] > 0
    # dW is the k x G floats of W, the one term that grows with k (a 2-rank all_reduce sends it once)
    columns = 8
    assert [measured[k]["dW"] for k in (2, 4, 8)] == [k * columns * 4 for k in (2, 4, 8)]


@pytest.mark.slow
@pytest.mark.parametrize("resume_ranks", [1, 2])
def test_killed_rank_stops_the_job_with_its_name_and_resume_finishes_it(
    resume_ranks: int, toy, tmp_path: Path
) -> None:
    uninterrupted = write_config(tmp_path, toy, "whole", steps=10, checkpoint_every=2)
    assert_clean_success(run_job("torchrun", 2, uninterrupted))
    config = write_config(tmp_path, toy, "killed", steps=10, checkpoint_every=2)
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
