"""A demo corpus, vocab and GLUE-style task built from English that ships with Python (no download).

Text: the language-reference topics of `pydoc_data.topics` (one document per topic) and the
docstrings of standard-library modules (one document per module: the module's docstring and those
of its public classes, functions and methods). Code samples, grammar rules, tables and headings
are dropped; paragraphs are split into sentences (`data.sharding.split_sentences_regex`).

Outputs in --out:
  corpus.txt                one sentence per line, a blank line between documents
  vocab.txt                 bert-base-uncased (vocab/vocab of this repo) when present, else
                            (or with --vocab train) a WordPiece vocab trained on corpus.txt
                            by a deterministic BPE-style WordPiece trainer (`train_wordpiece`)
  glue/SST-2/{train,dev,test}.tsv
                            a single-sentence task in SST-2's layout: label 1 when the sentence
                            comes from the language reference, 0 when from a library docstring
  glue/CoLA/{train,dev,test}.tsv
                            a single-sentence task in CoLA's layout: label 1 for a sentence as
                            written, 0 for a sentence of the same text with its words shuffled

The text depends on the Python version; for one Python install every output is deterministic.
"""
from __future__ import annotations

import argparse
import collections
import heapq
import importlib
import importlib.util
import inspect
import os
import pkgutil
import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make the flat project layout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atomic_io import atomic_path, atomic_text_writer  # noqa: E402
from data.sharding import split_sentences_regex  # noqa: E402

REPO_VOCAB = Path(__file__).resolve().parent.parent / "vocab" / "vocab"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: shards pad with id 0
# Modules that act on import (open windows or browsers, print), are platform-only or deprecated.
SKIP_MODULES = frozenset("""antigravity this idlelib tkinter turtle turtledemo lib2to3 msilib winreg
winsound msvcrt _winapi nt ntpath pydoc_data ensurepip venv xxsubtype xxlimited test unittest
distutils sre_compile sre_constants sre_parse asynchat asyncore imp smtpd""".split())

_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |%|#|@|\||\+[-=]|[-=*~^]{3,}$)")
_BULLET = re.compile(r"^\s*(?:[*\-•]|\d+[.)]|[a-z][.)])\s+")
_GOOD_SENTENCE = re.compile(r"^[A-Z\"'(]")


# ----------------------------------------------------------------------------- text


def paragraphs(text: str) -> Iterator[str]:
    """Prose paragraphs of reST-ish text: blocks that are not code, grammar, tables or headings."""
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        first_indent = len(lines[0]) - len(lines[0].lstrip())
        if first_indent >= 3 and not _BULLET.match(lines[0]):
            continue  # an indented literal block (code, grammar)
        if any(_CODE_LINE.match(line) or "::=" in line for line in lines):
            continue
        if len(lines) >= 2 and re.fullmatch(r"[*=\-~^#]+", lines[-1].strip()):
            continue  # a heading and its underline
        yield _BULLET.sub("", " ".join(line.strip() for line in lines))


def prose_sentences(text: str) -> list[str]:
    """Sentences of real prose: 4-60 words, mostly letters, starting like a sentence."""
    out = []
    for paragraph in paragraphs(text):
        for sentence in split_sentences_regex(paragraph):
            words = sentence.split()
            letters = sum(c.isalpha() or c == " " for c in sentence)
            if (4 <= len(words) <= 60 and letters >= 0.8 * len(sentence) and _GOOD_SENTENCE.match(sentence)
                    and sentence[-1] in ".!?:"):
                out.append(sentence)
    return out


def reference_documents() -> list[list[str]]:
    """One document per topic of the Python language reference."""
    from pydoc_data.topics import topics
    docs = [prose_sentences(topics[name]) for name in sorted(topics)]
    return [d for d in docs if len(d) >= 2]


def library_module_names() -> list[str]:
    """Public top-level standard-library modules and the public submodules of its packages."""
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        names.append(name)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            names.extend(f"{name}.{sub.name}" for sub in sorted(
                pkgutil.iter_modules(spec.submodule_search_locations), key=lambda m: m.name)
                if not sub.name.startswith("_") and sub.name not in SKIP_MODULES and "test" not in sub.name)
    return names


def _docstrings(module) -> Iterator[str]:
    yield inspect.getdoc(module) or ""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isfunction(member):
                    yield inspect.getdoc(member) or ""


def library_documents() -> list[list[str]]:
    """One document per importable standard-library module with enough prose in its docstrings."""
    docs = []
    for name in library_module_names():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules are simply skipped
            continue
        seen: set[str] = set()
        sentences = []
        for doc in _docstrings(module):
            for sentence in prose_sentences(doc):
                if sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
        if len(sentences) >= 2:
            docs.append(sentences)
    return docs


def write_corpus(documents: list[list[str]], path: str) -> None:
    with atomic_text_writer(path) as f:
        f.write("\n\n".join("\n".join(doc) for doc in documents) + "\n")


# ----------------------------------------------------------------------------- vocab


def train_wordpiece(word_counts: dict[str, int], vocab_size: int, min_frequency: int = 2,
                    limit_alphabet: int = 1000) -> list[str]:
    """WordPiece vocab by BPE-style merges (how `tokenizers`' trainer builds one): start from the
    characters (word-initial and "##" forms), then repeatedly add the merge of the most frequent
    adjacent pair. Ties go to the smallest pair, so the result is the same on every run (the
    `tokenizers` trainer breaks ties in hash order and changes run to run)."""
    char_counts: collections.Counter = collections.Counter()
    for word, count in word_counts.items():
        for ch in word:
            char_counts[ch] += count
    alphabet = set(sorted(char_counts, key=lambda ch: (-char_counts[ch], ch))[:limit_alphabet])
    words, counts = [], []
    for word, count in sorted(word_counts.items()):
        if all(ch in alphabet for ch in word):  # other words become [UNK] anyway
            words.append([word[0]] + ["##" + ch for ch in word[1:]])
            counts.append(count)
    symbol_counts: collections.Counter = collections.Counter()
    for syms, count in zip(words, counts):
        for sym in syms:
            symbol_counts[sym] += count
    vocab = SPECIAL_TOKENS + sorted(symbol_counts, key=lambda t: (-symbol_counts[t], t))
    known = set(vocab)

    pair_counts: collections.Counter = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for i, (syms, count) in enumerate(zip(words, counts)):
        for pair in zip(syms, syms[1:]):
            pair_counts[pair] += count
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry: the count changed after it was pushed
        if -neg_count < min_frequency:
            break
        merged = pair[0] + pair[1][2:]
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        changed = set()
        for i in sorted(where.pop(pair)):
            syms, count = words[i], counts[i]
            for old in zip(syms, syms[1:]):
                pair_counts[old] -= count
                changed.add(old)
            new, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and (syms[j], syms[j + 1]) == pair:
                    new.append(merged)
                    j += 2
                else:
                    new.append(syms[j])
                    j += 1
            words[i] = new
            for fresh in zip(new, new[1:]):
                pair_counts[fresh] += count
                where[fresh].add(i)
                changed.add(fresh)
        pair_counts.pop(pair, None)
        changed.discard(pair)
        for p in sorted(changed):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return vocab


def train_vocab(corpus_file: str, vocab_file: str, vocab_size: int = 8000, lower_case: bool = True) -> None:
    """Train a WordPiece vocab ([PAD]=0 ... [MASK]=4) on the corpus, split into words by the
    project's BasicTokenizer (the same cleaning, lower-casing and punctuation split as at use)."""
    from tokenization import BasicTokenizer

    basic = BasicTokenizer(do_lower_case=lower_case)
    word_counts: collections.Counter = collections.Counter()
    with open(corpus_file, encoding="utf-8") as f:
        for line in f:
            word_counts.update(basic.tokenize(line))
    vocab = train_wordpiece(word_counts, vocab_size)
    with atomic_text_writer(vocab_file) as f:
        f.write("".join(token + "\n" for token in vocab))


def prepare_vocab(corpus_file: str, vocab_file: str, choice: str, vocab_size: int) -> str:
    """`auto`: the repo's bert-base-uncased vocab when present, else train; `train`; or a path."""
    if choice == "auto":
        choice = str(REPO_VOCAB) if REPO_VOCAB.is_file() else "train"
    if choice == "train":
        train_vocab(corpus_file, vocab_file, vocab_size)
        return "trained"
    if not os.path.isfile(choice):
        raise FileNotFoundError(f"--vocab {choice!r} is not a file: use auto, train or a vocab.txt path")
    with atomic_path(vocab_file) as tmp:  # bertPrep takes an existing vocab.txt as complete
        shutil.copyfile(choice, tmp)
    return choice


# ----------------------------------------------------------------------------- GLUE-style task


def write_classification_task(reference: list[list[str]], library: list[list[str]], out_dir: str,
                              seed: int = 0, n_train: int = 4000, n_dev: int = 500, n_test: int = 500) -> dict:
    """SST-2-layout task: is the sentence from the language reference (1) or a library docstring (0)?
    Balanced classes; a sentence found in both sources is left out."""
    ref = {s for d in reference for s in d}
    lib = {s for d in library for s in d}
    ref, lib = sorted(ref - lib), sorted(lib - ref)
    rng = random.Random(seed)
    rng.shuffle(ref)
    rng.shuffle(lib)
    per_class = min(len(ref), len(lib), (n_train + n_dev + n_test) // 2)
    examples = [(s, 1) for s in ref[:per_class]] + [(s, 0) for s in lib[:per_class]]
    rng.shuffle(examples)
    total = len(examples)
    n_dev = min(n_dev, total // 8)
    n_test = min(n_test, total // 8)
    dev, test, train = examples[:n_dev], examples[n_dev:n_dev + n_test], examples[n_dev + n_test:]
    os.makedirs(out_dir, exist_ok=True)
    clean = lambda s: " ".join(s.replace("\t", " ").split())  # noqa: E731
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        with atomic_text_writer(os.path.join(out_dir, name)) as f:
            f.write("sentence\tlabel\n" + "".join(f"{clean(s)}\t{y}\n" for s, y in rows))
    with atomic_text_writer(os.path.join(out_dir, "test.tsv")) as f:
        f.write("index\tsentence\n" + "".join(f"{i}\t{clean(s)}\n" for i, (s, _) in enumerate(test)))
    return {"train": len(train), "dev": len(dev), "test": len(test)}


def write_word_order_task(documents: list[list[str]], out_dir: str, seed: int = 0, n_train: int = 4000,
                          n_dev: int = 500, n_test: int = 500) -> dict:
    """CoLA-layout task: is the sentence as written (1) or are its words shuffled (0)? Both classes
    hold the same words, so only their order tells: a task for masks that keep or drop neighbours.
    Each sentence (of six words or more) appears once, either kept or shuffled."""
    rng = random.Random(seed)
    sentences = sorted({s for doc in documents for s in doc if len(s.split()) >= 6})
    rng.shuffle(sentences)
    examples = []
    for i, sentence in enumerate(sentences[:n_train + n_dev + n_test]):
        words = sentence.split()
        if i % 2:  # the first and last words stay: a capital or a full stop must not give it away
            middle = words[1:-1]
            while middle == words[1:-1]:
                rng.shuffle(middle)
            words = [words[0], *middle, words[-1]]
        examples.append((" ".join(words), 0 if i % 2 else 1))
    rng.shuffle(examples)
    n_dev, n_test = min(n_dev, len(examples) // 8), min(n_test, len(examples) // 8)
    dev, test, train = examples[:n_dev], examples[n_dev:n_dev + n_test], examples[n_dev + n_test:]
    os.makedirs(out_dir, exist_ok=True)
    clean = lambda s: " ".join(s.replace("\t", " ").split())  # noqa: E731
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):  # CoLA: source, label, original label, text
        with atomic_text_writer(os.path.join(out_dir, name)) as f:
            f.write("".join(f"demo\t{y}\t{'' if y else '*'}\t{clean(s)}\n" for s, y in rows))
    with atomic_text_writer(os.path.join(out_dir, "test.tsv")) as f:
        f.write("index\tsentence\n" + "".join(f"{i}\t{clean(s)}\n" for i, (s, _) in enumerate(test)))
    return {"train": len(train), "dev": len(dev), "test": len(test)}


# ----------------------------------------------------------------------------- CLI


def build_demo(out: str, vocab: str = "auto", vocab_size: int = 8000, seed: int = 0) -> dict:
    os.makedirs(out, exist_ok=True)
    reference, library = reference_documents(), library_documents()
    corpus = os.path.join(out, "corpus.txt")
    write_corpus(reference + library, corpus)
    vocab_source = prepare_vocab(corpus, os.path.join(out, "vocab.txt"), vocab, vocab_size)
    task = write_classification_task(reference, library, os.path.join(out, "glue", "SST-2"), seed)
    order_task = write_word_order_task(reference + library, os.path.join(out, "glue", "CoLA"), seed)
    return {"documents": len(reference) + len(library), "sentences": sum(map(len, reference + library)),
            "corpus_bytes": os.path.getsize(corpus), "vocab": vocab_source, "task": task,
            "order_task": order_task}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build the no-download demo corpus, vocab and GLUE-style task.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocab", default="auto",
                   help="auto (repo bert-base-uncased vocab if present, else train), train, or a vocab path")
    p.add_argument("--vocab_size", type=int, default=8000, help="size of a trained vocab")
    p.add_argument("--seed", type=int, default=0, help="seed of the task's sampling and splits")
    args = p.parse_args(argv)
    summary = build_demo(args.out, args.vocab, args.vocab_size, args.seed)
    print(f"demo corpus: {summary['documents']} documents, {summary['sentences']} sentences, "
          f"{summary['corpus_bytes'] / 1e6:.2f} MB; vocab: {summary['vocab']}; "
          f"task SST-2 train/dev/test = {summary['task']['train']}/{summary['task']['dev']}/{summary['task']['test']}")


if __name__ == "__main__":
    main()
