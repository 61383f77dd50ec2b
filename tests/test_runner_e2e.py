"""End to end on a tiny llama: `pdc run` through every stage, skipping, and `pdc check`.

The build is the session's shared `width_build` (tests/tiny_builds.py; it is the expensive part)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pdc.cli import main as pdc_main
from pdc.lang import load_spec
from pdc.plan.results import read_record
from pdc.runner.build import Build
from pdc.stages.evaluate import comparison_rows
from tiny_builds import WIDTH_SPEC

@pytest.fixture(scope="module")
def project(width_build):
    """The folder of the shared tiny width build (spec `tiny.pds`, build `build/tiny/`)."""
    return width_build.parent.parent


def test_run_writes_every_stage(project):
    """After `pdc run` every stage has its record, and what the build says agrees with itself: each
    record holds the key the spec gives its stage now, the lock pins the kept indices the prune
    stage recorded and wrote, the report's evaluation table is the evaluate record's, and the
    models evaluated are the ones the stages wrote."""
    build_dir = project / "build" / "tiny"
    build = Build(load_spec(project / "tiny.pds"), build_dir)
    for stage in ("correct", "prune", "distill", "evaluate"):
        assert read_record(build_dir / stage).key == build.stage_key(stage), stage
        assert build.done(stage)
    assert not list(build_dir.glob("*.tmp"))
    prune = read_record(build_dir / "prune").result
    kept = json.loads(json.dumps(prune.kept))
    assert json.loads((project / "tiny.prune.lock.json").read_text())["kept_indices"] == kept
    assert json.loads((build_dir / "prune" / "kept_indices.json").read_text()) == kept
    assert build.lock("prune")["kept_indices"] == kept
    hidden = kept["hidden"]
    assert len(hidden) == prune.arch_after["hidden"] and hidden == sorted(set(hidden))
    results = read_record(build_dir / "evaluate").result
    assert set(results.models) == {"teacher", "corrected teacher", "pruned", "distilled"}
    columns, rows = comparison_rows(results)
    report = (build_dir / "report.md").read_text()
    assert "| " + " | ".join(["metric", *columns]) + " |" in report
    assert rows and all("| " + " | ".join(row) + " |" in report for row in rows)
    assert (build_dir / "report.html").exists()
    for label, ref in build.graph.node("evaluate").inputs.items():
        assert Path(results.models[label].path).resolve() == build.model_dir(ref).resolve(), label


def test_training_stages_read_the_token_shards_in_place(project):
    """No copy of the corpus in a work dir: stage.json names views on the shards in the cache,
    and the correction and distillation (same corpus, same tokenizer) read the same files."""
    build = project / "build" / "tiny"
    assert not list(build.rglob("data.pt"))
    views = {}
    for stage in ("correct", "distill"):
        data = json.loads((build / f"{stage}.work" / "stage.json").read_text())["data"]
        views[stage] = data
        assert (Path(data["train"]["dir"]) / "tokens.json").exists()
        assert data["train"]["range"][1] == data["val"]["range"][0]  # held-out tail after the training blocks
    assert views["correct"]["train"]["dir"] == views["distill"]["train"]["dir"]


def test_pruned_checkpoint_matches_the_plan(project):
    """The built student's parameter count equals the dry-run prediction."""
    from transformers import AutoModelForCausalLM

    build = project / "build" / "tiny"
    plan = json.loads((build / "plan.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(build / "prune" / "model")
    assert sum(p.numel() for p in model.parameters()) == plan["final"]["params_total"]


def test_distillation_lowered_the_validation_kl(project):
    """Distillation moves the student towards the teacher on held-out blocks."""
    metrics = read_record(project / "build" / "tiny" / "distill").result
    assert metrics.val_kl_end < metrics.val_kl_start
    corrected = read_record(project / "build" / "tiny" / "correct").result
    # The student is taught by the corrected teacher: its loss is the reference.
    assert metrics.teacher_val_loss == pytest.approx(corrected.val_loss_end, rel=1e-6)


def test_rerun_skips_up_to_date_stages(project, capsys):
    """Unchanged inputs and settings: every stage is skipped."""
    assert pdc_main(["run", str(project / "tiny.pds")]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 4


def test_changed_setting_reruns_only_downstream(project, capsys):
    """Changing the evaluation reruns evaluate alone; the training stages stay skipped."""
    spec = project / "tiny2.pds"
    spec.write_text(WIDTH_SPEC.replace("perplexity(corpus)", "perplexity(corpus) seq_len=16"))
    shutil.copytree(project / "build" / "tiny", project / "build" / "tiny2")
    assert pdc_main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 3
    assert "evaluate: running" in out


def test_check_passes_then_fails_on_an_altered_lock(project, capsys):
    """`pdc check` accepts an unchanged recompile and names axis and layer of an altered index."""
    lock_path = project / "tiny.prune.lock.json"
    assert pdc_main(["check", str(project / "tiny.pds")]) == 0
    lock = json.loads(lock_path.read_text())
    kept = lock["kept_indices"]["layers"]["2"]["mlp"]
    kept[0] = next(i for i in range(96) if i not in kept)
    bad = project / "altered.lock.json"
    bad.write_text(json.dumps(lock))
    capsys.readouterr()
    assert pdc_main(["check", str(project / "tiny.pds"), "--lock", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "layer 2 mlp" in out


def test_check_tolerance_from_the_command_line_and_the_spec(project, capsys):
    """A numeric drift beyond the default tolerance fails `pdc check`; the same drift passes when
    `--rtol` or the prune block's `check_rtol=` allows it."""
    lock = json.loads((project / "tiny.prune.lock.json").read_text())
    lock["numeric"]["probe_loss"] *= 1.001  # 1e-3 relative: above the 1e-4 default
    drifted = project / "drifted.lock.json"
    drifted.write_text(json.dumps(lock))
    spec = str(project / "tiny.pds")
    assert pdc_main(["check", spec, "--lock", str(drifted)]) == 1
    assert "probe_loss" in capsys.readouterr().out
    assert pdc_main(["check", spec, "--lock", str(drifted), "--rtol", "1e-2"]) == 0
    tolerant = project / "tolerant.pds"
    tolerant.write_text(WIDTH_SPEC.replace("prune width {", "prune width { check_rtol=1e-2"))
    shutil.copytree(project / "build" / "tiny", project / "build" / "tolerant")
    assert pdc_main(["check", str(tolerant), "--lock", str(drifted)]) == 0
