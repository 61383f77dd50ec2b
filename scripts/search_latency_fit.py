"""How well per-layer costs fitted to a few measured shapes predict the decode latency of the
search's candidates: fit on the corner shapes of experiments/search.pds's space, then measure
every ranked candidate and the hand cut and compare with the prediction.

    OMP_NUM_THREADS=1 python scripts/search_latency_fit.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

from pdc.arch import Arch
from pdc.files import write_json
from pdc.inputs.assets import builtin_model_dir
from pdc.lang.search_settings import Limit, SearchConfig
from pdc.plan.search_space import plan_space
from pdc.stages.search_latency import corner_shapes, fit_latency, measure


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    source_cfg = json.loads((builtin_model_dir("smollm2-135m") / "config.json").read_text())
    source = Arch.from_hf_config(source_cfg)
    limit = Limit("latency", 1.0, True, 1, 4096, "decode")
    cfg = SearchConfig((Limit("params", 0.853, True), Limit("memory", 1.0, True, 1, 4096)),
                       (("hidden", 72), ("mlp", 128), ("heads", 3), ("depth", 2)), slack=0.03)
    t0 = time.time()
    fit = fit_latency(source_cfg, source, limit, corner_shapes(source, cfg), repeats=5, tokens=8)
    space, _ = plan_space(source_cfg, source, cfg)
    checks = []
    for cand in space.ranked:
        s = measure(source_cfg, cand.arch, limit, repeats=5, tokens=8)
        checks.append({"sizes": cand.sizes, "seconds": s, "predicted": fit.predict(cand.arch),
                       "error": fit.predict(cand.arch) / s - 1})
        print(json.dumps(checks[-1]), flush=True)
    errors = [abs(c["error"]) for c in checks]
    write_json(out, {"fit": fit.to_json(), "checks": checks, "mean_abs_error": sum(errors) / len(errors),
                     "max_abs_error": max(errors), "seconds": time.time() - t0,
                     "threads": 1, "note": "2 cores shared with other jobs (load ~14)"})


if __name__ == "__main__":
    main()
