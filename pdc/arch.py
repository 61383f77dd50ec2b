"""The architecture of a Llama-family decoder and its parameter and FLOP counts.

One normalised view (`Arch`) of a Hugging Face config for the families pdc supports (Llama,
Mistral, Qwen2). Parameter counts here are the prediction that the built model must match
exactly; "non-embedding" excludes the input embedding and the output head, as in the Minitron
paper's Table 3.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


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
    attention_bias: bool = False  # q/k/v biases (Qwen2 has them, o_proj has none)
    o_bias: bool = False  # Llama's attention_bias=True also puts a bias on o_proj
    mlp_bias: bool = False

    # ---- conversions -------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "Arch":
        mt = cfg.get("model_type", "llama")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        qkv_bias = bool(cfg.get("attention_bias", False)) or mt == "qwen2"
        return cls(
            model_type=mt,
            vocab=int(cfg["vocab_size"]),
            hidden=hidden,
            mlp=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_bias=bool(cfg.get("attention_bias", False)) and mt != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )

    def to_hf_config(self, base: Mapping[str, Any]) -> dict:
        """`base` with this architecture's sizes written in, head_dim always explicit."""
        out = dict(base)
        out.update(
            hidden_size=self.hidden,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            tie_word_embeddings=self.tied,
        )
        # Per-layer lists (e.g. layer_types, sliding windows) must follow the layer count.
        for key in ("layer_types",):
            if isinstance(out.get(key), list) and len(out[key]) != self.layers:
                out[key] = list(out[key][: self.layers]) + [out[key][-1]] * max(
                    0, self.layers - len(out[key])
                )
        return out

    def sizes(self) -> dict[str, int]:
        """Size per axis (the keys a `PruneResult` and the lock record)."""
        return {k: getattr(self, k) for k in ("hidden", "mlp", "layers", "heads", "kv_heads", "head_dim", "vocab")}

    def with_sizes(self, **sizes: int | None) -> "Arch":
        return replace(self, **{k: v for k, v in sizes.items() if v is not None})

    # ---- counts --------------------------------------------------------------------------
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        mlp = 3 * h * self.mlp + ((2 * self.mlp + h) if self.mlp_bias else 0)
        norms = 2 * h
        return attn + mlp + norms

    def embedding_params(self) -> int:
        """Input embedding plus output head (counted once when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def non_embedding_params(self) -> int:
        return self.layers * self.layer_params() + self.hidden  # + final norm

    def total_params(self) -> int:
        return self.non_embedding_params() + self.embedding_params()

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 per weight multiply (all linears and the output head)
        plus the attention score and value products at context `seq_len` (averaged, causal)."""
        linear = self.layers * (self.layer_params() - 2 * self.hidden) + self.vocab * self.hidden
        attn = self.layers * 2 * self.heads * self.head_dim * seq_len  # QK^T and AV, causal half
        return 2.0 * linear + 2.0 * attn
