"""Variants of a recipe: the statements of a `compare` block applied to the base spec.

A variant is the base spec's statements with its items applied in the order written:

- `STAGE.KEY=VALUE` replaces the setting KEY of stage STAGE (or adds it when the stage does not
  set it); the new setting carries the override's span, so the checker reports any mistake in it
  at the override;
- a stage statement replaces the base stage of the same kind (the first one, for prune) or is
  added when the base has none;
- `without STAGE` leaves the stage out.

The result is an ordinary statement list that the checker checks like any spec, so a variant is
held to exactly the rules of a hand-written spec. Stage names follow the checker's rule:
correct, prune (prune2, prune3, ... when there are several), distill, evaluate.
"""

from __future__ import annotations

from dataclasses import replace

from pdc.lang import ast
from pdc.lang.diagnostics import Diagnostic, Note

KIND_OF = {ast.CorrectStmt: "correct", ast.PruneStmt: "prune", ast.DistillStmt: "distill",
           ast.EvaluateStmt: "evaluate"}


def stage_name(kind: str, index: int, count: int) -> str:
    """The name of the `index`-th (1-based) stage of `kind` among `count` of them."""
    return kind if kind != "prune" or count == 1 or index == 1 else f"prune{index}"


def named_stages(statements) -> dict[str, ast.StageStatement]:
    """Stage statements by name, in order."""
    stages = [s for s in statements if isinstance(s, ast.StageStmt)]
    prunes = [s for s in stages if isinstance(s, ast.PruneStmt)]
    out: dict[str, ast.StageStatement] = {}
    for s in stages:
        kind = KIND_OF[type(s)]
        index = prunes.index(s) + 1 if kind == "prune" else 1
        name = stage_name(kind, index, len(prunes))
        out.setdefault(name, s)  # a repeated kind is the checker's error to report
    return out


def describe(item: ast.VariantItem) -> str:
    """One-line text of a variant item, for plans and reports."""
    if isinstance(item, ast.Override):
        return f"{item.stage.value}.{item.key.value}"
    if isinstance(item, ast.Without):
        return f"without {item.stage.value}"
    return f"{KIND_OF[type(item)]} replaced"


def apply_variant(statements: tuple, variant: ast.Variant) -> tuple[tuple, list[Diagnostic]]:
    """The base `statements` with `variant`'s items applied, and the diagnostics of items that
    name no stage."""
    stmts = list(statements)
    errors: list[Diagnostic] = []
    for item in variant.items:
        names = named_stages(stmts)
        available = Note(f"stages of this recipe: {', '.join(names) or 'none'}")
        verb = {ast.Override: "overrides", ast.Without: "leaves out"}.get(type(item))
        target = names.get(item.stage.value) if verb else None
        if verb and target is None:
            errors.append(Diagnostic(f"variant '{variant.name.value}' {verb} '{item.stage.value}', "
                                     f"which is not a stage of the recipe", item.stage.span, notes=(available,)))
            continue
        if isinstance(item, ast.Override):
            setting = ast.Setting(item.key, item.value, item.span)
            items = list(target.block.items)
            at = next((i for i, it in enumerate(items)
                       if isinstance(it, ast.Setting) and it.key.value == item.key.value), None)
            if at is None:
                items.append(setting)
            else:
                items[at] = setting
            stmts[stmts.index(target)] = replace(target, block=replace(target.block, items=tuple(items)))
        elif isinstance(item, ast.Without):
            stmts.remove(target)
        else:
            kind = KIND_OF[type(item)]
            same = [s for s in stmts if isinstance(s, type(item))]
            if same:
                stmts[stmts.index(same[0])] = item
            else:  # added at its place in the stage order
                order = list(KIND_OF.values())
                later = [i for i, s in enumerate(stmts) if isinstance(s, ast.StageStmt)
                         and order.index(KIND_OF[type(s)]) > order.index(kind)]
                stmts.insert(later[0] if later else len(stmts), item)
    return tuple(stmts), errors
