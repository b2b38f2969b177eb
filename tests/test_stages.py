"""scripts/stages.py: the resumable stages' progress lines (stage k of N, elapsed, time left)."""
import re

import pytest


@pytest.fixture
def stages(script_module):
    return script_module("stages")


def test_durations_read_as_seconds_minutes_or_hours(stages):
    assert stages.format_duration(42.4) == "42 s"
    assert stages.format_duration(185) == "3 min 05 s"
    assert stages.format_duration(3725) == "1 h 02 min"
    assert stages.format_duration(-1) == "0 s"


def test_time_left_is_the_plan_scaled_by_the_pace_measured_so_far(stages):
    assert stages.remaining_seconds(elapsed=0.0, done_expected=0.0, left_expected=300.0) == 300.0
    # Stages planned at 100 s took 150 s (a loaded machine): the 300 s left will take 450 s.
    assert stages.remaining_seconds(elapsed=150.0, done_expected=100.0, left_expected=300.0) == 450.0
    assert stages.remaining_seconds(elapsed=50.0, done_expected=100.0, left_expected=300.0) == 150.0


def test_a_planned_run_prints_stage_k_of_n_and_leaves_finished_stages_out(stages, tmp_path, capsys, monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 10.0, 30.0, 30.0, 30.0, 30.0, 30.0, 70.0, 70.0, 70.0])
    monkeypatch.setattr(stages.time, "perf_counter", lambda: next(clock))
    run = stages.Stages(tmp_path, "demo")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "old.done").write_text("1.0\n")
    run.plan({"old": 5.0, "a": 20.0, "b": 40.0})
    for name in ("old", "a", "b"):
        run.stage(name, tmp_path / name, lambda: None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[demo] 2 stages to run, about 1 min 00 s as planned"
    assert lines[1] == "[demo] old: done before, skipped"
    # a: planned 20 s, took 20 s of the elapsed 30 s -> b's 40 s planned at 30/20 pace: 60 s.
    assert lines[2] == "[demo] stage 1 of 2: a ... | elapsed 10 s, about 1 min 00 s left"
    assert lines[3] == "[demo] a done in 20 s, 1 of 2 finished | elapsed 30 s, about 1 min 00 s left"
    assert lines[4] == "[demo] stage 2 of 2: b ... | elapsed 30 s, about 1 min 00 s left"
    assert lines[5] == "[demo] b done in 40 s, 2 of 2 finished | elapsed 1 min 10 s, about 0 s left"
    assert (tmp_path / "stages" / "b.done").read_text() == "40.0\n"


def test_an_unplanned_run_counts_stages_without_an_estimate(stages, tmp_path, capsys):
    run = stages.Stages(tmp_path, "reproduce")
    run.stage("a", tmp_path / "a", lambda: print("working"))
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[reproduce\] stage 1: a \.\.\. \| elapsed \d+ s", lines[0])
    assert lines[1] == "working"
    assert re.fullmatch(r"\[reproduce\] a done in \d+ s, 1 finished \| elapsed \d+ s", lines[2])
