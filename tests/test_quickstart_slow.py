"""The quickstart on the real SmolLM2-135M with shortened budgets (slow: needs `pdc setup`).

Invariants: the pruned student loads with AutoModelForCausalLM, its parameter count equals the
dry-run prediction, and distillation lowers its validation loss."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SHORTER = {  # the same recipe, budgets cut to minutes
    r"(correct teacher on wiki \{[^}]*?)steps=\d+": r"\1steps=2",
    r"(distill from teacher on wiki \{[^}]*?)steps=\d+": r"\1steps=4",
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
    spec = tmp_path / "quickstart.pds"
    spec.write_text(text)
    assert pdc_main(["run", str(spec)]) == 0

    build = tmp_path / "build" / "quickstart"
    plan = json.loads((build / "plan.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(build / "prune" / "model")
    assert sum(p.numel() for p in student.parameters()) == plan["final"]["params_total"]
    metrics = read_record(build / "distill").result
    assert metrics.val_loss_end < metrics.val_loss_start
    assert (build / "report.html").exists()
