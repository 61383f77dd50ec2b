"""Fuzzing the front end: random mutations of valid specs (deleted, duplicated or inserted
tokens, swapped numbers, truncation) give either a checked spec or a clean SpecError, never any
other exception."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdc.lang import SpecError, check_text
from pdc.lang.formatter import fmt

REPO = Path(__file__).resolve().parents[1]
SPEC_DIR = REPO / "specs"
TINY = '''model m = builtin("smollm2-135m")
data  wiki = builtin("wiki")
data  held = builtin("wiki-heldout")
correct m on wiki { steps=2 lr=1e-4 method=lora lora_rank=4 order=parallel }
prune width { hidden=450 mlp=768 heads=6 kv_heads=3 importance=activation(samples=8, seq_len=64, data=held) }
prune depth { depth=20 saliency=cosine(wiki, samples=4) contiguous=false }
distill from m on wiki { steps=3 global_batch=4 micro_batch=2 seq_len=64 loss=kl(reverse) top_k=8 }
evaluate with lm_eval { perplexity(held) movie_recommendation_local(0) limit=20 tasks_dir=builtin }
'''
SEEDS = [TINY] + [p.read_text() for p in sorted(SPEC_DIR.glob("*.pds"))]
TOKEN = re.compile(r'"(?:\\.|[^"\\\n])*"|#[^\n]*|[A-Za-z_][\w\-]*|[+-]?[\d.][\w.+\-]*|\S')


def _tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SEEDS))
    toks = _tokens(text)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "duplicate", "swap_numbers", "insert", "truncate"]))
        i = draw(st.integers(0, len(toks) - 1))
        if op == "delete":
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "insert":
            toks.insert(i, draw(st.sampled_from(["{", "}", "=", "(", ")", ",", '"', "0", "-1", "1e999",
                                                 "prune", "model", "data", "x", "1.5B", "\x85", "\u00e9"])))
        elif op == "swap_numbers":
            nums = [k for k, t in enumerate(toks) if t[:1].isdigit()]
            if len(nums) >= 2:
                a, b = draw(st.sampled_from(nums)), draw(st.sampled_from(nums))
                toks[a], toks[b] = toks[b], toks[a]
        else:
            toks = toks[:i]
        if not toks:
            toks = ["model"]
    sep = draw(st.sampled_from([" ", "\n"]))
    return "".join(t + ("\n" if t.startswith("#") else sep) for t in toks)


def test_seed_specs_are_valid():
    for text in SEEDS:
        check_text(text, SPEC_DIR / "seed.pds")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_give_spec_or_clean_error(text):
    try:
        spec = check_text(text, SPEC_DIR / "fuzz.pds")
    except SpecError as err:
        report = err.render()
        assert report and "Traceback" not in report
        assert err.diagnostics and all(d.message for d in err.diagnostics)
        return
    # a mutation that still checks must also format and re-check to the same stages
    again = check_text(fmt(text), SPEC_DIR / "fuzz.pds")
    assert again.stages == spec.stages


def test_deep_nesting_is_a_clean_error():
    depth = 3000
    text = "prune width { a=" + "f(" * depth + ")" * depth + " }"
    with pytest.raises(SpecError, match="nested too deeply"):
        check_text(text, SPEC_DIR / "deep.pds")


@pytest.mark.parametrize("text", ["", "   \n# only a comment\n", "\ufeff", "model", "}", '"', "\x00"])
def test_degenerate_inputs(text):
    """Empty and junk inputs: a clean SpecError (no model to prune) or a syntax error."""
    with pytest.raises(SpecError) as info:
        check_text(text, SPEC_DIR / "junk.pds")
    assert info.value.render()
