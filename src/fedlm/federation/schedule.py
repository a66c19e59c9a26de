"""Learning rate across the whole federated training, as a function of progress in [0, 1]."""

from __future__ import annotations

import math


def lr_at(progress: float, *, base_lr: float, schedule: str, min_lr_ratio: float) -> float:
    """The learning rate after ``progress`` (0: first step, 1: end) of all local training.

    ``constant``: base_lr. ``linear``: base_lr -> min_lr_ratio * base_lr. ``cosine``: half-cosine between the same
    two ends (Loshchilov & Hutter 2017, SGDR, without restarts).
    """
    p = min(max(progress, 0.0), 1.0)
    floor = base_lr * min_lr_ratio
    if schedule == "constant":
        return base_lr
    if schedule == "linear":
        return base_lr + (floor - base_lr) * p
    if schedule == "cosine":
        return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown lr schedule {schedule!r}")
