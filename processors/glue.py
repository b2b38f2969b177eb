"""GLUE readers, feature conversion and GLUE-server submission files.

Every task reads the folder layout the official GLUE download unpacks (`glue_data/<TASK>/train.tsv`,
`dev.tsv`, `test.tsv`; MNLI's `dev_matched.tsv`, `dev_mismatched.tsv`, `test_matched.tsv`,
`test_mismatched.tsv`; the AX diagnostic in `glue_data/diagnostic/diagnostic.tsv`).

The files are tab-separated text without CSV quoting: a `"` is part of the sentence, never a field
delimiter (reading them with CSV quoting glues rows together at the first unbalanced quote). So a
row is split on tabs and nothing else. Every official file has a fixed column count (MNLI's dev
files carry five annotator labels, the gold label is always the last column), so a row with more
columns holds a tab inside a sentence and a row with fewer is broken: both are errors naming the
file and line, except short rows in QQP's train file, whose official copy has a few rows broken by
newlines inside questions: those are skipped and counted. Lines end in LF or CRLF; a lone CR (old
Mac line endings) is refused rather than guessed at.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

logger = logging.getLogger(__name__)


class GlueDataError(ValueError):
    """A GLUE file the readers cannot use; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class InputExample:
    guid: str  # unique within a task: "<split>-<index>"
    index: str  # the row's id as the GLUE server expects it back (test files' index column)
    text_a: str
    text_b: str | None = None
    label: str | None = None  # None in test files


@dataclass(frozen=True)
class TsvLayout:
    """Where one split's file lives and which columns a task reads from it (0-based, -1 = last)."""

    filenames: tuple[str, ...]  # relative to the task folder; the first that exists is read
    columns: int  # fields in every row of the official file: more means a tab inside a sentence
    text_a: int
    text_b: int | None = None
    label: int | None = None
    index: int | None = None  # None: the running row number is the index
    header: bool = True
    skip_short_rows: bool = False  # tolerate the official file's known broken rows (QQP train)

    @property
    def is_test(self) -> bool:
        """A test file: no labels, and its index column is what the GLUE server matches predictions by."""
        return self.label is None and self.index is not None


@dataclass(frozen=True)
class EvalSplit:
    name: str  # "dev", "dev_matched", ...
    layout: TsvLayout
    metric_prefix: str = ""  # "" for a task's main dev split, "mm:" for MNLI mismatched


@dataclass(frozen=True)
class TestSplit:
    name: str
    layout: TsvLayout
    server_file: str  # the file name the GLUE server expects, e.g. "MNLI-m.tsv"
    labels: tuple[str, ...] | None = None  # label set when it differs from the task's (AX)


@dataclass(frozen=True)
class GlueTask:
    name: str
    labels: tuple[str, ...] | None  # None: regression (STS-B)
    train: TsvLayout
    dev: tuple[EvalSplit, ...]
    test: tuple[TestSplit, ...]

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def train_examples(self, data_dir: str | Path) -> list[InputExample]:
        return read_examples(self, data_dir, "train", self.train)

    def dev_examples(self, data_dir: str | Path, split: EvalSplit) -> list[InputExample]:
        return read_examples(self, data_dir, split.name, split.layout)

    def test_examples(self, data_dir: str | Path, split: TestSplit) -> list[InputExample]:
        return read_examples(self, data_dir, split.name, split.layout)


def _single(name: str, columns: int, text: int, label: int | None, header: bool = True,
            index: int | None = None) -> TsvLayout:
    return TsvLayout((name,), columns, text_a=text, label=label, header=header, index=index)


def _pair(name: str, columns: int, a: int, b: int, label: int | None, index: int | None = None, **kw) -> TsvLayout:
    return TsvLayout((name,), columns, text_a=a, text_b=b, label=label, index=index, **kw)


_NLI = ("contradiction", "entailment", "neutral")
_BINARY = ("0", "1")
_ENTAIL = ("entailment", "not_entailment")
# QNLI, RTE, WNLI and the AX diagnostic share one layout: index, sentence1, sentence2[, label].
_AX = TestSplit(
    "ax",
    TsvLayout(("diagnostic.tsv", "../diagnostic/diagnostic.tsv"), 3, text_a=1, text_b=2, index=0),
    "AX.tsv",
    labels=_NLI,
)

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        # CoLA train/dev: source, label, original label, sentence; no header. Test: index, sentence.
        GlueTask(
            "cola", _BINARY,
            train=_single("train.tsv", 4, 3, 1, header=False),
            dev=(EvalSplit("dev", _single("dev.tsv", 4, 3, 1, header=False)),),
            test=(TestSplit("test", _single("test.tsv", 2, 1, None, index=0), "CoLA.tsv"),),
        ),
        # SST-2 train/dev: sentence, label. Test: index, sentence.
        GlueTask(
            "sst-2", _BINARY,
            train=_single("train.tsv", 2, 0, 1),
            dev=(EvalSplit("dev", _single("dev.tsv", 2, 0, 1)),),
            test=(TestSplit("test", _single("test.tsv", 2, 1, None, index=0), "SST-2.tsv"),),
        ),
        # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String (test: index instead of Quality).
        GlueTask(
            "mrpc", _BINARY,
            train=_pair("train.tsv", 5, 3, 4, 0),
            dev=(EvalSplit("dev", _pair("dev.tsv", 5, 3, 4, 0)),),
            test=(TestSplit("test", _pair("test.tsv", 5, 3, 4, None, index=0), "MRPC.tsv"),),
        ),
        # STS-B: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score.
        GlueTask(
            "sts-b", None,
            train=_pair("train.tsv", 10, 7, 8, -1, index=0),
            dev=(EvalSplit("dev", _pair("dev.tsv", 10, 7, 8, -1, index=0)),),
            test=(TestSplit("test", _pair("test.tsv", 9, 7, 8, None, index=0), "STS-B.tsv"),),
        ),
        # QQP: id, qid1, qid2, question1, question2, is_duplicate. Test: id, question1, question2.
        GlueTask(
            "qqp", _BINARY,
            train=_pair("train.tsv", 6, 3, 4, 5, skip_short_rows=True, index=0),
            dev=(EvalSplit("dev", _pair("dev.tsv", 6, 3, 4, 5, index=0)),),
            test=(TestSplit("test", _pair("test.tsv", 3, 1, 2, None, index=0), "QQP.tsv"),),
        ),
        # MNLI: index, promptID, pairID, genre, 4 parse columns, sentence1, sentence2, labels...,
        # gold_label last (train has 12 columns, dev 16, test 10).
        GlueTask(
            "mnli", _NLI,
            train=_pair("train.tsv", 12, 8, 9, -1, index=0),
            dev=(
                EvalSplit("dev_matched", _pair("dev_matched.tsv", 16, 8, 9, -1, index=0)),
                EvalSplit("dev_mismatched", _pair("dev_mismatched.tsv", 16, 8, 9, -1, index=0), metric_prefix="mm:"),
            ),
            test=(
                TestSplit("test_matched", _pair("test_matched.tsv", 10, 8, 9, None, index=0), "MNLI-m.tsv"),
                TestSplit("test_mismatched", _pair("test_mismatched.tsv", 10, 8, 9, None, index=0), "MNLI-mm.tsv"),
                _AX,
            ),
        ),
        # QNLI: index, question, sentence, label.
        GlueTask(
            "qnli", _ENTAIL,
            train=_pair("train.tsv", 4, 1, 2, 3, index=0),
            dev=(EvalSplit("dev", _pair("dev.tsv", 4, 1, 2, 3, index=0)),),
            test=(TestSplit("test", _pair("test.tsv", 3, 1, 2, None, index=0), "QNLI.tsv"),),
        ),
        # RTE: index, sentence1, sentence2, label.
        GlueTask(
            "rte", _ENTAIL,
            train=_pair("train.tsv", 4, 1, 2, 3, index=0),
            dev=(EvalSplit("dev", _pair("dev.tsv", 4, 1, 2, 3, index=0)),),
            test=(TestSplit("test", _pair("test.tsv", 3, 1, 2, None, index=0), "RTE.tsv"),),
        ),
        # WNLI: index, sentence1, sentence2, label.
        GlueTask(
            "wnli", _BINARY,
            train=_pair("train.tsv", 4, 1, 2, 3, index=0),
            dev=(EvalSplit("dev", _pair("dev.tsv", 4, 1, 2, 3, index=0)),),
            test=(TestSplit("test", _pair("test.tsv", 3, 1, 2, None, index=0), "WNLI.tsv"),),
        ),
    )
}

_ALIASES = {"sst2": "sst-2", "stsb": "sts-b"}


def get_task(name: str) -> GlueTask:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise GlueDataError(f"unknown --task_name {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key]


# ----------------------------------------------------------------------------- reading


def resolve_file(data_dir: str | Path, layout: TsvLayout) -> Path:
    data_dir = Path(data_dir)
    for name in layout.filenames:
        path = data_dir / name
        if path.is_file():
            return path
    tried = ", ".join(str(data_dir / n) for n in layout.filenames)
    raise GlueDataError(f"GLUE file not found: {tried}; point --data_dir at the task's folder of the GLUE download")


def read_tsv_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, fields) for every non-blank line, split on tabs only.

    Decoding is strict UTF-8 (a leading BOM is dropped); a line that is not UTF-8 or holds NUL
    bytes (a UTF-16 or binary file) is an error naming the file and line.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise GlueDataError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if "\x00" in line:
                raise GlueDataError(
                    f"{path}:{lineno}: contains NUL bytes (a UTF-16 or binary file?); re-save it as UTF-8 text"
                )
            line = line.removesuffix("\n").removesuffix("\r")
            if "\r" in line:
                raise GlueDataError(
                    f"{path}:{lineno}: carriage return inside a line (CR-only line endings?); "
                    f"convert the file to LF line endings (e.g. mac2unix)"
                )
            if line.strip():
                yield lineno, line.split("\t")


def read_examples(task: GlueTask, data_dir: str | Path, split: str, layout: TsvLayout) -> list[InputExample]:
    """Read one split of `task` into examples, validating every row, label and test index."""
    path = resolve_file(data_dir, layout)
    examples: list[InputExample] = []
    skipped: list[int] = []
    index_lines: dict[str, int] = {}
    rows = read_tsv_rows(path)
    if layout.header:
        next(rows, None)
    for lineno, fields in rows:
        if len(fields) < layout.columns and layout.skip_short_rows:
            skipped.append(lineno)
            continue
        _check_columns(task, split, layout, len(fields), path, lineno)
        index = fields[layout.index] if layout.index is not None else str(len(examples))
        if layout.is_test:
            _check_test_index(index, index_lines, path, lineno)
        label = None
        if layout.label is not None:
            label = _check_label(task, fields[layout.label], path, lineno)
        examples.append(InputExample(
            guid=f"{split}-{index}",
            index=index,
            text_a=fields[layout.text_a],
            text_b=fields[layout.text_b] if layout.text_b is not None else None,
            label=label,
        ))
    if skipped:
        logger.warning("%s: skipped %d row(s) with missing columns (lines %s)", path, len(skipped),
                       ", ".join(map(str, skipped[:10])) + (" ..." if len(skipped) > 10 else ""))
    if not examples:
        raise GlueDataError(f"{path}: no examples; the file is empty or holds only a header: "
                            f"use the task's file from the GLUE download")
    return examples


def read_run_examples(task: GlueTask, data_dir: str | Path, train: bool, dev: bool,
                      test: bool) -> dict[str, list[InputExample]]:
    """Every split a run will read (split name -> examples), all read and validated now.

    A bad row in a dev or test file must fail before fine-tuning, not after it. The AX
    diagnostic is optional: when it is absent it is left out with a warning.
    """
    splits: list[tuple[str, TsvLayout]] = [("train", task.train)] if train else []
    if dev:
        splits += [(s.name, s.layout) for s in task.dev]
    if test:
        splits += [(s.name, s.layout) for s in task.test]
    examples: dict[str, list[InputExample]] = {}
    for name, layout in splits:
        if name == _AX.name:
            try:
                resolve_file(data_dir, layout)
            except GlueDataError as exc:
                logger.warning("AX.tsv not written: %s", exc)
                continue
        examples[name] = read_examples(task, data_dir, name, layout)
    return examples


def _check_columns(task: GlueTask, split: str, layout: TsvLayout, count: int, path: Path, lineno: int) -> None:
    if count < layout.columns:
        raise GlueDataError(
            f"{path}:{lineno}: {count} tab-separated field(s), {task.name} {split} rows need at least "
            f"{layout.columns}; fix or remove the row (fields are split on tabs only, quotes are literal)"
        )
    if count > layout.columns:
        raise GlueDataError(
            f"{path}:{lineno}: {count} tab-separated fields, {task.name} {split} rows have {layout.columns}: "
            f"a tab inside a sentence splits it in two; replace the tab with a space"
        )


def _check_test_index(index: str, seen: dict[str, int], path: Path, lineno: int) -> None:
    # The GLUE server matches predictions to rows by this column, so it must name one row each.
    if not (index.isascii() and index.isdigit()):
        raise GlueDataError(f"{path}:{lineno}: test index {index!r} is not a non-negative integer; "
                            f"use the test file of the GLUE download")
    if index in seen:
        raise GlueDataError(f"{path}:{lineno}: test index {index!r} repeats line {seen[index]}; "
                            f"every test row needs its own index (was the file concatenated?)")
    seen[index] = lineno


def _check_label(task: GlueTask, value: str, path: Path, lineno: int) -> str:
    value = value.strip()
    if task.labels is None:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise GlueDataError(f"{path}:{lineno}: {task.name} score {value!r} is not a finite number; fix the row")
        if not 0.0 <= score <= 5.0:
            raise GlueDataError(f"{path}:{lineno}: {task.name} score {value} is outside [0, 5]; "
                                f"STS-B similarity scores run from 0 to 5, fix the row")
        return value
    if value not in task.labels:
        raise GlueDataError(
            f"{path}:{lineno}: label {value!r} is not a {task.name} label (expected one of "
            f"{', '.join(task.labels)}); fix the row or check --task_name"
        )
    return value


# ----------------------------------------------------------------------------- features


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[str]: ...
    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]: ...


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts: the tokenizer's bulk path (`encode_batch`, same ids) when it has one."""
    if hasattr(tokenizer, "encode_batch"):
        return [list(ids) for ids in tokenizer.encode_batch(texts)]
    return [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) for text in texts]


@dataclass
class Features:
    """Padded model inputs for a list of examples, as int64 / float32 arrays of `len(examples)` rows."""

    input_ids: np.ndarray
    input_mask: np.ndarray
    segment_ids: np.ndarray
    label_ids: np.ndarray  # int64 class index, float32 score (regression), or -1 / nan without labels

    def __len__(self) -> int:
        return len(self.input_ids)


def truncate_pair(tokens_a: list, tokens_b: list, max_length: int) -> None:
    """Drop tokens from the end of the longer sequence until both fit (ties drop from B)."""
    while len(tokens_a) + len(tokens_b) > max_length:
        if len(tokens_a) > len(tokens_b):
            tokens_a.pop()
        else:
            tokens_b.pop()


def convert_examples_to_features(examples: Sequence[InputExample], tokenizer: Tokenizer, max_seq_length: int,
                                 labels: Sequence[str] | None) -> Features:
    """`[CLS] A [SEP] (B [SEP])`, segment ids 0 / 1, zero padding to `max_seq_length`; an empty B is left out.

    `labels` is the task's label list (None for regression). Examples without a label get -1 (nan
    for regression), so test sets convert the same way.
    """
    if max_seq_length < 3:
        raise ValueError(f"--max_seq_length {max_seq_length} is too small: it must leave room for [CLS], [SEP] and text")
    n = len(examples)
    input_ids = np.zeros((n, max_seq_length), dtype=np.int64)
    input_mask = np.zeros((n, max_seq_length), dtype=np.int64)
    segment_ids = np.zeros((n, max_seq_length), dtype=np.int64)
    if labels is None:
        label_ids = np.full(n, np.nan, dtype=np.float32)
    else:
        label_ids = np.full(n, -1, dtype=np.int64)
        label_index = {label: i for i, label in enumerate(labels)}
    cls_id, sep_id = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    ids_a = encode_texts(tokenizer, [ex.text_a for ex in examples])
    # As NVIDIA / Google BERT: an empty text_b (a few QQP rows) is a single sentence, and a text_b
    # that tokenizes to nothing keeps the pair budget but adds no second segment.
    pair_rows = [row for row, ex in enumerate(examples) if ex.text_b]
    ids_b = dict(zip(pair_rows, encode_texts(tokenizer, [examples[row].text_b for row in pair_rows])))
    for row, example in enumerate(examples):
        tokens_a, tokens_b = ids_a[row], ids_b.get(row)
        if tokens_b is not None:
            truncate_pair(tokens_a, tokens_b, max_seq_length - 3)
        else:
            del tokens_a[max_seq_length - 2:]
        ids = [cls_id, *tokens_a, sep_id]
        len_a = len(ids)
        if tokens_b:
            ids += [*tokens_b, sep_id]
        input_ids[row, : len(ids)] = ids
        input_mask[row, : len(ids)] = 1
        segment_ids[row, len_a: len(ids)] = 1
        if example.label is not None:
            label_ids[row] = float(example.label) if labels is None else label_index[example.label]
    return Features(input_ids, input_mask, segment_ids, label_ids)


# ----------------------------------------------------------------------------- submissions


def format_prediction(task: GlueTask, split: TestSplit, prediction: float | int) -> str:
    """One prediction as the GLUE server wants it: a label name, or an STS-B score in [0, 5]."""
    if task.is_regression:
        return f"{min(max(float(prediction), 0.0), 5.0):.3f}"
    return (split.labels or task.labels)[int(prediction)]


def submission_text(indices: Sequence[str], predictions: Sequence[str]) -> str:
    """The GLUE server's file format: an `index<TAB>prediction` header, then one row per example."""
    lines = ["index\tprediction", *(f"{i}\t{p}" for i, p in zip(indices, predictions, strict=True))]
    return "\n".join(lines) + "\n"
