"""Exported tiny models shared by the graph/width test files (not a test module).

Exporting is the slow step of these tests (seconds per family), so each family is exported
once per pytest process and every test works on its own `Program.clone()`: the cached program
is never mutated.
"""

from __future__ import annotations

import functools

import torch

from conftest import make_tiny_model
from pdc.graph.export import export_model
from pdc.graph.program import Program


@functools.lru_cache(maxsize=None)
def _exported(family: str) -> Program:
    return export_model(make_tiny_model(family))


def exported(family: str) -> Program:
    """A fresh, independent copy of the exported tiny `family` model (weights included)."""
    return _exported(family).clone()


def load_hf(path):
    """The checkpoint at `path` as transformers loads it, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_same_logits(model, program: Program, ids: torch.Tensor) -> None:
    """The HF model and the program give the same logits on `ids` (1e-5 of the largest logit)."""
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, program.forward(ids)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
