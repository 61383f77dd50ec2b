"""The producer of tests/fixtures/depth_saliency_hf.json (not a test module): depth saliency tables
of tiny models as the Hugging Face model scored them, with the candidate layers swapped out of its
layer list (`layers_removed`, deleted since). `CASES` are the tables test_depth_on_program.py
scores on the program and compares. The fixture was written by running this file at aea8510, the
last commit with that code (there `saliency_table` took the HF model):

    git worktree add /tmp/old aea8510 && cp tests/depth_saliency_hf.py /tmp/old/tests/
    cd /tmp/old/tests && OMP_NUM_THREADS=1 python depth_saliency_hf.py fixtures/depth_saliency_hf.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from pdc.lang.settings import Saliency

BLOCKS = torch.randint(3, 98, (4, 12), generator=torch.Generator().manual_seed(0))
MC_ITEMS = 12  # items of the task (eval_support.write_mc_task)
CASES = [  # (name, family, layers, depth, contiguous, saliency)
    ("loss_llama_contiguous", "llama", 5, 3, True, Saliency("loss")),
    ("loss_qwen2_single", "qwen2", 5, 3, False, Saliency("loss")),
    ("cosine_mistral_contiguous", "mistral", 5, 3, True, Saliency("cosine")),
    ("cosine_llama_single", "llama", 5, 3, False, Saliency("cosine")),
    ("task_llama_single", "llama", 4, 2, False, Saliency("task", task="tiny_mc", shots=0)),
    ("task_qwen2_contiguous_bf16", "qwen2", 4, 2, True, Saliency("task", task="tiny_mc", shots=0, precision="bf16")),
]
KEYS = ("candidates", "dropped_layers", "baseline", "after_drop", "items")


def main(out: Path) -> None:
    from conftest import make_tiny_model, make_tiny_tokenizer
    from eval_support import write_mc_task
    from pdc.lang.settings import DepthTarget
    from pdc.stages.prune_depth import saliency_table

    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_mc_task(Path(tmp) / "tasks", n=MC_ITEMS)
        for name, family, layers, depth, contiguous, sal in CASES:
            model = make_tiny_model(family, num_hidden_layers=layers)
            task = sal.kind == "task"
            table = saliency_table(model, DepthTarget(depth, sal, contiguous), None if task else BLOCKS,
                                   make_tiny_tokenizer() if task else None, tasks if task else None, progress=False)
            tables[name] = {k: table[k] for k in KEYS}
    out.write_text(json.dumps(tables, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
