"""Unit tests of the shared training-loop helpers in training.py."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import training
from batches import ClassificationBatch
from modeling import BertConfig, BertForPreTraining, ModelOutput
from optimization import Lamb, build_lamb, param_groups
from schedulers import PolyWarmUpScheduler

TINY = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, mask_seq_length=16)


def tiny_model(**changes) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig(**{**TINY, **changes}))


def fake_grads(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


# ----------------------------------------------------------------------------- config / model


def test_load_config_applies_overrides_and_validates(tmp_path):
    path = tmp_path / "bert_config.json"
    BertConfig(**TINY).to_json_file(path)
    config = training.load_config(path, attention_mask_type="dam_s", dam_lambda=None)
    assert config.attention_mask_type == "dam_s" and config.dam_lambda == 0.0
    with pytest.raises(ValueError, match="attention_mask_type"):
        training.load_config(path, attention_mask_type="sparse-ish")


# ----------------------------------------------------------------------------- optimizer step


def test_non_finite_step_is_skipped_and_holds_the_schedule():
    model = nn.Linear(4, 4)
    optimizer = Lamb(param_groups(model), lr=0.1)
    scheduler = PolyWarmUpScheduler(optimizer, warmup=0.0, total_steps=10)
    scaler = training.make_grad_scaler(torch.device("cpu"), enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    fake_grads(model)
    model.weight.grad[0, 0] = float("nan")
    assert not bool(training.gradients_finite(optimizer, scaler))
    training.apply_optimizer_step(optimizer, scaler, scheduler, ok=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.param_groups[0]["step"] == 0 and all(p.grad is None for p in model.parameters())

    fake_grads(model)
    loss = torch.tensor(float("inf"))
    assert not bool(training.gradients_finite(optimizer, scaler, loss))  # finite grads, inf loss
    fake_grads(model)
    assert bool(training.gradients_finite(optimizer, scaler, torch.tensor(1.0)))
    training.apply_optimizer_step(optimizer, scaler, scheduler, ok=True)
    assert optimizer.param_groups[0]["step"] == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 1 / 10) ** 0.5)
    assert not torch.equal(before[0], model.weight)


def test_fp16_scaler_overflow_backs_off_on_cpu():
    model = nn.Linear(4, 1)
    optimizer = Lamb(param_groups(model), lr=0.1)
    scaler = training.make_grad_scaler(torch.device("cpu"), enabled=True, init_scale=1024.0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.ones(2, 4)).float().sum() * float("inf")
    scaler.scale(loss).backward()
    ok = bool(training.gradients_finite(optimizer, scaler, loss))
    training.apply_optimizer_step(optimizer, scaler, None, ok=ok)
    assert not ok and scaler.get_scale() == 512.0 and optimizer.param_groups[0]["step"] == 0


def test_any_rank_on_one_process():
    assert training.any_rank(torch.tensor(True), False, device=torch.device("cpu")) == [True, False]


class NamedLosses(nn.Module):
    """A model whose output's loss is a task term (scaled by the step's `scale` keyword) plus a penalty."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))

    def forward(self, input_ids, token_type_ids, attention_mask, labels, scale: float) -> ModelOutput:
        task, penalty = self.weight * input_ids.float().mean() * scale, self.weight * 0.25
        return ModelOutput(loss=task + penalty, mask_penalty=penalty)


def test_a_step_minimises_the_outputs_loss_and_averages_each_named_term():
    model = NamedLosses()
    optimization = training.Optimization(torch.optim.SGD(model.parameters(), lr=0.1), None,
                                         training.make_grad_scaler(torch.device("cpu"), enabled=False))
    step = training.TrainStep(model, optimization, torch.device("cpu"), None, training.BadStepBound(3),
                              training.ThroughputMeter(torch.device("cpu")), model_kwargs={"scale": 2.0})
    ones = torch.ones(2, 3, dtype=torch.long)
    micro_batches = [ClassificationBatch(ones * value, ones, ones, torch.zeros(2)) for value in (1, 3)]
    outcome = step(micro_batches, 0, lambda: "")
    assert outcome.applied and {k: v.item() for k, v in outcome.losses.items()} == {"loss": 8.5, "mask_penalty": 0.5}
    assert model.weight.item() == pytest.approx(2.0 - 0.1 * (4.0 + 0.25))  # d(mean loss)/dw: 2 * mean(1, 3) + 0.25
    window = training.LossWindow()
    window.add(outcome)
    losses = window.means()
    assert losses.mean == losses.last == {"loss": 8.5, "mask_penalty": 0.5} and window.steps == 0


# ----------------------------------------------------------------------------- optimizer state


def test_two_group_nvidia_state_loads_into_three_groups_with_fresh_mask_group():
    dense = tiny_model()
    groups = param_groups(dense)[:2]  # NVIDIA's layout: decay, no-decay
    nvidia = Lamb([{k: v for k, v in g.items() if k != "name"} for g in groups], lr=0.01)
    fake_grads(dense)
    nvidia.step()
    saved = nvidia.state_dict()

    dam = tiny_model(attention_mask_type="dam_s")
    dam.load_state_dict(dense.state_dict(), strict=False)
    optimizer = build_lamb(dam, lr=0.01)
    assert training.load_optimizer_state(optimizer, saved)
    first = optimizer.param_groups[0]["params"][0]
    assert torch.equal(optimizer.state[first]["exp_avg"], nvidia.state[nvidia.param_groups[0]["params"][0]]["exp_avg"])
    mask_logits = dam.mask_parameters()[0]
    assert optimizer.param_groups[2]["params"] == [mask_logits] and mask_logits not in optimizer.state
    assert optimizer.param_groups[2]["weight_decay"] == 0.0
    fake_grads(dam)
    optimizer.step()  # the fresh group steps fine


def test_mismatched_optimizer_state_is_refused_not_crashing():
    small = tiny_model()
    other = tiny_model(num_hidden_layers=2)
    saved = build_lamb(other, lr=0.01).state_dict()
    assert not training.load_optimizer_state(build_lamb(small, lr=0.01), saved)


# ----------------------------------------------------------------------------- run_script


@pytest.mark.parametrize("error", [ValueError("bad --lamb -1: must be >= 0"), FileNotFoundError("x.json not found"),
                                   training.TrainingError("3 consecutive bad steps")])
def test_run_script_turns_user_errors_into_one_line_and_exit_1(capsys, error):
    def body():
        raise error

    assert training.run_script("tool.py", body) == 1
    assert capsys.readouterr().err == f"tool.py: error: {error}\n"


def test_run_script_keeps_the_traceback_of_a_bug_and_returns_0_on_success(capsys):
    def bug():
        raise RuntimeError("connection reset by peer")  # looks like a lost peer, but there is no peer

    with pytest.raises(RuntimeError, match="connection reset"):
        training.run_script("tool.py", bug)
    with pytest.raises(KeyError):
        training.run_script("tool.py", lambda: {}["missing"])
    assert training.run_script("tool.py", lambda: None) == 0
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- SIGTERM, meter


def test_sigterm_becomes_a_flag_and_handler_is_restored():
    previous = signal.getsignal(signal.SIGTERM)
    with training.SigtermFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested
    assert signal.getsignal(signal.SIGTERM) == previous


def meter_after_steps(monkeypatch, warmup_steps: int, steps: int) -> tuple[training.ThroughputMeter, list[float]]:
    """A meter on a fake clock that has counted `steps` steps of 8 sequences, one second each
    (they end at t = 1 .. steps), and the clock to move on."""
    now = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])
    meter = training.ThroughputMeter(torch.device("cpu"), warmup_steps=warmup_steps)
    for _ in range(steps):
        now[0] += 1.0
        meter.update(8)
    return meter, now


def test_throughput_meter_skips_warmup_steps(monkeypatch):
    """The rates cover only the steps after the warm-up, timed from the end of the last warm-up
    step (not from construction)."""
    meter, _ = meter_after_steps(monkeypatch, warmup_steps=2, steps=5)  # the warm-up ends at t = 2
    assert meter.total_sequences == 40
    assert meter.sequences_per_second() == 24 / (5 - 2)
    assert meter.seconds_per_step() == (5 - 2) / 3


def test_throughput_meter_of_a_run_shorter_than_its_warmup_counts_every_step(monkeypatch):
    """A run that never gets past the warm-up is measured over all its steps, not reported as 0."""
    meter, _ = meter_after_steps(monkeypatch, warmup_steps=4, steps=3)
    assert meter.sequences_per_second() == 24 / 3 and meter.seconds_per_step() == 1.0


def test_throughput_meter_stop_freezes_the_clock(monkeypatch):
    """What follows stop() (the last checkpoint) is not training time."""
    meter, now = meter_after_steps(monkeypatch, warmup_steps=1, steps=3)  # the warm-up ends at t = 1
    meter.stop()
    now[0] += 100.0  # a slow final checkpoint
    assert meter.elapsed() == 2.0 and meter.sequences_per_second() == 16 / 2 and meter.seconds_per_step() == 1.0


# ----------------------------------------------------------------------------- DDP gradient averaging


def _ddp_worker(rank: int, world_size: int, init_file: str, compress_dtype: torch.dtype | None = None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for accumulation in (1, 2):
            _check_ddp_gradients(rank, world_size, accumulation, compress_dtype)
    finally:
        training.release_distributed()


def _check_ddp_gradients(rank: int, world_size: int, accumulation: int,
                         compress_dtype: torch.dtype | None = None) -> None:
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    if rank == 0:
        model.load_state_dict(reference.state_dict())
    ddp = training.wrap_distributed(model, torch.device("cpu"), compress_dtype=compress_dtype)
    assert training.unwrap_model(ddp) is model
    generator = torch.Generator().manual_seed(123)
    x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 1, generator=generator)
    # Global batch 8: rank r owns rows r::world, split into `accumulation` micro-batches.
    mine_x, mine_y = x[rank::world_size], y[rank::world_size]
    for m, (bx, by) in enumerate(zip(mine_x.chunk(accumulation), mine_y.chunk(accumulation))):
        with training.grad_sync(ddp, sync=m == accumulation - 1):
            loss = nn.functional.mse_loss(ddp(bx), by) / accumulation
            loss.backward()
        if m < accumulation - 1 and accumulation > 1:
            # no_sync: this rank's gradient is still its own, not yet the average
            local = model[0].weight.grad.clone()
            others = [torch.zeros_like(local) for _ in range(world_size)]
            dist.all_gather(others, local)
            assert not torch.allclose(others[0], others[1])
    nn.functional.mse_loss(reference(x), y).backward()
    tolerance = 1e-5 if compress_dtype is None else 1e-2  # half-precision all-reduce
    for ours, ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=tolerance, atol=tolerance)
        if compress_dtype is not None:  # the all-reduce really ran in half: every value fits it
            assert torch.equal(ours.grad, ours.grad.to(compress_dtype).float())


def test_ddp_gradients_equal_single_process_mean(tmp_path):
    """2 gloo ranks, accumulation 1 and 2: the synced gradient is the mean over the global batch."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ddp_gradients_all_reduced_in_half_precision_on_gloo(tmp_path, dtype):
    """--allreduce_post_accumulation_fp16 on CPU: gloo all-reduces fp16 and bf16 (torch's own bf16
    hook refuses any backend but NCCL)."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), dtype), nprocs=2, join=True)



def test_output_dir_lock_is_removed_on_release_and_refuses_a_second_holder(tmp_path):
    lock_file = tmp_path / "out" / training.OutputDirLock.NAME
    with training.OutputDirLock(tmp_path / "out", "first.py") as first:
        first.acquire()
        assert "first.py (pid" in lock_file.read_text()
        with pytest.raises(ValueError, match="in use by first.py"):
            training.OutputDirLock(tmp_path / "out", "second.py").acquire()
    assert not lock_file.exists()  # a clean end leaves no empty .lock behind


def test_a_lock_opened_before_its_holder_released_it_is_not_taken(tmp_path):
    """A run that opened the file just before the holder unlinked it must not lock that orphan:
    a third run would lock the new file and both would write."""
    holder = training.OutputDirLock(tmp_path, "holder.py")
    holder.acquire()
    late = training.OutputDirLock(tmp_path, "late.py")
    orphan_fd = os.open(tmp_path / holder.NAME, os.O_RDWR)
    real_open = os.open
    handed = []

    def open_orphan_first(path, *args):
        if not handed:
            handed.append(path)
            return orphan_fd
        return real_open(path, *args)

    holder.release()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", open_orphan_first)
        late.acquire()
    third = training.OutputDirLock(tmp_path, "third.py")
    with pytest.raises(ValueError, match="in use by late.py"):
        third.acquire()
    late.release()


def test_release_leaves_a_lock_file_that_is_not_its_own(tmp_path):
    lock = training.OutputDirLock(tmp_path, "run.py")
    lock.acquire()
    (tmp_path / lock.NAME).unlink()  # removed by hand while held, then another run's file in its place
    (tmp_path / lock.NAME).write_text("other.py (pid 1)\n")
    lock.release()
    assert (tmp_path / lock.NAME).read_text() == "other.py (pid 1)\n"
