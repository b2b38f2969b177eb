"""Bad-input matrix: every file or field a user can get wrong gives one line naming it and the fix.

Shards (truncated, corrupt, missing dataset, wrong shape / dtype / length, bad values found
mid-run), checkpoints (another architecture or vocab, pickled payloads that must never run), mask
files that do not fit the model, config files (unknown, mistyped and impossible fields), raw text
with NUL bytes / invalid UTF-8 / 1 MB lines, GLUE TSVs of every task, property tests of the config
parser and the TSV readers, and a source scan proving nothing a user supplies is unpickled.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attention_masks
import checkpoints
import pretraining_data
import run_pretraining
from data import create_pretraining_data as cpd
from modeling import BertConfig, BertForPreTraining, BertForSequenceClassification
from processors.glue import TASKS, GlueDataError
from helpers import MAX_PRED, SEQ, TINY, VOCAB

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good_shard(tmp_path_factory, write_corpus) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs")
    write_corpus(root / "text.txt", seed=3, docs=12)
    cpd.main(["--vocab_file", str(VOCAB), "--input_file", str(root / "text.txt"), "--output_file",
              str(root / "training_0.hdf5"), "--max_seq_length", str(SEQ), "--max_predictions_per_seq",
              str(MAX_PRED), "--dupe_factor", "1", "--short_seq_prob", "0", "--n_processes", "1", "--no_progress"])
    return root / "training_0.hdf5"


def shard_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in f}


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_pretraining.py: error:"), err
    return err[0]


# ----------------------------------------------------------------------------- shards


def _truncate(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path, good: Path) -> None:
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 40)


def _rewrite(change):
    def make(path: Path, good: Path) -> None:
        arrays = shard_arrays(good)
        change(arrays)
        write_arrays(path, arrays)
    return make


SHARD_CASES = {
    "truncated": (_truncate, "truncated or corrupt"),
    "corrupt": (_garbage, "truncated or corrupt"),
    "missing_dataset": (_rewrite(lambda a: a.pop("masked_lm_ids")), "lacks dataset(s) masked_lm_ids"),
    "wrong_dtype": (_rewrite(lambda a: a.update(input_ids=a["input_ids"].astype(np.float32))),
                    "input_ids has dtype float32"),
    "wrong_rows": (_rewrite(lambda a: a.update(segment_ids=a["segment_ids"][:-1])), "segment_ids has shape"),
    "wrong_width": (_rewrite(lambda a: a.update(input_mask=a["input_mask"][:, :-1])), "input_mask has width"),
    "wrong_seq_length": (_rewrite(lambda a: a.update({k: np.pad(a[k], ((0, 0), (0, SEQ))) for k in
                                                      ("input_ids", "input_mask", "segment_ids")})),
                         f"sequences of length {2 * SEQ} but --max_seq_length is {SEQ}"),
    "too_many_predictions": (_rewrite(lambda a: a.update({k: np.pad(a[k], ((0, 0), (0, 5))) for k in
                                                          ("masked_lm_positions", "masked_lm_ids")})),
                             f"--max_predictions_per_seq {MAX_PRED + 5}"),
}


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_bad_later_shard_stops_before_the_first_step(good_shard, tmp_path, capsys, case, pretraining_args,
                                                     write_config):
    """The bad shard sorts after a good one: it is still found up front, not hours into the run."""
    make, expect = SHARD_CASES[case]
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(good_shard, shards / "training_0.hdf5")
    bad = shards / "training_1.hdf5"
    make(bad, good_shard)
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(shards, out, write_config(tmp_path / "config.json"))) == 1
    line = one_error_line(capsys)
    assert expect in line and str(bad) in line, line
    assert "create_pretraining_data" in line or "--max_" in line  # the fix
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_bad_values_found_mid_run_stop_with_one_line_and_keep_checkpoints(good_shard, tmp_path, capsys,
                                                                          pretraining_args, write_config):
    """Values are only read when a shard is loaded; the run stops there, its checkpoints intact."""
    shards = tmp_path / "shards"
    shards.mkdir()
    arrays = shard_arrays(good_shard)
    write_arrays(shards / "training_0.hdf5", {k: v[:16] for k, v in arrays.items()})  # 2 batches of 8
    arrays["next_sentence_labels"] = arrays["next_sentence_labels"] + 2
    write_arrays(shards / "training_1.hdf5", arrays)
    out = tmp_path / "out"
    files = sorted(str(p) for p in shards.iterdir())
    seed = next(s for s in range(100)  # one whose epoch-0 file order puts the good shard first
                if pretraining_data.PretrainingBatches(files, 8, MAX_PRED, seed=s, prefetch=False).file_for(0, 0) == files[0])
    argv = pretraining_args(shards, out, write_config(tmp_path / "config.json"), max_steps=10,
                            num_steps_per_checkpoint=1, seed=seed)
    assert run_pretraining.main(argv) == 1
    line = one_error_line(capsys)
    assert "training_1.hdf5" in line and "next_sentence_labels must be 0 or 1" in line, line
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [1, 2]
    assert checkpoints.load_checkpoint(out / "ckpt_2.pt")["global_step"] == 2


# ----------------------------------------------------------------------------- checkpoints and vocab


def test_init_checkpoint_with_another_vocab_names_the_tensor(good_shard, tmp_path, capsys, pretraining_args,
                                                             tiny_config, write_config):
    torch.save({"model": BertForPreTraining(tiny_config(vocab_size=1000)).state_dict()}, tmp_path / "small_vocab.pt")
    argv = pretraining_args(good_shard.parent, tmp_path / "out", write_config(tmp_path / "config.json"),
                            init_checkpoint=tmp_path / "small_vocab.pt")
    assert run_pretraining.main(argv) == 1
    line = one_error_line(capsys)
    assert "another architecture" in line and "word_embeddings" in line and "small_vocab.pt" in line, line


def test_resume_from_another_architecture_is_refused_and_leaves_the_file(good_shard, tmp_path, capsys, pretraining_args,
                                                                         tiny_config, write_config):
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": BertForPreTraining(tiny_config(hidden_size=64)).state_dict(), "global_step": 3},
               out / "ckpt_3.pt")
    before = (out / "ckpt_3.pt").read_bytes()
    argv = pretraining_args(good_shard.parent, out, write_config(tmp_path / "config.json"), resume_from_checkpoint=True)
    assert run_pretraining.main(argv) == 1
    line = one_error_line(capsys)
    assert "another architecture" in line and "ckpt_3.pt" in line, line
    assert (out / "ckpt_3.pt").read_bytes() == before
    assert [s for s, _ in checkpoints.list_checkpoints(out)] == [3]


@pytest.mark.parametrize("case, expected", [
    ("corrupt_safetensors", "w.safetensors is not a valid safetensors file: "),
    ("empty", "w.pt is an empty file (0 bytes)"),
    ("text", "w.pt is not a PyTorch checkpoint"),
])
def test_unreadable_init_checkpoint_says_what_the_file_is(good_shard, tmp_path, capsys, case, expected,
                                                          pretraining_args, tiny_config, write_config):
    """Only a real pickle is blamed on pickle; the others name what they are, in one line."""
    path = tmp_path / ("w.safetensors" if case == "corrupt_safetensors" else "w.pt")
    path.write_bytes({"corrupt_safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "empty": b"",
                      "text": b"model weights, honest\n"}[case])
    argv = pretraining_args(good_shard.parent, tmp_path / "out", write_config(tmp_path / "config.json"),
                            init_checkpoint=path)
    assert run_pretraining.main(argv) == 1
    line = one_error_line(capsys)
    assert expected in line and "cannot be loaded safely" not in line, line
    with pytest.raises(ValueError, match=expected.split(" ", 1)[1].replace("(", r"\(").replace(")", r"\)")):
        BertForSequenceClassification.from_pretrained(path, config=tiny_config(), num_labels=2)  # run_glue's path


@pytest.fixture
def other_encoder(tiny_config):
    """`other_encoder(tmp_path, case)`: a warm-start source that would leave this (TINY, 2 layers,
    2 heads) model's encoder random."""

    def other_encoder(tmp_path: Path, case: str) -> Path:
        if case == "no_encoder_key":
            path = tmp_path / "w.pt"
            torch.save({"weight": torch.zeros(3), "encoder.block.0.w": torch.zeros(2)}, path)
        elif case in ("fewer_layers", "more_layers"):
            path = tmp_path / "w.pt"
            depth = 1 if case == "fewer_layers" else 3
            torch.save(BertForPreTraining(tiny_config(num_hidden_layers=depth)).state_dict(), path)
        elif case == "other_heads_recorded":  # same shapes: only the recorded config tells
            path = tmp_path / "w.pt"
            torch.save({"model": BertForPreTraining(tiny_config()).state_dict(),
                        "config": tiny_config(num_attention_heads=4).to_json_string()}, path)
        else:  # other_heads_hf_folder
            path = tmp_path / "hf"
            BertForPreTraining(tiny_config(num_attention_heads=4)).save_pretrained(path, hf_format=True)
        return path

    return other_encoder


WARM_START_CASES = [("no_encoder_key", "none of its tensors is an encoder weight"),
                    ("fewer_layers", "encoder layers [0], this model has [0, 1]"),
                    ("other_heads_recorded", "num_attention_heads=4, this model 2"),
                    ("other_heads_hf_folder", "num_attention_heads=4, this model 2")]


@pytest.mark.parametrize("case, expected", WARM_START_CASES)
def test_warm_start_from_another_encoder_is_refused(good_shard, tmp_path, capsys, case, expected, other_encoder,
                                                    pretraining_args, write_config):
    source = other_encoder(tmp_path, case)
    argv = pretraining_args(good_shard.parent, tmp_path / "out", write_config(tmp_path / "config.json"),
                            init_checkpoint=source)
    assert run_pretraining.main(argv) == 1
    line = one_error_line(capsys)
    assert f"--init_checkpoint {source}" in line and expected in line and "random weights" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, expected", WARM_START_CASES)
def test_glue_warm_start_from_another_encoder_is_refused(tmp_path, case, expected, other_encoder, tiny_config):
    import run_glue

    with pytest.raises(ValueError, match=re.escape(expected)):
        run_glue.build_model(tiny_config(), 2, str(other_encoder(tmp_path, case)))


def test_warm_start_from_a_deeper_checkpoint_takes_its_first_layers(good_shard, tmp_path, capsys, caplog,
                                                                    other_encoder, pretraining_args, write_config,
                                                                    tiny_config):
    """num_hidden_layers below the checkpoint's asks for its first layers: loaded, and the log says which."""
    import run_glue

    source = other_encoder(tmp_path, "more_layers")
    argv = pretraining_args(good_shard.parent, tmp_path / "out", write_config(tmp_path / "config.json"),
                            init_checkpoint=source, max_steps=1, learning_rate=0.0)
    with caplog.at_level("INFO", logger="modeling"):
        assert run_pretraining.main(argv) == 0, capsys.readouterr().err
    assert "encoder layers 0-1 of its 3 (num_hidden_layers 2)" in caplog.text
    loaded = checkpoints.load_checkpoint(tmp_path / "out" / "ckpt_1.pt")["model"]
    key = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(loaded[key], torch.load(source, weights_only=True)[key])
    classifier = run_glue.build_model(tiny_config(), 2, str(source)).state_dict()
    assert torch.equal(classifier[key], loaded[key])


def test_warm_start_from_an_encoder_without_heads_or_mask_logits_loads(good_shard, tmp_path, capsys, pretraining_args,
                                                                       tiny_config, write_config):
    """A sentence encoder (MiniLM-like) has no MLM / NSP heads: they and the mask logits start fresh."""
    state = {k: v for k, v in BertForPreTraining(tiny_config()).state_dict().items() if k.startswith("bert.")}
    torch.save(state, tmp_path / "encoder.pt")
    config = write_config(tmp_path / "config.json", attention_mask_type="dam_s")
    argv = pretraining_args(good_shard.parent, tmp_path / "out", config, init_checkpoint=tmp_path / "encoder.pt",
                            max_steps=1)
    assert run_pretraining.main(argv) == 0, capsys.readouterr().err


@pytest.mark.parametrize("case", ["model_list", "rng_not_a_list", "rng_entry_garbage", "rng_entry_bad_tensor"])
def test_checkpoint_with_wrong_types_inside_gives_one_line(good_shard, tmp_path, capsys, case, pretraining_args,
                                                           write_config):
    config = write_config(tmp_path / "config.json")
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(good_shard.parent, out, config, max_steps=2)) == 0
    capsys.readouterr()
    state = checkpoints.load_checkpoint(out / "ckpt_2.pt")
    if case == "model_list":
        state["model"] = list(state["model"].values())
    elif case == "rng_not_a_list":
        state["rng"] = {"python": "x"}
    elif case == "rng_entry_garbage":
        state["rng"] = ["junk"]
    else:
        state["rng"][0]["torch"] = torch.zeros(3)
    torch.save(state, out / "ckpt_2.pt")
    argv = pretraining_args(good_shard.parent, out, config, max_steps=4, resume_from_checkpoint=True)
    assert run_pretraining.main(argv) == 1
    line = one_error_line(capsys)
    assert "ckpt_2.pt" in line or "RNG state of rank 0 is damaged" in line, line


class Payload:
    """Unpickling this would create `marker` (open(path, "w")): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil_checkpoint(tiny_config):
    """`evil_checkpoint(path, marker)`: a dam_s checkpoint at `path` whose unpickling would create `marker`."""

    def evil_checkpoint(path: Path, marker: Path) -> Path:
        state = BertForPreTraining(tiny_config(attention_mask_type="dam_s")).state_dict()
        torch.save({"model": state, "global_step": 1, "payload": Payload(marker)}, path)
        assert not marker.exists()
        return path

    return evil_checkpoint


def test_pickled_init_checkpoint_is_refused_not_executed(good_shard, tmp_path, capsys, evil_checkpoint,
                                                         pretraining_args, write_config):
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    argv = pretraining_args(good_shard.parent, tmp_path / "out", write_config(tmp_path / "config.json"),
                            init_checkpoint=evil)
    assert run_pretraining.main(argv) == 1
    line = one_error_line(capsys)
    assert "evil.pt cannot be loaded safely" in line, line
    assert not marker.exists()


def test_pickled_checkpoint_in_output_dir_is_never_resumed_over(good_shard, tmp_path, capsys, evil_checkpoint,
                                                                pretraining_args, write_config):
    """The only checkpoint cannot be loaded safely: refuse, rather than restart and later delete it."""
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    evil_checkpoint(out / "ckpt_5.pt", marker)
    argv = pretraining_args(good_shard.parent, out, write_config(tmp_path / "config.json"), resume_from_checkpoint=True)
    assert run_pretraining.main(argv) == 1
    line = one_error_line(capsys)
    assert "no checkpoint in" in line and "ckpt_5.pt" in line and "move them away" in line, line
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == ["ckpt_5.pt"]


def test_pickled_checkpoint_refused_by_glue_loading_and_mask_export(tmp_path, evil_checkpoint, tiny_config):
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match="cannot be loaded safely"):  # run_glue's --init_checkpoint path
        BertForSequenceClassification.from_pretrained(evil, config=tiny_config(), num_labels=2)
    config = tiny_config(attention_mask_type="dam_s")
    config.to_json_file(tmp_path / "bert_config.json")
    result = subprocess.run([sys.executable, str(ROOT / "attention_masks.py"), "export", "--checkpoint", str(evil),
                             "--config", str(tmp_path / "bert_config.json"), "--out", str(tmp_path / "m.safetensors")],
                            capture_output=True, text=True, timeout=120)
    err = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(err) == 1 and "evil.pt" in err[0], result.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------- mask files


# The numbers are checked in context: a bare "3" (layers) is also in the "32" of any shape or path.
@pytest.mark.parametrize("layers, n, expect", [
    (3, SEQ, ["mask.safetensors holds a mask of shape [3, 2, 32, 32]", "this model needs [2, 2, 32, 32]"]),
    (2, SEQ // 2, ["mask_seq_length 16 < --max_seq_length 32", "set mask_seq_length >= 32"]),
])
def test_mask_file_that_does_not_fit_the_model(good_shard, tmp_path, capsys, layers, n, expect, pretraining_args,
                                               write_config):
    mask_path = tmp_path / "mask.safetensors"
    attention_masks.save_mask_file(mask_path, torch.ones(layers, 2, n, n, dtype=torch.bool), {"source": "test"})
    config = write_config(tmp_path / "config.json", attention_mask_type="file", attention_mask_file=str(mask_path),
                          mask_seq_length=n)
    assert run_pretraining.main(pretraining_args(good_shard.parent, tmp_path / "out", config)) == 1
    line = one_error_line(capsys)
    assert "config.json" in line and all(part in line for part in expect), line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- config files


CONFIG_CASES = {
    "unknown_mask_field": ({"dam_lamda": 0.1}, ["config.json", "dam_lamda", "dam_lambda"]),
    "wrong_type": ({"hidden_size": "32"}, ["config.json", "hidden_size", "int"]),
    "bool_for_int": ({"num_hidden_layers": True}, ["config.json", "num_hidden_layers"]),
    "unknown_mask_type": ({"attention_mask_type": "sparse"}, ["config.json", "attention_mask_type", "dense"]),
    "unknown_pattern_param": ({"attention_mask_type": "star", "pattern_params": {"bogus": 1}},
                              ["config.json", "bogus", "allowed"]),
    "dam_short_mask": ({"attention_mask_type": "dam_u", "mask_seq_length": 16}, ["mask_seq_length 16", "32"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_file_gives_one_line_naming_file_and_field(good_shard, tmp_path, capsys, case, pretraining_args,
                                                              write_config):
    changes, expect = CONFIG_CASES[case]
    config = write_config(tmp_path / "config.json", **changes)
    out = tmp_path / "out"
    assert run_pretraining.main(pretraining_args(good_shard.parent, out, config)) == 1
    line = one_error_line(capsys)
    assert all(part in line for part in expect), line
    assert not out.exists()


@pytest.mark.parametrize("flags, expect", [
    (dict(lamb=-1.0), "--lamb"),
    (dict(dist_timeout=0), "--dist_timeout"),
    (dict(max_predictions_per_seq=2), "--max_predictions_per_seq"),
])
def test_bad_flags_give_one_line(good_shard, tmp_path, capsys, flags, expect, pretraining_args, write_config):
    out = tmp_path / "out"
    argv = pretraining_args(good_shard.parent, out, write_config(tmp_path / "config.json"), **flags)
    assert run_pretraining.main(argv) == 1
    assert expect in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("flag, value, expect", [
    ("--attention_mask_type", "Star", "argument --attention_mask_type: invalid choice: 'Star'"),
    ("--lamb", "abc", "argument --lamb/--dam_lambda: must be a number, got 'abc'"),
])
def test_a_bad_flag_value_is_one_line_naming_the_flag_not_the_usage(good_shard, tmp_path, capsys, pretraining_args,
                                                                      write_config, flag, value, expect):
    argv = pretraining_args(good_shard.parent, tmp_path / "out", write_config(tmp_path / "config.json"))
    with pytest.raises(SystemExit) as exit_info:
        run_pretraining.main([*argv, flag, value])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and err.startswith("run_pretraining.py: error: ")
    assert expect in err and "usage:" not in err and not (tmp_path / "out").exists()


def test_invalid_json_config(good_shard, tmp_path, capsys, pretraining_args):
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 32,', encoding="utf-8")
    assert run_pretraining.main(pretraining_args(good_shard.parent, tmp_path / "out", config)) == 1
    line = one_error_line(capsys)
    assert "config.json is not valid JSON" in line


FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                         st.text(max_size=12), st.lists(st.integers(), max_size=3),
                         st.dictionaries(st.text(max_size=8), st.integers(), max_size=2),
                         st.sampled_from(["dense", "star", "dam_u", "dam_s", "file", "bigbird", "linear",
                                          "gelu", "relu", "constant", "exponential", "kept_gates", "all_gates"]))
FIELD_NAMES = st.sampled_from(sorted(set(TINY) | {
    "attention_mask_type", "dam_lambda", "dam_temperature", "dam_temperature_final", "dam_temperature_schedule",
    "dam_init_std", "dam_share_across_layers", "dam_symmetric", "dam_block_size", "dam_penalty_gradient",
    "attention_mask_file",
    "pattern_params", "pattern_seed", "hidden_act", "type_vocab_size", "initializer_range", "layer_norm_eps",
    "mask_bogus", "dam_x", "pattern_nope", "model_type", "extra"}))


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(FIELD_NAMES, FIELD_VALUES, max_size=4))
def test_property_config_parser_gives_a_config_or_value_error(changes):
    """Any JSON-like dict: a valid BertConfig (that round-trips) or a ValueError — no other exception."""
    try:
        config = BertConfig.from_dict({**TINY, **changes})
    except ValueError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()
        return
    assert BertConfig.from_dict(json.loads(config.to_json_string())) == config


# ----------------------------------------------------------------------------- raw text


def test_raw_text_with_nul_bytes_invalid_utf8_and_a_megabyte_line(tmp_path):
    long_line = ("river " * 180_000).encode()  # ~1 MB, one document of one line
    raw = (b"the cat sat\x00 on the mat .\nthe dog\x00\x00 ran to the house .\n\n"
           b"caf\xe9 au lait \xff\xfe is \xc3( not utf-8 .\nthe king and the queen sat .\n\n"
           + long_line + b"\n\nthe sun and the moon .\nthe star in the sky .\n")
    text = tmp_path / "raw.txt"
    text.write_bytes(raw)
    out = tmp_path / "training_0.hdf5"
    cpd.main(["--vocab_file", str(VOCAB), "--input_file", str(text), "--output_file", str(out),
              "--max_seq_length", str(SEQ), "--max_predictions_per_seq", str(MAX_PRED), "--dupe_factor", "1",
              "--n_processes", "1", "--no_progress"])
    dataset = pretraining_data.PretrainingDataset(out, MAX_PRED)  # passes every layout / value check
    ids = dataset.arrays["input_ids"]
    vocab = VOCAB.read_text(encoding="utf-8").splitlines()
    assert 0 <= int(ids.min()) and int(ids.max()) < len(vocab)
    masked = dataset.arrays["masked_lm_ids"]  # the original ids of the masked positions
    tokens = {vocab[i] for i in ids.flatten().tolist() + masked.flatten().tolist()}
    assert {"cat", "mat", "dog", "river", "queen"} <= tokens  # text around the bad bytes survives
    assert not any("\x00" in t or "\ufffd" in t for t in tokens)


def test_raw_text_errors_leave_no_shard(tmp_path):
    (tmp_path / "nul_only.txt").write_bytes(b"\x00\x00\x00\n\xff\xfe\n")
    out = tmp_path / "training_0.hdf5"
    with pytest.raises(SystemExit, match="no instances"):
        cpd.main(["--vocab_file", str(VOCAB), "--input_file", str(tmp_path / "nul_only.txt"), "--output_file",
                  str(out), "--max_seq_length", str(SEQ), "--n_processes", "1", "--no_progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nul_only.txt"]


# ----------------------------------------------------------------------------- GLUE TSVs (every task)


def glue_splits():
    """(task, split or None for train, layout) for every file a GLUE task reads."""
    for name, task in sorted(TASKS.items()):
        yield name, None, task.train
        for split in (*task.dev, *task.test):
            yield name, split, split.layout


GLUE_SPLITS = list(glue_splits())
CELL = st.sampled_from(["", "0", "1", "2.5", "nan", "entailment", "neutral", "contradiction", "not_entailment",
                        "a b", "é ü", '"q"', "\ufeff", "\x00", "\xff"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, len(GLUE_SPLITS) - 1),
       rows=st.lists(st.lists(CELL, max_size=11), max_size=5),
       encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_property_every_glue_reader_gives_examples_or_one_line_error(tmp_path_factory, which, rows, encoding):
    """Missing columns, bad labels, wrong encodings, NULs: examples with valid labels, or GlueDataError."""
    name, split, layout = GLUE_SPLITS[which]
    folder = tmp_path_factory.mktemp("glue")
    path = folder / layout.filenames[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(row) for row in [["h"] * 11, *rows]) + "\n"
    path.write_bytes(text.encode(encoding, errors="replace"))
    task = TASKS[name]
    try:
        if split is None:
            examples = task.train_examples(folder)
        elif split in task.dev:
            examples = task.dev_examples(folder, split)
        else:
            examples = task.test_examples(folder, split)
    except GlueDataError as exc:
        message = str(exc)
        assert "\n" not in message and layout.filenames[0].split("/")[-1] in message, message
        return
    assert examples
    if layout.label is not None and task.labels is not None:
        assert all(ex.label in task.labels for ex in examples)


# ----------------------------------------------------------------------------- security: no unpickling


def python_sources() -> list[Path]:
    """The project's own Python files: not the tests, and not hidden folders such as a `.venv`."""
    def ours(path: Path) -> bool:
        parts = path.relative_to(ROOT).parts
        return not any(part.startswith(".") or part in {"tests", "results", "__pycache__", "site-packages"}
                       for part in parts)

    sources = [p for p in ROOT.rglob("*.py") if ours(p)]
    assert ROOT / "modeling.py" in sources and ROOT / "run_pretraining.py" in sources
    return sources


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_no_code_path_unpickles_user_data():
    """torch.load only with weights_only=True; no pickle / dill / joblib / shelve / marshal; numpy
    loads never allow pickles; yaml only through safe_load."""
    problems = []
    sources = python_sources()
    assert len(sources) > 20
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = lambda node: f"{path.relative_to(ROOT)}:{node.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal",
                                                  "cloudpickle"} for n in names):
                    problems.append(f"{where(node)}: imports a pickle module")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            attr = node.func.attr
            if owner == "torch" and attr == "load":
                value = _keyword(node, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where(node)}: torch.load without weights_only=True")
            if owner in {"np", "numpy"} and attr == "load":
                value = _keyword(node, "allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"{where(node)}: np.load with allow_pickle")
            if owner == "yaml" and attr in {"load", "unsafe_load", "full_load"}:
                problems.append(f"{where(node)}: yaml.{attr} (use yaml.safe_load)")
            if owner == "torch" and attr == "save" and path.name not in {"checkpoints.py"}:
                problems.append(f"{where(node)}: torch.save outside checkpoints.atomic_save (not atomic)")
    assert not problems, problems
