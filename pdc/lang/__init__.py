"""The language layer: the .pds front end. Parse (`parser`, `ast`), check and lower (`checker`,
`checked`, `settings`, `sources`), format (`formatter`); diagnostics in `diagnostics`. Never
imports torch: editors and pre-commit hooks run `pdc fmt` and the checker in milliseconds.

    from pdc.lang import load_spec
    spec = load_spec("specs/llama-3.1-8b-to-4b-width.pds")   # CheckedSpec, or raises SpecError
"""

from __future__ import annotations

from pathlib import Path

from pdc.lang.checked import (
    CheckedSpec,
    CorrectStage,
    DistillStage,
    EvaluateStage,
    PruneStage,
)
from pdc.lang.checker import check
from pdc.lang.diagnostics import Diagnostic, Span, SpecError
from pdc.lang.parser import parse_file, parse_text, read_spec_text


def check_text(text: str, path: str | Path = "<spec>") -> CheckedSpec:
    """Parse and check spec source `text` as if read from `path` (relative paths resolve
    against `path`'s directory)."""
    return check(parse_text(text, str(path)), text, path)


def load_spec(path: str | Path) -> CheckedSpec:
    """Read, parse, resolve the source model's config and check a `.pds` file."""
    text = read_spec_text(path)
    return check_text(text, path)


__all__ = [
    "CheckedSpec", "CorrectStage", "Diagnostic", "DistillStage", "EvaluateStage", "PruneStage",
    "Span", "SpecError", "check_text", "load_spec", "parse_file", "parse_text", "read_spec_text",
]
