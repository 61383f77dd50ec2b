"""The quickstart on the real SmolLM2-135M with shortened budgets (slow: needs `pdc setup`).

Invariants: the pruned student loads with AutoModelForCausalLM, its parameter count is the one
the search counted for the shape it chose, and distillation lowers its validation loss."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SHORTER = {  # the same recipe, budgets cut to minutes
    r"(generate\([^)]*?)tokens=\w+": r"\1tokens=2k",
    r"(distill from teacher on gen \{[^}]*?)steps=\d+": r"\1steps=4",
    r"samples=\d+": "samples=4",
    r"limit=\d+": "limit=4",
    r"warmup=\d+": "warmup=1",
}


def test_quickstart_with_short_budgets(tmp_path, real_assets):
    from transformers import AutoModelForCausalLM

    from pdc.plan.results import read_record
    from pdc.cli import main as pdc_main

    text = (EXAMPLES / "quickstart.pds").read_text()
    for pattern, repl in SHORTER.items():
        text, n = re.subn(pattern, repl, text, flags=re.S)
        assert n, f"quickstart.pds no longer has {pattern!r}"
    prompts = EXAMPLES.parent / "experiments" / "prompts" / "films.jsonl"  # the copy is elsewhere
    text, n = re.subn(r'jsonl\("[^"]*films.jsonl"\)', f'jsonl("{prompts}")', text)
    assert n == 1
    spec = tmp_path / "quickstart.pds"
    spec.write_text(text)
    assert pdc_main(["run", str(spec)]) == 0

    build = tmp_path / "build" / "quickstart"
    search = json.loads((build / "prune" / "search.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(build / "prune" / "model")
    assert sum(p.numel() for p in student.parameters()) == search["candidates"][search["chosen"]]["params"]
    metrics = read_record(build / "distill").result
    assert metrics.val_loss_end < metrics.val_loss_start
    assert (build / "report.html").exists()
