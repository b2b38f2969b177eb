"""Pretraining step throughput: our BertForPreTraining vs Hugging Face's, side by side, same config.

One training step = forward + MLM/NSP loss (+ the DAM penalty) + backward + AdamW step +
zero_grad(set_to_none=True). Both models get the same synthetic batches (15 % of tokens masked,
every sequence full length unless --pad_fraction), the same optimizer (`optimization.build_adamw`:
fused AdamW on CUDA, foreach on CPU, the project's parameter groups) and the same precision. Ours runs the MLM vocab projection on the masked rows
only (the GUIDE contract); HF's `BertForPreTraining` projects every token (its design). Rows where
something fails (missing feature, compile error, OOM, time budget) say so instead of crashing.

    python bench/bench_pretraining.py --device cpu --preset small          # < 3 min on 2 cores
    python bench/bench_pretraining.py --device cuda --quick                # <= ~2.5 min (H100/H200)
    python bench/bench_pretraining.py --device cuda --preset base --bf16 --compile --seq_len 128 512

MFU = achieved FLOP/s / peak, with training FLOPs per sequence (ours' useful work, used for both
columns' MFU so the ratio is the seq/s ratio):
    6 · P_layer · L · n  +  6 · (d² + d·V) · n_masked  +  12 · L · n² · d
P_layer = 4d² + 2·d·d_ff (attention projections + FFN weights), n_masked = round(0.15 n); the
last term is QKᵀ and PV (4n²d forward per layer) × 3 for training. Peak: --peak_tflops, else the
dense bf16/fp16 spec of known GPUs (H100/H200 SXM 989, H100/H200 NVL 835, H100 PCIe 756, A100 312),
only with --bf16 (an fp32 run has no such peak); none on CPU.
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import device_name, git_commit, short_error, write_results  # noqa: E402
import modeling  # noqa: E402
from optimization import build_adamw  # noqa: E402
import run_pretraining  # noqa: E402

PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
# Default batch per (device, seq_len): the anchors on CUDA, small enough for 2 cores on CPU.
DEFAULT_BATCH = {("cuda", 128): 256, ("cuda", 512): 64, ("cpu", 128): 8, ("cpu", 512): 2}
# Dense bf16/fp16 tensor-core spec by a substring of the device name; the first match wins, so the
# PCIe / NVL cards (lower clocks and power) come before their SXM namesakes.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0}
VOCAB_SIZE = 30522
MASK_FRACTION = 0.15
MASK_MODES = ("dense", "dam_s", "dam_u", "pattern")
TRITON_SUFFIX = "_triton"  # a mode with it runs attention_backend "triton" (CUDA only)
MODES = MASK_MODES + tuple(mode + TRITON_SUFFIX for mode in MASK_MODES)


@dataclass
class Batch:
    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    masked_lm_labels: torch.Tensor  # -1 = not masked (ours)
    next_sentence_labels: torch.Tensor

    @property
    def hf_labels(self) -> torch.Tensor:  # HF ignores -100
        return self.masked_lm_labels.masked_fill(self.masked_lm_labels == -1, -100)


def make_batch(batch: int, seq_len: int, pad_fraction: float, device: torch.device, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, VOCAB_SIZE, (batch, seq_len), generator=g)
    token_type_ids = (torch.arange(seq_len) >= seq_len // 2).long().expand(batch, -1).clone()
    lengths = torch.full((batch,), seq_len)
    if pad_fraction > 0:
        low = max(int(seq_len * (1 - 2 * pad_fraction)), 8)
        lengths = torch.randint(low, seq_len + 1, (batch,), generator=g)
    attention_mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    n_masked = max(round(MASK_FRACTION * seq_len), 1)
    labels = torch.full((batch, seq_len), -1, dtype=torch.long)
    for b in range(batch):
        positions = torch.randperm(int(lengths[b]) - 1, generator=g)[:n_masked] + 1
        labels[b, positions] = input_ids[b, positions]
    nsp = torch.randint(0, 2, (batch,), generator=g)
    return Batch(*(t.to(device, non_blocking=True) for t in (input_ids, token_type_ids, attention_mask, labels, nsp)))


def train_flops_per_sequence(cfg: dict, seq_len: int) -> float:
    d, layers, d_ff = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    n_masked = max(round(MASK_FRACTION * seq_len), 1)
    dense = 6 * (4 * d * d + 2 * d * d_ff) * layers * seq_len
    head = 6 * (d * d + d * VOCAB_SIZE) * n_masked
    attention = 12 * layers * seq_len * seq_len * d
    return float(dense + head + attention)


# ----------------------------------------------------------------------------------------------
# Models and steps
# ----------------------------------------------------------------------------------------------

def mode_parts(mode: str) -> tuple[str, str]:
    """(mask mode, attention backend) of a bench mode: "<mask mode>_triton" runs the Triton kernel."""
    if mode.endswith(TRITON_SUFFIX):
        return mode[:-len(TRITON_SUFFIX)], "triton"
    return mode, "auto"


def our_model(cfg: dict, mode: str, pattern: str, seq_len: int, attn_dropout: float) -> torch.nn.Module:
    mask_mode, backend = mode_parts(mode)
    mask_type = {"dense": "dense", "dam_s": "dam_s", "dam_u": "dam_u", "pattern": pattern}[mask_mode]
    config = modeling.BertConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=max(512, seq_len),
                                 attention_probs_dropout_prob=attn_dropout, attention_mask_type=mask_type,
                                 mask_seq_length=seq_len, dam_lambda=1e-4 if mask_mode.startswith("dam") else 0.0,
                                 attention_backend=backend, **cfg)
    return modeling.BertForPreTraining(config)


def hf_model(cfg: dict, seq_len: int, attn_dropout: float) -> torch.nn.Module:
    from transformers import BertConfig as HFConfig, BertForPreTraining as HFBertForPreTraining

    config = HFConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=max(512, seq_len),
                      attention_probs_dropout_prob=attn_dropout, attn_implementation="sdpa", **cfg)
    model = HFBertForPreTraining(config)
    model.config._attn_implementation = "sdpa"
    return model


def max_predictions(seq_len: int) -> int:
    """NVIDIA's --max_predictions_per_seq for a length: 20 at 128, 80 at 512."""
    return max(round(MASK_FRACTION * seq_len), round(seq_len * 20 / 128))


def our_loss(model, batch: Batch) -> torch.Tensor:
    """What run_pretraining.py minimises per micro-step: the model's loss, MLM + NSP (static-shape
    MLM rows, no host sync) plus the mask penalty."""
    return model(batch.input_ids, batch.token_type_ids, batch.attention_mask, batch.masked_lm_labels,
                 batch.next_sentence_labels, max_predictions=max_predictions(batch.input_ids.shape[1])).loss


def hf_loss(model, batch: Batch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids,
                attention_mask=batch.attention_mask, labels=batch.hf_labels,
                next_sentence_label=batch.next_sentence_labels)
    return out.loss


def compiled(model, loss_fn):
    """(model, loss_fn) as each side's user compiles them: ours as run_pretraining.py --compile does
    (in place; the loss is inside the model), HF as `torch.compile(model)` (its forward computes the loss)."""
    if isinstance(model, modeling.BertForPreTraining):
        run_pretraining.compile_for_training(model)
        return model, loss_fn
    return torch.compile(model), loss_fn


def time_training(model, loss_fn, batches, args, device, compile_model: bool) -> dict:
    model.to(device).train()
    optimizer = build_adamw(model, lr=1e-4)  # run_glue.py's builder: fused on CUDA, foreach on CPU
    forward = model
    if compile_model:
        forward, loss_fn = compiled(model, loss_fn)

    def precision():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def step(batch):
        with precision():
            loss = loss_fn(forward, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(args.steps):
            loss = step(batches[i % len(batches)])
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        t0 = time.perf_counter()
        for i in range(args.steps):
            loss = step(batches[i % len(batches)])
        seconds = time.perf_counter() - t0
        peak = None
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"non-finite loss {float(loss)}")
    return {"step_ms": 1e3 * seconds / args.steps, "seq_per_s": args.steps * batches[0].input_ids.shape[0] / seconds,
            "peak_gib": peak}


def measure(build, loss_fn, batches, args, device, compile_model, deadline) -> dict:
    if time.perf_counter() > deadline:
        return {"error": "skipped: time budget"}
    model = None
    try:
        torch.manual_seed(0)
        model = build()
        return time_training(model, loss_fn, batches, args, device, compile_model)
    except Exception as exc:  # a missing feature / OOM is a table row, not a crash
        return {"error": short_error(exc)}
    finally:
        del model
        if compile_model:
            torch._dynamo.reset()
        # model.compile() stores a bound method on the model: a cycle that refcounting never frees,
        # so without a collection its weights and Adam state would count in the next model's peak.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None, help="base on CUDA, small on CPU")
    p.add_argument("--quick", action="store_true",
                   help="GPU quick preset: base, bf16, seq 128 (batch 256) and 512 (batch 64), modes dense + dam_s + "
                        "dam_u + pattern + dense_triton + dam_u_triton eager, dense + dam_s compiled; budget 240 s")
    p.add_argument("--seq_len", type=int, nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None, help="default: 256 @128 / 64 @512 on CUDA, 8 / 2 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="mask modes; a '_triton' suffix runs attention_backend 'triton' (CUDA only)")
    p.add_argument("--pattern", default="longformer", help="the fixed pattern of mode 'pattern'")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both models")
    p.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    p.add_argument("--compile_modes", nargs="+", default=None, help="modes timed compiled (default: all)")
    p.add_argument("--no_eager", action="store_true", help="with --compile: skip the eager rows")
    p.add_argument("--attn_dropout", type=float, default=0.1)
    p.add_argument("--pad_fraction", type=float, default=0.0, help="mean padded fraction per sequence")
    p.add_argument("--peak_tflops", type=float, default=None)
    p.add_argument("--time_budget_s", type=float, default=None)
    p.add_argument("--json", default=None, help="default results/bench_pretraining_<device>.json")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if args.pattern not in modeling.MASK_TYPES or args.pattern in ("dense", "dam_u", "dam_s", "file"):
        p.error(f"--pattern {args.pattern!r}: choose a fixed pattern ({', '.join(modeling.MASK_TYPES[1:-3])})")
    defaults = dict(preset="base" if cuda else "small", seq_len=[128, 512] if cuda else [128],
                    steps=20 if cuda else 3, warmup=5 if cuda else 1, modes=list(MASK_MODES),
                    time_budget_s=270.0 if cuda else 170.0)
    if args.quick:
        defaults.update(preset="base", seq_len=[128, 512], steps=10, warmup=3,
                        modes=["dense", "dense_triton", "dam_s", "dam_u", "dam_u_triton", "pattern"],
                        compile_modes=["dense", "dam_s"], time_budget_s=240.0)
        args.bf16 = args.bf16 or cuda
        args.compile = True
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.compile_modes is None:
        args.compile_modes = args.modes
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = PRESETS[args.preset]
    peak_tflops = peak_tflops_for(args, device)
    commit = git_commit()  # the code being measured: read before the run, not after
    started = time.perf_counter()
    deadline = started + args.time_budget_s
    compile_settings = ([False] if not args.no_eager else []) + ([True] if args.compile else [])
    rows = []
    # Eager rows for every length first, then compiled ones, so a time budget cuts compiles first.
    for compiled in compile_settings:
        for seq_len in args.seq_len:
            batch = args.batch or DEFAULT_BATCH.get((args.device, seq_len), max(2048 // seq_len, 1))
            batches = [make_batch(batch, seq_len, args.pad_fraction, device, seed) for seed in range(2)]
            flops = train_flops_per_sequence(cfg, seq_len)
            hf = measure(lambda: hf_model(cfg, seq_len, args.attn_dropout), hf_loss, batches, args, device,
                         compiled, deadline)
            for mode in (args.compile_modes if compiled else args.modes):
                ours = measure(lambda: our_model(cfg, mode, args.pattern, seq_len, args.attn_dropout), our_loss,
                               batches, args, device, compiled, deadline)
                ratio = ours["seq_per_s"] / hf["seq_per_s"] if "seq_per_s" in ours and "seq_per_s" in hf else None
                row = {"preset": args.preset, "seq_len": seq_len, "batch": batch, "compiled": compiled,
                       "mode": mode.replace("pattern", args.pattern), "ours": ours, "hf": hf,
                       "ratio": ratio, "mfu_ours": mfu(ours, flops, peak_tflops), "mfu_hf": mfu(hf, flops, peak_tflops)}
                rows.append(row)
                print(format_row(row), flush=True)
    meta = {"device": device_name(device), "torch": torch.__version__, "commit": commit,
            "preset": args.preset, "config": cfg, "bf16": args.bf16, "attn_dropout": args.attn_dropout,
            "pad_fraction": args.pad_fraction, "steps": args.steps, "warmup": args.warmup,
            "peak_tflops": peak_tflops, "flops_formula": "6*(4d^2+2d*dff)*L*n + 6*(d^2+d*V)*0.15n + 12*L*n^2*d",
            "wall_s": round(time.perf_counter() - started, 1)}
    print()
    print(f"# {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, preset {args.preset}, "
          f"{'bf16' if args.bf16 else 'fp32'}, attention dropout {args.attn_dropout}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, peak {peak_tflops or '-'} TFLOP/s, {meta['wall_s']} s total")
    print(markdown_table(rows))
    write_results(args.json, f"bench_pretraining_{args.device}.json", meta, rows)
    return rows


def peak_tflops_for(args: argparse.Namespace, device: torch.device) -> float | None:
    """--peak_tflops, else the card's half-precision spec for a --bf16 run: an fp32 run does not
    reach that peak, so an MFU against it would read 2-15x too low."""
    return args.peak_tflops or (peak_for(device) if args.bf16 else None)


def peak_for(device: torch.device) -> float | None:
    return peak_for_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_for_name(name: str) -> float | None:
    """Dense bf16 TFLOP/s of a CUDA device name, None when unknown."""
    return next((tf for key, tf in PEAK_TFLOPS.items() if key in name), None)


def mfu(result: dict, flops: float, peak_tflops: float | None) -> float | None:
    if peak_tflops is None or "seq_per_s" not in result:
        return None
    return result["seq_per_s"] * flops / (peak_tflops * 1e12)


def fmt_result(result: dict) -> str:
    return f"{result['seq_per_s']:.1f}" if "seq_per_s" in result else "-"


def format_row(r: dict) -> str:
    err = r["ours"].get("error") or r["hf"].get("error") or ""
    ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
    return (f"n={r['seq_len']:4d} B={r['batch']:3d} {'compiled' if r['compiled'] else 'eager   '} "
            f"{r['mode']:14s} ours {fmt_result(r['ours']):>9s} seq/s  HF {fmt_result(r['hf']):>9s} seq/s  {ratio} {err}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| config | mode | ours seq/s | HF seq/s | ours / HF | MFU ours | MFU HF | peak GiB ours / HF | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        config = f"{r['preset']} n={r['seq_len']} B={r['batch']} {'compile' if r['compiled'] else 'eager'}"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        mfus = [f"{100 * m:.1f} %" if m is not None else "-" for m in (r["mfu_ours"], r["mfu_hf"])]
        peaks = "/".join(f"{res['peak_gib']:.1f}" if res.get("peak_gib") is not None else "-"
                         for res in (r["ours"], r["hf"]))
        notes = "; ".join(f"{who}: {res['error']}" for who, res in (("ours", r["ours"]), ("HF", r["hf"]))
                          if "error" in res)
        lines.append(f"| {config} | {r['mode']} | {fmt_result(r['ours'])} | {fmt_result(r['hf'])} | {ratio} | "
                     f"{mfus[0]} | {mfus[1]} | {peaks} | {notes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
