"""pretraining_data.py: labels from stored positions, shard validation, rank files, exact resume."""
import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import pretraining_data as pd
import run_pretraining
from data import create_pretraining_data as cpd

ROOT = Path(__file__).resolve().parent.parent
SEQ, PRED = 32, 5


def shard_arrays(n: int, seed: int = 0, seq: int = SEQ, pred: int = PRED) -> dict[str, np.ndarray]:
    """Random but well-formed shard rows; some rows use every prediction slot (no 0 padding)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, seq + 1, n)
    a = {"input_ids": np.zeros((n, seq), np.int32), "input_mask": np.zeros((n, seq), np.int8),
         "segment_ids": np.zeros((n, seq), np.int8), "masked_lm_positions": np.zeros((n, pred), np.int32),
         "masked_lm_ids": np.zeros((n, pred), np.int32),
         "next_sentence_labels": rng.integers(0, 2, n).astype(np.int8)}
    for i, length in enumerate(lengths):
        a["input_ids"][i, :length] = rng.integers(1000, 2000, length)
        a["input_mask"][i, :length] = 1
        a["segment_ids"][i, length // 2:length] = 1
        k = rng.integers(1, pred + 1)
        a["masked_lm_positions"][i, :k] = np.sort(rng.choice(np.arange(1, length - 1), k, replace=False))
        a["masked_lm_ids"][i, :k] = rng.integers(1000, 2000, k)
    return a


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for name, array in arrays.items():
            f.create_dataset(name, data=array, compression="gzip")
    return path


def tensors(batch) -> list[torch.Tensor]:
    return [getattr(batch, f.name) for f in dataclasses.fields(batch)]


def test_item_fields_dtypes_and_labels_match_stored_positions(tmp_path):
    a = shard_arrays(40)
    a["masked_lm_positions"][0] = [3, 5, 7, 9, 11]  # every slot used: no 0 terminator
    ds = pd.PretrainingDataset(write_shard(tmp_path / "s.hdf5", a), max_pred_length=PRED)
    assert len(ds) == 40
    for i in range(len(ds)):
        row = ds[i]
        input_ids, segment_ids, input_mask = row.input_ids[0], row.segment_ids[0], row.input_mask[0]
        labels, nsp = row.masked_lm_labels[0], row.next_sentence_labels[0]
        assert all(t.dtype == torch.int64 for t in tensors(row))
        np.testing.assert_array_equal(input_ids.numpy(), a["input_ids"][i])
        np.testing.assert_array_equal(segment_ids.numpy(), a["segment_ids"][i])
        np.testing.assert_array_equal(input_mask.numpy(), a["input_mask"][i])
        assert nsp.item() == a["next_sentence_labels"][i]
        expected = np.full(SEQ, -1)
        pos = a["masked_lm_positions"][i]
        k = np.argmax(pos == 0) if (pos == 0).any() else PRED
        expected[pos[:k]] = a["masked_lm_ids"][i, :k]
        np.testing.assert_array_equal(labels.numpy(), expected)
    assert (ds[0].masked_lm_labels != -1).sum() == 5


def test_labels_stop_at_first_zero_position():
    positions = torch.tensor([[2, 4, 0, 6]])  # the 6 after the terminator is ignored
    labels = pd.masked_lm_labels(positions, torch.tensor([[7, 8, 0, 9]]), 8)
    assert labels.tolist() == [[-1, -1, 7, -1, 8, -1, -1, -1]]


def test_labels_agree_with_a_created_shard(tmp_path):
    words = [w for w in (ROOT / "vocab" / "vocab").read_text().split("\n")[3000:6000] if w.isalpha()]
    text = "\n\n".join("\n".join(" ".join(words[(d * 31 + s * 7 + j) % len(words)] for j in range(9))
                                 for s in range(6)) for d in range(30))
    (tmp_path / "c.txt").write_text(text + "\n")
    out = tmp_path / "s_training_0.hdf5"
    cpd.create_shard([str(tmp_path / "c.txt")], str(out), str(ROOT / "vocab" / "vocab"),
                     cpd.InstanceConfig(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=1),
                     progress=False)
    ds = pd.PretrainingDataset(out, 10)
    with h5py.File(out) as f:
        positions, ids, input_ids = f["masked_lm_positions"][:], f["masked_lm_ids"][:], f["input_ids"][:]
    batch = ds.batch(range(len(ds)))
    for row in range(len(ds)):
        k = np.count_nonzero(positions[row])
        labels = batch.masked_lm_labels[row].numpy()
        np.testing.assert_array_equal(np.flatnonzero(labels != -1), positions[row, :k])
        np.testing.assert_array_equal(labels[positions[row, :k]], ids[row, :k])
        assert (input_ids[row, positions[row, :k]] != ids[row, :k]).mean() > 0 or k < 3


@pytest.mark.parametrize("break_it, message", [
    (lambda a: a.pop("masked_lm_ids"), "lacks dataset.*masked_lm_ids"),
    (lambda a: a.update(input_mask=a["input_mask"][:, :-1]), "input_mask has width"),
    (lambda a: a.update(segment_ids=a["segment_ids"][:-1]), "segment_ids has shape"),
    (lambda a: a.update(input_ids=a["input_ids"].astype(np.float32)), "input_ids has dtype float32"),
    (lambda a: a.update(next_sentence_labels=a["next_sentence_labels"] * 3), "next_sentence_labels must be 0 or 1"),
    (lambda a: a["masked_lm_positions"].__setitem__((0, 0), SEQ + 4), "outside"),
    (lambda a: a["segment_ids"].__setitem__((0, 1), 2), "segment_ids must be 0 or 1, found \\[2\\]"),
    (lambda a: a["input_mask"].__setitem__((1, 1), 2), "input_mask must be 0 or 1"),
    (lambda a: a["masked_lm_ids"].__setitem__((2, 0), -5), "masked_lm_ids holds negative ids"),
    (lambda a: a.update(masked_lm_positions=np.zeros((10, 8), np.int32), masked_lm_ids=np.zeros((10, 8), np.int32)),
     "--max_predictions_per_seq 8"),
])
def test_wrong_shards_name_path_and_problem(tmp_path, break_it, message):
    a = shard_arrays(10)
    break_it(a)
    path = write_shard(tmp_path / "bad.hdf5", a)
    with pytest.raises(pd.ShardError, match=message) as info:
        pd.PretrainingDataset(path, max_pred_length=PRED)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_corrupt_files(tmp_path):
    good = write_shard(tmp_path / "good.hdf5", shard_arrays(200))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.hdf5"
    garbage.write_bytes(b"not an hdf5 file at all" * 100)
    for path in (truncated, garbage):
        with pytest.raises(pd.ShardError, match="truncated or corrupt") as info:
            pd.PretrainingDataset(path, PRED)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.hdf5"):
        pd.PretrainingDataset(tmp_path / "missing.hdf5", PRED)



def write_shard_with(path: Path, replace_input_ids) -> Path:
    """A well-formed shard whose input_ids dataset is made by `replace_input_ids(file, name, array)`."""
    with h5py.File(path, "w") as f:
        for name, array in shard_arrays(10).items():
            if name == "input_ids":
                replace_input_ids(f, name, array)
            else:
                f.create_dataset(name, data=array)
    return path


@pytest.mark.parametrize("kind", ["external_storage", "external_link", "virtual", "soft_link"])
def test_a_shard_never_reads_another_file(tmp_path, kind):
    """HDF5 lets a dataset point at other files; a shard doing so is refused, not trained on."""
    other = write_shard(tmp_path / "other.hdf5", shard_arrays(10, seed=1))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(10 * SEQ, dtype=np.int32).tobytes())

    def external_storage(f, name, array):
        f.create_dataset(name, shape=array.shape, dtype=array.dtype, external=[(str(secret), 0, h5py.h5f.UNLIMITED)])

    def external_link(f, name, array):
        f[name] = h5py.ExternalLink(str(other), "/input_ids")

    def virtual(f, name, array):
        layout = h5py.VirtualLayout(shape=array.shape, dtype=array.dtype)
        layout[:] = h5py.VirtualSource(str(other), "input_ids", shape=array.shape)
        f.create_virtual_dataset(name, layout)

    def soft_link(f, name, array):
        f.create_dataset("elsewhere", data=array)
        f[name] = h5py.SoftLink("/elsewhere")

    path = write_shard_with(tmp_path / "bad.hdf5", locals()[kind])
    for read in (lambda: pd.shard_sequence_length(path, PRED), lambda: pd.PretrainingDataset(path, PRED)):
        with pytest.raises(pd.ShardError, match="not data stored in the shard|reads its values from other files"):
            read()


def test_a_shard_declaring_rows_it_does_not_store_is_refused_from_its_header(tmp_path):
    """3 KB declaring 10^9 rows: refused by the up-front check, not a MemoryError at load time."""
    path = tmp_path / "forged.hdf5"
    with h5py.File(path, "w") as f:
        for name, array in shard_arrays(10).items():
            f.create_dataset(name, shape=(10**9, *array.shape[1:]), dtype=array.dtype,
                             chunks=(1000, *array.shape[1:]), compression="gzip")
    assert path.stat().st_size < 10_000
    with pytest.raises(pd.ShardError, match=r"declares shape \(1000000000, 32\) but stores data for only part"):
        pd.shard_sequence_length(path, PRED)
    contiguous = tmp_path / "contiguous.hdf5"  # unchunked datasets are complete: accepted
    with h5py.File(contiguous, "w") as f:
        for name, array in shard_arrays(10).items():
            f.create_dataset(name, data=array)
    assert len(pd.PretrainingDataset(contiguous, PRED)) == 10


def test_list_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .hdf5"):
        pd.list_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pd.list_shards(tmp_path / "nope")
    for name in ("b.hdf5", "a.h5", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert pd.list_shards(tmp_path) == [str(tmp_path / "a.h5"), str(tmp_path / "b.hdf5")]
    for name in ("wiki_training_1.hdf5", "wiki_training_0.hdf5", "wiki_test_0.hdf5"):
        (tmp_path / name).write_bytes(b"")
    assert pd.list_shards(tmp_path) == [str(tmp_path / f"wiki_training_{i}.hdf5") for i in (0, 1)]
    assert pd.list_shards(tmp_path / "a.h5") == [str(tmp_path / "a.h5")]


def test_rank_file_selection():
    # world <= files: the ranks of one step read distinct files, and every file is visited per epoch
    for n, world in ((8, 4), (5, 2), (4, 4)):
        for f_id in range(n):
            assert len({pd.shard_index_for_rank(f_id, r, world, n) for r in range(world)}) == world
    assert [pd.shard_index_for_rank(1, r, 4, 8) for r in range(4)] == [4, 5, 6, 7]
    # more ranks than files: NVIDIA's extra offset of remainder * f_id
    assert [pd.shard_index_for_rank(1, r, 5, 3) for r in range(5)] == [(5 + r + 2) % 3 for r in range(5)]


@pytest.fixture()
def shard_dir(tmp_path) -> Path:
    for i, n in enumerate((37, 50, 21)):
        write_shard(tmp_path / f"x_training_{i}.hdf5", shard_arrays(n, seed=i))
    return tmp_path


def take(stream, n):
    it = iter(stream)
    return [(f_id, [t.clone() for t in tensors(batch)]) for f_id, batch in (next(it) for _ in range(n))]


def test_epoch_visits_every_sample_once_and_is_deterministic(shard_dir):
    files = pd.list_shards(shard_dir)
    stream = pd.PretrainingBatches(files, batch_size=8, max_pred_length=PRED, seed=5)
    batches = take(stream, 5 + 7 + 3)  # ceil(37/8) + ceil(50/8) + ceil(21/8): one epoch
    assert stream.state_dict()["epoch"] == 0
    seen = torch.cat([b[0] for _, b in batches])
    assert len(seen) == 108 and len({tuple(r.tolist()) for r in seen}) == 108
    f_ids = [f for f, _ in batches]
    assert f_ids == sorted(f_ids) and set(f_ids) == {0, 1, 2}
    again = take(pd.PretrainingBatches(files, 8, PRED, seed=5), 15)
    assert all(torch.equal(x[1][0], y[1][0]) for x, y in zip(batches, again))
    other = take(pd.PretrainingBatches(files, 8, PRED, seed=6), 15)
    assert not all(torch.equal(x[1][0], y[1][0]) for x, y in zip(batches, other))
    next_epoch = take(stream, 15)  # files and samples are reshuffled per epoch
    assert stream.state_dict()["epoch"] == 1
    assert not all(torch.equal(x[1][0], y[1][0]) for x, y in zip(batches, next_epoch))


@pytest.mark.parametrize("stop_after", [3, 5, 14, 17])
def test_resume_continues_at_the_exact_batch(shard_dir, stop_after):
    files = pd.list_shards(shard_dir)
    reference = take(pd.PretrainingBatches(files, 8, PRED, seed=1), stop_after + 4)
    first = pd.PretrainingBatches(files, 8, PRED, seed=1)
    take(first, stop_after)
    state = first.state_dict()
    first.close()
    resumed = pd.PretrainingBatches(files, 8, PRED, seed=1)
    resumed.load_state_dict(state)
    for (f_ref, b_ref), (f_new, b_new) in zip(reference[stop_after:], take(resumed, 4)):
        assert f_ref == f_new
        assert all(torch.equal(x, y) for x, y in zip(b_ref, b_new))
    resumed.close()


def test_ranks_read_different_files(shard_dir):
    files = pd.list_shards(shard_dir)
    rank0 = pd.PretrainingBatches(files, 64, PRED, seed=2, rank=0, world_size=2)
    rank1 = pd.PretrainingBatches(files, 64, PRED, seed=2, rank=1, world_size=2)
    assert rank0.file_for(0, 0) != rank1.file_for(0, 0)
    assert sorted(rank0.epoch_files(3)) == sorted(files)


def test_resume_with_other_shards_is_refused(shard_dir):
    files = pd.list_shards(shard_dir)
    state = pd.PretrainingBatches(files, 8, PRED, seed=1).state_dict()
    with pytest.raises(ValueError, match="same --input_dir"):
        pd.PretrainingBatches(files[:2], 8, PRED, seed=1).load_state_dict(state)


@pytest.mark.parametrize("stop_after", [6, 13, 20])
def test_every_rank_resumes_exactly_from_rank0_state(shard_dir, stop_after):
    """run_pretraining saves rank 0's state only; ranks whose shards differ in size must still
    continue at their own next batch, also after a second resume."""
    files = pd.list_shards(shard_dir)

    def stream(rank):
        return pd.PretrainingBatches(files, 8, PRED, seed=1, rank=rank, world_size=2, prefetch=False)

    rank0 = stream(0)
    take(rank0, stop_after)
    for rank in (0, 1):
        reference = take(stream(rank), stop_after + 8)
        resumed = stream(rank)
        resumed.load_state_dict(rank0.state_dict())
        got = take(resumed, 4)
        again = stream(rank)
        again.load_state_dict(resumed.state_dict())
        got += take(again, 4)
        for (f_ref, b_ref), (f_new, b_new) in zip(reference[stop_after:], got, strict=True):
            assert f_ref == f_new
            assert all(torch.equal(x, y) for x, y in zip(b_ref, b_new))


def test_big_endian_shard_loads_like_a_native_one(tmp_path):
    """A shard that passes the header check must also load (torch rejects big-endian arrays)."""
    a = shard_arrays(12)
    native = pd.PretrainingDataset(write_shard(tmp_path / "le.hdf5", a), PRED)
    swapped = {name: x.astype(x.dtype.newbyteorder(">")) for name, x in a.items()}
    path = write_shard(tmp_path / "be.hdf5", swapped)
    assert pd.shard_sequence_length(path, PRED) == SEQ
    big = pd.PretrainingDataset(path, PRED)
    assert all(torch.equal(x, y) for x, y in zip(tensors(native.batch(range(12))), tensors(big.batch(range(12)))))


def test_ids_beyond_the_config_vocab_name_the_shard_the_id_and_the_fix(tmp_path):
    a = shard_arrays(10)  # ids in [1000, 2000)
    a["masked_lm_ids"][3, 0] = 2500  # a used slot: rows always use at least their first one
    path = write_shard(tmp_path / "other_vocab.hdf5", a)
    with pytest.raises(pd.ShardError, match="token id 2500 .*vocab_size 2000.*bert_config.json") as info:
        pd.PretrainingDataset(path, PRED, vocab_size=2000)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert len(pd.PretrainingDataset(path, PRED, vocab_size=2501)) == 10


def test_run_pretraining_stops_on_a_shard_of_another_vocab_with_one_line(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "x_training_0.hdf5", shard_arrays(16))  # ids up to 1999
    config = tmp_path / "bert_config.json"
    config.write_text(json.dumps(dict(vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=SEQ)))
    argv = ["--do_train", "--disable_progress_bar", "--input_dir", str(shards), "--config_file", str(config),
            "--output_dir", str(tmp_path / "out"), "--max_seq_length", str(SEQ), "--max_predictions_per_seq",
            str(PRED), "--train_batch_size", "4", "--max_steps", "2", "--json-summary", str(tmp_path / "d.json")]
    assert run_pretraining.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x_training_0.hdf5" in err[0] and "vocab_size 1000" in err[0], err
