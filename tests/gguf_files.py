"""Real GGUF files of tiny random models, written with the `gguf` package's writer in the layout
llama.cpp's converter (convert_hf_to_gguf.py) produces, so the tests read what users have.

The layout, per llama.cpp: metadata under `<arch>.*` (sizes, epsilon, rope base, head width when
the config states one, Gemma's sliding window and soft-capping) and `tokenizer.ggml.*`; tensor
names from gguf-py's `TensorNameMap` (`blk.N.attn_q.weight`, ...); no `output.weight` when the
head is tied; q and k rows of llama-architecture models permuted into llama.cpp's rotary order
(pairs of halves interleaved, per head); Gemma's zero-centred norms stored as `w + 1`. Tensors are
F32, so the file holds the model exactly and the model transformers loads from it must compute the
same logits (`write_gguf` checks that the values survive the trip).

A model is built from the sizes a GGUF can state: what the file does not carry, transformers fills
from its config class defaults when it loads the file, so the tiny model uses those defaults too
(Qwen3's head_dim of 128, Gemma's query scaling by 256, Gemma 2's soft-capping at 50 and 30).

The tokenizer is laid out as llama.cpp writes the family's: SentencePiece with byte fallback for
Llama (2) and Phi-3, Gemma's SentencePiece vocabulary (its five leading control tokens) for Gemma,
byte-level BPE for Qwen and StableLM 2 (`vocab`); a few dozen tokens, with merges or scores.

Mixtures of experts (Qwen2-MoE, Qwen3-MoE) store the stacked experts as llama.cpp does: gate and
up apart (`ffn_gate_exps`, `ffn_up_exps`), the router as `ffn_gate_inp`, Qwen2-MoE's shared
expert gate as a vector. Mistral is absent on purpose: llama.cpp writes it as `llama` (covered),
and the one name transformers reads as Mistral (`general.name == "mistral"`) it then cannot load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from conftest import make_tiny_model

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
# family -> (llama.cpp architecture, its tokenizer layout, config of the tiny model: SIZES plus these)
FAMILIES = {
    "llama": ("llama", "llama", dict(head_dim=16)),
    # heads wider than hidden // heads, as Gemma 3 270M's (256 at hidden 640, 4 heads)
    "gemma3_text": ("gemma3", "gemma", dict(head_dim=32, sliding_window=8, tie_word_embeddings=True)),
    "qwen2": ("qwen2", "gpt2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", "gpt2", dict(head_dim=128)),
    "gemma2": ("gemma2", "gemma", dict(head_dim=16, sliding_window=8, tie_word_embeddings=True)),
    "phi3": ("phi3", "llama", dict(num_key_value_heads=4)),
    "stablelm": ("stablelm", "gpt2", dict(use_qkv_bias=True, layer_norm_eps=1e-5)),
    # expert widths are not read from a GGUF: transformers' defaults (768; Qwen2-MoE 1408, shared
    # 5632), and its GGUF loader sets Qwen3-MoE's norm_topk_prob
    "qwen3_moe": ("qwen3moe", "gpt2", dict(head_dim=128, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=768, norm_topk_prob=True)),
    "qwen2_moe": ("qwen2moe", "gpt2", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=1408,
                                           shared_expert_intermediate_size=5632)),
}
_NORM_OFFSET = ("gemma2", "gemma3")  # llama.cpp stores 1 + w for these families' norms
_ROPE_PERMUTED = ("llama",)  # llama.cpp reorders q/k rows for these architectures
# token types of llama.cpp's vocabularies
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
WORDS = ("t h", "th e", "a n", "o n", "i n")  # merges, and (joined) tokens of both vocabularies


@dataclass(frozen=True)
class Vocab:
    """A tokenizer as llama.cpp stores it: `kind` is `tokenizer.ggml.model`."""

    kind: str
    tokens: list[str]
    types: list[int]
    scores: Optional[list[float]]
    merges: Optional[list[str]]
    ids: dict[str, int]  # bos/eos/pad/unk token ids (config key names)


def vocab(layout: str) -> Vocab:
    """`gpt2`: byte-level BPE (Llama 3, Qwen, StableLM 2): 256 byte symbols, merges, control tokens
    at the end. `llama`: SentencePiece with byte fallback (Llama 2, Phi-3): `<unk> <s> </s>`, the 256
    `<0xNN>` byte tokens, then pieces with `\u2581` for a space and scores, then Phi-3's
    `<|endoftext|>` padding token. `gemma`: the same with
    Gemma's leading `<pad> <eos> <bos> <unk> <mask>` (both are `tokenizer.ggml.model = "llama"`)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    kind = layout
    if kind == "gpt2":
        merges = list(WORDS) + ["\u0120 t", "\u0120t h", "\u0120th e", "\u0120 a"]
        tokens = list(bytes_to_unicode().values()) + ["".join(m.split()) for m in merges]
        control = ["<|endoftext|>", "<|bos|>", "<|pad|>"]
        n = len(tokens)
        return Vocab(kind, tokens + control, [NORMAL] * n + [CONTROL] * 3, None, merges,
                     dict(eos_token_id=n, bos_token_id=n + 1, pad_token_id=n + 2))
    specials = {"llama": ["<unk>", "<s>", "</s>"], "gemma": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]}[kind]
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["".join(w.split()) for w in WORDS] + ["\u2581t", "\u2581th", "\u2581the", "\u2581a"]
    added = ["<|endoftext|>"] if kind == "llama" else []  # Phi-3's padding token, after the pieces
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces + added
    types = ([UNKNOWN if t == "<unk>" else CONTROL for t in specials] + [BYTE] * 256 + [NORMAL] * len(pieces)
             + [CONTROL] * len(added))
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))] + [0.0] * len(added)
    ids = {"llama": dict(unk_token_id=0, bos_token_id=1, eos_token_id=2, pad_token_id=len(tokens) - 1),
           "gemma": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, unk_token_id=3)}[kind]
    return Vocab("llama", tokens, types, scores, None, ids)


def tiny_model(family: str, seed: int = 0):
    """A random tiny model of `family` with a config a GGUF file can state (see the module doc)."""
    v = vocab(FAMILIES[family][1])
    return make_tiny_model("custom", seed=seed, model_type=family, vocab_size=len(v.tokens),
                           **dict(SIZES, **v.ids, **FAMILIES[family][2]))


def _rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for a q or k projection: within each head, the rows of its first and
    second rotary halves interleaved (row i of half 0, row i of half 1, ...)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, arch: str) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, transformed as its converter does."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_hidden_layers)
    tied = cfg.tie_word_embeddings
    out = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if ".mlp.experts." in hf_name:  # stacked experts: llama.cpp keeps gate and up apart
            out.update(_expert_tensors(hf_name, tensor.detach().float().numpy()))
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"no llama.cpp name for {hf_name} ({arch})"
        w = tensor.detach().float().numpy().copy()
        if arch in _ROPE_PERMUTED and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = _rope_rows(w, cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads)
        if name.endswith("ffn_gate_inp_shexp.weight"):  # llama.cpp stores the shared expert's gate as a vector
            w = w.reshape(-1)
        if arch in _NORM_OFFSET and name.endswith("norm.weight"):
            w = w + 1.0
        out[name] = w
    return out


def _expert_tensors(hf_name: str, w: np.ndarray) -> dict[str, np.ndarray]:
    """`model.layers.N.mlp.experts.gate_up_proj` ([experts, 2 x width, hidden], gate rows first)
    and `...down_proj` under llama.cpp's `blk.N.ffn_{gate,up,down}_exps.weight`."""
    layer = hf_name.split(".")[2]
    if hf_name.endswith("down_proj"):
        return {f"blk.{layer}.ffn_down_exps.weight": w.copy()}
    half = w.shape[1] // 2
    return {f"blk.{layer}.ffn_gate_exps.weight": w[:, :half].copy(),
            f"blk.{layer}.ffn_up_exps.weight": w[:, half:].copy()}


def write_gguf(model, path: Path, arch: str, tokenizer: str, name: str = "tiny") -> Path:
    """Write `model` (fp32) to `path` as a GGUF file of llama.cpp architecture `arch` with the
    tokenizer layout `tokenizer` (`vocab`)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters if isinstance(getattr(cfg, "rope_parameters", None), dict) else {}
    rope = rope.get("full_attention", rope)  # Gemma 3: one entry per attention type
    if "rope_theta" in rope:
        w.add_rope_freq_base(rope["rope_theta"])
    if arch == "stablelm":
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
    else:
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(head_dim)
    if getattr(cfg, "head_dim", None) is not None:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if getattr(cfg, "num_experts", None):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    v = vocab(tokenizer)
    assert len(v.tokens) == cfg.vocab_size
    w.add_tokenizer_model(v.kind)
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "llama-bpe" if v.kind == "gpt2" else "default")
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    for key, token_id in v.ids.items():
        getattr(w, {"bos_token_id": "add_bos_token_id", "eos_token_id": "add_eos_token_id",
                    "pad_token_id": "add_pad_token_id", "unk_token_id": "add_unk_token_id"}[key])(token_id)
    w.add_add_bos_token(v.kind != "gpt2")
    w.add_add_eos_token(False)
    for tensor_name, value in _tensors(model, arch).items():
        w.add_tensor(tensor_name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_source(family: str, directory: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A tiny `family` model written to `directory/<family>.gguf`; returns the path and the model."""
    model = tiny_model(family, seed)
    directory.mkdir(parents=True, exist_ok=True)
    arch, tokenizer, _ = FAMILIES[family]
    path = write_gguf(model, directory / f"{family}.gguf", arch, tokenizer, name=f"tiny {family}")
    return path, model
