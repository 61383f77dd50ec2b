"""Config resolution without weights (`pdc/sources.py`) and the checker's source handling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdc.arch import Arch
from pdc.lang.sources import SourceError, gguf_config, resolve_config
from pdc.lang import SpecError, check_text
from pdc.lang.settings import ModelSource
from pdc.plan.dry_run import build_plan


def _write_gguf(path, tied: bool, vocab: int = 11, arch: str = "llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_embedding_length(64)
    w.add_block_count(3)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_tensor("token_embd.weight", np.zeros((vocab, 64), dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((vocab, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_header_gives_config(tmp_path, tied):
    """Sizes come from the header, vocab from the token list, tied = no output.weight."""
    path = tmp_path / "m.gguf"
    _write_gguf(path, tied)
    cfg = gguf_config(path)
    arch = Arch.from_hf_config(cfg)
    assert (arch.hidden, arch.mlp, arch.layers, arch.heads, arch.kv_heads, arch.head_dim) == (64, 96, 3, 4, 2, 16)
    assert arch.vocab == 11 and arch.tied is tied
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6)


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "phi3", "stablelm"])
def test_gguf_header_of_any_architecture_transformers_reads(tmp_path, arch):
    """Any architecture transformers can load from GGUF: its model type, and the sizes through
    transformers' own GGUF key map; the dry run counts it."""
    path = tmp_path / "m.gguf"
    _write_gguf(path, tied=True, vocab=32064 if arch == "phi3" else 128, arch=arch)  # phi3 pads with id 32000
    cfg = gguf_config(path)
    arch_ = Arch.from_hf_config(cfg)
    assert cfg["model_type"] == arch
    assert (arch_.hidden, arch_.mlp, arch_.layers, arch_.heads, arch_.kv_heads) == (64, 96, 3, 4, 2)
    spec = check_text('model m = gguf("m.gguf")\nprune width { mlp=48 importance=magnitude }\n', tmp_path / "s.pds")
    assert build_plan(spec)["final"]["params_total"] > 0


def test_gguf_architecture_transformers_cannot_read_is_refused(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path, tied=True, arch="rwkv6")
    with pytest.raises(SourceError, match="has architecture 'rwkv6', which transformers cannot load from GGUF"):
        gguf_config(path)


def test_gguf_spec_relative_path(tmp_path):
    _write_gguf(tmp_path / "m.gguf", tied=True)
    spec = check_text('model m = gguf("m.gguf")\nprune width { mlp=48 importance=magnitude }\n',
                      tmp_path / "s.pds")
    assert spec.final_arch.mlp == 48
    assert spec.models["m"].ref == str(tmp_path / "m.gguf")


def test_dir_source_and_errors(tmp_path):
    cfg = dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(cfg))
    assert resolve_config(ModelSource("dir", "tiny"), tmp_path)["hidden_size"] == 64
    with pytest.raises(SourceError, match="not found"):
        resolve_config(ModelSource("dir", "nope"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no config.json"):
        resolve_config(ModelSource("dir", "empty"), tmp_path)
    with pytest.raises(SourceError, match="not found"):
        resolve_config(ModelSource("gguf", "x.gguf"), tmp_path)


def test_build_refuses_a_source_other_than_the_checked_one(tmp_path):
    """The model the stages load must have the architecture the spec was checked against: a
    checkpoint whose config changed after the check is refused in one line naming what differs."""
    from pdc.errors import PdcError
    from pdc.inputs.models import materialize_model

    cfg = dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(cfg))
    spec = check_text('model m = dir("tiny")\nprune width { mlp=48 importance=magnitude }\n', tmp_path / "s.pds")
    source = spec.models["m"]
    assert materialize_model(source, tmp_path, spec.source_config) == tmp_path / "tiny"
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    with pytest.raises(PdcError, match=r"was checked with a config the model it loads does not have "
                                       r"\(mlp 96 vs 128: checked vs .*tiny\)") as err:
        materialize_model(source, tmp_path, spec.source_config)
    assert "\n" not in str(err.value)


def test_bundled_configs_and_aliases():
    a = Arch.from_hf_config(resolve_config(ModelSource("hf", "meta-llama/Llama-3.1-8B")))
    assert (a.hidden, a.mlp, a.layers, a.heads, a.kv_heads, a.head_dim, a.vocab, a.tied) == \
        (4096, 14336, 32, 32, 8, 128, 128256, False)
    m1 = resolve_config(ModelSource("hf", "mistralai/Mistral-Nemo-Base-2407"))
    m2 = resolve_config(ModelSource("hf", "nvidia/Mistral-NeMo-12B-Base"))
    assert m1 == m2
    m = Arch.from_hf_config(m1)
    assert (m.hidden, m.mlp, m.layers, m.heads, m.kv_heads, m.head_dim, m.vocab, m.tied) == \
        (5120, 14336, 40, 32, 8, 128, 131072, False)
    s = Arch.from_hf_config(resolve_config(ModelSource("builtin", "smollm2-135m")))
    assert (s.hidden, s.mlp, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab, s.tied) == \
        (576, 1536, 30, 9, 3, 64, 49152, True)


def test_unknown_hub_id_is_spec_error_at_source(tmp_path):
    text = 'model t = hf("nobody/nothing-xyz")\nprune width { mlp=8 importance=random }\n'
    with pytest.raises(SpecError) as info:
        check_text(text, tmp_path / "s.pds")
    assert info.value.headlines()[0].startswith("1:11: error: unknown hub model 'nobody/nothing-xyz'")


def test_nearest_valid_hidden_is_representable(tmp_path):
    """A hidden size the emitted config cannot represent is reported by the dry run with
    transformers' reason and the nearest sizes it accepts; those plan cleanly, and the same size
    is fine for a family whose config accepts it (no family table in pdc)."""
    head = 'model s = builtin("smollm2-135m")\nprune width { hidden=%d importance=magnitude }\n'
    with pytest.raises(SpecError) as info:
        build_plan(check_text(head % 448, tmp_path / "s.pds"))
    msg = info.value.headlines()[0]
    assert "not a multiple of the number of attention heads (9)" in msg
    suggested = [int(x) for x in msg.split("nearest valid: ")[1].split(" or ")]
    assert suggested == [441, 450]
    for h in suggested:
        assert build_plan(check_text(head % h, tmp_path / "s.pds"))["final"]["hidden"] == h
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", vocab_size=128, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, head_dim=8)))
    plan = build_plan(check_text('model s = dir("qwen")\nprune width { hidden=64 importance=magnitude }\n',
                                 tmp_path / "q.pds"))
    assert plan["final"]["hidden"] == 64


def test_unknown_model_type_is_a_spec_error_at_the_source(tmp_path):
    """A config transformers cannot build is reported at the model declaration, once."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(
        model_type="nonesuch", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2)))
    with pytest.raises(SpecError) as info:
        build_plan(check_text('model s = dir("m")\nprune width { hidden=4 importance=magnitude }\n',
                              tmp_path / "s.pds"))
    (head,) = info.value.headlines()
    assert head.startswith("1:11: error: cannot build the source model: transformers does not know model type 'nonesuch'")


def test_builtin_names_agree_with_assets():
    """The checker's builtin names are the ones `pdc setup` installs."""
    from pdc.inputs import assets
    from pdc.lang.sources import _index
    from pdc.lang.check_sources import BUILTIN_DATA

    assert set(BUILTIN_DATA) == set(assets.builtin_data_names())
    assert set(_index()["builtin"]) == set(assets.BUILTIN_MODELS)


@pytest.mark.slow
def test_installed_smollm2_config_matches_bundled(real_assets):
    """The installed checkpoint's config gives the bundled architecture."""
    from pdc.lang.sources import bundled_config

    path = real_assets["smollm2"] / "config.json"
    installed = Arch.from_hf_config(json.loads(path.read_text()))
    assert installed == Arch.from_hf_config(bundled_config("smollm2-135m.json"))


@pytest.mark.slow
def test_plan_counts_match_installed_checkpoint(tmp_path, real_assets):
    """The dry run's parameter count for builtin("smollm2-135m") equals the number of weights
    in the installed checkpoint's safetensors (read from the headers, no tensors loaded)."""
    import math
    import struct

    from pdc.plan.dry_run import build_plan
    from pdc.lang import check_text

    files = sorted(real_assets["smollm2"].glob("*.safetensors"))
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    plan = build_plan(check_text('model m = builtin("smollm2-135m")\n', tmp_path / "s.pds"))
    assert plan["source"]["params_total"] == total
