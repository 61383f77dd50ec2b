"""`emit=hf,pt2,onnx,lock` in a prune block: which outputs the stage writes and verifies.

A stage whose source does not fit the machine twice can leave out the deployable files
(`emit=hf,lock`); the lock then names what was not written, so `pdc check` and a reader know.
The checkpoint (every later stage reads it) and the lock (what `pdc check` compares) are never
left out; the ONNX model is exported next to program.pt2, so it needs it.
"""

from __future__ import annotations

from pdc.lang import ast
from pdc.lang.check_settings import Bad, describe_value, suggest
from pdc.lang.diagnostics import Note
from pdc.lang.settings import EMIT_OUTPUTS

REQUIRED = {"hf": "every later stage reads the checkpoint", "lock": "`pdc check` compares it"}


def read(v: ast.Value, key: str) -> tuple[str, ...]:
    """The outputs named by `v`, in EMIT_OUTPUTS order; `Bad` at the offending name."""
    items = v.items if isinstance(v, ast.Names) else (v,)
    seen: dict[str, ast.Name] = {}
    for item in items:
        if not isinstance(item, ast.Name):
            raise Bad(f"{key} lists outputs by name (e.g. {key}=hf,lock), got {describe_value(item)}", item.span)
        if item.value not in EMIT_OUTPUTS:
            raise Bad(f"unknown output '{item.value}' in {key}: expected {', '.join(EMIT_OUTPUTS)}"
                      + suggest(item.value, EMIT_OUTPUTS), item.span)
        if item.value in seen:
            raise Bad(f"output '{item.value}' listed twice in {key}", item.span,
                      Note("first listed here", seen[item.value].span))
        seen[item.value] = item
    for name, why in REQUIRED.items():
        if name not in seen:
            raise Bad(f"{key} must name {name}: {why}", v.span)
    if "onnx" in seen and "pt2" not in seen:
        raise Bad(f"{key} names onnx without pt2: the ONNX model is exported and checked beside program.pt2",
                  seen["onnx"].span)
    return tuple(o for o in EMIT_OUTPUTS if o in seen)
