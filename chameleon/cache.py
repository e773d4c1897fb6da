"""The one cache pattern of the kit: key -> file -> load and check, or compute -> atomic write.

    emb = cached(key, cfg.cache_dir / "embeddings", compute, expect_shape=(n, d))

A cached tensor is stored as <hash of key>.safetensors (the key in its metadata) with
<hash>.json beside it (the key, for people). A file is used only when its stored key and
its shape are what the caller asked for; an unreadable, foreign or wrongly shaped file is
rebuilt with a warning naming it, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

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


def _read(path: Path, name: str, text: str, expect_shape) -> tuple[torch.Tensor | None, str | None]:
    """The stored tensor, or None and what is wrong with the file."""
    try:
        with safe_open(path, "pt") as f:
            stored_key = (f.metadata() or {}).get("key")
            value = f.get_tensor(name) if stored_key == text else None
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        return None, f"is unreadable ({type(err).__name__}: {err})"
    if value is None:
        return None, "was written for another key"
    if expect_shape is not None and (len(value.shape) != len(expect_shape) or any(
            e is not None and s != e for s, e in zip(value.shape, expect_shape))):
        return None, f"holds shape {tuple(value.shape)}, expected {tuple(expect_shape)}"
    return value, None
