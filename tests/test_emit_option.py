"""`emit=` in a prune block: the outputs left out are neither written nor verified, the lock names
them, `pdc check` compares that, and `pdc fmt` keeps the list as written."""

from __future__ import annotations

import json

import pytest

from pdc.cli import main as pdc_main
from pdc.emit.lock import read_lock
from tiny_builds import PRUNE_SPEC, make_project

pytestmark = pytest.mark.filterwarnings("ignore")

SPEC = PRUNE_SPEC.replace("seq_len=32) }", "seq_len=32) emit=hf,pt2,lock }")


def test_emit_leaves_out_onnx_and_the_lock_says_so(tmp_path, capsys):
    spec = make_project(tmp_path, SPEC)
    assert pdc_main(["compile", str(spec)]) == 0
    out = tmp_path / "build" / "tiny" / "prune"
    assert (out / "model" / "config.json").exists() and (out / "program.pt2").exists()
    assert not list(out.glob("model.onnx*"))
    stage = json.loads((out / "stage.json").read_text())["result"]
    assert sorted(stage["artifacts"]) == ["model", "program.pt2"]  # the ones written were verified
    lock = read_lock(tmp_path / "tiny.prune.lock.json")
    assert lock["not_emitted"] == {"files": ["model.onnx"], "verified": False}
    capsys.readouterr()
    assert pdc_main(["check", str(spec)]) == 0
    assert "lock matches" in capsys.readouterr().out

    spec.write_text(PRUNE_SPEC)  # every output: the committed lock no longer matches
    assert pdc_main(["check", str(spec)]) == 1
    assert "not_emitted" in capsys.readouterr().out


def test_fmt_keeps_the_list(tmp_path, capsys):
    path = tmp_path / "s.pds"
    path.write_text(SPEC.replace("emit=hf,pt2,lock", "emit=hf , pt2,lock"))
    capsys.readouterr()
    assert pdc_main(["fmt", str(path)]) == 0
    assert "emit=hf,pt2,lock }" in capsys.readouterr().out
