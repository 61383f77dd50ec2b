"""`pdc fmt`: canonical form properties over generated specs with random layout and comments.

Invariants: fmt is idempotent, formatting never changes meaning (parse(fmt(x)) == parse(x),
spans aside), and every comment survives."""

from __future__ import annotations

from pathlib import Path

from hypothesis import example, HealthCheck, given, settings
from hypothesis import strategies as st

from pdc.lang.ast import number_value
from pdc.lang.formatter import fmt, format_string
from pdc.lang.parser import parse_text

REPO = Path(__file__).resolve().parents[1]

names = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
numbers = st.from_regex(r"[0-9]{1,4}(_[0-9]{3})?(\.[0-9]{0,3})?([eE][+-]?[0-9]{1,2})?[kMBGT]?", fullmatch=True)
strings = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).map(format_string)


def calls(values):
    args = st.lists(st.one_of(values, st.tuples(names, values).map(lambda kv: f"{kv[0]}={kv[1]}")), max_size=3)
    return st.tuples(names, args).map(lambda c: f"{c[0]}({', '.join(c[1])})")


scalars = st.one_of(numbers, strings, names)
values = st.recursive(scalars, calls, max_leaves=4)
settings_ = st.tuples(names, values).map(lambda kv: [kv[0], "=", kv[1]])
entries = st.one_of(names, calls(scalars)).map(lambda e: [e])
items = st.lists(st.one_of(settings_, entries), max_size=5).map(lambda xs: [t for x in xs for t in x])
source = st.tuples(names, st.lists(st.one_of(strings, st.tuples(names, scalars).map(lambda kv: f"{kv[0]}={kv[1]}")),
                                   max_size=2)).map(lambda c: f"{c[0]}({', '.join(c[1])})")


@st.composite
def stage_statement(draw, kinds=("correct", "prune", "distill", "evaluate")):
    kind = draw(st.sampled_from(kinds))
    head = {"correct": lambda: ["correct", draw(names), "on", draw(names)],
            "prune": lambda: ["prune", draw(names)],
            "distill": lambda: ["distill", "from", draw(names), "on", draw(names)],
            "evaluate": lambda: ["evaluate", "with", draw(names)]}[kind]()
    return head + ["{"] + draw(items) + ["}"]


stage_refs = st.one_of(st.sampled_from(["correct", "prune", "distill", "evaluate"]), names)
overrides = st.tuples(stage_refs, names, values).map(lambda o: [o[0], ".", o[1], "=", o[2]])
withouts = stage_refs.map(lambda r: ["without", r])
variants = st.tuples(names, st.lists(st.one_of(overrides, withouts, stage_statement()), max_size=3)).map(
    lambda v: ["variant", v[0], "{"] + [t for item in v[1] for t in item] + ["}"])


@st.composite
def statements(draw):
    kind = draw(st.sampled_from(["model", "data", "stage", "stage", "compare"]))
    if kind in ("model", "data"):
        return [kind, draw(names), "=", draw(source)]
    if kind == "compare":
        return ["compare", draw(names), "{"] + [t for v in draw(st.lists(variants, max_size=3)) for t in v] + ["}"]
    return draw(stage_statement())


separators = st.sampled_from([" ", " ", "  ", "\n", "\n  ", "\n\n", "  # note\n", "\n# own line\n", "\t"])


@st.composite
def spec_texts(draw):
    tokens = [t for s in draw(st.lists(statements(), max_size=6)) for t in s]
    out = [draw(st.sampled_from(["", "# header\n", "\n"]))]
    for tok in tokens:
        out.append(tok)
        out.append(draw(separators))
    return "".join(out)


FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(spec_texts())
# Several statements on one line followed by a multi-line one: the trailing comment belongs to
# the statement it follows, not to the first statement on its line.
@example('model _ = _() model _ = _() model _ = _() data _ =  # note\n_()  # note\n')
def test_fmt_is_idempotent_keeps_meaning_and_comments(text):
    once = fmt(text)
    assert fmt(once) == once
    before, after = parse_text(text), parse_text(once)
    assert after == before
    assert sorted(c.text.rstrip() for c in after.comments) == sorted(c.text.rstrip() for c in before.comments)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_string_literal_round_trip(s):
    """Any text survives format_string -> parse (escapes are canonical)."""
    spec = parse_text(f"model m = hf({format_string(s)})")
    assert spec.statements[0].source.args[0].value == s


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(["", "k", "M", "B", "T"]))
def test_number_units_are_exact(n, unit):
    scale = {"": 1, "k": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[unit]
    assert number_value(f"{n}{unit}") == n * scale
    assert number_value(f"{n:_}{unit}") == n * scale


def test_number_notations():
    assert number_value("2e-5") == 2e-5 and isinstance(number_value("2e-5"), float)
    assert number_value(".5") == 0.5
    assert number_value("1.5B") == 1_500_000_000 and isinstance(number_value("1.5B"), int)
    assert number_value("1e3") == 1000 and isinstance(number_value("1e3"), int)
    assert isinstance(number_value("1.0"), float)


def test_canonical_layout():
    text = ('model   teacher=hf( "x" )  # t\ndata c=builtin("wiki") data h = builtin("wiki-heldout")\n\n\n'
            'prune width {  hidden=3  mlp = 4\n importance = activation( samples=1,seq_len=2 ) }\n'
            'evaluate with lm_eval{winogrande(5)   piqa}\n')
    assert fmt(text) == (
        'model teacher = hf("x")  # t\n'
        'data  c       = builtin("wiki")\n'
        'data  h       = builtin("wiki-heldout")\n'
        '\n'
        'prune width {\n'
        '  hidden=3 mlp=4\n'
        '  importance=activation(samples=1, seq_len=2)\n'
        '}\n'
        'evaluate with lm_eval { winogrande(5) piqa }\n'
    )


def test_shipped_specs_are_canonical():
    for p in sorted((REPO / "specs").glob("*.pds")):
        text = p.read_text()
        assert fmt(text) == text, f"{p.name} is not in canonical form; run pdc fmt --write"
