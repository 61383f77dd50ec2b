"""Exported tiny models shared by the graph/width test files (not a test module).

Exporting is the slow step of these tests (seconds per family), so each family is exported
once per pytest process and every test works on its own `Program.clone()`: the cached program
is never mutated.
"""

from __future__ import annotations

import functools

from conftest import make_tiny_model
from pdc.graph.export import export_model
from pdc.graph.program import Program


@functools.lru_cache(maxsize=None)
def _exported(family: str) -> Program:
    return export_model(make_tiny_model(family))


def exported(family: str) -> Program:
    """A fresh, independent copy of the exported tiny `family` model (weights included)."""
    return _exported(family).clone()
