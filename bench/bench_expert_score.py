"""Which expert score prunes a mixture of experts best: the norm of an expert's routed output
("output", pdc's default), the routing weight it receives ("mass"), or random, measured side by
side on one model as held-out perplexity without retraining.

The model is the trained tiny MoE of examples/moe.pds (run that first: its corrected teacher is
examples/build/moe/output/correct/model), or any MoE checkpoint given as the first argument. All
scores come from one calibration pass (both measures are recorded together); each variant then
slices a copy of the same program, so only the expert ranking differs (each kept expert keeps
its own best neurons by the same activation scores).

    python bench/bench_expert_score.py [MODEL_DIR] [--experts 2,4] [--expert-mlp 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pdc.graph import importance as imp_mod
from pdc.graph.export import export_dir, materialize
from pdc.inputs.data import take, token_blocks
from pdc.lang.settings import DataSource, ImportanceConfig, WidthTarget
from pdc.stages.evaluate import builtin_heldout_blocks
from pdc.stages.prune_width import prune_program

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "build" / "moe" / "output" / "correct" / "model"


@torch.no_grad()
def perplexity(program, blocks: torch.Tensor, batch: int = 8) -> float:
    nll, n = 0.0, 0
    for start in range(0, blocks.shape[0], batch):
        ids = blocks[start:start + batch]
        logits = program.forward(ids)[:, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        n += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / n)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=str(DEFAULT))
    parser.add_argument("--experts", default="2,4")
    parser.add_argument("--expert-mlp", type=int, default=None)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=32)
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    calib = take(token_blocks(DataSource("builtin", "wiki"), tok, 128), args.samples, seed=0).read()
    heldout = torch.as_tensor(builtin_heldout_blocks(tok, 128, n_blocks=args.heldout), dtype=torch.long)
    program = export_dir(Path(args.model))
    materialize(program)
    print(f"{args.model}: {program.arch.experts} experts, top-{program.arch.top_k}, {program.num_params():,} params")
    scores = imp_mod.compute(program, calib, ImportanceConfig(samples=args.samples, seq_len=128))
    print(f"unpruned: held-out perplexity {perplexity(program, heldout):.2f}")
    g = torch.Generator().manual_seed(0)
    rankings = {"output": scores.expert_output, "mass": scores.expert_mass,
                "random": {i: torch.rand(program.arch.experts, generator=g) for i in scores.expert_output}}
    for experts in (int(e) for e in args.experts.split(",")):
        row = []
        for name, ranking in rankings.items():
            scores.experts = ranking
            pruned = program.clone()
            prune_program(pruned, calib, WidthTarget(experts=experts, expert_mlp=args.expert_mlp), ImportanceConfig(),
                          progress=False, scores=scores)
            row.append(f"{name} {perplexity(pruned, heldout):.2f}")
            same = sum(int(torch.equal(imp_mod.top_k(scores.expert_output[i], experts),
                                       imp_mod.top_k(scores.expert_mass[i], experts))) for i in scores.expert_output)
        print(f"experts={experts}: " + ", ".join(row) + f"  (output and mass keep the same experts in {same} of "
              f"{len(scores.expert_output)} layers)")


if __name__ == "__main__":
    main()
