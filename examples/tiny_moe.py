"""Build the tiny mixture of experts that examples/moe.pds prunes.

A Mixtral-style model (4 layers, 8 experts of 128 neurons per layer, top-2 routing) built by
transformers from a config with random weights (seed 0), with SmolLM2's tokenizer from the
`pdc setup` assets, saved as a Hugging Face checkpoint in examples/build/tiny-moe/. The spec's
correction stage then trains it on Wikipedia text, so its experts have something to specialise
on before they are ranked. Any family transformers builds works the same way: change
`model_type` and the expert-count key (`num_experts` for qwen3_moe and olmoe).

    python examples/tiny_moe.py && pdc run examples/moe.pds
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pdc.inputs.assets import smollm2_dir

OUT = Path(__file__).resolve().parent / "build" / "tiny-moe"


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = AutoConfig.for_model(
        "mixtral", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    print(f"{OUT}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
