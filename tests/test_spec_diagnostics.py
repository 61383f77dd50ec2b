"""Every file in tests/diagnostics/ is one mistake; its first line says the expected diagnostic:
`# expect: LINE:COL: error: MESSAGE`. Checking and planning it as `pdc compile --dry-run` does
must report exactly that (among possibly others), rendered compiler-style with the source line
and a caret. Most come from the checker; targets the emitted config cannot represent come from
the plan (which asks transformers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdc.lang import SpecError, load_spec
from pdc.plan.dry_run import build_plan

DIAG_DIR = Path(__file__).parent / "diagnostics"
CASES = sorted(DIAG_DIR.glob("*.pds"))


def test_corpus_is_large_enough():
    assert len(CASES) >= 20
    assert sum(p.stem.startswith("syntax_") for p in CASES) >= 3


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_diagnostic(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks an '# expect:' line"
    expected = first[len("# expect: "):]
    with pytest.raises(SpecError) as info:
        build_plan(load_spec(path))
    err = info.value
    assert expected in err.headlines(), f"got:\n{err.render()}"
    rendered = err.render()
    line, col = (int(x) for x in expected.split(":")[:2])
    # compiler format: file:line:col, then the source line, then a caret under column `col`
    assert f"{path}:{expected}" in rendered
    src_line = path.read_text().splitlines()[line - 1]
    lines = rendered.splitlines()
    i = lines.index(f"{path}:{expected}")
    assert lines[i + 1].endswith(src_line.expandtabs(1))
    gutter = lines[i + 1].index("| ") + 2
    assert lines[i + 2].index("^") == gutter + col - 1
    assert "Traceback" not in rendered


def test_unclosed_block_note_points_at_the_open_brace():
    path = DIAG_DIR / "syntax_unclosed_before_next_stage.pds"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (diag,) = info.value.diagnostics
    assert [(n.message, n.span.line, n.span.col) for n in diag.notes] == [("'{' opened here is not closed", 4, 13)]
