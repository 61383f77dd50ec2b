"""Teacher correction takes the paper's settings where the spec is silent."""

import pytest

from pdc.lang import check_text

BASE = """\
model teacher = builtin("smollm2-135m")
data wiki = builtin("wiki")
correct teacher on wiki {{ {correct} }}
prune width {{ hidden=432 }}
distill from teacher on wiki {{ steps=10 lr=1e-4 min_lr=1e-5 }}
"""


def _correct(text):
    return check_text(BASE.format(correct=text), "/tmp/spec.pds").stage("correct").train


def test_lr_is_one_fifth_of_the_distillation_peak():
    """No lr given: peak and minimum are a fifth of distillation's; 120 warm-up steps."""
    t = _correct("steps=1000")
    assert t.lr == pytest.approx(2e-5) and t.min_lr == pytest.approx(2e-6)
    assert t.warmup == 120 and t.schedule == "cosine"


def test_explicit_settings_win():
    """What the spec says is kept as written."""
    t = _correct("steps=1000 lr=3e-5 min_lr=1e-6 warmup=7")
    assert (t.lr, t.min_lr, t.warmup) == (3e-5, 1e-6, 7)


def test_short_runs_warm_up_for_at_most_half_the_steps():
    """120 warm-up steps cannot exceed the run: capped at half of it."""
    assert _correct("steps=10").warmup == 5


def test_min_lr_above_the_default_lr_is_an_error():
    """A min_lr the derived peak would undercut is reported, not silently kept."""
    from pdc.lang import SpecError

    with pytest.raises(SpecError, match="min_lr=0.0001 is larger than the default correction lr=2e-05"):
        _correct("steps=100 min_lr=1e-4")
