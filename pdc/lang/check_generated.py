"""Data made from other declarations: `generate(...)` (text a model samples) and `mix(...)`.

    data films = jsonl("prompts/films.jsonl")
    data gen   = generate(teacher, prompts=films, tokens=100k, temperature=1, seed=0)
    data mixed = mix(wiki=0.5, gen=0.5)

`generate` names a declared model and a declared corpus of prompts; `mix` names declared corpora
with positive shares (normalised to sum to 1). A name must be declared above its use, so a
source can never read itself. Kept apart from `check_sources.py`, which dispatches the two kinds
here; `uses` records which declarations each one reads (so they count as used).
"""

from __future__ import annotations

from typing import Optional

from pdc.lang import ast
from pdc.lang.check_settings import Bad, Silent, describe_value, read_float, read_int
from pdc.lang.settings import DataSource, GenerateConfig

GENERATE_EXAMPLE = "generate(teacher, prompts=wiki, tokens=100k)"
MIX_EXAMPLE = "mix(wiki=0.5, gen=0.5)"


class GeneratedRules:
    """`generate(...)` and `mix(...)` data sources (mixed into the checker's `SourceRules`)."""

    prompt_uses: list  # (data name, span) of every prompts= read, for `check_prompt_leaks`

    def check_prompt_leaks(self, measured: set[str]) -> None:
        """No prompts from text the evaluation measures: a student distilled on the teacher's
        continuations of held-out text would be scored on what it was shown."""
        for name, span in self.prompt_uses:
            reads, todo = set(), [name]
            while todo:
                n = todo.pop()
                reads.add(n)
                todo += [m for m in self.uses.get(n, ()) if m not in reads]
            leaked = sorted(reads & measured)
            if leaked:
                self.error(f"prompts from '{leaked[0]}', which the evaluation measures perplexity on: the student "
                           f"would be scored on text it was shown; take prompts from training text", span)

    def generated_source(self, call: ast.Call) -> Optional[tuple[DataSource, set[str]]]:
        """The source and the declarations it reads, or None (reported)."""
        pos = call.positional
        if len(pos) != 1 or not isinstance(pos[0], ast.Name):
            self.error(f"generate(...) needs the name of a declared model first, e.g. {GENERATE_EXAMPLE}", call.span)
            return None
        model = self.model_ref(pos[0], "generate's model")
        prompts_name: list[str] = []

        def read_prompts(v: ast.Value, key: str) -> DataSource:
            if not isinstance(v, ast.Name):
                raise Bad(f"{key} expects the name of a data declaration, got {describe_value(v)}", v.span)
            ref = self.data_ref(v)
            if ref is None:
                raise Silent()
            prompts_name.append(ref)
            self.prompt_uses.append((ref, v.span))
            return self.data[ref]

        schema = {"prompts": read_prompts, "tokens": read_int(lo=1), "length": read_int(lo=1),
                  "prompt_tokens": read_int(lo=1), "temperature": read_float(positive=True),
                  "seed": read_int(lo=0), "batch": read_int(lo=1)}
        opts = self.settings(call.keywords, schema, "generate(...)")
        missing = [k for k in ("prompts", "tokens") if k not in opts]
        if missing:
            self.error(f"generate(...) needs {' and '.join(f'{k}=' for k in missing)} (e.g. {GENERATE_EXAMPLE})",
                       call.span)
            return None
        if model is None or len(opts) < len(call.keywords):
            return None  # a bad argument: already reported
        cfg = GenerateConfig(model=self.models[model], **{k: v for k, (v, _) in opts.items()})
        return DataSource("generate", model, generate=cfg), {model, *prompts_name}

    def mixed_source(self, call: ast.Call) -> Optional[tuple[DataSource, set[str]]]:
        if call.positional:
            self.error(f"mix(...) takes data names with their shares, e.g. {MIX_EXAMPLE}", call.positional[0].span)
            return None
        if len(call.keywords) < 2:
            self.error(f"mix(...) needs at least two corpora, e.g. {MIX_EXAMPLE}", call.span)
            return None
        parts, seen, ok = [], set(), True
        for kw in call.keywords:
            name = kw.key.value
            if name in seen:
                self.error(f"'{name}' appears twice in mix(...)", kw.key.span)
                ok = False
                continue
            seen.add(name)
            ref = self.data_ref(kw.key)
            try:
                share = read_float(positive=True)(kw.value, f"the share of '{name}'")
            except Bad as bad:
                self.error(bad.message, bad.span)
                ok = False
                continue
            if ref is None:
                ok = False
                continue
            parts.append((ref, share))
        if not ok:
            return None
        total = sum(s for _, s in parts)
        return (DataSource("mix", ",".join(n for n, _ in parts),
                           parts=tuple((n, self.data[n], s / total) for n, s in parts)), {n for n, _ in parts})
