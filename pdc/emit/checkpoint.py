"""Write a rewritten `Program` as a Hugging Face checkpoint directory.

Invariant: `AutoModelForCausalLM.from_pretrained(dir)` (fp32) gives the logits of
`program.forward` on the same ids, and its parameter count is that of the emitted config
instantiated by transformers (`pdc.plan.counts.count`).
The config is the source config with the new sizes from `Arch.to_hf_config` (explicit head_dim).
Tied checkpoints store only the input embedding, as Hugging Face does.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Optional

import torch

from pdc.errors import PdcError
from pdc.graph.program import STAGE, Program
from pdc.graph.storage import stored_below_fp32

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
    "chat_template.json",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dtype(hf_config: dict) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def checkpoint_tensors(program: Program, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The program's parameters as the checkpoint stores them: Hugging Face names, a tied
    embedding/head matrix once (under the embedding's name), cast to `dtype` when given."""
    tensors = {}
    head, embed = program.head, program.embedding
    params = program.state_dict()
    for name, tensor in params.items():
        if program.arch.tied and name == head:
            if embed in params:
                continue  # same values, sliced the same way: HF ties it back on load
            name = embed  # the graph reads the shared tensor under one name
        tensors[name] = tensor.detach() if dtype is None else tensor.detach().to(dtype).contiguous()
    if program.arch.tied:
        tensors.pop(head, None)
    return tensors


_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    """A safetensors file written one tensor at a time (header, then each tensor's bytes): no
    buffer of the whole file, which `safetensors.torch.save_file` (0.8) builds in memory."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _ST_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for tensor in tensors.values():
            if tensor.numel():
                fh.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


def emit_checkpoint(program: Program, model_dir: Path, source_dir: Optional[Path] = None,
                    dtype: Optional[torch.dtype] = None) -> Path:
    """Write config.json, model.safetensors and the source tokenizer files into `model_dir`
    (created; the caller owns atomicity: pass a path inside a temp directory)."""
    from safetensors.torch import save_file

    if program.on_meta():
        raise PdcError("cannot emit a checkpoint: some weights were never loaded (meta tensors)", STAGE)
    dtype = dtype or source_dtype(program.hf_config)
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = program.arch.to_hf_config(program.hf_config)
    config["dtype"] = str(dtype).replace("torch.", "")
    config.pop("torch_dtype", None)
    config.pop("_name_or_path", None)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = checkpoint_tensors(program, dtype)
    if stored_below_fp32(program):  # a large student: safetensors' writer would buffer it whole
        write_safetensors(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    if source_dir is not None:
        for fname in TOKENIZER_FILES:
            if (Path(source_dir) / fname).exists():
                shutil.copy2(Path(source_dir) / fname, model_dir / fname)
    return model_dir
