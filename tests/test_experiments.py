"""Every shipped experiment (experiments/*.pds, one per figure of the paper) parses, is in
canonical form, checks and dry-runs with `pdc compile --dry-run` without any asset installed,
compares at least two variants on SmolLM2-135M, and says in its header what it shows, how to
run it and what was measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdc.cli import main as pdc_main
from pdc.lang import load_spec
from pdc.lang.formatter import fmt
from pdc.plan.dry_run import build_plan

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SPECS = sorted(EXPERIMENTS.glob("*.pds"))  # not build/*/spec.pds, the copies a run keeps
FIGURES = {"fig3_corrected_teacher", "fig5_importance_and_loss", "fig6_width_vs_depth", "fig7_layer_importance",
           "fig8_depth_choice", "correction_methods"}


def test_one_spec_per_figure():
    assert FIGURES <= {p.stem for p in SPECS}


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_experiment_dry_runs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PDC_CACHE", str(tmp_path))  # empty: nothing from `pdc setup`
    text = path.read_text()
    assert fmt(text) == text, f"{path.name} is not in canonical form; run pdc fmt --write"
    header = text.split("\nmodel ")[0]
    for line in (f"pdc compile experiments/{path.name} --dry-run", f"pdc run experiments/{path.name}",
                 "pdc setup", "What it shows:", "Measured:"):
        assert line in header, f"{path.name}'s header lacks {line!r}"
    assert pdc_main(["compile", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "compare " in out
    spec = load_spec(path)
    assert spec.models[spec.source_model].ref == "smollm2-135m"
    assert spec.comparison is not None and len(spec.comparison.variants) >= 2
    plan = build_plan(spec)
    assert plan["source"]["params_total"] == 134_515_008
