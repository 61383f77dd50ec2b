"""The evaluate stage: the harness, its settings and tasks, perplexity on declared data."""

from __future__ import annotations

from typing import Optional

from pdc.lang import ast
from pdc.lang.check_settings import (Bad, CheckerBase, describe_value, head_span, read_bool, read_enum, read_int,
                                     suggest)
from pdc.lang.checked import EvaluateStage
from pdc.lang.diagnostics import Note
from pdc.lang.settings import EvalConfig, EvalTask
from pdc.lang.sources import local_path


class EvaluateRules(CheckerBase):
    def evaluate(self, st: ast.EvaluateStmt) -> Optional[EvaluateStage]:
        if st.harness.value != "lm_eval":
            self.error(f"unknown evaluation harness '{st.harness.value}': expected lm_eval"
                       + suggest(st.harness.value, ["lm_eval"]), st.harness.span)
        got = self.settings(
            st.block.settings,
            {"limit": read_int(1), "seq_len": read_int(1), "tasks_dir": self.tasks_dir, "allow_code_execution": read_bool,
             "precision": read_enum("fp32", "bf16"), "speed": read_bool},
            "evaluate",
        )
        tasks: list[EvalTask] = []
        seen: dict[str, ast.Entry] = {}
        perplexity: list[str] = []
        for e in st.block.entries:
            v = e.value
            name = v.value if isinstance(v, ast.Name) else v.name.value
            if name in seen:
                self.error(f"task '{name}' listed twice", e.span, Note("first listed here", seen[name].span))
                continue
            seen[name] = e
            if name == "perplexity":
                args = v.positional if isinstance(v, ast.Call) else ()
                if not args or not all(isinstance(a, ast.Name) for a in args) or (isinstance(v, ast.Call) and v.keywords):
                    self.error("perplexity(...) takes the names of data declarations, e.g. perplexity(heldout, news)",
                               e.span)
                    continue
                named: dict[str, ast.Name] = {}
                for arg in args:
                    if arg.value in named:
                        self.error(f"perplexity on '{arg.value}' listed twice", arg.span,
                                   Note("first listed here", named[arg.value].span))
                        continue
                    named[arg.value] = arg
                    ref = self.data_ref(arg)
                    if ref is not None:
                        perplexity.append(ref)
                continue
            shots = 0
            if isinstance(v, ast.Call):
                got_shots = self.call_args(v, ["shots"], {"shots": read_int(0)}, f"task {name}")
                shots = got_shots.get("shots", (0,))[0]
            tasks.append(EvalTask(name, shots))
        if not st.block.entries:
            self.error("evaluate lists no tasks (e.g. winogrande(5) or perplexity(DATA))", head_span(st))
        cfg = EvalConfig(
            tasks=tuple(tasks), perplexity_data=tuple(perplexity),
            **{k: got[k][0] for k in ("limit", "seq_len", "allow_code_execution", "precision", "speed") if k in got},
        )
        return EvaluateStage(cfg, got.get("tasks_dir", (None,))[0], st.harness.value, span=st.span)

    def tasks_dir(self, v: ast.Value, key: str) -> str:
        if isinstance(v, ast.Name) and v.value == "builtin":
            return "builtin"
        if isinstance(v, ast.Str):
            path = local_path(v.value, self.base_dir)
            if not path.is_dir():
                raise Bad(f"tasks_dir not found: {path}", v.span)
            return str(path)
        raise Bad(f'tasks_dir expects a path string or builtin, got {describe_value(v)}', v.span)
