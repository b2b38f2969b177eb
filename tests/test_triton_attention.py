"""triton_attention: the fused kernel's outputs and gradients (q, k, v and the mask) against the
SDPA reference, without and with attention dropout.

Without a CUDA device the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set
before triton_attention (whose @triton.jit decorators read it) is first imported. Shapes are
the model's scaled down (n = 32 and 64 stand for 128 and 512, tiles of 16 / 32, head dim 16),
plus lengths that are no multiple of a tile. Most checks run in fp64, where the kernel and the
reference agree to rounding; fp32 rounds a score minus 10000 to ~1e-3 (see test_sparse_attention).
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import attention_masks  # noqa: E402
import bench_attention as ba  # noqa: E402
import bench_pretraining as bp  # noqa: E402
import sparse_attention as sa  # noqa: E402
import triton_attention as ta  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64


def qkv(batch, heads, n, d=16, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=g, dtype=F64).to(DEVICE, dtype).requires_grad_()
            for _ in range(3)]


def case(n, heads_bias, heads=2, batch=2, padding=True, empty_row=False, padded_keys_only=False, seed=1):
    """(key_padding [B, n] or None, keep [H', n, n] fp64 random 0/1 mask requiring grad).

    ``empty_row``: query row 5 drops every key. ``padded_keys_only``: row 3 keeps only the last
    3 keys, which are padding in the second sequence."""
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(heads_bias, n, n, generator=g) > 0.6).to(F64)
    if empty_row:
        keep[:, 5] = 0.0
    if padded_keys_only:
        keep[:, 3] = 0.0
        keep[:, 3, n - 3:] = 1.0
    pad = None
    if padding:
        pad = torch.zeros(batch, n, dtype=torch.bool)
        pad[-1, n - max(n // 4, 3):] = True
        pad = pad.to(DEVICE)
    return pad, keep.to(DEVICE).requires_grad_()


def triton_run(q, k, v, pad, keep, dropout_p=0.0, seed=None, blocks=(16, 16)):
    bias = None if keep is None else ta.keep_bias(keep)
    padding = None if pad is None else ta.padding_bias(pad, q.dtype)
    return ta.fused_attention(q, k, v, bias, padding, dropout_p, seed=seed, block_m=blocks[0], block_n=blocks[1])


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)


def max_errors(triton_side, reference_side):
    return [(a - b).abs().max().item() for a, b in zip(triton_side, reference_side)]


def assert_close_all(triton_side, reference_side, rtol, atol):
    for name, a, b in zip(("out", "dq", "dk", "dv", "dkeep"), triton_side, reference_side):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def compare_with_reference(q, k, v, pad, keep, blocks, rtol=1e-9, atol=1e-9):
    out = triton_run(q, k, v, pad, keep, blocks=blocks)
    ref = sa.reference_attention(q, k, v, pad, keep)
    grad_out = torch.randn_like(ref)
    inputs = (q, k, v, keep)
    assert_close_all([out, *grads(out, inputs, grad_out)], [ref, *grads(ref, inputs, grad_out)], rtol, atol)


CASES = {  # name: (n, H', blocks, case options)
    "n128_scaled_per_head_padding_empty_row": (32, 2, (16, 16), dict(empty_row=True)),
    "n512_scaled_shared_mask_padding": (64, 1, (16, 32), dict()),
    "n512_scaled_per_head_empty_and_padded_rows": (64, 2, (32, 16), dict(empty_row=True, padded_keys_only=True)),
    "ragged_40_shared_mask_empty_row": (40, 1, (16, 16), dict(empty_row=True, padded_keys_only=True)),
    "ragged_24_one_tile_no_padding": (24, 2, (32, 32), dict(padding=False, empty_row=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_all_grads_match_reference_fp64(name):
    n, heads_bias, blocks, options = CASES[name]
    q, k, v = qkv(2, 2, n)
    pad, keep = case(n, heads_bias, **options)
    compare_with_reference(q, k, v, pad, keep, blocks)


@pytest.mark.parametrize("with_mask, with_padding", [(False, True), (False, False)])
def test_padding_only_and_dense_match_reference(with_mask, with_padding):
    q, k, v = qkv(2, 2, 40)
    pad, keep = case(40, 1, padding=with_padding)
    compare_with_reference(q, k, v, pad, keep if with_mask else None, (16, 16))


def test_keep_mask_of_one_head_dim_less_and_soft_values():
    """A [n, n] keep (shared over heads) with soft values in (0, 1), as the straight-through
    gradient sees them: the bias gradient is reduced over batch and heads."""
    g = torch.Generator().manual_seed(3)
    q, k, v = qkv(3, 2, 32)
    keep = torch.rand(32, 32, generator=g, dtype=F64).to(DEVICE).requires_grad_()
    pad, _ = case(32, 1, batch=3)
    compare_with_reference(q, k, v, pad, keep, (16, 16))


def test_fp32_is_as_close_to_fp64_as_sdpa_in_fp32():
    """fp32 inputs, fp32 accumulators: the error against the fp64 reference stays within twice
    SDPA's own fp32 error (rows without a kept key shift by -10000, which fp32 rounds)."""
    n = 40
    q, k, v = qkv(2, 2, n, dtype=torch.float32)
    pad, keep = case(n, 2, empty_row=True, padded_keys_only=True)
    keep32 = keep.detach().float().requires_grad_()
    grad_out = torch.randn(2, 2, n, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    inputs = (q, k, v, keep32)
    out = triton_run(q, k, v, pad, keep32)
    tri = [out, *grads(out, inputs, grad_out)]
    sdpa = sa.reference_attention(q, k, v, pad, keep32)
    sdpa = [sdpa, *grads(sdpa, inputs, grad_out)]
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    exact = sa.reference_attention(*exact_inputs[:3], pad, exact_inputs[3])
    exact = [exact, *grads(exact, exact_inputs, grad_out.double())]
    for name, a, b, c in zip(("out", "dq", "dk", "dv", "dkeep"), tri, sdpa, exact):
        kernel_error, sdpa_error = (a.double() - c).abs().max().item(), (b.double() - c).abs().max().item()
        assert kernel_error <= max(2 * sdpa_error, 1e-5 * c.abs().max().item()), (name, kernel_error, sdpa_error)


# ------------------------------------------------------------------------------------ dropout

def reference_with_dropout(q, k, v, pad, keep, pattern, p):
    """The reference's softmax (SDPA's -10000 bias arithmetic), then the explicit dropout
    ``pattern`` (bool [B, H, n, n], True = kept) scaled by 1 / (1 - p), then @ v."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + sa.score_bias(pad, keep, q.dtype)
    probs = torch.softmax(scores, dim=-1)
    return (probs * pattern / (1.0 - p)) @ v


@pytest.mark.parametrize("n, heads_bias, blocks, options", [
    (32, 2, (16, 16), dict(empty_row=True)),
    (40, 1, (16, 32), dict(empty_row=True, padded_keys_only=True)),
    (64, 2, (32, 32), dict()),
], ids=["n128_scaled_per_head", "ragged_40_shared", "n512_scaled_per_head"])
def test_dropout_matches_reference_with_the_kernels_own_pattern(n, heads_bias, blocks, options):
    p, seed = 0.25, 1234  # exact in fp32, the dtype a GPU kernel receives p in
    q, k, v = qkv(2, 2, n)
    pad, keep = case(n, heads_bias, **options)
    pattern = ta.dropout_keep_mask(seed, 2, 2, n, p, DEVICE)
    assert abs(pattern.double().mean().item() - (1 - p)) < 0.03
    out = triton_run(q, k, v, pad, keep, p, seed, blocks)
    ref = reference_with_dropout(q, k, v, pad, keep, pattern, p)
    grad_out = torch.randn_like(ref)
    inputs = (q, k, v, keep)
    assert_close_all([out, *grads(out, inputs, grad_out)], [ref, *grads(ref, inputs, grad_out)], 1e-9, 1e-9)


def test_dropout_pattern_follows_the_seed_and_differs_per_batch_and_head():
    first, again = ta.dropout_keep_mask(7, 2, 2, 32, 0.5), ta.dropout_keep_mask(7, 2, 2, 32, 0.5)
    other = ta.dropout_keep_mask(8, 2, 2, 32, 0.5)
    assert torch.equal(first, again) and not torch.equal(first, other)
    flat = first.flatten(0, 1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(4) for j in range(i))
    q, k, v = qkv(2, 2, 32)
    with torch.no_grad():
        runs = [triton_run(q, k, v, None, None, 0.5, seed) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_no_batch_by_heads_by_n_by_n_tensor_is_saved_for_backward():
    batch, heads, n = 3, 2, 32
    q, k, v = qkv(batch, heads, n)
    pad, keep = case(n, 1, batch=batch, heads=heads)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = triton_run(q, k, v, pad, keep, 0.1, seed=3)
    out.sum().backward()
    assert saved and max(saved) < batch * heads * n * n
    assert keep.grad.shape == keep.shape


def test_bad_arguments_are_clear_errors():
    q, k, v = qkv(1, 2, 32)
    with pytest.raises(ValueError, match="bias must be"):
        ta.fused_attention(q, k, v, torch.zeros(3, 32, 32, dtype=F64, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p"):
        ta.fused_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="block_m=24"):
        ta.fused_attention(q, k, v, block_m=24)
    with pytest.raises(ValueError, match="padding bias must be a float"):
        ta.fused_attention(q, k, v, pad=torch.zeros(1, 32, dtype=torch.bool, device=DEVICE))


def test_gradients_of_any_strides_match_contiguous_inputs():
    """q, k, v as the model makes them (a transposed view) and the all-zero-stride gradient of
    out.sum(): the same gradients as contiguous copies."""
    batch, heads, n, d = 2, 2, 32, 16
    base = torch.randn(3, batch, n, heads, d, generator=torch.Generator().manual_seed(4), dtype=F64).to(DEVICE)
    views = [t.transpose(1, 2).requires_grad_() for t in base.unbind(0)]  # leaves in [B, H, n, d] layout
    copies = [t.detach().contiguous().requires_grad_() for t in views]
    pad, keep = case(n, 1)
    for inputs in (views, copies):
        triton_run(*inputs, pad, keep).sum().backward()
    for view, copy in zip(views, copies):
        torch.testing.assert_close(view.grad, copy.grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- sparse_attention hook

def test_backend_triton_through_masked_attention_and_prepare_layers():
    n = 40
    q, k, v = qkv(2, 2, n)
    pad, keep = case(n, 2, empty_row=True)
    layers = sa.prepare_layers(keep[None], pad, device=q.device, dtype=q.dtype, dropout_p=0.0, backend="triton")
    assert [layer.backend for layer in layers] == ["triton"] and layers[0].bias.shape == (2, n, n)
    assert layers[0].padding.shape == (2, n)
    out = layers[0](q, k, v)
    ref = sa.masked_attention(q, k, v, pad, keep, backend="sdpa")
    grad_out = torch.randn_like(ref)
    inputs = (q, k, v, keep)
    assert_close_all([out, *grads(out, inputs, grad_out)], [ref, *grads(ref, inputs, grad_out)], 1e-9, 1e-9)
    torch.testing.assert_close(sa.masked_attention(q, k, v, pad, keep, backend="triton"), ref, rtol=1e-9, atol=1e-9)


def test_dam_mask_logits_get_the_reference_gradient_through_triton():
    """The DAM module's straight-through keep reaches the kernel as a grad-requiring bias; its
    logits' gradient matches the sdpa path's."""
    n, heads = 32, 2
    mask = attention_masks.DifferentiableMask(attention_masks.MaskConfig(
        attention_mask_type="dam_u", mask_seq_length=n, num_hidden_layers=1, num_attention_heads=heads)).to(DEVICE)
    q, k, v = qkv(2, heads, n, dtype=torch.float32)
    pad, _ = case(n, 1)
    grad_out = torch.randn(2, heads, n, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits_grads = []
    for backend in ("triton", "sdpa"):
        torch.manual_seed(0)  # the same Gumbel sample for both
        keep = mask(n)
        (attend,) = sa.prepare_layers(keep, pad, device=q.device, dtype=q.dtype, dropout_p=0.0, backend=backend)
        (logits_grad,) = torch.autograd.grad(attend(q, k, v), mask.mask_logits, grad_out)
        logits_grads.append(logits_grad)
    assert logits_grads[0].abs().max() > 0
    torch.testing.assert_close(logits_grads[0], logits_grads[1], rtol=1e-4, atol=1e-3)


def test_auto_never_picks_triton_on_cpu_and_a_missing_interpreter_is_a_clear_error(monkeypatch):
    keep = torch.ones(1, 8, 8, requires_grad=True)
    assert sa.resolve_backend(torch.device("cpu"), keep, 0.1, "auto", 8) == "sdpa"
    if ta.INTERPRETED:
        assert sa.resolve_backend(torch.device("cpu"), keep, 0.1, "triton", 8) == "triton"
    monkeypatch.setattr(ta, "INTERPRETED", False)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA device"):
        sa.resolve_backend(torch.device("cpu"), keep, 0.1, "triton", 8)


# --------------------------------------------------------------------------------- model, benches

def test_bert_pretraining_with_the_triton_backend_matches_sdpa():
    """The whole model (DAM_u mask, padding): the same loss and mask-logit gradient as the sdpa
    backend without attention dropout; with dropout 0.1 a finite loss and a mask gradient."""
    batch = bp.make_batch(2, 32, 0.3, torch.device(DEVICE), seed=0)
    assert (batch.attention_mask == 0).any()
    results = []
    for mode, dropout_p in (("dam_u_triton", 0.0), ("dam_u", 0.0), ("dam_u_triton", 0.1)):
        torch.manual_seed(0)  # the same weights, Gumbel samples and hidden dropout for each
        model = bp.our_model(bp.PRESETS["tiny"], mode, "longformer", 32, dropout_p).to(DEVICE).train()
        loss = bp.our_loss(model, batch)
        (logits_grad,) = torch.autograd.grad(loss, model.bert.sparse_mask.mask_logits)
        results.append((loss.detach(), logits_grad))
    (triton_loss, triton_grad), (sdpa_loss, sdpa_grad), (dropout_loss, dropout_grad) = results
    torch.testing.assert_close(triton_loss, sdpa_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triton_grad, sdpa_grad, rtol=1e-3, atol=1e-6)
    assert torch.isfinite(dropout_loss) and dropout_loss != triton_loss
    assert torch.isfinite(dropout_grad).all() and dropout_grad.abs().max() > 0


def test_bench_attention_triton_paths_run_and_clear_their_grads():
    device = torch.device(DEVICE)
    keep = ba.band_global_mask(32, 16, "block").to(device)
    q, k, v = ba.make_inputs(1, 2, 32, 16, device, torch.float32)
    for path in sorted(ba.TRITON_PATHS):
        fn, learned = ba.build_path(path, q, keep, 16, device, None)
        ba.time_path(fn, learned, q, k, v, warmup=0, iters=1, device=device)
        assert all(t.grad is None for t in (q, k, v, *learned)), path


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_with_default_tiles_is_as_close_as_sdpa(dtype):
    """BERT's shapes (n = 512, d = 64) in half precision with the default GPU tiles: against the
    fp64 reference, the kernel's error stays within twice SDPA's own in the same dtype. The loss
    reads real query rows only (a padded row's keep gradient is rounding noise times 10^4)."""
    n = 512
    q, k, v = qkv(2, 4, n, d=64, dtype=dtype)
    pad, keep = case(n, 4, heads=4, empty_row=True)
    keep = keep.detach().float().requires_grad_()
    real_rows = (~pad)[:, None, :, None]
    inputs = (q, k, v, keep)

    def run(attention):
        out = attention()
        return [out, *grads((out.float().square() * real_rows).sum(), inputs, None)]

    tri = run(lambda: triton_run(q, k, v, pad, keep, blocks=(None, None)))
    sdpa = run(lambda: sa.reference_attention(q, k, v, pad, keep))
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    exact = sa.reference_attention(*exact_inputs[:3], pad, exact_inputs[3])
    exact = [exact, *grads((exact.square() * real_rows).sum(), exact_inputs, None)]
    for name, a, b, c in zip(("out", "dq", "dk", "dv", "dkeep"), tri, sdpa, exact):
        kernel_error, sdpa_error = (a.double() - c).abs().max().item(), (b.double() - c).abs().max().item()
        assert kernel_error <= 2 * sdpa_error + 1e-3 * c.abs().max().item(), (name, kernel_error, sdpa_error)
