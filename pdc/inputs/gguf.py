"""GGUF files as plain Hugging Face checkpoints: dequantized once, verified, saved in fp32.

transformers reads GGUF for the architectures it knows and dequantizes on load; the saved copy
has no `quantization_config`, so every later stage loads an ordinary model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pdc.errors import PdcError
from pdc.plan.counts import count

STAGE = "setup"
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


def convert_gguf(gguf_path: Path, out_dir: Path, verify: bool = True) -> dict:
    """Dequantize `gguf_path` and save it to `out_dir` as a plain fp32 HF checkpoint.

    Invariants: the saved config has no `quantization_config`; reloading `out_dir` gives the
    same tensors as the dequantized GGUF model; `sum(numel)` equals the count of its config
    (`pdc.plan.counts.count`).
    With `verify`, the reloaded model must answer "Paris" to "The capital of France is".
    Returns {"params", "answer"}.
    """
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    # A config that still says "gguf" would make every later load try to dequantize again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # A head tied to the embedding may be reported missing, nothing else may be.
    head = model.get_output_embeddings()
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)
            if head is not None and p is head.weight and p is model.get_input_embeddings().weight}
    missing = [k for k in missing if k not in tied]
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
