"""Bench helpers whose mistakes would change a reported number: peaks, freeing, gradients, inputs."""
import argparse
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_attention as ba  # noqa: E402
import bench_pretraining as bp  # noqa: E402
import sparse_attention as sa  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None)])
def test_peak_matches_the_card_variant(name, tflops):
    assert bp.peak_for_name(name) == tflops


def test_no_half_precision_peak_for_an_fp32_run():
    cuda = torch.device("cuda")  # never queried: an fp32 run stops before the device name
    assert bp.peak_tflops_for(argparse.Namespace(peak_tflops=None, bf16=False), cuda) is None
    assert bp.peak_tflops_for(argparse.Namespace(peak_tflops=123.0, bf16=False), cuda) == 123.0


def test_train_flops_count_the_matmuls_of_bert_base_at_128():
    cfg = bp.PRESETS["base"]
    d, layers, d_ff, n, masked = 768, 12, 3072, 128, 19
    forward = layers * n * (2 * 4 * d * d + 2 * 2 * d * d_ff + 4 * n * d) + masked * 2 * (d * d + d * 30522)
    assert bp.train_flops_per_sequence(cfg, n) == 3 * forward


class Cyclic(torch.nn.Module):
    """A module only a garbage collection frees, as `model.compile()` leaves one."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.me = [self]

    def forward(self, x):
        return self.linear(x).sum()


def test_measure_frees_a_model_held_by_a_reference_cycle():
    refs = []

    def build():
        model = Cyclic()
        refs.append(weakref.ref(model))
        return model

    batches = [bp.make_batch(2, 16, 0.0, CPU, 0)]
    args = argparse.Namespace(warmup=1, steps=1, bf16=False)
    result = bp.measure(build, lambda m, b: m(b.input_ids[:, :4].float()), batches, args, CPU, False,
                        time.perf_counter() + 60)
    assert "seq_per_s" in result
    assert refs[0]() is None


def test_time_path_clears_the_learned_bias_grad_every_step():
    keep = ba.band_global_mask(32, 16, "token")
    q, k, v = ba.make_inputs(1, 2, 32, 8, CPU, torch.float32)
    fn, learned = ba.build_path("dam_sdpa", q, keep, 16, CPU, None)
    assert len(learned) == 1 and learned[0].shape == (2, 32, 32)
    ba.time_path(fn, learned, q, k, v, warmup=1, iters=2, device=CPU)
    assert all(t.grad is None for t in (q, k, v, *learned))


def test_every_path_reads_the_same_inputs():
    first, second = ba.make_inputs(2, 2, 16, 8, CPU, torch.float32), ba.make_inputs(2, 2, 16, 8, CPU, torch.float32)
    assert all(torch.equal(a, b) and a.requires_grad for a, b in zip(first, second))


@pytest.mark.skipif(not sa.flex_available(), reason="torch has no flex_attention")
def test_dam_flex_reads_its_learned_bias_at_every_call():
    n = 128
    keep = ba.band_global_mask(n, 64, "block")
    q, k, v = (t.detach() for t in ba.make_inputs(1, 2, n, 16, CPU, torch.float32))  # CPU flex: forward only
    fn, (keep_soft,) = ba.build_path("dam_flex", q, keep, 64, CPU, sa.flex_attention)
    with torch.no_grad():
        before = fn(q, k, v)
        keep_soft[:, :, n // 2:] = 0.0  # drop the second half of the keys
        after = fn(q, k, v)
    assert not torch.allclose(before, after)
