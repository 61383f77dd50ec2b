"""`pdc run` on a spec with a `compare` block: every variant built, equal stages shared, one
comparison report with intervals."""

from __future__ import annotations

import os

import pytest

from pdc.cli import main as pdc_main
from pdc.lang import load_spec
from pdc.plan.results import read_record
from pdc.runner.comparison_report import Variant, differences
from pdc.runner.stats import format_difference, verdict
from tiny_builds import COMPARE_SPEC, make_project


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    spec = make_project(root, COMPARE_SPEC, "cmp")
    assert pdc_main(["run", str(spec)]) == 0
    return spec, root / "build" / "cmp"


def test_every_variant_is_built_and_equal_stages_are_shared(compared):
    """Teacher correction is the same in both variants: built once, linked from the second.
    Pruning differs (importance), so it and everything after it are built per variant."""
    _, build = compared
    a, b = build / "activation", build / "random"
    assert not (a / "correct").is_symlink() and (b / "correct").is_symlink()
    assert os.path.realpath(b / "correct") == os.path.realpath(a / "correct")
    for stage in ("prune", "distill", "evaluate"):
        assert not (b / stage).is_symlink()
    ka = read_record(a / "prune").result.kept
    kb = read_record(b / "prune").result.kept
    assert ka["hidden"] != kb["hidden"]  # activation and random choose different channels
    assert read_record(a / "prune").result.importance == "activation"
    assert read_record(b / "prune").result.importance == "random"


def test_comparison_report_compares_with_intervals(compared):
    spec_path, build = compared
    md = (build / "comparison.md").read_text()
    assert "| activation | (as written)" in md and "| random | prune.importance" in md
    assert "difference to activation" in md
    assert (build / "comparison_losses.png").read_bytes().startswith(b"\x89PNG")
    assert (build / "comparison_scores.png").read_bytes().startswith(b"\x89PNG")
    html = (build / "comparison.html").read_text()
    assert html.count("data:image/png;base64") == 2
    comparison = load_spec(spec_path).comparison
    ref, other = (Variant(v.name, v.changes, build / v.name) for v in comparison.variants)
    diffs = dict(differences(ref, other))
    assert "perplexity ratio" in diffs and "tiny_mc acc" in diffs
    d = diffs["tiny_mc acc"]
    assert d.low <= d.delta <= d.high
    assert d.method.startswith("McNemar") and d.p_value is not None  # paired on the same items
    assert diffs["perplexity ratio"].method == "paired bootstrap over blocks"
    final = ref.final[1]
    assert len(final.tasks["tiny_mc"].per_item) == final.tasks["tiny_mc"].items
    assert set(final.tasks["tiny_mc"].per_item) <= {0.0, 1.0}
    assert len(final.block_nll) > 0


def test_claims_are_judged_by_their_intervals(compared):
    """Each `expect` gets one row in the report's Claims section, whose outcome is what the
    paired interval of the same metric says (checked here against the difference's own verdict)."""
    spec_path, build = compared
    md = (build / "comparison.md").read_text()
    claims = md.split("## Claims", 1)[1].split("## ", 1)[0]
    comparison = load_spec(spec_path).comparison
    ref, other = (Variant(v.name, v.changes, build / v.name) for v in comparison.variants)
    diffs = dict(differences(other, ref))  # activation against random: the claims' direction
    expected = {"lower perplexity": "holds", "higher perplexity": "does not hold: the opposite is measured",
                "higher": "holds", "lower": "does not hold: the opposite is measured",
                "not significant at 95%": "not shown: not significant at 95%"}
    for text, metric in (("activation beats random on perplexity", "perplexity ratio"),
                         ("activation beats random on tiny_mc", "tiny_mc acc")):
        row = next(line for line in claims.splitlines() if line.startswith(f"| {text} |"))
        assert f"**{expected[verdict(metric, diffs[metric])]}**" in row
        assert format_difference(metric, diffs[metric]) in row


def test_rerun_skips_every_variant(compared, capsys):
    spec, _ = compared
    assert pdc_main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "running" not in out.replace("report", "")
    assert out.count("up to date, skipped") == 8


DEPTH_COMPARE_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune depth { depth=3 contiguous=false saliency=loss(corpus, samples=8, seq_len=32) }
evaluate with lm_eval { tasks_dir="tasks" perplexity(corpus) seq_len=32 limit=3 }

compare layers {
  variant loss {}
  variant task { prune.saliency=task(tiny_mc, shots=0) }
}
"""


def test_depth_saliency_is_tabled_per_layer_and_ranked(tmp_path):
    """Figs. 7/8 in text: every removed layer's metric per variant, the dropped ones marked, and
    the layers that cost the most and the least, all as the depth stages recorded them; a
    variant's perplexity-only evaluation is counted in tokens."""
    spec = make_project(tmp_path, DEPTH_COMPARE_SPEC, "layers")
    assert pdc_main(["run", str(spec)]) == 0
    build = tmp_path / "build" / "layers"
    md = (build / "comparison.md").read_text()
    section = md[md.index("## Depth saliency"):md.index("## Plots")]
    loss = read_record(build / "loss" / "prune").result.saliency
    task = read_record(build / "task" / "prune").result.saliency
    assert len(loss.candidates) == len(task.candidates) == 4  # every single layer of the tiny model
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    for row, c in zip(rows, loss.candidates):
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert cells[0] == str(c.layers[0]) and cells[1].startswith(f"{c.value:.4g}")
        assert cells[1].endswith("(dropped)") == (c.layers[0] in loss.dropped_layers)
        assert cells[2].endswith("(dropped)") == (c.layers[0] in task.dropped_layers)
    worst = max(loss.candidates, key=lambda c: c.value)
    assert f"removing layer {worst.layers[0]} ({worst.value:.4g})" in section
    assert f"`task` (accuracy on {task.items} items of tiny_mc, higher is better" in section
    # `limit` caps the perplexity blocks too; with no task evaluated, the report counts their
    # tokens and speaks of no task items
    report = (build / "loss" / "report.md").read_text()
    assert "items of each task" not in report and "items per task" not in report
    assert f"perplexity over {3 * 32:,} held-out tokens; models scored in fp32" in report
