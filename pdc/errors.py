"""Runtime faults that reach the user as one line, never as a traceback.

Spec errors (bad `.pds` input) are `pdc.lang.diagnostics.SpecError` and exit with code 2; every
other expected failure (missing file, unsupported graph, NaN loss, failed launch) is a
`PdcError` naming the stage it happened in, and exits with code 1.
"""

from __future__ import annotations


class PdcError(Exception):
    """An expected failure with a one-line cause. `stage` is e.g. "prune", "distill"."""

    def __init__(self, message: str, stage: str | None = None):
        super().__init__(message)
        self.message = message
        self.stage = stage

    def __str__(self) -> str:
        return f"{self.stage}: {self.message}" if self.stage else self.message
