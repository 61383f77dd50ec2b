"""What differs between teacher correction and distillation, for the training loop
(`pdc.stages.train.loop`): the models (the trained one, a frozen, partitioned or cached teacher,
a concurrently corrected teacher and its engine), the micro-batches and their loss, validation,
and the export of the trained model (ZeRO-3 partitions gathered layer by layer; LoRA merged)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from pdc.errors import PdcError
from pdc.inputs.models import load_causal_lm
from pdc.inputs.shards import Blocks
from pdc.inputs.teacher_cache import TeacherLogits
from pdc.inputs.verify import tied_head_names
from pdc.lang.settings import TrainConfig
from pdc.plan.memory import teacher_partitioned
from pdc.plan.training import ds_config, teacher_ds_config
from pdc.stages.train import losses
from pdc.stages.train.precision import forward_precision, gpu_bf16


# Where a distillation with a concurrent teacher correction writes the corrected teacher (beside
# `model/` in the final directory and the stage's output; its checkpoints in `checkpoints/teacher/`).
TEACHER_DIR = "teacher"


@dataclass(frozen=True)
class Cached:
    """A micro-batch's cached teacher distribution as tensors (`pdc.inputs.teacher_cache`)."""

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    nll: torch.Tensor




def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


# ---- the stage ---------------------------------------------------------------------------------
class Stage:
    """What differs between teacher correction and distillation: the models and the loss.

    The teacher of a distillation is frozen. It is replicated on every rank (bf16 on a GPU with
    bf16) unless the student is trained under ZeRO-3 or the teacher's weights would take more than
    half of a GPU (`pdc.plan.memory.teacher_partitioned`); then it runs as a DeepSpeed ZeRO-3
    inference engine, its weights partitioned over the ranks."""

    def __init__(self, spec: dict, cfg: TrainConfig, device: torch.device, micro_batch: int,
                 ds_cfg: dict | None = None):
        self.kind = spec["kind"]
        self.spec = spec
        self.name = spec["stage"]
        self.cfg = cfg
        self.device = device
        self.dtype = torch.bfloat16 if gpu_bf16(cfg) else torch.float32
        self.teacher = None
        self.cache: TeacherLogits | None = None
        self.teacher_placement = None
        # concurrent teacher correction: its settings, its engine once started, and whether the
        # current step still corrects
        self.correction: TrainConfig | None = None
        self.teacher_engine = None
        self.teacher_scheduler = None
        self.correcting = False
        self.teacher_step_loss = 0.0
        self.teacher_trainable = 0
        # ZeRO-3 builds the trained model partitioned (`zero.Init`): no rank holds all of it. It is
        # read in the dtype DeepSpeed trains it in (bf16 on a GPU): DeepSpeed casts it so anyway and
        # keeps its fp32 master copy from those values; an fp32 read would cost each rank 4 bytes a
        # parameter of host memory for nothing.
        zero3 = ds_cfg if cfg.zero == 3 else None
        if self.kind == "distill":
            self.model = load_causal_lm(spec["student_dir"], self.name, self.dtype, zero3=zero3)
            if spec.get("teacher_correction"):
                self.correction = config_from_dict(spec["teacher_correction"]["cfg"])
                self.teacher = adapt_for_correction(load_causal_lm(spec["teacher_dir"], self.name), self.correction,
                                                    spec["teacher_correction"], self.name)
                self.teacher_placement = "replicated"
                vocab = self.teacher.config.vocab_size
            elif cfg.online_teacher:
                self.teacher = self._load_teacher(spec["teacher_dir"], micro_batch)
                vocab = self.teacher.config.vocab_size
            elif cfg.uses_teacher:
                self.cache = TeacherLogits(Path(spec["teacher_cache"]["dir"]))
                self.teacher_placement = "cached"
                vocab = self.cache.meta.get("vocab_size", self.model.config.vocab_size)
            else:
                vocab = self.model.config.vocab_size
            if vocab != self.model.config.vocab_size:
                raise PdcError(f"teacher vocab {vocab} != student vocab {self.model.config.vocab_size}", self.name)
        else:
            self.model = load_causal_lm(spec["model_dir"], self.name, self.dtype, zero3=zero3)
        self.loaded_partitioned = all(hasattr(p, "ds_id") for p in self.model.parameters())
        if cfg.activation_checkpointing:
            # Non-reentrant checkpointing: works with frozen inputs, LoRA and ZeRO-3 hooks.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.kind == "correct":
            self.model = adapt_for_correction(self.model, cfg, spec, self.name)
        self.model.config.use_cache = False

    def _load_teacher(self, teacher_dir: str, micro_batch: int):
        import deepspeed

        config = teacher_ds_config(micro_batch, gpu_bf16(self.cfg))
        # beside a ZeRO-3 student the teacher is built partitioned too; a teacher too large for
        # half a GPU is found so once loaded, and partitioned then
        teacher = load_causal_lm(teacher_dir, self.name, self.dtype, zero3=config if self.cfg.zero == 3 else None)
        for p in teacher.parameters():
            p.requires_grad_(False)
        n_bytes = sum(p.numel() for p in teacher.parameters()) * (2 if self.dtype == torch.bfloat16 else 4)
        device_bytes = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        if teacher_partitioned(self.cfg.zero, n_bytes, device_bytes):
            self.teacher_placement = "zero3"
            engine, *_ = deepspeed.initialize(model=teacher, config=config)
            engine.eval()
            return engine.module
        self.teacher_placement = "replicated"
        return teacher.to(self.device).eval()

    def start_correction(self, world_size: int) -> None:
        """The concurrent correction's DeepSpeed engine: the teacher's trainable parameters, the
        correction's optimizer and LR schedule, the distillation's batch geometry."""
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        tc = self.correction
        if tc.activation_checkpointing:
            self.teacher.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.teacher.config.use_cache = False
        params = [p for p in self.teacher.parameters() if p.requires_grad]
        config = ds_config(tc, tc.total_steps(), world_size, self.name, gpu_bf16(tc))
        ds_logger.setLevel(logging.ERROR)  # the scheduler warns that it "has not started" (started below)
        try:
            self.teacher_engine, _, _, self.teacher_scheduler = deepspeed.initialize(
                model=self.teacher, model_parameters=params, config=config)
        finally:
            ds_logger.setLevel(logging.WARNING)
        if world_size == 1 and tc.zero == 0:
            self.teacher_engine.enable_backward_allreduce = False  # as for the student (see _train)
        self.teacher = self.teacher_engine.module
        self.teacher_trainable = sum(p.numel() for p in params)

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None or self.cache is not None

    def batch(self, blocks: Blocks, positions) -> dict:
        """The blocks at `positions` of `blocks` on this rank's device: token ids, and the cached
        teacher distribution of the same rows when distilling from a cache."""
        rows = blocks.rows(positions)
        out = {"ids": torch.from_numpy(blocks.array.take(rows).astype(np.int64)).to(self.device)}
        if self.cache is not None:
            c = self.cache.take(rows)
            out["cached"] = Cached(torch.from_numpy(c.logprobs).to(self.device),
                                   torch.from_numpy(c.indices.astype(np.int64)).to(self.device),
                                   torch.from_numpy(c.tail).to(self.device), torch.from_numpy(c.nll))
        return out

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = batch["ids"]
        with forward_precision(self.cfg, self.device):
            logits = engine(input_ids=ids).logits
        if self.cache is not None:
            return losses.cached_distill_loss(logits, batch["cached"], ids, self.cfg)
        if self.teacher is None:
            return losses.lm_loss(logits, ids), None
        if self.correcting:
            # one teacher pass: the student's targets as they are now, and the teacher's own step
            with forward_precision(self.correction, self.device):
                t_logits = self.teacher_engine(input_ids=ids).logits
            t_loss = losses.lm_loss(t_logits, ids)
            self.teacher_engine.backward(t_loss)
            self.teacher_engine.step()
            self.teacher_step_loss += t_loss.item()
            t_logits = t_logits.detach()
        else:
            with torch.no_grad(), forward_precision(self.cfg, self.device):
                t_logits = self.teacher(input_ids=ids).logits
        return losses.distill_loss(logits, t_logits, ids, self.cfg)

    def set_step(self, step: int) -> None:
        """Whether `step` (0-based) still corrects the concurrent teacher; frozen (eval) after."""
        if self.teacher_engine is None:
            return
        self.correcting = step < self.correction.total_steps()
        self.teacher.train(self.correcting)
        self.teacher_step_loss = 0.0

    @torch.no_grad()
    def validate(self, engine, val: Blocks, micro: int, rank: int, world: int) -> dict | None:
        """Mean next-token loss on the held-out blocks (sharded over ranks), and for distillation
        the teacher's loss and the student-teacher KL (full-vocabulary, temperature 1 with an online
        teacher; from a cache, over its top k and the tail bucket at the cache's temperature). Every
        rank runs the same number of forward passes (ZeRO-3 gathers weights collectively): a rank out
        of blocks repeats one with weight 0."""
        import deepspeed.comm as dist

        if len(val) == 0:
            return None
        was_training = engine.module.training
        teacher_training = self.teacher is not None and self.teacher.training
        engine.module.eval()
        if teacher_training:
            self.teacher.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # student CE, teacher CE, KL, blocks
        mine = list(range(rank, len(val), world))
        per_rank = -(-len(val) // world)
        passes = -(-per_rank // micro)
        for i in range(passes):
            pos = mine[i * micro:(i + 1) * micro]
            n = len(pos)
            batch = self.batch(val, pos or [0])
            ids = batch["ids"]
            logits = engine.module(input_ids=ids).logits
            t_logits = self.teacher(input_ids=ids).logits if self.teacher is not None else None
            if n == 0:
                continue
            sums[0] += losses.lm_loss(logits, ids).item() * n
            direction = self.cfg.loss
            if t_logits is not None:
                sums[1] += losses.lm_loss(t_logits, ids).item() * n
                sums[2] += losses.kl_divergence(logits, t_logits, direction, 1.0, None).item() * n
            elif self.cache is not None:
                c = batch["cached"]
                sums[1] += c.nll.double().sum().item()
                sums[2] += losses.cached_kl(logits, c.logprobs, c.indices, c.tail, direction,
                                            self.cache.temperature).item() * n
            sums[3] += n
        dist.all_reduce(sums)
        engine.module.train(was_training)
        if teacher_training:
            self.teacher.train()
        n = sums[3].item()
        out = {"loss": sums[0].item() / n}
        if self.uses_teacher:
            out.update(teacher_loss=sums[1].item() / n, kl=sums[2].item() / n)
        return out

    def export(self, engine, model_dir: Path, spec: dict, rank: int) -> None:
        """Save the trained model as a plain HF checkpoint (LoRA adapters merged in), in the dtype
        it trained in. Every rank calls this: under ZeRO-3 the weights are gathered module by
        module onto rank 0 (`_gathered_state`), which puts them into an empty (meta) copy of the
        model and saves that -- the source is never read again."""
        module = engine.module
        if engine.zero_optimization_partition_weights():
            state = _gathered_state(module, rank)
            if rank != 0:
                return
            module = self._empty_copy(module.config)
            missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
            if unexpected or set(missing) - tied_head_names(module):  # a tied head is not stored twice
                raise PdcError(f"cannot rebuild the model from its ZeRO-3 partitions (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})", self.name)
            module.tie_weights()
        elif rank != 0:
            return
        _save_plain(module, model_dir)

    def _empty_copy(self, config):
        """The trained model's structure (with its LoRA adapters) on the meta device."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return adapt_for_correction(model, self.cfg, self.spec, self.name) if self.kind == "correct" else model

    def export_teacher(self, model_dir: Path, rank: int) -> None:
        """Save the concurrently corrected teacher (rank 0; zero=3 is refused by the checker)."""
        if rank == 0:
            _save_plain(self.teacher_engine.module, model_dir)


def _gathered_state(module, rank: int) -> dict:
    """The full state dict of a ZeRO-3 partitioned `module` on rank 0 (CPU tensors; {} elsewhere),
    gathered one module's own parameters at a time, so no GPU ever holds more than one layer."""
    import deepspeed

    state = {}
    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if rank == 0:
                for name, p in params:
                    state[f"{prefix}.{name}" if prefix else name] = p.detach().to("cpu", copy=True)
        if rank == 0:
            for name, b in sub.named_buffers(recurse=False):
                if name not in sub._non_persistent_buffers_set:
                    state[f"{prefix}.{name}" if prefix else name] = b.detach().to("cpu", copy=True)
    return state


def _save_plain(module, model_dir: Path) -> None:
    """`module` as a plain HF checkpoint: LoRA merged, checkpointing off, every weight trainable."""
    if hasattr(module, "merge_and_unload"):
        module = module.merge_and_unload()
    if getattr(module, "is_gradient_checkpointing", False):
        module.gradient_checkpointing_disable()
    for p in module.parameters():
        p.requires_grad_(True)
    module.config.use_cache = True
    module.save_pretrained(model_dir, safe_serialization=True)


def adapt_for_correction(model, cfg: TrainConfig, targets: dict, stage: str):
    """`model` prepared for a correction of `cfg.method`: unchanged (full), only the norms
    trainable (norm, `targets["norm_params"]`), or LoRA adapters on `targets["lora_modules"]`
    (lora). Targets come from the structure of the model's graph
    (`pdc.stages.correct.correction_targets`)."""
    method = cfg.method
    if method == "full":
        return model
    if method == "norm":
        norms = set(targets["norm_params"])
        for name, p in model.named_parameters():
            p.requires_grad_(name in norms)
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                          target_modules=list(targets["lora_modules"]), bias="none", task_type="CAUSAL_LM",
                          target_parameters=list(targets.get("lora_parameters") or []) or None)
        return get_peft_model(model, lcfg)
    raise PdcError(f"unknown correction method {method!r} (full, lora, norm)", stage)
