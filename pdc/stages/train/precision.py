"""What `precision=bf16` means on the device a stage runs on.

- A GPU with bf16: the frozen teacher's weights are bf16 and DeepSpeed trains in bf16.
- A CPU with bf16 matrix instructions (AMX or AVX512-BF16, as oneDNN reports them): weights,
  gradients and optimizer state stay fp32, and the forward passes of a training step run under
  `torch.autocast` in bf16 -- the matrix products in bf16, the losses from fp32 logits.
  SmolLM2-135M, one step of 4 x 256 tokens forward and backward on 2 cores: fp32 6.0 s,
  autocast 3.5 s.
- Anything else trains in fp32 (the stage's metrics record what ran).
"""

from __future__ import annotations

import contextlib

import torch

from pdc.lang.settings import TrainConfig


def cpu_has_bf16() -> bool:
    """Whether this CPU's matrix units take bf16 (AMX or AVX512-BF16, as oneDNN reports)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def gpu_bf16(cfg: TrainConfig) -> bool:
    """bf16 weights: `precision=bf16` on a GPU that has bf16."""
    return cfg.precision == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: `precision=bf16` on a CPU whose matrix units take bf16."""
    return cfg.precision == "bf16" and device.type == "cpu" and cpu_has_bf16()


def forward_precision(cfg: TrainConfig, device: torch.device):
    """The context the training step's forward passes run in (see the module docstring)."""
    if cpu_autocast(cfg, device):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_label(cfg: TrainConfig, device: torch.device) -> str:
    """What ran, for the stage's metrics: "bf16", "bf16 autocast" or "fp32"."""
    if gpu_bf16(cfg):
        return "bf16"
    return "bf16 autocast" if cpu_autocast(cfg, device) else "fp32"
