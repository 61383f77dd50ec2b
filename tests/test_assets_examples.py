"""The shipped examples check and plan without any asset installed (the dry run needs only the
bundled SmolLM2 config), and say in their header how to run them."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["quickstart", "cut60", "depth", "mlp_sweep"])
def test_example_checks_and_plans_without_assets(name, tmp_path, monkeypatch):
    from pdc.plan.dry_run import build_plan
    from pdc.lang import load_spec

    monkeypatch.setenv("PDC_CACHE", str(tmp_path))  # empty: nothing from `pdc setup`
    path = EXAMPLES / f"{name}.pds"
    header = path.read_text().split("\nmodel ")[0]
    assert f"pdc compile examples/{name}.pds" in header and "pdc setup" in header
    plan = build_plan(load_spec(path))
    assert plan["source"]["params_total"] == 134_515_008  # SmolLM2-135M
    kinds = [s["kind"] for s in plan["stages"]]
    final = plan["final"]
    if name == "quickstart":  # the shape is searched at run time; the measured choice is a candidate
        assert kinds == ["prune", "distill", "evaluate"]
        sizes = [c["sizes"] for c in plan["stages"][0]["search"]["candidates"]]
        assert {"hidden": 576, "mlp": 1408, "heads": 9, "depth": 26} in sizes
        assert plan["stages"][1]["data"] == "gen"
    elif name == "cut60":
        assert kinds == ["correct", "prune", "distill", "evaluate"]
        assert (final["hidden"], final["mlp"], final["depth"], final["heads"]) == (432, 1024, 30, 9)
    elif name == "mlp_sweep":
        assert kinds == ["prune", "evaluate"] and (final["hidden"], final["mlp"], final["depth"]) == (576, 1408, 30)
    else:
        assert kinds == ["prune", "evaluate"]
        assert final["depth"] == 25 and plan["stages"][0]["saliency"]["task"] == "movie_recommendation_local"
        assert plan["stages"][0]["contiguous"] is True


def test_moe_example_checks_and_plans_from_its_config(tmp_path, monkeypatch):
    """examples/moe.pds checks and plans from the tracked examples/tiny-moe/config.json alone
    (no weights, no assets): 8 -> 4 experts per layer, 128 -> 64 neurons per expert, total and
    active parameters per token, and three variants sharing the trained model."""
    from pdc.lang import load_spec
    from pdc.plan.dry_run import build_plan

    monkeypatch.setenv("PDC_CACHE", str(tmp_path))
    path = EXAMPLES / "moe.pds"
    header = path.read_text().split("\nmodel ")[0]
    assert "python examples/tiny_moe.py" in header and "pdc compile examples/moe.pds" in header
    spec = load_spec(path)
    plan = build_plan(spec)
    final = plan["final"]
    assert (final["experts"], final["expert_mlp"], final["top_k"]) == (4, 64, 2)
    assert plan["source"]["params_total"] == 8_066_176
    assert final["params_active"] < final["params_total"] < plan["source"]["params_total"]
    assert final["params_active"] < plan["source"]["params_active"]
    assert [v.name for v in spec.comparison.variants] == ["mass", "output", "random"]
