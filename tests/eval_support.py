"""Helpers shared by the eval and depth tests (no tests here): a writer for tiny local
multiple-choice lm-eval tasks and a rigged output head. The tokenizer is conftest's character
tokenizer (`make_tiny_tokenizer`), whose ids fit the tiny models' 128-token vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MC_CHOICES = ("a", "b", "y")  # "y" is always the right answer; its position varies per question


def write_mc_task(folder: Path, name: str = "tiny_mc", n: int = 6, relative: bool = True,
                  metrics: tuple[str, ...] = ("acc",)) -> Path:
    """A 3-choice lm-eval task (YAML + JSONL) whose right answer is always "y", at rotating
    positions, so a model that prefers "y" scores exactly 1.0 and one that prefers "a" 0.0."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        k = i % len(MC_CHOICES)
        choices = list(MC_CHOICES[k:] + MC_CHOICES[:k])
        rows.append({"question": f"Question {i}: pick one.", "choices": choices, "label": choices.index("y")})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_ref = data.name if relative else str(data)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_ref}\n"
        "test_split: test\n"
        "fewshot_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n"
        + "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    )
    return folder


def rig_to_prefer(model, token_id: int, strength: float = 30.0):
    """Replace the output head by a constant: every position predicts `token_id` most strongly."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = strength
    model.lm_head = head
    return model


def make_tiny_model_for_tasks(family: str = "llama", seed: int = 0):
    """A tiny random model whose vocabulary covers `make_tiny_tokenizer` (< 128 ids)."""
    from conftest import make_tiny_model

    return make_tiny_model(family, seed=seed)
