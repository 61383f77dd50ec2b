"""Loaded by every Python process the tests start (tests/conftest.py puts this folder on
PYTHONPATH) and by the test process itself: each torch.distributed collective checks that its
tensors are on a device that the process group pdc builds on a GPU machine
(`group_backend(cuda)`) has a backend for, and appends what it saw to $PDC_COLLECTIVE_LOG.

On this CPU every rank computes on the CPU, so the check asks what the GPU run must get right:
that the group a GPU rank joins carries the CPU tensors pdc reduces (an NCCL-only group, as
`init_process_group("nccl")` builds, has no backend for them and the collective fails)."""

import os

if os.environ.get("PDC_COLLECTIVE_LOG"):
    import collective_check

    collective_check.install()
