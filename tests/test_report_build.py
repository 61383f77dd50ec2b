"""`pdc.report.write_report` on synthetic build directories: complete, partial and empty."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdc.errors import PdcError
from pdc.report import LOSS_PNG, NOT_RUN, plot_losses, write_report

SPEC = 'model teacher = builtin("smollm2-135m")\nprune width { hidden=432 mlp=1024 }\n'


def _png(path: Path, color: str = "tab:blue") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [1, 0], color=color)
    fig.savefig(path, dpi=40)
    plt.close(fig)


def _log(path: Path, steps: int, start: float, kl: bool) -> None:
    with open(path, "w") as f:
        for s in range(1, steps + 1):
            rec = {"step": s, "loss": start * math.exp(-s / steps), "lr": 1e-4, "tokens_per_s": 900.0}
            if kl:
                rec["kl"] = rec["loss"]
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 99, "loss": ')  # torn last line of a killed run


def make_build(root: Path, depth: bool = False) -> Path:
    """A build directory shaped like the runner's, with every stage present."""
    b = root / "quickstart"
    for d in ("correct", "prune", "distill", "evaluate"):
        (b / d).mkdir(parents=True)
    (b / "spec.pds").write_text(SPEC)
    src = {"model_type": "llama", "hidden": 576, "mlp": 1536, "heads": 9, "kv_heads": 3, "depth": 30,
           "head_dim": 64, "vocab": 49152, "params_total": 134515008, "params_non_embedding": 106203456}
    fin = dict(src, hidden=432, mlp=1024, params_total=81_000_000, params_non_embedding=59_000_000)
    (b / "plan.json").write_text(json.dumps({
        "spec": str(b / "spec.pds"), "source_model": "teacher", "source_ref": {"kind": "builtin", "ref": "smollm2-135m"},
        "source": src, "final": fin, "flops_seq_len": 256, "flops_per_token_ratio": 0.61,
        "stages": [{"name": n, "kind": n} for n in ("correct", "prune", "distill")]
        + [{"name": "evaluate", "kind": "evaluate", "limit": 300}]}))
    (b / "stages.json").write_text(json.dumps({
        "correct": {"status": "done", "seconds": 61.5}, "prune": {"status": "skipped", "seconds": 12.0},
        "distill": {"status": "done", "seconds": 400.25}, "evaluate": {"status": "done", "seconds": 120.0}}))
    (b / "correct" / "metrics.json").write_text(json.dumps(
        {"kind": "correct", "steps": 20, "tokens": 40960, "val_loss_before": 3.9, "val_loss_after": 3.4,
         "tokens_per_s": 800.0, "wall_s": 60.0}))
    _log(b / "correct" / "log.jsonl", 20, 3.8, kl=False)
    (b / "distill" / "metrics.json").write_text(json.dumps(
        {"kind": "distill", "steps": 300, "tokens": 614400, "val_loss_start": 7.2, "val_loss_end": 4.1,
         "val_kl_start": 3.5, "val_kl_end": 0.8, "teacher_val_loss": 3.4}))
    _log(b / "distill" / "log.jsonl", 300, 3.5, kl=True)
    if depth:
        (b / "prune" / "summary.json").write_text(json.dumps(
            {"layers_before": 30, "layers_after": 25, "dropped_layers": [20, 21, 22, 23, 24], "contiguous": True,
             "saliency": {"kind": "task", "task": "social_iqa_local", "shots": 0}, "metric": "acc",
             "metric_full_model": 0.45, "metric_chosen": 0.41, "params_before": 134515008, "params_after": 116_000_000}))
        _png(b / "prune" / "saliency.png", "tab:red")
    else:
        (b / "prune" / "summary.json").write_text(json.dumps(
            {"params_before": 134515008, "params_after": 81_000_000, "arch": {"hidden": 432, "mlp": 1024},
             "importance": "activation", "calibration_tokens": 16384, "seconds": {"export": 3.2, "emit": 1.0}}))
        _png(b / "prune" / "importance.png", "tab:green")
    (b / "evaluate" / "results.json").write_text(json.dumps({
        "teacher": {"perplexity": 21.5, "tasks": {"social_iqa_local": {"acc": 0.41, "acc_stderr": 0.02, "acc_norm": 0.45, "shots": 0}}},
        "pruned": {"perplexity": 900.0, "tasks": {"social_iqa_local": {"acc": 0.33, "acc_stderr": 0.02, "shots": 0}}},
        "distilled": {"perplexity": 60.25, "tasks": {}}}))
    return b


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_full_report_has_every_section(tmp_path):
    """Every stage's numbers appear in both files; the HTML references no external file."""
    b = make_build(tmp_path)
    md_path, html_path = write_report(b)
    md, page = md_path.read_text(), html_path.read_text()
    for text in (md, page):
        assert "prune width { hidden=432 mlp=1024 }" in text.replace("&quot;", '"')
        assert "134.5M (134,515,008)" in text and "81.0M (81,000,000)" in text
        assert "0.602x" in text  # 81.0M / 134.5M parameters
        assert "6 min 40 s" in text and "9 min 54 s" in text  # distill time, total time
        assert "41.0 ± 2.0" in text and "45.0" in text and "60.25" in text
        assert NOT_RUN not in text
    # Evaluation columns are in teacher / pruned / distilled order.
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert header.index("teacher") < header.index("pruned") < header.index("distilled")
    pngs = _embedded_pngs(page)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)  # importance + losses
    assert "prune/importance.png" in md and LOSS_PNG in md
    assert not re.search(r'src="(?!data:)', page)
    assert not list(b.glob("*.tmp"))


def test_depth_report_shows_saliency(tmp_path):
    b = make_build(tmp_path, depth=True)
    md = write_report(b)[0].read_text()
    assert "prune/saliency.png" in md and "[20, 21, 22, 23, 24]" in md and "social_iqa_local" in md


def test_empty_build_dir_reports_not_run(tmp_path):
    """Nothing run yet: still two files, every part says it did not run, no image."""
    b = tmp_path / "empty"
    b.mkdir()
    md_path, html_path = write_report(b)
    md = md_path.read_text()
    assert md.count(NOT_RUN) >= 3
    assert "![" not in md and "base64" not in html_path.read_text()


def test_partial_and_corrupt_inputs_are_skipped(tmp_path):
    """A missing distill stage and a truncated results.json do not stop the report."""
    b = make_build(tmp_path)
    for f in (b / "distill").iterdir():
        f.unlink()
    (b / "distill").rmdir()
    (b / "evaluate" / "results.json").write_text('{"teacher": {"perplexity": 2')
    md = write_report(b)[0].read_text()
    assert "distillation " + NOT_RUN in md and "evaluation " + NOT_RUN in md
    assert "teacher correction" not in md.split("## Training")[1].split("##")[0].replace("teacher correction ", "")


def test_missing_build_dir_is_one_line_error(tmp_path):
    with pytest.raises(PdcError, match="does not exist"):
        write_report(tmp_path / "nope")


def test_plot_losses_writes_png_only_with_logs(tmp_path):
    png = tmp_path / "l.png"
    assert plot_losses([], None, [], None, png) is False and not png.exists()
    log = [{"step": i, "loss": 1.0 / i, "kl": 0.5 / i} for i in range(1, 50)]
    assert plot_losses([], None, log, {"teacher_val_loss": 0.2}, png) is True
    assert png.read_bytes().startswith(b"\x89PNG")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["step", "loss", "kl", "seconds", "status", "perplexity", "tasks", "acc", "teacher",
                         "source", "final", "params_total", "arch", "dropped_layers", "stages", "x"]),
        inner, max_size=4),
    max_leaves=12,
)
_FILES = ["plan.json", "stages.json", "prune/summary.json", "correct/metrics.json", "distill/metrics.json",
          "evaluate/results.json", "distill/log.jsonl"]


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(_FILES), _json_values, max_size=len(_FILES)))
def test_report_survives_any_json_shape(tmp_path_factory, contents):
    """Whatever JSON the stage files hold, write_report returns two files and does not raise."""
    b = tmp_path_factory.mktemp("junk")
    for rel, value in contents.items():
        (b / rel).parent.mkdir(parents=True, exist_ok=True)
        (b / rel).write_text(json.dumps(value))
    md, page = write_report(b)
    assert md.read_text().startswith("# pdc report") and page.read_text().startswith("<!DOCTYPE html>")


def test_report_reads_the_real_plan_format(tmp_path, monkeypatch):
    """A dry-run build dir (plan.json from pdc.plan + spec.pds) renders every planned number and
    no section falls back to 'could not read' (guards the plan.json contract)."""
    from pdc.plan import build_plan
    from pdc.spec import load_spec

    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))
    spec_path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.pds"
    plan = build_plan(load_spec(spec_path))
    b = tmp_path / "quickstart"
    b.mkdir()
    (b / "plan.json").write_text(json.dumps(plan, default=str))
    (b / "spec.pds").write_text(spec_path.read_text())
    md = write_report(b)[0].read_text()
    assert "could not read" not in md
    assert f"{plan['final']['params_total']:,}" in md and "hidden=432" in md
    for stage in ("correct", "prune", "distill", "evaluate"):
        assert f"| {stage} | {NOT_RUN} | - |" in md
    (b / "correct.tmp").mkdir()  # the runner's in-progress folder
    assert "| correct | started, not finished | - |" in write_report(b)[0].read_text()
