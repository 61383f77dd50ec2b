"""The `reconstruct=` setting of `prune width`: how it reads and when it makes sense.

    prune width { mlp=1152 importance=activation(samples=16) reconstruct=lsq(damp=0.01) }

`lsq` (alone or with `damp=`, a number >= 0) refits the projections that read the cut units
(`passes/reconstruct_outputs.py`). Its statistics come from the calibration pass of activation
importance, and it refits only what the stage cuts among MLP neurons, heads and a shared expert's
neurons: anything else is a spec error at the setting. Kept apart from `checker.py`, which only
hooks `read` into the width schema and `problem` after the stage is lowered.
"""

from __future__ import annotations

from typing import Callable, Optional

from pdc.lang import ast
from pdc.lang.settings import ImportanceConfig, ReconstructConfig, WidthTarget

METHODS = ("lsq",)
EXAMPLE = "reconstruct=lsq(damp=0.01)"


def read(v: ast.Value, key: str, call_args: Callable, bad: type, number: Callable) -> ReconstructConfig:
    """The setting's value as a `ReconstructConfig`; `bad(message, span)` is raised on a bad
    value, `call_args` and `number` are the checker's readers of call arguments and numbers."""
    method = v.value if isinstance(v, ast.Name) else v.name.value if isinstance(v, ast.Call) else None
    if method not in METHODS:
        got = f"'{method}'" if method else "this value"
        raise bad(f"unknown reconstruction {got}: expected {' or '.join(METHODS)} (e.g. {EXAMPLE})", v.span)
    if isinstance(v, ast.Name):
        return ReconstructConfig(method=method)
    got = call_args(v, ["damp"], {"damp": number(lo=0)}, f"{method}(...)")
    return ReconstructConfig(method=method, **{k: val for k, (val, _) in got.items()})


def problem(config: Optional[ReconstructConfig], importance: ImportanceConfig, width: WidthTarget,
            source_sizes: dict) -> Optional[str]:
    """Why `config` cannot run in a width stage with `importance` cutting to `width` from a
    source with `source_sizes` (axis -> size), or None."""
    if config is None:
        return None
    if importance.method != "activation":
        return (f"reconstruct={config.method} needs importance=activation: its statistics come from the "
                f"calibration pass (importance={importance.method} runs none)")
    cuts = [axis for axis in ("mlp", "heads", "kv_heads", "shared_mlp")  # fewer kv groups: fewer heads
            if getattr(width, axis) is not None and getattr(width, axis) < (source_sizes.get(axis) or 0)]
    if not cuts:
        return (f"reconstruct={config.method} refits the projections reading cut MLP neurons, heads or shared-"
                f"expert neurons, and this stage cuts none of them (hidden channels and routed experts have no "
                f"refit)")
    return None
