"""Data pipeline throughput: HDF5 shard creation (MB of text per second, 1 and N processes) and
the pretraining loader (samples per second).

    python bench/bench_data.py [--mb 4] [--dupe_factor 5] [--out bench/results/data.json]

The text is the demo corpus (standard-library English, no download), repeated to --mb megabytes.
Tokenisation uses vocab/vocab (bert-base-uncased). Timings are wall-clock on this machine;
the loader is timed with one torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atomic_io import atomic_write_text  # noqa: E402
from data import demo_corpus  # noqa: E402
from data.create_pretraining_data import InstanceConfig, create_shard  # noqa: E402
import pretraining_data  # noqa: E402


def make_text(path: Path, megabytes: float) -> int:
    reference, library = demo_corpus.reference_documents(), demo_corpus.library_documents()
    block = "\n\n".join("\n".join(doc) for doc in reference + library) + "\n\n"
    copies = max(1, round(megabytes * 2**20 / len(block.encode())))
    path.write_text(block * copies, encoding="utf-8")
    return path.stat().st_size


def bench_create(text: Path, out_dir: Path, processes: int, cfg: InstanceConfig, chunk_mb: float) -> dict:
    out = out_dir / f"bench_{processes}.hdf5"
    start = time.perf_counter()
    n = create_shard([str(text)], str(out), str(ROOT / "vocab" / "vocab"), cfg, n_processes=processes,
                     chunk_mb=chunk_mb, progress=False)
    seconds = time.perf_counter() - start
    mb = text.stat().st_size / 2**20
    return {"processes": processes, "seconds": seconds, "text_mb": mb, "mb_per_s": mb / seconds,
            "instances": n, "instances_per_s": n / seconds, "shard": str(out)}


def bench_loader(shard: str, batch_size: int, max_pred: int) -> dict:
    import torch
    torch.set_num_threads(1)  # batches are tiny gathers; extra intra-op threads only add contention
    start = time.perf_counter()
    dataset = pretraining_data.PretrainingDataset(shard, max_pred)
    load_s = time.perf_counter() - start
    stream = pretraining_data.PretrainingBatches([shard], batch_size, max_pred, seed=0, pin_memory=False,
                                                 prefetch=False)
    n_batches = (len(dataset) + batch_size - 1) // batch_size
    start = time.perf_counter()
    samples = 0
    for _, (_, batch) in zip(range(n_batches), stream):
        samples += len(batch)
    seconds = time.perf_counter() - start
    stream.close()
    return {"batch_size": batch_size, "shard_load_s": load_s, "samples": samples,
            "samples_per_s": samples / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=4.0, help="MB of text to turn into a shard, rounded to whole copies of the demo corpus (about 1 MB; at least one)")
    p.add_argument("--dupe_factor", type=int, default=5, help="bertPrep's default is 5")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--max_predictions_per_seq", type=int, default=20)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk_mb", type=float, default=0.5, help="small enough to give every process work")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    args = p.parse_args()
    cfg = InstanceConfig(args.max_seq_length, args.max_predictions_per_seq, dupe_factor=args.dupe_factor)

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        make_text(text, args.mb)
        create = [bench_create(text, Path(tmp), n, cfg, args.chunk_mb) for n in args.processes]
        loader = bench_loader(create[0]["shard"], args.batch_size, args.max_predictions_per_seq)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"shard creation (seq {args.max_seq_length}, dupe_factor {args.dupe_factor}, {create[0]['text_mb']:.1f} MB text)")
    print(f"{'processes':>9} {'seconds':>8} {'MB text/s':>10} {'instances/s':>12}")
    for r in create:
        print(f"{r['processes']:>9} {r['seconds']:>8.2f} {r['mb_per_s']:>10.3f} {r['instances_per_s']:>12.0f}")
    print(f"loader: shard load {loader['shard_load_s']:.2f} s, {loader['samples_per_s']:.0f} samples/s "
          f"(batch {loader['batch_size']})")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "config": vars(args), "create": [{k: v for k, v in r.items() if k != "shard"} for r in create],
              "loader": loader}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
