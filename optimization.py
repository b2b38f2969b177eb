"""Optimizers for SparseBERT: LAMB for pretraining, AdamW for fine-tuning, and the parameter groups.

`Lamb` reproduces the maths of NVIDIA/apex `FusedLAMB` as used by NVIDIA's BERT scripts
(adam_w mode, bias correction, grad averaging, global grad-norm clipping at 1.0, no NVLAMB):

    g' = g / max(1, ||g_all||_2 / max_grad_norm)          one norm over every param of every group
    m  = b1 m + (1 - b1) g'          v = b2 v + (1 - b2) g'^2
    u  = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd w
    r  = ||w|| / ||u||   only where wd != 0 and both norms > 0, else 1
    w  = w - lr r u

It is written with `torch._foreach_*` so each group costs a handful of multi-tensor kernels, not
one Python loop per tensor. `build_lamb` prefers apex `FusedLAMB` (same maths, fused CUDA kernels)
when apex is importable and the model lives on CUDA.

Each group holds `step`, the number of *successful* updates. Under `torch.amp.GradScaler` a step
whose gradients hold inf/NaN never reaches `Lamb.step`, so `step` does not advance and the
schedulers in `schedulers.py`, which read it, do not advance either.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

NO_DECAY_KEYS = ("bias", "gamma", "beta", "LayerNorm")  # NVIDIA's no-decay name filter
MASK_LOGITS_NAME = "mask_logits"


class Lamb(torch.optim.Optimizer):
    """LAMB with NVIDIA/apex FusedLAMB semantics, as a multi-tensor PyTorch implementation.

    Arguments mirror `apex.optimizers.FusedLAMB` so the two are interchangeable and their
    `state_dict`s share a layout (per-param `exp_avg`, `exp_avg_sq`; per-group int `step`).
    `max_grad_norm` is global (read from the constructor, like apex); <= 0 turns clipping off.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float = 1.0,
    ):
        if lr < 0.0:
            raise ValueError(f"Lamb: lr must be >= 0, got {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        if eps <= 0.0:
            raise ValueError(f"Lamb: eps must be > 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"Lamb: weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("step", 0)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("step", 0)

    def _grads(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _clip_coefficient(self) -> torch.Tensor | None:
        """1 / max(1, ||g||/max_norm) over every gradient of every group (apex clips globally)."""
        max_norm = self.defaults["max_grad_norm"]
        grads = [g for group in self.param_groups for g in self._grads(group)[1]]
        if max_norm <= 0 or not grads:
            return None
        device = grads[0].device
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        global_norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        # A tensor, not a Python float: no host sync on CUDA.
        return max_norm / torch.clamp(global_norm, min=max_norm)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        clip = self._clip_coefficient()
        for group in self.param_groups:
            group["step"] += 1  # every group counts every successful step, as in apex
            params, grads = self._grads(group)
            if params:
                self._update_group(group, params, grads, clip)
        return loss

    def _update_group(
        self,
        group: dict,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        clip: torch.Tensor | None,
    ) -> None:
        beta1, beta2 = group["betas"]
        step = group["step"]
        weight_decay = group["weight_decay"]

        exp_avgs, exp_avg_sqs = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])

        if clip is not None:
            grads = torch._foreach_mul(grads, clip)

        grad_weight = 1.0 - beta1 if group["grad_averaging"] else 1.0
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=grad_weight)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        if group["bias_correction"]:
            bias_correction1 = 1.0 - beta1**step
            bias_correction2 = 1.0 - beta2**step
        else:
            bias_correction1 = bias_correction2 = 1.0

        # u = m_hat / (sqrt(v_hat) + eps), with sqrt(v_hat) = sqrt(v) / sqrt(bc2).
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, math.sqrt(bias_correction2))
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(exp_avgs, denom)
        torch._foreach_div_(updates, bias_correction1)

        if weight_decay != 0.0:
            torch._foreach_add_(updates, params, alpha=weight_decay)
            # Trust ratio only where weight decay is on (apex with use_nvlamb=False).
            torch._foreach_mul_(updates, _trust_ratios(params, updates))

        torch._foreach_add_(params, updates, alpha=-group["lr"])


def _trust_ratios(params: list[torch.Tensor], updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """||w|| / ||u|| per tensor, 1 where either norm is zero (fresh zero-init or zero update)."""
    weight_norms = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32))
    update_norms = torch.stack(torch._foreach_norm(updates, 2, dtype=torch.float32))
    usable = (weight_norms > 0) & (update_norms > 0)
    ratios = torch.where(usable, weight_norms / torch.where(usable, update_norms, 1.0), 1.0)
    return [r.to(u.dtype) for r, u in zip(ratios.unbind(0), updates)]


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The DAM mask logits: `model.mask_parameters()` when the model has it, else params named mask_logits."""
    if hasattr(model, "mask_parameters"):
        return list(model.mask_parameters())
    return [p for name, p in model.named_parameters() if name.split(".")[-1] == MASK_LOGITS_NAME]


def param_groups(model: nn.Module, weight_decay: float = 0.01) -> list[dict]:
    """Three groups, always in this order and always present (possibly empty), tagged by "name":

    - "decay": every other trainable weight, `weight_decay`;
    - "no_decay": names containing bias / gamma / beta / LayerNorm (NVIDIA's filter), decay 0;
    - "mask_logits": DAM logits, decay 0 and hence no LAMB trust ratio.

    A fixed group layout keeps optimizer checkpoints loadable between dense and DAM runs' code
    paths and avoids the upstream "different number of parameter groups" failure.
    """
    mask_ids = {id(p) for p in mask_parameters(model)}
    decay, no_decay, mask = [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # frozen masks stay out; tied weights once
            continue
        seen.add(id(p))
        if id(p) in mask_ids:
            mask.append(p)
        elif any(key in name for key in NO_DECAY_KEYS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "mask_logits", "params": mask, "weight_decay": 0.0},
    ]


def _fused_lamb_class() -> type | None:
    try:
        from apex.optimizers import FusedLAMB
    except ImportError:
        return None
    return FusedLAMB


def _on_cuda(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def build_lamb(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    max_grad_norm: float = 1.0,
    prefer_apex: bool = True,
    mask_lr: float | None = None,
) -> torch.optim.Optimizer:
    """Pretraining optimizer: apex FusedLAMB on CUDA when importable, otherwise `Lamb`.

    ``mask_lr`` is the peak learning rate of the mask-logits group (default ``lr``, as the released
    code); a scheduler scales every group's own base rate, so both follow the same schedule.
    """
    groups = param_groups(model, weight_decay)
    if mask_lr is not None:
        groups[-1]["lr"] = mask_lr
    kwargs = dict(lr=lr, bias_correction=True, betas=betas, eps=eps, weight_decay=weight_decay,
                  grad_averaging=True, max_grad_norm=max_grad_norm)
    fused = _fused_lamb_class() if prefer_apex else None
    if fused is not None and _on_cuda(groups):
        return fused(groups, **kwargs)
    return Lamb(groups, **kwargs)


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """Fine-tuning optimizer: torch AdamW (fused kernels on CUDA, foreach otherwise), same groups.

    Unlike NVIDIA's BertAdam this has bias correction and no per-tensor clipping; clip with
    `torch.nn.utils.clip_grad_norm_` in the training loop if wanted.
    """
    groups = param_groups(model, weight_decay)
    fused = _on_cuda(groups)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused or None, foreach=None if fused else True)
