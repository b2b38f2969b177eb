"""Warm-up learning-rate schedules, driven by the optimizer's count of successful steps.

With `p = s / total_steps` and `w` the warm-up fraction, every schedule is `base * p / w` while
`p < w`, then:

    PolyWarmUpScheduler      base * (1 - p) ** degree        (NVIDIA pretraining; degree 0.5)
    LinearWarmUpScheduler    base * max((1 - p) / (1 - w), 0)  (linear decay to 0 at total_steps)
    ConstantWarmUpScheduler  base
    CosineWarmUpScheduler    base * 0.5 * (1 + cos(pi * p))  (upstream wrote `pi + p`, a bug)

Decays clamp at 0 once `p >= 1`. Groups named in `held_groups` (by their "name") warm up the same
way and then keep their base rate: a target-sparsity search's mask logits must still move at the
end of the run, where a decay to 0 would freeze them wherever the last steps' noise left them.

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

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float, total_steps: int,
                 held_groups: tuple[str, ...] = ()):
        if total_steps <= 0:
            raise ValueError(f"{type(self).__name__}: total_steps must be > 0, got {total_steps}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(
                f"{type(self).__name__}: warmup is a fraction of total_steps in [0, 1), got {warmup}"
            )
        self.warmup = warmup
        self.total_steps = total_steps
        self.held_groups = tuple(held_groups)
        super().__init__(optimizer)

    def _decay(self, progress: float) -> float:
        raise NotImplementedError

    def lr_factor(self, step: int, held: bool = False) -> float:
        """Multiplier of the base learning rate for update number `step` (1-based); `held`: of a
        group that keeps its base rate after warm-up."""
        progress = step / self.total_steps
        if progress < self.warmup:
            return progress / self.warmup
        return 1.0 if held else self._decay(progress)

    def get_lr(self) -> list[float]:
        return [base_lr * self.lr_factor(self.last_epoch, group.get("name") in self.held_groups)
                for base_lr, group in zip(self.base_lrs, self.optimizer.param_groups, strict=True)]

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
                 degree: float = 0.5, held_groups: tuple[str, ...] = ()):
        self.degree = degree
        super().__init__(optimizer, warmup, total_steps, held_groups)

    def _decay(self, progress: float) -> float:
        return max(1.0 - progress, 0.0) ** self.degree


class LinearWarmUpScheduler(_WarmUpScheduler):
    """Linear warm-up, then linear decay reaching 0 at `total_steps` (fine-tuning)."""

    def _decay(self, progress: float) -> float:
        # (1 - p) / (1 - w), not (p - 1) / (w - 1): at p = 1 the latter is -0.0, logged as "learning_rate: -0".
        return max((1.0 - progress) / (1.0 - self.warmup), 0.0)


class ConstantWarmUpScheduler(_WarmUpScheduler):
    """Linear warm-up, then the base learning rate."""

    def _decay(self, progress: float) -> float:
        return 1.0


class CosineWarmUpScheduler(_WarmUpScheduler):
    """Linear warm-up, then `0.5 * (1 + cos(pi * p))` of the base learning rate."""

    def _decay(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
