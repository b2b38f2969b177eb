"""cached_path against a local HTTP server (Range, dropped connections, errors) and safe_extract."""
import hashlib
import io
import json
import os
import re
import socket
import stat
import sys
import tarfile
import threading
import types
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import file_utils
from file_utils import ChecksumError, DownloadError, UnsafeArchiveError, cached_path, safe_extract

FAST = dict(allow_http=True, progress=False, backoff=0.0, timeout=10.0)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        state = self.server.state
        state.log.append((self.path, dict(self.headers)))
        if self.path in state.redirects:
            self._reply(302, b"", {"Location": state.redirects[self.path]})
            return
        if state.fail_next.get(self.path):
            self._reply(state.fail_next[self.path].pop(0), b"try later")
            return
        body = state.files.get(self.path)
        if body is None:
            self._reply(404, b"not found")
            return
        etag = '"%s"' % hashlib.sha256(body).hexdigest()[:16]
        status, start = 200, 0
        range_header = self.headers.get("Range")
        if range_header and self.headers.get("If-Range", etag) == etag:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(body):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        drop = state.drop_after.pop(self.path, None)
        if drop is not None:  # promise the whole body, send part of it, hang up
            self.wfile.write(payload[:drop])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)

    def _reply(self, status, body, headers=None):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = types.SimpleNamespace(files={}, log=[], drop_after={}, fail_next={}, redirects={})
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


def payload(size=300_000, seed=1):
    return bytes((i * 7919 + seed) % 251 for i in range(size))


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_download_then_cache_hit(server, tmp_path):
    data = payload()
    server.files["/weights.bin"] = data
    url = server.url + "/weights.bin"
    path = cached_path(url, tmp_path, sha256=sha(data), **FAST)
    assert open(path, "rb").read() == data
    meta = json.loads(open(path + ".json").read())
    assert meta["url"] == url and meta["sha256"] == sha(data) and meta["size"] == len(data)
    assert file_utils.filename_to_url(os.path.basename(path), tmp_path) == url
    assert len(server.log) == 1

    again = cached_path(url, tmp_path, sha256=sha(data), **FAST)
    assert again == path and len(server.log) == 1  # no network on a hit
    assert not [f for f in os.listdir(tmp_path) if ".partial" in f or f.endswith(".tmp")]


def test_cache_dir_from_environment(server, tmp_path, monkeypatch):
    server.files["/v.txt"] = b"hello"
    monkeypatch.setenv("PYTORCH_PRETRAINED_BERT_CACHE", str(tmp_path / "env_cache"))
    path = cached_path(server.url + "/v.txt", **FAST)
    assert os.path.dirname(path) == str(tmp_path / "env_cache")


def test_dropped_connection_is_resumed_within_one_call(server, tmp_path):
    data = payload()
    server.files["/corpus.bin"] = data
    server.drop_after["/corpus.bin"] = 100_000
    path = cached_path(server.url + "/corpus.bin", tmp_path, sha256=sha(data), max_retries=2, **FAST)
    assert open(path, "rb").read() == data
    assert len(server.log) == 2
    second = server.log[1][1]
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second["Range"]).group(1))
    assert 0 < resumed_at <= 100_000  # the bytes received before the drop are kept
    assert second["If-Range"].startswith('"') and second["Accept-Encoding"] == "identity"


def test_interrupted_download_resumes_on_next_call(server, tmp_path):
    data = payload()
    server.files["/corpus.bin"] = data
    server.drop_after["/corpus.bin"] = 123_456
    url = server.url + "/corpus.bin"
    with pytest.raises(DownloadError, match="resumes"):
        cached_path(url, tmp_path, max_retries=0, **FAST)
    partial = tmp_path / (file_utils.url_to_filename(url) + ".partial")
    kept = partial.stat().st_size
    assert 0 < kept <= 123_456
    assert not (tmp_path / file_utils.url_to_filename(url)).exists()  # nothing half-written in place

    path = cached_path(url, tmp_path, sha256=sha(data), max_retries=0, **FAST)
    assert open(path, "rb").read() == data
    assert server.log[-1][1]["Range"] == f"bytes={kept}-"
    assert not partial.exists()


def test_resume_restarts_when_server_file_changed(server, tmp_path):
    old, new = payload(seed=1), payload(seed=2)
    server.files["/f.bin"] = old
    server.drop_after["/f.bin"] = 50_000
    url = server.url + "/f.bin"
    with pytest.raises(DownloadError):
        cached_path(url, tmp_path, max_retries=0, **FAST)
    server.files["/f.bin"] = new  # ETag changes, so If-Range makes the server send it all
    path = cached_path(url, tmp_path, max_retries=0, **FAST)
    assert open(path, "rb").read() == new


def test_wrong_checksum_rejected_and_removed(server, tmp_path):
    server.files["/w.bin"] = payload(1000)
    url = server.url + "/w.bin"
    with pytest.raises(ChecksumError, match="checksum mismatch.*removed"):
        cached_path(url, tmp_path, sha256="0" * 64, **FAST)
    assert [f for f in os.listdir(tmp_path) if not f.endswith(".lock")] == []
    # A later call with the right checksum downloads afresh.
    assert open(cached_path(url, tmp_path, sha256=sha(payload(1000)), **FAST), "rb").read() == payload(1000)


def test_cached_file_not_matching_expected_checksum_is_refetched(server, tmp_path):
    url = server.url + "/c.bin"
    server.files["/c.bin"] = b"version one"
    cached_path(url, tmp_path, **FAST)
    server.files["/c.bin"] = b"version two"
    path = cached_path(url, tmp_path, sha256=sha(b"version two"), **FAST)
    assert open(path, "rb").read() == b"version two"


def test_transient_errors_are_retried_and_404_is_not(server, tmp_path):
    server.files["/r.bin"] = b"data"
    server.fail_next["/r.bin"] = [503, 500]
    assert open(cached_path(server.url + "/r.bin", tmp_path, max_retries=2, **FAST), "rb").read() == b"data"
    assert len(server.log) == 3

    with pytest.raises(DownloadError, match="HTTP 404"):
        cached_path(server.url + "/missing.bin", tmp_path, max_retries=3, **FAST)
    assert len(server.log) == 4

    server.fail_next["/r2.bin"] = [503, 503, 503]
    server.files["/r2.bin"] = b"x"
    with pytest.raises(DownloadError, match="after 2 attempts"):
        cached_path(server.url + "/r2.bin", tmp_path, max_retries=1, **FAST)


def test_plain_http_refused_by_default(server, tmp_path):
    with pytest.raises(ValueError, match="https"):
        cached_path(server.url + "/x", tmp_path, progress=False)
    assert server.log == []


def test_local_paths_and_bad_schemes(tmp_path):
    existing = tmp_path / "vocab.txt"
    existing.write_text("[PAD]\n")
    assert cached_path(existing) == str(existing)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        cached_path(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        cached_path("ftp://example.com/file", tmp_path)


def test_s3_needs_boto3(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` raise ImportError
    with pytest.raises(ImportError, match="pip install boto3"):
        cached_path("s3://bucket/model.bin", tmp_path)


def test_s3_download_through_boto3(tmp_path, monkeypatch):
    calls = []

    class FakeObject:
        e_tag = '"abc"'

        def __init__(self, bucket, key):
            calls.append((bucket, key))

        def download_fileobj(self, out):
            out.write(b"s3 bytes")

    fake = types.SimpleNamespace(resource=lambda name: types.SimpleNamespace(Object=FakeObject))
    monkeypatch.setitem(sys.modules, "boto3", fake)
    path = cached_path("s3://bucket/dir/model.bin", tmp_path, sha256=sha(b"s3 bytes"))
    assert open(path, "rb").read() == b"s3 bytes" and calls == [("bucket", "dir/model.bin")]
    assert json.loads(open(path + ".json").read())["etag"] == '"abc"'


# ----------------------------------------------------------------------------- safe_extract


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def test_download_and_extract_zip(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("MRPC/train.tsv", "a\tb\n")
        zf.writestr("./MRPC//dev.tsv", "c\td\n")  # sanitised to MRPC/dev.tsv
        zf.writestr("MRPC/sub/", "")
    server.files["/glue.zip"] = buffer.getvalue()
    archive = cached_path(server.url + "/glue.zip", tmp_path / "cache", **FAST)
    written = safe_extract(archive, tmp_path / "glue")
    assert sorted(written) == sorted([str(tmp_path / "glue/MRPC/train.tsv"),
                                      str(tmp_path / "glue/MRPC/dev.tsv")])
    assert (tmp_path / "glue/MRPC/dev.tsv").read_text() == "c\td\n"
    assert (tmp_path / "glue/MRPC/sub").is_dir()


@pytest.mark.parametrize("bad_name", ["../evil.txt", "ok/../../evil.txt", "/abs/evil.txt",
                                      "..\\evil.txt", "C:/evil.txt"])
def test_zip_escaping_members_rejected_before_writing(tmp_path, bad_name):
    archive = make_zip(tmp_path / "bad.zip", {"good.txt": "fine", bad_name: "pwned"})
    assert bad_name in zipfile.ZipFile(archive).namelist()  # the archive really holds that name
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(bad_name))):
        safe_extract(archive, dest)
    assert not dest.exists()  # checked before anything is written, good member included
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_member_rejected(tmp_path):
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="link"):
        safe_extract(tmp_path / "link.zip", tmp_path / "out")


def add_tar_member(tf, name, data=b"", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(data)
    tf.addfile(info, io.BytesIO(data))


def test_tar_extracts_and_rejects_links_and_traversal(tmp_path):
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        add_tar_member(tf, "bert/vocab.txt", b"[PAD]\n")
    assert safe_extract(good, tmp_path / "ok") == [str(tmp_path / "ok/bert/vocab.txt")]

    for name, kind, link in [("evil", tarfile.SYMTYPE, "/etc/passwd"),
                             ("hard", tarfile.LNKTYPE, "../../etc/passwd"),
                             ("../evil.txt", tarfile.REGTYPE, ""),
                             ("/tmp/evil.txt", tarfile.REGTYPE, "")]:
        bad = tmp_path / "bad.tar"
        with tarfile.open(bad, "w") as tf:
            add_tar_member(tf, name, b"x" if kind == tarfile.REGTYPE else b"", kind, link)
        with pytest.raises(UnsafeArchiveError):
            safe_extract(bad, tmp_path / "bad_out")
        assert not (tmp_path / "bad_out").exists()


def test_existing_symlink_in_dest_cannot_redirect(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, dest / "data")
    archive = make_zip(tmp_path / "a.zip", {"data/file.txt": "x"})
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(archive, dest)
    assert list(outside.iterdir()) == []


def test_not_an_archive(tmp_path):
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        safe_extract(tmp_path / "plain.txt", tmp_path / "out")


def test_redirects_are_followed_hop_by_hop(server, tmp_path):
    server.files["/real.bin"] = payload(1000)
    server.redirects["/moved.bin"] = "/hop.bin"  # relative, then absolute
    server.redirects["/hop.bin"] = server.url + "/real.bin"
    path = cached_path(server.url + "/moved.bin", tmp_path / "cache", **FAST)
    assert open(path, "rb").read() == payload(1000)
    server.redirects["/loop.bin"] = "/loop.bin"
    with pytest.raises(DownloadError, match="redirected more than 10 times"):
        cached_path(server.url + "/loop.bin", tmp_path / "cache", **FAST)


def test_an_https_download_never_follows_a_hop_to_plain_http(monkeypatch):
    """requests would follow https -> http on its own; the https-only rule holds on every hop."""
    asked = []

    class Redirect:
        is_redirect, headers = True, {"Location": "http://mirror.example/file.bin"}

        def close(self):
            pass

    def get(url, **kwargs):
        asked.append(url)
        assert kwargs["allow_redirects"] is False
        return Redirect()

    monkeypatch.setattr(file_utils.requests, "get", get)
    with pytest.raises(DownloadError, match="redirects to http://mirror.example/file.bin: refusing a http hop"):
        file_utils._get_following_redirects("https://example.org/file.bin", {}, 5.0, allow_http=False)
    assert asked == ["https://example.org/file.bin"]  # the plain-http URL was never requested


def test_archive_bombs_are_refused_before_writing(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * 200_000, "b.txt": "x"})
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="200001 bytes unpacked, over the limit"):
        safe_extract(archive, dest, max_bytes=100_000)
    with pytest.raises(UnsafeArchiveError, match="2 members.*over the limit of 1 members"):
        safe_extract(archive, dest, max_members=1)
    assert not dest.exists()
    assert file_utils.MAX_EXPANSION * (1 << 20) < 1 << 30  # the default refuses 1 MB unpacking to 1 GiB


def test_a_member_larger_than_its_header_says_is_stopped_and_nothing_is_left(tmp_path):
    archive = tmp_path / "lie.tar"
    with tarfile.open(archive, "w") as tf:
        add_tar_member(tf, "a.txt", b"first")
        add_tar_member(tf, "b.bin", b"y" * 5000)
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="more bytes than their headers declare"):
        file_utils._extract([(p, d, i, 1) for p, d, i, _ in file_utils._tar_members(tarfile.open(archive), "lie")],
                            tarfile.open(archive).extractfile, dest, "lie", 10, 100)
    assert not (dest / "a.txt").exists() and not (dest / "b.bin").exists()


@pytest.mark.parametrize("members, existing, message", [
    ({"data": "a file", "data/inner.txt": "x"}, None, "'data' is both a file and a folder"),
    ({"data/inner.txt": "x"}, "data", "would replace the existing file"),
    ({"data": "a file"}, "data/", "would replace the existing folder"),
    ({"/".join(["d" * 200] * 8) + "/f.txt": "x"}, None, "too long or too deep"),
    ({"x" * 300: "x"}, None, "too long or too deep"),
])
def test_members_that_cannot_be_written_are_one_line_before_writing(tmp_path, members, existing, message):
    archive = make_zip(tmp_path / "a.zip", {"first.txt": "ok", **members})
    dest = tmp_path / "out"
    dest.mkdir()
    if existing:
        (dest / existing.rstrip("/")).mkdir() if existing.endswith("/") else (dest / existing).write_text("mine")
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract(archive, dest)
    assert not (dest / "first.txt").exists()


def test_truncated_or_corrupt_archives_are_one_line_and_leave_nothing(tmp_path):
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        for i in range(20):
            add_tar_member(tf, f"f{i}.bin", payload(20_000, seed=i))
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt.*download it again"):
        safe_extract(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    zipped = make_zip(tmp_path / "crc.zip", {"a.txt": "first member", "b.txt": "second member, damaged"})
    data = bytearray(zipped.read_bytes())
    data[data.index(b"second member") + 3] ^= 0xFF  # stored (uncompressed): flips a byte, breaks its CRC
    zipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        safe_extract(zipped, tmp_path / "out2")
    assert not (tmp_path / "out2" / "a.txt").exists()
