"""The collective device check (see sitecustomize.py): wraps torch.distributed's collectives."""

from __future__ import annotations

import functools
import json
import os
import sys

OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
       "broadcast", "reduce", "all_to_all_single", "gather", "scatter", "all_gather_object", "broadcast_object_list")
_GPU_MAP: dict = {}


def backend_map(backend: str) -> dict[str, str]:
    """'cpu:gloo,cuda:nccl' -> {cpu: gloo, cuda: nccl}; a bare backend as torch maps it."""
    if ":" not in backend:
        return {"cpu": "gloo", "cuda": "gloo"} if backend == "gloo" else {"cuda": backend}
    return dict(part.split(":") for part in backend.split(","))


def gpu_map() -> dict[str, str]:
    """The backend map a GPU rank's group has: what pdc asks for on a CUDA device."""
    if not _GPU_MAP:
        import torch
        from pdc.stages.process_group import group_backend

        _GPU_MAP.update(backend_map(group_backend(torch.device("cuda", 0))))
    return _GPU_MAP


def _tensors(args, kwargs):
    import torch

    for a in [*args, *kwargs.values()]:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _functions() -> list[str]:
    """The function names on the stack, innermost first (which lm-eval path gathered)."""
    frame, names = sys._getframe(2), []
    while frame is not None and len(names) < 40:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def _caller() -> str:
    """The first pdc module on the stack (else deepspeed / lm_eval / other)."""
    frame = sys._getframe(2)
    seen = "other"
    while frame is not None:
        mod = frame.f_globals.get("__name__", "")
        if mod == "__main__" and frame.f_globals.get("__spec__") is not None:  # a `python -m` rank
            mod = frame.f_globals["__spec__"].name
        if mod.startswith("pdc."):
            return mod
        if seen == "other" and mod.split(".")[0] in ("deepspeed", "lm_eval"):
            seen = mod.split(".")[0]
        frame = frame.f_back
    return seen


def _log(record: dict) -> None:
    with open(os.environ["PDC_COLLECTIVE_LOG"], "a") as f:
        f.write(json.dumps(record) + "\n")


def check(op: str, devices: list[str], where: str, allowed: dict[str, str]) -> None:
    bad = sorted({d for d in devices if d not in allowed})
    _log({"pid": os.getpid(), "op": op, "devices": devices, "where": where, "ok": not bad, "stack": _functions()})
    if bad:
        raise RuntimeError(f"collective {op} from {where} on {', '.join(bad)} tensors: the GPU process group "
                           f"({allowed}) has no backend for them")


def install(dist=None) -> None:
    """Wrap the collectives of `dist` (torch.distributed, imported here when not given)."""
    if dist is None:
        import torch.distributed as dist

    if getattr(dist, "_pdc_checked", False):
        return
    for op in OPS:
        fn = getattr(dist, op, None)
        if fn is None:
            continue

        def wrapped(*args, _fn=fn, _op=op, **kwargs):
            check(_op, [t.device.type for t in _tensors(args, kwargs)], _caller(), gpu_map())
            return _fn(*args, **kwargs)

        setattr(dist, op, functools.wraps(fn)(wrapped))
    init = dist.init_process_group

    @functools.wraps(init)
    def init_process_group(backend=None, *args, **kwargs):
        _log({"pid": os.getpid(), "op": "init_process_group", "backend": backend, "where": _caller()})
        return init(backend, *args, **kwargs)

    dist.init_process_group = init_process_group
    dist._pdc_checked = True
