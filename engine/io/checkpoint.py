"""Lazy, tensor-by-tensor reading of model checkpoints.

Accepted layouts (`open_checkpoint`):
- a Hugging Face model folder with `model.safetensors`, or shards listed in
  `model.safetensors.index.json` (its `config.json` and tokenizer files are carried along);
- a single `.safetensors` file;
- a torch state_dict file (`.pt`, `.pth`, `.bin`), loaded with `mmap=True`.

Safetensors headers are parsed and checked against the file size when the checkpoint is
opened, so a truncated or corrupt file fails before any work starts. A tensor's bytes are read
only when `read(name)` asks for it, into memory that is freed when the caller drops the tensor:
a merge never holds a whole expert.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from supermerge.errors import InputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
# Files of a model folder that describe the model rather than hold its weights.
CARRIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Named tensors: a state dict, a model body or a head, a batch of model inputs.
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data.

    Attributes:
        name: tensor name in the checkpoint.
        shape: tensor shape.
        dtype: stored dtype.
        file: file that holds it.
        offset: byte offset of its data in `file` (safetensors only; -1 otherwise).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = -1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def parse_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Read and validate a safetensors header; no tensor data is read.

    Raises:
        InputError: the file is missing, truncated, or its header is corrupt.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(path, "truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise InputError(path, "truncated or corrupt safetensors file (header too long)")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(path, "corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError(path, "corrupt safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(path, "corrupt safetensors header entry", name) from None
        info = TensorInfo(name, shape, dtype, path, data_start + begin)
        if end - begin != info.nbytes or begin < 0:
            raise InputError(path, "corrupt safetensors header (size does not match shape)", name)
        infos[name] = info
        data_end = max(data_end, end)
    if data_start + data_end != size:
        raise InputError(
            path,
            f"truncated or corrupt safetensors file: header promises {data_start + data_end} "
            f"bytes, file has {size}",
        )
    return infos


def _read_safetensors_elements(info: TensorInfo, lo: int, hi: int) -> torch.Tensor:
    """Read elements [lo, hi) of the flattened tensor with one positioned read into fresh memory."""
    out = torch.empty(hi - lo, dtype=info.dtype)
    if hi > lo:
        item = out.element_size()
        view = memoryview(out.view(torch.uint8).numpy())
        with info.file.open("rb") as f:
            f.seek(info.offset + lo * item)
            if f.readinto(view) != (hi - lo) * item:
                raise InputError(info.file, "truncated tensor data", info.name)
    return out


class Checkpoint:
    """A model checkpoint on disk, read lazily one tensor at a time.

    Attributes:
        path: what the user named (folder or file).
        infos: name -> TensorInfo for every tensor, in file order.
        config: the parsed `config.json` of a model folder, else None.
        carried: non-weight files of a model folder (config, tokenizer) to copy to outputs.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config: dict | None = None
        self.carried: list[Path] = []
        self._state_dict: Tensors | None = None
        if self.path.is_dir():
            self.infos = self._open_folder()
        elif self.path.is_file():
            if self.path.suffix == ".safetensors":
                self.infos = parse_safetensors_header(self.path)
            elif self.path.suffix in STATE_DICT_SUFFIXES:
                self.infos = self._open_state_dict(self.path)
            else:
                raise InputError(
                    self.path,
                    "unknown checkpoint format (expected a model folder, .safetensors, "
                    f"or a torch state_dict {'/'.join(STATE_DICT_SUFFIXES)})",
                )
        else:
            raise InputError(self.path, "no such file or folder")
        if not self.infos:
            raise InputError(self.path, "checkpoint holds no tensors")

    def _open_folder(self) -> dict[str, TensorInfo]:
        config_path = self.path / "config.json"
        if config_path.is_file():
            try:
                self.config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(config_path, f"config.json is not valid JSON ({e})") from None
        self.carried = [self.path / n for n in CARRIED_FILES if (self.path / n).is_file()]
        index_path = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(index_path, "corrupt index (no 'weight_map')") from None
            shards = {f: parse_safetensors_header(self.path / f) for f in dict.fromkeys(weight_map.values())}
            infos: dict[str, TensorInfo] = {}
            for name, shard in weight_map.items():
                if name not in shards[shard]:
                    raise InputError(self.path / shard, "listed in the index but missing", name)
                infos[name] = shards[shard][name]
            return infos
        if single.is_file():
            return parse_safetensors_header(single)
        raise InputError(self.path, "model folder has no model.safetensors nor its index")

    def _open_state_dict(self, path: Path) -> dict[str, TensorInfo]:
        try:
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle or zip
            raise InputError(path, f"cannot load torch state_dict ({type(e).__name__}: {e})") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise InputError(path, "not a state_dict (expected a mapping of names to tensors)")
        self._state_dict = loaded
        return {name: TensorInfo(name, tuple(t.shape), t.dtype, path) for name, t in loaded.items()}

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (its stored dtype, on CPU).

        Raises:
            InputError: the tensor does not exist or its data is truncated.
        """
        info = self.infos.get(name)
        if info is None:
            raise InputError(self.path, "no such tensor in checkpoint", name)
        if self._state_dict is not None:
            return self._state_dict[name]
        return _read_safetensors_elements(info, 0, info.numel).view(info.shape)

    def read_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of tensor `name` flattened, [hi - lo], reading only those bytes."""
        info = self.infos.get(name)
        if info is None:
            raise InputError(self.path, "no such tensor in checkpoint", name)
        if not 0 <= lo <= hi <= info.numel:
            raise ValueError(f"{name}: element range [{lo}, {hi}) outside [0, {info.numel})")
        if self._state_dict is not None:
            return self._state_dict[name].reshape(-1)[lo:hi]
        return _read_safetensors_elements(info, lo, hi)

    def size_bytes(self) -> int:
        """Total bytes of all tensors."""
        return sum(i.nbytes for i in self.infos.values())
