"""The `.pds` syntax tree: frozen, typed dataclasses, one per grammar construct.

Invariant: every node carries a `span`, and spans never take part in equality (`compare=False`),
so `parse(fmt(x)) == parse(x)` compares meaning, not layout. Comments are kept on `Spec` (also
outside equality) so that `pdc fmt` can put them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Union

from pdc.lang.diagnostics import Span

_NOSPAN = Span("<none>", 0, 0, 0, 0)


def _span() -> Span:
    return field(default=_NOSPAN, compare=False, repr=False)


@dataclass(frozen=True)
class Number:
    """A numeric literal. `value` is exact: an int when the literal denotes a whole number
    (`94B`, `1_000`, `1e3`), otherwise a float. `text` is the literal as written."""

    value: Union[int, float]
    text: str = field(default="", compare=False)
    span: Span = _span()


@dataclass(frozen=True)
class Str:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    value: str
    span: Span = _span()


@dataclass(frozen=True)
class Kwarg:
    key: Name
    value: "Value"
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    """`name(arg, key=value, ...)`; `args` keeps positional and keyword arguments in order."""

    name: Name
    args: tuple[Union["Value", Kwarg], ...] = ()
    span: Span = _span()

    @property
    def positional(self) -> tuple["Value", ...]:
        return tuple(a for a in self.args if not isinstance(a, Kwarg))

    @property
    def keywords(self) -> tuple[Kwarg, ...]:
        return tuple(a for a in self.args if isinstance(a, Kwarg))


@dataclass(frozen=True)
class Names:
    """`a,b,c`: a list of names, only as the value of a setting (`emit=hf,lock`)."""

    items: tuple[Name, ...]
    span: Span = _span()


Value = Union[Number, Str, Name, Call, Names]


@dataclass(frozen=True)
class Setting:
    """`key=value` inside a stage block."""

    key: Name
    value: Value
    span: Span = _span()


@dataclass(frozen=True)
class Entry:
    """A bare item inside a block, e.g. an evaluation task `winogrande(5)` or `piqa`."""

    value: Union[Call, Name]
    span: Span = _span()


@dataclass(frozen=True)
class Limit:
    """`metric<=value` inside a block (a `prune search` budget): `metric` is a name (`params`)
    or a call (`memory(batch=1, context=4096)`); a value written `0.85x` is relative."""

    metric: Union[Call, Name]
    value: Value
    span: Span = _span()


Item = Union[Setting, Entry, Limit]


@dataclass(frozen=True)
class Block:
    items: tuple[Item, ...] = ()
    span: Span = _span()

    @property
    def settings(self) -> tuple[Setting, ...]:
        return tuple(i for i in self.items if isinstance(i, Setting))

    @property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(i for i in self.items if isinstance(i, Entry))


@dataclass(frozen=True)
class ModelDecl:
    name: Name
    source: Call
    span: Span = _span()


@dataclass(frozen=True)
class DataDecl:
    name: Name
    source: Call
    span: Span = _span()


@dataclass(frozen=True)
class CorrectStmt:
    """`correct MODEL on DATA { ... }`: teacher correction."""

    model: Name
    data: Name
    block: Block
    span: Span = _span()


@dataclass(frozen=True)
class PruneStmt:
    """`prune width { ... }` or `prune depth { ... }` (`kind` is checked, not parsed)."""

    kind: Name
    block: Block
    span: Span = _span()


@dataclass(frozen=True)
class DistillStmt:
    """`distill from TEACHER on DATA { ... }`."""

    teacher: Name
    data: Name
    block: Block
    span: Span = _span()


@dataclass(frozen=True)
class EvaluateStmt:
    """`evaluate with HARNESS { tasks and settings }`."""

    harness: Name
    block: Block
    span: Span = _span()


StageStatement = Union[CorrectStmt, PruneStmt, DistillStmt, EvaluateStmt]
StageStmt = (CorrectStmt, PruneStmt, DistillStmt, EvaluateStmt)


@dataclass(frozen=True)
class Override:
    """`STAGE.KEY=VALUE` in a variant: one setting of one stage, replaced or added."""

    stage: Name
    key: Name
    value: Value
    span: Span = _span()


@dataclass(frozen=True)
class Without:
    """`without STAGE` in a variant: the stage is left out."""

    stage: Name
    span: Span = _span()


VariantItem = Union[Override, Without, CorrectStmt, PruneStmt, DistillStmt, EvaluateStmt]


@dataclass(frozen=True)
class Variant:
    name: Name
    items: tuple[VariantItem, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class Expect:
    """`expect A beats B on METRIC` in a compare block: a claim the comparison report checks."""

    winner: Name
    loser: Name
    metric: Union[Name, Call]
    span: Span = _span()


@dataclass(frozen=True)
class CompareStmt:
    """`compare NAME { variant A { ... } variant B { ... } expect A beats B on M }`: variants
    of the recipe and the claims about them."""

    name: Name
    variants: tuple[Variant, ...] = ()
    span: Span = _span()
    expects: tuple[Expect, ...] = ()


Statement = Union[ModelDecl, DataDecl, CorrectStmt, PruneStmt, DistillStmt, EvaluateStmt, CompareStmt]


@dataclass(frozen=True)
class Comment:
    text: str  # including the leading '#'
    line: int
    col: int


@dataclass(frozen=True)
class Spec:
    statements: tuple[Statement, ...]
    file: str = field(default="<spec>", compare=False)
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)
    span: Span = _span()


def number_value(text: str) -> Union[int, float]:
    """The exact value of a NUMBER literal: `94B` -> 94_000_000_000, `2e-5` -> 2e-05.

    Units are SI: k=1e3, M=1e6, B=G=1e9, T=1e12 (write `8192`, not `8k`, for a power of two).
    """
    units = {"k": 3, "K": 3, "M": 6, "B": 9, "G": 9, "T": 12}
    t = text.replace("_", "").removesuffix("x")  # `0.85x`: a factor (search limits only)
    exp = 0
    if t and t[-1] in units:
        exp = units[t[-1]]
        t = t[:-1]
    d = Decimal(t).scaleb(exp)
    # Whole numbers stay exact ints (`1.5B`, `1e3`); `1.0` stays a float as written. Huge
    # exponents become floats so a typo like `1e99999` cannot build a giant int.
    if d.is_finite() and d.adjusted() < 30 and d == d.to_integral_value() and ("." not in t or exp):
        return int(d)
    return float(d)
