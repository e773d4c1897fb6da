"""The one cache pattern of the kit: key -> file -> load and check, or compute -> atomic write.

    emb = cached(key, cfg.cache_dir / "embeddings", compute, expect_shape=(n, d))

A cached tensor is stored as <hash of key>.safetensors (the key in its metadata) with
<hash>.json beside it (the key, for people). A file is used only when its stored key and
its shape are what the caller asked for; an unreadable, foreign or wrongly shaped file is
rebuilt with a warning naming it, never trusted.

A cache that may outgrow memory (the body's hidden states at every scored position: about 6 GB
for WikiText-2 at 256 tokens with GPT-2) is written chunk by chunk and read by rows instead
(`cached_rows`, `RowFile`): same file format, same checks, and only the rows a batch asks for are
ever in memory, so a head-only run's memory does not grow with the corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it to `path`."""
    # a crash mid-write must never leave a truncated file under the final name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def cache_path(key: dict, folder: Path) -> Path:
    return Path(folder) / f"{hashlib.sha256(canonical(key).encode()).hexdigest()[:16]}.safetensors"


def cached(key: dict, folder: Path, compute: Callable[[], torch.Tensor],
           expect_shape: tuple[int | None, ...] | None = None) -> torch.Tensor:
    """`compute()`, or its result stored under `key` by an earlier call.

    Args:
        key: JSON-serialisable description of everything that changes what `compute` returns;
            key order is irrelevant.
        folder: where the files go; the tensor is stored under the folder's name
            ("embeddings", "hidden"), as earlier versions of the kit stored it.
        compute: builds the tensor on a miss.
        expect_shape: the shape the caller knows the result has (None: any size on that axis);
            a stored tensor of another shape is rebuilt.
    """
    folder, text = Path(folder), canonical(key)
    path = cache_path(key, folder)
    if path.exists():
        value, problem = _read(path, folder.name, text, expect_shape)
        if problem is None:
            return value
        warnings.warn(f"cache file {path} {problem}; rebuilding it", stacklevel=2)
    value = compute().detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path.with_suffix(".json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(key, sort_keys=True, indent=2, default=str) + "\n"))
    # the tensor file is written last: its presence means the pair is complete
    write_atomic(path, lambda tmp: save_file({folder.name: value}, tmp, metadata={"key": text}))
    return value


def cached_rows(key: dict, folder: Path, chunks: Callable[[], Iterable[torch.Tensor]],
                shape: tuple[int, int]) -> "RowFile":
    """As `cached`, for a float32 (rows, width) tensor that need never be in memory whole: on a miss,
    `chunks()` yields it a few rows at a time, each written to the file as it comes; the file is then read
    by rows (RowFile). shape is the tensor's, known before any chunk is computed."""
    folder, text = Path(folder), canonical(key)
    path = cache_path(key, folder)
    if path.exists():
        _, problem = _read(path, folder.name, text, shape, load=False)
        if problem is None:
            return RowFile(path, folder.name)
        warnings.warn(f"cache file {path} {problem}; rebuilding it", stacklevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path.with_suffix(".json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(key, sort_keys=True, indent=2, default=str) + "\n"))
    write_atomic(path, lambda tmp: _write_rows(tmp, folder.name, text, chunks(), shape))
    return RowFile(path, folder.name)


def _write_rows(tmp: str, name: str, text: str, chunks: Iterable[torch.Tensor], shape: tuple[int, int]) -> None:
    """A safetensors file of one float32 tensor, written chunk by chunk: the header first (the format puts
    the shape and the byte range there, both known in advance), then the rows as they come."""
    size = shape[0] * shape[1] * 4
    header = json.dumps({"__metadata__": {"key": text},
                         name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)  # the data start 8-byte aligned, as safetensors writes it
    rows = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for chunk in chunks:
            part = chunk.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
            if part.ndim != 2 or part.shape[1] != shape[1]:
                raise ValueError(f"a chunk of shape {tuple(part.shape)} does not fit rows of width {shape[1]}")
            f.write(part.data)
            rows += len(part)
    if rows != shape[0]:
        raise ValueError(f"the chunks held {rows} rows, the shape says {shape[0]}: the cache was not written")


class RowFile:
    """A float32 (rows, width) tensor in a safetensors file, checked by `cached_rows`; rows[index] reads the rows
    of an index tensor, in its order, and nothing else. The file is opened on each read: a file another worker
    replaced with the same content (same key) is simply read anew."""

    def __init__(self, path: Path, name: str):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            entry = json.loads(f.read(length))[name]
        self.shape = tuple(entry["shape"])
        self._start = 8 + length + entry["data_offsets"][0]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).numpy()
        out = np.empty((len(index), self.shape[1]), dtype="<f4")
        if not len(index):
            return torch.from_numpy(out)
        if index.min() < 0 or index.max() >= self.shape[0]:
            raise IndexError(f"rows {index.min()}..{index.max()} asked of {self.path}, which holds {self.shape[0]}")
        row = self.shape[1] * 4
        cuts = np.flatnonzero(np.diff(index) != 1) + 1  # one read per run of consecutive rows (an example's)
        with open(self.path, "rb", buffering=0) as f:
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(index)]):
                f.seek(self._start + int(index[a]) * row)
                if f.readinto(memoryview(out[a:b]).cast("B")) != (b - a) * row:
                    raise ValueError(f"cache file {self.path} is shorter than its header says: it was truncated "
                                     "after it was checked; delete it and run again")
        return torch.from_numpy(out)


def _read(path: Path, name: str, text: str, expect_shape, load: bool = True) -> tuple[torch.Tensor | None, str | None]:
    """The stored tensor (if `load`), or None and what is wrong with the file."""
    try:
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") != text:
                return None, "was written for another key"
            shape = tuple(f.get_slice(name).get_shape())
            if expect_shape is not None and (len(shape) != len(expect_shape) or any(
                    e is not None and s != e for s, e in zip(shape, expect_shape))):
                return None, f"holds shape {shape}, expected {tuple(expect_shape)}"
            return (f.get_tensor(name) if load else None), None
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        return None, f"is unreadable ({type(err).__name__}: {err})"
