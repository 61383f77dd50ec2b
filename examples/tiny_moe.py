"""Build the tiny mixture of experts that examples/moe.pds prunes.

examples/tiny-moe/config.json (tracked: the spec checks and plans from it alone) describes a
Mixtral-style model: 4 layers, 8 experts of 128 neurons per layer, top-2 routing, SmolLM2's
49,152-token vocabulary. This script builds it with random weights (transformers, seed 0) and
writes the weights and SmolLM2's tokenizer (from the `pdc setup` assets) beside the config,
making examples/tiny-moe/ a Hugging Face checkpoint. The spec's correction stage then trains
it on Wikipedia text, so its experts have something to specialise on before they are ranked.
Any family transformers builds works the same way (`model_type` and its expert-count key).

    python examples/tiny_moe.py && pdc run examples/moe.pds
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pdc.inputs.assets import smollm2_dir

OUT = Path(__file__).resolve().parent / "tiny-moe"


def main() -> None:
    config = AutoConfig.from_pretrained(OUT)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    if len(tokenizer) != config.vocab_size:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens, the config {config.vocab_size}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    print(f"{OUT}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
