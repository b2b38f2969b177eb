"""Warm-up learning-rate schedules, driven by the optimizer's count of successful steps.

With `p = s / total_steps` and `w` the warm-up fraction, every schedule is `base * p / w` while
`p < w`, then:

    PolyWarmUpScheduler      base * (1 - p) ** degree        (NVIDIA pretraining; degree 0.5)
    LinearWarmUpScheduler    base * max((p - 1) / (w - 1), 0)  (linear decay to 0 at total_steps)
    ConstantWarmUpScheduler  base
    CosineWarmUpScheduler    base * 0.5 * (1 + cos(pi * p))  (upstream wrote `pi + p`, a bug)

Decays clamp at 0 once `p >= 1`.

`s` is the index of the *next* update: the number of successful optimizer updates so far plus
one, read from the optimizer itself (each group's `step` for LAMB / apex FusedLAMB, the
per-parameter `step` for torch Adam/AdamW). A step that `torch.amp.GradScaler` skips because of
inf/NaN gradients never reaches the optimizer, so it does not move the schedule. Because `s` comes
from the optimizer, calling `scheduler.step()` before the optimizer step (NVIDIA's order) or after
it (PyTorch's order) sets the same learning rate for the next update, and a resumed optimizer
brings its schedule with it.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


def successful_steps(optimizer: torch.optim.Optimizer) -> int:
    """Number of updates `optimizer` has applied (overflow-skipped steps excluded)."""
    group = optimizer.param_groups[0]
    if "step" in group:
        return int(group["step"])
    counts = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    if counts:
        return max(counts)
    if optimizer.state:
        raise TypeError(
            f"{type(optimizer).__name__} keeps no step count; the warm-up schedulers need an "
            "optimizer that counts its updates (Lamb, apex FusedLAMB, Adam, AdamW)"
        )
    return 0


class _WarmUpScheduler(LRScheduler):
    """Shared warm-up logic; subclasses give the factor after warm-up via `_decay(progress)`."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float, total_steps: int):
        if total_steps <= 0:
            raise ValueError(f"{type(self).__name__}: total_steps must be > 0, got {total_steps}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(
                f"{type(self).__name__}: warmup is a fraction of total_steps in [0, 1), got {warmup}"
            )
        self.warmup = warmup
        self.total_steps = total_steps
        super().__init__(optimizer)

    def _decay(self, progress: float) -> float:
        raise NotImplementedError

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate for update number `step` (1-based)."""
        progress = step / self.total_steps
        if progress < self.warmup:
            return progress / self.warmup
        return self._decay(progress)

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def step(self) -> None:  # type: ignore[override]
        # Replaces LRScheduler.step: the position comes from the optimizer, not from a call count,
        # so torch's call-order warnings do not apply.
        self.last_epoch = successful_steps(self.optimizer) + 1
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


class PolyWarmUpScheduler(_WarmUpScheduler):
    """NVIDIA's pretraining schedule: linear warm-up, then `(1 - p) ** degree`."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float, total_steps: int,
                 degree: float = 0.5):
        self.degree = degree
        super().__init__(optimizer, warmup, total_steps)

    def _decay(self, progress: float) -> float:
        return max(1.0 - progress, 0.0) ** self.degree


class LinearWarmUpScheduler(_WarmUpScheduler):
    """Linear warm-up, then linear decay reaching 0 at `total_steps` (fine-tuning)."""

    def _decay(self, progress: float) -> float:
        return max((progress - 1.0) / (self.warmup - 1.0), 0.0)


class ConstantWarmUpScheduler(_WarmUpScheduler):
    """Linear warm-up, then the base learning rate."""

    def _decay(self, progress: float) -> float:
        return 1.0


class CosineWarmUpScheduler(_WarmUpScheduler):
    """Linear warm-up, then `0.5 * (1 + cos(pi * p))` of the base learning rate."""

    def _decay(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
