"""The device of this rank and the process group it joins: the one place that decides which
backend carries which tensors (training ranks, and the ranks that evaluation and pruning split
their work over)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# The collective backend of each accelerator's own tensors; CPU tensors always go through gloo.
ACCELERATOR_BACKENDS = {"cuda": "nccl"}


def group_backend(device: torch.device) -> str:
    """The process group's backend map for ranks computing on `device`: gloo for CPU tensors
    and, on an accelerator, its own backend for its tensors ("cpu:gloo,cuda:nccl"). The one
    rule for every collective pdc runs: small host-side sums (validation, step statistics,
    importance and saliency totals) travel on the CPU, device tensors (DeepSpeed's gradients,
    ZeRO partitions, lm-eval's gathers) on the device, and neither is copied to suit the group."""
    if device.type == "cpu":
        return "gloo"
    return f"cpu:gloo,{device.type}:{ACCELERATOR_BACKENDS[device.type]}"


def join_ranks(device: torch.device) -> None:
    """Join the process group of this launch (torchrun / DeepSpeed / srun set its env) with the
    backend map of `group_backend`; on a GPU, bind this rank to `device` first."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(group_backend(device))


def rank_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
