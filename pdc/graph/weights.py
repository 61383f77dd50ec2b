"""Read single tensors by Hugging Face name from a directory of safetensors files.

A source larger than memory is exported on the meta device; passes and importance pull each
tensor from here only when they need it. Plain file reads of exactly the tensor's bytes (no
mmap), so untouched shards never count towards resident memory.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import torch

from pdc.errors import PdcError
from pdc.graph.program import STAGE

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightStore:
    """Reads single tensors by HF name from a directory of safetensors files.

    Plain reads of exactly the tensor's bytes: memory use is one tensor at a time. For tied
    checkpoints `lm_head.weight` is served from `model.embed_tokens.weight` (and vice versa)."""

    def __init__(self, model_dir: Path, tied: bool = False):
        self.model_dir = Path(model_dir)
        self.tied = tied
        self.index: dict[str, tuple[Path, str, list[int], int, int]] = {}
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise PdcError(f"no *.safetensors files in {self.model_dir}", STAGE)
        for path in files:
            with open(path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(header_len))
            base = 8 + header_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.index[name] = (path, info["dtype"], info["shape"], base + start, end - start)

    def names(self) -> list[str]:
        return list(self.index)

    def resolve(self, name: str) -> str:
        if name in self.index:
            return name
        aliases = {"lm_head.weight": "model.embed_tokens.weight", "model.embed_tokens.weight": "lm_head.weight"}
        if self.tied and aliases.get(name) in self.index:
            return aliases[name]
        raise PdcError(f"weight {name!r} not found in the safetensors files of {self.model_dir}", STAGE)

    def shape(self, name: str) -> list[int]:
        return list(self.index[self.resolve(name)][2])

    def load(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        path, st_dtype, shape, offset, nbytes = self.index[self.resolve(name)]
        if st_dtype not in _ST_DTYPES:
            raise PdcError(f"unsupported safetensors dtype {st_dtype} for {name}", STAGE)
        buf = bytearray(nbytes)
        with open(path, "rb") as fh:
            fh.seek(offset)
            fh.readinto(buf)
        tensor = torch.frombuffer(buf, dtype=_ST_DTYPES[st_dtype]).reshape(shape) if nbytes else torch.empty(shape, dtype=_ST_DTYPES[st_dtype])
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def largest_shard_bytes(self) -> int:
        return max(p.stat().st_size for p in {v[0] for v in self.index.values()})
