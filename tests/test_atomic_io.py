"""atomic_io: a file appears complete under its final name, or the old one stays."""
import os

import pytest

from atomic_io import atomic_path, atomic_text_writer, atomic_write_text, remove_stale_temps, save_figure


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_path_replaces_in_one_rename_with_a_plain_mode(tmp_path):
    target = tmp_path / "sub" / "file.bin"  # missing parents are created
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert not target.exists() and tmp.name.startswith(".file.bin.") and tmp.suffix == ".tmp"
    assert target.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "vocab.txt"
    target.write_text("old\n")
    with pytest.raises(OSError, match="disk full"):
        with atomic_text_writer(target) as f:
            f.write("half of the new")
            raise OSError("disk full")
    assert target.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_text_is_utf8_with_unix_newlines(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "naïve\nline\n")
    assert (tmp_path / "t.txt").read_bytes() == "naïve\nline\n".encode("utf-8")


def test_remove_stale_temps_takes_only_files_named_as_the_path_s_temporaries(tmp_path):
    (tmp_path / ".f.bin.abc_12.tmp").write_bytes(b"x")
    (tmp_path / ".f.bin.dir.tmp").mkdir()
    (tmp_path / ".f.bin2.abc.tmp").write_bytes(b"x")
    assert remove_stale_temps(tmp_path / "f.bin") == [tmp_path / ".f.bin.abc_12.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".f.bin.dir.tmp", ".f.bin2.abc.tmp"]
    assert remove_stale_temps(tmp_path / "missing" / "f.bin") == []


def test_remove_stale_temps_of_a_folder_takes_every_matching_file_s_temporaries(tmp_path):
    for name in (".ckpt_4.pt.k9x_1.tmp", ".ckpt_12.pt.zz.tmp", ".ckpt_x.pt.a.tmp", ".mask_4.safetensors.a.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ckpt_4.pt").write_bytes(b"kept")
    removed = remove_stale_temps(tmp_path, r"ckpt_\d+\.pt")
    assert sorted(p.name for p in removed) == [".ckpt_12.pt.zz.tmp", ".ckpt_4.pt.k9x_1.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt_x.pt.a.tmp", ".mask_4.safetensors.a.tmp", "ckpt_4.pt"]


def test_save_figure_writes_a_png_atomically_and_closes_the_figure(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]
