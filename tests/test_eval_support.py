"""Helpers shared by the eval and depth tests (no tests here): a character-level tokenizer that
fits the tiny models' 128-token vocabulary, and a writer for tiny local multiple-choice tasks."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

MC_CHOICES = ("a", "b", "y")  # "y" is always the right answer; its position varies per question


def char_tokenizer():
    """One token per printable ASCII character (98 ids: <unk>, <s>, </s> and 95 characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in string.printable[:95]:  # digits, letters, punctuation, space
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def write_mc_task(folder: Path, name: str = "tiny_mc", n: int = 6, relative: bool = True) -> Path:
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
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
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
    """A tiny random model whose vocabulary covers `char_tokenizer` (98 < 128 ids)."""
    from conftest import make_tiny_model

    return make_tiny_model(family, seed=seed)
