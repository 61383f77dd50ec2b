"""A student stored below fp32 (a streamed source's) is written, released, then each file is
loaded and checked alone: no weight of the student may still hold memory when the checks begin,
or the peak is two copies of the model (the ONNX exporter's rewriter keeps its last graph, and
with it every weight, in a module global)."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch

import pdc.emit.pruned as pruned
from pdc.lang.settings import ImportanceConfig, WidthTarget
from pdc.stages.prune_width import prune_width

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_prune_8b import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64,
              intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
              max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0,
              hidden_act="silu")


def test_student_is_gone_before_the_files_are_checked(tmp_path, monkeypatch):
    held, alive = [], []
    release, check = pruned.release_weights, pruned.check_staged

    def spy_release(program):
        held.extend(weakref.ref(t) for t in program.state_dict().values())
        release(program)

    def spy_check(staged, **kw):
        gc.collect()
        alive.extend(r for r in held if r() is not None)
        return check(staged, **kw)

    monkeypatch.setattr(pruned, "release_weights", spy_release)
    monkeypatch.setattr(pruned, "check_staged", spy_check)
    make_checkpoint(tmp_path / "src", CONFIG)
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    result = prune_width(tmp_path / "src", calib, WidthTarget(hidden=32, mlp=64), ImportanceConfig(method="activation"),
                         tmp_path / "out", progress=False, stream_weights=True)
    assert held and not alive, f"{len(alive)} of {len(held)} student weights still held when the checks began"
    assert sorted(result.artifacts) == ["model", "model.onnx", "program.pt2"]
    assert all(a.max_abs_diff <= a.tolerance for a in result.artifacts.values())
