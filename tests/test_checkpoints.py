"""checkpoints.py: file names and numbering, what a checkpoint holds, saving, pruning, finding,
safe loading and the resume rules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import checkpoints
import training
from checkpoints import Found


# ----------------------------------------------------------------------------- names and numbering


def test_names_round_trip_and_other_files_are_no_checkpoint(tmp_path):
    assert checkpoints.checkpoint_path(tmp_path, 12) == tmp_path / "ckpt_12.pt"
    assert checkpoints.step_in_name(tmp_path / "ckpt_12.pt") == 12
    for name in (".ckpt_9.pt.abc.tmp", "ckpt_x.pt", "ckpt_1.pt.bak", "mask_3.safetensors", "ckpt_1.pt\n"):
        assert checkpoints.step_in_name(name) is None, name


def test_phase2_numbers_continue_phase1():
    assert checkpoints.name_step(5, phase2=False, phase1_end_step=7038) == 5
    assert checkpoints.name_step(5, phase2=True, phase1_end_step=7038) == 7043


@pytest.mark.parametrize("state, name, number", [
    ({"global_step": 4, "phase2": False}, "renamed.pt", 4),
    ({"global_step": 3, "phase2": True, "args": json.dumps({"phase1_end_step": 10})}, "x.pt", 13),
    ({"global_step": 3, "phase2": True, "args": "not json"}, "ckpt_13.pt", 13),  # the name, then
    ({"model": {}}, "ckpt_7038.pt", 7038),  # NVIDIA's: only its name tells
    ({"model": {}}, "weights.pt", None),
])
def test_checkpoint_number_from_the_state_else_the_name(state, name, number):
    assert checkpoints.checkpoint_number(state, name) == number


# ----------------------------------------------------------------------------- what a checkpoint holds


class Batches:
    """The data position's side of `assemble`, as pretraining_data.PretrainingBatches gives it."""

    epoch, file_index = 1, 2
    loaded: dict | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "file_index": self.file_index, "batch_index": 3}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state

    def epoch_files(self, epoch: int) -> list[str]:
        return ["a.hdf5", "b.hdf5"]


def tiny_optimization(model: nn.Module) -> training.Optimization:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return training.Optimization(optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))


def test_assembled_state_holds_every_key_and_loads_back(tmp_path):
    model = nn.Linear(2, 2)
    state = checkpoints.assemble(model, tiny_optimization(model), Batches(), 4, False, "{}", {"seed": 1}, None)
    assert set(state) == set(checkpoints.KEYS) - {checkpoints.MASK}
    assert state[checkpoints.FILES] == [2, "a.hdf5", "b.hdf5"] and state[checkpoints.EPOCH] == 1
    checkpoints.save_checkpoint(state, tmp_path, 4)
    loaded = checkpoints.load_checkpoint(tmp_path / "ckpt_4.pt")
    assert loaded[checkpoints.GLOBAL_STEP] == 4 and json.loads(loaded[checkpoints.ARGS]) == {"seed": 1}
    assert torch.equal(loaded[checkpoints.MODEL]["weight"], model.weight)


def test_rng_states_round_trip():
    states = checkpoints.gather_rng_states()
    expected = torch.rand(3)
    assert checkpoints.restore_rng_states(states)
    assert torch.equal(torch.rand(3), expected)
    assert not checkpoints.restore_rng_states(states * 2)  # saved by 2 ranks, this run has 1
    assert not checkpoints.restore_rng_states(None)
    with pytest.raises(ValueError, match="RNG state of rank 0 is damaged"):
        checkpoints.restore_rng_states([{"python": "[]"}])


# ----------------------------------------------------------------------------- saving, finding, loading


def test_save_keeps_last_three_and_ignores_temp_files(tmp_path):
    for step in range(1, 6):
        checkpoints.save_checkpoint({"model": {"w": torch.tensor([step])}}, tmp_path, step)
    (tmp_path / ".ckpt_9.pt.abc.tmp").write_bytes(b"half")
    (tmp_path / "ckpt_x.pt").write_bytes(b"not ours")
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path)] == [3, 4, 5]
    step, path, state = checkpoints.find_latest_checkpoint(tmp_path)
    assert step == 5 and state["model"]["w"].item() == 5
    assert checkpoints.remove_interrupted_writes(tmp_path) == [tmp_path / ".ckpt_9.pt.abc.tmp"]


def test_failed_save_is_clear_and_keeps_previous(tmp_path, monkeypatch):
    checkpoints.save_checkpoint({"model": {"w": torch.tensor([1])}}, tmp_path, 1)

    def disk_full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*ckpt_2\.pt.*No space left.*ckpt_1\.pt"):
        checkpoints.save_checkpoint({"model": {}}, tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_1.pt"]
    assert checkpoints.load_checkpoint(tmp_path / "ckpt_1.pt")["model"]["w"].item() == 1


class Payload:
    """Something only unpickling could rebuild."""


def test_latest_checkpoint_skips_corrupt_and_pickled_files(tmp_path):
    checkpoints.save_checkpoint({"model": {"w": torch.tensor([1])}}, tmp_path, 1, keep=0)
    torch.save({"model": {}, "payload": Payload()}, tmp_path / "ckpt_2.pt")
    (tmp_path / "ckpt_3.pt").write_bytes(b"\x80\x02truncated")
    step, _, state = checkpoints.find_latest_checkpoint(tmp_path)
    assert step == 1
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        checkpoints.load_checkpoint(tmp_path / "ckpt_2.pt")
    with pytest.raises(FileNotFoundError, match="--resume_step 7"):
        checkpoints.find_latest_checkpoint(tmp_path, step=7)
    assert checkpoints.find_latest_checkpoint(tmp_path / "empty") is None


def test_entries_of_the_wrong_type_are_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "rng": {}}, tmp_path / "ckpt_1.pt")
    with pytest.raises(ValueError, match="its 'rng' entry is a dict, not a list"):
        checkpoints.load_checkpoint(tmp_path / "ckpt_1.pt")


def test_last_good_checkpoint_skips_non_finite_weights(tmp_path):
    checkpoints.save_checkpoint({"model": {"w": torch.ones(1)}}, tmp_path, 1)
    checkpoints.save_checkpoint({"model": {"w": torch.tensor([math.nan])}}, tmp_path, 2)
    assert checkpoints.last_good_checkpoint(tmp_path) == "the last good checkpoint ckpt_1.pt is intact"
    (tmp_path / "ckpt_1.pt").unlink()
    assert "no checkpoint" in checkpoints.last_good_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- resume


def test_find_resume_never_overwrites_nor_restarts_over_a_run(tmp_path):
    assert checkpoints.find_resume(tmp_path, resume=False) is None
    assert checkpoints.find_resume(tmp_path, resume=True) is None
    (tmp_path / "ckpt_3.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds checkpoints .ckpt_3.pt.; pass --resume_from_checkpoint"):
        checkpoints.find_resume(tmp_path, resume=False)
    with pytest.raises(ValueError, match=r"no checkpoint in .* loads \(ckpt_3.pt"):
        checkpoints.find_resume(tmp_path, resume=True)


def found(step: int, **state) -> Found:
    return Found(step, Path(f"ckpt_{step}.pt"), {"model": {}, **state})


@pytest.mark.parametrize("checkpoint, phase2, phase1_end_step, expected", [
    (found(4, global_step=4, phase2=False), False, 7038, (4, True)),  # phase 1 goes on
    (found(4, global_step=4, phase2=False), True, 4, (0, False)),  # phase 2 starts from phase 1's last
    (found(7, global_step=3, phase2=True), True, 4, (3, True)),  # phase 2 goes on
    (found(7040), True, 7038, (2, True)),  # NVIDIA's phase-2 checkpoint: its name's arithmetic
    (found(7038), True, 7038, (0, False)),  # NVIDIA's phase-1 checkpoint
])
def test_phase_step_follows_nvidia_rules(checkpoint, phase2, phase1_end_step, expected):
    assert checkpoints.phase_step(checkpoint, phase2, phase1_end_step) == expected


@pytest.mark.parametrize("checkpoint, phase2, phase1_end_step, message", [
    (found(7, global_step=3, phase2=True), False, 7038, "ckpt_7.pt is a phase-2 checkpoint: resume it with --phase2 "
                                                        "--phase1_end_step 4"),
    (found(7, global_step=3, phase2=True), True, 5, "numbered with --phase1_end_step 4, this run has 5"),
    (found(9, global_step=9, phase2=False), True, 4, "ckpt_9.pt is past --phase1_end_step 4: pass "
                                                     "--phase1_end_step 9"),
])
def test_numbering_that_would_clash_is_refused(checkpoint, phase2, phase1_end_step, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        checkpoints.phase_step(checkpoint, phase2, phase1_end_step)


@pytest.mark.parametrize("phase2, expected_step, continuing", [(False, 4, True), (True, 0, False)])
def test_restore_gives_each_component_its_state(phase2, expected_step, continuing):
    model = nn.Linear(2, 2)
    saved = tiny_optimization(model)
    saved.optimizer.param_groups[0]["lr"] = 0.05  # as a schedule would have moved it
    state = checkpoints.assemble(model, saved, Batches(), 4, False, "{}", {}, None)
    optimization, batches = tiny_optimization(model), Batches()
    step, rng = checkpoints.restore(found(4, **state), optimization, batches, phase2=phase2, phase1_end_step=4,
                                    fp16=False, loss_scale=0.0)
    assert step == expected_step and (rng is state[checkpoints.RNG]) == continuing
    assert batches.loaded == (state[checkpoints.DATA] if continuing else None)
    assert optimization.optimizer.param_groups[0]["lr"] == (0.05 if continuing else 0.1)  # a new phase restarts
