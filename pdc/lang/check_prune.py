"""Prune stages: width targets (hidden, mlp, heads, kv_heads, experts, expert_mlp, shared_mlp)
against the source or the previous prune stage, head grouping, importance; depth targets and
saliency; the `pdc check` tolerances written in a prune block."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from pdc.arch import Arch
from pdc.lang import ast, check_emit, check_reconstruct
from pdc.lang.check_settings import (Bad, CheckerBase, describe_value, head_span, read_bool, read_enum, read_float,
                                     read_int, read_word, suggest)
from pdc.lang.check_search import check_search
from pdc.lang.checked import PruneStage
from pdc.lang.diagnostics import Note, Span
from pdc.lang.settings import DepthTarget, ImportanceConfig, Saliency, WidthTarget


# The sizes a prune block may set.
AXES = ("hidden", "mlp", "heads", "kv_heads", "depth", "experts", "expert_mlp", "shared_mlp")


def tolerance_of(got: dict) -> tuple:
    """(rtol, atol) for `pdc check` as written in a prune block; None where not written."""
    return tuple(got[k][0] if k in got else None for k in ("check_rtol", "check_atol"))


def absent_axis(axis: str, arch: Arch) -> str:
    """Why `arch` has no `axis` to prune ("" when it has one)."""
    if axis in ("experts", "expert_mlp") and not arch.experts:
        return "the source is not a mixture of experts (its config names no routed experts)"
    if axis == "shared_mlp" and not arch.shared_mlp:
        return "the source has no shared expert"
    if axis == "mlp" and not arch.mlp:
        return "the source has no dense MLP (its experts' width is expert_mlp)"
    return ""


def setting_spans_of(got: dict) -> dict:
    """Where each setting was written (the plan layer points its diagnostics there)."""
    return {k: node.span for k, (_, node) in got.items()}


class PruneRules(CheckerBase):
    def importance(self, v: ast.Value, key: str) -> tuple[ImportanceConfig, Optional[str]]:
        methods = ("activation", "magnitude", "random")
        method = v.value if isinstance(v, ast.Name) else v.name.value if isinstance(v, ast.Call) else None
        if method not in methods:
            got = f"'{method}'" if method else describe_value(v)
            raise Bad(f"unknown importance method {got}: expected one of {', '.join(methods)}"
                       + (suggest(method, methods) if method else ""), v.span)
        if isinstance(v, ast.Name):
            return ImportanceConfig(method=method), None
        schema: dict[str, Callable] = {"seed": read_int(0)}
        if method == "activation":
            schema.update(
                samples=read_int(1), seq_len=read_int(1), data=self.data_reader(),
                batch=read_enum("l2", "mean", what="batch aggregation"),
                seq=read_enum("mean", "l2", what="sequence aggregation"),
                experts=read_enum("mass", "output", what="expert score"),
            )
        got = self.call_args(v, [], schema, f"{method}(...)")
        names = {"batch": "batch_agg", "seq": "seq_agg", "experts": "expert_score"}
        fields = {names.get(k, k): val for k, (val, _) in got.items() if k != "data"}
        return ImportanceConfig(method=method, **fields), got.get("data", (None,))[0]

    def saliency(self, v: ast.Value, key: str) -> Saliency:
        kinds = ("loss", "task", "cosine")
        kind = v.value if isinstance(v, ast.Name) else v.name.value if isinstance(v, ast.Call) else None
        if kind not in kinds:
            got = f"'{kind}'" if kind else describe_value(v)
            raise Bad(f"unknown saliency {got}: expected one of {', '.join(kinds)}"
                       + (suggest(kind, kinds) if kind else ""), v.span)
        if isinstance(v, ast.Name):
            if kind == "task":
                raise Bad("task saliency needs a task: task(winogrande, shots=5)", v.span)
            return Saliency(kind=kind)
        if kind == "task":
            got = self.call_args(v, ["task", "shots"],
                                 {"task": read_word, "shots": read_int(0), "limit": read_int(1),
                                  "precision": read_enum("fp32", "bf16")}, "task(...)")
            if "task" not in got:
                raise Bad("task saliency needs a task: task(winogrande, shots=5)", v.span)
        else:
            got = self.call_args(v, ["data"], {"data": self.data_reader(), "samples": read_int(1),
                                                "seq_len": read_int(1)}, f"{kind}(...)")
        return Saliency(kind=kind, **{k: val for k, (val, _) in got.items()})

    def prune(self, st: ast.PruneStmt, arch: Optional[Arch], default_data: Optional[str],
              source_note: Note) -> Optional[PruneStage]:
        kind = st.kind.value
        if kind == "search":
            return check_search(self, st, arch, default_data, source_note)
        if kind not in ("width", "depth"):
            self.error(f"unknown prune kind '{kind}': expected width, depth or search"
                       + suggest(kind, ("width", "depth", "search")), st.kind.span)
            return None
        for e in st.block.entries:
            self.error("unexpected entry in prune; settings are written key=value", e.span)
        axes = {axis: read_int(1) for axis in AXES}
        # check_rtol/check_atol: the numeric tolerance `pdc check` allows against the lock.
        schema = dict(axes, data=self.data_reader(), check_rtol=read_float(lo=0), check_atol=read_float(lo=0),
                      emit=check_emit.read)
        if kind == "width":
            schema["importance"] = self.importance
            schema["reconstruct"] = lambda v, key: check_reconstruct.read(v, key, self.call_args, Bad, read_float)
        else:
            schema.update(saliency=self.saliency, contiguous=read_bool)
        got = self.settings(st.block.settings, schema, f"prune {kind}")
        if arch is None:  # the source could not be resolved (reported); keys and types were checked
            return None
        bad_axis = self.check_axes(kind, got, arch, source_note)
        data = got.get("data", (None,))[0]
        stage = (self.width_stage(st, got, arch, data, default_data, bad_axis, source_note) if kind == "width"
                 else self.depth_stage(st, got, arch, data, default_data))
        return replace(stage, emit=got["emit"][0]) if stage is not None and "emit" in got else stage

    def check_axes(self, kind: str, got: dict, arch: Arch, source_note: Note) -> bool:
        """Each target no larger than the source (or the previous prune stage's result) and on an
        axis the source has; a width stage changes no depth and a depth stage no width. True when
        an axis was reported."""
        sizes = {"hidden": arch.hidden, "mlp": arch.mlp, "heads": arch.heads,
                 "kv_heads": arch.kv_heads, "depth": arch.layers, "experts": arch.experts,
                 "expert_mlp": arch.expert_mlp, "shared_mlp": arch.shared_mlp}
        bad_axis = False
        for axis in AXES:
            if axis not in got:
                continue
            value, node = got[axis]
            absent = absent_axis(axis, arch)
            if absent:
                self.error(f"{axis}={value}: {absent}", node.span, source_note)
                bad_axis = True
            elif axis == "experts" and value < arch.top_k:
                self.error(f"experts={value} is below the router's top-k ({arch.top_k} experts per token)",
                           node.span, source_note)
                bad_axis = True
            elif axis == "depth" and value > sizes[axis]:
                self.error(f"depth={value} is out of range 1..{sizes[axis]} (the source has "
                           f"{sizes[axis]} layers)", node.span, source_note)
                bad_axis = True
            elif value > sizes[axis]:
                self.error(f"{axis}={value} is larger than the source ({sizes[axis]})"
                           if arch is self.source_arch else
                           f"{axis}={value} is larger than the previous prune stage's result ({sizes[axis]})",
                           node.span, source_note)
                bad_axis = True
        # The paper prunes width and depth in separate stages; a no-op setting is tolerated.
        other = ("depth",) if kind == "width" else ("hidden", "mlp", "heads", "kv_heads", "experts",
                                                   "expert_mlp", "shared_mlp")
        for axis in other:
            if axis in got and got[axis][0] < sizes[axis]:
                self.error(
                    f"{axis}={got[axis][0]} in a {kind} stage: prune width and depth in separate "
                    f"stages (`prune {'depth' if kind == 'width' else 'width'} {{ ... }}`)",
                    got[axis][1].span,
                )
                bad_axis = True
        return bad_axis

    def width_stage(self, st: ast.PruneStmt, got: dict, arch: Arch, data: Optional[str],
                    default_data: Optional[str], bad_axis: bool, source_note: Note) -> Optional[PruneStage]:
        """`prune width`: the width targets, calibration data and importance."""
        importance, imp_data = got.get("importance", ((ImportanceConfig(), None), None))[0]
        if imp_data and data and imp_data != data:
            self.error("calibration data given twice (data= and importance data=) with different names",
                       got["data"][1].span)
        data = imp_data or data or default_data
        if importance.method == "activation" and data is None and "data" not in got:
            self.error("activation importance needs calibration data: declare `data NAME = ...`",
                       head_span(st))
        width_axes = ("hidden", "mlp", "heads", "kv_heads", "experts", "expert_mlp", "shared_mlp")
        targets = {a: got[a][0] for a in width_axes if a in got}
        written = {i.key.value for i in st.block.settings}
        if not targets:
            if not written & set(width_axes):  # else: already reported
                self.error("prune width sets no target (hidden=, mlp=, heads=, kv_heads=, or for a mixture "
                           "of experts experts=, expert_mlp=, shared_mlp=)", head_span(st))
            return None
        width = WidthTarget(**targets)
        target = arch.with_sizes(**targets)
        if not bad_axis:
            self.check_heads(target, arch, got, source_note)
        reconstruct = got.get("reconstruct", (None,))[0]
        sizes = {a: getattr(arch, a) for a in width_axes}
        why = None if bad_axis else check_reconstruct.problem(reconstruct, importance, width, sizes)
        if why:
            self.error(why, got["reconstruct"][1].span)
        return PruneStage("width", width, None, importance, data, target, arch, span=st.span,
                          check_tolerance=tolerance_of(got), setting_spans=setting_spans_of(got),
                          reconstruct=reconstruct)

    def depth_stage(self, st: ast.PruneStmt, got: dict, arch: Arch, data: Optional[str],
                    default_data: Optional[str]) -> Optional[PruneStage]:
        """`prune depth`: the number of layers kept, saliency and its data."""
        if "depth" not in got:
            if not any(k == "depth" for k in (s.key.value for s in st.block.settings)):
                self.error("prune depth needs depth=N (the number of layers to keep)", head_span(st))
            return None
        saliency = got.get("saliency", (Saliency(),))[0]
        if saliency.kind in ("loss", "cosine"):
            sal_data = saliency.data or data or default_data
            if sal_data is None:
                self.error(f"{saliency.kind} saliency needs data: declare `data NAME = ...`", head_span(st))
            saliency = replace(saliency, data=sal_data)
            data = sal_data
        depth = DepthTarget(got["depth"][0], saliency, got.get("contiguous", (True,))[0])
        target = arch.with_sizes(layers=depth.depth)
        return PruneStage("depth", None, depth, ImportanceConfig(), data or default_data, target, arch,
                          span=st.span, check_tolerance=tolerance_of(got), setting_spans=setting_spans_of(got))

    def check_heads(self, target: Arch, source: Arch, got: dict, source_note: Note) -> None:
        def where(*keys: str) -> Span | None:
            for k in keys:
                if k in got:
                    return got[k][1].span
            return None

        if target.heads % target.kv_heads:
            self.error(f"heads={target.heads} is not a multiple of kv_heads={target.kv_heads}",
                       where("heads", "kv_heads"))
            return
        group, source_group = target.heads // target.kv_heads, source.heads // source.kv_heads
        if group > source_group:
            self.error(
                f"heads={target.heads} with kv_heads={target.kv_heads} needs {group} query heads per KV "
                f"head, but the source has {source_group}; pruning cannot grow a group",
                where("kv_heads", "heads"), source_note,
            )
            return
