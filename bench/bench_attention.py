"""Attention forward + backward: dense SDPA vs masked SDPA vs FlexAttention block-sparse vs DAM paths.

One table (and a JSON file) over sequence lengths and masks, at a fixed number of tokens per batch
(batch = tokens // seq_len) so every row does the same dense work. A path that fails (missing
feature, compile error, out of memory, time budget) is reported in its row, never raised.

    python bench/bench_attention.py --device cpu                       # small, fp32, eager
    python bench/bench_attention.py --device cuda --quick              # <= ~2 min on an H100/H200
    python bench/bench_attention.py --device cuda                      # 512 ... 8192, bf16

Paths (q, k, v require grad; "ms" = one forward + backward):
  sdpa_dense      SDPA, no mask (flash on CUDA): the baseline every speed-up is relative to
  sdpa_masked     SDPA with the frozen mask as a [1, 1, n, n] additive bias
  flex_dense      FlexAttention without a mask (its overhead against flash)
  flex_block      FlexAttention + BlockMask from the frozen mask (tiles with no kept entry skipped)
  dam_sdpa        SDPA with a grad-requiring [1, H, n, n] bias (DAM_u search, fallback path)
  dam_flex        FlexAttention score_mod adding a captured learnable [H, n, n] bias (DAM_u search)
  dam_s_flex      score_mod indexing a learnable per-offset table [H, n] by |q - kv| (DAM_s search)
  dam_block_flex  score_mod indexing a learnable per-tile table [H, n/b, n/b] (block DAM search)
  triton_dense    the fused Triton kernel (triton_attention.py), no mask
  triton_masked   the Triton kernel with the frozen mask as a [1, n, n] bias read in the kernel
  dam_triton      the Triton kernel with a learnable [H, n, n] bias (gradient reduced in the kernel)
  dam_sdpa_dropout    dam_sdpa with attention dropout DROPOUT_P
  dam_triton_dropout  dam_triton with attention dropout DROPOUT_P (Philox in the kernel)
The Triton paths run on CUDA only (on a CPU Triton has just its slow interpreter).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import device_name, git_commit, short_error, write_results  # noqa: E402
import sparse_attention as sa  # noqa: E402

ALL_PATHS = ("sdpa_dense", "sdpa_masked", "flex_dense", "flex_block", "dam_sdpa", "dam_flex",
             "dam_s_flex", "dam_block_flex", "triton_dense", "triton_masked", "dam_triton", "dam_sdpa_dropout",
             "dam_triton_dropout")
FLEX_PATHS = {"flex_dense", "flex_block", "dam_flex", "dam_s_flex", "dam_block_flex"}
TRITON_PATHS = {"triton_dense", "triton_masked", "dam_triton", "dam_triton_dropout"}
MASKED_PATHS = ("sdpa_masked", "flex_block", "triton_masked")  # the rest is measured once per length
DROPOUT_P = 0.1  # BERT's attention dropout


def band_global_mask(n: int, block_size: int, kind: str) -> torch.Tensor:
    """Bool [n, n] band + global [CLS] masks.

    token: Longformer-style token band |i - j| <= n/32 plus global token 0 (partial tiles on the
    band edges). block: BigBird-style block band (the diagonal tile and one each side) plus the
    first tile as global row and column: block-native, every computed tile full.
    """
    pos = torch.arange(n)
    if kind == "token":
        keep = (pos[:, None] - pos[None, :]).abs() <= max(n // 32, 1)
        keep[0, :] = keep[:, 0] = True
        return keep
    blk = pos // block_size
    keep = (blk[:, None] - blk[None, :]).abs() <= 1
    keep[:block_size, :] = keep[:, :block_size] = True
    return keep


def tile_sparsity(keep: torch.Tensor, block_size: int) -> float:
    partial, full = sa.block_layouts(keep, block_size)
    return 1.0 - (partial | full).float().mean().item()


def make_inputs(batch: int, heads: int, n: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> list[torch.Tensor]:
    """q, k, v drawn from a fixed seed on the CPU, so every path of a row reads the same inputs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, generator=g).to(device, dtype).requires_grad_()
            for _ in range(3)]


def build_path(path: str, q: torch.Tensor, keep: torch.Tensor, block_size: int, device: torch.device,
               flex) -> tuple[Callable, list[torch.Tensor]]:
    """A callable running one forward, plus the tensors it learns (their grads are cleared every step).

    Learnable biases are rebuilt inside the callable, as the model does each forward (one built
    here would lose its autograd graph at the first backward)."""
    n, heads = q.shape[-2], q.shape[1]
    dtype = q.dtype
    learn = LEARN_OPTIONS if device.type == "cuda" else None
    if path == "sdpa_dense":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v), []
    if path == "sdpa_masked":
        bias = sa.score_bias(None, keep.float(), dtype)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), []
    if path == "flex_dense":
        return lambda q, k, v: flex(q, k, v), []
    if path == "flex_block":
        block_mask = sa.block_mask_from_keep(keep, block_size)
        return lambda q, k, v: flex(q, k, v, block_mask=block_mask), []
    if path == "dam_sdpa":
        keep_soft = torch.full((heads, n, n), 1.0, device=device, requires_grad=True)
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v,
                                                               attn_mask=sa.score_bias(None, keep_soft, dtype)),
                [keep_soft])
    if path == "dam_flex":
        keep_soft = torch.full((heads, n, n), 1.0, device=device, requires_grad=True)
        return (lambda q, k, v: flex(q, k, v, score_mod=sa._bias_score_mod(keep_soft), kernel_options=learn),
                [keep_soft])
    if path == "dam_s_flex":
        offset_logits = torch.zeros(heads, n, device=device, requires_grad=True)

        def offset_bias(score, b, h, q_idx, kv_idx):
            return score + offset_logits[h, (q_idx - kv_idx).abs()]
        return lambda q, k, v: flex(q, k, v, score_mod=offset_bias, kernel_options=learn), [offset_logits]
    if path == "dam_block_flex":
        nb = math.ceil(n / block_size)
        tile_logits = torch.zeros(heads, nb, nb, device=device, requires_grad=True)

        def tile_bias(score, b, h, q_idx, kv_idx):
            return score + tile_logits[h, q_idx // block_size, kv_idx // block_size]
        return lambda q, k, v: flex(q, k, v, score_mod=tile_bias, kernel_options=learn), [tile_logits]
    if path == "dam_sdpa_dropout":
        keep_soft = torch.full((heads, n, n), 1.0, device=device, requires_grad=True)
        return (lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=sa.score_bias(None, keep_soft, dtype), dropout_p=DROPOUT_P), [keep_soft])
    if path in TRITON_PATHS:
        return build_triton_path(path, keep, heads, n, device)
    raise ValueError(path)


def build_triton_path(path: str, keep: torch.Tensor, heads: int, n: int,
                      device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    ta = sa._triton_attention()
    if path == "triton_dense":
        return lambda q, k, v: ta.fused_attention(q, k, v), []
    if path == "triton_masked":
        bias = ta.keep_bias(keep.float())
        return lambda q, k, v: ta.fused_attention(q, k, v, bias), []
    keep_soft = torch.full((heads, n, n), 1.0, device=device, requires_grad=True)
    dropout_p = DROPOUT_P if path == "dam_triton_dropout" else 0.0
    return lambda q, k, v: ta.fused_attention(q, k, v, ta.keep_bias(keep_soft), dropout_p=dropout_p), [keep_soft]


LEARN_OPTIONS = dict(sa.LEARNABLE_BIAS_KERNEL_OPTIONS)


def time_path(fn: Callable, learned: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              warmup: int, iters: int, device: torch.device) -> float:
    """Mean ms of one forward + backward. Every grad is cleared as zero_grad(set_to_none=True) does,
    so a learned [H, n, n] bias is not accumulated in place (an extra read-add-write) each step."""
    def step():
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
        for t in (q, k, v, *learned):
            t.grad = None

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) * 1e3 / iters


def run_path(path: str, keep: torch.Tensor, batch: int, args: argparse.Namespace, device: torch.device,
             dtype: torch.dtype, flex) -> float:
    """One row's ms; its tensors die on return, before the next path allocates."""
    q, k, v = make_inputs(batch, args.heads, keep.shape[-1], args.head_dim, device, dtype)
    fn, learned = build_path(path, q, keep, args.block_size, device, flex)
    return time_path(fn, learned, q, k, v, args.warmup, args.iters, device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="GPU quick preset: S = 128, 512, 2048 and 8192, 10 paths, budget 100 s")
    p.add_argument("--seq_lens", type=int, nargs="+", default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per batch (batch = tokens // seq_len)")
    p.add_argument("--heads", type=int, default=None, help="12 on CUDA, 4 on CPU")
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--masks", nargs="+", choices=("token", "block"), default=("token", "block"))
    p.add_argument("--paths", nargs="+", choices=ALL_PATHS, default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--time_budget_s", type=float, default=None, help="skip remaining rows after this long")
    p.add_argument("--json", default=None, help="output JSON (default results/bench_attention_<device>.json)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    defaults = dict(
        seq_lens=[512, 1024, 2048, 4096, 8192] if cuda else [128, 256, 512],
        heads=12 if cuda else 4,
        tokens=16384 if cuda else 2048,
        dtype="bf16" if cuda else "fp32",
        warmup=3 if cuda else 1, iters=10 if cuda else 3,
        paths=list(ALL_PATHS), time_budget_s=420.0 if cuda else 170.0,
    )
    if args.quick:
        defaults.update(seq_lens=[128, 512, 2048, 8192], masks=["block"], warmup=2, iters=5, time_budget_s=100.0,
                        paths=["sdpa_dense", "sdpa_masked", "flex_block", "triton_masked", "dam_sdpa", "dam_flex",
                               "dam_triton", "dam_sdpa_dropout", "dam_triton_dropout", "dam_s_flex"])
        if args.masks == ("token", "block"):
            args.masks = defaults["masks"]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    if sa.flex_available():
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        flex = torch.compile(sa.flex_attention, dynamic=False) if device.type == "cuda" else sa.flex_attention
    else:
        flex = None
    triton_note = triton_unavailable(device)
    commit = git_commit()  # the code being measured: read before the run, not after
    started = time.perf_counter()
    rows: list[dict] = []
    for n in args.seq_lens:
        batch = max(args.tokens // n, 1)
        dense_ms = None
        for mask_kind in args.masks:
            keep = band_global_mask(n, args.block_size, mask_kind).to(device)
            row_base = {"seq_len": n, "batch": batch, "mask": mask_kind,
                        "token_sparsity": 1.0 - keep.float().mean().item(),
                        "tile_sparsity": tile_sparsity(keep, args.block_size)}
            for path in args.paths:
                if mask_kind != args.masks[0] and path not in MASKED_PATHS:
                    continue  # mask-independent paths: measured once per length
                row = {**row_base, "path": path, "ms": None, "speedup_vs_dense": None, "note": ""}
                if path not in MASKED_PATHS and path != "sdpa_dense":
                    row["mask"] = "-"
                if time.perf_counter() - started > args.time_budget_s:
                    row["note"] = "skipped: time budget"
                elif path in FLEX_PATHS and flex is None:
                    row["note"] = "unavailable: torch has no flex_attention"
                elif path in FLEX_PATHS and device.type == "cpu":
                    row["note"] = "unavailable: FlexAttention has no backward on CPU"
                elif path in TRITON_PATHS and triton_note:
                    row["note"] = triton_note
                else:
                    try:
                        row["ms"] = run_path(path, keep, batch, args, device, dtype, flex)
                    except Exception as exc:  # a missing feature or OOM is a row, not a crash
                        row["note"] = short_error(exc)
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                if path == "sdpa_dense":
                    dense_ms = row["ms"]
                if row["ms"] and dense_ms:
                    row["speedup_vs_dense"] = dense_ms / row["ms"]
                rows.append(row)
                print(format_row(row), flush=True)
    meta = {"device": device_name(device), "torch": torch.__version__, "commit": commit,
            "dtype": args.dtype, "heads": args.heads, "head_dim": args.head_dim, "tokens": args.tokens,
            "block_size": args.block_size, "warmup": args.warmup, "iters": args.iters,
            "wall_s": round(time.perf_counter() - started, 1)}
    print()
    print(f"# {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {args.dtype}, "
          f"H={args.heads}, d={args.head_dim}, {args.tokens} tokens/batch, tile {args.block_size}, "
          f"fwd+bwd ms (mean of {args.iters}), {meta['wall_s']} s total")
    print(markdown_table(rows))
    write_results(args.json, f"bench_attention_{args.device}.json", meta, rows)
    return rows


def triton_unavailable(device: torch.device) -> str:
    """Why the Triton paths cannot run here, or "" when they can (never imports triton on a CPU)."""
    if device.type != "cuda":
        return "unavailable: the Triton kernels run on CUDA only"
    if sa._triton_attention() is None:
        return "unavailable: triton is not installed"
    return ""


def format_row(row: dict) -> str:
    ms = f"{row['ms']:.3f} ms" if row["ms"] else "-"
    return f"S={row['seq_len']:5d} B={row['batch']:3d} {row['mask']:5s} {row['path']:18s} {ms:>12s} {row['note']}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| S | batch | mask | token sparsity | tile sparsity | path | fwd+bwd ms | vs sdpa_dense | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        speed = f"{r['speedup_vs_dense']:.2f}x" if r["speedup_vs_dense"] else "-"
        if r["mask"] == "-":
            sparsity = "- | -"
        else:
            sparsity = f"{100 * r['token_sparsity']:.1f} % | {100 * r['tile_sparsity']:.1f} %"
        lines.append(f"| {r['seq_len']} | {r['batch']} | {r['mask']} | {sparsity} | {r['path']} | {ms} | "
                     f"{speed} | {r['note']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
