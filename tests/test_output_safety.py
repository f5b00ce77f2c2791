"""What a run writes never ends up half-made or on top of another run's: non-finite tensors are
refused, a full disk is one line, leftovers of killed runs are removed (with a warning), and a
second run writing the same output is refused while the first holds its lock."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from supermerge.errors import SupermergeError
from supermerge.io.atomic import TempFolder, atomic_file
from supermerge.io.lock import OutputLock, lock_path
from supermerge.io.writer import ShardedWriter
from tests.files import tree_hashes
from tests.test_cli_bad_input import assert_refused, run_cli

HOST = socket.gethostname()

# a second run: holds the output's lock until its stdin closes
HOLD_LOCK = """
import sys
from pathlib import Path
from supermerge.io.lock import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""

# takes and releases the lock `rounds` times; inside it, creates a file no other holder may hold
CONTEND = """
import os, sys
from pathlib import Path
from supermerge.errors import SupermergeError
from supermerge.io.lock import OutputLock
target, inside, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
while rounds:
    try:
        lock = OutputLock(target)
        lock.acquire()
    except SupermergeError:
        continue
    os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # FileExistsError: two holders
    os.unlink(inside)
    lock.release()
    rounds -= 1
"""


def leftovers(target: Path) -> list[str]:
    """Names of everything beside `target` that belongs to it (temporary folders, lock file)."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def hold_lock() -> Iterator[Callable[[Path], subprocess.Popen]]:
    """Factory: a separate process holding the lock of a target until the test ends."""
    holders = []

    def hold(target: Path) -> subprocess.Popen:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(target)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(holder)
        assert holder.stdout.readline().strip() == "held"
        return holder

    yield hold
    for holder in holders:
        holder.stdin.close()
        holder.wait(timeout=10)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 200 KiB tmpfs, mounted for the test (needs root; skipped where mount is not permitted)."""
    mount = tmp_path / "small_fs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to mount a 200 KiB tmpfs")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a 200 KiB tmpfs (needs root): {result.stderr.strip()}")
    yield mount
    # lazy: unmounts even where a failed test left a file open
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def write_model(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 16}))
    return folder


# --- non-finite merges ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_writer_refuses_a_non_finite_tensor_naming_it(tmp_path: Path, dtype: torch.dtype, bad: float) -> None:
    out = tmp_path / "merged"
    tensor = torch.ones(4, 5)
    tensor[2, 3] = bad
    with pytest.raises(SupermergeError) as info, ShardedWriter(out, 1 << 20) as writer:
        writer.add("fine.weight", torch.ones(3))
        writer.add("bad.weight", tensor.to(dtype))
    word = "NaN" if bad != bad else "Inf"
    assert f"{out}: tensor 'bad.weight': merged values are not finite ({word})" in str(info.value)
    assert not out.exists() and leftovers(out) == []


def test_writer_names_the_narrow_dtype_that_overflowed(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with pytest.raises(SupermergeError) as info, ShardedWriter(out, 1 << 20) as writer:
        writer.add("w", torch.full((3,), 7e4).to(torch.float16))
    assert "float16 holds at most 65504: choose dtype float32 or smaller coefficients" in str(info.value)


def test_writer_writes_integer_and_bool_tensors_as_they_are(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    ints = torch.tensor([torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min])
    flags = torch.tensor([True, False])
    with ShardedWriter(out, 1 << 20) as writer:
        writer.add("position_ids", ints)
        writer.add("mask", flags)
        writer.commit()
    written = load_file(str(out / "model.safetensors"))
    assert torch.equal(written["position_ids"], ints) and torch.equal(written["mask"], flags)
    assert leftovers(out) == []


def test_cli_refuses_a_float16_merge_that_overflows(capsys, tmp_path: Path, write_yaml) -> None:
    big = torch.full((4, 4), 6.0e4)  # fits float16 (max 65504); base + 2 task vectors of 6e3 does not
    base = write_model(tmp_path / "base", {"small.weight": torch.ones(3), "big.weight": big})
    experts = [
        write_model(tmp_path / f"expert{i}", {"small.weight": torch.full((3,), 1.1), "big.weight": big + 6e3})
        for i in range(2)
    ]
    config = write_yaml(base, experts, method={"name": "task_arithmetic", "lambda": 1.0}, dtype="float16")
    needle = f"{tmp_path / 'merged'}: tensor 'big.weight': merged values are not finite (Inf)"
    assert_refused(capsys, config, needle, "float16 holds at most 65504", inputs=[base, *experts])


# --- disk full -----------------------------------------------------------------------------------

ENOSPC_SAFETENSORS = SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)"
)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_space_safetensors(*args, **kwargs):
    raise ENOSPC_SAFETENSORS


@pytest.mark.parametrize("where", ["shard", "index", "write_file", "copy_file"])
def test_writer_reports_a_full_disk_in_one_line(monkeypatch, tmp_path: Path, where: str) -> None:
    out = tmp_path / "merged"
    extra = tmp_path / "config.json"
    extra.write_text("{}")
    if where == "shard":  # safetensors reports ENOSPC only in its error's text
        monkeypatch.setattr("supermerge.io.writer.save_file", _no_space_safetensors)
    elif where == "copy_file":
        monkeypatch.setattr(shutil, "copyfile", _no_space)
    else:
        monkeypatch.setattr(Path, "write_bytes", _no_space)
    with pytest.raises(SupermergeError) as info, ShardedWriter(out, 64) as writer:
        writer.add("a", torch.ones(16))  # 64 bytes: a full shard
        writer.add("b", torch.ones(4))
        if where == "copy_file":
            writer.copy_file(extra)
        if where == "write_file":
            writer.write_file("notes.json", b"{}")
        writer.commit()
    message = str(info.value)
    assert message.startswith(f"{out}: no space left on device (needed at least ") and ", free " in message
    assert "\n" not in message and info.value.__suppress_context__
    assert not out.exists() and leftovers(out) == []


def test_writer_refuses_at_once_when_the_expected_size_exceeds_free_space(
    monkeypatch, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(SupermergeError) as info:
        ShardedWriter(out, 1 << 20, expected_bytes=3 << 20)
    assert str(info.value) == f"{out}: no space left on device (needed ~3.00 MiB, free 1000 B)"
    assert not out.exists() and leftovers(out) == []


def test_atomic_file_reports_a_full_disk_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "run.state.pt"
    target.write_bytes(b"old")
    with pytest.raises(SupermergeError) as info, atomic_file(target) as tmp:
        tmp.write_bytes(b"new, partly")
        _no_space()
    assert str(info.value).startswith(f"{target}: no space left on device (free ")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_a_merge_onto_a_full_file_system_is_one_line(
    capsys, tmp_path: Path, small_fs: Path, write_yaml
) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {"big.weight": torch.randn(256, 256, generator=gen)}  # 256 KiB: more than the 200 KiB
    base = write_model(tmp_path / "base", state)
    experts = [
        write_model(tmp_path / f"expert{i}", {"big.weight": state["big.weight"] + i + 1}) for i in range(2)
    ]
    config = write_yaml(base, experts, output=str(small_fs / "merged"))
    needle = f"{small_fs / 'merged'}: no space left"
    assert_refused(capsys, config, needle, "free", inputs=[base, *experts])
    assert list(small_fs.iterdir()) == []


def test_torch_save_onto_a_full_file_system_is_one_line(small_fs: Path) -> None:
    target = small_fs / "run.state.pt"  # torch.save reports a full disk only as "unexpected pos"
    with pytest.raises(SupermergeError) as info, atomic_file(target) as tmp:
        torch.save({"w": torch.zeros(100_000)}, tmp)
    assert str(info.value).startswith(f"{target}: no space left on device (free 200.00 KiB)")
    assert list(small_fs.iterdir()) == []


def test_writer_refuses_at_once_on_a_small_file_system(small_fs: Path) -> None:
    out = small_fs / "merged"
    with pytest.raises(SupermergeError) as info:
        ShardedWriter(out, 1 << 20, expected_bytes=1 << 20)
    assert str(info.value) == f"{out}: no space left on device (needed ~1.00 MiB, free 200.00 KiB)"
    assert list(small_fs.iterdir()) == []


# --- leftovers of killed runs --------------------------------------------------------------------


def test_leftovers_of_dead_runs_are_removed_with_a_warning(caplog, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    pid = dead_pid()
    dead = [
        tmp_path / f".merged.tmp-{HOST}-{pid}",
        tmp_path / f".merged.old-{HOST}-{pid}",
        tmp_path / f".merged.tmp-{pid}",  # named before hosts were: this host's
    ]
    for folder in dead:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    with ShardedWriter(out, 1 << 20) as writer:
        writer.add("w", torch.ones(3))
        writer.commit()
    assert leftovers(out) == []
    for folder in dead:
        assert any(str(folder) in r.message and f"(pid {pid})" in r.message for r in caplog.records), folder


def test_other_names_beside_the_output_are_kept(tmp_path: Path) -> None:
    kept = [".merged.tmp-notes", ".merged.backup", ".merged2.tmp-host-1", "merged.tmp-host-1", ".merged.run"]
    for name in kept:
        (tmp_path / name).mkdir()
    a_file = tmp_path / f".merged.tmp-{HOST}-{dead_pid()}"
    a_file.write_text("a file: no temporary folder of ours")
    TempFolder(tmp_path / "merged").commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, a_file.name, "merged"])


def test_a_live_runs_temporary_folder_is_refused_naming_its_pid(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".merged.tmp-{HOST}-{other.pid}"
        live.mkdir()
        with pytest.raises(SupermergeError) as info:
            ShardedWriter(tmp_path / "merged", 1 << 20)
    finally:
        other.kill()
        other.wait()
    assert f"another run (pid {other.pid}) is writing it into {live}" in str(info.value)
    assert live.is_dir() and leftovers(tmp_path / "merged") == [live.name]


def test_a_leftover_of_another_host_is_refused_and_kept(tmp_path: Path) -> None:
    foreign = tmp_path / ".merged.tmp-node-7.cluster-4242"
    foreign.mkdir()
    with pytest.raises(SupermergeError) as info:
        ShardedWriter(tmp_path / "merged", 1 << 20)
    assert str(info.value) == (
        f"{foreign}: left by a run on host node-7.cluster (pid 4242), which cannot be checked from "
        f"{HOST}; remove it by hand if that run is gone"
    )
    assert foreign.is_dir() and leftovers(tmp_path / "merged") == [foreign.name]


def test_cli_removes_a_killed_runs_temporary_folder(
    capsys, caplog, make_models, write_yaml, tmp_path
) -> None:
    base, experts = make_models(k=2)
    config = write_yaml(base, experts)
    pid = dead_pid()
    killed = tmp_path / f".merged.tmp-{HOST}-{pid}"
    killed.mkdir()
    (killed / "shard-00000.tmp").write_bytes(bytes(1 << 20))
    before = tree_hashes(config, base, *experts)
    code, err = run_cli(capsys, config)
    assert code == 0, err
    assert (tmp_path / "merged" / "model.safetensors").is_file() and leftovers(tmp_path / "merged") == []
    assert any(str(killed) in r.message and f"(pid {pid})" in r.message for r in caplog.records)
    assert tree_hashes(config, base, *experts) == before


# --- one output, one run -------------------------------------------------------------------------


def test_a_second_process_is_refused_naming_the_holders_pid(tmp_path: Path, hold_lock) -> None:
    target = tmp_path / "merged"
    holder = hold_lock(target)
    with pytest.raises(SupermergeError) as info:
        OutputLock(target).acquire()
    assert str(info.value) == (
        f"{target}: another run is writing it (pid {holder.pid} on host {HOST}, lock {lock_path(target)}); "
        "wait for it to end or stop it"
    )


def test_cli_refuses_an_output_whose_lock_another_run_holds(
    capsys, make_models, write_yaml, hold_lock
) -> None:
    base, experts = make_models(k=2)
    config = write_yaml(base, experts)
    holder = hold_lock(Path(yaml.safe_load(config.read_text())["output"]))
    needles = ("another run is writing it", f"pid {holder.pid}")
    assert_refused(capsys, config, *needles, inputs=[base, *experts], beside=(".merged.lock",))


def test_the_lock_file_is_removed_on_release(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    with OutputLock(target):
        assert lock_path(target).read_text() == f"{os.getpid()} {HOST}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_without_a_holder_does_not_block(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    lock_path(target).write_text(f"{dead_pid()} {HOST}\n")  # left by a killed run
    with OutputLock(target):
        assert lock_path(target).read_text() == f"{os.getpid()} {HOST}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_killed_holder_leaves_the_lock_free(tmp_path: Path, hold_lock) -> None:
    target = tmp_path / "merged"
    holder = hold_lock(target)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert lock_path(target).exists()  # a killed holder cannot remove it
    with OutputLock(target):
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path, hold_lock) -> None:
    target = tmp_path / "merged"
    with OutputLock(target), ShardedWriter(target, 1 << 20) as writer:  # a driver, then its writer
        writer.add("w", torch.ones(3))
        writer.commit()
        assert lock_path(target).exists()  # still the driver's
    assert not lock_path(target).exists()
    hold_lock(target)  # free for another process


def test_the_lock_excludes_under_contention(tmp_path: Path) -> None:
    """Processes taking and releasing one lock as fast as they can, through its removal on release:
    never two holders at once."""
    target, inside = tmp_path / "merged", tmp_path / "inside"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTEND, str(target), str(inside), "300"], stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err.decode()
    assert list(tmp_path.iterdir()) == []
