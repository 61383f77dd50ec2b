"""Running a `prune search` stage inside a build: its calibration blocks, the blocks and
settings of the recipe's distillation (the top candidates are distilled briefly with them, from
the same teacher-logit cache the distill stage then extends), and latency measurements when a
latency budget is set."""

from __future__ import annotations

from pathlib import Path

from pdc.inputs.data import split_blocks
from pdc.plan.results import PruneResult
from pdc.plan.search_plan import short_distill_stage
from pdc.stages.search import ShortDistill, prune_search
from pdc.stages.search_latency import corner_shapes, fit_latency


def run_search(build, node, out: Path, calibration) -> PruneResult:
    st = node.decl
    cfg = st.search
    model_dir = build.input_model(node.inputs["model"], node.name)
    distill = short_distill_stage(build.spec, st)
    short = None
    if distill is not None and cfg.steps > 0:
        blocks = build.blocks(distill.data, model_dir, distill.train.seq_len, node.name)
        train, val = split_blocks(blocks, distill.train.val_fraction, node.name)
        # the pruned model's source is the distillation's teacher (the corrected one when corrected)
        short = ShortDistill(model_dir, train, val, distill.train, build.work_dir(node.name), build.launch)

    def latency(source_cfg, source, limit):
        return fit_latency(source_cfg, source, limit, corner_shapes(source, cfg))

    return prune_search(model_dir, calibration.read() if hasattr(calibration, "read") else calibration, cfg, out,
                        distill=short, latency=latency, progress=build.progress, deploy=build.artifacts)
