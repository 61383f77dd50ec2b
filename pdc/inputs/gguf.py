"""GGUF files as plain Hugging Face checkpoints: dequantized once, verified, saved in fp32.

transformers reads GGUF for the architectures it knows and dequantizes on load; the saved copy
has no `quantization_config`, so every later stage loads an ordinary model. Its config is built
from `pdc.lang.sources.gguf_config`, the reading of the header the checker and the dry run
use, so a spec is checked against the config of the model its stages load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdc.errors import PdcError
from pdc.inputs.verify import tied_head_names
from pdc.lang.sources import SourceError, gguf_config
from pdc.plan.counts import count, hf_config

STAGE = "setup"
# Config entries that say where and how a model was loaded, not what it is.
LOAD_KEYS = ("_name_or_path", "dtype", "torch_dtype", "quantization_config", "transformers_version")
VERIFY_PROMPT = "The capital of France is"
VERIFY_ANSWER = "Paris"


def greedy_answer(model, tokenizer, prompt: str = VERIFY_PROMPT, max_new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def config_differences(ours: dict, theirs: dict) -> list[str]:
    """`key: pdc X, transformers Y` for each config entry (not a `LOAD_KEYS` one) that differs."""
    keys = sorted((set(ours) | set(theirs)) - set(LOAD_KEYS))
    return [f"{k}: pdc {ours.get(k)!r}, transformers {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]


def convert_gguf(gguf_path: Path, out_dir: Path, verify: bool = True) -> dict:
    """Dequantize `gguf_path` and save it to `out_dir` as a plain fp32 HF checkpoint.

    Invariants: the saved config is the one `gguf_config` reads from the header (the checker's),
    and transformers' GGUF loader reads the same one (else a `PdcError` naming the keys that
    differ); it has no `quantization_config`; reloading `out_dir` gives the same tensors as the
    dequantized GGUF model; `sum(numel)` equals the count of its config (`pdc.plan.counts.count`).
    With `verify`, the reloaded model must answer "Paris" to "The capital of France is".
    Returns {"params", "answer"}.
    """
    src, name = str(gguf_path.parent), gguf_path.name
    try:
        config = hf_config(gguf_config(gguf_path))
    except SourceError as exc:
        raise PdcError(exc.message, STAGE) from None
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    differ = config_differences(config.to_dict(), quantized.config.to_dict())
    if differ:
        raise PdcError(f"pdc reads the header of {name} differently from transformers' GGUF loader: "
                       + "; ".join(differ[:4]), STAGE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # A head tied to the embedding may be reported missing, nothing else may be.
    missing = [k for k in missing if k not in tied_head_names(model)]
    if missing or unexpected:
        raise PdcError(f"GGUF tensors do not match the config: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}", STAGE)
    model.tie_weights()
    del quantized
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    n_params = sum(p.numel() for p in model.parameters())
    expected = count(json.loads((out_dir / "config.json").read_text())).total
    if n_params != expected:
        raise PdcError(f"converted model has {n_params} parameters, the config says {expected}", STAGE)
    answer = ""
    if verify:
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        saved, kept = reloaded.state_dict(), model.state_dict()
        if saved.keys() != kept.keys() or not all(torch.equal(saved[k], kept[k]) for k in kept):
            raise PdcError("the saved checkpoint does not reload to the converted weights", STAGE)
        answer = greedy_answer(reloaded, AutoTokenizer.from_pretrained(out_dir))
        if VERIFY_ANSWER not in answer:
            raise PdcError(f"converted SmolLM2 answered {answer!r} to {VERIFY_PROMPT!r} "
                           f"(expected {VERIFY_ANSWER!r}): conversion is broken", STAGE)
    return {"params": n_params, "answer": answer}
