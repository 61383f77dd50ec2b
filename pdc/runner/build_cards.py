"""Model cards: README.md in every stage's model/, derived from the stage records (the lineage,
the source's identity and the evaluation table). Mixed into `pdc.runner.build.Build`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pdc.emit.fingerprint import model_identity
from pdc.emit.model_card import CardEvaluation, CardSource, ROLES, render_card, write_card
from pdc.errors import PdcError
from pdc.plan.results import EvaluateResult
from pdc.plan.stage_graph import StageRef
from pdc.stages.evaluate import comparison_rows



class BuildCards:
    """The model cards of a build (part of `Build`)."""

    def write_cards(self) -> list[Path]:
        """Write (or refresh) the card of every stage model that exists; a stage whose record
        or upstream records are missing or unreadable gets none (yet)."""
        written = []
        for node in self.graph.nodes.values():
            model_dir = self.out / node.name / "model"
            if node.kind not in ROLES or not (model_dir / "config.json").exists():
                continue
            try:
                lineage = [self.record(n) for n in self.graph.ancestors(node.name) + [node.name]]
            except PdcError:
                continue
            if any(r is None for r in lineage):
                continue
            text = render_card(node.name, str(self.spec.path), self.spec.text, self._card_source(), lineage,
                               self._card_evaluation(node.name))
            written.append(write_card(model_dir, text))
        return written

    def _card_source(self) -> CardSource:
        name = self.spec.source_model
        if name not in self._identities:  # hashed once per invocation
            self._identities[name] = model_identity(self.source_dir(name))
        src = self.spec.models[name]
        return CardSource(name=name, kind=src.kind, ref=src.ref, identity=self._identities[name])

    def _card_evaluation(self, stage: str) -> Optional[CardEvaluation]:
        """The build's comparison table with `stage`'s column marked (None before evaluation)."""
        for node in self.graph.of_kind("evaluate"):
            try:
                record = self.record(node.name)
            except PdcError:
                return None
            if record is None or not isinstance(record.result, EvaluateResult):
                return None
            columns, rows = comparison_rows(record.result)
            column = next((label for label, ref in node.inputs.items()
                           if ref == StageRef(stage) and label in record.result.models), None)
            return CardEvaluation(columns=columns, rows=rows, column=column, limit=record.result.limit)
        return None
