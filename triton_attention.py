"""Fused attention in Triton (FlashAttention-2 tiling): forward and backward, with attention
dropout, an additive bias shared over the batch, and key padding.

Semantics are `sparse_attention.reference_attention`'s:

    out = dropout(softmax(q kᵀ / √d + padding[b, j] + bias[h', i, j])) @ v

with ``padding`` = key_padding * -10000 ([B, n]) and ``bias`` = (1 - keep) * -10000 ([H', n, n],
H' = 1 or H). The bias is added exactly as the reference adds it, so an all-dropped query row
attends as if unmasked there too. Nothing of size [B, H, n, n] is ever stored:

  * forward: one program per (q-tile, batch·head) runs an online softmax over the key tiles and
    saves the output and each row's log-sum-exp ([B, H, n], fp32; fp64 for fp64 inputs).
  * dropout: entry (b, h, i, j) is kept when Philox ``tl.rand(key, i·n + j) >= p``, the key being
    (the call's seed, b·H + h). Counter-based, so the backward regenerates the forward's pattern
    from the seed alone; the pattern is never stored (`dropout_keep_mask` rebuilds it, for checks).
  * backward: one program per (key-tile, batch·head) walks the q-tiles, keeps dK and dV in
    registers, and adds dQ and the bias gradient atomically into fp32 (fp64) buffers. The bias gradient
    lands on [H', n, n] directly, so its reduction over the batch (and over heads when H' = 1)
    happens inside the kernel.

On a CPU, Triton's interpreter runs these kernels when TRITON_INTERPRET=1 is in the environment
before this module is imported (slow; for tests).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

MASKED_BIAS = -10000.0  # sparse_attention's additive bias of a dropped or padded key
MIN_BLOCK = 16  # tl.dot needs every tile side >= 16
# Default tiles; not yet tuned on a GPU (none was available when the kernels were written).
GPU_BLOCK_M = 64
GPU_BLOCK_N = 64
MAX_HEAD_DIM = 128  # the largest head dim the tiles are sized for (BERT's is 64)
SEED_RANGE = 2 ** 31 - 1  # dropout seeds are drawn from [1, SEED_RANGE)


def _interpreting() -> bool:
    if hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once: @triton.jit decides at decoration (this import) whether a kernel is interpreted.
INTERPRETED = _interpreting()


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dropout_keep(seed, bh, rows, cols, n, p_drop):
    """Bool [BLOCK_M, BLOCK_N]: which probabilities of this tile survive dropout."""
    key = tl.cast(seed, tl.int64) + (tl.cast(bh, tl.int64) << 32)  # Philox key (seed, batch·head)
    return tl.rand(key, rows[:, None] * n + cols[None, :]) >= p_drop


@triton.jit
def _scores(q, k, Bias, Pad, rows, cols, n, scale, s_bias_m,
            HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_M, BLOCK_N] scores q kᵀ·scale + (padding + bias) in ACC; keys past n get -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale
    in_rows, in_cols = rows < n, cols < n
    if HAS_BIAS:
        add = tl.load(Bias + rows[:, None] * s_bias_m + cols[None, :],
                      mask=in_rows[:, None] & in_cols[None, :], other=0.0)
        if HAS_PAD:
            add = tl.load(Pad + cols, mask=in_cols, other=0.0)[None, :] + add
        s = s + add
    elif HAS_PAD:
        s = s + tl.load(Pad + cols, mask=in_cols, other=0.0)[None, :]
    return tl.where(in_cols[None, :], s, float("-inf"))


@triton.jit
def _tile_ptrs(base, idx, s_row, dims):
    return base + idx[:, None] * s_row + dims[None, :]


@triton.jit(do_not_specialize=["seed"])
def _forward_kernel(Q, K, V, Bias, Pad, Out, Lse,
                    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
                    s_bias_h, s_bias_m, s_pad_b,
                    H, n, d, scale, p_drop, seed,
                    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr,
                    PRECISION: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = (rows[:, None] < n) & (dims[None, :] < d)
    q = tl.load(_tile_ptrs(Q + b * s_qb + h * s_qh, rows, s_qn, dims), mask=row_ok, other=0.0)
    Bias += h * s_bias_h
    Pad += b * s_pad_b
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = (cols[:, None] < n) & (dims[None, :] < d)
        k = tl.load(_tile_ptrs(K, cols, s_kn, dims), mask=col_ok, other=0.0)
        v = tl.load(_tile_ptrs(V, cols, s_vn, dims), mask=col_ok, other=0.0)
        s = _scores(q, k, Bias, Pad, rows, cols, n, scale, s_bias_m, HAS_BIAS, HAS_PAD, PRECISION, ACC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        prob = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)  # the softmax normaliser counts dropped entries too
        if DROPOUT:
            prob = tl.where(_dropout_keep(seed, bh, rows, cols, n, p_drop), prob, 0.0)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
    tl.store(Lse + bh * n + rows, m_i + tl.log(l_i), mask=rows < n)
    if DROPOUT:
        l_i = l_i * (1.0 - tl.cast(p_drop, ACC))  # kept entries are scaled by 1 / (1 - p)
    acc = acc / l_i[:, None]
    tl.store(_tile_ptrs(Out + b * s_ob + h * s_oh, rows, s_on, dims), acc.to(Out.dtype.element_ty), mask=row_ok)


@triton.jit(do_not_specialize=["seed"])
def _backward_kernel(Q, K, V, Bias, Pad, DO, Lse, Delta, DQ, DK, DV, DBias,
                     s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_don,
                     s_bias_h, s_bias_m, s_pad_b, s_dbias_h,
                     H, n, d, scale, p_drop, seed,
                     HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, DROPOUT: tl.constexpr,
                     BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ, dK, dV (contiguous [B, H, n, d]; dQ accumulated in ACC) and dBias (ACC [H', n, n], accumulated)."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = (cols[:, None] < n) & (dims[None, :] < d)
    k = tl.load(_tile_ptrs(K + b * s_kb + h * s_kh, cols, s_kn, dims), mask=col_ok, other=0.0)
    v = tl.load(_tile_ptrs(V + b * s_vb + h * s_vh, cols, s_vn, dims), mask=col_ok, other=0.0)
    Q += b * s_qb + h * s_qh
    DO += b * s_dob + h * s_doh
    Bias += h * s_bias_h
    DBias += h * s_dbias_h
    Pad += b * s_pad_b
    DQ += bh * n * d
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start in range(0, n, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = (rows[:, None] < n) & (dims[None, :] < d)
        q = tl.load(_tile_ptrs(Q, rows, s_qn, dims), mask=row_ok, other=0.0)
        do = tl.load(_tile_ptrs(DO, rows, s_don, dims), mask=row_ok, other=0.0)
        lse = tl.load(Lse + bh * n + rows, mask=rows < n, other=0.0)
        delta = tl.load(Delta + bh * n + rows, mask=rows < n, other=0.0)
        s = _scores(q, k, Bias, Pad, rows, cols, n, scale, s_bias_m, HAS_BIAS, HAS_PAD, PRECISION, ACC)
        prob = tl.where(rows[:, None] < n, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)  # d loss / d (dropped, scaled) prob
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows, cols, n, p_drop)
            inv_keep = 1.0 / (1.0 - tl.cast(p_drop, ACC))
            prob_out = tl.where(keep, prob * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            prob_out = prob
        dv += tl.dot(tl.trans(prob_out.to(do.dtype)), do, input_precision=PRECISION, out_dtype=ACC)
        ds = prob * (dp - delta[:, None])  # d loss / d score; delta = rowsum(dO * O)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC) * scale
        tl.atomic_add(_tile_ptrs(DQ, rows, d, dims), dq, mask=row_ok)
        if BIAS_GRAD:
            tl.atomic_add(DBias + rows[:, None] * n + cols[None, :], ds,
                          mask=(rows[:, None] < n) & (cols[None, :] < n))
    tl.store(_tile_ptrs(DK + bh * n * d, cols, d, dims), (dk * scale).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(_tile_ptrs(DV + bh * n * d, cols, d, dims), dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(Out, n, p_drop, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, bh, rows, cols, n, p_drop)
    tl.store(Out + bh * n * n + rows[:, None] * n + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < n) & (cols[None, :] < n))


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------

def _blocks(n: int, d: int, block_m: int | None, block_n: int | None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): the GPU tiles unless given, never larger than the padded length."""
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block is not None and (block < MIN_BLOCK or block & (block - 1)):
            raise ValueError(f"{name}={block} must be a power of two >= {MIN_BLOCK}")
    fit = max(MIN_BLOCK, triton.next_power_of_2(n))
    block_m = min(block_m or GPU_BLOCK_M, fit)
    block_n = min(block_n or GPU_BLOCK_N, fit)
    return block_m, block_n, max(MIN_BLOCK, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """fp32 matmuls in tf32 only where torch's own matmuls are allowed to use it."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dimension with stride 1; any other strides are passed along."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What scores, softmax statistics and gradient buffers are kept in: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, int]:
    """(head stride, row stride) of a [H', n, n] bias; a head stride of 0 shares H' = 1 over heads."""
    if bias is None:
        return 0, 0
    return (bias.stride(0) if bias.shape[0] > 1 else 0), bias.stride(1)


def _forward(q, k, v, bias, pad, dropout_p, seed, blocks):
    batch, heads, n, d = q.shape
    block_m, block_n, block_d = blocks
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads, n, device=q.device, dtype=_acc_dtype(q.dtype))
    grid = (triton.cdiv(n, block_m), batch * heads)
    _forward_kernel[grid](
        q, k, v, bias if bias is not None else q, pad if pad is not None else q, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *_bias_strides(bias), pad.stride(0) if pad is not None else 0,
        heads, n, d, 1.0 / math.sqrt(d), dropout_p, seed,
        HAS_BIAS=bias is not None, HAS_PAD=pad is not None, DROPOUT=dropout_p > 0.0,
        PRECISION=_precision(q.dtype), ACC=_tl_dtype(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return out, lse


def _backward(dout, q, k, v, bias, pad, out, lse, dropout_p, seed, blocks, bias_grad):
    batch, heads, n, d = q.shape
    block_m, block_n, block_d = blocks
    acc = _acc_dtype(q.dtype)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # [B, H, n]: rowsum(dO * O), once per row
    dq = torch.zeros(batch, heads, n, d, device=q.device, dtype=acc)
    dk = torch.empty(batch, heads, n, d, device=q.device, dtype=k.dtype)
    dv = torch.empty(batch, heads, n, d, device=q.device, dtype=v.dtype)
    dbias = torch.zeros(bias.shape, device=q.device, dtype=acc) if bias_grad else None
    grid = (triton.cdiv(n, block_n), batch * heads)
    _backward_kernel[grid](
        q, k, v, bias if bias is not None else q, pad if pad is not None else q, dout, lse, delta,
        dq, dk, dv, dbias if dbias is not None else dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
        *_bias_strides(bias), pad.stride(0) if pad is not None else 0,
        _bias_strides(dbias)[0],
        heads, n, d, 1.0 / math.sqrt(d), dropout_p, seed,
        HAS_BIAS=bias is not None, HAS_PAD=pad is not None, DROPOUT=dropout_p > 0.0,
        BIAS_GRAD=bias_grad, PRECISION=_precision(q.dtype), ACC=_tl_dtype(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return dq.to(q.dtype), dk, dv, dbias


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, pad, dropout_p, seed, blocks):
        out, lse = _forward(q, k, v, bias, pad, dropout_p, seed, blocks)
        ctx.save_for_backward(q, k, v, bias, pad, out, lse)
        ctx.dropout_p, ctx.seed, ctx.blocks = dropout_p, seed, blocks
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, bias, pad, out, lse = ctx.saved_tensors
        dout = _unit_last_stride(dout)  # e.g. the all-zero-stride gradient of out.sum()
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _backward(dout, q, k, v, bias, pad, out, lse, ctx.dropout_p, ctx.seed,
                                      ctx.blocks, bias_grad)
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        return dq, dk, dv, dbias, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def keep_bias(keep: torch.Tensor) -> torch.Tensor:
    """[H', n, n] additive bias (1 - keep) * -10000 (fp32, fp64 for an fp64 keep) of a keep mask
    [H', n, n] or [n, n]; a grad-requiring keep gets its gradient through it."""
    keep = keep if keep.dim() == 3 else keep[None]
    return (1.0 - keep.to(_acc_dtype(keep.dtype))) * MASKED_BIAS


def padding_bias(key_padding: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, n] additive bias of bool key padding [B, n] (True = padding) for attention running in
    ``dtype`` (fp32, or fp64 for fp64)."""
    return key_padding.to(_acc_dtype(dtype)) * MASKED_BIAS


def draw_seed() -> int:
    """A dropout seed from torch's default generator (so torch.manual_seed makes a run repeatable)."""
    return int(torch.randint(1, SEED_RANGE, ()).item())


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
           pad: torch.Tensor | None, dropout_p: float) -> None:
    batch, heads, n, d = q.shape
    if k.shape != q.shape or v.shape != q.shape or len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"q, k, v must share one [B, H, n, d] shape and dtype; got {tuple(q.shape)} "
                         f"{q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_HEAD_DIM}: the Triton kernels do not tile it; use backend='sdpa'")
    if bias is not None and (bias.dim() != 3 or bias.shape[0] not in (1, heads) or bias.shape[1:] != (n, n)
                             or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float [1 or {heads}, {n}, {n}] tensor (keep_bias); got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if pad is not None and (pad.shape != (batch, n) or not pad.is_floating_point()):
        raise ValueError(f"padding bias must be a float [{batch}, {n}] tensor (padding_bias); got "
                         f"{tuple(pad.shape)} {pad.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    if n * n >= 2 ** 31 or q.numel() >= 2 ** 31:
        raise ValueError(f"q of shape {tuple(q.shape)} is too large for the kernels' 32-bit offsets "
                         "(n² and B·H·n·d must be < 2^31); split the batch or use backend='sdpa'")


@torch.compiler.disable  # a Triton launch and a host-side seed: run eagerly inside a compiled model
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                    pad: torch.Tensor | None = None, dropout_p: float = 0.0, *, seed: int | None = None,
                    block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d + pad[:, None, None, :] + bias[None]) with dropout, @ v; grads for q, k, v, bias.

    q, k, v: [B, H, n, d], any strides. ``bias``: float [H', n, n] (H' = 1 or H; `keep_bias`), may
    require grad. ``pad``: float [B, n] (`padding_bias`). ``seed``: the dropout pattern's Philox
    seed (drawn from torch's generator when None). ``block_m`` / ``block_n``: tile sizes (powers of
    two >= 16; the GPU tiles when None).
    """
    _check(q, k, v, bias, pad, dropout_p)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    if bias is not None:
        bias = bias.contiguous()
    if pad is not None:
        pad = pad.contiguous()
    seed = draw_seed() if seed is None and dropout_p > 0.0 else (seed or 0)
    blocks = _blocks(q.shape[-2], q.shape[-1], block_m, block_n)
    return _FusedAttention.apply(q, k, v, bias, pad, float(dropout_p), seed, blocks)


def dropout_keep_mask(seed: int, batch: int, heads: int, n: int, dropout_p: float,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [B, H, n, n]: the dropout pattern `fused_attention` applies for ``seed`` (True = kept),
    from the same Philox draw the kernels make. For checks on small shapes."""
    out = torch.empty(batch, heads, n, n, dtype=torch.int8, device=device)
    block = min(64, max(MIN_BLOCK, triton.next_power_of_2(n)))
    grid = (triton.cdiv(n, block), triton.cdiv(n, block), batch * heads)
    _dropout_mask_kernel[grid](out, n, float(dropout_p), seed, BLOCK_M=block, BLOCK_N=block)
    return out.bool()
