"""Attention with padding and a sparse attention mask, and the fast paths that compute it.

Semantics (the reference): scores get an additive bias of -10000 for every padded key and -10000
for every key the sparse mask drops (keep = 0), then softmax, dropout, @ V:

    SDPA(q, k, v, attn_mask=key_padding[B,1,1,n] * -10000 + (keep[H',n,n] - 1) * 10000)

`modeling.py` prepares every layer's attention once per forward pass (`prepare_layers`), and each
layer calls its `LayerAttention`. Paths:
  * "sdpa": `F.scaled_dot_product_attention` with that bias, built by broadcasting so a
    [B, H, n, n] tensor exists only when padding and a mask are both present. This is the
    reference, the CPU path, and the CUDA path with attention dropout (cuDNN / flash for padding
    or a frozen mask; the memory-efficient kernel for a grad-requiring bias).
  * "flex": `torch.nn.attention.flex_attention` (CUDA; compiled). A frozen mask becomes a
    `BlockMask`: tiles with no kept entry are skipped, partial tiles apply the exact token mask, and
    padding is a per-batch key mask. A learnable DAM mask is a `score_mod` adding the captured
    [H', n, n] bias (so the mask logits get a gradient, and no [B, H, n, n] bias is ever built) on
    top of a padding-only `BlockMask`.
  * "triton": `triton_attention.fused_attention`, a fused FlashAttention-2 style kernel with
    attention dropout (Philox, regenerated in the backward) and the [H', n, n] bias plus key
    padding read inside the kernel; the bias gradient is reduced over the batch there, so no
    [B, H, n, n] tensor exists even with dropout and a learnable mask. CUDA (on a CPU only under
    Triton's interpreter, TRITON_INTERPRET=1, for tests). "auto" does not choose it: it has no
    GPU timing yet.
  * "auto": flex on CUDA when attention dropout is off and the sequence is long enough for flex to
    win: FLEX_MIN_LEARNABLE_SEQ_LEN for a learnable mask, FLEX_MIN_FROZEN_SEQ_LEN for a frozen
    one; else sdpa.

Hard masking (-inf) and the -10000 bias agree to within float rounding (exp(-10000) underflows to
0) with one exception handled here: a query row whose every key is dropped. The reference then
shifts all its scores equally, i.e. attends as if unmasked; the block path keeps such rows whole
to match. (A row whose only kept keys are padding stays a documented corner case: the reference
mixes those padded keys with the dropped ones; both flex paths attend over all real keys.)

FlexAttention has no attention dropout and (through torch 2.13) no backward on CPU; the
bench (bench/README.md) says at which lengths each path pays off.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

MASKED_BIAS = -10000.0  # the additive score bias of a dropped or padded key (NVIDIA / SparseBERT)
BACKENDS = ("auto", "sdpa", "flex", "triton")
DEFAULT_BLOCK_SIZE = 128  # FlexAttention's default sparse tile
# From which length "auto" sends a mask to FlexAttention (bench/README.md, H200). A learnable mask:
# at 512 flex beat SDPA's grad-bias kernel (1.14 vs 1.40 ms fwd+bwd per layer), at 128 it lost
# (1.04 vs 0.69 ms). A frozen mask: below 2048 it rarely empties a whole 128-tile, and SDPA
# (cuDNN / flash) beat flex outright at 128 and 512.
FLEX_MIN_LEARNABLE_SEQ_LEN = 512
FLEX_MIN_FROZEN_SEQ_LEN = 2048
# Kernel tiles for a captured learnable bias: the default tiles ran out of shared memory on
# torch 2.11 / H200; 64 x 64 compiled and ran.
LEARNABLE_BIAS_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64}

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5: the sdpa path still works
    BlockMask = Any  # type: ignore[misc,assignment]
    flex_attention = None


def flex_available() -> bool:
    return flex_attention is not None


@functools.cache
def _triton_attention() -> Any:
    """The triton_attention module, or None without the triton package (imported on first use, so
    an sdpa or flex run never imports triton)."""
    try:
        import triton_attention
    except ImportError:
        return None
    return triton_attention


# ----------------------------------------------------------------------------------------------
# Reference: SDPA with one additive bias
# ----------------------------------------------------------------------------------------------

def score_bias(key_padding: torch.Tensor | None, keep: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor | None:
    """The additive bias, broadcast-shaped: [B,1,1,n] (padding), [1,H',n,n] (mask) or their sum.

    ``key_padding``: bool [B, n], True where the key is padding. ``keep``: float [H', n, n] or
    [n, n], 1 = keep (a grad-requiring keep gives its gradient through the bias).
    """
    bias = None
    if keep is not None:
        keep = keep if keep.dim() == 3 else keep[None]
        bias = ((1.0 - keep) * MASKED_BIAS).to(dtype)[None]  # [1, H', n, n]
    if key_padding is not None:
        padding = (key_padding[:, None, None, :].to(dtype) * MASKED_BIAS)  # [B, 1, 1, n]
        bias = padding if bias is None else padding + bias
    return bias


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA with the combined additive bias. q, k, v: [B, H, n, d]."""
    bias = score_bias(key_padding, keep, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


# ----------------------------------------------------------------------------------------------
# Block masks
# ----------------------------------------------------------------------------------------------

def _pad_to_blocks(x: torch.Tensor, block_size: int, dims: tuple[int, ...], value: bool) -> torch.Tensor:
    """Pad the trailing ``dims`` of ``x`` up to a multiple of ``block_size``."""
    pads: list[int] = []
    for dim in range(x.dim() - 1, -1, -1):  # F.pad lists the last dim first
        extra = (-x.shape[dim]) % block_size if dim in dims else 0
        pads += [0, extra]
    return F.pad(x, pads, value=value) if any(pads) else x


def keep_empty_rows(keep: torch.Tensor) -> torch.Tensor:
    """Bool keep with every all-dropped query row made fully kept (what the -10000 bias does)."""
    return keep | ~keep.any(dim=-1, keepdim=True)


def rows_without_real_keys(keep: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
    """Bool [B, H', n]: query rows whose every kept key is padding (``keep``: bool [H', n, n]).

    The block path makes such a row attend over all real keys, as the learnable flex path does
    (its -10000 bias lands on every real key). One matmul counts kept real keys per row, so no
    [B, H', n, n] tensor is built; half on CUDA is exact here because only a zero count matters.
    """
    dtype = torch.float16 if keep.device.type == "cuda" else torch.float32
    real = (~key_padding.bool()).to(dtype)
    kept_real = torch.matmul(keep.to(dtype), real.T)  # [H', n, B]
    return (kept_real == 0).permute(2, 0, 1)


def block_layouts(keep: torch.Tensor | None, block_size: int,
                  key_padding: torch.Tensor | None = None,
                  empty_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool [B', H', n/b, n/b] tile layouts (n rounded up to a multiple of b).

    A tile is computed when any of its entries is kept and not padding; it is *full* (no mask
    applied inside) when every entry is. ``keep``: bool [H', n, n] or [n, n] or None (all kept).
    ``empty_rows``: bool [B, H', n] rows that attend over every real key (`rows_without_real_keys`);
    their q-tiles visit every tile holding a real key. Nothing of size B·H·n² is built: rows are
    reduced per q-tile first, then keys per batch.
    """
    if keep is None and key_padding is None:
        raise ValueError("block_layouts needs a keep mask, key padding, or both")
    if keep is None:
        n = key_padding.shape[-1]
        keep = torch.ones(1, n, n, dtype=torch.bool, device=key_padding.device)
    keep = keep.bool() if keep.dim() == 3 else keep.bool()[None]
    n = keep.shape[-1]
    padded = _pad_to_blocks(keep, block_size, (1, 2), value=False)
    heads, nb = padded.shape[0], padded.shape[-1] // block_size
    rows = padded.view(heads, nb, block_size, nb * block_size)
    cols_any, cols_all = rows.any(dim=2)[None], rows.all(dim=2)[None]  # [1, H', nb, n_padded]
    if key_padding is not None:
        if key_padding.shape[-1] != n:
            raise ValueError(f"key_padding covers {key_padding.shape[-1]} keys but keep covers {n}")
        real = _pad_to_blocks(~key_padding.bool(), block_size, (1,), value=False)[:, None, None, :]
        cols_any, cols_all = cols_any & real, cols_all & real  # [B, H', nb, n_padded]
        if empty_rows is not None:
            padded_rows = _pad_to_blocks(empty_rows, block_size, (2,), value=False)
            tile_has_empty = padded_rows.unflatten(-1, (nb, block_size)).any(dim=-1)  # [B, H', nb]
            cols_any = cols_any | (tile_has_empty[..., None] & real)
    any_kept = cols_any.unflatten(-1, (nb, block_size)).any(dim=-1)
    full = cols_all.unflatten(-1, (nb, block_size)).all(dim=-1)
    return any_kept & ~full, full


def _to_indices(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCSR-style (num_blocks [B,H,Q], indices [B,H,Q,K]) of a bool layout; kept blocks come first."""
    num = layout.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(layout.to(torch.int8), dim=-1, descending=True, stable=True)
    return num, order.to(torch.int32)


def block_mask_from_keep(keep: torch.Tensor | None, block_size: int = DEFAULT_BLOCK_SIZE,
                         key_padding: torch.Tensor | None = None) -> "BlockMask":
    """A FlexAttention `BlockMask` computing exactly the tiles that hold a kept, non-padded entry.

    ``keep``: bool/float [H', n, n] or [n, n] (nonzero = keep; an all-dropped row counts as fully
    kept, see the module docstring) or None for padding only. ``key_padding``: bool [B, n], True =
    padding; it makes the mask per batch (B' = B). Tiles entirely kept (and real) are marked full,
    so the elementwise mask runs only on partial tiles. Built from the layout directly
    (`BlockMask.from_kv_blocks`), with no n² vmap, on the device of the inputs.
    """
    if not flex_available():
        raise RuntimeError("FlexAttention needs torch >= 2.5 (torch.nn.attention.flex_attention)")
    keep_bool = empty = None
    if keep is not None:
        keep_bool = keep_empty_rows(keep.bool() if keep.dim() == 3 else keep.bool()[None])
        if key_padding is not None:
            empty = rows_without_real_keys(keep_bool, key_padding)
    partial, full = block_layouts(keep_bool, block_size, key_padding, empty)
    n = keep_bool.shape[-1] if keep_bool is not None else key_padding.shape[-1]
    num, idx = _to_indices(partial)
    full_num, full_idx = _to_indices(full)
    mask_mod = _token_mask_mod(keep_bool, key_padding, block_size, empty)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(n, n))


def _token_mask_mod(keep: torch.Tensor | None, key_padding: torch.Tensor | None,
                    block_size: int, empty_rows: torch.Tensor | None = None) -> Callable:
    """The exact token mask, evaluated by the kernel inside partial tiles only. Captured tensors
    are padded to whole tiles so indices in a ragged last tile stay in bounds. ``empty_rows``
    (bool [B, H', n], with key padding only): rows that attend over every real key."""
    if keep is not None:
        keep = _pad_to_blocks(keep, block_size, (1, 2), value=False)
        per_head = keep.shape[0] > 1
    if key_padding is not None:
        real = _pad_to_blocks(~key_padding.bool(), block_size, (1,), value=False)
    if empty_rows is not None:
        empty = _pad_to_blocks(empty_rows, block_size, (2,), value=False)

    if keep is None:
        def padding_only(b, h, q_idx, kv_idx):
            return real[b, kv_idx]
        return padding_only

    def kept(b, h, q_idx, kv_idx):
        return keep[h if per_head else 0, q_idx, kv_idx]

    if key_padding is None:
        return kept

    def kept_and_real(b, h, q_idx, kv_idx):
        return kept(b, h, q_idx, kv_idx) & real[b, kv_idx]

    if empty_rows is None:
        return kept_and_real

    def kept_or_empty_row_and_real(b, h, q_idx, kv_idx):
        row_empty = empty[b, h if per_head else 0, q_idx]
        return (kept(b, h, q_idx, kv_idx) | row_empty) & real[b, kv_idx]
    return kept_or_empty_row_and_real


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------

@functools.cache
def _compiled_flex() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def _flex_fn(q: torch.Tensor) -> Callable:
    """Compiled flex on CUDA (fused kernel); plain flex under an outer torch.compile or on CPU."""
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        return _compiled_flex()
    return flex_attention


def _learnable(keep: torch.Tensor | None) -> bool:
    """A mask that will receive a gradient in this call (the DAM search)."""
    return keep is not None and keep.requires_grad and torch.is_grad_enabled()


def resolve_backend(device: torch.device, keep: torch.Tensor | None, dropout_p: float, backend: str,
                    seq_len: int = 0) -> str:
    """The path a layer takes: see the module docstring. Raises on an impossible choice."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        min_len = FLEX_MIN_LEARNABLE_SEQ_LEN if _learnable(keep) else FLEX_MIN_FROZEN_SEQ_LEN
        worth_it = keep is not None and seq_len >= min_len
        use_flex = device.type == "cuda" and flex_available() and dropout_p == 0.0 and worth_it
        return "flex" if use_flex else "sdpa"
    if backend == "triton":
        module = _triton_attention()
        if module is None:
            raise ValueError("backend='triton' needs the triton package (pip install triton); use backend='sdpa'")
        if device.type != "cuda" and not module.INTERPRETED:
            raise ValueError("backend='triton' needs a CUDA device (a CPU runs it only under Triton's "
                             "interpreter, TRITON_INTERPRET=1); use backend='sdpa'")
    if backend == "flex":
        if not flex_available():
            raise ValueError("backend='flex' needs torch >= 2.5; use backend='sdpa'")
        if dropout_p > 0.0:
            raise ValueError("backend='flex' has no attention dropout: set attention_probs_dropout_prob=0 "
                             "or use backend='sdpa'")
        if device.type != "cuda" and torch.is_grad_enabled():
            raise ValueError("FlexAttention has no backward on CPU: use backend='sdpa' (or run under no_grad)")
    return backend


@dataclass  # not frozen: torch 2.11's dynamo loses the fields of a frozen dataclass built in a graph
class LayerAttention:
    """How one layer attends, prepared once per forward pass and shared by layers with the same mask.

    Call it as ``attend(q, k, v, dropout_p)`` with q, k, v: [B, H, n, d].
    """
    backend: str                               # "sdpa", "flex" or "triton"
    bias: torch.Tensor | None = None           # sdpa: the broadcast-shaped additive bias; triton: [H', n, n]
    padding: torch.Tensor | None = None        # triton: the [B, n] key padding bias
    block_mask: "BlockMask | None" = None      # flex: tiles to visit, padding, frozen token mask
    score_mod: Callable | None = None          # flex: the learnable DAM bias
    kernel_options: dict[str, Any] | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
        if self.backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, dropout_p=dropout_p)
        if self.backend == "triton":
            return _triton_attention().fused_attention(q, k, v, self.bias, self.padding, dropout_p)
        return _flex_fn(q)(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask,
                           kernel_options=self.kernel_options)


def prepare_attention(keep: torch.Tensor | None, key_padding: torch.Tensor | None, *, device: torch.device,
                      dtype: torch.dtype, dropout_p: float, backend: str = "auto",
                      block_size: int = DEFAULT_BLOCK_SIZE, block_mask: "BlockMask | None" = None,
                      kernel_options: dict[str, Any] | None = None) -> LayerAttention:
    """One layer's `LayerAttention` for a keep mask ([H', n, n] or [n, n], 1 = keep, or None) and
    key padding (bool [B, n], True = padding, or None). ``dtype``: the dtype attention runs in.

    A learnable keep (DAM search) on the flex path becomes a `score_mod` bias over a padding-only
    `BlockMask`; a frozen keep becomes a block-sparse `BlockMask`. ``block_mask`` overrides the one
    built here.
    """
    n = keep.shape[-1] if keep is not None else (key_padding.shape[-1] if key_padding is not None else 0)
    resolved = resolve_backend(device, keep, dropout_p, backend, n)
    if resolved == "sdpa":
        return LayerAttention("sdpa", bias=score_bias(key_padding, keep, dtype))
    if resolved == "triton":
        module = _triton_attention()
        return LayerAttention("triton", bias=None if keep is None else module.keep_bias(keep),
                              padding=None if key_padding is None else module.padding_bias(key_padding, dtype))
    score_mod = None
    if _learnable(keep):
        score_mod = _bias_score_mod(keep)
        if block_mask is None and key_padding is not None:
            block_mask = block_mask_from_keep(None, block_size, key_padding)
        if kernel_options is None and device.type == "cuda":
            kernel_options = dict(LEARNABLE_BIAS_KERNEL_OPTIONS)
    elif block_mask is None and (keep is not None or key_padding is not None):
        block_mask = block_mask_from_keep(keep, block_size, key_padding)
    if kernel_options is None and block_size < DEFAULT_BLOCK_SIZE and device.type == "cuda":
        kernel_options = {"BLOCK_M": block_size, "BLOCK_N": block_size}  # tiles must divide the sparse block
    return LayerAttention("flex", block_mask=block_mask, score_mod=score_mod, kernel_options=kernel_options)


def prepare_layers(keep: torch.Tensor | None, key_padding: torch.Tensor | None, **options: Any) -> list[LayerAttention]:
    """`prepare_attention` for the mask module's [L', H', n, n] output: one entry per distinct
    layer mask (L' = 1 for a shared mask or none; index by layer % len). ``options``: as
    `prepare_attention`."""
    if keep is None:
        return [prepare_attention(None, key_padding, **options)]
    return [prepare_attention(layer, key_padding, **options) for layer in keep]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                     dropout_p: float = 0.0, backend: str = "auto", *,
                     block_mask: "BlockMask | None" = None, block_size: int = DEFAULT_BLOCK_SIZE,
                     kernel_options: dict[str, Any] | None = None) -> torch.Tensor:
    """Attention with padding and a sparse keep mask; same outputs and grads as `reference_attention`.

    q, k, v: [B, H, n, d]. key_padding: bool [B, n], True = padding key. keep: float [H', n, n]
    or [n, n] (H' in {1, H}), 1 = keep (grad-requiring for the DAM search). dropout_p: attention
    dropout (sdpa and triton). A model prepares each layer once per forward with `prepare_layers`
    instead; this is the one-call form.
    """
    n = q.shape[-2]
    if keep is not None and keep.shape[-1] != n:
        raise ValueError(f"keep mask covers {keep.shape[-1]} keys but the sequence has {n}; slice it to [.., {n}, {n}]")
    attend = prepare_attention(keep, key_padding, device=q.device, dtype=q.dtype, dropout_p=dropout_p,
                               backend=backend, block_size=block_size, block_mask=block_mask,
                               kernel_options=kernel_options)
    return attend(q, k, v, dropout_p)


def _bias_score_mod(keep: torch.Tensor) -> Callable:
    """score + (keep - 1) * 10000, read from a captured [H', n, n] tensor that carries the grad."""
    keep = keep if keep.dim() == 3 else keep[None]
    bias = (keep - 1.0) * -MASKED_BIAS
    per_head = bias.shape[0] > 1

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h if per_head else 0, q_idx, kv_idx]
    return add_bias
