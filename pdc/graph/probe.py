"""The one default probe: the token ids every check of a program runs on.

Two rows of `PROBE_LEN` tokens (batch 1 would let torch.export specialise the batch dimension):
row 0 is a fixed English passage tokenized by the model's tokenizer when one is given, so the
lock's numeric fingerprint reads real-text logits; row 1 (and row 0 without a tokenizer) are
seeded random ids. Deterministic for a given tokenizer and vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

PROBE_LEN = 32
PROBE_SEED = 1234
PROBE_TEXT = (
    "The river rises in the hills north of the town and runs south through farmland for about "
    "forty miles before it reaches the sea. In the nineteenth century it carried timber and grain "
    "to the harbour, and several mills were built along its banks."
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def default_probe(vocab: int, tokenizer_dir: Optional[Path] = None, length: int = PROBE_LEN) -> torch.Tensor:
    """LongTensor [2, length] (see the module docstring)."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    rows = torch.randint(0, vocab, (2, length), generator=g)
    text = _text_row(tokenizer_dir, vocab, length)
    if text is not None:
        rows[0] = text
    return rows


def _text_row(tokenizer_dir: Optional[Path], vocab: int, length: int) -> Optional[torch.Tensor]:
    if tokenizer_dir is None or not any((Path(tokenizer_dir) / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        ids = AutoTokenizer.from_pretrained(tokenizer_dir)(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer that cannot load only costs the real-text row
        return None
    if len(ids) < length or max(ids) >= vocab:
        return None
    return torch.tensor(ids[:length])
