"""The paper's recipes in specs/ and every other .pds in the repository check cleanly, and the
dry run reproduces the Minitron paper's Table 3 parameter counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pdc.plan.dry_run import build_plan, human_count, render_plan, train_steps
from pdc.lang import load_spec
from pdc.lang.settings import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"

# Table 3 of "LLM Pruning and Distillation in Practice: The Minitron Approach" (total and
# non-embedding parameters, rounded to 0.1B).
TABLE3 = {
    "llama-3.1-8b-to-4b-width.pds": ("4.5B", "3.7B"),
    "llama-3.1-8b-to-4b-depth.pds": ("4.5B", "3.5B"),
    "mistral-nemo-12b-to-8b.pds": ("8.4B", "7.3B"),
}


@pytest.mark.parametrize("name", sorted(TABLE3))
def test_table3_parameter_counts(name):
    plan = build_plan(load_spec(SPECS / name))
    total, non_emb = TABLE3[name]
    assert human_count(plan["final"]["params_total"]) == total
    assert human_count(plan["final"]["params_non_embedding"]) == non_emb
    # the rendered table shows the same figures and the exact counts
    text = render_plan(plan)
    assert f"{total} total ({plan['final']['params_total']:,})" in text
    json.dumps(plan)  # JSON-able


@pytest.mark.parametrize("name", sorted(TABLE3))
def test_recipe_stage_plan(name):
    """Recipes run correct -> prune -> distill -> evaluate, and every token budget becomes
    ceil(tokens / (global_batch * seq_len)) steps."""
    spec = load_spec(SPECS / name)
    plan = build_plan(spec)
    assert [s["kind"] for s in plan["stages"]] == ["correct", "prune", "distill", "evaluate"]
    for st in plan["stages"]:
        if st["kind"] in ("correct", "distill"):
            assert st["steps"] == math.ceil(st["tokens"] / (st["global_batch"] * st["seq_len"]))
            assert (st["steps"] - 1) * st["tokens_per_step"] < st["tokens"] <= st["steps"] * st["tokens_per_step"]
    header = (SPECS / name).read_text().splitlines()[:12]
    assert any(f"pdc compile specs/{name} --dry-run" in line for line in header)


def test_every_repo_spec_checks():
    """Every .pds shipped in the repository (specs/, examples/) parses and checks."""
    paths = [p for d in ("specs", "examples") for p in sorted((REPO / d).rglob("*.pds"))
             if "build" not in p.relative_to(REPO).parts]  # a build's copy of its spec is not shipped
    assert len(paths) >= 3
    for p in paths:
        load_spec(p)


def test_steps_from_tokens_and_steps():
    assert train_steps(TrainConfig(tokens=10, global_batch=2, seq_len=4)) == (2, 10)
    assert train_steps(TrainConfig(tokens=8, global_batch=2, seq_len=4)) == (1, 8)
    assert train_steps(TrainConfig(steps=3, global_batch=2, seq_len=4)) == (3, 24)


def test_width_prune_reduces_flops_and_params_monotonically():
    """A strictly smaller target has fewer parameters and FLOPs than its source."""
    plan = build_plan(load_spec(SPECS / "llama-3.1-8b-to-4b-width.pds"))
    prune = next(s for s in plan["stages"] if s["kind"] == "prune")
    assert prune["params_total"][1] < prune["params_total"][0]
    assert 0 < prune["flops_per_token_ratio"] < 1
