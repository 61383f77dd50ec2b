"""Shared fixtures: tiny random models of each supported family, built from configs in seconds."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import settings as hypothesis_settings

# CI runs the property tests on a fixed seed sequence: a landing never depends on a random draw
# (a failure found locally is kept as an @example).
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Every collective of this process and of every process it starts (torchrun ranks included) is
# checked against the process group a GPU rank joins (tests/collective_check/sitecustomize.py).
_CHECK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "collective_check")
if "PDC_COLLECTIVE_LOG" not in os.environ:
    import tempfile

    os.environ["PDC_COLLECTIVE_LOG"] = os.path.join(tempfile.mkdtemp(prefix="pdc-collectives-"), "log.jsonl")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_CHECK_DIR, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, _CHECK_DIR)
import collective_check  # noqa: E402

collective_check.install()

FAMILY_CONFIGS = {
    "llama": dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    "mistral": dict(
        model_type="mistral", vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, tie_word_embeddings=False, sliding_window=None,
    ),
    "qwen2": dict(
        model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
    ),
}


def make_tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of `family` (eval mode, fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(FAMILY_CONFIGS.get(family, {}))  # other families: model_type and sizes in `overrides`
    cfg.update(overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1; perturb them so channel coupling through norms is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request):
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_tiny_model(family)


def make_tiny_tokenizer():
    """A character-level fast tokenizer (< 128 ids) that needs no download."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def save_tiny_checkpoint(path, family: str = "llama", seed: int = 0, **overrides):
    """A tiny random model plus the character tokenizer saved as an HF directory."""
    from pathlib import Path

    path = Path(path)
    model = make_tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path, family):
    return save_tiny_checkpoint(tmp_path / f"tiny-{family}", family)


@pytest.fixture(scope="session")
def width_build(tmp_path_factory):
    """`pdc run` of the tiny width spec (correct, prune, distill, evaluate): the build directory."""
    from tiny_builds import WIDTH_SPEC, run_project

    return run_project(tmp_path_factory.mktemp("width"), WIDTH_SPEC)


@pytest.fixture(scope="session")
def depth_build(tmp_path_factory):
    """`pdc run` of the tiny depth spec (task saliency, evaluate): the build directory."""
    from tiny_builds import DEPTH_SPEC, run_project

    return run_project(tmp_path_factory.mktemp("depth"), DEPTH_SPEC)


@pytest.fixture(scope="session")
def real_assets():
    """The `pdc setup` assets (SmolLM2, wiki text, movie_recommendation_local). Tests that need them are marked
    slow and run only when asked for (`pytest -m slow`): without the assets they fail with the
    fix, never skip silently."""
    from pdc.errors import PdcError
    from pdc.inputs import assets

    try:
        return {"smollm2": assets.smollm2_dir(), "wiki": assets.builtin_data_path("wiki"),
                "tasks": assets.local_tasks_dir()}
    except PdcError as exc:
        pytest.fail(f"this slow test needs the real assets: {exc.message}", pytrace=False)
