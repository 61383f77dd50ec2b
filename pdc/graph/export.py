"""Export a Hugging Face causal LM to a `Program` (unlifted fx graph) and read its weights lazily.

Export settings (transformers 5.x): eager attention (so grouped-query attention appears as explicit
`expand`/`reshape` nodes whose shape constants the head pass can rewrite), `use_cache=False`, and
the wrapper returns only the logits tensor. Batch and sequence are dynamic dimensions, so one
graph serves the probe, the calibration batches and the final re-export.

A source directory is exported on the meta device: parameters are created empty
(`accelerate.init_empty_weights(include_buffers=False)`: small computed buffers such as the rotary
`inv_freq` stay real) and the weights stay in the safetensors files. `WeightStore` reads one tensor
at a time with plain file reads (no mmap, so untouched shards never count towards resident
memory); passes and importance pull tensors from it only when they need them.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Optional, Union

import torch

from pdc.arch import SUPPORTED_MODEL_TYPES, Arch
from pdc.errors import PdcError
from pdc.graph.manager import Program, STAGE

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _LogitsOnly(torch.nn.Module):
    """Wraps an HF causal LM so the exported graph maps input_ids -> logits and nothing else.
    The attribute name `m` becomes the get_attr prefix `m.` (see `Program.prefix`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, use_cache=False).logits


def _dynamic_shapes():
    from torch.export import Dim

    return ({0: Dim("batch", min=1, max=4096), 1: Dim("seq", min=2, max=131072)},)


def default_probe(vocab: int, length: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, length), generator=g)  # batch 1 would specialise the batch dim


def _export(module: torch.nn.Module, probe: torch.Tensor):
    try:
        return torch.export.export(module, (probe,), strict=False, dynamic_shapes=_dynamic_shapes())
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PdcError(f"torch.export failed: {type(exc).__name__}: {first}", STAGE) from exc


def export_model(model: torch.nn.Module, probe: Optional[torch.Tensor] = None) -> Program:
    """Export an in-memory HF causal LM (weights included) to a `Program`.

    Invariant: `program.forward(ids)` equals `model(ids).logits` for any batch/length."""
    config = model.config
    arch = source_arch(config.to_dict())
    probe = default_probe(arch.vocab) if probe is None else probe
    previous = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        ep = _export(_LogitsOnly(model).eval(), probe)
    finally:
        config._attn_implementation = previous
    program = Program(gm=ep.module(), arch=arch, hf_config=config.to_dict(), probe=probe)
    program.kept = full_kept(arch)
    _drop_dead_nodes(program.gm)
    return program


def export_dir(model_dir: Path, probe: Optional[torch.Tensor] = None, progress: bool = False) -> Program:
    """Export the checkpoint in `model_dir` on the meta device; `program.weights` reads its
    tensors on demand (call `materialize(program)` to load them all)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise PdcError(f"no config.json in {model_dir}", STAGE)
    cfg_dict = json.loads((model_dir / "config.json").read_text())
    arch = source_arch(cfg_dict)
    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "eager"
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    probe = default_probe(arch.vocab) if probe is None else probe
    bar = _bar(progress, "export")
    ep = _export(_LogitsOnly(model), probe)
    bar.update(1)
    bar.close()
    gm = ep.module()
    _retarget_devices(gm, torch.device("meta"), torch.device("cpu"))
    program = Program(gm=gm, arch=arch, hf_config=cfg_dict, probe=probe)
    program.weights = WeightStore(model_dir, tied=arch.tied)
    program.kept = full_kept(arch)
    _drop_dead_nodes(gm)
    return program


def materialize(program: Program, dtype: torch.dtype = torch.float32, progress: bool = False) -> None:
    """Load every meta parameter the graph reads from `program.weights` (as `dtype`)."""
    names = [n for n in program.param_nodes() if program.param(n).is_meta]
    for name in _bar_iter(progress, names, "load weights"):
        program.set_param(name, program.weights.load(name, dtype))


def reexport(program: Program, dynamic: bool = True):
    """`torch.export.export` of the rewritten graph module (weights as they are, meta allowed)."""
    probe = program.probe
    shapes = _dynamic_shapes() if dynamic else None
    try:
        return torch.export.export(program.gm, (probe,), strict=False, dynamic_shapes=shapes)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PdcError(f"re-export of the pruned graph failed: {type(exc).__name__}: {first}", STAGE) from exc


def _drop_dead_nodes(gm: torch.fx.GraphModule) -> None:
    """Remove unused nodes (a tied checkpoint leaves a dead read of one of its two names) and
    recompile. Export's symbolic node metadata stays valid, so no shape re-propagation."""
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _retarget_devices(gm: torch.fx.GraphModule, old: torch.device, new: torch.device) -> None:
    """Tracing on meta weights bakes `device=meta` into factory ops and metadata asserts; the
    program runs on real weights, so point them at `new`."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = tuple(new if a == old else a for a in node.args)
            if node.kwargs.get("device") == old:
                node.kwargs = {**node.kwargs, "device": new}


def full_kept(arch: Arch) -> dict:
    """kept_indices for the unpruned source (everything kept)."""
    return {
        "hidden": list(range(arch.hidden)),
        "layers": {
            str(i): {
                "mlp": list(range(arch.mlp)),
                "heads": list(range(arch.heads)),
                "kv_heads": list(range(arch.kv_heads)),
            }
            for i in range(arch.layers)
        },
    }


def source_arch(cfg: dict) -> Arch:
    """`Arch` of an HF config dict; a clear `PdcError` for model types pdc cannot export."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise PdcError(
            f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})", STAGE
        )
    return Arch.from_hf_config(cfg)


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


def _bar(progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=1, desc=desc, disable=not progress)


def _bar_iter(progress: bool, items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=not progress)
