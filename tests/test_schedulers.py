"""Warm-up schedulers: curves against their formulas, overflow steps, call order, resume."""
import copy
import math

import pytest
import torch
from torch import nn

from optimization import Lamb
from schedulers import (
    ConstantWarmUpScheduler,
    CosineWarmUpScheduler,
    LinearWarmUpScheduler,
    PolyWarmUpScheduler,
    successful_steps,
)

BASE_LR, WARMUP, TOTAL = 6e-3, 0.2843, 50


def warmup_or(decay):
    def lr(s):
        p = s / TOTAL
        return BASE_LR * p / WARMUP if p < WARMUP else BASE_LR * decay(p)
    return lr


FORMULAS = {
    PolyWarmUpScheduler: warmup_or(lambda p: max(1 - p, 0.0) ** 0.5),
    LinearWarmUpScheduler: warmup_or(lambda p: max((p - 1) / (WARMUP - 1), 0.0)),
    ConstantWarmUpScheduler: warmup_or(lambda p: 1.0),
    CosineWarmUpScheduler: warmup_or(lambda p: 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))),
}


def lamb_with_param(lr=BASE_LR):
    p = nn.Parameter(torch.ones(3))
    return p, Lamb([p], lr=lr)


def train_step(p, opt, grad=1.0):
    p.grad = torch.full_like(p, grad)
    opt.step()


@pytest.mark.parametrize("cls", list(FORMULAS))
def test_curve_matches_formula(cls):
    p, opt = lamb_with_param()
    sched = cls(opt, warmup=WARMUP, total_steps=TOTAL)
    seen = []
    for _ in range(TOTAL + 5):  # also past the end: decays stay at 0, never negative / complex
        sched.step()  # NVIDIA's order: before the optimizer step
        seen.append(opt.param_groups[0]["lr"])
        train_step(p, opt)
    expected = [FORMULAS[cls](s) for s in range(1, TOTAL + 6)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert sched.get_last_lr() == [seen[-1]]


def test_poly_phase1_shape():
    """Phase-1 defaults: ramps to the peak near 28.43 % of the steps, then decays as a square root."""
    p, opt = lamb_with_param(lr=6e-3)
    sched = PolyWarmUpScheduler(opt, warmup=0.2843, total_steps=7038)
    factors = [sched.lr_factor(s) for s in range(1, 7039)]
    peak = max(range(len(factors)), key=factors.__getitem__) + 1
    assert abs(peak - 0.2843 * 7038) <= 1
    assert factors[-1] == 0.0
    assert sched.lr_factor(3519) == pytest.approx(0.5**0.5)


def test_cosine_is_not_upstreams_pi_plus_p():
    _, opt = lamb_with_param()
    sched = CosineWarmUpScheduler(opt, warmup=0.0, total_steps=100)
    assert sched.lr_factor(50) == pytest.approx(0.5)  # 0.5 (1 + cos(pi/2)); upstream gives ~0.06
    assert sched.lr_factor(100) == pytest.approx(0.0, abs=1e-15)


def test_call_order_does_not_matter():
    """Reading the optimizer's step makes scheduler-before and scheduler-after loops identical."""
    p1, opt1 = lamb_with_param()
    p2, opt2 = lamb_with_param()
    s1 = PolyWarmUpScheduler(opt1, WARMUP, TOTAL)
    s2 = PolyWarmUpScheduler(opt2, WARMUP, TOTAL)
    lrs1, lrs2 = [], []
    for _ in range(10):
        s1.step()
        lrs1.append(opt1.param_groups[0]["lr"])
        train_step(p1, opt1)
        lrs2.append(opt2.param_groups[0]["lr"])  # set by the constructor / the previous step()
        train_step(p2, opt2)
        s2.step()
    assert lrs1 == lrs2
    assert torch.equal(p1, p2)


def test_gradscaler_skipped_step_does_not_advance_schedule():
    p = nn.Parameter(torch.ones(3))
    opt = Lamb([p], lr=BASE_LR)
    sched = PolyWarmUpScheduler(opt, WARMUP, TOTAL)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    lrs = []
    for i in range(6):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        scaler.scale(p.sum()).backward()
        if i in (2, 3):  # forced fp16-style overflow
            p.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert successful_steps(opt) == 4
    formula = FORMULAS[PolyWarmUpScheduler]
    assert lrs == pytest.approx([formula(s) for s in (1, 2, 3, 3, 3, 4)], rel=1e-12)
    assert scaler.get_scale() == 2.0**6


def test_adamw_step_count_is_read_too():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = LinearWarmUpScheduler(opt, warmup=0.1, total_steps=20)
    assert successful_steps(opt) == 0
    for _ in range(3):
        train_step(p, opt)
        sched.step()
    assert successful_steps(opt) == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (4 / 20 - 1) / (0.1 - 1))


def test_state_dict_round_trip_resumes_exactly():
    """Straight run == run, save (optimizer + scheduler), rebuild, load, continue."""
    torch.manual_seed(0)
    grads = [torch.randn(3) for _ in range(12)]

    def run(p, opt, sched, steps):
        for g in steps:
            sched.step()
            p.grad = g.clone()
            opt.step()

    p_a = nn.Parameter(torch.ones(3))
    opt_a = Lamb([p_a], lr=BASE_LR)
    sched_a = PolyWarmUpScheduler(opt_a, WARMUP, 20, degree=0.7)
    run(p_a, opt_a, sched_a, grads)

    p_b = nn.Parameter(torch.ones(3))
    opt_b = Lamb([p_b], lr=BASE_LR)
    sched_b = PolyWarmUpScheduler(opt_b, WARMUP, 20, degree=0.7)
    run(p_b, opt_b, sched_b, grads[:5])
    saved = copy.deepcopy({"model": p_b.detach(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()})

    p_c = nn.Parameter(saved["model"].clone())
    opt_c = Lamb([p_c], lr=123.0)  # a wrong lr on the command line: the checkpoint wins
    opt_c.load_state_dict(saved["opt"])
    sched_c = PolyWarmUpScheduler(opt_c, warmup=0.5, total_steps=999)  # overwritten by the state
    sched_c.load_state_dict(saved["sched"])
    assert (sched_c.warmup, sched_c.total_steps, sched_c.degree) == (WARMUP, 20, 0.7)
    assert sched_c.base_lrs == [BASE_LR]
    run(p_c, opt_c, sched_c, grads[5:])
    assert torch.equal(p_a, p_c)
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]


@pytest.mark.parametrize("warmup,total", [(-0.1, 10), (1.0, 10), (0.1, 0)])
def test_bad_arguments_are_named(warmup, total):
    _, opt = lamb_with_param()
    with pytest.raises(ValueError, match="PolyWarmUpScheduler"):
        PolyWarmUpScheduler(opt, warmup=warmup, total_steps=total)
