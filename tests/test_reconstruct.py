"""Reconstruction after the cut (`reconstruct=lsq(damp=...)`, passes/reconstruct_outputs.py).

- the solve: keep-all returns the columns bit for bit; a refit never fits the calibration
  outputs worse than plain slicing (the ridge objective at W_K is plain slicing's error), and a
  huge damping gives plain slicing back;
- the pass: keep-all leaves every parameter bit for bit on every family; moments come from the
  importance pass (one calibration forward either way);
- every family: a student pruned with reconstruction emits a checkpoint, `.pt2` and ONNX that
  agree with the program (emit_pruned loads each back and compares), and its logits on the
  calibration blocks are closer to the source's than plain slicing's;
- the lock records it and `pdc check` reproduces it.
"""

from __future__ import annotations

import json

import pytest
import torch

from family_sources import FAMILIES, SIZES, checkpoint_fixtures
from graph_exports import assert_same_logits, load_hf
from pdc.emit.pruned import emit_pruned
from pdc.graph import importance as imp_mod
from pdc.graph.manager import PassManager
from pdc.lang.settings import ImportanceConfig, ReconstructConfig
from pdc.passes.reconstruct_outputs import ReconstructOutputs, refit
from pdc.stages.prune_width import prune_program

IDS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))
# Each family costs an export and two prunes (and ONNX seconds more): by default llama with
# `.pt2` and ONNX and phi3 (fused q|k|v and gate|up) with its checkpoint; with -m slow every
# family in tests/test_families.py emits all three.
CASES = [("llama", True), ("phi3", False)] + [
    pytest.param(f, True, marks=pytest.mark.slow) for f in FAMILIES if f != "llama"]
IDENTITY = [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


def _moments(seed: int = 0, n: int = 400, units: int = 12) -> torch.Tensor:
    """Second moments of correlated inputs (so kept units can stand in for pruned ones)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) @ torch.randn(4, units, generator=g) + 0.1 * torch.randn(n, units, generator=g)
    return x.T.double() @ x.double()


def test_refit_keep_all_is_the_columns():
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    new, plain, after = refit(w, _moments(), torch.arange(12), damp=0.01)
    assert torch.equal(new, w.double()) and plain == after == 0.0


def test_refit_fits_better_than_slicing_and_damping_returns_to_it():
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    gram, keep = _moments(), torch.tensor([0, 2, 3, 7, 8, 11])
    _, plain, after = refit(w, gram, keep, damp=0.01)
    assert after < 0.5 * plain  # correlated inputs: the kept units carry most of what was cut
    _, plain_small, exact = refit(w, gram, keep, damp=0.0)
    assert exact <= after + 1e-12
    new, _, damped = refit(w, gram, keep, damp=1e9)
    assert damped == pytest.approx(plain, rel=1e-6)
    torch.testing.assert_close(new, w.double()[:, keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", IDENTITY)
def test_keep_all_pass_is_the_identity_on_every_family(family, programs):
    """Keep-all reconstruction (moments from a real calibration pass) changes no bit."""
    program = programs(family)
    scores = imp_mod.compute(program, CALIB, ImportanceConfig(), grams=True)
    before = {k: v.clone() for k, v in program.state_dict().items()}
    logits = program.forward(IDS)
    a, layers = program.arch, range(program.arch.layers)
    keep = {("mlp", i): torch.arange(a.mlp) for i in layers} | {("heads", i): torch.arange(a.heads) for i in layers}
    PassManager([ReconstructOutputs(keep, scores.grams, damp=0.01)]).run(program)
    assert all(torch.equal(before[k], v) for k, v in program.state_dict().items())
    assert torch.equal(program.forward(IDS), logits)


def test_moments_cost_no_extra_forward(monkeypatch):
    """The moments are taken at the importance taps: one pass over the calibration blocks."""
    from graph_exports import exported

    runs = []
    real = imp_mod.TapProgram.run
    monkeypatch.setattr(imp_mod.TapProgram, "run", lambda self, ids: (runs.append(len(ids)), real(self, ids)))
    program = exported("llama")
    scores = imp_mod.compute(program, CALIB, ImportanceConfig(), batch_size=4, grams=True)
    assert sum(runs) == len(CALIB) and len(runs) == 2
    mlp = scores.grams[("mlp", 0)]
    assert mlp.shape == (program.arch.mlp,) * 2 and mlp.dtype == torch.float64
    assert torch.allclose(mlp, mlp.T)
    plain = imp_mod.compute(program, CALIB, ImportanceConfig(), batch_size=4)
    assert torch.equal(plain.mlp[0], scores.mlp[0])  # the scores do not depend on taking moments


source_dirs, programs = checkpoint_fixtures(FAMILIES, SIZES, "families")


@pytest.mark.parametrize("family,deploy", CASES)
def test_reconstructed_student_emits_what_the_program_computes(family, deploy, source_dirs, programs, tmp_path):
    target = FAMILIES[family][1]
    source = programs(family)
    calib_logits = source.forward(CALIB)
    plain = programs(family)
    prune_program(plain, CALIB, target, ImportanceConfig(), progress=False)
    program = programs(family)
    _, report = prune_program(program, CALIB, target, ImportanceConfig(), progress=False,
                              reconstruct=ReconstructConfig(damp=0.01))
    assert program.arch == plain.arch and program.kept == plain.kept  # same cut, other values
    errors = program.meta["reconstruct"]
    assert errors and all(e["refit"] < e["plain"] for e in errors.values())
    assert report["passes"][0].name == "reconstruct_outputs"
    emitted = emit_pruned(program, tmp_path, source_dirs(family), None, deploy=deploy)
    if deploy:
        assert {"program.pt2", "model.onnx"} <= set(emitted.artifacts)
    assert_same_logits(load_hf(tmp_path / "model"), program, IDS)

    def gap(p):
        return float((p.forward(CALIB) - calib_logits).pow(2).mean())

    assert gap(program) < gap(plain)


RECONSTRUCT_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune width { mlp=64 heads=2 importance=activation(samples=8, seq_len=32) reconstruct=lsq(damp=0.01) }
"""


def test_lock_records_reconstruction_and_check_reproduces_it(tmp_path, capsys):
    """The prune stage as `pdc run` runs it (without the .pt2/ONNX files, as `pdc check` does)
    writes the reconstruction into the lock (method, damping, the calibration output errors plain
    and refit); `pdc check` recompiles the same student, and fails on a lock whose refit differs."""
    from pdc.cli import main as pdc_main
    from pdc.lang import load_spec
    from pdc.runner.build import Build
    from tiny_builds import make_project

    spec_path = make_project(tmp_path, RECONSTRUCT_SPEC)
    build = Build(load_spec(spec_path), tmp_path / "build" / "tiny", progress=False, artifacts=False)
    build.run_stage("prune")
    build.write_lock("prune")
    lock = json.loads((tmp_path / "tiny.prune.lock.json").read_text())
    rec = lock["reconstruct"]
    assert (rec["method"], rec["damp"]) == ("lsq", 0.01)
    assert set(rec["error"]) == {"mlp", "heads"}
    assert all(e["refit"] < e["plain"] and e["layers"] == 4 for e in rec["error"].values())
    stage = json.loads((tmp_path / "build" / "tiny" / "prune" / "stage.json").read_text())
    assert "reconstruct_solve" in json.dumps(stage)
    capsys.readouterr()
    assert pdc_main(["check", str(spec_path)]) == 0
    rec["error"]["mlp"]["refit"] *= 2
    bad = tmp_path / "altered.lock.json"
    bad.write_text(json.dumps(lock))
    assert pdc_main(["check", str(spec_path), "--lock", str(bad)]) == 1
    assert "reconstruct" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_refit_the_student_one_process_does(tmp_path):
    """`--nproc-per-node 2`: each rank sums the moments of its calibration batches, the sums are
    all-reduced and rank 0 hands them to the stage; the lock equals one process's (numbers within
    the lock's tolerance: float64 sums in another order)."""
    import os
    from unittest import mock

    from pdc.cli import main as pdc_main
    from pdc.emit.lock import compare_locks, read_lock
    from tiny_builds import make_project

    locks = []
    for nproc in (1, 2):
        root = tmp_path / str(nproc)
        spec = make_project(root, RECONSTRUCT_SPEC)
        with mock.patch.dict(os.environ, {"PDC_CACHE": str(root / "cache")}):
            assert pdc_main(["run", str(spec), "--nproc-per-node", str(nproc)]) == 0
        locks.append(read_lock(root / "tiny.prune.lock.json"))
    assert (tmp_path / "2" / "build" / "tiny" / "prune.work" / "grams.pt").exists()
    assert compare_locks(locks[0], locks[1]) == []
