"""Download-and-cache helpers (`cached_path`) and safe archive extraction (`safe_extract`).

`cached_path(url_or_path)` returns a local file path:
- a local path is returned as is (a missing one is one clear `FileNotFoundError`);
- an https URL is downloaded once into the cache folder: streamed with a tqdm bar into
  `<name>.partial`, resumed with an HTTP `Range` request after a dropped connection (`If-Range`
  guards against the file changing on the server), retried with exponential back-off, checked
  against an expected SHA-256 when one is given, then renamed into place atomically, with a JSON
  sidecar `<name>.json` recording url, sha256, size and etag;
- an s3://bucket/key URL goes through boto3 when it is installed.

Plain http is refused unless `allow_http=True` (tests on 127.0.0.1 use it). The cache folder is
`$PYTORCH_PRETRAINED_BERT_CACHE`, else `~/.pytorch_pretrained_bert`. A cached file is reused
without touching the network; delete it (or pass `force_download=True`) to fetch it again.

`safe_extract(archive, dest)` unpacks a zip or tar only after checking every member: absolute
paths, `..` components, drive letters, links and special files are refused before anything is
written, so a hostile archive cannot write outside `dest`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin, urlparse

import requests
from tqdm.auto import tqdm

from atomic_io import atomic_path, atomic_write_text

CACHE_ENV = "PYTORCH_PRETRAINED_BERT_CACHE"
CHUNK_SIZE = 1 << 20
# A dropped connection loses the chunk being read, so download in small chunks.
DOWNLOAD_CHUNK_SIZE = 1 << 16
MAX_REDIRECTS = 10
# Extraction limits (safe_extract's defaults): members, unpacked size per archive byte, path length.
MAX_MEMBERS = 100_000
MAX_EXPANSION = 100
MAX_PATH_CHARS = 1024
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class DownloadError(OSError):
    """A download that failed for good (after retries, or with a non-retryable HTTP status)."""


class ChecksumError(ValueError):
    """Downloaded bytes do not match the expected SHA-256; the bad file has been removed."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target folder or is not a plain file/folder."""


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".pytorch_pretrained_bert")


def url_to_filename(url: str) -> str:
    """Cache file name of `url`: the SHA-256 of the URL (stable, no user text in the name)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def filename_to_url(filename: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The URL a cached file came from, read from its sidecar."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    meta_path = cache / f"{filename}.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no cache metadata {meta_path}; the file was not downloaded here")
    return json.loads(meta_path.read_text())["url"]


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_path(
    url_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
    allow_http: bool = False,
    force_download: bool = False,
    max_retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
) -> str:
    """Local path of `url_or_path`, downloading a URL into the cache first (see module doc)."""
    url_or_path = os.fspath(url_or_path)
    scheme = urlparse(url_or_path).scheme.lower()
    if scheme in ("http", "https", "s3"):
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if scheme == "http" and not allow_http:
            raise ValueError(
                f"refusing plain-http download of {url_or_path}: use https "
                "(or pass allow_http=True for a trusted local server)"
            )
        return str(_get_from_cache(url_or_path, cache, sha256=sha256, force=force_download,
                                   max_retries=max_retries, backoff=backoff, timeout=timeout,
                                   progress=progress, allow_http=allow_http))
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ValueError(f"unsupported URL scheme {scheme!r} in {url_or_path}: use https, s3 or a local path")
    if not os.path.exists(url_or_path):
        raise FileNotFoundError(f"file not found: {url_or_path} (check the path)")
    return url_or_path


def _get_from_cache(url: str, cache: Path, *, sha256: str | None, force: bool, max_retries: int,
                    backoff: float, timeout: float, progress: bool, allow_http: bool) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / url_to_filename(url)
    with _file_lock(final.with_name(final.name + ".lock")):
        if final.exists() and not force:
            if _cached_copy_is_valid(final, url, sha256):
                return final
            final.unlink()
        partial = final.with_name(final.name + ".partial")
        if force:
            _remove(partial, _partial_meta(partial))
        if urlparse(url).scheme == "s3":
            etag = _s3_download(url, partial)
        else:
            etag = _http_download(url, partial, max_retries=max_retries, backoff=backoff,
                                  timeout=timeout, progress=progress, allow_http=allow_http)
        digest = sha256_of(partial)
        if sha256 is not None and digest != sha256.lower():
            _remove(partial, _partial_meta(partial))
            raise ChecksumError(
                f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; the bad "
                "download was removed - retry, or check the expected checksum"
            )
        os.replace(partial, final)
        _remove(_partial_meta(partial))
        _write_json_atomic(final.with_name(final.name + ".json"),
                           {"url": url, "sha256": digest, "size": final.stat().st_size, "etag": etag})
        return final


def _cached_copy_is_valid(final: Path, url: str, sha256: str | None) -> bool:
    """A cached file is complete (it only appears by atomic rename); re-check it when asked to."""
    meta_path = final.with_name(final.name + ".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    if sha256 is None and meta.get("url") == url:
        return True
    digest = sha256_of(final)
    if sha256 is not None and digest != sha256.lower():
        return False
    if meta.get("sha256") != digest or meta.get("url") != url:
        _write_json_atomic(meta_path, {"url": url, "sha256": digest,
                                       "size": final.stat().st_size, "etag": meta.get("etag")})
    return True


def _http_download(url: str, partial: Path, *, max_retries: int, backoff: float, timeout: float,
                   progress: bool, allow_http: bool) -> str | None:
    """Fill `partial` with the body of `url`, resuming and retrying; returns the ETag."""
    meta_path = _partial_meta(partial)
    validator = _read_json(meta_path).get("validator") if partial.exists() else None
    last_error: Exception | None = None
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
        try:
            return _http_attempt(url, partial, meta_path, validator, timeout, progress, allow_http)
        except _Retryable as err:
            last_error = err.__cause__ or err
            validator = _read_json(meta_path).get("validator") if partial.exists() else None
    raise DownloadError(
        f"download of {url} failed after {max_retries + 1} attempts ({last_error}); the partial "
        f"file {partial} is kept and the next call resumes it"
    )


class _Retryable(Exception):
    pass


def _get_following_redirects(url: str, headers: dict[str, str], timeout: float, allow_http: bool) -> requests.Response:
    """GET `url`, following redirects ourselves: the https-only rule holds on every hop (requests
    would follow an https URL to plain http on its own)."""
    for _ in range(MAX_REDIRECTS + 1):
        response = requests.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=False)
        if not response.is_redirect:
            return response
        response.close()
        target = urljoin(url, response.headers["Location"])
        scheme = urlparse(target).scheme.lower()
        if scheme != "https" and not (scheme == "http" and allow_http):
            raise DownloadError(f"download of {url} redirects to {target}: refusing a {scheme or 'relative'} "
                                f"hop (only https is followed); download it from an https URL")
        url = target
    raise DownloadError(f"download of {url} was redirected more than {MAX_REDIRECTS} times: check the URL")


def _http_attempt(url: str, partial: Path, meta_path: Path, validator: str | None,
                  timeout: float, progress: bool, allow_http: bool) -> str | None:
    offset = partial.stat().st_size if partial.exists() else 0
    # Identity encoding: Range offsets must count the bytes we store, not gzip-ed ones.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    try:
        response = _get_following_redirects(url, headers, timeout, allow_http)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Retryable(str(err)) from err
    with response:
        if response.status_code == 416:  # our partial file is not a prefix of what is served
            _remove(partial)
            raise _Retryable("server rejected the resume range; restarting") from None
        if response.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {response.status_code}") from None
        if response.status_code not in (200, 206):
            raise DownloadError(f"download of {url} failed: HTTP {response.status_code} "
                                f"{response.reason} (check the URL)")
        if response.status_code == 200:
            offset = 0  # no range support, or the file changed (If-Range): start over
        elif not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            _remove(partial)
            raise _Retryable("server answered a different range than asked; restarting")
        etag = response.headers.get("ETag")
        new_validator = etag or response.headers.get("Last-Modified")
        if new_validator != validator or offset == 0:
            _write_json_atomic(meta_path, {"url": url, "validator": new_validator})
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        try:
            with open(partial, "ab" if offset else "wb") as out, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=os.path.basename(urlparse(url).path) or url, disable=not progress,
            ) as bar:
                for chunk in response.iter_content(DOWNLOAD_CHUNK_SIZE):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as err:
            raise _Retryable(str(err)) from err
        received = partial.stat().st_size
        if total is not None and received != total:
            raise _Retryable(f"connection closed after {received} of {total} bytes")
        return etag


def _s3_download(url: str, partial: Path) -> str | None:
    try:
        import boto3
    except ImportError:
        raise ImportError(f"downloading {url} needs boto3: pip install boto3") from None
    parsed = urlparse(url)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise ValueError(f"bad s3 URL {url}: expected s3://bucket/key")
    s3_object = boto3.resource("s3").Object(bucket, key)
    with open(partial, "wb") as out:
        s3_object.download_fileobj(out)
    return getattr(s3_object, "e_tag", None)


def _partial_meta(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data))


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise downloads of one URL across processes (e.g. 8 ranks), where flock exists."""
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock, downloads still finish atomically
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- safe extraction


def _safe_member_path(name: str, archive: str) -> PurePosixPath | None:
    """Sanitised relative path of an archive member; None for the archive root; error if unsafe."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member name {name!r} contains a NUL byte")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the target folder (..)")
    return PurePosixPath(*parts) if parts else None


def _zip_members(zf: zipfile.ZipFile, archive: str) -> list[tuple[PurePosixPath, bool, zipfile.ZipInfo, int]]:
    members = []
    for info in zf.infolist():
        # Unix type bits live in the high 16 bits; many writers leave them 0 (= plain file).
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a link or special "
                                     "file; refusing to extract")
        path = _safe_member_path(info.filename, archive)
        if path is not None:
            members.append((path, info.is_dir(), info, info.file_size))
    return members


def _tar_members(tf: tarfile.TarFile, archive: str) -> list[tuple[PurePosixPath, bool, tarfile.TarInfo, int]]:
    members = []
    for info in tf.getmembers():
        if not (info.isfile() or info.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a link or special file; "
                                     "refusing to extract")
        path = _safe_member_path(info.name, archive)
        if path is not None:
            members.append((path, info.isdir(), info, info.size))
    return members


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, *, max_members: int = MAX_MEMBERS,
                 max_bytes: int | None = None) -> list[str]:
    """Extract a zip or tar(.gz/.bz2/.xz) into `dest`; returns the written file paths.

    Every member is checked before anything is written: its path, its type, conflicts with the other
    members and with `dest`, and the totals (at most `max_members` members and `max_bytes` bytes,
    by default MAX_EXPANSION times the archive's size: an archive bomb is refused, not unpacked).
    Each file is written to a temporary name and renamed into place; if extraction fails part way
    (a corrupt member, a full disk) the files it wrote are removed again.
    """
    archive = os.fspath(archive)
    dest_dir = Path(dest).resolve()
    if max_bytes is None:
        max_bytes = MAX_EXPANSION * max(os.path.getsize(archive), 1 << 20)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return _extract(_zip_members(zf, archive), zf.open, dest_dir, archive, max_members, max_bytes)
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                return _extract(_tar_members(tf, archive), tf.extractfile, dest_dir, archive, max_members, max_bytes)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as err:
        reason = str(err) or type(err).__name__
        raise ValueError(f"{archive} is truncated or corrupt ({reason}): download it again") from None
    raise ValueError(f"{archive} is neither a zip nor a tar archive")


def _check_totals(members: list, archive: str, max_members: int, max_bytes: int) -> None:
    total = sum(size for *_, size in members)
    if len(members) > max_members or total > max_bytes:
        raise UnsafeArchiveError(f"{archive}: {len(members)} members, {total} bytes unpacked, over the limit of "
                                 f"{max_members} members / {max_bytes} bytes (an archive bomb?); pass max_members / "
                                 f"max_bytes to safe_extract if this archive is trusted")


def _check_targets(members: list, dest_dir: Path, archive: str) -> list[tuple[Path, bool, object]]:
    """Each member's target under `dest_dir`, refusing any that cannot be written as asked."""
    files = {path for path, is_dir, *_ in members if not is_dir}
    folders = {parent for path, *_ in members for parent in path.parents} | {
        path for path, is_dir, *_ in members if is_dir}
    targets = []
    for path, is_dir, info, _ in members:
        if not is_dir and path in folders:
            raise UnsafeArchiveError(f"{archive}: member {str(path)!r} is both a file and a folder in the archive")
        if len(str(path)) > MAX_PATH_CHARS or any(len(part.encode()) > 255 for part in path.parts):
            raise UnsafeArchiveError(f"{archive}: member {str(path)[:80]!r}... has a path too long or too deep "
                                     f"to write")
        target = dest_dir.joinpath(*path.parts)
        # Belt and braces: an existing symlink inside dest must not redirect a member outside.
        resolved = target.resolve()
        if resolved != dest_dir and dest_dir not in resolved.parents:
            raise UnsafeArchiveError(f"{archive}: member {str(path)!r} resolves outside {dest_dir}")
        blocking = [dest_dir.joinpath(*parent.parts) for parent in path.parents if parent.parts]
        blocking = [p for p in blocking + ([target] if is_dir else []) if p.exists() and not p.is_dir()]
        if blocking or path in files and target.is_dir():
            what = f"file {blocking[0]}" if blocking else f"folder {target}"
            raise UnsafeArchiveError(f"{archive}: member {str(path)!r} would replace the existing {what}: "
                                     f"extract elsewhere")
        targets.append((target, is_dir, info))
    return targets


def _extract(members: list, open_member, dest_dir: Path, archive: str, max_members: int,
             max_bytes: int) -> list[str]:
    _check_totals(members, archive, max_members, max_bytes)
    targets = _check_targets(members, dest_dir, archive)
    written: list[str] = []
    budget = max_bytes
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        for target, is_dir, info in targets:
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp, open(tmp, "wb") as out, open_member(info) as src:
                budget -= _copy_at_most(src, out, budget, archive)
            written.append(str(target))
    except BaseException:
        for path in written:  # all or nothing: no half-extracted archive is left behind
            _remove(Path(path))
        raise
    return written


def _copy_at_most(src, out, budget: int, archive: str) -> int:
    """Copy `src` to `out`; a member that unpacks to more than its header said cannot exceed the budget."""
    copied = 0
    while chunk := src.read(CHUNK_SIZE):
        copied += len(chunk)
        if copied > budget:
            raise UnsafeArchiveError(f"{archive}: members unpack to more bytes than their headers declare "
                                     f"(over {budget} left of the limit); refusing")
        out.write(chunk)
    return copied
