"""Lazy, tensor-by-tensor reading of model checkpoints.

Accepted layouts (`Checkpoint`):
- a Hugging Face model folder with `model.safetensors`, or shards listed in
  `model.safetensors.index.json` (its `config.json` and tokenizer files are carried along);
- a single `.safetensors` file;
- a torch state_dict file (`.pt`, `.pth`, `.bin`), loaded with `mmap=True`.

Safetensors headers are parsed and checked as strictly as the format defines them (offsets
tile the data buffer exactly, sizes match shapes, known dtypes, no name twice), and a sharded
folder's index against its shards (every tensor in exactly one shard, the one the index names),
when the checkpoint is opened: a truncated or corrupt file fails before any work starts. A
tensor's bytes are read only when `read(name)` asks for it, into memory that is freed when the
caller drops the tensor: a merge never holds a whole expert.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from supermerge.errors import InputError
from supermerge.io.digest import files_digest

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
# The safetensors library's own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000
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
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
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


class _JsonObject(dict):
    """A JSON object that keeps the keys it held more than once (json.loads keeps the last silently).

    Used as json.loads' `object_pairs_hook`, so every object of a document is one of these.
    """

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        super().__init__(pairs)
        self.repeated = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]


def _load_json(raw: bytes | str) -> object:
    """Parse JSON whose objects are `_JsonObject`s (a repeated key shows in `.repeated`).

    Raises:
        json.JSONDecodeError, UnicodeDecodeError: not JSON.
    """
    return json.loads(raw, object_pairs_hook=_JsonObject)


def _is_count(x: object) -> bool:
    """True for a non-negative JSON integer (not a bool, not a float)."""
    return type(x) is int and x >= 0


def parse_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Read a safetensors header and check it as strictly as the format defines it; no tensor
    data is read.

    The file is an 8-byte little-endian header length N, N bytes of JSON that begin with `{`
    ({name: {dtype, shape, data_offsets: [begin, end]}, optional "__metadata__": {str: str}}),
    then the data buffer. Checked: N at most MAX_HEADER_BYTES and within the file; no key twice;
    known dtypes; integer shapes and offsets; end - begin = numel x dtype size in bytes; the
    tensors, sorted by offset, tile the buffer exactly (no overlap, no gap, nothing past its end,
    no trailing bytes); offsets are relative to the buffer's start.

    Returns:
        name -> TensorInfo, in header order.
    Raises:
        InputError: the file is missing, truncated, or its header is corrupt, naming the tensor
            at fault where there is one.
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
            if header_len > MAX_HEADER_BYTES:
                raise InputError(
                    path, f"corrupt safetensors file (header of {header_len} bytes, over {MAX_HEADER_BYTES})"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as e:
        raise InputError(path, f"cannot read file ({e.strerror})") from None
    try:
        header = _load_json(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(path, "corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, _JsonObject) or not raw.startswith(b"{"):
        raise InputError(path, "corrupt safetensors file (header is not a JSON object)")
    if header.repeated:
        raise InputError(path, "corrupt safetensors header (two entries of this name)", header.repeated[0])
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, _JsonObject)
        or metadata.repeated
        or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise InputError(path, "corrupt safetensors header (__metadata__ is not a str -> str mapping)")
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    data_start = 8 + header_len
    for name, entry in header.items():
        if not isinstance(entry, _JsonObject):
            raise InputError(path, "corrupt safetensors header entry (not a JSON object)", name)
        if entry.repeated:
            raise InputError(
                path, f"corrupt safetensors header entry (key '{entry.repeated[0]}' twice)", name
            )
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise InputError(path, f"corrupt safetensors header (shape {shape!r})", name)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
            raise InputError(path, f"corrupt safetensors header (data_offsets {offsets!r})", name)
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(path, f"unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})", name)
        begin, end = offsets
        info = TensorInfo(name, tuple(shape), SAFETENSORS_DTYPES[dtype], path, data_start + begin)
        if end - begin != info.nbytes:
            raise InputError(
                path,
                f"corrupt safetensors header: data_offsets {offsets} hold {end - begin} bytes, "
                f"shape {shape} of {dtype} needs {info.nbytes}",
                name,
            )
        infos[name] = info
        spans.append((begin, end, name))
    _check_tiling(path, sorted(spans), size - data_start)
    return infos


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], buffer_bytes: int) -> None:
    """Raise InputError unless `spans` ((begin, end, name), sorted) tile [0, buffer_bytes) exactly."""
    reached, previous = 0, None
    for begin, end, name in spans:
        if begin < reached:
            raise InputError(
                path,
                f"corrupt safetensors header: data_offsets [{begin}, {end}] overlap tensor "
                f"'{previous}' (which ends at {reached})",
                name,
            )
        if begin > reached:
            after = f"tensor '{previous}' (which ends at {reached})" if previous else "the start of the data"
            raise InputError(
                path,
                f"corrupt safetensors header: data_offsets [{begin}, {end}] leave a gap of "
                f"{begin - reached} bytes after {after}",
                name,
            )
        if end > buffer_bytes:
            raise InputError(
                path,
                f"truncated or corrupt safetensors file: data_offsets [{begin}, {end}] run past "
                f"the {buffer_bytes} bytes of data the file holds",
                name,
            )
        reached, previous = end, name
    if reached != buffer_bytes:
        after = f"the last tensor '{previous}'" if previous else "the header"
        raise InputError(
            path, f"corrupt safetensors file: {buffer_bytes - reached} trailing bytes after {after}"
        )


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


class TensorSet:
    """Named tensors known by their `infos` (name -> TensorInfo, in order), before any is read."""

    infos: dict[str, TensorInfo]

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def size_bytes(self) -> int:
        """Total bytes of all tensors."""
        return sum(i.nbytes for i in self.infos.values())


class Checkpoint(TensorSet):
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

    def content_digest(self) -> str:
        """sha256 over the weight files' bytes and config.json: a key that changes with any weight."""
        files = sorted({info.file for info in self.infos.values()})
        config = self.path / "config.json"
        return files_digest(files + ([config] if config.is_file() else []))

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
            return self._open_shards(index_path)
        if single.is_file():
            return parse_safetensors_header(single)
        raise InputError(self.path, "model folder has no model.safetensors nor its index")

    def _open_shards(self, index_path: Path) -> dict[str, TensorInfo]:
        """The tensors of the shards `index_path` lists, each in exactly one shard, all in the index."""
        weight_map = self._read_weight_map(index_path)
        shards: dict[str, dict[str, TensorInfo]] = {}
        for name, shard in weight_map.items():
            if shard not in shards:
                if not (self.path / shard).is_file():
                    raise InputError(
                        self.path / shard, f"no such shard file (named in {index_path.name})", name
                    )
                shards[shard] = parse_safetensors_header(self.path / shard)
        holder: dict[str, str] = {}
        for shard, infos in shards.items():
            for name in infos:
                if name in holder:
                    raise InputError(
                        self.path / shard,
                        f"held by two shards, this one and {self.path / holder[name]}",
                        name,
                    )
                if name not in weight_map:
                    raise InputError(
                        self.path / shard, f"held by this shard but not listed in {index_path.name}", name
                    )
                holder[name] = shard
        for name, shard in weight_map.items():
            if holder.get(name) != shard:
                where = f"it is in {self.path / holder[name]}" if name in holder else "no shard holds it"
                raise InputError(
                    self.path / shard, f"{index_path.name} places the tensor in this shard, but {where}", name
                )
        return {name: shards[shard][name] for name, shard in weight_map.items()}

    @staticmethod
    def _read_weight_map(index_path: Path) -> dict[str, str]:
        """The index's weight_map (tensor name -> shard file name inside the folder), checked."""
        try:
            index = _load_json(index_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(index_path, "corrupt index (not JSON)") from None
        weight_map = index.get("weight_map") if isinstance(index, _JsonObject) else None
        if not isinstance(weight_map, _JsonObject):
            raise InputError(index_path, "corrupt index (no 'weight_map' object)")
        if weight_map.repeated:
            raise InputError(index_path, "listed twice in 'weight_map'", weight_map.repeated[0])
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise InputError(
                    index_path, f"'weight_map' names {shard!r}, not a file name in the folder", name
                )
        return weight_map

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

    def _info(self, name: str) -> TensorInfo:
        info = self.infos.get(name)
        if info is None:
            raise InputError(self.path, "no such tensor in checkpoint", name)
        return info

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (its stored dtype, on CPU).

        Raises:
            InputError: the tensor does not exist or its data is truncated.
        """
        info = self._info(name)
        if self._state_dict is not None:
            return self._state_dict[name]
        return _read_safetensors_elements(info, 0, info.numel).view(info.shape)

    def read_into(self, name: str, out: torch.Tensor, staging: torch.Tensor) -> torch.Tensor:
        """Tensor `name` converted into `out` (contiguous CPU, as many elements, any dtype), read
        through `staging` (a uint8 buffer of a few MiB, at least one element) piece by piece:
        no buffer of the stored tensor's size is made. Returns `out`.

        Raises:
            InputError: the tensor does not exist or its data is truncated.
        """
        info = self._info(name)
        if self._state_dict is not None:
            return out.copy_(self._state_dict[name].reshape(out.shape))
        flat, item = out.view(-1), info.dtype.itemsize
        per = staging.numel() // item
        with info.file.open("rb") as f:
            f.seek(info.offset)
            for lo in range(0, info.numel, per):
                hi = min(lo + per, info.numel)
                piece = staging[: (hi - lo) * item]
                if f.readinto(memoryview(piece.numpy())) != (hi - lo) * item:
                    raise InputError(info.file, "truncated tensor data", info.name)
                flat[lo:hi].copy_(piece.view(info.dtype))
        return out

    def read_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of tensor `name` flattened, [hi - lo], reading only those bytes."""
        info = self._info(name)
        if not 0 <= lo <= hi <= info.numel:
            raise ValueError(f"{name}: element range [{lo}, {hi}) outside [0, {info.numel})")
        if self._state_dict is not None:
            return self._state_dict[name].reshape(-1)[lo:hi]
        return _read_safetensors_elements(info, lo, hi)
