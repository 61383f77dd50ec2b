"""Build directories made by the producer: `pdc run` on tiny specs, shared by the runner, report,
lock and model-card tests (built once per test session, copied where a test alters them)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import save_tiny_checkpoint
from pdc.cli import main as pdc_main
from eval_support import write_mc_task

WIDTH_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

correct teacher on corpus { steps=2 lr=1e-4 warmup=1 global_batch=4 micro_batch=2 seq_len=32 }
prune width { hidden=48 mlp=64 importance=activation(samples=8, seq_len=32) }
distill from teacher on corpus { steps=3 lr=1e-3 min_lr=1e-4 warmup=1 global_batch=4 micro_batch=2 seq_len=32 }
evaluate with lm_eval { tasks_dir="tasks" perplexity(corpus) tiny_mc(0) }
"""

PRUNE_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune width { hidden=48 mlp=64 importance=activation(samples=8, seq_len=32) }
"""

DEPTH_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune depth { depth=2 contiguous=true saliency=task(tiny_mc, shots=0) }
evaluate with lm_eval { tasks_dir="tasks" perplexity(corpus) tiny_mc(0) }
"""


def write_corpus(path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the cat sat on a mat while dogs ran past old trees and new houses near rivers".split()
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))}) + "\n")
    return path


def make_project(root: Path, spec_text: str, name: str = "tiny", **model) -> Path:
    """A folder with a tiny checkpoint (llama, or the config `model` describes: model_type and
    sizes), a corpus, a local MC task and `<name>.pds`."""
    save_tiny_checkpoint(root / "tiny", "custom" if model else "llama", **model)
    write_corpus(root / "corpus.jsonl")
    write_mc_task(root / "tasks")
    (root / f"{name}.pds").write_text(spec_text)
    return root / f"{name}.pds"


def run_project(root: Path, spec_text: str, name: str = "tiny", **model) -> Path:
    """`pdc run` on a fresh project; returns the build directory."""
    spec = make_project(root, spec_text, name, **model)
    assert pdc_main(["run", str(spec)]) == 0
    return root / "build" / name

COMPARE_SPEC = WIDTH_SPEC + """
compare importance {
  variant activation {}
  variant random { prune.importance=random }
  expect activation beats random on perplexity
  expect activation beats random on tiny_mc
}
"""

# A tiny Mixtral (8 experts, top-2): the mixture-of-experts builds.
MOE_MODEL = dict(model_type="mixtral", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                 num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, bos_token_id=1,
                 eos_token_id=2, pad_token_id=3)

MOE_PRUNE_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune width { hidden=48 experts=4 expert_mlp=48 importance=activation(samples=8, seq_len=32) }
"""

MOE_RUN_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

correct teacher on corpus { method=lora lora_rank=2 steps=2 lr=1e-3 warmup=1 global_batch=4 micro_batch=2 seq_len=32 }
prune width { hidden=48 experts=4 expert_mlp=48 importance=activation(samples=8, seq_len=32, experts=output) }
distill from teacher on corpus { steps=3 lr=1e-3 min_lr=1e-4 warmup=1 global_batch=4 micro_batch=2 seq_len=32 }
evaluate with lm_eval { tasks_dir="tasks" perplexity(corpus) tiny_mc(0) }
"""

MOE_DEPTH_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune depth { depth=2 contiguous=true saliency=loss(corpus, samples=8, seq_len=32) }
distill from teacher on corpus { steps=2 lr=1e-3 min_lr=1e-4 warmup=1 global_batch=4 micro_batch=2 seq_len=32 }
evaluate with lm_eval { tasks_dir="tasks" perplexity(corpus) }
"""
