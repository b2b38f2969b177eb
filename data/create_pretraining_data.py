"""Text (one sentence per line, blank line between documents) -> one NVIDIA-format HDF5 shard.

Instances follow the Google BERT / NVIDIA reference: documents are repeated `dupe_factor` times,
sentences are packed into chunks up to a target length (shorter with `short_seq_prob`), a random
split gives segments A and B, B is a random other document's text half of the time (label 1), the
pair is truncated from a random end of the longer side, and `masked_lm_prob` of the WordPiece
tokens (never [CLS]/[SEP]) are picked for prediction: 80 % become [MASK], 10 % stay, 10 % become a
random vocabulary token. Positions are stored sorted and zero-padded.

Random numbers are drawn in NVIDIA's order from one `random.Random(--random_seed)`, so an input
that fits in one chunk gives NVIDIA's shard element by element for the same flags and seed.

Unlike NVIDIA's script, memory stays bounded on multi-GB inputs: documents are streamed in chunks
of `--chunk_mb` of text, each chunk is tokenised and turned into instances on its own (random next
segments come from the same chunk, instances are shuffled within the chunk), and its rows are
appended to the HDF5 file before the next chunk is read. Chunk k always uses the RNG of
`chunk_rng(--random_seed, k)`, so the output is identical for any `--n_processes`.

The file is written to a temporary name, synced and renamed at the end (atomic_io.atomic_path): a
shard that exists is complete, also after a power loss. The temporary files of this output that killed
runs left are removed when the next run starts.
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import sys
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import h5py
import numpy as np

if __package__ in (None, ""):  # run as a script: make the flat project layout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atomic_io import atomic_path, refuse_overwriting_inputs, remove_stale_temps  # noqa: E402
from data.parallel import ordered_map  # noqa: E402
from tokenization import BertTokenizer  # noqa: E402

# Dataset name -> on-disk dtype (NVIDIA's writer); shapes are [N, seq], [N, max_pred] or [N].
SHARD_DTYPES = {
    "input_ids": np.int32,
    "input_mask": np.int8,
    "segment_ids": np.int8,
    "masked_lm_positions": np.int32,
    "masked_lm_ids": np.int32,
    "next_sentence_labels": np.int8,
}
Document = list  # list[list[int]]: the token ids of each sentence


@dataclass(frozen=True)
class InstanceConfig:
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 10
    do_whole_word_mask: bool = False

    def validate(self) -> None:
        if self.max_seq_length < 5:
            raise ValueError(f"--max_seq_length {self.max_seq_length} is too small: [CLS] A [SEP] B [SEP] "
                             f"needs at least 5 tokens (NVIDIA uses 128 for phase 1, 512 for phase 2)")
        if self.max_predictions_per_seq < 1:
            raise ValueError(f"--max_predictions_per_seq must be >= 1, got {self.max_predictions_per_seq}")
        if not 0.0 < self.masked_lm_prob <= 1.0:
            raise ValueError(f"--masked_lm_prob must be in (0, 1], got {self.masked_lm_prob}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"--short_seq_prob must be in [0, 1], got {self.short_seq_prob}")
        if self.dupe_factor < 1:
            raise ValueError(f"--dupe_factor must be >= 1, got {self.dupe_factor}")


@dataclass(frozen=True)
class VocabInfo:
    """What instance creation needs from the vocab, as ids."""
    cls_id: int
    sep_id: int
    mask_id: int
    size: int
    continuation: frozenset  # ids of "##" pieces (whole-word masking joins them to the word)

    @classmethod
    def from_tokenizer(cls, tokenizer: BertTokenizer, vocab_file: str) -> "VocabInfo":
        missing = [t for t in ("[CLS]", "[SEP]", "[MASK]") if t not in tokenizer.vocab]
        if missing:
            raise ValueError(f"vocab {vocab_file!r} has no {', '.join(missing)} token: pass a BERT "
                             f"WordPiece vocab (e.g. vocab/vocab)")
        if tokenizer.vocab.get("[PAD]", 0) != 0:
            raise ValueError(f"vocab {vocab_file!r} has [PAD] at id {tokenizer.vocab['[PAD]']}: shards pad "
                             f"with id 0, so [PAD] must be the first line of the vocab")
        return cls(tokenizer.vocab["[CLS]"], tokenizer.vocab["[SEP]"], tokenizer.vocab["[MASK]"],
                   len(tokenizer.vocab),
                   frozenset(i for t, i in tokenizer.vocab.items() if t.startswith("##")))


@dataclass
class Instance:
    tokens: list[int]          # [CLS] A [SEP] B [SEP], masking applied
    len_a: int                 # tokens in A (segment 0 also covers [CLS] and the first [SEP])
    is_random_next: bool
    masked_positions: list[int]
    masked_ids: list[int]      # original ids at masked_positions


# ----------------------------------------------------------------------------- reading text


def expand_input_files(specs: Sequence[str]) -> list[str]:
    """Files named by --input_file: paths, directories (their *.txt), globs, comma-separated lists."""
    files: list[str] = []
    for spec in specs:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if os.path.isdir(part):
                found = sorted(glob.glob(os.path.join(part, "*.txt")))
                if not found:
                    raise FileNotFoundError(f"--input_file directory {part!r} has no .txt files")
                files.extend(found)
            elif os.path.isfile(part):
                files.append(part)
            elif glob.has_magic(part) and glob.glob(part):
                files.extend(sorted(p for p in glob.glob(part) if os.path.isfile(p)))
            else:
                raise FileNotFoundError(f"--input_file {part!r} does not exist (give a text file, a folder of "
                                        f".txt files, or a glob)")
    return files


def read_documents(paths: Iterable[str], on_bytes: Callable[[int], None] = lambda n: None
                   ) -> Iterator[list[str]]:
    """Stream documents (lists of non-empty lines); a blank line or the end of a file ends one."""
    for path in paths:
        doc: list[str] = []
        with open(path, "rb") as f:
            for raw in f:
                on_bytes(len(raw))
                for line in _text_lines(raw):
                    if line:
                        doc.append(line)
                    elif doc:
                        yield doc
                        doc = []
        if doc:
            yield doc


def _text_lines(raw: bytes) -> list[str]:
    """The stripped lines in one LF-ended line of the file. CR LF and a lone CR also end a line, as in
    a file opened in text mode (NVIDIA's script reads it so): old-Mac line endings, or a stray CR
    before an empty line, separate sentences and documents there too."""
    text = raw.decode("utf-8", errors="replace")
    if "\r" not in text:
        return [text.strip()]
    return [line.strip() for line in text.removesuffix("\n").removesuffix("\r").split("\r")]


def chunk_documents(documents: Iterable[list[str]], chunk_chars: int) -> Iterator[list[list[str]]]:
    """Group documents into chunks of about `chunk_chars` characters and at least two documents
    (a random next segment must come from another document: alone in its chunk, a long document
    would get label 0 for B drawn from anywhere in itself). A short or single-document last chunk
    is merged into the one before, so no chunk is too small to draw random next segments from."""
    pending: list[list[str]] | None = None
    chunk: list[list[str]] = []
    size = 0
    for doc in documents:
        chunk.append(doc)
        size += sum(len(line) for line in doc)
        if size >= chunk_chars and len(chunk) >= 2:
            if pending is not None:
                yield pending
            pending, chunk, size = chunk, [], 0
    if pending is not None and chunk and (size < chunk_chars // 2 or len(chunk) < 2):
        pending.extend(chunk)
        chunk = []
    if pending is not None:
        yield pending
    if chunk:
        yield chunk


def tokenize_documents(tokenizer: BertTokenizer, documents: list[list[str]]) -> list[Document]:
    """Token ids per sentence per document; sentences and documents left empty are dropped."""
    lines = [line for doc in documents for line in doc]
    ids = tokenizer.encode_batch(lines)
    out: list[Document] = []
    start = 0
    for doc in documents:
        sentences = [s for s in ids[start:start + len(doc)] if s]
        start += len(doc)
        if sentences:
            out.append(sentences)
    return out


# ----------------------------------------------------------------------------- instances


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int,
                      rng: random.Random) -> tuple[list[int], list[int]]:
    """Trim the longer segment one token at a time until the pair fits, each cut from its front or
    back by one `rng.random()` (< 0.5: front), drawn in NVIDIA's order."""
    a0, a1, b0, b1 = 0, len(tokens_a), 0, len(tokens_b)
    coin = rng.random
    while (a1 - a0) + (b1 - b0) > max_num_tokens:
        if a1 - a0 > b1 - b0:
            if coin() < 0.5:
                a0 += 1
            else:
                a1 -= 1
        elif coin() < 0.5:
            b0 += 1
        else:
            b1 -= 1
    return tokens_a[a0:a1], tokens_b[b0:b1]


def shuffle(items: list, rng: random.Random) -> None:
    """In place, exactly as `rng.shuffle(items)` (same permutation, same draws), about twice as fast:
    Fisher-Yates from the back, each index drawn by rejection from `bit_length` random bits, the
    way `random.Random._randbelow` does, with the bit length worked out once per power of two."""
    getrandbits = rng.getrandbits
    i = len(items) - 1
    while i > 0:
        k = (i + 1).bit_length()
        stop = (1 << (k - 1)) - 2  # i + 1 has k bits for every i in (stop, current i]
        for i in range(i, stop, -1):
            j = getrandbits(k)
            while j > i:
                j = getrandbits(k)
            items[i], items[j] = items[j], items[i]
        i = stop


def create_masked_lm_predictions(tokens: list[int], cfg: InstanceConfig, vocab: VocabInfo,
                                 rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """Pick tokens to predict and corrupt them 80/10/10; returns (tokens, sorted positions, ids).
    `tokens` is [CLS] A [SEP] B [SEP]."""
    num_to_predict = min(cfg.max_predictions_per_seq,
                         max(1, int(round(len(tokens) * cfg.masked_lm_prob))))
    if cfg.do_whole_word_mask:
        picked = _pick_whole_words(tokens, num_to_predict, vocab, rng)
    else:  # every candidate is shuffled, not sampled, as in NVIDIA's script: the same draws follow
        picked = _mask_candidates(tokens, vocab)
        shuffle(picked, rng)
        del picked[num_to_predict:]

    output = list(tokens)
    coin = rng.random
    for index in picked:
        if coin() < 0.8:
            output[index] = vocab.mask_id
        elif coin() < 0.5:
            pass  # keep the original token
        else:
            output[index] = rng.randint(0, vocab.size - 1)
    picked.sort()
    return output, picked, [tokens[i] for i in picked]


def _mask_candidates(tokens: list[int], vocab: VocabInfo) -> list[int]:
    """Every position but those of [CLS] and [SEP], also ones the text itself contained."""
    if tokens.count(vocab.cls_id) == 1 and tokens.count(vocab.sep_id) == 2:  # just the frame's
        middle = tokens.index(vocab.sep_id)
        return [*range(1, middle), *range(middle + 1, len(tokens) - 1)]
    return [i for i, t in enumerate(tokens) if t != vocab.cls_id and t != vocab.sep_id]


def _pick_whole_words(tokens: list[int], num_to_predict: int, vocab: VocabInfo,
                      rng: random.Random) -> list[int]:
    """Positions of whole words ("##" pieces join the word before) until num_to_predict is reached."""
    words: list[list[int]] = []
    for i, token in enumerate(tokens):
        if token == vocab.cls_id or token == vocab.sep_id:
            continue
        if words and token in vocab.continuation:
            words[-1].append(i)
        else:
            words.append([i])
    shuffle(words, rng)
    picked: list[int] = []
    for word in words:
        if len(picked) >= num_to_predict:
            break
        if len(picked) + len(word) <= num_to_predict:  # a word that no longer fits: a shorter one may
            picked.extend(word)
    return picked


def create_instances_from_document(documents: list[Document], doc_index: int, cfg: InstanceConfig,
                                   vocab: VocabInfo, rng: random.Random) -> list[Instance]:
    document = documents[doc_index]
    max_num_tokens = cfg.max_seq_length - 3  # [CLS], [SEP], [SEP]
    # Mostly fill the sequence; sometimes a short one, so fine-tuning lengths are seen in training.
    target_length = max_num_tokens
    if rng.random() < cfg.short_seq_prob:
        target_length = rng.randint(2, max_num_tokens)

    instances: list[Instance] = []
    chunk: list[list[int]] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target_length:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = list(chain.from_iterable(chunk[:a_end]))
            tokens_b: list[int] = []
            is_random_next = len(chunk) == 1 or rng.random() < 0.5
            if is_random_next:
                target_b_length = target_length - len(tokens_a)
                for _ in range(10):  # look for another document
                    random_index = rng.randint(0, len(documents) - 1)
                    if random_index != doc_index:
                        break
                if random_index == doc_index:
                    is_random_next = False  # only one document to draw from
                random_document = documents[random_index]
                for j in range(rng.randint(0, len(random_document) - 1), len(random_document)):
                    tokens_b.extend(random_document[j])
                    if len(tokens_b) >= target_b_length:
                        break
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            else:
                tokens_b = list(chain.from_iterable(chunk[a_end:]))
            tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            tokens = [vocab.cls_id, *tokens_a, vocab.sep_id, *tokens_b, vocab.sep_id]
            tokens, positions, ids = create_masked_lm_predictions(tokens, cfg, vocab, rng)
            instances.append(Instance(tokens, len(tokens_a), is_random_next, positions, ids))
            chunk, chunk_length = [], 0
        i += 1
    return instances


def instances_to_arrays(instances: list[Instance], cfg: InstanceConfig) -> dict[str, np.ndarray]:
    n, seq, pred = len(instances), cfg.max_seq_length, cfg.max_predictions_per_seq
    arrays = {name: np.zeros((n, seq) if name in ("input_ids", "input_mask", "segment_ids")
                             else (n, pred) if name.startswith("masked_lm") else (n,), dtype=dtype)
              for name, dtype in SHARD_DTYPES.items()}
    for row, inst in enumerate(instances):
        length = len(inst.tokens)
        arrays["input_ids"][row, :length] = inst.tokens
        arrays["input_mask"][row, :length] = 1
        arrays["segment_ids"][row, inst.len_a + 2:length] = 1  # B and the final [SEP]
        k = len(inst.masked_positions)
        arrays["masked_lm_positions"][row, :k] = inst.masked_positions
        arrays["masked_lm_ids"][row, :k] = inst.masked_ids
        arrays["next_sentence_labels"][row] = int(inst.is_random_next)
    return arrays


def create_chunk_arrays(documents: list[Document], cfg: InstanceConfig, vocab: VocabInfo,
                        rng: random.Random) -> dict[str, np.ndarray]:
    """All instances of one chunk (dupe_factor passes), shuffled, as shard arrays."""
    documents = list(documents)
    rng.shuffle(documents)
    passes = []
    for _ in range(cfg.dupe_factor):
        instances = [inst for d in range(len(documents))
                     for inst in create_instances_from_document(documents, d, cfg, vocab, rng)]
        passes.append(instances_to_arrays(instances, cfg))  # compact before the next pass
    arrays = {name: np.concatenate([p[name] for p in passes]) for name in SHARD_DTYPES}
    order = list(range(len(arrays["input_ids"])))
    rng.shuffle(order)
    return {name: a[order] for name, a in arrays.items()}


def chunk_rng(seed: int, chunk_index: int) -> random.Random:
    """The first chunk's RNG is seeded like NVIDIA's only one, so an input of one chunk gives
    NVIDIA's shard; each later chunk gets a stream of its own (a str seed is hashed with SHA-512:
    the same in every process, and no other --random_seed's first chunk)."""
    return random.Random(seed if chunk_index == 0 else f"{seed}:{chunk_index}")


# ----------------------------------------------------------------------------- chunk workers


class ChunkProcessor:
    """Tokenise a chunk of raw documents and build its instances (one per process)."""

    def __init__(self, vocab_file: str, do_lower_case: bool, cfg: InstanceConfig, seed: int):
        self.tokenizer = BertTokenizer(vocab_file, do_lower_case=do_lower_case)
        self.vocab = VocabInfo.from_tokenizer(self.tokenizer, vocab_file)
        self.cfg = cfg
        self.seed = seed

    def __call__(self, chunk_index: int, raw_documents: list[list[str]]) -> dict[str, np.ndarray]:
        documents = tokenize_documents(self.tokenizer, raw_documents)
        if not documents:
            return instances_to_arrays([], self.cfg)
        return create_chunk_arrays(documents, self.cfg, self.vocab, chunk_rng(self.seed, chunk_index))


_worker: ChunkProcessor | None = None  # one per process, set by ordered_map's initializer


def _init_worker(*args) -> None:
    global _worker
    _worker = ChunkProcessor(*args)


def _run_worker(indexed_chunk: tuple[int, list[list[str]]]) -> dict[str, np.ndarray]:
    return _worker(*indexed_chunk)


def process_chunks(chunks: Iterable[list[list[str]]], processor_args: tuple, n_processes: int
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Chunk results in input order, at most 2 chunks per process in flight (bounded memory)."""
    if n_processes > 1:
        # The Rust tokenizer's own thread pool would oversubscribe the cores the workers use.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return ordered_map(_run_worker, enumerate(chunks), n_processes, _init_worker, processor_args)


# ----------------------------------------------------------------------------- output


class ShardWriter:
    """Appends rows to a new gzip HDF5 file (create_shard gives it atomic_io's temporary path)."""

    def __init__(self, path: str | os.PathLike, cfg: InstanceConfig):
        self.file = h5py.File(path, "w")
        self.rows = 0
        widths = {"input_ids": cfg.max_seq_length, "input_mask": cfg.max_seq_length,
                  "segment_ids": cfg.max_seq_length, "masked_lm_positions": cfg.max_predictions_per_seq,
                  "masked_lm_ids": cfg.max_predictions_per_seq}
        for name, dtype in SHARD_DTYPES.items():
            shape = (0, widths[name]) if name in widths else (0,)
            chunks = (256, widths[name]) if name in widths else (4096,)
            self.file.create_dataset(name, shape=shape, maxshape=(None,) + shape[1:], dtype=dtype,
                                     chunks=chunks, compression="gzip")

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(arrays["input_ids"])
        for name in SHARD_DTYPES:
            dataset = self.file[name]
            dataset.resize(self.rows + n, axis=0)
            dataset[self.rows:] = arrays[name]
        self.rows += n

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()  # before atomic_path syncs and renames (or deletes) the file


def create_shard(input_files: Sequence[str], output_file: str, vocab_file: str, cfg: InstanceConfig,
                 do_lower_case: bool = True, random_seed: int = 12345, n_processes: int = 1,
                 chunk_mb: float = 4.0, progress: bool = True) -> int:
    """Write one HDF5 shard from text files; returns the number of instances."""
    from tqdm import tqdm

    cfg.validate()
    files = expand_input_files(input_files)
    refuse_overwriting_inputs(output_file, [("--vocab_file", vocab_file), *(("--input_file", f) for f in files)],
                              "--output_file")
    processor_args = (vocab_file, bool(do_lower_case), cfg, random_seed)
    ChunkProcessor(*processor_args)  # fail on a bad vocab here, not inside a worker
    total = sum(os.path.getsize(f) for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(output_file),
               disable=not progress)
    documents = read_documents(files, on_bytes=bar.update)
    chunks = chunk_documents(documents, max(1, int(chunk_mb * 2**20)))
    remove_stale_temps(output_file)  # each killed run leaves one shard-sized temp file
    try:
        # atomic_path syncs the data before the rename: after a power loss a shard that exists is
        # complete, which bertPrep relies on when it skips existing shards.
        with atomic_path(output_file) as tmp, ShardWriter(tmp, cfg) as writer:
            for arrays in process_chunks(chunks, processor_args, max(1, n_processes)):
                writer.append(arrays)
                bar.set_postfix(instances=writer.rows)
            if writer.rows == 0:
                raise ValueError(f"no instances made from {', '.join(files)}: the input must be text with one "
                                 f"sentence per line and a blank line between documents")
    finally:
        bar.close()
    return writer.rows


# ----------------------------------------------------------------------------- CLI


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false), got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab_file", required=True, help="WordPiece vocab (one token per line)")
    p.add_argument("--input_file", required=True, nargs="+",
                   help="text file(s): paths, folders of .txt files, globs or comma-separated lists")
    p.add_argument("--output_file", required=True, help="the .hdf5 shard to write")
    p.add_argument("--bert_model", default="bert-large-uncased", help="unused; kept for NVIDIA's CLI")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--dupe_factor", type=int, default=10, help="passes over the input, each with new masks")
    p.add_argument("--max_predictions_per_seq", type=int, default=20)
    p.add_argument("--masked_lm_prob", type=float, default=0.15)
    p.add_argument("--short_seq_prob", type=float, default=0.1)
    p.add_argument("--do_lower_case", type=str2bool, nargs="?", const=True, default=True,
                   help="lower-case and strip accents (default); `--do_lower_case 0` or --no_lower_case "
                        "keeps case, for cased vocabs")
    p.add_argument("--no_lower_case", dest="do_lower_case", action="store_false")
    p.add_argument("--do_whole_word_mask", action="store_true",
                   help="mask all pieces of a word together (Google's option; off in NVIDIA's data)")
    p.add_argument("--random_seed", type=int, default=12345)
    p.add_argument("--n_processes", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: every core)")
    p.add_argument("--chunk_mb", type=float, default=4.0,
                   help="MB of text per independent chunk (bounds memory; part of what the seed reproduces)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = InstanceConfig(args.max_seq_length, args.max_predictions_per_seq, args.masked_lm_prob,
                         args.short_seq_prob, args.dupe_factor, args.do_whole_word_mask)
    try:
        n = create_shard(args.input_file, args.output_file, args.vocab_file, cfg, args.do_lower_case,
                         args.random_seed, args.n_processes, args.chunk_mb, not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"create_pretraining_data: {e}")
    print(f"wrote {n} instances to {args.output_file}")


if __name__ == "__main__":
    main()
