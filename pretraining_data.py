"""Reading NVIDIA-format HDF5 pretraining shards for run_pretraining.py.

`PretrainingDataset` holds one shard in memory (as NVIDIA's loader does) after checking it, and
returns NVIDIA's item order `[input_ids, segment_ids, input_mask, masked_lm_labels,
next_sentence_labels]` as int64, `masked_lm_labels` being -1 except at the stored masked positions.

`PretrainingBatches` walks the shards the way NVIDIA's legacy loop does: per epoch the sorted file
list is shuffled with `random.Random(seed + epoch)`, rank r of W reads file `(f_id*W + r) % n`,
samples are shuffled within a file (here by a generator seeded with seed, epoch, file and rank),
and the next file is loaded in a background thread while the current one trains. Its
`state_dict()` records the exact next batch, so a resumed run continues where it stopped. Only
rank 0 saves it, and ranks reading shards of other sizes stand at other positions, so the state also
counts the batches every rank has taken (the same number on each); each rank rebuilds its own
position from that count and its files' lengths.
"""
from __future__ import annotations

import logging
import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
import torch

from batches import PretrainingBatch

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".hdf5", ".h5")
# Dataset -> which width its second axis has ("seq", "pred", or none for [N]).
SHARD_LAYOUT = {
    "input_ids": "seq",
    "input_mask": "seq",
    "segment_ids": "seq",
    "masked_lm_positions": "pred",
    "masked_lm_ids": "pred",
    "next_sentence_labels": None,
}
REMAKE_HINT = "recreate it with data/create_pretraining_data.py"


class ShardError(ValueError):
    """A pretraining shard that cannot be used; the message names the file and the problem."""


def list_shards(input_dir: str | os.PathLike) -> list[str]:
    """Sorted .hdf5/.h5 shards in a folder. As NVIDIA's loader, only names containing "training"
    are taken when there are such names (so test shards beside them are left out). A single shard
    file is also accepted."""
    path = os.fspath(input_dir)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input_dir {path!r} does not exist: pass the folder of HDF5 shards "
                                f"written by data/create_pretraining_data.py")
    shards = sorted(os.path.join(path, f) for f in os.listdir(path)
                    if f.endswith(SHARD_SUFFIXES) and os.path.isfile(os.path.join(path, f)))
    training = [f for f in shards if "training" in os.path.basename(f)]
    if training:
        return training
    if not shards:
        raise FileNotFoundError(f"--input_dir {path!r} has no .hdf5/.h5 shards: create them with "
                                f"data/create_pretraining_data.py or data/bertPrep.py")
    return shards


def shard_index_for_rank(f_id: int, rank: int, world_size: int, num_files: int) -> int:
    """Which file of the (shuffled) list rank `rank` reads at step `f_id` of an epoch (NVIDIA's rule,
    with its extra offset when there are more ranks than files)."""
    if world_size > num_files:
        remainder = world_size % num_files
        return (f_id * world_size + rank + remainder * f_id) % num_files
    return (f_id * world_size + rank) % num_files


def shard_length(path: str | os.PathLike) -> int:
    """Number of instances in a shard, from its header."""
    with h5py.File(os.fspath(path), "r") as f:
        return int(f["next_sentence_labels"].shape[0])


def masked_lm_labels(positions: torch.Tensor, ids: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[B, seq] int64 labels: -1 everywhere, ids at the masked positions. A row's valid entries end
    at its first 0 position ([CLS] sits at 0 and is never masked, so 0 marks padding)."""
    positions, ids = positions.long(), ids.long()
    valid = torch.cumsum(positions == 0, dim=1) == 0
    labels = torch.full((positions.shape[0], seq_length + 1), -1, dtype=torch.long)
    # Padding entries all land in the extra last column, which is dropped.
    labels.scatter_(1, torch.where(valid, positions, seq_length), torch.where(valid, ids, -1))
    return labels[:, :seq_length]


class PretrainingDataset(torch.utils.data.Dataset):
    """One HDF5 shard, checked and held in memory."""

    def __init__(self, path: str | os.PathLike, max_pred_length: int, vocab_size: int | None = None):
        self.path = os.fspath(path)
        self.max_pred_length = max_pred_length
        arrays = _read_shard(self.path, max_pred_length, vocab_size)
        self.arrays = {name: torch.from_numpy(a) for name, a in arrays.items()}
        self.seq_length = self.arrays["input_ids"].shape[1]

    def __len__(self) -> int:
        return len(self.arrays["next_sentence_labels"])

    def batch(self, indices: torch.Tensor | Sequence[int]) -> PretrainingBatch:
        """Rows `indices`, their masked positions and ids expanded to `masked_lm_labels`."""
        index = torch.as_tensor(indices, dtype=torch.long)
        a = {name: t[index] for name, t in self.arrays.items()}
        return PretrainingBatch(
            input_ids=a["input_ids"].long(), segment_ids=a["segment_ids"].long(), input_mask=a["input_mask"].long(),
            masked_lm_labels=masked_lm_labels(a["masked_lm_positions"], a["masked_lm_ids"], self.seq_length),
            next_sentence_labels=a["next_sentence_labels"].long())

    def __getitem__(self, index: int) -> PretrainingBatch:
        return self.batch([index])


def _read_shard(path: str, max_pred_length: int, vocab_size: int | None) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretraining shard {path!r} does not exist")
    try:
        with h5py.File(path, "r") as f:
            _check_file(f, path, max_pred_length)
            arrays = {name: _native(f[name][:]) for name in SHARD_LAYOUT}
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None
    _check_values(path, arrays, vocab_size)
    return arrays


def _native(array: np.ndarray) -> np.ndarray:
    """The array in this machine's byte order (torch cannot wrap a big-endian array)."""
    return np.asarray(array, dtype=array.dtype.newbyteorder("="))


def shard_sequence_length(path: str | os.PathLike, max_pred_length: int) -> int:
    """Check a shard's datasets, shapes and dtypes from its header alone and return its sequence length.

    Cheap (no data is read), so a run can check every shard before its first step instead of
    failing hours later when it reaches a truncated or foreign file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretraining shard {path!r} does not exist")
    try:
        with h5py.File(path, "r") as f:
            _check_file(f, path, max_pred_length)
            return int(f["input_ids"].shape[1])
    except ShardError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None


def _unreadable(path: str, error: Exception) -> ShardError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ShardError(f"shard {path!r} cannot be read, it is probably truncated or corrupt ({reason}): {REMAKE_HINT}")


def _check_file(f: h5py.File, path: str, max_pred_length: int) -> None:
    missing = [name for name in SHARD_LAYOUT if name not in f]
    if missing:
        raise ShardError(f"shard {path!r} lacks dataset(s) {', '.join(missing)} (it has "
                         f"{', '.join(sorted(f.keys())) or 'none'}): {REMAKE_HINT}")
    for name in SHARD_LAYOUT:
        _check_self_contained(f, path, name)
    _check_layout(path, {name: (f[name].shape, f[name].dtype) for name in SHARD_LAYOUT}, max_pred_length)
    for name in SHARD_LAYOUT:
        _check_stored(f[name], path, name)


def _check_self_contained(f: h5py.File, path: str, name: str) -> None:
    """A shard's datasets live in the shard: HDF5 can point a dataset at another file (an external
    link, a virtual dataset, external raw storage), which would train on whatever that file holds."""
    link = f.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise ShardError(f"shard {path!r}: {name!r} is an HDF5 {type(link).__name__}, not data stored in the "
                         f"shard: {REMAKE_HINT}")
    dataset = f[name]
    if not isinstance(dataset, h5py.Dataset):
        raise ShardError(f"shard {path!r}: {name!r} is a group, not a dataset: {REMAKE_HINT}")
    if dataset.is_virtual or dataset.id.get_create_plist().get_external_count() > 0:
        raise ShardError(f"shard {path!r}: {name!r} reads its values from other files (virtual or external "
                         f"storage), not from the shard: {REMAKE_HINT}")


def _check_stored(dataset: h5py.Dataset, path: str, name: str) -> None:
    """The rows a shard declares are rows it stores. Chunks never written read back as zeros, so a
    3 KB file can declare 10^9 rows and cost gigabytes of memory (or a day of training on zeros)."""
    if dataset.size == 0:
        return
    if dataset.chunks is None:
        stored = dataset.id.get_storage_size() >= dataset.size * dataset.dtype.itemsize
    else:
        per_axis = [-(-extent // chunk) for extent, chunk in zip(dataset.shape, dataset.chunks)]
        stored = dataset.id.get_num_chunks() >= int(np.prod(per_axis))
    if not stored and dataset.id.get_create_plist().get_layout() != h5py.h5d.COMPACT:
        raise ShardError(f"shard {path!r}: {name} declares shape {dataset.shape} but stores data for only part "
                         f"of it (the file is truncated or forged): {REMAKE_HINT}")


def _check_layout(path: str, layout: dict[str, tuple[tuple, np.dtype]], max_pred_length: int) -> None:
    n = layout["next_sentence_labels"][0][0] if layout["next_sentence_labels"][0] else 0
    widths: dict[str, int] = {}
    for name, kind in SHARD_LAYOUT.items():
        shape, dtype = layout[name]
        if dtype.kind not in "iu":
            raise ShardError(f"shard {path!r}: {name} has dtype {dtype}, expected integers "
                             f"(NVIDIA writes int32/int8): {REMAKE_HINT}")
        expected_rank = 1 if kind is None else 2
        if len(shape) != expected_rank or shape[0] != n:
            raise ShardError(f"shard {path!r}: {name} has shape {shape}, expected "
                             f"{'[N]' if kind is None else '[N, width]'} with N={n} as next_sentence_labels: "
                             f"{REMAKE_HINT}")
        if kind is not None:
            if widths.setdefault(kind, shape[1]) != shape[1]:
                raise ShardError(f"shard {path!r}: {name} has width {shape[1]} but other "
                                 f"{'sequence' if kind == 'seq' else 'prediction'} datasets have "
                                 f"{widths[kind]}: {REMAKE_HINT}")
    if n == 0:
        raise ShardError(f"shard {path!r} holds no instances: {REMAKE_HINT} from a non-empty text")
    if widths["pred"] > max_pred_length:
        raise ShardError(f"shard {path!r} has {widths['pred']} masked positions per sequence but "
                         f"--max_predictions_per_seq is {max_pred_length}: pass "
                         f"--max_predictions_per_seq {widths['pred']} (phase 2 shards use 80)")


def _check_values(path: str, a: dict[str, np.ndarray], vocab_size: int | None) -> None:
    seq = a["input_ids"].shape[1]
    positions = a["masked_lm_positions"]
    if positions.size and (positions.min() < 0 or positions.max() >= seq):
        raise ShardError(f"shard {path!r}: masked_lm_positions holds values outside [0, {seq}) "
                         f"(min {positions.min()}, max {positions.max()}): {REMAKE_HINT}")
    # Other values would crash the model far from the file (embedding index errors, CUDA asserts)
    # or, in input_mask, silently turn the additive mask into a bonus.
    for name in ("next_sentence_labels", "segment_ids", "input_mask"):
        values = a[name]
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ShardError(f"shard {path!r}: {name} must be 0 or 1, found "
                             f"{sorted(set(np.unique(values).tolist()) - {0, 1})[:5]}: {REMAKE_HINT}")
    used = np.cumsum(positions == 0, axis=1) == 0  # prediction slots before the 0 padding
    ids = {"input_ids": a["input_ids"], "masked_lm_ids": a["masked_lm_ids"][used]}
    for name, values in ids.items():
        if (values < 0).any():
            raise ShardError(f"shard {path!r}: {name} holds negative ids: {REMAKE_HINT}")
    if vocab_size is not None:
        _check_vocab_size(path, list(ids.values()), vocab_size)


def _check_vocab_size(path: str, ids: list[np.ndarray], vocab_size: int) -> None:
    """Shards made with another vocab would crash the embedding far from the file (a CUDA assert)."""
    largest = max((int(x.max()) for x in ids if x.size), default=-1)
    if largest >= vocab_size:
        raise ShardError(f"shard {path!r} holds token id {largest} but the config has vocab_size {vocab_size}: "
                         f"make the shards with the config's vocab (create_pretraining_data.py --vocab_file), "
                         f"or use the bert_config.json that matches the shards' vocab")


class PretrainingBatches:
    """Endless, resumable stream of `(f_id, batch)` over the shards of one rank, epoch after epoch.

    `batch` is `PretrainingDataset.batch` output (pinned when `pin_memory`). `epoch` and the
    position within it are in `state_dict()`; `load_state_dict` makes the next batch exactly the
    one that would have come next.
    """

    def __init__(self, files: Sequence[str], batch_size: int, max_pred_length: int, seed: int,
                 rank: int = 0, world_size: int = 1, pin_memory: bool | None = None,
                 prefetch: bool = True, vocab_size: int | None = None):
        if not files:
            raise ValueError("PretrainingBatches needs at least one shard (see list_shards)")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.files = sorted(os.fspath(f) for f in files)
        self.batch_size = batch_size
        self.max_pred_length = max_pred_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch = prefetch
        self.epoch = 0
        self.file_index = 0   # f_id within the epoch
        self.batch_index = 0  # next batch within that file
        # Rank-independent position: batches taken since the start of file `start_file_index` of
        # epoch `start_epoch` (where this stream, or the run it resumed, began at batch 0).
        self.start_epoch, self.start_file_index, self.batches_taken = 0, 0, 0
        self._lengths: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") if prefetch else None
        self._pending: tuple[str, Future] | None = None

    # ------------------------------------------------------------------ positions and files

    def epoch_files(self, epoch: int) -> list[str]:
        files = list(self.files)
        random.Random(self.seed + epoch).shuffle(files)
        return files

    def file_for(self, epoch: int, f_id: int) -> str:
        files = self.epoch_files(epoch)
        return files[shard_index_for_rank(f_id, self.rank, self.world_size, len(files))]

    def sample_order(self, epoch: int, f_id: int, n: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, f_id, self.rank])
        return torch.from_numpy(rng.permutation(n))

    def _next_position(self, epoch: int, f_id: int) -> tuple[int, int]:
        return (epoch, f_id + 1) if f_id + 1 < len(self.files) else (epoch + 1, 0)

    def _batches_in(self, path: str) -> int:
        if path not in self._lengths:
            self._lengths[path] = shard_length(path)
        return -(-self._lengths[path] // self.batch_size)

    def position_after(self, epoch: int, f_id: int, batches: int) -> tuple[int, int, int]:
        """(epoch, f_id, batch_index) of this rank after taking `batches` batches from batch 0 of
        file `f_id` of `epoch`."""
        files = self.epoch_files(epoch)
        while True:
            path = files[shard_index_for_rank(f_id, self.rank, self.world_size, len(files))]
            in_file = self._batches_in(path)
            if batches < in_file:
                return epoch, f_id, batches
            batches -= in_file
            next_epoch, f_id = self._next_position(epoch, f_id)
            if next_epoch != epoch:
                epoch, files = next_epoch, self.epoch_files(next_epoch)

    # ------------------------------------------------------------------ loading

    def _load(self, path: str) -> PretrainingDataset:
        if self._pending is not None and self._pending[0] == path:
            future = self._pending[1]
            self._pending = None
            return future.result()
        return PretrainingDataset(path, self.max_pred_length, self.vocab_size)

    def _start_prefetch(self, path: str) -> None:
        if self._pool is not None and (self._pending is None or self._pending[0] != path):
            self._pending = (path, self._pool.submit(PretrainingDataset, path, self.max_pred_length,
                                                          self.vocab_size))

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[int, PretrainingBatch]]:
        while True:
            epoch, f_id = self.epoch, self.file_index
            dataset = self._load(self.file_for(epoch, f_id))
            self._start_prefetch(self.file_for(*self._next_position(epoch, f_id)))
            order = self.sample_order(epoch, f_id, len(dataset))
            starts = range(self.batch_index * self.batch_size, len(dataset), self.batch_size)
            for start in starts:
                batch = dataset.batch(order[start:start + self.batch_size])
                if self.pin_memory:
                    batch = batch.pin_memory()
                self.batch_index += 1
                self.batches_taken += 1
                yield f_id, batch
            self.epoch, self.file_index = self._next_position(epoch, f_id)
            self.batch_index = 0

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and strings (JSON- and weights_only-safe). `epoch`, `file_index` and
        `batch_index` are this rank's; `start_*` and `batches_taken` are the same on every rank."""
        return {"epoch": self.epoch, "file_index": self.file_index, "batch_index": self.batch_index,
                "start_epoch": self.start_epoch, "start_file_index": self.start_file_index,
                "batches_taken": self.batches_taken,
                "seed": self.seed, "num_files": len(self.files), "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the exact next batch of this rank, whichever rank saved `state`."""
        if state["num_files"] != len(self.files):
            raise ValueError(f"the data position was saved with {state['num_files']} shards but "
                             f"{len(self.files)} are given: resume with the same --input_dir")
        self.epoch, self.file_index = int(state["epoch"]), int(state["file_index"])
        self.batch_index = int(state["batch_index"])
        changed = [k for k in ("seed", "world_size", "batch_size") if state[k] != getattr(self, k)]
        if changed:
            logger.warning("data position saved with other %s: resuming at the start of file %d of "
                           "epoch %d instead of the exact batch", ", ".join(changed), self.file_index, self.epoch)
            self.batch_index = 0
            self.start_epoch, self.start_file_index, self.batches_taken = self.epoch, self.file_index, 0
        else:  # a state without the count (older versions) is read as rank 0's place
            self.start_epoch = int(state.get("start_epoch", self.epoch))
            self.start_file_index = int(state.get("start_file_index", self.file_index))
            self.batches_taken = int(state.get("batches_taken", self.batch_index))
            self.epoch, self.file_index, self.batch_index = self.position_after(
                self.start_epoch, self.start_file_index, self.batches_taken)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
