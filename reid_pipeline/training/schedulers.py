"""Per-epoch learning-rate schedules of CLIP-ReID, as pure functions of the epoch.

Both follow CLIP-ReID's convention that the scheduler is stepped at the start of each epoch with
the 1-based epoch number, so ``epoch`` here is 1 for the first epoch. Pure functions (rather than
``torch.optim.lr_scheduler`` objects) make resuming trivial: the rate depends on the epoch only.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch

__all__ = ["warmup_cosine_lr", "warmup_multistep_lr", "set_lr"]


def warmup_cosine_lr(
    epoch: int,
    base_lr: float,
    max_epochs: int,
    warmup_epochs: int = 5,
    warmup_lr_init: float = 1e-5,
    min_lr: float = 1e-6,
) -> float:
    """Stage 1: linear warm-up from ``warmup_lr_init`` over ``warmup_epochs``, then cosine to ``min_lr``.

    Matches timm's ``CosineLRScheduler(t_initial=max_epochs, lr_min=min_lr, warmup_t=warmup_epochs,
    warmup_lr_init=warmup_lr_init, cycle_limit=1)`` stepped with the 1-based epoch, as CLIP-ReID does.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch < warmup_epochs:
        return warmup_lr_init + epoch * (base_lr - warmup_lr_init) / warmup_epochs
    if epoch >= max_epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / max_epochs))


def warmup_multistep_lr(
    epoch: int,
    base_lr: float,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_factor: float = 0.1,
    warmup_epochs: int = 10,
    warmup_method: str = "linear",
) -> float:
    """Stage 2: CLIP-ReID's ``WarmupMultiStepLR`` evaluated at (1-based) ``epoch``.

    During warm-up the factor goes linearly from ``warmup_factor`` (epoch 0) to 1 (epoch
    ``warmup_epochs``); the rate is multiplied by ``gamma`` at each milestone passed.
    """
    if list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be increasing, got {list(milestones)}")
    factor = 1.0
    if epoch < warmup_epochs:
        if warmup_method == "constant":
            factor = warmup_factor
        elif warmup_method == "linear":
            alpha = epoch / warmup_epochs
            factor = warmup_factor * (1 - alpha) + alpha
        else:
            raise ValueError(f"warmup_method must be 'constant' or 'linear', got {warmup_method!r}")
    return base_lr * factor * gamma ** bisect.bisect_right(list(milestones), epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's rate to ``lr × group.get('lr_scale', 1)`` (e.g. bias lr ×2)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
