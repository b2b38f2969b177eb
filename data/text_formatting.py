"""Raw corpora -> one article per line (the sharder's input), streamed and written atomically.

- WikiExtractor output (`extracted/<AA..>/wiki_<NN>[.bz2]`, `<doc ...>` blocks): the title line
  and blank lines are dropped and the body lines joined with spaces, one article per line.
- BooksCorpus or any folder of plain-text books: one book (file) per line.
- Plain text with blank lines between documents: one document per line.
"""
from __future__ import annotations

import bz2
import glob
import os
from typing import IO, Iterable, Iterator

from atomic_io import atomic_text_writer


def _open_text(path: str) -> IO[str]:
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def wikiextractor_files(extracted_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(extracted_dir, "**", "wiki_*"), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(
            f"no WikiExtractor output (wiki_*) under {extracted_dir!r}: run WikiExtractor first "
            f"(pip install wikiextractor==3.0.6; python -m wikiextractor.WikiExtractor <dump.xml> -b 100M "
            f"-o {extracted_dir})")
    return files


def wiki_articles(paths: Iterable[str]) -> Iterator[str]:
    """Article bodies from WikiExtractor files: title dropped, lines joined by spaces."""
    for path in paths:
        with _open_text(path) as f:
            body: list[str] | None = None
            title_seen = False
            for line in f:
                stripped = line.strip()
                if stripped.startswith("<doc ") or stripped == "<doc>":
                    body, title_seen = [], False
                elif stripped == "</doc>":
                    if body:
                        yield " ".join(body)
                    body = None
                elif body is not None and stripped:
                    if title_seen:
                        body.append(stripped)
                    else:
                        title_seen = True  # the first line of a <doc> is its title


def book_articles(paths: Iterable[str]) -> Iterator[str]:
    """Each file as one article: its non-blank lines joined by spaces."""
    for path in paths:
        with _open_text(path) as f:
            text = " ".join(line.strip() for line in f if line.strip())
        if text:
            yield text


def paragraph_articles(paths: Iterable[str]) -> Iterator[str]:
    """Documents separated by blank lines, each as one article."""
    for path in paths:
        doc: list[str] = []
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    doc.append(line.strip())
                elif doc:
                    yield " ".join(doc)
                    doc = []
        if doc:
            yield " ".join(doc)


def write_articles(articles: Iterable[str], output_file: str) -> int:
    """One article per line followed by a blank line (NVIDIA's formatted layout); returns the count.

    With no article nothing is written: an earlier output stays as it was.
    """
    n = 0
    with atomic_text_writer(output_file) as out:
        for article in articles:
            out.write(" ".join(article.split()) + "\n\n")
            n += 1
        if n == 0:  # raised inside the writer, so it drops its temp file instead of replacing the output
            raise ValueError(f"no articles found for {output_file!r}, nothing written: check the input folder "
                             f"or files")
    return n


def format_wikicorpus(extracted_dir: str, output_file: str) -> int:
    return write_articles(wiki_articles(wikiextractor_files(extracted_dir)), output_file)


def format_books(books_dir: str, output_file: str) -> int:
    files = sorted(glob.glob(os.path.join(books_dir, "**", "*.txt"), recursive=True))
    if not files:
        raise FileNotFoundError(
            f"no .txt books under {books_dir!r}: BooksCorpus can no longer be downloaded; put your "
            f"copy (one .txt per book) there, or pass --books_dir")
    return write_articles(book_articles(files), output_file)


def format_plain_text(paths: Iterable[str], output_file: str) -> int:
    return write_articles(paragraph_articles(paths), output_file)
