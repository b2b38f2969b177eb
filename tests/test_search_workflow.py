"""docs/search.md's workflow as a user follows it: the warm-start command copied from the page, run from
the packaged MiniLM folder (whole, and its first two layers), its --check_only refusing what the run
would refuse, and the finding every DAM search prints and writes where it ends."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import checkpoints
import run_pretraining
from data import create_pretraining_data
from helpers import VOCAB
from modeling import BertForPreTraining

ROOT = Path(__file__).resolve().parent.parent


def documented_command(minilm: Path) -> list[str]:
    """run_pretraining.py's argv from the first bash block under "## Warm start in one command",
    with $PRETRAINED as scripts/pretrained.py prints it."""
    page = (ROOT / "docs" / "search.md").read_text(encoding="utf-8")
    section = page.split("## Warm start in one command", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert "PRETRAINED=$(python scripts/pretrained.py)" in block
    lines = block.replace("\\\n", " ").splitlines()
    command = next(line for line in lines if line.startswith("python run_pretraining"))
    return shlex.split(command.replace("$PRETRAINED", str(minilm)))[2:]


@pytest.fixture(scope="module")
def shards_128(tmp_path_factory, write_corpus) -> Path:
    """One small shard at the documented 128 tokens and 20 masked positions, in MiniLM's vocab."""
    root = tmp_path_factory.mktemp("corpus128")
    write_corpus(root / "text.txt", seed=3, docs=8)
    (root / "shards").mkdir()
    create_pretraining_data.main([
        "--vocab_file", str(VOCAB), "--input_file", str(root / "text.txt"),
        "--output_file", str(root / "shards" / "shard.hdf5"), "--max_seq_length", "128",
        "--max_predictions_per_seq", "20", "--dupe_factor", "1", "--n_processes", "1", "--no_progress"])
    return root / "shards"


def as_run(argv: list[str], shards: Path, out: Path, *extra: str) -> list[str]:
    """The documented argv with this test's data and output folder; `extra` flags come last and win
    (a few steps of a small batch), except --config_overrides, whose fields add up."""
    argv = [str(shards) if a == "shards/" else str(out) if a == "search/" else a for a in argv]
    return [*argv, "--max_steps", "1", "--train_batch_size", "2", "--disable_progress_bar", *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_pretraining.py: error:"), err
    return err[0]


def test_the_documented_warm_start_runs_from_the_minilm_folder_and_its_first_two_layers(minilm, shards_128, tmp_path,
                                                                                        capsys, caplog):
    argv = documented_command(minilm)
    assert argv[argv.index("--config_file") + 1] == str(minilm)  # the folder itself: its config.json
    whole = tmp_path / "whole"
    assert run_pretraining.main(as_run(argv, shards_128, whole, "--skip_checkpoint")) == 0, capsys.readouterr().err
    assert "(one mask shared by all 6 layers)" in (whole / "finding.md").read_text()

    two = tmp_path / "two"
    # learning rate 0: the weights after one step are those loaded, so they can be compared
    subset = as_run(argv, shards_128, two, "--config_overrides", "num_hidden_layers=2", "--learning_rate", "0")
    with caplog.at_level("INFO", logger="modeling"):
        assert run_pretraining.main(subset) == 0, capsys.readouterr().err
    assert "encoder layers 0-1 of its 6 (num_hidden_layers 2)" in caplog.text
    from safetensors.torch import load_file

    source = load_file(str(minilm / "model.safetensors"))
    ours = checkpoints.load_checkpoint(two / "ckpt_1.pt")["model"]
    assert torch.equal(ours["bert.encoder.layer.1.output.dense.weight"], source["encoder.layer.1.output.dense.weight"])
    assert not any("encoder.layer.2." in key for key in ours)
    finding = json.loads((two / "finding.json").read_text())
    assert (finding["layers"], finding["heads"], finding["units"], finding["count"]) == (2, 12, "heads", 12)


def refusals(minilm: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    """(extra flags, the refusal's words): a missing checkpoint, then checkpoints of another architecture."""
    nvidia = tmp_path / "ckpt_9.pt"  # NVIDIA's layout, no config recorded: only the shapes tell
    from modeling import BertConfig

    small = BertConfig.from_json_file(minilm / "config.json").replace(hidden_size=96, intermediate_size=192)
    torch.save({"model": BertForPreTraining(small).state_dict()}, nvidia)
    return [(["--init_checkpoint", str(tmp_path / "missing.pt")], "missing.pt does not exist"),
            (["--config_overrides", "num_attention_heads=6"], "num_attention_heads=12, this model 6"),
            (["--config_overrides", "hidden_size=768", "intermediate_size=3072"], "hidden_size=384, this model 768"),
            (["--config_overrides", "num_hidden_layers=8"], "encoder layers [0, 1, 2, 3, 4, 5], this model has [0,"),
            (["--init_checkpoint", str(nvidia)], "has shape (30528, 96) but this model needs (30528, 384)")]


def test_check_only_refuses_what_the_warm_start_would_refuse(minilm, shards_128, tmp_path, capsys):
    argv = documented_command(minilm)
    out = tmp_path / "out"
    assert run_pretraining.main(as_run(argv, shards_128, out, "--check_only")) == 0
    assert f"--init_checkpoint {minilm} pass the checks" in capsys.readouterr().out
    for flags, words in refusals(minilm, tmp_path):
        assert run_pretraining.main(as_run(argv, shards_128, out, *flags, "--check_only")) == 1, flags
        checked = error_line(capsys)
        assert words in checked, (flags, checked)
        assert run_pretraining.main(as_run(argv, shards_128, out, *flags, "--skip_checkpoint")) == 1, flags
        assert error_line(capsys) == checked  # the real run stops on the same line
    assert not out.exists()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, make_shards) -> Path:
    return make_shards(tmp_path_factory.mktemp("corpus"), corpus_seeds=[0], dupe_factor=1)


@pytest.mark.parametrize("mode", ["dam_s", "dam_u"])
def test_every_search_prints_and_writes_its_finding_with_the_caveat_when_undecided(shards, tmp_path, capsys, mode,
                                                                                    pretraining_args, write_config):
    config = write_config(tmp_path / "config.json", attention_mask_type=mode, dam_share_across_layers=mode == "dam_s")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=2, skip_checkpoint=True)) == 0
    printed = capsys.readouterr().out
    text = (out / "finding.md").read_text()
    assert text.strip() in printed
    units = ("of 2 heads;", "(one mask shared by all 2 layers).") if mode == "dam_s" else ("of 4 layer-heads;",)
    assert f"Finding of the {mode} mask (step 2, λ = 0):" in text and all(u in text for u in units), text
    # Two steps leave the N(0, 1e-3) logits near 0: no gate is decided.
    assert "Decided gates (sigma(a) < 0.1 or > 0.9): 0.0 %" in text and "Caveat: most gates are undecided" in text
    finding = json.loads((out / "finding.json").read_text())
    assert finding["decided_gates"] == 0.0 and len(finding["kept_per_offset"]) == 32
    assert len(finding["diagonal_kept_per_unit"]) == finding["count"]
    assert {"expected_sparsity", "deterministic_sparsity"} <= finding.keys()


def test_a_fixed_pattern_run_writes_no_finding(shards, tmp_path, pretraining_args, write_config):
    config = write_config(tmp_path / "config.json", attention_mask_type="star")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, config, max_steps=1, skip_checkpoint=True)) == 0
    assert (out / "attention_mask.safetensors").is_file() and not (out / "finding.md").exists()
