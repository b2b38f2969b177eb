"""sparse_attention: every fast path against the reference (SDPA with the combined -10000 bias).

On CPU FlexAttention runs eagerly and forward-only, so flex outputs are checked here and flex
gradients in the CUDA tests (skipped without a GPU)."""
import functools
import math
import warnings

import pytest
import torch

import attention_masks
import sparse_attention as sa

needs_flex = pytest.mark.skipif(not sa.flex_available(), reason="FlexAttention needs torch >= 2.5")
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def qkv(batch=3, heads=4, n=40, d=8, device="cpu", dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3)]


def right_padding(batch, n, lengths):
    pad = torch.zeros(batch, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        pad[b, length:] = True
    return pad


def keeps(n, heads):
    """Shared band+global pattern, per-head random mask, a mask with an all-dropped row, and one
    whose row 3 keeps only the last 4 keys (padding in a padded sequence)."""
    g = torch.Generator().manual_seed(1)
    band = attention_masks.pattern_mask("longformer", n, window=5, global_tokens=(0,)).float()
    random_heads = (torch.rand(heads, n, n, generator=g) > 0.7).float()
    empty_row = band.clone()
    empty_row[7] = 0.0
    padded_keys_only = random_heads.clone()
    padded_keys_only[:, 3] = 0.0
    padded_keys_only[:, 3, n - 4:] = 1.0
    return {"band": band, "random_heads": random_heads, "empty_row": empty_row, "padded_keys_only": padded_keys_only}


# ------------------------------------------------------------------------------- reference / sdpa

def test_score_bias_broadcasts_instead_of_materialising():
    pad = right_padding(2, 16, [16, 9])
    keep = torch.ones(3, 16, 16)
    assert sa.score_bias(pad, None, torch.float32).shape == (2, 1, 1, 16)
    assert sa.score_bias(None, keep, torch.float32).shape == (1, 3, 16, 16)
    bias = sa.score_bias(pad, keep[0], torch.float32)
    assert bias.shape == (2, 1, 16, 16)
    assert bias[1, 0, 0, 9].item() == sa.MASKED_BIAS and bias[1, 0, 0, 8].item() == 0.0


def explicit_attention(q, k, v, key_padding, keep):
    """The module docstring's semantics in plain ops: softmax(QKᵀ/√d + bias) @ V, the bias -10000
    for every padded key plus -10000 for every dropped key (keep = 0), so a padded dropped key gets
    -20000. Nothing is read from sparse_attention, so the oracle is independent of the code."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores + (1.0 - keep) * -10000.0 + key_padding[:, None, None, :].to(q.dtype) * -10000.0
    weights = (scores - scores.amax(dim=-1, keepdim=True).detach()).exp()
    return weights / weights.sum(dim=-1, keepdim=True) @ v


@pytest.mark.parametrize("attention", [sa.reference_attention, functools.partial(sa.masked_attention, backend="sdpa")],
                         ids=["reference", "sdpa"])
@pytest.mark.parametrize("mask_name", ["band", "random_heads", "empty_row", "padded_keys_only"])
def test_sdpa_backend_equals_explicit_softmax_with_grads(attention, mask_name):
    """Outputs and gradients w.r.t. q, k, v and a learnable keep mask. Both sides run in fp64: fp32
    rounds a score minus 10000 to ~1e-3, which shows (1e-4 errors) in the rows attending through
    that bias, the all-dropped row and the padded-keys-only row."""
    q, k, v = qkv(dtype=torch.float64, grad=True)
    keep = keeps(40, 4)[mask_name].double().requires_grad_(True)
    pad = right_padding(3, 40, [40, 25, 33])
    out = attention(q, k, v, pad, keep)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, keep))
    expected = explicit_attention(q, k, v, pad, keep)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v, keep))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    # keep's gradient is 10000 x the score bias's (up to ~1e5 here): compared at the bias's scale.
    for got, want, name, scale in zip(grads, expected_grads, ("q", "k", "v", "keep"), (1, 1, 1, 1e-4)):
        torch.testing.assert_close(got * scale, want * scale, atol=1e-12, rtol=1e-10, msg=name)
    assert grads[3].abs().sum() > 0  # the mask gets a gradient


def test_auto_is_reference_on_cpu_and_keeps_dropout():
    q, k, v = qkv()
    assert sa.resolve_backend(q.device, torch.ones(40, 40), 0.0, "auto") == "sdpa"
    torch.manual_seed(3)
    a = sa.masked_attention(q, k, v, None, torch.ones(40, 40), dropout_p=0.5)
    torch.manual_seed(3)
    b = sa.reference_attention(q, k, v, None, torch.ones(40, 40), dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, sa.reference_attention(q, k, v, None, torch.ones(40, 40)))


def test_bad_arguments_are_clear_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown"):
        sa.masked_attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match="slice it"):
        sa.masked_attention(q, k, v, keep=torch.ones(64, 64))
    if sa.flex_available():
        with pytest.raises(ValueError, match="no attention dropout"):
            sa.masked_attention(q, k, v, keep=torch.ones(40, 40), dropout_p=0.1, backend="flex")
        with pytest.raises(ValueError, match="no backward on CPU"):
            sa.masked_attention(q.requires_grad_(True), k, v, keep=torch.ones(40, 40), backend="flex")


# ------------------------------------------------------------------------------- block masks

def brute_force_layout(keep, pad, block_size):
    """[B', H', nb, nb] (any, all) over kept & real entries, by looping over tiles."""
    n = keep.shape[-1] if keep is not None else pad.shape[-1]
    nb = -(-n // block_size)
    heads = keep.shape[0] if keep is not None else 1
    batch = pad.shape[0] if pad is not None else 1
    any_t = torch.zeros(batch, heads, nb, nb, dtype=torch.bool)
    all_t = torch.zeros_like(any_t)
    for b in range(batch):
        for h in range(heads):
            allowed = torch.ones(n, n, dtype=torch.bool) if keep is None else keep[h].bool().clone()
            if pad is not None:
                allowed &= ~pad[b][None, :]
            full = torch.zeros(nb * block_size, nb * block_size, dtype=torch.bool)
            full[:n, :n] = allowed
            for i in range(nb):
                for j in range(nb):
                    tile = full[i * block_size:(i + 1) * block_size, j * block_size:(j + 1) * block_size]
                    any_t[b, h, i, j], all_t[b, h, i, j] = tile.any(), tile.all()
    return any_t, all_t


@pytest.mark.parametrize("block_size", [4, 8, 16])
@pytest.mark.parametrize("with_padding", [False, True])
def test_block_layouts_mark_exactly_tiles_with_kept_entries(block_size, with_padding):
    keep = keeps(40, 4)["random_heads"].bool()
    keep[:, 16:32, 16:32] = False  # whole empty tiles at every block size
    keep[:, 0:16, 0:16] = True     # whole full tiles
    pad = right_padding(3, 40, [40, 25, 33]) if with_padding else None
    partial, full = sa.block_layouts(keep, block_size, pad)
    any_t, all_t = brute_force_layout(keep, pad, block_size)
    assert torch.equal(partial | full, any_t)
    assert torch.equal(full, all_t)
    assert not (partial & full).any()
    assert (~any_t).any() and all_t.any()  # the fixture exercises skipped and full tiles


@needs_flex
@pytest.mark.parametrize("block_size", [8, 16])
def test_block_mask_from_keep_has_the_layout_and_token_mask(block_size):
    n = 48
    keep = attention_masks.pattern_mask("longformer", n, window=7, global_tokens=(0,))
    pad = right_padding(2, n, [48, 30])
    block_mask = sa.block_mask_from_keep(keep, block_size, pad)
    any_t, all_t = brute_force_layout(keep[None], pad, block_size)
    assert torch.equal(block_mask.to_dense().bool(), any_t)  # tiles visited = tiles with a kept entry
    assert torch.equal(block_mask.full_kv_num_blocks, all_t.sum(-1, dtype=torch.int32))
    # the mask_mod applies the exact token mask inside partial tiles
    b, h, qi, ki = torch.meshgrid(torch.arange(2), torch.arange(1), torch.arange(n), torch.arange(n), indexing="ij")
    token = block_mask.mask_mod(b, h, qi, ki)
    assert torch.equal(token, keep[None, None] & ~pad[:, None, None, :])


@needs_flex
def test_block_mask_keeps_all_dropped_rows_whole():
    keep = keeps(32, 1)["empty_row"].bool()
    block_mask = sa.block_mask_from_keep(keep, 8)
    b, h, qi, ki = torch.meshgrid(torch.arange(1), torch.arange(1), torch.arange(32), torch.arange(32), indexing="ij")
    assert block_mask.mask_mod(b, h, qi, ki)[0, 0, 7].all()


# ------------------------------------------------------------------------------- flex (CPU: forward)

@needs_flex
@pytest.mark.parametrize("mask_name", ["band", "random_heads", None])
@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("block_size", [8, 128])
def test_flex_block_sparse_forward_equals_reference(mask_name, with_padding, block_size):
    q, k, v = qkv()
    keep = keeps(40, 4)[mask_name] if mask_name else None
    pad = right_padding(3, 40, [40, 25, 33]) if with_padding else None
    with torch.no_grad():  # nothing to mask at all: flex runs with no block mask, still the reference
        out = sa.masked_attention(q, k, v, pad, keep, backend="flex", block_size=block_size)
        ref = sa.reference_attention(q, k, v, pad, keep)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@needs_flex
def test_flex_all_dropped_row_attends_as_if_unmasked():
    """Row 7 drops every key: the reference's uniform -10000 shift leaves it unmasked (up to the
    fp32 rounding of score - 10000); the block path must do the same, other rows exactly."""
    q, k, v = qkv()
    keep = keeps(40, 4)["empty_row"]
    pad = right_padding(3, 40, [40, 25, 33])
    with torch.no_grad():
        out = sa.masked_attention(q, k, v, pad, keep, backend="flex", block_size=8)
        ref = sa.reference_attention(q, k, v, pad, keep)
        unmasked = sa.reference_attention(q, k, v, pad, None)
    others = [i for i in range(40) if i != 7]
    torch.testing.assert_close(out[..., others, :], ref[..., others, :], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out[..., 7, :], unmasked[..., 7, :], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out[..., 7, :], ref[..., 7, :], atol=2e-3, rtol=0)


@needs_flex
@pytest.mark.parametrize("block_size", [8, 16])
def test_flex_row_whose_kept_keys_are_all_padding_attends_over_real_keys(block_size):
    """Row 3 keeps only padded keys in the padded sequences: the frozen block path must attend over
    every real key (as the learnable flex path does), not return a zero row; other rows match."""
    q, k, v = qkv()
    keep = keeps(40, 4)["random_heads"]
    keep[1, 3] = 0.0
    keep[1, 3, 36:] = 1.0  # padding in sequences 1 and 2 (lengths 25, 33), real in sequence 0
    pad = right_padding(3, 40, [40, 25, 33])
    with torch.no_grad():
        out = sa.masked_attention(q, k, v, pad, keep, backend="flex", block_size=block_size)
        learnable = sa.flex_attention(q, k, v, score_mod=sa._bias_score_mod(keep),
                                      block_mask=sa.block_mask_from_keep(None, block_size, pad))
        ref = sa.reference_attention(q, k, v, pad, keep)
        unmasked = sa.reference_attention(q, k, v, pad, None)
    torch.testing.assert_close(out[0], ref[0], atol=2e-6, rtol=1e-5)
    others = [h for h in range(4) if h != 1]
    torch.testing.assert_close(out[:, others], ref[:, others], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out[1:, 1, 3], unmasked[1:, 1, 3], atol=2e-6, rtol=1e-5)
    # the learnable path shifts every real key by -10000: equal up to the fp32 rounding of that shift
    torch.testing.assert_close(out, learnable, atol=2e-3, rtol=0)


@needs_flex
def test_flex_learnable_bias_forward_equals_reference():
    """The DAM path (score_mod over a captured bias + padding block mask), forward on CPU."""
    q, k, v = qkv()
    keep = keeps(40, 4)["random_heads"]
    pad = right_padding(3, 40, [40, 25, 33])
    with torch.no_grad():
        ref = sa.reference_attention(q, k, v, pad, keep)
    score_mod = sa._bias_score_mod(keep)
    block_mask = sa.block_mask_from_keep(None, 8, pad)
    with torch.no_grad():
        out = sa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@needs_flex
def test_prebuilt_block_mask_is_used():
    q, k, v = qkv(batch=1, n=32)
    keep = torch.ones(32, 32)
    only_first_tile = sa.block_mask_from_keep(torch.block_diag(torch.ones(16, 16), torch.zeros(16, 16)).bool(), 16)
    with torch.no_grad():
        out = sa.masked_attention(q, k, v, keep=keep, backend="flex", block_mask=only_first_tile)
        dense = sa.reference_attention(q, k, v)
    torch.testing.assert_close(out[..., :16, :], sa.reference_attention(q[..., :16, :], k[..., :16, :], v[..., :16, :]))
    assert not torch.allclose(out[..., :16, :], dense[..., :16, :])


# ------------------------------------------------------------------------------- CUDA

def _cuda_case(mask_name, grad_keep, dtype):
    q, k, v = qkv(batch=2, heads=4, n=256, d=64, device="cuda", dtype=dtype, grad=True)
    keep = attention_masks.pattern_mask("longformer", 256, window=31, global_tokens=(0,)).float()
    if mask_name == "random_heads":
        keep = (torch.rand(4, 256, 256, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    keep = keep.cuda().requires_grad_(grad_keep)
    pad = right_padding(2, 256, [256, 200]).cuda()
    return q, k, v, keep, pad


@cuda
@needs_cuda
@needs_flex
@pytest.mark.parametrize("mask_name", ["band", "random_heads"])
@pytest.mark.parametrize("grad_keep", [False, True])
def test_cuda_flex_matches_reference_outputs_and_grads(mask_name, grad_keep):
    q, k, v, keep, pad = _cuda_case(mask_name, grad_keep, torch.float32)
    out = sa.masked_attention(q, k, v, pad, keep, backend="flex", block_size=128)
    inputs = (q, k, v, keep) if grad_keep else (q, k, v)
    # The loss reads real query rows only, as a model's loss does. A padded query row here sees a
    # single key, so its score gradient is pure rounding noise — which d(bias)/d(keep) = 10^4 would
    # blow up into a spurious mismatch of the keep gradient.
    real_rows = (~pad)[:, None, :, None].to(out.dtype)
    grads = torch.autograd.grad((out.square() * real_rows).sum(), inputs)
    copies = [t.detach().clone().requires_grad_(True) for t in inputs]
    ref_inputs = copies if grad_keep else copies + [keep]
    ref = sa.reference_attention(*ref_inputs[:3], pad, ref_inputs[3])
    ref_grads = torch.autograd.grad((ref.square() * real_rows).sum(), copies)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)


@cuda
@needs_cuda
def test_cuda_auto_and_sdpa_bf16_match_fp32_reference():
    q, k, v, keep, pad = _cuda_case("band", True, torch.bfloat16)
    ref = sa.reference_attention(q.float(), k.float(), v.float(), pad, keep.float())
    for backend in ("auto", "sdpa"):
        out = sa.masked_attention(q, k, v, pad, keep, backend=backend)
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
        out.float().sum().backward()
        assert torch.isfinite(keep.grad).all()
        keep.grad = None


def test_prepare_layers_follow_the_path():
    keep = torch.ones(2, 1, 16, 16)
    pad = right_padding(2, 16, [16, 9])
    options = dict(device=torch.device("cpu"), dtype=torch.float32, dropout_p=0.0)
    layers = sa.prepare_layers(keep, pad, **options)  # auto on CPU = sdpa, one per layer mask
    assert [a.backend for a in layers] == ["sdpa", "sdpa"] and layers[0].bias.shape == (2, 1, 16, 16)
    no_mask = sa.prepare_layers(None, pad, **options)
    assert len(no_mask) == 1 and no_mask[0].bias.shape == (2, 1, 1, 16)  # padding only: never [B, H, n, n]
    if sa.flex_available():
        with torch.no_grad():
            flex = sa.prepare_layers(keep, pad, backend="flex", block_size=8, **options)
        assert len(flex) == 2 and flex[0].block_mask.kv_num_blocks.shape[0] == 2  # per layer, per batch
        learnable = keep.clone().requires_grad_(True)
        with pytest.raises(ValueError, match="no backward on CPU"):
            sa.prepare_layers(learnable, pad, backend="flex", **options)
        with pytest.raises(ValueError, match="no attention dropout"):
            sa.prepare_layers(keep, pad, backend="flex", **{**options, "dropout_p": 0.1})


@cuda
@needs_cuda
@needs_flex
def test_cuda_auto_sends_long_enough_masks_to_flex():
    n = sa.FLEX_MIN_LEARNABLE_SEQ_LEN
    keep = torch.ones(2, 1, n, n, device="cuda", requires_grad=True)
    pad = right_padding(2, n, [n, n - 100]).cuda()
    options = dict(device=torch.device("cuda"), dtype=torch.bfloat16)
    learnable = sa.prepare_layers(keep, pad, dropout_p=0.0, **options)
    assert [a.backend for a in learnable] == ["flex", "flex"] and learnable[0].score_mod is not None
    assert learnable[0].block_mask.kv_num_blocks.shape[:2] == (2, 1)  # padding only, per batch
    assert [a.backend for a in sa.prepare_layers(keep, pad, dropout_p=0.1, **options)] == ["sdpa", "sdpa"]
    assert [a.backend for a in sa.prepare_layers(keep.detach(), pad, dropout_p=0.0, **options)] == ["sdpa", "sdpa"]
    short = keep[..., :n // 2, :n // 2]
    assert sa.prepare_layers(short, pad[:, :n // 2], dropout_p=0.0, **options)[0].backend == "sdpa"
    long_keep = torch.ones(1, 1, sa.FLEX_MIN_FROZEN_SEQ_LEN, sa.FLEX_MIN_FROZEN_SEQ_LEN, device="cuda")
    assert sa.prepare_layers(long_keep, None, dropout_p=0.0, **options)[0].backend == "flex"
