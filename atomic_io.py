"""Atomic file writes: a file appears under its final name complete or not at all.

Torch-free, so the tokenizer, the downloaders and the data pipeline share it with the training code.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash (or an exception, e.g. disk full) leaves the old file untouched and no partial file
    under the final name. The temporary name is `.<name>.<random>.tmp` (`remove_stale_temps`
    recognises stale ones by it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temps(path: str | os.PathLike, name_pattern: str | None = None) -> list[Path]:
    """Delete the temporary files that killed writes of `path` left beside it; returns them.

    With `name_pattern` (a regular expression), `path` is a folder and the temporaries of every
    file in it whose name matches are deleted (e.g. every `ckpt_<step>.pt` of a run).

    A SIGKILL or power loss skips atomic_path's cleanup, so every interrupted write leaves one
    `.<name>.<random>.tmp` (`<random>` has no dot, so other files' temporaries never match). Call it
    only where no other process is writing there at the same time.
    """
    path = Path(path)
    folder, name = (path, name_pattern) if name_pattern is not None else (path.parent, re.escape(path.name))
    own_temp = re.compile(rf"\.{name}\.[A-Za-z0-9_]+\.tmp")
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if own_temp.fullmatch(p.name) and p.is_file()]
    for temp in stale:
        logger.warning("removing %s, left by an interrupted write", temp)
        temp.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_text_writer(path: str | os.PathLike) -> Iterator[IO[str]]:
    """A UTF-8 text file (newlines written as given) that appears under `path` only once complete."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        yield f


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_text_writer(path) as f:
        f.write(text)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    """A matplotlib figure written as a PNG that appears complete or not at all, then closed
    (pyplot holds every open figure until it is)."""
    import matplotlib.pyplot as plt  # only the plotting scripts need it

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def _same_file(a: Path, b: Path) -> bool:
    # samefile also catches hard links; resolve() covers an output that does not exist yet.
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def refuse_overwriting_inputs(output: str | os.PathLike,
                              inputs: Iterable[tuple[str, str | os.PathLike | None]], flag_name: str) -> None:
    """Raise ValueError when ``output`` is the same file as one of ``inputs`` ((flag, path) pairs);
    a tool writing there would replace what it reads. Call it before writing anything."""
    out = Path(output)
    for input_flag, path in inputs:
        if path is not None and _same_file(out, Path(path)):
            raise ValueError(f"{flag_name} {output} is the same file as {input_flag} {path}: it would be "
                             f"overwritten; choose another {flag_name}")
