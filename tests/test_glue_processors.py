"""processors/glue.py: every GLUE reader on small files in the official layout, bad inputs, features."""
from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.glue import (
    TASKS,
    GlueDataError,
    InputExample,
    convert_examples_to_features,
    format_prediction,
    get_task,
    read_examples,
    submission_text,
    truncate_pair,
)

# A sentence with quotes that CSV quoting would swallow: an opening quote with no closing one, and
# a fully quoted field. The readers must keep both literally.
QUOTED = '"Hello," she said, "it\'s 5" long'
UNBALANCED = '" an unbalanced quote at the start'


def write(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "s1_bp", "s2_bp", "s1_p", "s2_p",
                     "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:11] + ["label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
               "sentence2", "score"]


def mnli_row(i: int, a: str, b: str, labels: list[str]) -> list[str]:
    return [str(i), "p", "q", "fiction", "(bp)", "(bp)", "(p)", "(p)", a, b, *labels]


def make_glue(root: Path) -> None:
    """A two-row-per-split copy of the GLUE folder layout, one quoted field in every file."""
    write(root / "CoLA/train.tsv", [["gj04", "1", "", QUOTED], ["gj04", "0", "*", "the the ran"]])
    write(root / "CoLA/dev.tsv", [["gj04", "0", "*", UNBALANCED], ["gj04", "1", "", "dogs bark"]])
    write(root / "CoLA/test.tsv", [["index", "sentence"], ["0", QUOTED], ["1", "cats"]])
    write(root / "SST-2/train.tsv", [["sentence", "label"], [QUOTED, "1"], ["bad film", "0"]])
    write(root / "SST-2/dev.tsv", [["sentence", "label"], ["great", "1"], [UNBALANCED, "0"]])
    write(root / "SST-2/test.tsv", [["index", "sentence"], ["0", QUOTED], ["1", "meh"]])
    mrpc_h = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    write(root / "MRPC/train.tsv", [mrpc_h, ["1", "11", "12", QUOTED, "b one"], ["0", "13", "14", "a2", "b2"]])
    write(root / "MRPC/dev.tsv", [mrpc_h, ["0", "15", "16", "a3", UNBALANCED], ["1", "17", "18", "a4", "b4"]])
    write(root / "MRPC/test.tsv", [["index"] + mrpc_h[1:], ["0", "1", "2", QUOTED, "x"], ["1", "3", "4", "y", "z"]])
    write(root / "STS-B/train.tsv", [STSB_HEADER, ["0", "g", "f", "2012", "1", "s", "s", QUOTED, "b", "3.800"],
                                     ["1", "g", "f", "2012", "2", "s", "s", "a", "b", "0.5"]])
    write(root / "STS-B/dev.tsv", [STSB_HEADER, ["0", "g", "f", "2012", "1", "s", "s", "a", UNBALANCED, "5.000"],
                                   ["1", "g", "f", "2012", "2", "s", "s", "a", "b", "1.25"]])
    write(root / "STS-B/test.tsv", [STSB_HEADER[:-1], ["0", "g", "f", "2012", "1", "s", "s", QUOTED, "b"],
                                    ["1", "g", "f", "2012", "2", "s", "s", "a", "b"]])
    qqp_h = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write(root / "QQP/train.tsv", [qqp_h, ["7", "1", "2", QUOTED, "q b?", "1"],
                                   # The official train file has rows broken by a newline in a question.
                                   ["8", "3", "4", "What is"], ['"', "the rest?", "0"],
                                   ["9", "5", "6", "q c?", "q d?", "0"]])
    write(root / "QQP/dev.tsv", [qqp_h, ["10", "1", "2", "q?", UNBALANCED, "0"], ["11", "3", "4", "r?", "s?", "1"]])
    write(root / "QQP/test.tsv", [["id", "question1", "question2"], ["0", QUOTED, "x?"], ["1", "y?", "z?"]])
    write(root / "MNLI/train.tsv", [MNLI_TRAIN_HEADER, mnli_row(0, QUOTED, "h", ["neutral", "neutral"]),
                                    mnli_row(1, "p", "h", ["entailment", "entailment"])])
    for split, first in (("dev_matched", "contradiction"), ("dev_mismatched", "entailment")):
        write(root / f"MNLI/{split}.tsv", [MNLI_DEV_HEADER,
                                           mnli_row(0, UNBALANCED, "h", ["neutral"] * 5 + [first]),
                                           mnli_row(1, "p", "h", ["neutral"] * 6)])
    for split in ("test_matched", "test_mismatched"):
        write(root / f"MNLI/{split}.tsv", [MNLI_TRAIN_HEADER[:10], mnli_row(0, QUOTED, "h", []),
                                           mnli_row(1, "p", "h", [])])
    write(root / "diagnostic/diagnostic.tsv", [["index", "sentence1", "sentence2"], ["0", QUOTED, "b"], ["1", "c", "d"]])
    for task, labels in (("QNLI", ("entailment", "not_entailment")), ("RTE", ("not_entailment", "entailment")),
                         ("WNLI", ("0", "1"))):
        header = ["index", "question" if task == "QNLI" else "sentence1", "sentence" if task == "QNLI" else "sentence2"]
        write(root / f"{task}/train.tsv", [header + ["label"], ["0", QUOTED, "b", labels[0]], ["1", "c", "d", labels[1]]])
        write(root / f"{task}/dev.tsv", [header + ["label"], ["0", "a", UNBALANCED, labels[1]], ["1", "c", "d", labels[0]]])
        write(root / f"{task}/test.tsv", [header, ["0", QUOTED, "b"], ["1", "c", "d"]])


FOLDERS = {"cola": "CoLA", "sst-2": "SST-2", "mrpc": "MRPC", "sts-b": "STS-B", "qqp": "QQP", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue_data")
    make_glue(root)
    return root


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_reads_train_dev_test(glue_root: Path, name: str) -> None:
    task = get_task(name)
    data_dir = glue_root / FOLDERS[name]
    train = task.train_examples(data_dir)
    assert len(train) == 2
    assert train[0].text_a == QUOTED  # quotes kept literally, the header (where there is one) skipped
    assert all(ex.label is not None for ex in train)
    for split in task.dev:
        dev = task.dev_examples(data_dir, split)
        assert len(dev) == 2 and all(ex.label is not None for ex in dev)
        texts = {t for ex in dev for t in (ex.text_a, ex.text_b)}
        assert UNBALANCED in texts  # an unbalanced quote does not swallow the next row
    for split in task.test:
        test = task.test_examples(data_dir, split)
        assert [ex.index for ex in test] == ["0", "1"]
        assert test[0].text_a == QUOTED and all(ex.label is None for ex in test)
    guids = [ex.guid for s in task.dev for ex in task.dev_examples(data_dir, s)]
    assert len(set(guids)) == len(guids)


def test_columns_and_labels_are_the_official_ones(glue_root: Path) -> None:
    mrpc = get_task("mrpc").train_examples(glue_root / "MRPC")
    assert (mrpc[0].text_a, mrpc[0].text_b, mrpc[0].label) == (QUOTED, "b one", "1")
    cola = get_task("cola").train_examples(glue_root / "CoLA")
    assert [ex.label for ex in cola] == ["1", "0"]  # no header: the first row is data
    sts = get_task("sts-b").train_examples(glue_root / "STS-B")
    assert [ex.label for ex in sts] == ["3.800", "0.5"]
    mnli = get_task("mnli")
    matched, mismatched = (mnli.dev_examples(glue_root / "MNLI", s) for s in mnli.dev)
    assert matched[0].label == "contradiction" and mismatched[0].label == "entailment"  # gold = last column
    assert [s.metric_prefix for s in mnli.dev] == ["", "mm:"]
    assert [s.server_file for s in mnli.test] == ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]
    qnli = get_task("qnli").train_examples(glue_root / "QNLI")
    assert qnli[0].label == "entailment" and qnli[1].text_b == "d"


def test_qqp_train_skips_the_known_broken_rows_dev_does_not(glue_root: Path, tmp_path: Path) -> None:
    train = get_task("qqp").train_examples(glue_root / "QQP")
    assert [ex.index for ex in train] == ["7", "9"]
    write(tmp_path / "dev.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ["1", "2", "3", "q?"]])
    with pytest.raises(GlueDataError, match=r"dev\.tsv:2: 4 tab-separated field"):
        get_task("qqp").dev_examples(tmp_path, get_task("qqp").dev[0])


# ----------------------------------------------------------------------------- bad inputs


def sst_dev(tmp_path: Path, raw: bytes) -> Path:
    (tmp_path / "dev.tsv").write_bytes(raw)
    return tmp_path


def read_sst_dev(data_dir: Path):
    task = get_task("sst-2")
    return task.dev_examples(data_dir, task.dev[0])


@pytest.mark.parametrize("raw, message", [
    (b"sentence\tlabel\ngood\t1\nno label column\n", r"dev\.tsv:3: 1 tab-separated field.*need at least 2"),
    (b"sentence\tlabel\ngood\tpositive\n", r"dev\.tsv:2: label 'positive' is not a sst-2 label"),
    (b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n", r"dev\.tsv:3: not valid UTF-8"),
    ("sentence\tlabel\ngood\t1\n".encode("utf-16"), r"dev\.tsv:1: not valid UTF-8"),
    (b"sentence\tlabel\ngo\x00od\t1\n", r"dev\.tsv:2: contains NUL bytes"),
    (b"sentence\tlabel\ngood\tfilm\t1\n", r"dev\.tsv:2: 3 tab-separated fields, sst-2 dev rows have 2"),
    (b"sentence\tlabel\rgood\t1\rbad\t0\r", r"dev\.tsv:1: carriage return inside a line"),
    (b"sentence\tlabel\ngood\t1\ngo\rod\t0\n", r"dev\.tsv:3: carriage return inside a line"),
    (b"sentence\tlabel\n", r"dev\.tsv: no examples"),
    (b"", r"dev\.tsv: no examples"),
])
def test_bad_tsv_is_one_line_naming_file_and_line(tmp_path: Path, raw: bytes, message: str) -> None:
    with pytest.raises(GlueDataError, match=message) as info:
        read_sst_dev(sst_dev(tmp_path, raw))
    assert "\n" not in str(info.value)


def test_bad_regression_score_and_missing_file_and_unknown_task(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", [STSB_HEADER, ["0", "g", "f", "y", "1", "s", "s", "a", "b", "high"]])
    with pytest.raises(GlueDataError, match=r"train\.tsv:2: sts-b score 'high' is not a finite number"):
        get_task("sts-b").train_examples(tmp_path)
    with pytest.raises(GlueDataError, match=r"GLUE file not found: .*train\.tsv.*--data_dir"):
        get_task("rte").train_examples(tmp_path / "nowhere")
    with pytest.raises(GlueDataError, match=r"unknown --task_name 'glue': choose one of cola, sst-2"):
        get_task("glue")
    assert get_task("SST2") is TASKS["sst-2"] and get_task("STS-B") is TASKS["sts-b"]


@pytest.mark.parametrize("score, ok", [("0", True), ("5.000", True), ("2.5", True), ("5.001", False),
                                       ("-0.5", False), ("1e3", False), ("inf", False)])
def test_sts_b_score_must_be_in_0_5(tmp_path: Path, score: str, ok: bool) -> None:
    write(tmp_path / "dev.tsv", [STSB_HEADER, ["0", "g", "f", "y", "1", "s", "s", "a", "b", score]])
    task = get_task("sts-b")
    if ok:
        assert task.dev_examples(tmp_path, task.dev[0])[0].label == score
        return
    with pytest.raises(GlueDataError, match=rf"dev\.tsv:2: sts-b score .* (is outside \[0, 5\]|is not a finite)"):
        task.dev_examples(tmp_path, task.dev[0])


@pytest.mark.parametrize("indices, message", [
    (["0", "1", "0"], r"test\.tsv:4: test index '0' repeats line 2"),
    (["0", "x1"], r"test\.tsv:3: test index 'x1' is not a non-negative integer"),
    (["0", "-1"], r"test\.tsv:3: test index '-1' is not a non-negative integer"),
])
def test_test_indices_must_be_unique_integers(tmp_path: Path, indices: list[str], message: str) -> None:
    task = get_task("qnli")
    write(tmp_path / "test.tsv", [["index", "question", "sentence"]] + [[i, "q", "s"] for i in indices])
    with pytest.raises(GlueDataError, match=message):
        task.test_examples(tmp_path, task.test[0])


def every_split() -> list[tuple[str, str, object]]:
    return [(name, split.name, split.layout) for name, task in sorted(TASKS.items())
            for split in (*task.dev, *task.test)] + [(name, "train", task.train) for name, task in sorted(TASKS.items())]


@pytest.mark.parametrize("name, split, layout", every_split(), ids=lambda v: v if isinstance(v, str) else "")
def test_tab_inside_a_sentence_is_refused_in_every_layout(glue_root: Path, tmp_path: Path, name: str, split: str,
                                                          layout) -> None:
    """Every official file has a fixed column count, so a tab in either sentence column is caught."""
    source = glue_root / FOLDERS[name] / layout.filenames[-1 if name == "mnli" and split == "ax" else 0]
    lines = source.read_text(encoding="utf-8").splitlines()
    for column in (c for c in (layout.text_a, layout.text_b) if c is not None):
        fields = lines[-1].split("\t")
        fields[column] += "\tabsorbed"
        target = tmp_path / layout.filenames[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join([*lines[:-1], "\t".join(fields)]) + "\n", encoding="utf-8")
        with pytest.raises(GlueDataError, match=rf":{len(lines)}: {layout.columns + 1} tab-separated fields, .*"
                                                rf"have {layout.columns}: a tab inside a sentence"):
            read_examples(TASKS[name], tmp_path, split, layout)


def test_crlf_bom_blank_lines_and_a_one_megabyte_line(tmp_path: Path) -> None:
    long_text = "word " * 200_000  # 1 MB
    raw = "\ufeffsentence\tlabel\r\ngood\t1\r\n\r\n" + long_text + "\t0\r\n"
    examples = read_sst_dev(sst_dev(tmp_path, raw.encode("utf-8")))
    assert [ex.label for ex in examples] == ["1", "0"]
    assert examples[0].text_a == "good" and examples[1].text_a == long_text


# ----------------------------------------------------------------------------- property-based

field_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r\x00\ufeff"), max_size=40
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(field_text, field_text, st.sampled_from(["entailment", "not_entailment"])),
                     min_size=1, max_size=8))
def test_reader_round_trips_any_text_without_tabs_or_newlines(tmp_path: Path, rows) -> None:
    rows = [(a, b, y) for a, b, y in rows]
    write(tmp_path / "train.tsv", [["index", "sentence1", "sentence2", "label"]]
          + [[str(i), a, b, y] for i, (a, b, y) in enumerate(rows)])
    examples = get_task("rte").train_examples(tmp_path)
    assert [(ex.text_a, ex.text_b, ex.label) for ex in examples] == rows


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.lists(st.sampled_from(
    ["\t", "\n", "\r\n", '"', "0", "1", "entailment", "x y", "\x00", "\ufeff", "é"]), max_size=40
).map(lambda parts: "".join(parts).encode("utf-8")))
def test_reader_never_crashes_on_arbitrary_bytes(tmp_path: Path, raw: bytes) -> None:
    """Any file either reads into valid examples or fails with GlueDataError — nothing else."""
    (tmp_path / "train.tsv").write_bytes(b"index\tsentence1\tsentence2\tlabel\n" + raw)
    try:
        examples = get_task("rte").train_examples(tmp_path)
    except GlueDataError as exc:
        assert str(tmp_path / "train.tsv") in str(exc) and "\n" not in str(exc)
        return
    assert examples and all(ex.label in ("entailment", "not_entailment") for ex in examples)


# ----------------------------------------------------------------------------- features


class WhitespaceTokenizer:
    def __init__(self, words: list[str]) -> None:
        self.vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}

    def tokenize(self, text: str) -> list[str]:
        return [w if w in self.vocab else "[UNK]" for w in text.lower().split()]

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.vocab[t] for t in tokens]


def test_features_pair_layout_segments_padding() -> None:
    tok = WhitespaceTokenizer(list(string.ascii_lowercase))
    ex = InputExample("dev-0", "0", "a b c", "d e", "1")
    f = convert_examples_to_features([ex], tok, 10, ("0", "1"))
    v = tok.vocab
    assert f.input_ids[0].tolist() == [v["[CLS]"], v["a"], v["b"], v["c"], v["[SEP]"], v["d"], v["e"], v["[SEP]"], 0, 0]
    assert f.input_mask[0].tolist() == [1] * 8 + [0, 0]
    assert f.segment_ids[0].tolist() == [0] * 5 + [1] * 3 + [0, 0]
    assert f.label_ids.tolist() == [1] and f.label_ids.dtype == np.int64


def test_features_truncate_longest_first_single_and_regression() -> None:
    tok = WhitespaceTokenizer(list(string.ascii_lowercase))
    long_a = " ".join("abcdefghij")
    f = convert_examples_to_features([InputExample("t-0", "0", long_a, "x y", None)], tok, 8, ("0", "1"))
    ids = f.input_ids[0].tolist()
    assert ids == [tok.vocab[t] for t in ["[CLS]", "a", "b", "c", "[SEP]", "x", "y", "[SEP]"]]
    assert f.label_ids.tolist() == [-1]  # no label (test split)
    f = convert_examples_to_features([InputExample("t-0", "0", long_a, None, "2.5")], tok, 6, None)
    assert f.input_ids[0].tolist() == [tok.vocab[t] for t in ["[CLS]", "a", "b", "c", "d", "[SEP]"]]
    assert f.segment_ids[0].sum() == 0 and f.input_mask[0].sum() == 6
    assert f.label_ids.dtype == np.float32 and f.label_ids.tolist() == [2.5]
    with pytest.raises(ValueError, match="--max_seq_length 2 is too small"):
        convert_examples_to_features([], tok, 2, None)


def test_empty_second_sentence_is_a_single_sentence_as_in_nvidia_bert() -> None:
    # NVIDIA / Google BERT test `if example.text_b:` for the length budget and `if tokens_b:` for
    # the second segment. QQP has rows whose second question is empty.
    tok = WhitespaceTokenizer(list(string.ascii_lowercase))
    long_a = " ".join("abcdefghij")
    f = convert_examples_to_features([InputExample("t-0", "0", long_a, "", None),
                                      InputExample("t-1", "1", long_a, "  ", None)], tok, 8, ("0", "1"))
    v = tok.vocab
    assert f.input_ids[0].tolist() == [v[t] for t in ["[CLS]", "a", "b", "c", "d", "e", "f", "[SEP]"]]
    # Text that tokenizes to nothing keeps the pair budget (one [SEP] less used) but gets no segment B.
    assert f.input_ids[1].tolist() == [v[t] for t in ["[CLS]", "a", "b", "c", "d", "e", "[SEP]"]] + [0]
    assert f.segment_ids.sum() == 0 and f.input_mask.sum(axis=1).tolist() == [8, 7]


@given(st.integers(0, 30), st.integers(0, 30), st.integers(0, 40))
def test_truncate_pair_fits_and_keeps_the_balance(len_a: int, len_b: int, budget: int) -> None:
    a, b = list(range(len_a)), list(range(len_b))
    truncate_pair(a, b, budget)
    assert len(a) + len(b) <= budget or (len_a + len_b <= budget)
    assert a == list(range(len(a))) and b == list(range(len(b)))  # only the ends are dropped
    if len_a + len_b > budget:
        assert len(a) + len(b) == budget
        assert abs(len(a) - len(b)) <= 1 or min(len(a), len(b)) == min(len_a, len_b)


# ----------------------------------------------------------------------------- submissions


def test_submission_format_and_server_label_names() -> None:
    mnli = get_task("mnli")
    ax = mnli.test[2]
    assert [format_prediction(mnli, ax, i) for i in range(3)] == ["contradiction", "entailment", "neutral"]
    sts = get_task("sts-b")
    assert [format_prediction(sts, sts.test[0], x) for x in (-0.2, 2.34567, 7.0)] == ["0.000", "2.346", "5.000"]
    qnli = get_task("qnli")
    assert format_prediction(qnli, qnli.test[0], 1) == "not_entailment"
    text = submission_text(["0", "1"], ["entailment", "neutral"])
    assert text == "index\tprediction\n0\tentailment\n1\tneutral\n"
    assert {t.test[0].server_file for t in TASKS.values()} == {
        "CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "QNLI.tsv", "RTE.tsv", "WNLI.tsv"}
