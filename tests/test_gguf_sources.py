"""GGUF sources as users have them: a tiny random model of each family transformers can load from
GGUF, written as a real GGUF file (`gguf_files.write_gguf`: llama.cpp's names, metadata, q/k
order and norm offsets), compiled with `pdc compile` from `model m = gguf("...")`.

For every family, the invariants of the config-built family tests (tests/test_families.py), here
from the file: the GGUF holds the model exactly (transformers loads the random model's logits from
it); the checker, the dry run and the converted checkpoint read one config from it; keeping every
unit reproduces the source logits; the width and depth students load, the depth student computes
the hand-built shorter model's logits, and each student has the parameter count the dry run
predicted. The header readings and the compile of Gemma 3 run by default; the compiles of the
other families and every keep-all compile with `-m slow`.
"""

from __future__ import annotations

import json

import pytest
import torch

from depth_reference import hand_built
from gguf_files import FAMILIES, gguf_source
from graph_exports import load_hf
from pdc.arch import Arch
from pdc.cli import main as pdc_main
from pdc.inputs.models import materialize_model
from pdc.lang import check_text
from pdc.lang.settings import ModelSource
from pdc.plan.counts import count
from tiny_builds import write_corpus

# family -> width target the family's config can represent (StableLM derives head_dim from hidden)
WIDTH = {"llama": "hidden=48 mlp=64 heads=2", "gemma3_text": "hidden=48 mlp=64 heads=2",
         "qwen2": "hidden=48 mlp=64 heads=2", "qwen3": "hidden=48 mlp=64 heads=2 kv_heads=1",
         "gemma2": "hidden=48 mlp=64 heads=2", "phi3": "hidden=48 mlp=64 heads=2 kv_heads=2",
         "stablelm": "hidden=32 mlp=64 heads=2",
         "qwen3_moe": "hidden=48 heads=2 kv_heads=1 experts=3 expert_mlp=512",
         "qwen2_moe": "hidden=48 heads=2 experts=3 expert_mlp=1024 shared_mlp=4096"}
# family -> every unit kept (the tiny models' own sizes)
KEEP = {"qwen3_moe": "hidden=64 heads=4 experts=4 expert_mlp=768",
        "qwen2_moe": "hidden=64 heads=4 experts=4 expert_mlp=1408 shared_mlp=5632"}
DEFAULT = ("gemma3_text",)
PARAMS = [f if f in DEFAULT else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
IDS = torch.randint(0, 250, (2, 13), generator=torch.Generator().manual_seed(1))
SPEC = """\
model m = gguf("{family}.gguf")
data corpus = jsonl("corpus.jsonl")

{stages}
"""
WIDTH_STAGE = "prune width {{ {sizes} importance=activation(samples=8, seq_len=32) }}"
DEPTH_STAGE = "prune depth { depth=2 saliency=loss(corpus, samples=4, seq_len=16) }"


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _spec(root, family, name, *stages):
    path = root / f"{name}.pds"
    path.write_text(SPEC.format(family=family, stages="\n".join(stages)))
    return path


def _dry_run(spec, capsys) -> dict:
    capsys.readouterr()
    assert pdc_main(["compile", str(spec), "--dry-run", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _compile(spec):
    assert pdc_main(["compile", str(spec)]) == 0
    return spec.parent / "build" / spec.stem


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))

    def make(family):
        path, model = gguf_source(family, tmp_path)
        write_corpus(tmp_path / "corpus.jsonl")
        return tmp_path, model.eval()

    return make


@pytest.mark.parametrize("family", list(FAMILIES))
def test_header_config_is_transformers_config(family, tmp_path):
    """pdc's torch-free reading of the header is the config transformers' GGUF loader builds:
    model type (Gemma 3's file is the text model, `gemma3_text`), sizes, ids, everything."""
    from transformers import AutoConfig

    from pdc.inputs.gguf import config_differences
    from pdc.lang.sources import gguf_config
    from pdc.plan.counts import hf_config

    path, original = gguf_source(family, tmp_path)
    ours = gguf_config(path)
    theirs = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ours["model_type"] == theirs.model_type == original.config.model_type
    assert config_differences(hf_config(ours).to_dict(), theirs.to_dict()) == []
    assert Arch.from_hf_config(ours) == Arch.from_hf_config(original.config.to_dict())


def test_unread_expert_widths_are_transformers_defaults():
    """The expert widths transformers' GGUF loader leaves to its config classes, which pdc's
    torch-free header reader copies, are those classes' defaults."""
    from transformers import AutoConfig

    from pdc.lang.gguf_header import _UNREAD_EXPERT_WIDTHS

    for model_type, widths in _UNREAD_EXPERT_WIDTHS.items():
        defaults = AutoConfig.for_model(model_type)
        assert {k: getattr(defaults, k) for k in widths} == {k: v[0] for k, v in widths.items()}


def test_expert_width_transformers_cannot_load_is_refused(tmp_path):
    """A Qwen3-MoE file whose experts are not transformers' default width: transformers' loader
    would build a model the tensors do not fit, so the header reading refuses it, naming the key."""
    from gguf_files import FAMILIES, tiny_model, write_gguf
    from pdc.lang.gguf_header import GgufError, gguf_config

    arch, tokenizer, _ = FAMILIES["qwen3_moe"]
    model = tiny_model("qwen3_moe")
    model.config.moe_intermediate_size = 512
    narrow = type(model)(model.config)
    path = write_gguf(narrow, tmp_path / "narrow.gguf", arch, tokenizer)
    with pytest.raises(GgufError, match="experts 512 wide .* builds moe_intermediate_size=768"):
        gguf_config(path)


def test_gemma3_targets_are_checked_against_the_text_model(tmp_path, capsys):
    """The reported refusal: a Gemma 3 GGUF read as the multimodal `gemma3` config derived
    head_dim from hidden // heads (16 here, where the file's heads are 32 wide, as 256 are in
    Gemma 3 270M's 640) and refused every width and even depth. Read as the text model it keeps
    its head_dim; a size a config truly cannot hold (StableLM derives head_dim) is
    refused naming the config key that forces it."""
    gguf_source("gemma3_text", tmp_path)
    gguf_source("stablelm", tmp_path)
    write_corpus(tmp_path / "corpus.jsonl")
    for stage in ("prune depth { depth=3 saliency=loss(corpus) }", WIDTH_STAGE.format(sizes="hidden=48 mlp=64")):
        plan = _dry_run(_spec(tmp_path, "gemma3_text", "g", stage), capsys)
        assert plan["final"]["head_dim"] == 32 and plan["final"]["model_type"] == "gemma3_text"
    bad = _spec(tmp_path, "stablelm", "s", WIDTH_STAGE.format(sizes="hidden=48 heads=2"))
    capsys.readouterr()
    assert pdc_main(["compile", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4:" in err and "derives head_dim from hidden_size // heads = 24, not the source's 16" in err


@pytest.mark.parametrize("family", PARAMS)
def test_gguf_source_compiles_width_and_depth(family, project, capsys):
    root, original = project(family)
    gguf = root / f"{family}.gguf"
    # The file holds the model: transformers loads the random model's logits from it.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=gguf.name, dtype=torch.float32).eval()
    _close(_logits(loaded), _logits(original))

    # One reading: the checker's config is the converted checkpoint's, with the same count.
    spec = _spec(root, family, "wd", WIDTH_STAGE.format(sizes=WIDTH[family]), DEPTH_STAGE)
    checked = check_text(spec.read_text(), spec)
    assert checked.source_arch.model_type == original.config.model_type
    converted = materialize_model(ModelSource("gguf", str(gguf)), root, checked.source_config)
    saved = json.loads((converted / "config.json").read_text())
    assert Arch.from_hf_config(saved) == checked.source_arch == Arch.from_hf_config(original.config.to_dict())
    assert count(saved).total == count(checked.source_config).total == original.num_parameters()

    # Width then depth: each student loads, has the dry run's count; depth drops whole layers.
    plan = _dry_run(spec, capsys)
    build = _compile(spec)
    width, depth = (load_hf(build / s / "model") for s in ("prune", "prune2"))
    for model, stage in ((width, plan["stages"][0]), (depth, plan["stages"][1])):
        assert model.num_parameters() == stage["params_total"][1]
        assert torch.isfinite(_logits(model)).all()
    sizes = dict(pair.split("=") for pair in WIDTH[family].split())
    arch = Arch.from_hf_config(width.config.to_dict())
    assert {a: getattr(arch, a) for a in sizes} == {a: int(v) for a, v in sizes.items()}
    dropped = json.loads((build / "prune2" / "kept_indices.json").read_text())["dropped_layers"]
    assert depth.config.num_hidden_layers == 2 and len(dropped) == 2
    _close(_logits(depth), _logits(hand_built(width, dropped)))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_keep_all_reproduces_source_logits(family, project):
    """`pdc compile` of a width spec that keeps every unit, from the GGUF: the student computes
    the random model's logits (the file, the conversion, the trace and the emitted checkpoint
    together lose nothing)."""
    root, original = project(family)
    keep = _spec(root, family, "keep", WIDTH_STAGE.format(sizes=KEEP.get(family, "hidden=64 mlp=96 heads=4")))
    _close(_logits(load_hf(_compile(keep) / "prune" / "model")), _logits(original))
