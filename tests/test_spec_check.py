"""Checker and lowering: what a valid spec lowers to, and which targets are accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdc.plan.dry_run import build_plan
from pdc.lang import CorrectStage, DistillStage, EvaluateStage, PruneStage, SpecError, check_text

BASE = Path(__file__).resolve().parents[1] / "specs" / "t.pds"
HEAD = 'model m = builtin("smollm2-135m")\ndata wiki = builtin("wiki")\ndata held = builtin("wiki-heldout")\n'


def check(body: str):
    return check_text(HEAD + body, BASE)


def errors(body: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        check(body)
    return info.value.headlines()


def test_full_pipeline_lowering():
    spec = check(
        "correct m on wiki { steps=5 method=lora lora_rank=4 order=parallel lr=2e-5 }\n"
        "prune width { hidden=450 mlp=768 depth=30 importance=activation(samples=8, seq_len=64, batch=mean, seq=l2) }\n"
        "prune depth { depth=20 saliency=task(movie_recommendation_local, shots=0, limit=32) hidden=450 }\n"
        "distill from m on held { tokens=1M global_batch=8 micro_batch=2 seq_len=128 loss=kl(reverse) "
        "temperature=2 top_k=16 engine=deepspeed(zero=2, precision=bf16) }\n"
        "evaluate with lm_eval { perplexity(held) movie_recommendation_local(0) winogrande limit=50 tasks_dir=builtin }\n"
    )
    kinds = [type(s) for s in spec.stages]
    assert kinds == [CorrectStage, PruneStage, PruneStage, DistillStage, EvaluateStage]
    c, w, d, dist, ev = spec.stages
    assert (c.order, c.train.method, c.train.lora_rank, c.train.steps, c.train.lr) == ("parallel", "lora", 4, 5, 2e-5)
    assert c.train.min_lr <= c.train.lr
    assert (w.name, d.name) == ("prune", "prune2")
    assert w.data == "held"  # default calibration data: the distill stage's
    assert (w.importance.batch_agg, w.importance.seq_agg, w.importance.samples) == ("mean", "l2", 8)
    assert d.source_arch == w.target_arch and d.target_arch.layers == 20 and d.target_arch.hidden == 450
    assert (d.depth.saliency.kind, d.depth.saliency.task, d.depth.saliency.limit) == ("task", "movie_recommendation_local", 32)
    assert (dist.train.loss, dist.train.zero, dist.train.precision, dist.train.top_k) == ("kl_reverse", 2, "bf16", 16)
    assert dist.train.tokens == 1_000_000
    assert ev.eval.perplexity_data == ("held",) and ev.tasks_dir == "builtin" and ev.eval.limit == 50
    assert [(t.name, t.shots) for t in ev.eval.tasks] == [("movie_recommendation_local", 0), ("winogrande", 0)]
    assert spec.final_arch == d.target_arch
    assert spec.source_model == "m" and spec.source_arch.layers == 30


def test_data_defaults():
    """Calibration data: importance data= > distill/correct data > first data declaration."""
    assert check("prune width { mlp=768 }").stages[0].data == "wiki"
    assert check("prune width { mlp=768 importance=activation(data=held) }").stages[0].data == "held"
    assert check("prune depth { depth=10 saliency=loss(held) }").stages[0].depth.saliency.data == "held"
    assert check("prune depth { depth=10 saliency=cosine }").stages[0].depth.saliency.data == "wiki"


def test_all_errors_reported_at_once():
    errs = errors("prune width { hidden=9999 mlp=0 bogus=1 importance=activation(batch=max) }\n"
                  "distill from nobody on wiki { steps=1 schedule=cosin }\n")
    assert len(errs) >= 5
    assert any("hidden=9999 is larger than the source (576)" in e for e in errs)
    assert any("undefined model 'nobody'" in e for e in errs)


def test_order_parallel_needs_distill():
    assert any("order=parallel" in e for e in errors("correct m on wiki { steps=1 order=parallel }\n"
                                                     "prune width { mlp=768 }"))


def test_keywords_usable_as_keys_and_task_names():
    spec = check("prune depth { data=held depth=10 saliency=loss }\n"
                 "evaluate with lm_eval { prune model data }\n")
    assert spec.stages[0].data == "held"
    assert [t.name for t in spec.stages[1].eval.tasks] == ["prune", "model", "data"]


SOURCE = dict(hidden=576, mlp=1536, heads=9, kv_heads=3)


@settings(max_examples=60, deadline=None)
@given(st.integers(-2, 700), st.integers(-2, 1700), st.integers(0, 12), st.integers(0, 4))
def test_width_targets_accepted_iff_valid(hidden, mlp, heads, kv):
    """Checking and planning (`pdc compile --dry-run`) accept a width target exactly when every
    axis is positive and no larger than the source, heads are a multiple of kv_heads with groups
    no larger than the source's (3), and hidden is a multiple of heads (LlamaConfig's rule, which
    the plan learns from transformers); accepted targets never grow."""
    valid = (0 < hidden <= 576 and 0 < mlp <= 1536 and 0 < heads <= 9 and 0 < kv <= 3
             and heads % kv == 0 and heads // kv <= 3 and hidden % heads == 0)
    body = f"prune width {{ hidden={hidden} mlp={mlp} heads={heads} kv_heads={kv} importance=magnitude }}"
    try:
        spec = check(body)
        plan = build_plan(spec)
    except SpecError as err:
        assert not valid, err.render()
        return
    assert valid
    target = spec.final_arch
    assert plan["final"]["params_total"] < plan["source"]["params_total"] or (hidden, mlp, heads, kv) == tuple(SOURCE.values())
    assert (target.hidden, target.mlp, target.heads, target.kv_heads) == (hidden, mlp, heads, kv)


def test_warnings_do_not_fail_the_check():
    spec = check("model spare = builtin(\"smollm2-135m\")\nprune width { mlp=768 }\n"
                 "distill from m on wiki { steps=4 warmup=4 }\n")
    msgs = [w.headline() for w in spec.warnings]
    assert "4:7: warning: model 'spare' is declared but never used" in msgs
    assert "3:6: warning: data 'held' is declared but never used" in msgs
    assert any("warmup=4 is not shorter than the 4 training steps" in m for m in msgs)
    assert "warning:" in spec.render_warnings()
    assert not check("prune width { mlp=768 importance=activation(data=held) }\n"
                     "distill from m on wiki { steps=4 }\n").warnings
