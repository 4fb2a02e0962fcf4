"""Hugging Face's sharded safetensors layout, written as tensors arrive: at most one shard is in host RAM.

    model.safetensors                          when everything fits in one shard
    model-00001-of-00003.safetensors ...       otherwise, with
    model.safetensors.index.json               {"metadata": {"total_size", "total_parameters"},
                                                "weight_map": name -> file}

as `PreTrainedModel.save_pretrained` writes it (transformers reads the "format" metadata of each file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from lean_relora.model.streamed import INDEX, SINGLE

METADATA = {"format": "pt"}


class ShardWriter:
    """Collects (name, tensor) pairs and writes a shard whenever the next tensor would take it past `max_bytes` (a
    tensor larger than that gets a shard of its own). `close()` names the shards and writes the index."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []  # written under temporary names, in order
        self.total_bytes = self.total_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.total_parameters += tensor.numel()

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, path, metadata=METADATA)
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give every shard its final name and write the index; returns the file names."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        names = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (path, keys), name in zip(self.shards, names):
            os.rename(path, self.directory / name)
            weight_map.update(dict.fromkeys(keys, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes, "total_parameters": self.total_parameters},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names
