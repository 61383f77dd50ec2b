"""Per-GPU memory of each stage, estimated from the architecture and the stage settings alone.

(Filled in below: the teacher placement rule shared by the plan and the training loop.)
"""

from __future__ import annotations

from typing import Optional

# A frozen teacher is replicated on every GPU while its weights take at most this share of one.
TEACHER_REPLICATE_FRACTION = 0.5


def teacher_partitioned(zero: int, teacher_bytes: int, device_bytes: Optional[int]) -> bool:
    """Whether a distillation teacher runs as a ZeRO-3 inference engine (weights partitioned over
    the ranks) rather than replicated: when the student is trained under ZeRO-3, or when the
    teacher's weights would take more than half of one GPU."""
    if zero == 3:
        return True
    return device_bytes is not None and teacher_bytes > TEACHER_REPLICATE_FRACTION * device_bytes
