"""Inference speed of the teacher against its students: `pdc bench` on a `pdc run` build, its
JSON, the report's speed section, the claims over speed, and the median intervals.

Speed itself is never asserted here (a timed unit test on a shared machine is noise): the tests
check that every figure is there, derived from the recorded repeats as documented, and that the
sizes and memory figures are the models' own. Whether the measurement is honest (a model against
itself gives 1.0 within its interval) is bench/bench_speed_selfcheck.py's job."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from pdc.cli import main as pdc_main
from pdc.plan.results import read_record
from pdc.stages.speed import interval_coverage, median, median_interval
from tiny_builds import PRUNE_SPEC, make_project, run_project

REPEATS = 2
MEASURES = ["torch prefill@128", "torch prefill@512", "torch decode@b1", "torch decode@b16",
            "onnx prefill@128", "onnx prefill@512"]


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    """`pdc run` of the tiny prune spec, then `pdc bench --json` on it: (build dir, the JSON)."""
    root = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("PDC_CACHE", str(root / "cache"))  # the teacher's ONNX export lands here
    try:
        build = run_project(root / "project", PRUNE_SPEC)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert pdc_main(["bench", str(root / "project" / "tiny.pds"), "--json", "--repeats", str(REPEATS),
                             "--threads", "1"]) == 0
    finally:
        mp.undo()
    return build, json.loads(out.getvalue())


def test_bench_json_has_every_figure(benched):
    build, data = benched
    assert data["teacher"] == "teacher" and list(data["models"]) == ["teacher", "prune"]
    assert data["threads"] == 1 and data["hardware"] and data["device"] == "cpu"
    assert data["repeats"] == REPEATS and data["precision"] == "fp32"
    assert any("prefill only" in n for n in data["notes"])  # ONNX without a KV cache: said, not hidden
    for label, m in data["models"].items():
        assert list(m["measures"]) == MEASURES, label
        for name, measure in m["measures"].items():
            seconds = measure["seconds"]
            assert len(seconds) == REPEATS and all(s > 0 for s in seconds)
            rates = [measure["tokens"] / s for s in seconds]
            est = measure["tokens_per_s"]
            assert est["median"] == pytest.approx(median(rates))
            assert est["low"] == pytest.approx(min(rates)) and est["high"] == pytest.approx(max(rates))  # n < 6
        assert m["measures"]["torch decode@b16"]["tokens"] == 16 * data["decode_tokens"]
        assert m["measures"]["torch prefill@512"]["tokens"] == 512
    teacher, student = data["models"]["teacher"], data["models"]["prune"]
    assert data["models"]["teacher"]["speedup"] == {}
    for name in MEASURES:  # round i of the teacher over round i of the student
        ratios = [t / s for t, s in zip(teacher["measures"][name]["seconds"], student["measures"][name]["seconds"])]
        assert student["speedup"][name]["median"] == pytest.approx(median(ratios))
    assert Path(student["onnx"]) == build / "prune" / "model.onnx"
    assert teacher["onnx"].endswith(".onnx") and Path(teacher["onnx"]).exists()


def test_bench_sizes_and_memory_are_the_models(benched):
    build, data = benched
    prune = read_record(build / "prune").result
    assert data["models"]["teacher"]["params"] == prune.params_before
    assert data["models"]["prune"]["params"] == prune.params_after
    for label, path in (("teacher", build.parent.parent / "tiny"), ("prune", build / "prune" / "model")):
        cfg = json.loads((path / "config.json").read_text())
        m = data["models"][label]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        # fp32 keys and values of every layer for one position of one sequence
        assert m["kv_bytes_per_token"] == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
        assert m["weights_bytes"] == 4 * m["params"]
        positions = max(data["batches"]) * (data["context"] + data["decode_tokens"])
        assert m["peak_bytes"] == m["weights_bytes"] + m["kv_bytes_per_token"] * positions
    assert data["models"]["prune"]["flops_per_token"] < data["models"]["teacher"]["flops_per_token"]


def test_bench_result_in_the_report(benched):
    build, data = benched
    assert json.loads((build / "bench" / "speed.json").read_text())["speed"]["models"].keys() == data["models"].keys()
    report = (build / "report.md").read_text()
    section = report[report.index("## Speed"):]
    row = next(line for line in section.splitlines() if line.startswith("| prune |"))
    ratio = data["models"]["prune"]["params"] / data["models"]["teacher"]["params"]
    assert f"| {ratio:.3f}x |" in row  # the parameter ratio beside the speed-ups
    assert "torch decode@b1 speed-up" in section and "TTFT@128 (ms)" in section
    assert (build / "speed.png").stat().st_size > 0 and "speed.png" in section


def test_bench_before_the_students_exist(tmp_path, capsys):
    spec = make_project(tmp_path, PRUNE_SPEC)
    capsys.readouterr()  # the checkpoint writer's progress
    assert pdc_main(["bench", str(spec)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"pdc: error: bench: stage 'prune' has not run (or its inputs changed): run `pdc run {spec}` first"


@pytest.mark.parametrize("n, k", [(3, 1), (7, 1), (9, 2), (15, 4), (21, 6)])
def test_median_interval_order_statistics(n, k):
    values = [float(10 * i) for i in range(n)][::-1]  # unsorted on purpose
    mid, low, high = median_interval(values)
    assert (mid, low, high) == (median(values), 10.0 * (k - 1), 10.0 * (n - k))
    assert interval_coverage(n) >= 0.95 or n < 6


SPEED_COMPARE = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune width { hidden=48 mlp=64 importance=magnitude }
evaluate with lm_eval { perplexity(corpus) limit=2 speed=true }

compare shape {
  variant width {}
  variant depth { prune depth { depth=2 contiguous=true saliency=loss(corpus, samples=4, seq_len=32) } }
  expect depth beats width on decode_speed
  expect depth beats width on prefill_speed
}
"""


@pytest.mark.slow
def test_evaluate_speed_and_speed_claims(tmp_path, monkeypatch):
    """`speed=true` times the teacher against the pruned student inside `pdc run`; the
    comparison judges `expect ... on decode_speed` from the two variants' measurements."""
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))
    out = run_project(tmp_path, SPEED_COMPARE)
    for variant in ("width", "depth"):
        speed = read_record(out / variant / "evaluate").result.speed
        assert list(speed.models) == ["teacher", "pruned"] and set(speed.models["pruned"].speedup) == set(MEASURES)
        assert "## Speed" in (out / variant / "report.md").read_text()
    text = (out / "comparison.md").read_text()
    for claim in ("depth beats width on decode_speed", "depth beats width on prefill_speed"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {claim} |"))
        assert "speed-up ratio" not in row or "x" in row
        assert any(o in row for o in ("**holds**", "**does not hold: the opposite is measured**",
                                      "**not shown: not significant at 95%**")), row
        assert "bootstrap over rounds" in row
    # `pdc bench` on the comparison: the teacher and both students in one session; the claims are
    # then judged from it, paired by round, and the comparison report shows its tables
    assert pdc_main(["bench", str(tmp_path / "tiny.pds"), "--repeats", "3"]) == 0
    text = (out / "comparison.md").read_text()
    speed = text[text.index("## Speed"):]
    assert "| width/prune |" in speed and "| depth/prune |" in speed
    for claim in ("depth beats width on decode_speed", "depth beats width on prefill_speed"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {claim} |"))
        assert "paired over 3 rounds of one `pdc bench` session (75.0% interval of the median)" in row


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_bench_usage_errors(tmp_path, capsys, args, message):
    spec = tmp_path / "x.pds"
    spec.write_text(PRUNE_SPEC)
    assert pdc_main(["bench", str(spec), *args]) == 2
    assert capsys.readouterr().err.strip() == f"pdc: error: {message}"
