"""The ranks of a prune stage's measurements: `python -m pdc.stages.prune_ranks --job FILE`
under torchrun, started by `prune_width` (activation importance) and `prune_depth` (saliency)
when `pdc run --nproc-per-node M` gives them several processes.

- `importance`: every rank exports the model, runs its share of the calibration batches
  (`pdc.graph.importance.compute` with `ranks`), the sums are all-reduced; rank 0 returns the
  scores, and the stage's own process plans and slices with them.
- `saliency`: every rank loads the model and measures its share of the candidates (loss, task)
  or of the blocks (cosine) (`score_candidates`); rank 0 returns the values.
Both return what one process would compute, so 1, 2 and 4 processes choose the same units.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import AutoTokenizer

from pdc.errors import PdcError
from pdc.graph import importance as imp_mod
from pdc.graph.export import export_dir, materialize
from pdc.inputs.models import load_causal_lm
from pdc.inputs.shards import Blocks
from pdc.lang.settings import DepthTarget, ImportanceConfig
from pdc.plan.results import decode, encode
from pdc.stages.prune_depth import STAGE, candidates, decoder_layers, score_candidates, scoring_model
from pdc.stages.process_group import rank_device
from pdc.stages.ranks import rank_world, worker_main


def _importance(job: dict) -> dict:
    program = export_dir(Path(job["model"]))
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


def _saliency(job: dict) -> dict:
    model_dir = Path(job["model"])
    model = load_causal_lm(model_dir, STAGE).to(rank_device())
    target = decode(DepthTarget, job["target"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if target.saliency.kind == "task" else None
    blocks = Blocks.from_json(job["blocks"]).read() if job["blocks"] else None
    cands = candidates(len(decoder_layers(model)), target.depth, target.contiguous)
    tasks_dir = Path(job["tasks_dir"]) if job["tasks_dir"] else None
    values, baseline = score_candidates(scoring_model(model, target.saliency), cands, target.saliency, blocks,
                                        tokenizer, tasks_dir,
                                        job["batch_size"], progress=False)
    return {"values": values, "baseline": baseline}


def _job(job: dict) -> Optional[dict]:
    work = {"importance": _importance, "saliency": _saliency}.get(job.get("kind"))
    if work is None:
        raise PdcError(f"unknown prune job {job.get('kind')!r}", STAGE)
    return encode(work(job))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return worker_main(argv, "pdc.stages.prune_ranks", _job)


if __name__ == "__main__":
    sys.exit(main())
