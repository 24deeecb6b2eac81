"""Read tensors from a Hugging Face safetensors checkpoint, single-file or sharded, memory-mapped and lazily.

Owns the key -> file index (`model.safetensors.index.json` or the tensors of a lone `model.safetensors`) and
open handles; `get(key)` reads only that tensor's bytes. It knows nothing of the model's layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor at fault."""


class SafetensorsReader:
    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: checkpoint directory not found")
        index = self.root / "model.safetensors.index.json"
        self._files: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            self._files = dict(weight_map)
        else:
            single = self.root / "model.safetensors"
            if not single.is_file():
                raise CheckpointError(f"{self.root}: neither model.safetensors.index.json nor model.safetensors found")
            with safe_open(single, framework="pt") as f:
                self._files = {k: single.name for k in f.keys()}
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        self.keys_read: set[str] = set()    # every tensor get() returned (what a shard touched)

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def _handle(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            fpath = self.root / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: shard named in the index is missing")
            h = safe_open(fpath, framework="pt")
            self._handles[fname] = h
        return h

    def get(self, key: str) -> torch.Tensor:
        fname = self._files.get(key)
        if fname is None:
            raise CheckpointError(f"{self.root}: tensor {key!r} is missing from the checkpoint")
        t = self._handle(fname).get_tensor(key)
        self.keys_read.add(key)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of dimension 0 of `key`, reading only their bytes (one shard's experts of a fused
        tensor)."""
        fname = self._files.get(key)
        if fname is None:
            raise CheckpointError(f"{self.root}: tensor {key!r} is missing from the checkpoint")
        t = self._handle(fname).get_slice(key)[start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def shape(self, key: str) -> tuple[int, ...]:
        fname = self._files.get(key)
        if fname is None:
            raise CheckpointError(f"{self.root}: tensor {key!r} is missing from the checkpoint")
        return tuple(self._handle(fname).get_slice(key).get_shape())

    def is_fp8(self, key: str) -> bool:
        """Whether `key` is stored as float8_e4m3fn (from the header: no tensor bytes are read)."""
        fname = self._files.get(key)
        if fname is None:
            raise CheckpointError(f"{self.root}: tensor {key!r} is missing from the checkpoint")
        return self._handle(fname).get_slice(key).get_dtype() == "F8_E4M3"

    def close(self) -> None:
        self._handles.clear()
