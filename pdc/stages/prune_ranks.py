"""The ranks of width pruning's activation importance: `python -m pdc.stages.prune_ranks --job
FILE` under torchrun, started by `prune_width` when `pdc run --nproc-per-node M` gives it several
processes. Every rank exports the model (a streamed source's weights stay in its files, read per
use, so the ranks share the page cache instead of holding a copy each), runs its share of the calibration batches
(`pdc.graph.importance.compute` with `ranks`), the sums are all-reduced; rank 0 returns the
scores, and the stage's own process plans and slices with them: what one process would compute,
so 1, 2 and 4 processes keep the same units. (Depth saliency's ranks are `pdc.stages.prune_depth`
itself: this module imports no stage, so no stage it serves is imported back.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from pdc.errors import PdcError
from pdc.graph import importance as imp_mod
from pdc.graph.export import export_dir, materialize
from pdc.graph.program import STAGE
from pdc.graph.storage import return_freed_memory
from pdc.inputs.shards import Blocks
from pdc.lang.settings import ImportanceConfig
from pdc.plan.results import decode, encode
from pdc.stages.ranks import rank_world, worker_main


def _importance(job: dict) -> dict:
    program = export_dir(Path(job["model"]))
    if job.get("stream"):  # each weight read from the files per use: ranks share the page cache, no copy each
        return_freed_memory()
    else:
        materialize(program)
    calib = Blocks.from_json(job["calibration"]).read()
    config = decode(ImportanceConfig, job["config"])
    grams = bool(job.get("grams"))
    scores = imp_mod.compute(program, calib, config, batch_size=job["batch_size"], ranks=rank_world(), grams=grams)
    out = {"scores": scores.to_json(), "tokens": scores.tokens}
    if grams and rank_world()[0] == 0:  # reconstruction's moments: too large for the JSON result
        path = Path(job["work_dir"]) / "grams.pt"
        torch.save(scores.grams, path)
        out["grams"] = str(path)
    return out


def _job(job: dict) -> Optional[dict]:
    work = {"importance": _importance}.get(job.get("kind"))
    if work is None:
        raise PdcError(f"unknown prune job {job.get('kind')!r}", STAGE)
    return encode(work(job))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return worker_main(argv, "pdc.stages.prune_ranks", _job)


if __name__ == "__main__":
    sys.exit(main())
