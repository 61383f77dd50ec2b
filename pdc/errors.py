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


def one_line(exc: BaseException) -> str:
    """A dependency's exception as one non-empty line: `Type: first line of its message`.

    Libraries raise exceptions with empty or multi-line messages; an empty one falls back to the
    message of the exception it was raised from (or during), then to the type name alone, so a
    wrapped error never ends in a bare colon. A `PdcError` keeps its own message."""
    if isinstance(exc, PdcError):
        return exc.message
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            text = current.strerror + (f": {current.filename}" if current.filename else "")
        else:
            text = str(current)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return f"{type(current).__name__}: {lines[0]}"
        current = current.__cause__ or current.__context__
    return type(exc).__name__


def json_reason(exc) -> str:
    """What a `json.JSONDecodeError` found, without the position its message ends with ("...
    at"); callers put the position in front as `file:line:col`."""
    return exc.msg[: -len(" at")] if exc.msg.endswith(" at") else exc.msg
