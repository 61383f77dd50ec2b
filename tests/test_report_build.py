"""`pdc.runner.report.write_report` on build directories that `pdc run` made (tests/tiny_builds.py):
complete width and depth builds, partial and damaged copies of them, and an empty one."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pdc.errors import PdcError
from pdc.plan.results import read_record
from pdc.runner.report import LOSS_PNG, NOT_RUN, write_report


def _copy(build: Path, tmp_path: Path) -> Path:
    dest = tmp_path / build.name
    shutil.copytree(build, dest)
    return dest


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_full_report_has_every_stage_from_its_record(width_build, tmp_path):
    """Every stage's numbers, read back from its typed record, appear in both files; the HTML
    references no external file."""
    b = _copy(width_build, tmp_path)
    prune = read_record(b / "prune").result
    distill = read_record(b / "distill").result
    evaluate = read_record(b / "evaluate").result
    md_path, html_path = write_report(b)
    md, page = md_path.read_text(), html_path.read_text()
    for text in (md, page):
        assert "prune width { hidden=48 mlp=64" in text.replace("&quot;", '"')
        assert f"{prune.params_after:,}" in text and "matches the plan" in text
        assert f"{distill.val_kl_end:.4g}" in text and f"{distill.teacher_val_loss:.4g}" in text
        assert f"{evaluate.models['distilled'].perplexity:.3f}" in text
        assert "tiny_mc (0-shot) acc %" in text
        assert NOT_RUN not in text
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert header.index("teacher") < header.index("corrected teacher") < header.index("pruned") < header.index("distilled")
    pngs = _embedded_pngs(page)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)  # importance + losses
    assert "prune/importance.png" in md and LOSS_PNG in md
    assert "`prune/program.pt2`" in md and "`prune/model.onnx`" in md
    assert not re.search(r'src="(?!data:)', page)
    assert not list(b.glob("*.tmp"))


def test_depth_report_shows_the_chosen_metric(depth_build, tmp_path):
    """The depth section names the dropped layers, the saliency task and the metric of the model
    with the chosen layers removed, as the depth stage recorded them."""
    b = _copy(depth_build, tmp_path)
    sal = read_record(b / "prune").result.saliency
    assert sal.chosen is not None and sal.baseline is not None
    md = write_report(b)[0].read_text()
    assert "prune/saliency.png" in md and str(list(sal.dropped_layers)) in md and "tiny_mc" in md
    row = next(line for line in md.splitlines() if line.startswith("| metric, chosen layers removed"))
    assert f"{sal.chosen:.4g}" in row and "-" not in row.split("|")[2]


def test_empty_build_dir_reports_not_run(tmp_path):
    """Nothing run yet: still two files, every part says it did not run, no image."""
    b = tmp_path / "empty"
    b.mkdir()
    md_path, html_path = write_report(b)
    md = md_path.read_text()
    assert md.count(NOT_RUN) >= 3
    assert "![" not in md and "base64" not in html_path.read_text()


def test_partial_and_damaged_records_are_named_not_fatal(width_build, tmp_path):
    """A missing distill stage and a truncated evaluation record do not stop the report; the
    unreadable record is named with its cause."""
    b = _copy(width_build, tmp_path)
    shutil.rmtree(b / "distill")
    (b / "evaluate" / "stage.json").write_text('{"version": 2, "result": {"models": ')
    md = write_report(b)[0].read_text()
    assert "distillation " + NOT_RUN in md and "evaluation " + NOT_RUN in md
    assert "evaluate:" in md and "rerun the stage" in md


def test_record_of_another_version_is_rejected_by_the_reader(width_build, tmp_path):
    """A record whose fields do not match this pdc's result type fails to read (one line, naming
    the field) instead of rendering as '-'."""
    b = _copy(width_build, tmp_path)
    path = b / "prune" / "stage.json"
    data = json.loads(path.read_text())
    data["result"]["saliency_renamed"] = data["result"].pop("saliency")
    path.write_text(json.dumps(data))
    with pytest.raises(PdcError, match="saliency_renamed"):
        read_record(b / "prune")


def test_missing_build_dir_is_one_line_error(tmp_path):
    with pytest.raises(PdcError, match="does not exist"):
        write_report(tmp_path / "nope")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["version", "result", "result_type", "key", "kind", "seconds", "models", "stages",
                         "source", "final", "params_total", "step", "loss", "x"]),
        inner, max_size=4),
    max_leaves=12,
)
_FILES = ["plan.json", "stages.json", "prune/stage.json", "correct/stage.json", "distill/stage.json",
          "evaluate/stage.json", "distill/log.jsonl"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_FILES), _json_values, max_size=len(_FILES)))
@example({"plan.json": {"stages": None}})
def test_report_survives_any_json_shape(tmp_path_factory, contents):
    """Whatever JSON the stage files hold, write_report returns two files and does not raise."""
    b = tmp_path_factory.mktemp("junk")
    for rel, value in contents.items():
        (b / rel).parent.mkdir(parents=True, exist_ok=True)
        (b / rel).write_text(json.dumps(value))
    md, page = write_report(b)
    assert md.read_text().startswith("# pdc report") and page.read_text().startswith("<!DOCTYPE html>")


def test_report_of_a_planned_build(tmp_path, monkeypatch):
    """A build dir holding only the plan (`pdc.plan.dry_run` + spec.pds) renders every planned
    number, lists every stage as not run, and marks a stage folder in progress."""
    from pdc.lang import load_spec
    from pdc.plan.dry_run import build_plan

    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))
    # a fixed shape: its plan holds the final numbers (the quickstart's shape is searched at run time)
    spec_path = Path(__file__).resolve().parents[1] / "examples" / "cut60.pds"
    plan = build_plan(load_spec(spec_path))
    b = tmp_path / "quickstart"
    b.mkdir()
    (b / "plan.json").write_text(json.dumps(plan, default=str))
    (b / "spec.pds").write_text(spec_path.read_text())
    md = write_report(b)[0].read_text()
    assert "could not read" not in md
    assert f"{plan['final']['params_total']:,}" in md and f"mlp={plan['final']['mlp']}" in md
    for stage in ("correct", "prune", "distill", "evaluate"):
        assert f"| {stage} | {NOT_RUN} | - |" in md
    (b / "correct.tmp").mkdir()  # the runner's in-progress folder
    assert "| correct | started, not finished | - |" in write_report(b)[0].read_text()
