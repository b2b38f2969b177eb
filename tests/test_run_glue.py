"""run_glue.py end to end on CPU: a tiny BERT learns a keyword task in GLUE format, dense and with a
frozen `star` mask; the frozen mask is really applied and never trained; outputs and server files
have the right format; bad flags give one line."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import attention_masks
import run_glue
import run_pretraining
import helpers
from checkpoints import safe_torch_load
from modeling import BertConfig, BertForPreTraining, BertForSequenceClassification
from utils import read_dllogger_json

ROOT = Path(__file__).resolve().parent.parent
SEARCH_SEQ = helpers.SEQ  # the pretraining tests' mask_seq_length, which a search checkpoint here has
FILLER = [f"w{i}" for i in range(40)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "yes", "no", "maybe", *FILLER]
SEQ = 16
TINY = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            max_position_embeddings=32, mask_seq_length=SEQ)


def sentence(rng: random.Random, keyword: str) -> str:
    words = rng.choices(FILLER, k=rng.randint(3, 9))
    words.insert(rng.randint(0, len(words)), keyword)
    return " ".join(words)


def write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    """Synthetic GLUE folders: SST-2 whose label is the keyword (good / bad), plus tiny MNLI, AX and STS-B."""
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (root / "config.json").write_text(json.dumps(TINY), encoding="utf-8")
    for split, n in (("train", 192), ("dev", 64)):
        labels = [rng.choice("01") for _ in range(n)]
        write_tsv(root / f"SST-2/{split}.tsv",
                  [["sentence", "label"]] + [[sentence(rng, "good" if y == "1" else "bad"), y] for y in labels])
    write_tsv(root / "SST-2/test.tsv", [["index", "sentence"]] + [[str(i), sentence(rng, rng.choice(["good", "bad"]))]
                                                               for i in range(25)])
    nli = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}
    header = ["index", "promptID", "pairID", "genre", "a", "b", "c", "d", "sentence1", "sentence2"]

    def mnli_rows(n: int, with_label: bool) -> list[list[str]]:
        rows = []
        for i in range(n):
            label = rng.choice(list(nli))
            row = [str(i), "1", "2", "g", "x", "x", "x", "x", sentence(rng, "good"), sentence(rng, nli[label])]
            rows.append(row + ([label] * (6 if with_label else 0)))
        return rows

    write_tsv(root / "MNLI/train.tsv", [header + ["label1", "gold_label"]] + [r[:11] + r[-1:] for r in mnli_rows(32, True)])
    for split in ("dev_matched", "dev_mismatched"):
        write_tsv(root / f"MNLI/{split}.tsv", [header + ["l1", "l2", "l3", "l4", "l5", "gold_label"]] + mnli_rows(12, True))
    for split in ("test_matched", "test_mismatched"):
        write_tsv(root / f"MNLI/{split}.tsv", [header] + mnli_rows(9, False))
    write_tsv(root / "diagnostic/diagnostic.tsv", [["index", "sentence1", "sentence2"]]
              + [[str(i), sentence(rng, "good"), sentence(rng, "no")] for i in range(7)])
    sts_header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    for split, n in (("train", 24), ("dev", 12), ("test", 8)):
        rows = [[str(i), "g", "f", "2012", "0", "s", "s", sentence(rng, "good"), sentence(rng, "bad")]
                + ([f"{rng.uniform(0, 5):.3f}"] if split != "test" else []) for i in range(n)]
        write_tsv(root / f"STS-B/{split}.tsv", [sts_header + (["score"] if split != "test" else [])] + rows)
    return root


def glue_args(glue: Path, out: Path, task: str = "sst-2", *extra: str) -> list[str]:
    folder = {"sst-2": "SST-2", "mnli": "MNLI", "sts-b": "STS-B"}[task]
    return ["--task_name", task, "--data_dir", str(glue / folder), "--vocab_file", str(glue / "vocab.txt"),
            "--config_file", str(glue / "config.json"), "--output_dir", str(out), "--do_lower_case",
            "--max_seq_length", str(SEQ), "--train_batch_size", "16", "--eval_batch_size", "32",
            "--learning_rate", "2e-3", "--seed", "1", *extra]


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    """The fine-tuned weights run_glue.py saved into `out` (a saved-model folder)."""
    return load_file(out / "model.safetensors")


def results(out: Path) -> dict:
    return json.loads((out / "results.txt").read_text())


def read_server_file(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "index\tprediction"
    return [line.split("\t") for line in lines[1:]]


# ----------------------------------------------------------------------------- learning end to end


@pytest.mark.parametrize("mask", ["dense", "star"])
def test_tiny_bert_learns_the_keyword_task(glue: Path, tmp_path: Path, mask: str) -> None:
    out = tmp_path / mask
    argv = glue_args(glue, out, "sst-2", "--do_train", "--do_eval", "--do_predict", "--num_train_epochs", "5",
                     "--learning_rate", "3e-3", "--attention_mask_type", mask)
    assert run_glue.main(argv) == 0
    r = results(out)
    assert r["acc"] >= 0.9, r
    assert r["attention_mask_type"] == mask and r["global_step"] == 60  # ceil(192 / 16) * 5
    expected_sparsity = attention_masks.sparsity(attention_masks.pattern_mask(mask, SEQ)) if mask != "dense" else 0.0
    assert r["mask_sparsity"] == pytest.approx(expected_sparsity) and (mask == "dense") == (expected_sparsity == 0)
    for key in ("train:loss", "train:throughput", "eval:loss", "infer:latency(ms):50%", "infer:latency(ms):99%",
                "infer:throughput(samples/s):avg", "e2e_train_time"):
        assert key in r
    # Server file: header, one row per test example, indices in file order, label names 0 / 1.
    rows = read_server_file(out / "SST-2.tsv")
    assert [i for i, _ in rows] == [str(i) for i in range(25)] and {p for _, p in rows} <= {"0", "1"}
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions == {f"test-{i}": p for i, p in rows}
    saved = saved_weights(out)
    assert "classifier.weight" in saved and not (out / "pytorch_model.bin").exists()  # one saved-model format
    assert BertConfig.from_json_file(out / "bert_config.json").attention_mask_type == mask
    records = read_dllogger_json(out / "dllogger.json")
    final = records[-1]["data"]
    assert final["acc"] == r["acc"] and "exact_match" not in final and "training_sequences_per_second" in final
    last_rate = [rec["data"]["learning_rate"] for rec in records if "learning_rate" in rec.get("data", {})][-1]
    assert last_rate == 0.0 and math.copysign(1.0, last_rate) == 1.0  # not -0.0, printed "learning_rate: -0"


def test_reported_sparsity_is_that_of_the_slice_the_inputs_use(glue: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "mask_seq_length": 2 * SEQ}))
    out = tmp_path / "star"
    assert run_glue.main(glue_args(glue, out, "sst-2", "--do_eval", "--do_train", "--max_steps", "1",
                                   "--config_file", str(config), "--attention_mask_type", "star")) == 0
    used = attention_masks.sparsity(attention_masks.pattern_mask("star", 2 * SEQ)[:SEQ, :SEQ])
    assert results(out)["mask_sparsity"] == pytest.approx(used)
    assert used < attention_masks.sparsity(attention_masks.pattern_mask("star", 2 * SEQ)) - 0.1  # not the 32-token one


def test_eval_only_from_the_finetuned_checkpoint_reproduces_the_metrics(glue: Path, tmp_path: Path) -> None:
    first = tmp_path / "train"
    assert run_glue.main(glue_args(glue, first, "sst-2", "--do_train", "--do_eval", "--max_steps", "6",
                                   "--attention_mask_type", "star")) == 0
    again = tmp_path / "eval"
    # The saved bert_config.json carries the mask type, so no override is needed.
    assert run_glue.main(glue_args(glue, again, "sst-2", "--do_eval", "--init_checkpoint",
                                   str(first / "model.safetensors"), "--config_file", str(first / "bert_config.json"))) == 0
    a, b = results(first), results(again)
    assert b["acc"] == a["acc"] and b["eval:loss"] == pytest.approx(a["eval:loss"], rel=1e-6)
    assert b["mask_sparsity"] == a["mask_sparsity"] > 0
    assert not (again / "model.safetensors").exists()


def test_mnli_matched_mismatched_and_ax_server_files(glue: Path, tmp_path: Path) -> None:
    out = tmp_path / "mnli"
    assert run_glue.main(glue_args(glue, out, "mnli", "--do_train", "--do_eval", "--do_predict", "--max_steps", "2")) == 0
    r = results(out)
    assert {"acc", "mm:acc", "eval:loss", "mm:eval:loss"} <= set(r)
    assert r["eval:num_samples_per_gpu"] == 12 and r["mm:eval:num_samples_per_gpu"] == 12
    names = {"entailment", "neutral", "contradiction"}
    for file, count in (("MNLI-m.tsv", 9), ("MNLI-mm.tsv", 9), ("AX.tsv", 7)):
        rows = read_server_file(out / file)
        assert len(rows) == count and {p for _, p in rows} <= names
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 9 + 9 + 7 and "ax-0" in predictions and "test_mismatched-8" in predictions


def test_stsb_regression_scores_in_server_range(glue: Path, tmp_path: Path) -> None:
    out = tmp_path / "sts"
    assert run_glue.main(glue_args(glue, out, "sts-b", "--do_train", "--do_eval", "--do_predict", "--max_steps", "3",
                                   "--bf16")) == 0
    r = results(out)
    assert {"pearson", "spearmanr", "corr"} <= set(r)
    rows = read_server_file(out / "STS-B.tsv")
    assert len(rows) == 8 and all(0.0 <= float(p) <= 5.0 and len(p.split(".")[1]) == 3 for _, p in rows)


def test_gradient_accumulation_matches_the_full_batch(glue: Path, tmp_path: Path) -> None:
    weights = []
    for accumulation in ("1", "4"):
        out = tmp_path / f"ga{accumulation}"
        assert run_glue.main(glue_args(glue, out, "sst-2", "--do_train", "--max_steps", "3",
                                       "--gradient_accumulation_steps", accumulation)) == 0
        weights.append(saved_weights(out))
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ----------------------------------------------------------------------------- the frozen mask


@pytest.fixture(scope="module")
def tiny_fields() -> dict:
    """This module's `tiny_config`: the model of the synthetic GLUE tasks."""
    return dict(TINY)


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(VOCAB), (4, SEQ), generator=generator)
    return ids, torch.zeros_like(ids), torch.ones_like(ids)


@pytest.fixture
def dam_checkpoint(tiny_config):
    """`dam_checkpoint(path)`: a DAM_u 'pretraining' checkpoint whose mask logits are random (about
    half the gates kept); returns the logits."""

    def dam_checkpoint(path: Path) -> torch.Tensor:
        torch.manual_seed(3)
        model = BertForSequenceClassification(tiny_config(attention_mask_type="dam_u"), 2)
        with torch.no_grad():
            model.bert.sparse_mask.mask_logits.normal_(0.0, 1.0)
        torch.save({"model": model.state_dict()}, path)
        return model.bert.sparse_mask.mask_logits.detach().clone()

    return dam_checkpoint


def test_outputs_change_with_the_mask_and_a_mask_file_equals_its_pattern(tmp_path: Path, tiny_config) -> None:
    torch.manual_seed(0)
    # Large init: with BERT's 0.02 the attention output is too small a part of the residual stream
    # for the mask to show in the logits of an untrained model.
    dense = BertForSequenceClassification(tiny_config(initializer_range=0.5), 2)
    torch.save({"model": dense.state_dict()}, tmp_path / "w.pt")
    ckpt = str(tmp_path / "w.pt")
    attention_masks.save_mask_file(tmp_path / "star.safetensors",
                                   attention_masks.pattern_mask("star", SEQ).expand(2, 2, SEQ, SEQ).clone(), {"mode": "star"})
    logits = {}
    for name, config in (("dense", tiny_config()), ("star", tiny_config(attention_mask_type="star")),
                         ("strided", tiny_config(attention_mask_type="strided")),
                         ("file", tiny_config(attention_mask_type="file",
                                              attention_mask_file=str(tmp_path / "star.safetensors")))):
        model = run_glue.build_model(config, 2, ckpt).eval()
        with torch.no_grad():
            logits[name] = model(*fixed_inputs()).logits
    assert not torch.allclose(logits["dense"], logits["star"], atol=1e-4)
    assert not torch.allclose(logits["star"], logits["strided"], atol=1e-4)
    torch.testing.assert_close(logits["file"], logits["star"])


def write_pattern_mask(path: Path, name: str) -> torch.Tensor:
    mask = attention_masks.pattern_mask(name, SEQ)[None, None]
    attention_masks.save_mask_file(path, mask, {"mode": name})
    return mask


def test_a_model_fine_tuned_with_a_mask_file_is_a_self_contained_folder(glue: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    first, elsewhere, out = tmp_path / "first", tmp_path / "elsewhere", tmp_path / "out"
    star = write_pattern_mask(first / "masks/mask.safetensors", "star")
    monkeypatch.chdir(first)  # the mask path is typed relative to where the run starts
    assert run_glue.main(glue_args(glue, out, "sst-2", "--do_train", "--do_eval", "--max_steps", "2",
                                   "--attention_mask_type", "file",
                                   "--attention_mask_file", "masks/mask.safetensors")) == 0
    assert json.loads((out / "bert_config.json").read_text())["attention_mask_file"] == "attention_mask.safetensors"
    copy, metadata = attention_masks.load_mask_file(out / "attention_mask.safetensors")
    assert torch.equal(copy, star) and metadata["mode"] == "star"
    # Elsewhere, decoys of another pattern sit at both relative paths: the folder's own mask must win.
    write_pattern_mask(elsewhere / "masks/mask.safetensors", "strided")
    write_pattern_mask(elsewhere / "attention_mask.safetensors", "strided")
    monkeypatch.chdir(elsewhere)
    model = BertForSequenceClassification.from_pretrained(out, num_labels=2)
    assert torch.equal(model.bert.sparse_mask.binarize(), star)
    again = tmp_path / "again"
    assert run_glue.main(glue_args(glue, again, "sst-2", "--do_eval", "--init_checkpoint", str(out),
                                   "--config_file", str(out / "bert_config.json"))) == 0
    assert results(again)["eval:loss"] == pytest.approx(results(out)["eval:loss"], rel=1e-6)
    assert results(again)["mask_sparsity"] == pytest.approx(attention_masks.sparsity(star))
    # Any other --config_file keeps its meaning: a relative mask path is read from the current directory.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "attention_mask_type": "file",
                                  "attention_mask_file": "masks/mask.safetensors"}))
    args = run_glue.parse_arguments(glue_args(glue, tmp_path / "x", "sst-2", "--do_eval",
                                              "--init_checkpoint", str(out), "--config_file", str(config)))
    assert run_glue.load_model_config(args).attention_mask_file == "masks/mask.safetensors"


def test_dam_checkpoint_is_binarised_frozen_and_deterministic(glue: Path, tmp_path: Path, dam_checkpoint,
                                                              tiny_config) -> None:
    logits = dam_checkpoint(tmp_path / "dam.pt")
    model = run_glue.build_model(tiny_config(attention_mask_type="dam_u"), 2, str(tmp_path / "dam.pt"))
    mask = model.bert.sparse_mask
    assert mask.frozen and not mask.mask_logits.requires_grad and model.mask_parameters() == []
    torch.testing.assert_close(mask.mask_logits, logits)
    keep = mask(SEQ)
    assert torch.equal(keep, (logits > 0).float()[:, :, mask.gate_index])  # 1[σ(a) > 0.5], no noise
    expected = attention_masks.sparsity(logits[:, :, mask.gate_index] > 0)
    assert model.mask_sparsity() == pytest.approx(expected) and 0.2 < expected < 0.8
    model.train()  # even in training mode: no Gumbel noise, same outputs twice
    with torch.no_grad():
        first, second = model(*fixed_inputs()).logits, model(*fixed_inputs()).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)

    # Fine-tuning moves the weights but never the mask logits.
    out = tmp_path / "ft"
    assert run_glue.main(glue_args(glue, out, "sst-2", "--do_train", "--do_eval", "--max_steps", "4",
                                   "--init_checkpoint", str(tmp_path / "dam.pt"), "--attention_mask_type", "dam_u")) == 0
    saved = saved_weights(out)
    torch.testing.assert_close(saved["bert.sparse_mask.mask_logits"], logits, rtol=0, atol=0)
    before = safe_torch_load(tmp_path / "dam.pt")["model"]
    assert not torch.equal(saved["bert.encoder.layer.0.attention.self.query.weight"],
                           before["bert.encoder.layer.0.attention.self.query.weight"])
    assert results(out)["mask_sparsity"] == pytest.approx(expected)


@pytest.fixture
def search_checkpoint(tiny_config):
    """`search_checkpoint(path, **search)`: a DAM pretraining checkpoint as run_pretraining.py writes
    it: the weights, and the config the search ran with recorded under "config"."""

    def search_checkpoint(path: Path, **search: object) -> BertConfig:
        config = tiny_config(**search)
        model = BertForPreTraining(config)
        torch.save({"model": model.state_dict(), "config": config.to_json_string()}, path)
        return config

    return search_checkpoint


@pytest.mark.parametrize("search, here, named", [
    # Same number of gates per head (256, 16 and 36): the logits' shape alone cannot tell.
    ({"attention_mask_type": "dam_u"}, {"attention_mask_type": "dam_u", "mask_seq_length": 32, "dam_block_size": 2},
     ["mask_seq_length=16 (search) vs 32", "dam_block_size=1 (search) vs 2"]),
    ({"attention_mask_type": "dam_s"}, {"attention_mask_type": "dam_u", "dam_block_size": 4},
     ["attention_mask_type='dam_s' (search) vs 'dam_u'", "dam_block_size=1 (search) vs 4"]),
    ({"attention_mask_type": "dam_u", "dam_symmetric": True, "dam_block_size": 2},
     {"attention_mask_type": "dam_u", "mask_seq_length": 24, "dam_block_size": 4},
     ["dam_symmetric=True (search) vs False", "mask_seq_length=16 (search) vs 24"]),
    ({"attention_mask_type": "dam_s", "dam_share_across_layers": True}, {"attention_mask_type": "dam_s"},
     ["dam_share_across_layers=True (search) vs False"]),
])
def test_dam_logits_searched_under_another_layout_are_refused_naming_the_fields(
        tmp_path: Path, search: dict, here: dict, named: list[str], search_checkpoint, tiny_config) -> None:
    search_checkpoint(tmp_path / "search.pt", **search)
    with pytest.raises(ValueError) as caught:
        run_glue.build_model(tiny_config(**here), 2, str(tmp_path / "search.pt"))
    message = str(caught.value)
    assert all(field in message for field in named), message
    assert "use the search's bert_config.json" in message and "--attention_mask_file" in message
    assert "\n" not in message


def test_dam_logits_load_when_only_fields_without_layout_meaning_differ(tmp_path: Path, search_checkpoint,
                                                                        tiny_config) -> None:
    # λ, τ and the init only shaped the search; dam_symmetric means nothing for dam_s.
    search_checkpoint(tmp_path / "search.pt", attention_mask_type="dam_s", dam_lambda=1e-3, dam_temperature=0.5,
                      dam_symmetric=True, dam_init_std=0.1)
    model = run_glue.build_model(tiny_config(attention_mask_type="dam_s"), 2, str(tmp_path / "search.pt"))
    assert model.bert.sparse_mask.frozen


def test_dam_layout_mismatch_stops_run_glue_in_one_line(glue: Path, tmp_path: Path, capsys, search_checkpoint) -> None:
    search_checkpoint(tmp_path / "search.pt", attention_mask_type="dam_s")
    argv = glue_args(glue, tmp_path / "out", "sst-2", "--do_train", "--init_checkpoint", str(tmp_path / "search.pt"),
                     "--attention_mask_type", "dam_u")
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("run_glue.py: error: ") and "attention_mask_type='dam_s' (search) vs 'dam_u'" in err
    assert "\n" not in err


def test_a_searched_checkpoint_under_a_dense_config_is_refused_unless_asked(glue: Path, tmp_path: Path, capsys,
                                                                           search_checkpoint, caplog) -> None:
    """Fine-tuning densely would silently leave the searched mask unused: one line naming the
    logits and both ways on; --drop_searched_mask does it on purpose, a pattern names what it skips."""
    search_checkpoint(tmp_path / "search.pt", attention_mask_type="dam_s")
    argv = glue_args(glue, tmp_path / "out", "sst-2", "--do_train", "--max_steps", "1",
                     "--init_checkpoint", str(tmp_path / "search.pt"))
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds a searched attention mask (bert.sparse_mask.mask_logits)" in err
    assert "--attention_mask_type dam_s" in err and "--drop_searched_mask" in err and not (tmp_path / "out").exists()
    assert run_glue.main([*argv, "--drop_searched_mask"]) == 0
    assert results(tmp_path / "out")["mask_sparsity"] == 0.0
    caplog.clear()
    assert run_glue.main(glue_args(glue, tmp_path / "star", "sst-2", "--do_train", "--max_steps", "1", "--init_checkpoint",
                                   str(tmp_path / "search.pt"), "--attention_mask_type", "star")) == 0
    assert "not using its searched mask logits bert.sparse_mask.mask_logits (attention_mask_type 'star')" in caplog.text


def test_same_seed_fine_tunes_alike_from_the_dam_checkpoint_or_its_exported_mask(glue: Path, tmp_path: Path,
                                                                                 search_checkpoint) -> None:
    # Both routes freeze the same mask; building the DAM one must not shift the random draws of the
    # new classifier head or of the dropout that follows.
    search_checkpoint(tmp_path / "search.pt", attention_mask_type="dam_u", hidden_dropout_prob=0.1)
    attention_masks.main(["export", "--checkpoint", str(tmp_path / "search.pt"), "--out", str(tmp_path / "m.safetensors")])
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "hidden_dropout_prob": 0.1}))
    routes = {"file": ["--attention_mask_type", "file", "--attention_mask_file", str(tmp_path / "m.safetensors")],
              "dam": ["--attention_mask_type", "dam_u"]}
    for route, flags in routes.items():
        assert run_glue.main(glue_args(glue, tmp_path / route, "sst-2", "--do_train", "--do_eval", "--max_steps", "3",
                                       "--config_file", str(tmp_path / "config.json"),
                                       "--init_checkpoint", str(tmp_path / "search.pt"), *flags)) == 0
    file_run, dam_run = results(tmp_path / "file"), results(tmp_path / "dam")
    assert 0.2 < dam_run["mask_sparsity"] < 0.8 and dam_run["mask_sparsity"] == file_run["mask_sparsity"]
    assert dam_run["train:loss"] == file_run["train:loss"] and dam_run["eval:loss"] == file_run["eval:loss"]


@pytest.fixture(scope="module")
def target_search(tmp_path_factory, make_shards, pretraining_args, write_config) -> Path:
    """A finished 4-step dam_s search to a target sparsity of 0.7 (given by --target_sparsity, so only
    its checkpoint records it): its config.json and output folder (ckpt_4.pt, attention_mask.safetensors)."""
    root = tmp_path_factory.mktemp("target_search")
    shards = make_shards(root, corpus_seeds=[0], dupe_factor=1, docs=10)
    config = write_config(root / "config.json", attention_mask_type="dam_s")
    assert run_pretraining.main(pretraining_args(shards, root / "out", config, max_steps=4, target_sparsity=0.7)) == 0
    return root


def test_fine_tuning_a_target_search_freezes_the_mask_it_exported(glue: Path, tmp_path: Path, target_search: Path,
                                                                  caplog) -> None:
    exported, meta = attention_masks.load_mask_file(target_search / "out/attention_mask.safetensors")
    assert meta["binarization"] == {"rule": "budget", "scope": "global", "sparsity": 0.7}
    checkpoint, config = target_search / "out/ckpt_4.pt", target_search / "config.json"
    out = tmp_path / "ft"
    caplog.set_level("INFO")
    assert run_glue.main(glue_args(glue, out, "sst-2", "--do_train", "--do_eval", "--max_steps", "2",
                                   "--config_file", str(config), "--init_checkpoint", str(checkpoint),
                                   "--attention_mask_type", "dam_s")) == 0
    assert "lagrange_multipliers" not in caplog.text and "target_start" not in caplog.text  # not "unexpected"
    assert "frozen searched mask: sparsity 0.7000, binarisation: budget, sparsity 0.7" in caplog.text
    assert attention_masks.sparsity(exported) == pytest.approx(0.7, abs=1e-3)
    # the reported sparsity is that of the top-left slice the inputs (--max_seq_length SEQ) used
    assert results(out)["mask_sparsity"] == pytest.approx(attention_masks.sparsity(exported[..., :SEQ, :SEQ]))
    assert results(out)["mask_binarization"] == meta["binarization"]
    # The fine-tuned folder records the rule instead of the search state, and reloads the same mask.
    saved = json.loads((out / "bert_config.json").read_text())
    assert (saved["dam_binarize_sparsity"], saved["dam_target_sparsity"]) == (0.7, None)
    assert not [key for key in saved_weights(out) if attention_masks.is_search_state(key)]
    reloaded = BertForSequenceClassification.from_pretrained(out, num_labels=2).bert.sparse_mask
    assert torch.equal(reloaded.full_mask(), exported)
    # Built directly: the search's budget rule, not 1[a > 0].
    model = run_glue.build_model(BertConfig.from_json_file(config).replace(attention_mask_type="dam_s"), 2,
                                 str(checkpoint))
    mask = model.bert.sparse_mask
    assert mask.frozen and torch.equal(mask.full_mask(), exported)
    assert mask.binarization() == {"rule": "budget", "scope": "global", "sparsity": 0.7}


def test_a_fine_tuning_config_with_its_own_budget_wins_over_the_searchs(target_search: Path) -> None:
    config = BertConfig.from_json_file(target_search / "config.json").replace(dam_binarize_sparsity=0.9,
                                                                            dam_binarize_scope="head")
    model = run_glue.build_model(config, 2, str(target_search / "out/ckpt_4.pt"))
    assert model.bert.sparse_mask.binarization() == {"rule": "budget", "scope": "head", "sparsity": 0.9}
    per_head = model.bert.sparse_mask.full_mask().sum(dim=(-1, -2))
    assert per_head.eq(round(0.1 * SEARCH_SEQ * SEARCH_SEQ)).all()


def test_checkpoint_fine_tuned_on_another_task_gets_a_new_head_only_when_training(tmp_path: Path, tiny_config) -> None:
    # e.g. RTE fine-tuned from an MNLI checkpoint: 3 outputs there, 2 here.
    torch.manual_seed(0)
    mnli = BertForSequenceClassification(tiny_config(), 3)
    torch.save({"model": mnli.state_dict()}, tmp_path / "mnli.pt")
    model = run_glue.build_model(tiny_config(), 2, str(tmp_path / "mnli.pt"))
    assert model.classifier.weight.shape == (2, TINY["hidden_size"])
    torch.testing.assert_close(model.bert.pooler.dense_act.weight, mnli.bert.pooler.dense_act.weight)
    # Scoring without training would use a random head: refused, naming both label counts.
    with pytest.raises(ValueError, match="classifier has 3 outputs but this task needs 2"):
        run_glue.build_model(tiny_config(), 2, str(tmp_path / "mnli.pt"), allow_new_head=False)


@pytest.mark.parametrize("mode", ["--do_eval", "--do_predict"])
def test_scoring_a_checkpoint_without_classifier_is_refused_before_the_data_is_read(
        glue: Path, tmp_path: Path, capsys, mode: str, tiny_config) -> None:
    torch.save({"model": BertForPreTraining(tiny_config()).state_dict()}, tmp_path / "pretrained.pt")
    data = tmp_path / "SST-2"  # dev and test files that fail if read: the checkpoint must be refused first
    for name in ("dev.tsv", "test.tsv"):
        write_tsv(data / name, [["sentence", "label"], ["broken"]])
    out = tmp_path / "out"
    argv = glue_args(glue, out, "sst-2", mode, "--data_dir", str(data),
                     "--init_checkpoint", str(tmp_path / "pretrained.pt"))
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'pretrained.pt'} has no classifier" in err and "add --do_train" in err and "\n" not in err
    assert not out.exists()
    # Without any checkpoint the whole model would be random: refused the same way.
    assert run_glue.main([a for a in argv if a not in ("--init_checkpoint", str(tmp_path / "pretrained.pt"))]) == 1
    assert "add --do_train" in capsys.readouterr().err and not out.exists()


def test_training_from_a_pretraining_checkpoint_gets_a_new_head(glue: Path, tmp_path: Path, tiny_config) -> None:
    torch.save({"model": BertForPreTraining(tiny_config()).state_dict()}, tmp_path / "pretrained.pt")
    out = tmp_path / "out"
    assert run_glue.main(glue_args(glue, out, "sst-2", "--do_train", "--do_eval", "--max_steps", "1",
                                   "--init_checkpoint", str(tmp_path / "pretrained.pt"))) == 0
    assert results(out)["global_step"] == 1


# ----------------------------------------------------------------------------- bad flags and paths


@pytest.mark.parametrize("extra, message", [
    (["--do_train", "--fp16", "--bf16"], "--fp16/--amp and --bf16 are mutually exclusive"),
    (["--do_train", "--gradient_accumulation_steps", "3"], "--gradient_accumulation_steps 3 must divide --train_batch_size 16"),
    ([], "nothing to do: pass --do_train"),
    (["--do_train", "--task_name", "squad"], "unknown --task_name 'squad'"),
    (["--do_train", "--data_dir", "/nonexistent/MRPC"], "--data_dir /nonexistent/MRPC does not exist"),
    (["--do_train", "--init_checkpoint", "/nonexistent.pt"], "checkpoint /nonexistent.pt does not exist"),
    (["--do_train", "--max_seq_length", "32", "--attention_mask_type", "star"],
     "mask_seq_length 16 < --max_seq_length 32"),
    (["--do_train", "--attention_mask_type", "dam_s"], "needs --init_checkpoint holding the searched mask logits"),
    (["--do_train", "--warmup_proportion", "1.5"], "--warmup_proportion is a fraction"),
])
def test_bad_flags_fail_early_with_one_line(glue: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "out"
    assert run_glue.main(glue_args(glue, out) + extra) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("run_glue.py: error: ") and message in err and "\n" not in err
    assert not out.exists()  # nothing written


def test_torch_distributed_launch_local_rank_spelling_is_accepted(glue: Path, tmp_path: Path) -> None:
    """torch >= 2.0's `python -m torch.distributed.launch` passes `--local-rank=N`."""
    argv = glue_args(glue, tmp_path / "out", "sst-2", "--do_train")
    assert run_glue.parse_arguments([*argv, "--local-rank=1"]).local_rank == 1
    assert run_glue.parse_arguments([*argv, "--local_rank", "2"]).local_rank == 2


def test_uncased_vocab_without_do_lower_case_is_refused(glue: Path, tmp_path: Path, capsys) -> None:
    # Without lower-casing, every capitalised word of the data is [UNK] in an uncased vocab.
    out = tmp_path / "out"
    argv = [a for a in glue_args(glue, out, "sst-2", "--do_train") if a != "--do_lower_case"]
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "is uncased" in err and "pass --do_lower_case" in err and "\n" not in err
    assert not out.exists()


def test_bad_data_names_file_and_line_and_writes_nothing(glue: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "SST-2"
    write_tsv(data / "train.tsv", [["sentence", "label"], ["fine", "1"], ["broken", "positive"]])
    out = tmp_path / "out"
    argv = glue_args(glue, out) + ["--do_train", "--data_dir", str(data)]
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert f"{data / 'train.tsv'}:3: label 'positive' is not a sst-2 label" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("missing, flag", [("test.tsv", "--do_predict"), ("dev.tsv", "--do_eval")])
def test_missing_dev_or_test_file_fails_before_training(glue: Path, tmp_path: Path, capsys, missing: str,
                                                        flag: str) -> None:
    data = tmp_path / "SST-2"
    data.mkdir()
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        if name != missing:
            (data / name).write_bytes((glue / "SST-2" / name).read_bytes())
    out = tmp_path / "out"
    argv = glue_args(glue, out, "sst-2", "--do_train", flag, "--data_dir", str(data))
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert str(data / missing) in err and "\n" not in err
    assert not out.exists()  # refused before training, not after hours of it


@pytest.mark.parametrize("name, raw, message", [
    ("dev.tsv", b"sentence\tlabel\n", "dev.tsv: no examples"),
    ("dev.tsv", b"", "dev.tsv: no examples"),
    ("dev.tsv", b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n", "dev.tsv:3: not valid UTF-8"),
    ("dev.tsv", b"sentence\tlabel\ngood\t1\nbad\tnegative\n", "dev.tsv:3: label 'negative'"),
    ("dev.tsv", b"sentence\tlabel\ngood\tfilm\t1\n", "dev.tsv:2: 3 tab-separated fields"),
    ("test.tsv", b"index\tsentence\n0\tgood\n1\tbad\n0\tmeh\n", "test.tsv:4: test index '0' repeats line 2"),
    ("test.tsv", b"index\tsentence\r0\tgood\r1\tbad\r", "test.tsv:1: carriage return"),
])
def test_bad_dev_or_test_file_fails_before_training(glue: Path, tmp_path: Path, capsys, name: str, raw: bytes,
                                                     message: str) -> None:
    """Every file of the run is read before the first step, so fine-tuning time is never spent on a bad one."""
    data = tmp_path / "SST-2"
    data.mkdir()
    for other in ("train.tsv", "dev.tsv", "test.tsv"):
        (data / other).write_bytes(raw if other == name else (glue / "SST-2" / other).read_bytes())
    out = tmp_path / "out"
    argv = glue_args(glue, out, "sst-2", "--do_train", "--do_eval", "--do_predict", "--data_dir", str(data))
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert str(data) in err and message in err and "; " in err and "\n" not in err
    assert not out.exists()  # refused before training: no checkpoint, no results


@pytest.mark.parametrize("shape", [(2, 3, SEQ, SEQ), (2, 2, 2 * SEQ, 2 * SEQ)])
def test_mask_file_of_another_shape_fails_before_the_data_is_read(glue: Path, tmp_path: Path, capsys,
                                                                  shape: tuple[int, ...]) -> None:
    mask_file = tmp_path / "mask.safetensors"
    attention_masks.save_mask_file(mask_file, torch.ones(shape, dtype=torch.bool), {"mode": "dense"})
    data = tmp_path / "SST-2"  # a training file that is slow to read in a real run: here, one that fails
    write_tsv(data / "train.tsv", [["sentence", "label"], ["broken", "positive"]])
    argv = glue_args(glue, tmp_path / "out", "sst-2", "--do_train", "--data_dir", str(data),
                     "--attention_mask_file", str(mask_file))
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert f"mask file {mask_file}" in err and str(list(shape)) in err and "\n" not in err


def test_dam_type_with_a_checkpoint_without_logits_is_refused(glue: Path, tmp_path: Path, capsys, tiny_config) -> None:
    torch.save({"model": BertForSequenceClassification(tiny_config(), 2).state_dict()}, tmp_path / "dense.pt")
    argv = glue_args(glue, tmp_path / "out", "sst-2", "--do_train", "--init_checkpoint", str(tmp_path / "dense.pt"),
                     "--attention_mask_type", "dam_u")
    assert run_glue.main(argv) == 1
    assert "has none: pass the DAM pretraining checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- scripts and DDP


def test_run_glue_sh_positional_parameters(glue: Path, tmp_path: Path) -> None:
    out = tmp_path / "sh"
    mask_file = tmp_path / "star.safetensors"
    attention_masks.save_mask_file(mask_file, attention_masks.pattern_mask("star", SEQ)[None, None], {"mode": "star"})
    params = ["", str(glue / "SST-2"), str(glue / "vocab.txt"), str(glue / "config.json"), str(out), "sst-2", "1",
              "16", "2", "2e-3", "0.1", "1", "3", "fp32", "2", "train eval prediction", str(mask_file)]
    env = {**os.environ, "MAX_SEQ_LENGTH": str(SEQ), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts/run_glue.sh"), *params], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = results(out)
    assert r["global_step"] == 3 and r["attention_mask_type"] == "file" and r["mask_sparsity"] > 0.5
    assert (out / "SST-2.tsv").is_file() and (out / "logfile").is_file()
    assert "--gradient_accumulation_steps 2" in proc.stdout


def test_run_glue_sh_resolves_relative_paths_from_the_callers_directory(glue: Path, tmp_path: Path) -> None:
    (tmp_path / "data").symlink_to(glue)
    out = f"out_{tmp_path.name}"  # unique, so a run that wrongly lands in the repository is seen
    params = ["", "data/SST-2", "data/vocab.txt", "data/config.json", out, "sst-2", "1", "16", "1", "2e-3", "0.1",
              "1", "1", "fp32", "2", "train"]
    env = {**os.environ, "MAX_SEQ_LENGTH": str(SEQ), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts/run_glue.sh"), *params], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert not (ROOT / out).exists()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert results(tmp_path / out)["global_step"] == 1 and (tmp_path / out / "logfile").is_file()


@pytest.mark.slow
def test_torchrun_two_processes(glue: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "run_glue.py"), *glue_args(glue, out, "sst-2", "--do_train", "--do_eval", "--do_predict",
                                                 "--max_steps", "4", "--attention_mask_type", "star", "--no_cuda")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = results(out)
    assert r["global_step"] == 4 and r["train:num_samples_per_gpu"] == 4 * 16
    assert len(read_server_file(out / "SST-2.tsv")) == 25


SLOW_EVAL_DRIVER = """
import sys, time
sys.path.insert(0, sys.argv.pop(1))
import run_glue
evaluate = run_glue.evaluate
run_glue.evaluate = lambda *a, **k: (time.sleep(4), evaluate(*a, **k))[1]  # a large dev set
sys.exit(run_glue.main())
"""


@pytest.mark.slow
def test_torchrun_evaluation_longer_than_dist_timeout_completes(glue: Path, tmp_path: Path) -> None:
    """Rank 0 scores the dev set alone; the other rank's wait is not a stuck collective."""
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_EVAL_DRIVER)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           str(ROOT), *glue_args(glue, out, "sst-2", "--do_train", "--do_eval", "--max_steps", "1", "--no_cuda",
                                 "--dist_timeout", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acc" in results(out)


@pytest.mark.slow
def test_run_glue_all_prints_the_table_row(glue: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    env = {**os.environ, "MAX_SEQ_LENGTH": str(SEQ), "OMP_NUM_THREADS": "1", "TASKS": "mnli sst-2",
           "MAX_STEPS": "2", "BATCH_SIZE": "16", "VOCAB_FILE": str(glue / "vocab.txt"), "MODE": "train eval"}
    proc = subprocess.run(["bash", str(ROOT / "scripts/run_glue_all.sh"), "", str(glue), str(glue / "config.json"),
                           str(out), "star", "1", "fp32", "1", "Star"], env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    mnli, sst = results(out / "MNLI"), results(out / "SST-2")
    row = proc.stdout.strip().splitlines()[-1]
    cells = row.strip("|").split("|")
    assert cells[0] == "Star" and cells[1] == f"{100 * mnli['mask_sparsity']:.1f}"
    assert cells[2] == f"{100 * mnli['acc']:.1f}/{100 * mnli['mm:acc']:.1f}" and cells[5] == f"{100 * sst['acc']:.1f}"
    assert cells[3] == "-" and cells[-1].endswith("*")  # QQP not run; the average says it is partial


def test_a_bad_flag_value_is_one_line_naming_the_flag_and_its_choices(glue: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(glue_args(glue, tmp_path / "out") + ["--do_train", "--attention_mask_type", "Star"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and not (tmp_path / "out").exists()
    assert err.startswith("run_glue.py: error: argument --attention_mask_type: invalid choice: 'Star'") and "'star'" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_non_finite_values_at_parse_time(glue: Path, tmp_path: Path, capsys, float_flags,
                                                                  value: str) -> None:
    flags = float_flags(run_glue.parse_arguments)
    assert "--learning_rate" in flags and "--max_grad_norm" in flags
    for flag in flags:
        with pytest.raises(SystemExit):
            run_glue.parse_arguments([*glue_args(glue, tmp_path / "out"), f"{flag}={value}"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"argument {flag}: must be a finite number, got {value}" in err


def test_fine_tuning_into_the_folder_of_its_init_checkpoint_is_refused(glue: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the starting weights")
    argv = glue_args(glue, out) + ["--do_train", "--init_checkpoint", str(out)]
    assert run_glue.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("run_glue.py: error: --output_dir's model.safetensors") and "--init_checkpoint" in err
    assert (out / "model.safetensors").read_bytes() == b"the starting weights"


def test_a_second_fine_tuning_into_an_output_dir_in_use_is_refused(glue: Path, tmp_path: Path, capsys,
                                                                   hold_output_dir) -> None:
    out = tmp_path / "out"
    holder = hold_output_dir(out, "run_glue.py")
    assert run_glue.main(glue_args(glue, out, "sst-2", "--do_train", "--do_eval", "--max_steps", "2")) == 1
    assert f"--output_dir {out} is in use by run_glue.py (pid {holder.pid} on " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
