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
from pathlib import Path
from typing import Optional

import torch

from pdc.errors import PdcError
from pdc.graph.program import STAGE, Program

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
    save_file(checkpoint_tensors(program, dtype), str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    if source_dir is not None:
        for fname in TOKENIZER_FILES:
            if (Path(source_dir) / fname).exists():
                shutil.copy2(Path(source_dir) / fname, model_dir / fname)
    return model_dir
