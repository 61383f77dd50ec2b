"""Training stages (correct, distill): the training settings and budget (tokens or steps, lr and
min_lr, batch geometry, engine), the distillation loss and teacher logits, the paper's correction
defaults, and a concurrent correction folded into the distillation."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from pdc.lang import ast
from pdc.lang.check_settings import (Bad, CheckerBase, describe_value, head_span, read_bool, read_enum, read_float,
                                     read_int, read_precision)
from pdc.lang.checked import CorrectStage, DistillStage
from pdc.lang.diagnostics import Note, Span
from pdc.lang.settings import DEFAULT_CACHE_K, TrainConfig, paper_correction


class TrainingRules(CheckerBase):
    def engine(self, v: ast.Value, key: str) -> dict:
        if not (isinstance(v, ast.Call) and v.name.value == "deepspeed") and not (
            isinstance(v, ast.Name) and v.value == "deepspeed"
        ):
            raise Bad(f"engine expects deepspeed(zero=N, precision=P), got {describe_value(v)}", v.span)
        if isinstance(v, ast.Name):
            return {}
        got = self.call_args(v, [], {"zero": read_int(0, 3), "precision": read_precision}, "deepspeed(...)")
        return {k: val for k, (val, _) in got.items()}

    def loss(self, v: ast.Value, key: str) -> str:
        if isinstance(v, ast.Name) and v.value == "kl":
            return "kl_forward"
        if isinstance(v, ast.Name) and v.value == "ce":
            return "ce"
        if isinstance(v, ast.Call) and v.name.value == "kl":
            pos = v.positional
            if len(pos) == 1 and not v.keywords:
                direction = read_enum("forward", "reverse", what="KL direction")(pos[0], "kl")
                return f"kl_{direction}"
            raise Bad("kl(...) takes one argument: forward or reverse", v.span)
        raise Bad(f"loss expects kl(forward), kl(reverse) or ce, got {describe_value(v)}", v.span)

    def teacher_logits(self, v: ast.Value, key: str) -> Optional[int]:
        """`online` (None) or `cached` / `cached(k=N)`: the cache's k, 0 when not written."""
        if isinstance(v, ast.Name) and v.value == "online":
            return None
        if isinstance(v, ast.Name) and v.value == "cached":
            return 0
        if isinstance(v, ast.Call) and v.name.value == "cached":
            got = self.call_args(v, [], {"k": read_int(1)}, "cached(...)")
            return got["k"][0] if "k" in got else 0
        raise Bad(f"teacher_logits expects online, cached or cached(k=N), got {describe_value(v)}", v.span)

    def train_schema(self, extra: dict[str, Callable]) -> dict[str, Callable]:
        schema = {
            "tokens": read_int(1), "steps": read_int(1), "lr": read_float(positive=True), "min_lr": read_float(lo=0),
            "warmup": read_int(0), "schedule": read_enum("cosine", "constant", "linear", what="schedule"),
            "global_batch": read_int(1), "micro_batch": read_int(1), "seq_len": read_int(1),
            "engine": self.engine, "seed": read_int(0), "checkpoint_every": read_int(1),
            "weight_decay": read_float(lo=0), "log_every": read_int(1), "val_fraction": read_float(lo=0, hi=0.5),
            "val_every": read_int(1), "activation_checkpointing": read_bool,
        }
        schema.update(extra)
        return schema

    def train_config(self, block: ast.Block, extra: dict[str, Callable], where: str,
                     head: Span) -> tuple[TrainConfig, dict]:
        for e in block.entries:
            self.error(f"unexpected entry in {where}; settings are written key=value", e.span)
        got = self.settings(block.settings, self.train_schema(extra), where)
        fields = {k: v for k, (v, _) in got.items() if k not in ("engine", "order", "teacher_logits")}
        if "engine" in got:
            fields.update(got["engine"][0])
        if "tokens" in got and "steps" in got:
            self.error("set either tokens= or steps=, not both", got["steps"][1].key.span,
                       Note("tokens set here", got["tokens"][1].key.span))
        elif "tokens" not in got and "steps" not in got:
            self.error(f"{where} needs a budget: tokens=N or steps=N", head)
        if "min_lr" in got and "lr" in got and got["min_lr"][0] > got["lr"][0]:
            self.error(f"min_lr={got['min_lr'][1].value.text} is larger than lr={got['lr'][1].value.text}",
                       got["min_lr"][1].span)
        cfg = TrainConfig()
        mb = fields.get("micro_batch", cfg.micro_batch)
        gb = fields.get("global_batch", cfg.global_batch)
        if gb % mb:
            node = got.get("global_batch", got.get("micro_batch"))[1]
            self.error(f"global_batch={gb} is not a multiple of micro_batch={mb}", node.span)
        if "lora_rank" in got and fields.get("method") != "lora":
            self.error("lora_rank is only used with method=lora", got["lora_rank"][1].key.span)
        if "min_lr" not in got and "lr" in got:
            fields["min_lr"] = min(cfg.min_lr, fields["lr"])
        return replace(cfg, **fields), got

    def correct(self, st: ast.CorrectStmt) -> Optional[CorrectStage]:
        model = self.model_ref(st.model, "correct")
        data = self.data_ref(st.data)
        train, got = self.train_config(
            st.block,
            {"method": read_enum("full", "lora", "norm", what="correction method"), "lora_rank": read_int(1),
             "order": read_enum("sequential", "parallel", "concurrent", what="order")},
            "correct", head_span(st),
        )
        order = got.get("order", ("sequential",))[0]
        self.correct_keys_given = set(got)
        self.correct_settings = got
        if model is None or data is None:
            return None
        return CorrectStage(model, data, train, order, span=st.span)

    def distill(self, st: ast.DistillStmt) -> Optional[DistillStage]:
        teacher = self.model_ref(st.teacher, "teacher")
        data = self.data_ref(st.data)
        train, got = self.train_config(
            st.block,
            {"loss": self.loss, "temperature": read_float(positive=True), "ce_weight": read_float(lo=0, hi=1),
             "top_k": read_int(1), "teacher_logits": self.teacher_logits},
            "distill", head_span(st),
        )
        train = replace(train, cache_k=self.check_teacher_settings(train, got))
        self.distill_settings = got
        if teacher is None or data is None:
            return None
        return DistillStage(teacher, data, train, span=st.span)

    def check_teacher_settings(self, train: TrainConfig, got: dict) -> Optional[int]:
        """The settings that only mean something with a teacher, checked against `loss`; returns
        the teacher cache's k (None: the teacher runs online)."""
        def written(key: str) -> str:
            node = got[key][1]
            return f"{key}={self.text_of(node.value)}"

        if train.loss == "ce":
            loss_note = Note("loss=ce set here", got["loss"][1].span)
            why = {
                "teacher_logits": "cross-entropy trains on the text alone and reads no teacher logits "
                              "(in a compare variant, also write distill.teacher_logits=online)",
                "temperature": "the temperature softens the teacher's distribution, and loss=ce has no teacher",
                "top_k": "top_k restricts the teacher's distribution, and loss=ce has no teacher",
                "ce_weight": "ce_weight adds cross-entropy to a KL loss; loss=ce is cross-entropy already",
            }
            for key, reason in why.items():
                if key in got and (key != "teacher_logits" or got[key][0] is not None):
                    self.error(f"{written(key)} with loss=ce: {reason}", got[key][1].span, loss_note)
            return None
        if "teacher_logits" not in got or got["teacher_logits"][0] is None:
            return None
        k, node = got["teacher_logits"]
        if k and train.top_k is not None and k != train.top_k:
            self.error(f"{written('teacher_logits')} caches {k} logits per token, but top_k={train.top_k} "
                       f"distills on the teacher's top {train.top_k}: the cache must hold exactly those "
                       "(write teacher_logits=cached, which takes top_k's k)",
                       node.value.span, Note(f"top_k={train.top_k} set here", got["top_k"][1].span))
            return None
        k = k or train.top_k or DEFAULT_CACHE_K
        vocab = self.source_arch.vocab if self.source_arch is not None else None
        if vocab is not None and k > vocab:
            self.error(f"{written('teacher_logits')} caches more logits per token than the vocabulary has "
                       f"({vocab:,})", node.value.span)
            return None
        return k

    def paper_correction_defaults(self, lowered):
        """The paper's teacher-correction settings where the spec gives none
        (`pdc.lang.settings.paper_correction`)."""
        correct = next((s for s in lowered if isinstance(s, CorrectStage)), None)
        distill = next((s for s in lowered if isinstance(s, DistillStage)), None)
        if correct is None:
            return lowered
        given = frozenset(getattr(self, "correct_keys_given", set()))
        t = paper_correction(correct.train, distill.train if distill else None, given)
        if t.min_lr > t.lr:
            self.error(f"min_lr={t.min_lr:g} is larger than the default correction lr={t.lr:g} "
                       "(one fifth of the distillation lr); set lr= explicitly", correct.span)
        fixed = replace(correct, train=t)
        return [fixed if s is correct else s for s in lowered]

    # Settings of a concurrent correction that must equal the distillation's: the teacher trains
    # on exactly the micro-batches it teaches on.
    CONCURRENT_SHARED = ("global_batch", "micro_batch", "seq_len", "val_fraction", "seed")

    def fold_concurrent_correction(self, lowered, correct_st, distill_st):
        """`correct ... { order=concurrent }`: no stage of its own; its training settings become
        the distillation's `teacher_correction`, checked against the distillation."""
        correct = next((s for s in lowered if isinstance(s, CorrectStage)), None)
        distill = next((s for s in lowered if isinstance(s, DistillStage)), None)
        if correct is None or correct.order != "concurrent" or distill is None:
            return lowered
        got, dgot = self.correct_settings, self.distill_settings
        order_span = got["order"][1].span
        why = "order=concurrent trains the teacher inside the distillation loop"
        if correct.data != distill.data:
            self.error(f"{why}, on the distillation's batches: its data must be the distillation's "
                       f"'{distill.data}', not '{correct.data}'", correct_st.data.span,
                       Note("distillation data named here", distill_st.data.span))
        c, d = correct.train, distill.train
        for key in self.CONCURRENT_SHARED:
            if key in got and getattr(c, key) != getattr(d, key):
                self.error(f"{key}={self.text_of(got[key][1].value)} in a concurrent correction: {why}, whose "
                           f"{key} is {getattr(d, key)}; leave it out (it follows distill)", got[key][1].span,
                           Note("order=concurrent set here", order_span))
        steps, dsteps = c.total_steps(), d.total_steps()
        if steps and dsteps and steps > dsteps:
            budget = got.get("steps", got.get("tokens"))
            self.error(f"a concurrent correction of {steps} steps outlasts the {dsteps} steps of distillation it runs "
                       "in (it corrects the teacher during the first N steps)",
                       budget[1].span if budget else head_span(correct_st))
        if not d.uses_teacher:
            self.error(f"{why}, but loss=ce trains the student without a teacher", order_span,
                       Note("loss=ce set here", dgot["loss"][1].span))
        elif d.cache_k is not None:
            self.error(f"{why}, so its logits change every step and cannot be cached: use teacher_logits=online",
                       dgot["teacher_logits"][1].span, Note("order=concurrent set here", order_span))
        if c.zero == 3:
            self.error("a concurrent correction under zero=3 is not supported (the trained teacher is gathered "
                       "on one process to be saved): use zero=0, 1 or 2", got["engine"][1].span)
        shared = {key: getattr(d, key) for key in self.CONCURRENT_SHARED}
        folded = replace(distill, teacher_correction=replace(c, **shared))
        return [folded if s is distill else s for s in lowered if s is not correct]
