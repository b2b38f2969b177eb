"""launch.py: the flags, checks and start-up both entry scripts share."""
from __future__ import annotations

import argparse

import pytest

import launch
import run_glue
import run_pretraining

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
    args = argparse.Namespace(config_file=str(config), attention_mask_type=None)
    assert launch.read_config(args, dam_lambda=None).attention_mask_type == "star"
    assert launch.read_config(args, dam_lambda=None).dam_lambda == 0.5
    args.attention_mask_type = "dense"
    assert launch.read_config(args, attention_mask_type="strided").attention_mask_type == "strided"
