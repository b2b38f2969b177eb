"""Lamb against a plain per-tensor reference, the parameter groups, and the builders."""
import copy
import math

import pytest
import torch
from torch import nn

import optimization
from optimization import Lamb, build_adamw, build_lamb, param_groups


def reference_lamb_step(groups, state, max_grad_norm=1.0, betas=(0.9, 0.999), eps=1e-6):
    """One LAMB step written out tensor by tensor with Python scalars (apex FusedLAMB maths)."""
    beta1, beta2 = betas
    all_grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    global_norm = math.sqrt(sum(float(gr.double().pow(2).sum()) for gr in all_grads))
    divisor = global_norm / max_grad_norm if global_norm > max_grad_norm else 1.0
    for group in groups:
        group["step"] = group.get("step", 0) + 1
        t = group["step"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.double() / divisor
            s = state.setdefault(p, {"m": torch.zeros_like(g), "v": torch.zeros_like(g)})
            s["m"] = beta1 * s["m"] + (1 - beta1) * g
            s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
            m_hat = s["m"] / (1 - beta1**t)
            v_hat = s["v"] / (1 - beta2**t)
            update = m_hat / (v_hat.sqrt() + eps)
            w = p.data.double()
            ratio = 1.0
            if group["weight_decay"] != 0:
                update = update + group["weight_decay"] * w
                w_norm, u_norm = float(w.norm()), float(update.norm())
                if w_norm > 0 and u_norm > 0:
                    ratio = w_norm / u_norm
            p.data.copy_(w - group["lr"] * ratio * update)


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,), (6, 6)]
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def set_grads(params, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale


@pytest.mark.parametrize("grad_scale", [0.01, 10.0])  # below and above the clip threshold
def test_lamb_matches_per_tensor_reference(grad_scale):
    params = make_params()
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    opt = Lamb([
        {"params": params[:2], "weight_decay": 0.01, "lr": 1e-2},
        {"params": params[2:4], "weight_decay": 0.0, "lr": 1e-2},
        {"params": params[4:], "weight_decay": 0.1, "lr": 3e-3},
    ])
    ref_groups = [
        {"params": ref_params[:2], "weight_decay": 0.01, "lr": 1e-2},
        {"params": ref_params[2:4], "weight_decay": 0.0, "lr": 1e-2},
        {"params": ref_params[4:], "weight_decay": 0.1, "lr": 3e-3},
    ]
    ref_state = {}
    for step in range(6):
        set_grads(params, seed=100 + step, scale=grad_scale)
        set_grads(ref_params, seed=100 + step, scale=grad_scale)
        opt.step()
        reference_lamb_step(ref_groups, ref_state)
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.data.double(), r.data.double(), atol=1e-6, rtol=1e-6)
    assert [g["step"] for g in opt.param_groups] == [6, 6, 6]
    # The parameters really moved, so agreement is not trivial.
    assert not torch.allclose(params[0], make_params()[0])


def test_trust_ratio_only_where_weight_decay():
    """First step: the wd = 0 group takes Adam's step lr * g / (|g| + eps), not rescaled."""
    lr = 0.05
    gen = torch.Generator().manual_seed(0)
    p_plain = nn.Parameter(torch.randn(10, 10, generator=gen) * 3)
    p_decay = nn.Parameter(p_plain.detach().clone())
    opt = Lamb([{"params": [p_plain], "weight_decay": 0.0},
                {"params": [p_decay], "weight_decay": 0.01}], lr=lr, max_grad_norm=0.0)
    before = p_plain.detach().clone()
    grad = torch.randn(10, 10, generator=gen)
    p_plain.grad, p_decay.grad = grad.clone(), grad.clone()
    opt.step()
    expected_plain = lr * grad / (grad.abs() + 1e-6)
    torch.testing.assert_close(before - p_plain.detach(), expected_plain, atol=1e-6, rtol=1e-5)
    # With decay the step is rescaled by ||w|| / ||u||: its norm is lr * ||w||.
    step_decay = before - p_decay.detach()
    torch.testing.assert_close(step_decay.norm(), lr * before.norm(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(step_decay, expected_plain + lr * 0.01 * before, atol=1e-3)


def test_trust_ratio_is_one_for_zero_weights():
    p = nn.Parameter(torch.zeros(4))
    opt = Lamb([p], lr=0.1, weight_decay=0.01, max_grad_norm=0.0)
    p.grad = torch.tensor([1.0, -1.0, 2.0, -2.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, -0.1, 0.1]), atol=1e-5, rtol=0)


def test_global_clipping_over_all_groups():
    """A huge gradient in one group shrinks the (clipped) gradient seen by the other group."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = Lamb([{"params": [a], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    a.grad = torch.full((3,), 0.1)
    b.grad = torch.full((3,), 1000.0)
    opt.step()
    global_norm = math.sqrt(3 * 0.1**2 + 3 * 1000.0**2)
    clipped_a = 0.1 / global_norm
    torch.testing.assert_close(opt.state[a]["exp_avg"], torch.full((3,), 0.1 * clipped_a))
    # Same gradients without the big one: not clipped (norm < 1).
    c = nn.Parameter(torch.ones(3))
    opt_c = Lamb([c], lr=0.1, weight_decay=0.0)
    c.grad = torch.full((3,), 0.1)
    opt_c.step()
    torch.testing.assert_close(opt_c.state[c]["exp_avg"], torch.full((3,), 0.1 * 0.1))


def test_foreach_equals_single_tensor_loop():
    """Stepping all tensors together equals stepping each tensor in its own optimizer when unclipped."""
    params = make_params(seed=3)
    singles = [nn.Parameter(p.detach().clone()) for p in params]
    together = Lamb(params, lr=1e-2, max_grad_norm=0.0)
    alone = [Lamb([s], lr=1e-2, max_grad_norm=0.0) for s in singles]
    for step in range(4):
        set_grads(params, seed=step)
        set_grads(singles, seed=step)
        together.step()
        for o in alone:
            o.step()
    for p, s in zip(params, singles):
        torch.testing.assert_close(p, s, atol=1e-7, rtol=1e-7)


def test_no_grad_param_untouched_and_state_dict_round_trip():
    params = make_params(seed=5)
    opt = Lamb(params, lr=1e-2)
    set_grads(params, seed=1)
    params[1].grad = None
    frozen = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), frozen)
    assert params[1] not in opt.state

    clone = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Lamb(clone, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved to disk: no aliasing
    assert opt2.param_groups[0]["step"] == 1
    set_grads(params, seed=2)
    set_grads(clone, seed=2)
    opt.step()
    opt2.step()
    for p, c in zip(params, clone):
        assert torch.equal(p, c)


def test_gradscaler_skip_does_not_advance_step():
    p = nn.Parameter(torch.ones(4))
    opt = Lamb([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale((p * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.param_groups[0]["step"] == 1
    moved = p.detach().clone()
    opt.zero_grad()
    p.grad = torch.tensor([1.0, float("inf"), 1.0, 1.0])
    scaler.step(opt)
    scaler.update()
    assert opt.param_groups[0]["step"] == 1
    assert torch.equal(p.detach(), moved)
    assert scaler.get_scale() == 2.0**9


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.mask_logits = nn.Parameter(torch.zeros(2, 3))
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)


class WithMaskMethod(TinyModel):
    def __init__(self):
        super().__init__()
        self.alphas = nn.Parameter(torch.zeros(5))

    def mask_parameters(self):
        return [self.alphas]


def test_param_groups_layout():
    model = TinyModel()
    groups = param_groups(model, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "mask_logits"]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.0]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(model.dense.weight)}
    assert ids[1] == {id(model.dense.bias), id(model.LayerNorm.weight), id(model.LayerNorm.bias)}
    assert ids[2] == {id(model.mask_logits)}

    # mask_parameters() wins over the name; the name-matched param then counts as an ordinary weight.
    other = WithMaskMethod()
    groups = param_groups(other)
    assert {id(p) for p in groups[2]["params"]} == {id(other.alphas)}
    assert id(other.mask_logits) in {id(p) for p in groups[0]["params"]}

    # Dense model: the mask group is still there (stable group count), just empty.
    dense = nn.Sequential(nn.Linear(2, 2))
    assert [len(g["params"]) for g in param_groups(dense)] == [1, 1, 0]


def test_build_lamb_mask_logits_get_no_decay_and_no_trust_ratio(monkeypatch):
    model = TinyModel()
    opt = build_lamb(model, lr=0.1)
    assert isinstance(opt, Lamb)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "mask_logits"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    # wd 0, no trust ratio: the first Adam step on the zero logits is exactly -lr * clipped sign.
    torch.testing.assert_close(model.mask_logits.detach(), torch.full((2, 3), -0.1), atol=1e-5, rtol=0)

    # apex importable but the model on CPU: still Lamb.
    monkeypatch.setattr(optimization, "_fused_lamb_class", lambda: type("FusedLAMB", (Lamb,), {}))
    assert type(build_lamb(TinyModel(), lr=0.1)) is Lamb


def test_build_lamb_uses_apex_when_importable_on_cuda(monkeypatch):
    class FakeFusedLAMB(Lamb):
        pass

    monkeypatch.setattr(optimization, "_fused_lamb_class", lambda: FakeFusedLAMB)
    monkeypatch.setattr(optimization, "_on_cuda", lambda groups: True)
    opt = build_lamb(TinyModel(), lr=0.1)
    assert type(opt) is FakeFusedLAMB
    assert opt.defaults["max_grad_norm"] == 1.0 and opt.defaults["eps"] == 1e-6


def test_build_adamw_groups():
    model = TinyModel()
    opt = build_adamw(model, lr=1e-3, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups] == [
        ("decay", 0.01), ("no_decay", 0.0), ("mask_logits", 0.0)]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(int(s["step"]) == 1 for s in opt.state.values())


@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"betas": (1.0, 0.999)}, {"eps": 0.0},
                                    {"weight_decay": -0.1}])
def test_lamb_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="Lamb"):
        Lamb([nn.Parameter(torch.zeros(1))], **kwargs)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
def test_lamb_on_cuda_matches_reference_and_skips_overflow():
    params = [nn.Parameter(p.detach().cuda()) for p in make_params(seed=7)]
    ref_params = [nn.Parameter(p.detach().cpu().clone()) for p in params]
    spec = [(slice(0, 2), 0.01), (slice(2, 4), 0.0), (slice(4, 5), 0.1)]
    opt = Lamb([{"params": params[s], "weight_decay": wd} for s, wd in spec], lr=1e-2)
    ref_groups = [{"params": ref_params[s], "weight_decay": wd, "lr": 1e-2} for s, wd in spec]
    ref_state = {}
    for step in range(5):
        set_grads(ref_params, seed=step, scale=3.0)
        for p, r in zip(params, ref_params):
            p.grad = r.grad.cuda()
        opt.step()
        reference_lamb_step(ref_groups, ref_state)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach().cpu().double(), r.detach().double(), atol=1e-6, rtol=1e-6)

    scaler = torch.amp.GradScaler("cuda")
    scaler.scale(torch.ones((), device="cuda"))  # creates the scale, as scaling a loss would
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    scaler.step(opt)
    scaler.update()
    assert opt.param_groups[0]["step"] == 5
    assert all(torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.cuda
@needs_cuda
def test_build_adamw_is_fused_on_cuda():
    model = TinyModel().cuda()
    opt = build_adamw(model, lr=1e-3)
    assert opt.defaults["fused"] is True
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(int(s["step"]) == 1 for s in opt.state.values())
