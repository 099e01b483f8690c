"""Streaming safetensors files: read tensors lazily from a memory map, write them one at a time.

The ``safetensors`` package's numpy API cannot hold bfloat16; this small reader and writer of the
same format can (through ``ml_dtypes``), and never keep more than one tensor in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file."""


class SafeTensors(Mapping[str, np.ndarray]):
    """A read-only mapping ``name -> np.ndarray`` over one safetensors file, memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries = header
        self._offset = 8 + size
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._offset + end > os.path.getsize(self.path):
            raise SafetensorsError(f"{self.path}: truncated (header promises {end} data bytes)")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{self.path}: {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._map[self._offset + begin:self._offset + end]
        return raw.view(dtype).reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def save_file(path: str | os.PathLike,
              specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
              fetch: Callable[[str], np.ndarray],
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``{name: fetch(name)}`` with the given shapes and dtypes, one tensor at a time.

    The file appears at ``path`` only once complete (written beside it, then renamed).
    """
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, (shape, dtype) in specs.items():
                array = np.ascontiguousarray(fetch(name), dtype=dtype)
                if array.shape != tuple(shape):
                    raise ValueError(f"{name}: shape {array.shape}, expected {tuple(shape)}")
                f.write(array.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                metadata: Mapping[str, str] | None = None) -> None:
    """Writes a dict of arrays (already in memory) as one safetensors file."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    save_file(path, {k: (v.shape, v.dtype) for k, v in arrays.items()}, arrays.__getitem__,
              metadata)


class ShardedSafeTensors(Mapping[str, np.ndarray]):
    """A read-only mapping over the shards of a ``*.safetensors.index.json``."""

    def __init__(self, index: Path):
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index}: not a safetensors index ({e})") from None
        files: dict[str, SafeTensors] = {}
        for shard in sorted(set(weight_map.values())):
            if not (index.parent / shard).is_file():
                raise SafetensorsError(f"{index}: shard {shard} is missing")
            files[shard] = SafeTensors(index.parent / shard)
        self._files = {name: files[shard] for name, shard in weight_map.items()}
        for name, file in self._files.items():
            if name not in file:
                raise SafetensorsError(f"{file.path}: lacks {name}, which {index.name} puts there")

    def __getitem__(self, name: str) -> np.ndarray:
        return self._files[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def open_weights(folder: str | os.PathLike, stem: str) -> Mapping[str, np.ndarray]:
    """The tensors of a diffusers weight folder: ``stem.safetensors`` or its sharded index."""
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return SafeTensors(single)
    if index.is_file():
        return ShardedSafeTensors(index)
    raise SafetensorsError(f"{folder}: neither {single.name} nor {index.name} found")
