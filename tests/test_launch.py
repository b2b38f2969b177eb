"""launch.py: the flags, checks and start-up both entry scripts share."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys

import pytest
from tqdm import tqdm

import launch
import run_glue
import run_pretraining
from modeling import BertConfig
from utils import MetricLogger, read_dllogger_json

SCRIPTS = {"run_pretraining.py": run_pretraining, "run_glue.py": run_glue}


def parser_of(script) -> argparse.ArgumentParser:
    """The script's parser, as its parse_arguments builds it (nothing parsed)."""
    built = []

    def keep(self, args=None, namespace=None):
        built.append(self)
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", keep)
        with pytest.raises(SystemExit):
            script.parse_arguments([])
    return built[0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help_text_and_help_shows_defaults_and_choices(name, capsys):
    parser = parser_of(SCRIPTS[name])
    assert not [a.option_strings for a in parser._actions if not a.help]
    with pytest.raises(SystemExit):
        SCRIPTS[name].parse_arguments(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max_seq_length MAX_SEQ_LENGTH tokens per sequence (default: 128)" in text
    assert "{dense,no_diagonal,strided,fixed,longformer,logsparse,bigbird,star,dam_u,dam_s,file}" in text
    assert "NVIDIA's flags, accepted and ignored:" in text and "--bert_model" in text


def test_the_ignored_nvidia_flags_are_accepted_and_change_nothing(tmp_path):
    base = ["--input_dir", str(tmp_path), "--config_file", "c.json", "--output_dir", str(tmp_path / "o")]
    plain = vars(run_pretraining.parse_arguments(base))
    nvidia = vars(run_pretraining.parse_arguments([*base, "--bert_model", "bert-large-uncased", "--num_workers", "8",
                                                   "--num_train_epochs", "3", "--use_env", "--resume_phase2",
                                                   "--cuda_graphs", "--profile", "--profile-start", "10"]))
    ignored = {"bert_model", "num_workers", "num_train_epochs", "use_env", "resume_phase2", "cuda_graphs", "profile",
               "profile_start"}
    assert {k: v for k, v in plain.items() if k not in ignored} == {k: v for k, v in nvidia.items() if k not in ignored}


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_script_s_own_defaults_override_the_shared_ones(name):
    defaults = {a.dest: a.default for a in parser_of(SCRIPTS[name])._actions}
    expected = {"run_pretraining.py": (42, 0.01), "run_glue.py": (1, 0.1)}[name]
    assert (defaults["seed"], defaults["warmup_proportion"]) == expected


def test_read_config_overrides_win_and_none_keeps_the_file_s_value(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"attention_mask_type": "star", "dam_lambda": 0.5}')
    args = argparse.Namespace(config_file=str(config), attention_mask_type=None, config_overrides=[])
    assert launch.read_config(args, dam_lambda=None).attention_mask_type == "star"
    assert launch.read_config(args, dam_lambda=None).dam_lambda == 0.5
    args.attention_mask_type = "dense"
    assert launch.read_config(args, attention_mask_type="strided").attention_mask_type == "strided"


def shared_args(tmp_path, *extra: str) -> argparse.Namespace:
    return run_pretraining.parse_arguments(["--input_dir", str(tmp_path), "--config_file", "c.json",
                                            "--output_dir", str(tmp_path / "o"), *extra])


@pytest.mark.parametrize("verbose", [False, True])
def test_the_full_parameter_dump_is_printed_only_with_verbose_and_always_logged(tmp_path, capsys, verbose):
    args = shared_args(tmp_path, *(["--verbose"] if verbose else []))
    metrics = launch.open_metrics(args, BertConfig(vocab_size=10))
    metrics.close()
    out = capsys.readouterr().out
    assert ("Config" in out) == verbose and "SEED: 42" in out and len(out) < 2000 + 2000 * verbose
    records = read_dllogger_json(tmp_path / "o" / "dllogger.json")
    config = next(r["data"]["Config"] for r in records if "Config" in r["data"])
    assert json.loads(config)["verbose"] is verbose  # plot_training.py reads λ from it


def glued(text: str, bar: str, line: str) -> bool:
    """Whether a segment of terminal output (split at \\r and \\n) holds both the bar's text and the line."""
    return any(bar in part and line in part for part in re.split(r"[\r\n]", text))


def test_log_and_metric_lines_are_never_glued_to_a_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a fresh process (pytest installs its own)
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    launch.configure_logging(rank=0)
    to_stderr = tqdm(total=4, desc="pretraining", file=sys.stderr)  # where tqdm draws by default
    to_stdout = tqdm(total=4, desc="fine-tuning", file=sys.stdout)  # a terminal shows both streams on one screen
    to_stderr.update(1)
    to_stdout.update(1)
    logging.getLogger("run_pretraining").info("warm start from x")
    MetricLogger(tmp_path / "log.json").log((0, 1), {"average_loss": 1.5})
    to_stderr.close()
    to_stdout.close()
    captured = capsys.readouterr()
    assert "warm start from x" in captured.err and not glued(captured.err, "pretraining:", "warm start from x")
    assert "average_loss: 1.5" in captured.out and not glued(captured.out, "fine-tuning:", "average_loss")


@pytest.mark.parametrize("typo, hint", [
    ("--lambda", "--lambda: did you mean --lamb / --dam_lambda?"),
    ("--dam_lamda=1e-3", "--dam_lamda: did you mean --dam_lambda?"),
    ("--fp61", "--fp61: did you mean --fp16?"),
])
def test_a_near_miss_flag_is_one_line_with_the_flags_it_resembles(tmp_path, capsys, typo, hint):
    with pytest.raises(SystemExit) as exit_info:
        shared_args(tmp_path, typo, "1e-3")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and hint in err


def test_an_unlike_flag_gets_no_suggestion(tmp_path, capsys):
    with pytest.raises(SystemExit):
        shared_args(tmp_path, "--xyz")
    assert "did you mean" not in capsys.readouterr().err


def test_a_default_the_help_already_names_is_not_repeated():
    p = launch.ScriptParser("x.py", "test")
    p.add_argument("--out", default="a.png", help="output PNG (default: a.png beside the log)")
    p.add_argument("--dpi", type=int, default=100, help="resolution")
    text = " ".join(p.format_help().split())
    assert text.count("default") == 2 and "resolution (default: 100)" in text
