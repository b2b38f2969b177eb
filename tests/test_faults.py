"""Fault matrix for run_pretraining.py: the run survives or stops cleanly with its last good state.

Preemption (SIGTERM at random moments), a SIGKILL in the middle of a checkpoint write, a save that
fails (disk full / permission denied), non-finite losses in fp32 and bf16, a torchrun worker that
dies or hangs, and (slow) a soak run interrupted again and again. Each case runs the real script on
a tiny BERT (CPU, one thread) and checks exit codes, the error line, the files on disk and, where a
run is resumed, that it ends with exactly the weights of an uninterrupted run.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import modeling
import run_pretraining
import training
from utils import read_dllogger_json

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_pretraining.py"
# Dropout, DAM noise and accumulation: a resumed run is exact only if every RNG and the data
# position come back, so these flags make the weight comparisons below meaningful.
FLAGS = dict(max_steps=24, gradient_accumulation_steps=2, attention_mask_type="dam_s", lamb=1e-3,
             num_steps_per_checkpoint=1000, log_freq=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, make_shards) -> Path:
    return make_shards(tmp_path_factory.mktemp("fault_corpus"), corpus_seeds=[10, 11], dupe_factor=1)


@pytest.fixture(scope="module")
def config(tmp_path_factory, write_config) -> Path:
    return write_config(tmp_path_factory.mktemp("fault_config") / "config.json")


@pytest.fixture(scope="module")
def reference(shards, config, tmp_path_factory, pretraining_args) -> Path:
    """The uninterrupted run every resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "out"
    torch.set_num_threads(1)
    assert run_pretraining.main(pretraining_args(shards, out, config, **FLAGS)) == 0
    return out


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(argv: list[str], log: Path, driver: Path | None = None, **env: str) -> subprocess.Popen:
    """run_pretraining.py (or a driver around it) in its own process, output to `log`."""
    cmd = [sys.executable, str(driver or SCRIPT), *([str(ROOT)] if driver else []), *argv]
    with open(log, "wb") as sink:
        return subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env={**subprocess_env(), **env})


def logged_steps(out: Path) -> int:
    log = out / "dllogger.json"
    return log.read_text(encoding="utf-8", errors="replace").count('"step_loss"') if log.is_file() else 0


def wait_for_training(out: Path, proc: subprocess.Popen, timeout: float = 60.0, lines: int = 1) -> None:
    """Block until the run logs `lines` more step records (after the first, its SIGTERM handler is
    installed)."""
    deadline = time.monotonic() + timeout
    before = logged_steps(out)
    while time.monotonic() < deadline:
        if logged_steps(out) >= before + lines:
            return
        assert proc.poll() is None, f"run exited early with {proc.returncode}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run never reached its first step")


def steps_of_last_run(out: Path) -> list[int]:
    """Optimizer steps logged by the latest invocation (the dllogger file is appended to)."""
    log = read_dllogger_json(out / "dllogger.json")
    start = max(i for i, rec in enumerate(log) if "train_start" in rec["data"])
    return [rec["step"][1] for rec in log[start:] if isinstance(rec["step"], list) and "step_loss" in rec["data"]]


@pytest.fixture
def resume_in_process(pretraining_args, dllogger_records):
    """`resume_in_process(shards, out, config, **flags)`: resume the run in `out` to the end; the step
    losses it logged."""

    def resume_in_process(shards: Path, out: Path, config: Path, **flags) -> dict[int, float]:
        first_part = dllogger_records(out, "step_loss")
        argv = pretraining_args(shards, out, config, resume_from_checkpoint=True, **{**FLAGS, **flags})
        assert run_pretraining.main(argv) == 0
        return {**first_part, **dllogger_records(out, "step_loss")}

    return resume_in_process


# ----------------------------------------------------------------------------- preemption (SIGTERM)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigterm_at_a_random_moment_checkpoints_exits_zero_and_resumes_exactly(shards, config, reference, tmp_path,
                                                                               seed, assert_same_weights,
                                                                               dllogger_records, pretraining_args,
                                                                               resume_in_process):
    out = tmp_path / "out"
    proc = launch(pretraining_args(shards, out, config, **FLAGS), tmp_path / "log.txt")
    wait_for_training(out, proc)
    # Anywhere in a step (forward, backward, optimizer). A step takes ~40 ms on 2 CPU cores, the
    # whole run ~1 s: stay well inside it, so the signal lands before the run ends on its own.
    time.sleep(random.Random(seed).uniform(0.0, 0.25))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()[-2000:]
    saved = [s for s, _ in checkpoints.list_checkpoints(out)]
    assert len(saved) == 1 and 1 <= saved[0] < FLAGS["max_steps"], saved
    stop = saved[0]
    assert max(dllogger_records(out, "step_loss")) == stop  # it stopped at the boundary it saved, nothing after
    assert checkpoints.load_checkpoint(out / f"ckpt_{stop}.pt")["global_step"] == stop
    losses = resume_in_process(shards, out, config)
    assert losses == dllogger_records(reference, "step_loss")
    assert_same_weights(out / "ckpt_24.pt", reference / "ckpt_24.pt")


# ----------------------------------------------------------------------------- SIGKILL during a checkpoint write


KILL_MID_WRITE = textwrap.dedent('''
    """run_pretraining whose checkpoint write number KILL_AT_SAVE stops half-way with SIGKILL."""
    import io, os, signal, sys
    sys.path.insert(0, sys.argv.pop(1))
    import torch, run_pretraining

    real_save, calls = torch.save, {"n": 0}

    def save_then_die(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < int(os.environ["KILL_AT_SAVE"]):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as out:  # half the real bytes reach the disk, then the power goes
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die
    sys.exit(run_pretraining.main())
''')


def test_sigkill_during_checkpoint_write_keeps_previous_and_resume_picks_it(shards, config, reference, tmp_path,
                                                                            assert_same_weights, dllogger_records,
                                                                            pretraining_args, resume_in_process):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_MID_WRITE)
    out = tmp_path / "out"
    flags = {**FLAGS, "num_steps_per_checkpoint": 2}
    proc = launch(pretraining_args(shards, out, config, **flags), tmp_path / "log.txt", driver=driver, KILL_AT_SAVE="2")
    assert proc.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-2000:]
    leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt_4.pt.")  # the half file, under a temp name
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2]
    step, path, state = checkpoints.find_latest_checkpoint(out)
    assert step == 2 and state["global_step"] == 2
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes, not 0600

    losses = resume_in_process(shards, out, config, num_steps_per_checkpoint=2)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the stale half file was removed
    assert min(steps_of_last_run(out)) == 3  # resumed after ckpt_2, not from a half-written ckpt_4
    assert losses == dllogger_records(reference, "step_loss")
    assert_same_weights(out / "ckpt_24.pt", reference / "ckpt_24.pt")


# ----------------------------------------------------------------------------- failing saves


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_checkpoint_write_stops_with_one_line_and_keeps_previous(shards, config, tmp_path, monkeypatch, capsys,
                                                                        code, dllogger_records, pretraining_args):
    out = tmp_path / "out"
    real_save, calls = torch.save, {"n": 0}

    def save_fails_second_time(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_fails_second_time)
    argv = pretraining_args(shards, out, config, **{**FLAGS, "num_steps_per_checkpoint": 2})
    assert run_pretraining.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "could not write checkpoint" in err[0] and "ckpt_4.pt" in err[0] and os.strerror(code) in err[0]
    assert "ckpt_2.pt" in err[0]  # names what is still there
    assert sorted(p.name for p in out.iterdir()) == ["ckpt_2.pt", "dllogger.json"]  # no half file, no lock anywhere
    assert checkpoints.load_checkpoint(out / "ckpt_2.pt")["global_step"] == 2
    assert max(dllogger_records(out, "step_loss")) == 4  # no silent continue past the failed save


# ----------------------------------------------------------------------------- non-finite losses


@pytest.mark.parametrize("precision, bad_value", [("fp32", "nan"), ("fp32", "inf"), ("bf16", "nan"), ("bf16", "inf")])
def test_non_finite_loss_is_skipped_then_bounded_keeping_good_state(shards, config, tmp_path, monkeypatch, capsys,
                                                                    precision, bad_value, dllogger_records,
                                                                    pretraining_args):
    """Forward call 2 is bad once (skipped); from call 6 on every step is bad, so the bound stops the run."""
    out = tmp_path / "out"
    calls = {"n": 0}
    real_loss = modeling.masked_lm_loss

    def loss_fn(*args):
        calls["n"] += 1
        loss = real_loss(*args)
        return loss * float(bad_value) if calls["n"] == 2 or calls["n"] >= 6 else loss

    monkeypatch.setattr(modeling, "masked_lm_loss", loss_fn)
    argv = pretraining_args(shards, out, config, max_steps=20, num_steps_per_checkpoint=2, max_bad_steps=3,
                            bf16=precision == "bf16", attention_mask_type="dam_s", lamb=1e-3)
    assert run_pretraining.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 consecutive optimizer steps had a non-finite loss" in err[0], err
    assert "ckpt_4.pt" in err[0] and "--max_bad_steps" in err[0]
    assert calls["n"] == 8  # 4 good steps + 1 skipped, then 3 bad ones: stopped at once
    assert dllogger_records(out, "skipped_steps")[4] == 1
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2, 4]
    state = checkpoints.load_checkpoint(out / "ckpt_4.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert moments and all(torch.isfinite(t).all() for t in moments)  # the skipped step left no NaN behind
    assert [g["step"] for g in state["optimizer"]["param_groups"]] == [4, 4, 4]


def test_bad_step_stop_names_only_a_checkpoint_with_finite_weights(shards, config, tmp_path, capsys, pretraining_args):
    """Resumed from NaN weights every step is bad: the stop must not call that checkpoint good."""
    out = tmp_path / "out"
    flags = dict(max_steps=20, num_steps_per_checkpoint=2, max_bad_steps=2)
    assert run_pretraining.main(pretraining_args(shards, out, config, **{**flags, "steps_this_run": 4})) == 0
    capsys.readouterr()
    for step, expected in ((4, "the last good checkpoint ckpt_2.pt is intact"), (2, "no checkpoint in")):
        state = checkpoints.load_checkpoint(out / f"ckpt_{step}.pt")
        state["model"] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                          for k, v in state["model"].items()}
        torch.save(state, out / f"ckpt_{step}.pt")
        resume = pretraining_args(shards, out, config, resume_from_checkpoint=True, resume_step=step, **flags)
        assert run_pretraining.main(resume) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "2 consecutive optimizer steps" in err[0] and expected in err[0], err
        assert f"ckpt_{step}.pt is intact" not in err[0] and "ckpt_4.pt is intact" not in err[0], err


# ----------------------------------------------------------------------------- torchrun workers


FAULTY_RANK = textwrap.dedent('''
    """run_pretraining where rank 1 misbehaves at its 3rd optimizer step: FAULT=die exits at once,
    FAULT=hang stops answering collectives. Rank 0 writes when it exited and with which code."""
    import json, os, signal, sys, time
    sys.path.insert(0, sys.argv.pop(1))
    import run_pretraining, training

    real_any_rank, calls = training.any_rank, {"n": 0}
    rank, events = int(os.environ["RANK"]), os.environ["EVENTS"]

    def faulty_any_rank(*flags, device):
        calls["n"] += 1
        if calls["n"] == 3 and rank == 1:
            with open(os.path.join(events, "fault_at"), "w") as f:
                f.write(str(time.time()))
            if os.environ["FAULT"] == "die":
                os._exit(3)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # so torchrun's clean-up does not wait 30 s for us
            time.sleep(3600)
        return real_any_rank(*flags, device=device)

    training.any_rank = faulty_any_rank
    code = run_pretraining.main()
    with open(os.path.join(events, f"rank{rank}_exit"), "w") as f:
        json.dump({"time": time.time(), "code": code}, f)
    sys.exit(code)
''')


@pytest.fixture
def run_faulty_torchrun(pretraining_args):
    """`run_faulty_torchrun(shards, config, tmp_path, fault)`: a 2-rank FAULTY_RANK run (fault "die" or
    "hang"); its exit code, seconds taken and output folder."""

    def run_faulty_torchrun(shards: Path, config: Path, tmp_path: Path, fault: str) -> tuple[int, float, Path]:
        driver = tmp_path / "driver.py"
        driver.write_text(FAULTY_RANK)
        out = tmp_path / "out"
        argv = pretraining_args(shards, out, config, max_steps=50, train_batch_size=4, num_steps_per_checkpoint=2,
                                dist_timeout=8)
        # --standalone: torchrun takes a free port from the OS (a fixed one can be in use)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(driver), str(ROOT), *argv]
        start = time.monotonic()
        result = subprocess.run(cmd, env={**subprocess_env(), "FAULT": fault, "EVENTS": str(tmp_path)},
                                capture_output=True, text=True, timeout=240)
        (tmp_path / "log.txt").write_text(result.stdout + result.stderr)
        return result.returncode, time.monotonic() - start, out

    return run_faulty_torchrun


def test_torchrun_worker_death_stops_the_other_in_bounded_time(shards, config, tmp_path, run_faulty_torchrun):
    code, elapsed, out = run_faulty_torchrun(shards, config, tmp_path, "die")
    assert code != 0
    assert elapsed < 90, elapsed  # torchrun tears the survivor down; nothing waits for the 30-minute default
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2]  # the last good state is intact
    assert checkpoints.load_checkpoint(out / "ckpt_2.pt")["global_step"] == 2


@pytest.mark.slow
def test_torchrun_stuck_worker_times_out_with_one_line(shards, config, tmp_path, run_faulty_torchrun):
    code, elapsed, out = run_faulty_torchrun(shards, config, tmp_path, "hang")
    assert code != 0
    fault_at = float((tmp_path / "fault_at").read_text())
    rank0 = json.loads((tmp_path / "rank0_exit").read_text())
    assert rank0["code"] == 1
    assert rank0["time"] - fault_at < 8 + 20, rank0["time"] - fault_at  # --dist_timeout 8, plus slack
    log = (tmp_path / "log.txt").read_text()
    lines = [line for line in log.splitlines() if "run_pretraining.py: error:" in line]
    assert len(lines) == 1 and "rank 0: lost the other workers" in lines[0] and "--dist_timeout" in lines[0], lines
    assert "[rank0]: Traceback" not in log  # rank 0 ends with its one line, not a stack dump
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [2]


# ----------------------------------------------------------------------------- soak


@pytest.mark.slow
def test_soak_random_sigterm_and_sigkill_end_with_uninterrupted_weights(shards, config, tmp_path, assert_same_weights,
                                                                        dllogger_records, pretraining_args):
    """200 steps, interrupted by SIGTERM or SIGKILL at random moments and resumed each time."""
    flags = {**FLAGS, "max_steps": 200, "num_steps_per_checkpoint": 20, "log_freq": 5}
    straight = tmp_path / "straight"
    proc = launch(pretraining_args(shards, straight, config, **flags), tmp_path / "straight.txt")
    assert proc.wait(timeout=300) == 0
    # Eight interruptions, each a few logged steps (5-20) into a run, so the count does not depend
    # on how fast the machine is: a resume goes back at most to the last checkpoint (every 20 steps),
    # so eight of them cannot reach step 200. Where within a step the signal lands stays random.
    rng = random.Random(2024)
    signals = [signal.SIGTERM, signal.SIGKILL] * 4
    rng.shuffle(signals)
    out = tmp_path / "out"
    for attempt, sig in enumerate([*signals, None]):
        resume = {"resume_from_checkpoint": True} if checkpoints.list_checkpoints(out) else {}
        proc = launch(pretraining_args(shards, out, config, **flags, **resume), tmp_path / f"run_{attempt}.txt")
        if sig is not None:
            wait_for_training(out, proc, timeout=120, lines=rng.randint(1, 4))
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(sig)
        code = proc.wait(timeout=300)
        assert code in (0, -signal.SIGKILL) if sig is not None else code == 0, \
            (tmp_path / f"run_{attempt}.txt").read_text()[-2000:]
    assert (out / "ckpt_200.pt").is_file()
    assert_same_weights(out / "ckpt_200.pt", straight / "ckpt_200.pt")
    state = checkpoints.load_checkpoint(out / "ckpt_200.pt")
    reference_state = checkpoints.load_checkpoint(straight / "ckpt_200.pt")
    for a, b in zip(state["optimizer"]["state"].values(), reference_state["optimizer"]["state"].values()):
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert math.isfinite(dllogger_records(out, "average_loss")[200])


FULL_DISK = '''
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
import checkpoints, utils
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit a write fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
which, out = sys.argv[2], sys.argv[3]
try:
    if which == "checkpoint":
        checkpoints.save_checkpoint({"model": {"w": torch.zeros(1 << 18)}}, out, 5)
    else:
        log = utils.MetricLogger(out + "/dllogger.json", verbose=False)
        for step in range(2000):
            log.log(step, {"loss": 1.0, "padding": "x" * 100})
except OSError as exc:
    print(exc)
'''


@pytest.mark.parametrize("which", ["checkpoint", "log"])
def test_a_really_full_disk_is_one_line_naming_the_file(tmp_path, which):
    """Not simulated in Python: the OS refuses the write (a file-size limit), so torch's own writer
    fails as it does on a full disk."""
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(ROOT), which, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stdout.strip()
    assert len(line.splitlines()) == 1
    if which == "checkpoint":
        assert f"could not write checkpoint {tmp_path / 'ckpt_5.pt'}" in line and "disk" in line
        assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".*tmp"))
    else:
        assert f"could not write the log {tmp_path / 'dllogger.json'}" in line and "free disk space" in line
