"""Articles (one per line) -> balanced training / test shards of one sentence per line.

Sentence splitting uses NLTK's punkt (`sent_tokenize`) when NLTK and its punkt data are installed,
otherwise `split_sentences_regex`: a boundary is a `.`, `!` or `?` (plus closing quotes or
brackets) followed by whitespace and a capital letter, digit, quote or bracket, except after a
known abbreviation (Mr., e.g., etc., ...) or a single-letter initial. It is fast and good enough for
pretraining on encyclopaedic text; install nltk for punkt's better handling of rarer cases.

Memory and time stay bounded, unlike the upstream sharder that held every sentence in memory and
could loop forever while balancing (NVIDIA/DeepLearningExamples#489, #1083):
  pass 1 streams the articles, splits them (in `n_processes` workers) into a temporary file and
         keeps only each article's size and its training/test draw;
  balance assigns articles, largest first, to the currently smallest shard (a heap; one step per
         article, so it always ends; shards end within one article of each other);
  pass 2 streams the temporary file into the shard files.
Every shard is written under a temporary name and renamed when complete; the sentence file a killed
run left is removed when the next one starts.
"""
from __future__ import annotations

import heapq
import logging
import os
import random
import re
import resource
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from atomic_io import remove_stale_temps
from data.parallel import ordered_map

logger = logging.getLogger(__name__)

ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al fig figs eq no nos vol vols ch sec approx
ca inc ltd co corp bros dept univ jan feb mar apr jun jul aug sep sept oct nov dec gen col capt lt
sgt rev hon gov sen rep pres u.s u.k a.m p.m ph.d op cit ibid viz resp
""".split())
_BOUNDARY = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_LAST_WORD = re.compile(r"(\S+)[.!?][\"'”’)\]]*\s*$")


def split_sentences_regex(text: str) -> list[str]:
    """Split a paragraph into sentences with the rule in the module docstring."""
    text = " ".join(text.split())
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        word = _LAST_WORD.search(text, start, match.end())
        if word:
            last = word.group(1).lstrip("(\"'“‘[").lower()
            if last in ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                continue
        sentences.append(text[start:match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def nltk_splitter() -> Callable[[str], list[str]] | None:
    """NLTK's punkt `sent_tokenize`, or None when NLTK or its punkt data are not installed."""
    try:
        import nltk
        nltk.tokenize.sent_tokenize("A test. Another one.")
    except (ImportError, LookupError):
        return None
    return nltk.tokenize.sent_tokenize


def get_splitter(method: str, warn: bool = True) -> Callable[[str], list[str]]:
    """`nltk` (falls back to the regex splitter, with a notice, when punkt is unavailable) or `regex`."""
    if method not in ("nltk", "regex"):
        raise ValueError(f"--segmentation_method must be nltk or regex, got {method!r}")
    if method == "nltk":
        splitter = nltk_splitter()
        if splitter is not None:
            return splitter
        if warn:
            logger.warning("NLTK punkt is not installed (pip install nltk; python -m nltk.downloader punkt): "
                           "splitting sentences with the regex splitter")
    return split_sentences_regex


# ----------------------------------------------------------------------------- pass 1 workers

_split: Callable[[str], list[str]] | None = None  # per process, set by _init_splitter


def _init_splitter(method: str) -> None:
    global _split
    _split = get_splitter(method, warn=False)  # the parent already said so


def _split_articles(articles: list[str]) -> list[str]:
    """Each article as its sentences joined by tabs (tabs inside text become spaces)."""
    out = []
    for article in articles:
        sentences = [" ".join(s.split()) for s in _split(article.replace("\t", " "))]
        out.append("\t".join(s for s in sentences if s))
    return out


def read_articles(paths: Sequence[str]) -> Iterator[str]:
    """Non-blank lines of the formatted files: one article each."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    yield line.strip()


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- balancing


def balance(sizes: Sequence[int], n_shards: int) -> list[int]:
    """Shard of each item: largest first onto the lightest shard (ties: lowest shard id)."""
    assignment = [0] * len(sizes)
    heap = [(0, shard) for shard in range(n_shards)]
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, shard = heapq.heappop(heap)
        assignment[item] = shard
        heapq.heappush(heap, (load + sizes[item], shard))
    return assignment


@dataclass
class ShardingResult:
    training_files: list[str]
    test_files: list[str]
    articles: int
    sentences: int


def shard_name(output_dir: str, dataset: str, split: str, index: int) -> str:
    return os.path.join(output_dir, f"{dataset}_{split}_{index}.txt")


def shard_articles(input_files: Sequence[str], output_dir: str, dataset: str, n_training_shards: int,
                   n_test_shards: int, fraction_test_set: float, segmentation_method: str = "nltk",
                   n_processes: int = 1, seed: int = 12345) -> ShardingResult:
    """Write `<dataset>_training_<i>.txt` / `<dataset>_test_<i>.txt` into output_dir."""
    if n_training_shards < 1 or n_test_shards < 0:
        raise ValueError(f"need n_training_shards >= 1 and n_test_shards >= 0, got "
                         f"{n_training_shards} and {n_test_shards}")
    if not 0.0 <= fraction_test_set < 1.0:
        raise ValueError(f"--fraction_test_set must be in [0, 1), got {fraction_test_set}")
    if fraction_test_set > 0 and n_test_shards == 0:
        raise ValueError("--fraction_test_set > 0 needs --n_test_shards >= 1")
    missing = [p for p in input_files if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"sharding input {missing[0]!r} does not exist: run "
                                f"--action text_formatting first")
    get_splitter(segmentation_method)  # report a fallback once, here
    os.makedirs(output_dir, exist_ok=True)
    # Each killed run leaves its corpus-sized sentence file (named like atomic_io's temporaries).
    remove_stale_temps(os.path.join(output_dir, f"{dataset}_sentences"))
    sentences_path = os.path.join(output_dir, f".{dataset}_sentences.{os.getpid()}.tmp")
    names = {(split, i): shard_name(output_dir, dataset, split, i)
             for split, n in (("training", n_training_shards), ("test", n_test_shards)) for i in range(n)}

    # Pass 1: split sentences into a temporary file; keep each article's size and split draw.
    rng = random.Random(seed)
    sizes: list[int] = []
    is_test: list[bool] = []
    n_sentences = 0
    try:
        with open(sentences_path, "w", encoding="utf-8") as out:
            batches = _batched(read_articles(input_files), 256)
            for split_batch in ordered_map(_split_articles, batches, n_processes, _init_splitter,
                                           (segmentation_method,)):
                for article in split_batch:
                    out.write(article + "\n")
                    sizes.append(len(article))
                    is_test.append(n_test_shards > 0 and rng.random() < fraction_test_set)
                    n_sentences += article.count("\t") + 1 if article else 0
        if not sizes:
            raise ValueError(f"no articles in {', '.join(input_files)}: expected one article per line")

        # Balance each split over its shards.
        shard_of: list[tuple[str, int]] = [("", 0)] * len(sizes)
        for split, n_shards in (("training", n_training_shards), ("test", n_test_shards)):
            members = [i for i in range(len(sizes)) if is_test[i] == (split == "test")]
            for i, shard in zip(members, balance([sizes[i] for i in members], n_shards)):
                shard_of[i] = (split, shard)
            if n_shards and len(members) < n_shards:
                logger.warning("%d %s articles for %d %s shards: %d shards stay empty",
                               len(members), split, n_shards, split, n_shards - len(members))

        # Pass 2: stream the sentences into the shard files.
        _ensure_open_files(len(names) + 8)
        handles = {key: open(name + ".tmp", "w", encoding="utf-8") for key, name in names.items()}
        try:
            with open(sentences_path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    article = line.rstrip("\n")
                    if article:
                        handles[shard_of[i]].write(article.replace("\t", "\n") + "\n\n")
        finally:
            for handle in handles.values():
                handle.close()
        for name in names.values():
            os.replace(name + ".tmp", name)
    finally:
        for path in [sentences_path] + [name + ".tmp" for name in names.values()]:
            if os.path.exists(path):
                os.unlink(path)
    return ShardingResult([names[("training", i)] for i in range(n_training_shards)],
                          [names[("test", i)] for i in range(n_test_shards)], len(sizes), n_sentences)


def _ensure_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise OSError(f"{needed} shard files must be open at once but the open-file limit is {hard}: "
                          f"use fewer shards or raise `ulimit -n`")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
