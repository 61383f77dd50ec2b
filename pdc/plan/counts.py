"""Exact parameter counts and FLOPs of a model config, with no per-family formula.

The config (the source's, or the one pdc will emit for a pruned student:
`Arch.to_hf_config`) is instantiated by transformers on the meta device, so the count is that of
the very modules the emitted checkpoint loads into, for any architecture transformers knows, in
a fraction of a second after the first call (no weights are allocated). Shared tensors (tied
embeddings) are counted once, as `model.parameters()` yields them once.

- `non_embedding`: everything but the input embedding and the output head (the Minitron paper's
  Table 3 convention);
- `linear`: the weights of every linear layer a token multiplies, the output head included and,
  in a mixture of experts, top_k of the routed experts: the basis of `flops_per_token` (2 FLOPs
  per weight multiply, plus the attention score and value products);
- `active`: the parameters a token uses (all of them in a dense model; a mixture of experts
  counts top_k of its routed experts).

A config that transformers refuses (for instance a hidden size its attention cannot split into
the heads) raises `ConfigError` with transformers' reason; `nearest_valid` probes neighbouring
sizes with the same check, so the user gets the closest sizes the emitted config can represent.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pdc.arch import Arch
from pdc.errors import PdcError

NEAREST_SEARCH = 64  # sizes probed on each side of a rejected one


class ConfigError(PdcError):
    """transformers cannot build a model from this config (one line: its reason)."""


@dataclass(frozen=True)
class Counts:
    total: int
    non_embedding: int
    embedding: int
    linear: int  # every linear weight a token multiplies (the routed experts it uses: top_k of them)
    active: int  # parameters a token uses (a dense model: all of them)


def hf_config(cfg: dict):
    """The transformers config object of a config dict; `ConfigError` with the reason."""
    cfg = dict(cfg)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ConfigError("the config has no model_type")
    for key in ("transformers_version", "architectures", "_name_or_path", "auto_map"):
        cfg.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except Exception as exc:  # transformers validates configs with several exception types
        raise ConfigError(_reason(exc, model_type)) from None


def _reason(exc: BaseException, model_type: str) -> str:
    """transformers' own words: the validator's cause when there is one, on one line."""
    root = exc.__cause__ or exc
    text = " ".join(str(root).split()) or type(root).__name__
    if "Unrecognized" in text or (isinstance(root, KeyError) and model_type in text):
        return f"transformers does not know model type '{model_type}'"
    return text[:300].rstrip(".")


@functools.lru_cache(maxsize=64)
def _count(canonical: str) -> Counts:
    config = hf_config(json.loads(canonical))
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an inconsistent config fails while building its modules
        raise ConfigError(_reason(exc, config.model_type)) from None
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    embedding = embed.numel()
    if head is not None and head.weight is not embed:
        embedding += head.weight.numel()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # Routed experts are stored as one tensor per layer and projection whose leading dimension
    # is the expert count; a token multiplies top_k of those slices.
    arch = Arch.from_hf_config(config.to_dict())
    routed = sum(p.numel() for p in model.parameters()
                 if arch.experts and p.dim() >= 3 and p.shape[0] == arch.experts)
    idle = routed * (arch.experts - arch.top_k) // arch.experts if arch.experts else 0
    return Counts(total=total, non_embedding=total - embedding, embedding=embedding,
                  linear=linear + routed - idle, active=total - idle)


def count(cfg: dict) -> Counts:
    """Counts of the model `cfg` describes (cached per config)."""
    return _count(json.dumps(cfg, sort_keys=True, default=str))


def count_arch(source_cfg: dict, arch: Arch) -> Counts:
    """Counts of the model with `arch`'s sizes written into `source_cfg` (what pdc emits)."""
    return count(arch.to_hf_config(source_cfg))


def flops_per_token(counts: Counts, arch: Arch, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per weight multiply of every linear layer (the output head
    included) plus the attention score and value products at context `seq_len` (causal half)."""
    attention = arch.layers * 2 * arch.heads * arch.head_dim * seq_len
    return 2.0 * counts.linear + 2.0 * attention


def representable(source_cfg: dict, arch: Arch) -> Optional[str]:
    """None when the emitted config of `arch` builds and reads back as `arch`, else the reason."""
    emitted = arch.to_hf_config(source_cfg)
    back = Arch.from_hf_config(emitted)
    lost = [a for a, v in arch.sizes().items() if back.sizes().get(a) != v]
    if lost:
        return "it has no separate key for " + ", ".join(f"{a} (it would read {a}={back.sizes().get(a)})" for a in lost)
    try:
        built = count(emitted)
    except ConfigError as exc:
        return exc.message
    if arch.heads and arch.head_dim != arch.hidden // arch.heads and not _reads_head_dim(emitted, arch, built):
        return (f"its config derives head_dim from hidden_size // heads = {arch.hidden // arch.heads}, "
                f"not the source's {arch.head_dim}")
    return None


def _reads_head_dim(emitted: dict, arch: Arch, built: Counts) -> bool:
    """Whether transformers builds this config with its `head_dim` key (GPT-NeoX style configs
    ignore it and derive hidden // heads): two more per head must change the count or be
    refused."""
    try:
        return count(dict(emitted, head_dim=arch.head_dim + 2)).total != built.total
    except ConfigError:
        return True


def nearest_valid(source_cfg: dict, arch: Arch, axis: str, upper: int) -> list[int]:
    """The closest sizes below and above `arch.<axis>` (within 1..upper) that the emitted config
    can represent, found by asking transformers (no family rule is assumed)."""
    want = getattr(arch, axis)
    found: list[int] = []
    for direction in (-1, 1):
        for step in range(1, NEAREST_SEARCH + 1):
            value = want + direction * step
            if not 1 <= value <= upper:
                break
            candidate = arch.with_sizes(**{axis: value})
            try:
                hf_config(candidate.to_hf_config(source_cfg))
            except ConfigError:
                continue
            if candidate.head_dim != candidate.hidden // max(1, candidate.heads) and representable(source_cfg, candidate):
                continue  # a config that derives head_dim cannot hold this size
            found.append(value)
            break
    return found
