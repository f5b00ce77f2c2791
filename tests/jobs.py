"""Helpers of the multi-process tests: merge configs for the toy suite, jobs run under a launcher
in their own session with a timeout and a check that no process is left, result comparisons."""

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
from safetensors.torch import load_file

from supermerge.demo.toy import FACTORY

BIN = Path(sys.executable).parent
LAUNCH = Path(__file__).resolve().parent.parent / "launch"
RUN_TIMEOUT_S = 240
TOL = 1e-5  # fp32 sums in another order
# DeepSpeed compiles its CPU comm op on first use (about 45 s): once per machine, not per test
EXTENSIONS = Path(
    os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "supermerge" / "torch_extensions")
)


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
    return write_yaml(folder, output, doc, distributed)


def write_yaml(folder: Path, output: str, doc: dict, distributed: dict | None) -> Path:
    """`doc` (with its distributed block, if any) as `<folder>/<output>.yaml`."""
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
    if launcher == "slurm":
        return ["bash", str(LAUNCH / "slurm_torchrun.sbatch")]
    return ["bash", str(LAUNCH / f"{launcher}.sh")]


def fake_slurm(folder: Path, nodes: int) -> dict[str, str]:
    """Environment that runs launch/slurm_torchrun.sbatch as a job of `nodes` nodes, all this host,
    one rank each: `scontrol` lists the node names, `srun` starts the command once per node (as
    SLURM's one task per node would) and fails if any of them fails."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scontrol").write_text(
        '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && tr , "\\n" <<< "$3"\n'
    )
    (folder / "srun").write_text(
        "#!/usr/bin/env bash\npids=()\n"
        "for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do\n"
        '    SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!)\ndone\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n'
    )
    for tool in ("scontrol", "srun"):
        (folder / tool).chmod(0o755)
    return {
        "PATH": f"{folder}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": ",".join(["localhost"] * nodes), "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_ID": f"test{free_port()}", "GPUS_PER_NODE": "1", "RDZV_PORT": str(free_port()),
    }  # fmt: skip


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


def write_lm_config(
    folder: Path, base: Path, tasks: dict[str, tuple[Path, Path]], output: str, **method
) -> Path:
    """A learned merge of tiny causal LMs (tests.lm, `model.kind: hf_causal_lm`): `tasks` maps each
    task to its expert folder and generative task file; `distributed` (if given) is the config's
    distributed block, the other keywords override the method's settings."""
    distributed = method.pop("distributed", None)
    doc = {
        "base": str(base),
        "experts": [{"name": t, "path": str(p), "data": str(d)} for t, (p, d) in tasks.items()],
        "method": {"name": "supermerge", "steps": 3, "lr": 0.1, "batch_size": 4} | method,
        "model": {"kind": "hf_causal_lm", "max_length": 32},
        "output": output,
    }
    return write_yaml(folder, output, doc, distributed)
