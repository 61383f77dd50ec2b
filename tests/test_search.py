"""`prune search`: the language (budgets, relative sizes, formatting), the space (exact counts,
budgets, the nearest feasible budget), the stage on a tiny checkpoint (cheap score, the emitted
choice, the lock) and the latency fit. Spec errors are files in tests/diagnostics/search_*.pds."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import FAMILY_CONFIGS, save_tiny_checkpoint
from pdc.arch import Arch
from pdc.emit.lock import build_lock, compare_locks
from pdc.lang import load_spec
from pdc.lang.formatter import fmt as format_text
from pdc.lang.parser import parse_text
from pdc.lang.search_settings import Limit, SearchConfig
from pdc.lang.settings import ImportanceConfig
from pdc.plan.counts import count_arch, hf_config
from pdc.plan.dry_run import build_plan, render_plan
from pdc.plan.search_space import axis_values, candidates, nearest_feasible, plan_space
from pdc.stages.search import prune_search
from pdc.stages.search_latency import LatencyFit, _nnls, features

TINY = dict(FAMILY_CONFIGS["llama"])
SEARCH_SPEC = """\
model teacher = builtin("smollm2-135m")
data  wiki    = builtin("wiki")
prune search {
  params<=0.9x  memory(batch=2, context=1024)<=1.0x
  axes(mlp=384, depth=4) keep=0.7 top=2 steps=0
  mark(hand, mlp=1152)
}
"""


def test_budgets_parse_and_format_back():
    spec = parse_text(SEARCH_SPEC)
    limits = [i for i in spec.statements[2].block.items if type(i).__name__ == "Limit"]
    assert [(l.value.value, l.value.text) for l in limits] == [(0.9, "0.9x"), (1.0, "1.0x")]
    text = format_text(SEARCH_SPEC)
    assert "params<=0.9x" in text and "memory(batch=2, context=1024)<=1.0x" in text
    assert format_text(text) == text


def test_checked_search_settings():
    (st,) = load_spec_text(SEARCH_SPEC).prune_stages()
    cfg = st.search
    assert st.kind == "search" and cfg.axes == (("mlp", 384), ("depth", 4))
    assert cfg.limit("params") == Limit("params", 0.9, True)
    assert cfg.limit("memory") == Limit("memory", 1.0, True, batch=2, context=1024)
    assert (cfg.keep, cfg.top, cfg.steps) == (0.7, 2, 0) and cfg.hand == (("hand", (("mlp", 1152),)),)


def load_spec_text(text: str):
    path = Path(tempfile.mkdtemp()) / "s.pds"
    path.write_text(text)
    return load_spec(path)


def test_space_counts_are_the_instantiated_models():
    source = Arch.from_hf_config(TINY)
    cfg = SearchConfig((Limit("params", 0.8, True),), (("hidden", 16), ("mlp", 32), ("heads", 2), ("depth", 1)))
    values = axis_values(source, cfg)
    assert values == {"hidden": [64, 48, 32], "mlp": [96, 64], "heads": [4, 2], "depth": [4, 3, 2]}
    cands = candidates(TINY, source, cfg)
    assert len(cands) == 3 * 2 * 2 * 3
    for c in cands[::5]:  # each count is that of the full model transformers builds from the config
        config = c.arch.to_hf_config(TINY)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config(config))
        assert c.params == sum(p.numel() for p in model.parameters()), c.label


def test_budgets_filter_and_the_nearest_feasible_budget():
    source = Arch.from_hf_config(TINY)
    full = count_arch(TINY, source).total
    cfg = SearchConfig((Limit("params", 0.8, True), Limit("memory", 1.0, True, 1, 64)),
                       (("mlp", 32), ("depth", 1)), slack=0.05)
    space, cands = plan_space(TINY, source, cfg)
    assert space.size == 6 and space.representable == 6
    ok = [c for c in cands if c.params <= 0.8 * full]
    assert space.feasible == len(ok) and all(c in ok for c in space.ranked)
    top = max(c.params for c in ok)
    assert [c.params for c in space.ranked] == sorted((c.params for c in ok if c.params >= 0.95 * top), reverse=True)
    tight = Limit("params", 0.01, True)
    cfg2 = SearchConfig((tight,), cfg.axes)
    space2, cands2 = plan_space(TINY, source, cfg2)
    assert space2.ranked == []
    smallest = min(c.params for c in cands2)
    assert nearest_feasible(cands2, cfg2, space2.figures, tight) == f"{-(-smallest * 1000 // full) / 1000:g}x"


def test_dry_run_prints_space_and_cost():
    text = render_plan(build_plan(load_spec_text(SEARCH_SPEC)))
    assert "search: params<=0.9x, memory(batch=2, context=1024)<=1x" in text
    assert "space: 6 shapes, 6 representable" in text  # mlp 1536, 1152 (>= 0.7 x 1536: 1076); depth 30, 26, 22
    assert "ranking cost: LM loss of" in text


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    src = save_tiny_checkpoint(tmp / "src", "llama")
    calib = torch.randint(0, 100, (6, 16), generator=torch.Generator().manual_seed(3))
    cfg = SearchConfig((Limit("params", 0.85, True),), (("mlp", 32), ("depth", 1)), slack=0.3,
                       top=2, steps=0, samples=4, importance=ImportanceConfig(samples=6, seq_len=16),
                       hand=(("hand", (("mlp", 64),)),))
    result = prune_search(src, calib, cfg, tmp / "out", progress=False, deploy=False)
    return tmp, src, calib, cfg, result


def test_search_chooses_the_lowest_loss_and_emits_it(searched):
    tmp, src, calib, cfg, result = searched
    s = json.loads((tmp / "out" / "search.json").read_text())
    rows = s["candidates"]
    assert len(rows) >= 2 and s["chosen"] == min(range(len(rows)), key=lambda i: rows[i]["cheap_loss"])
    assert [r["cheap_rank"] for r in sorted(rows, key=lambda r: r["cheap_loss"])] == list(range(1, len(rows) + 1))
    chosen = rows[s["chosen"]]
    assert result.params_after == chosen["params"] and s["reordered"] is False
    # the emitted checkpoint computes the cheap score's model: its loss on the same blocks
    model = AutoModelForCausalLM.from_pretrained(tmp / "out" / "model").eval()
    with torch.no_grad():
        logits = model(input_ids=calib[: cfg.samples]).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), calib[: cfg.samples, 1:].reshape(-1))
    assert float(loss) == pytest.approx(chosen["cheap_loss"], rel=1e-4)
    assert model.config.num_hidden_layers == chosen["sizes"]["depth"]
    assert model.config.intermediate_size == chosen["sizes"]["mlp"]
    assert (tmp / "out" / "pareto.png").stat().st_size > 0
    assert s["hand"]["hand"]["sizes"]["mlp"] == 64 and s["hand"]["hand"]["cheap_loss"] > 0


def test_lock_holds_the_choice_and_check_sees_another(searched):
    _, _, _, _, result = searched
    lock = build_lock(result, "settings")
    assert lock["search"]["chosen"] == result.search["chosen_sizes"]
    assert len(lock["search"]["candidates"]) == len(result.search["candidates"])
    assert compare_locks(lock, build_lock(result, "settings")) == []
    other = json.loads(json.dumps(lock))
    other["search"]["chosen"]["mlp"] += 1
    assert any(m.path[:2] == ("search", "chosen") for m in compare_locks(lock, other))


def test_latency_fit_recovers_per_layer_costs():
    source = Arch.from_hf_config(TINY)
    truth = [1e-3, 2e-9, 3e-9, 4e-9, 5e-4]
    shapes = [source.with_sizes(hidden=h, mlp=m, heads=k, layers=d)
              for h, m, k, d in [(64, 96, 4, 4), (32, 96, 4, 4), (64, 48, 4, 4), (64, 96, 2, 4), (64, 96, 4, 2),
                                 (48, 64, 2, 3), (32, 48, 2, 2)]]
    ys = [sum(c * f for c, f in zip(truth, features(a))) for a in shapes]
    coef = _nnls([features(a) for a in shapes], ys)
    fit = LatencyFit(Limit("latency", 1, True), coef)
    for a, y in zip(shapes, ys):
        assert fit.predict(a) == pytest.approx(y, rel=1e-6)
    assert all(c >= 0 for c in _nnls([features(a) for a in shapes], [-y for y in ys]))
