"""The sizes of a decoder, read from (and written back into) a Hugging Face config dict.

`Arch` is the axis-by-axis view the language checks targets against and the passes and plan
report: hidden, mlp, layers, heads, kv_heads, head_dim, vocab. It knows config key *names*, not
model families: each axis is read from the first of its conventional keys that the config has
(`hidden_size`, `n_embd`, `d_model`, ...) and written back under the same key. Exact parameter
counts come from the config instantiated by transformers (`pdc.plan.counts`), never from a
formula here. No torch: the language layer uses this module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

# Config keys of each axis, in order of preference (HF configs and their attribute maps).
CONFIG_KEYS = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "mlp": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "head_dim": ("head_dim",),
    "vocab": ("vocab_size",),
    # mixture of experts: routed experts per layer, experts each token uses, an expert's MLP
    # width (its own key, else the dense key the experts use), the shared expert's MLP width
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "top_k": ("num_experts_per_tok", "moe_top_k"),
    "expert_mlp": ("moe_intermediate_size", "intermediate_size"),
    "shared_mlp": ("shared_expert_intermediate_size",),
}
AXES = ("hidden", "mlp", "layers", "heads", "kv_heads", "head_dim", "vocab")
MOE_AXES = ("experts", "top_k", "expert_mlp", "shared_mlp")
# Lists with one entry per decoder layer; they are cut with the layers.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "sliding_window_pattern_list")


def _key(cfg: Mapping[str, Any], axis: str) -> str | None:
    """The config key `cfg` holds `axis` under (None when it has none of its keys)."""
    return next((k for k in CONFIG_KEYS[axis] if cfg.get(k) is not None), None)


def per_layer_lists(config, keep: Sequence[int], n_layers: int) -> dict[str, list]:
    """The per-layer config lists (`PER_LAYER_KEYS`) of `config` (a dict or a transformers config)
    with the entries of layers `keep`, in that order: the one rule by which every list with one
    entry per decoder layer is cut with the layers. Lists of another length than `n_layers` are
    not per-layer lists and are left out."""
    out = {}
    for key in PER_LAYER_KEYS:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n_layers:
            out[key] = [value[i] for i in keep]
    return out


def _read(cfg: Mapping[str, Any], axis: str) -> Any:
    key = _key(cfg, axis)
    return None if key is None else cfg[key]


@dataclass(frozen=True)
class Arch:
    model_type: str
    vocab: int
    hidden: int
    mlp: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    experts: int = 0  # 0: a dense model
    top_k: int = 0
    expert_mlp: int = 0
    shared_mlp: int = 0

    # ---- conversions -------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "Arch":
        """The sizes of `cfg`; `KeyError` naming the axis when the config has none of its keys."""
        def need(axis: str) -> int:
            value = _read(cfg, axis)
            if value is None:
                raise KeyError(f"{axis} (none of {', '.join(CONFIG_KEYS[axis])})")
            return int(value)

        hidden, heads = need("hidden"), need("heads")
        mlp = _read(cfg, "mlp")
        experts = int(_read(cfg, "experts") or 0)
        moe = dict(experts=experts, top_k=int(_read(cfg, "top_k") or 0), expert_mlp=int(_read(cfg, "expert_mlp") or 0),
                   shared_mlp=int(_read(cfg, "shared_mlp") or 0)) if experts else {}
        if experts and _key(cfg, "expert_mlp") == _key(cfg, "mlp"):
            mlp = 0  # the experts use the dense key: there is no dense MLP to prune separately
        return cls(
            model_type=str(cfg.get("model_type", "")),
            vocab=need("vocab"),
            hidden=hidden,
            mlp=int(mlp) if mlp is not None else 4 * hidden,  # GPT-2 style configs leave it implicit
            layers=need("layers"),
            heads=heads,
            kv_heads=int(_read(cfg, "kv_heads") or heads),
            head_dim=int(_read(cfg, "head_dim") or hidden // heads),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            **moe,
        )

    def to_hf_config(self, base: Mapping[str, Any]) -> dict:
        """`base` with this architecture's sizes written in (each under the key `base` uses),
        head_dim explicit unless `base` has no such key and it equals hidden // heads (a config
        without the key derives it; GPT-NeoX even ignores the key, so there the emitted config can
        only hold hidden = heads x head_dim: the stage's count check reports a mismatch),
        and per-layer lists cut to the layer count."""
        out = dict(base)
        for axis in AXES + (MOE_AXES if self.experts else ()):
            key = next((k for k in CONFIG_KEYS[axis] if k in base), None if axis in MOE_AXES else CONFIG_KEYS[axis][0])
            if axis == "head_dim" and key not in base and self.head_dim == self.hidden // self.heads:
                continue  # configs without the key derive it (GPT-NeoX ignores the key altogether)
            if key is not None and not (axis == "mlp" and self.mlp == 0):
                out[key] = getattr(self, axis)
        out["tie_word_embeddings"] = self.tied
        n_before = _read(base, "layers")  # which layers are kept is not known here: the first ones
        if n_before is not None:
            out.update(per_layer_lists(out, range(min(self.layers, n_before)), n_before))
        return out

    def sizes(self) -> dict[str, int]:
        """Size per axis (the keys a `PruneResult` and the lock record); MoE axes when routed."""
        return {k: getattr(self, k) for k in AXES + (MOE_AXES if self.experts else ())}

    def with_sizes(self, **sizes: int | None) -> "Arch":
        return replace(self, **{k: v for k, v in sizes.items() if v is not None})
