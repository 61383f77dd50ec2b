"""A GGUF file's header, read without its tensor data, and the Hugging Face config it describes.

This is pdc's one reading of a GGUF source: the checker and the dry run take their config from
`gguf_config`, and the conversion into a checkpoint (`pdc.inputs.gguf.convert_gguf`) builds the
saved config from the same dict, refusing a file that transformers' own GGUF loader reads
differently. So the sizes a spec is checked against are the sizes of the model the stages load.

`gguf_config` follows transformers' GGUF loader (`load_gguf_checkpoint` for most architectures,
`get_gguf_config` for the ones it rebuilds per architecture): its key map and defaults, its
renames (llama.cpp's `gemma3` holds only the text model, `gemma3_text`; `qwen2moe` is
`qwen2_moe`, ...), the settings it derives from the tensor names (StableLM's biases and residual,
a tied head when there is no `output.weight`) and the vocabulary size from the token list. One
size the key map leaves to a config class default is read from the tensors instead: a head width
other than hidden // heads (Qwen3's), so the sizes the checker reads are the built model's. It needs
neither torch nor the vocabulary itself: arrays of strings are counted, not decoded, so a 262k-token
header reads in a fraction of a second.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdc.errors import PdcError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 counted in 32 bits; llama.cpp has not written it since 2023
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Architectures whose GGUF holds no causal language model transformers can load as one.
_NOT_DECODERS = ("t5", "t5encoder", "umt5")
# Expert widths transformers' GGUF loader does not read (its key map sends
# `expert_feed_forward_length` nowhere): the model it builds has its config class defaults, which
# this copies so the language layer needs no transformers config class (and no torch);
# tests/test_gguf_sources.py checks the copy against transformers. key -> (default, the tensor
# whose last axis is that width)
_UNREAD_EXPERT_WIDTHS = {
    "qwen3_moe": {"moe_intermediate_size": (768, "blk.0.ffn_down_exps.weight")},
    "qwen2_moe": {"moe_intermediate_size": (1408, "blk.0.ffn_down_exps.weight"),
                  "shared_expert_intermediate_size": (5632, "blk.0.ffn_down_shexp.weight")},
}


class GgufError(PdcError):
    def __init__(self, message: str):
        super().__init__(message, "spec")


@dataclass(frozen=True)
class GgufHeader:
    """`metadata`: key -> value, an array of numbers as a list and an array of strings as its
    length (what transformers' header reader does too); `tensors`: name -> shape in torch order."""

    metadata: dict[str, Any]
    tensors: dict[str, tuple[int, ...]]


class _Reader:
    """Values at a moving offset of the file's bytes (memory-mapped: skipping is free)."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.at = data, path, 0

    def take(self, fmt: str) -> Any:
        end = self.at + struct.calcsize(fmt)
        if end > len(self.data):
            raise GgufError(f"GGUF file {self.path} is truncated (its header ends early)")
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at = end
        return value

    def raw(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise GgufError(f"GGUF file {self.path} is truncated (its header ends early)")
        self.at += n
        return self.data[self.at - n:self.at]

    def string(self) -> str:
        return bytes(self.raw(self.take("<Q"))).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self.take(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("<I"), self.take("<Q")
            if item == _STRING:  # counted, not decoded (a vocabulary has 10^5 of them)
                data, at, unpack = self.data, self.at, struct.Struct("<Q").unpack_from
                for _ in range(n):
                    at += 8 + unpack(data, at)[0]
                self.at = at
                if at > len(data):
                    raise GgufError(f"GGUF file {self.path} is truncated (its header ends early)")
                return n
            if item in _SCALAR:
                fmt = _SCALAR[item]
                return list(struct.unpack_from(f"<{n}{fmt[1:]}", self.raw(n * struct.calcsize(fmt))))
            return [self.value(item) for _ in range(n)]
        raise GgufError(f"GGUF file {self.path} has a metadata value of unknown type {kind}")


def read_header(path: Path) -> GgufHeader:
    """The metadata and tensor shapes of the GGUF file at `path` (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(_Reader(memoryview(data), path))
    except (OSError, ValueError) as exc:  # mmap of an empty file raises ValueError
        raise GgufError(f"cannot read GGUF file {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _parse(r: _Reader) -> GgufHeader:
    try:
        if bytes(r.raw(4)) != MAGIC:
            raise GgufError(f"{r.path} is not a GGUF file (it does not start with 'GGUF')")
        version = r.take("<I")
        if version not in VERSIONS:
            raise GgufError(f"GGUF file {r.path} has format version {version}; pdc reads versions 2 and 3")
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.take("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.take("<Q") for _ in range(r.take("<I"))]
            r.take("<I"), r.take("<Q")  # ggml type, data offset
            tensors[name] = tuple(reversed(dims))
        return GgufHeader(metadata, tensors)
    finally:
        r.data.release()


def _transformers_maps() -> tuple[dict, dict, dict]:
    """transformers' GGUF key map and defaults, and its per-architecture config builders (plain
    dicts in modules that do not import torch)."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf.gguf_config_mapping import GGUF_CONFIG_ARCHS

    return GGUF_CONFIG_MAPPING, GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_ARCHS


def _model_type(arch: str, name: Any) -> str:
    """The transformers architecture of llama.cpp's `arch` (before the text-model renames)."""
    if "llama" in arch and name == "mistral":  # transformers tests the name for exactly this
        return "mistral"
    for gguf_name, hf_name in (("qwen2moe", "qwen2_moe"), ("gpt-oss", "gpt_oss"), ("gpt_oss", "gpt_oss"),
                               ("qwen3moe", "qwen3_moe"), ("minimax-m2", "minimax_m2")):
        if gguf_name in arch:
            return hf_name
    return arch


def header_config(header: GgufHeader, path: Path) -> dict:
    """The Hugging Face config dict transformers builds from this header (see the module doc)."""
    mapping, defaults, per_arch = _transformers_maps()
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GgufError(f"GGUF file {path} has no 'general.architecture'")
    if arch in per_arch:
        try:
            return per_arch[arch](meta, tuple(header.tensors))
        except KeyError as exc:
            raise GgufError(f"GGUF file {path} lacks metadata {exc}") from None
    model_type = _model_type(arch, meta.get("general.name"))
    known = sorted(k for k in mapping if k not in ("general", "tokenizer") and k not in _NOT_DECODERS)
    if arch in _NOT_DECODERS or (arch not in mapping and model_type not in mapping):
        raise GgufError(f"GGUF file {path} has architecture {arch!r}, which transformers cannot load from GGUF "
                        f"as a causal language model (it reads {', '.join(known)})")
    cfg: dict[str, Any] = {}
    if "stablelm" in arch:  # biases and the residual layout are read from which tensors exist
        cfg["use_qkv_bias"] = any(b in t for t in header.tensors for b in ("attn_q.bias", "attn_k.bias", "attn_v.bias"))
        cfg["use_parallel_residual"] = not any("ffn_norm" in t for t in header.tensors)
    cfg["tie_word_embeddings"] = "output.weight" not in header.tensors or arch in ("falcon", "bloom")
    for key, value in (defaults.get(model_type) or defaults.get(arch) or {}).items():
        cfg.setdefault(key, value)
    for key, value in meta.items():
        key = key.replace(arch, model_type)
        prefix, _, rest = key.partition(".")
        target = mapping.get(prefix, {}).get(rest) if prefix in mapping else None
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, model_type)
        if target is not None and target != -1:
            cfg[target] = value
    if cfg.get("model_type") in ("gemma3", "gemma4"):  # the file holds only the text model
        cfg["model_type"] += "_text"
        if cfg["model_type"] == "gemma4_text":
            cfg["eos_token_id"] = [1, 106, 50]
    if cfg.get("model_type") == "minimax_m2" and isinstance(cfg.get("scoring_func"), int):
        cfg["scoring_func"] = {0: "none", 1: "softmax", 2: "sigmoid"}.get(cfg["scoring_func"], "softmax")
    if "vocab_size" not in cfg and isinstance(meta.get("tokenizer.ggml.tokens"), int):
        cfg["vocab_size"] = meta["tokenizer.ggml.tokens"]
    _head_dim_from_tensors(cfg, header)
    _expert_widths(cfg, header, path)
    return cfg


def _expert_widths(cfg: dict, header: GgufHeader, path: Path) -> None:
    """The expert widths transformers gives the model it loads (its defaults); a file whose expert
    tensors have another width is one transformers cannot load, refused here naming the key."""
    for key, (default, tensor) in _UNREAD_EXPERT_WIDTHS.get(cfg.get("model_type"), {}).items():
        shape = header.tensors.get(tensor)
        if shape is not None and shape[-1] != default:
            raise GgufError(f"GGUF file {path} has experts {shape[-1]} wide ({tensor}), but transformers' GGUF "
                            f"loader does not read the width and builds {key}={default}: it cannot load this file")
        cfg.setdefault(key, default)


def _head_dim_from_tensors(cfg: dict, header: GgufHeader) -> None:
    """A head width other than hidden // heads that the key map leaves out (Qwen3's: transformers
    takes its config class default, 128), stated as the q projection's rows per head. Where the
    class default is that width this is the config transformers builds; where it is not,
    transformers' own loader disagrees with the tensors and the conversion refuses the file."""
    q = header.tensors.get("blk.0.attn_q.weight")
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if "head_dim" in cfg or not q or not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return
    if q[0] != hidden and q[0] % heads == 0:
        cfg["head_dim"] = q[0] // heads


def gguf_config(path: Path) -> dict:
    """The Hugging Face config dict of the GGUF file at `path`: the one pdc checks a spec against
    and saves with the converted checkpoint. `GgufError` (one line) when the file cannot be read,
    holds an architecture transformers cannot load, or lacks a size."""
    path = Path(path)
    header = read_header(path)
    cfg = header_config(header, path)
    arch = header.metadata["general.architecture"]
    for key in ("embedding_length", "block_count", "attention.head_count"):
        if f"{arch}.{key}" not in header.metadata:
            raise GgufError(f"GGUF file {path} lacks metadata '{arch}.{key}'")
    if not isinstance(cfg.get("vocab_size"), int):
        raise GgufError(f"GGUF file {path} has neither a tokenizer nor '{arch}.vocab_size'")
    return cfg
