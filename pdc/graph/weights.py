"""Read single tensors by Hugging Face name from a safetensors checkpoint directory.

A source larger than memory is exported on the meta device; passes and importance pull each
tensor from here only when they need it. Plain file reads of exactly the tensor's bytes (no
mmap), so untouched shards never count towards resident memory. The headers are read and
checked by `pdc.inputs.verify` (a truncated or inconsistent file fails here, before any tensor is
used), and every read is length-checked: a file that shrank since is an error, never zeros.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pdc.errors import PdcError
from pdc.graph.program import STAGE
from pdc.inputs.verify import ST_DTYPES, TensorEntry, read_exact, weight_entries


class WeightStore:
    """Reads single tensors by HF name from a checkpoint directory (`model.safetensors`, or the
    shards its index names). For tied checkpoints the head is served from the embedding (and vice
    versa): `aliases` names the two. `renames` maps module names to older checkpoint keys
    (GPT-NeoX checkpoints store the head as `embed_out.weight`)."""

    def __init__(self, model_dir: Path, tied: bool = False,
                 aliases: tuple[str, str] = ("model.embed_tokens.weight", "lm_head.weight"),
                 renames: Optional[dict[str, str]] = None):
        self.model_dir = Path(model_dir)
        self.renames = dict(renames or {})  # module name -> the key the checkpoint stores it under
        self.tied = tied
        self.aliases = {aliases[0]: aliases[1], aliases[1]: aliases[0]}
        self.index: dict[str, TensorEntry] = weight_entries(self.model_dir, STAGE)

    def names(self) -> list[str]:
        return list(self.index)

    def resolve(self, name: str) -> str:
        if name in self.index:
            return name
        if self.renames.get(name) in self.index:
            return self.renames[name]
        if self.tied and self.aliases.get(name) in self.index:
            return self.aliases[name]
        raise PdcError(f"weight {name!r} not found in the safetensors files of {self.model_dir}", STAGE)

    def shape(self, name: str) -> list[int]:
        return list(self.index[self.resolve(name)].shape)

    def load(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        entry = self.index[self.resolve(name)]
        st_dtype = ST_DTYPES[entry.dtype][0]
        if entry.nbytes:
            buf = read_exact(entry.file, entry.offset, entry.nbytes, STAGE, what=f"tensor {entry.name!r}")
            tensor = torch.frombuffer(buf, dtype=st_dtype).reshape(entry.shape)
        else:
            tensor = torch.empty(entry.shape, dtype=st_dtype)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def largest_shard_bytes(self) -> int:
        return max(p.stat().st_size for p in {e.file for e in self.index.values()})


class ConvertedWeights:
    """The tensors of a checkpoint whose stored layout is not the module layout (transformers
    converts it while loading: Mixtral-style checkpoints store each expert's w1/w2/w3, the module
    holds one fused `experts.gate_up_proj [E, 2I, H]`). Loaded once by transformers itself (its
    conversion rules are the authority) and served by module name; no streaming."""

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        except Exception as exc:  # transformers raises many types for a checkpoint it cannot load
            raise PdcError(f"transformers cannot load {self.model_dir}: {type(exc).__name__}: {exc}".splitlines()[0],
                           STAGE) from exc
        self.tensors = {n: t.detach() for n, t in model.state_dict().items()}
        self.renames: dict[str, str] = {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> list[int]:
        return list(self.load(name).shape)

    def load(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if name not in self.tensors:
            raise PdcError(f"weight {name!r} not found in the model transformers loads from {self.model_dir}", STAGE)
        tensor = self.tensors[name]
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
