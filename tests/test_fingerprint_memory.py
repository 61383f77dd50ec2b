"""The fingerprint's calibration loss costs memory bounded by `LOSS_LOGITS_BYTES`, not by the
calibration's blocks x seq_len x vocabulary: as many whole blocks per forward as fit, a block
longer than fits alone cut; the loss over whole blocks is the one-batch loss."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from pdc.emit import fingerprint
from pdc.graph.export import export_model

BLOCKS = torch.randint(3, 98, (4, 12), generator=torch.Generator().manual_seed(0))


def _recording(program):
    shapes = []
    forward = program.forward

    def record(ids):
        shapes.append(tuple(ids.shape))
        return forward(ids)

    program.forward = record
    return shapes


def test_blocks_per_forward_follow_the_bound(monkeypatch):
    program = export_model(make_tiny_model("llama"))
    whole = fingerprint.next_token_loss(program.forward(BLOCKS), BLOCKS)
    shapes = _recording(program)
    monkeypatch.setattr(fingerprint, "LOSS_LOGITS_BYTES", 4 * 2 * 12 * program.arch.vocab)  # two blocks
    assert fingerprint.calibration_loss(program, BLOCKS) == pytest.approx(whole, rel=1e-6)
    assert shapes == [(2, 12), (2, 12)]


def test_a_block_longer_than_the_bound_is_cut(monkeypatch):
    program = export_model(make_tiny_model("llama"))
    monkeypatch.setattr(fingerprint, "LOSS_LOGITS_BYTES", 4 * 5 * program.arch.vocab)  # five tokens
    ep = __import__("pdc.graph.export", fromlist=["seal"]).seal(program)
    shapes = _recording(program)
    fp = fingerprint.program_fingerprint(program, ep, BLOCKS)
    assert shapes[1:] == [(1, 5)] * 4  # after the probe: one cut block per forward
    cut = BLOCKS[:, :5]
    assert fp.calibration_loss == pytest.approx(
        fingerprint.next_token_loss(program.gm(cut).detach(), cut), rel=1e-6)
