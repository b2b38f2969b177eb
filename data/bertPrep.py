"""Data preparation driver with NVIDIA's actions, datasets and folder names.

    export BERT_PREP_WORKING_DIR=/workspace/bert/data
    python data/bertPrep.py --action download          --dataset wikicorpus_en
    python data/bertPrep.py --action text_formatting   --dataset wikicorpus_en
    python data/bertPrep.py --action sharding          --dataset wikicorpus_en
    python data/bertPrep.py --action create_hdf5_files --dataset wikicorpus_en --max_seq_length 128 \\
        --max_predictions_per_seq 20

Folders under $BERT_PREP_WORKING_DIR: download/<dataset>/, extracted/wikicorpus_en/,
formatted_one_article_per_line/, sharded_training_shards_<T>_test_shards_<S>_fraction_<F>/<dataset>/,
hdf5_lower_case_<0|1>_seq_len_<L>_max_pred_<P>_masked_lm_prob_<p>_random_seed_<s>_dupe_factor_<d>/<dataset>/.
Every step writes atomically and skips outputs that already exist, so an interrupted run is resumed
by running it again. `--dataset demo` builds a corpus from text that ships with Python (no download).
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from multiprocessing import Pool
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the flat project layout importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import downloaders, text_formatting  # noqa: E402
from data.create_pretraining_data import InstanceConfig, create_shard  # noqa: E402
from data.sharding import shard_articles  # noqa: E402

logger = logging.getLogger("bertPrep")
REPO_VOCAB = Path(__file__).resolve().parent.parent / "vocab" / "vocab"
DATASETS = ("wikicorpus_en", "bookscorpus", "books_wiki_en_corpus", "squad", "google_pretrained_weights",
            "glue", "mrpc", "sst-2", "demo", "all")
FORMATTED = {"wikicorpus_en": "wikicorpus_en_one_article_per_line.txt",
             "bookscorpus": "bookscorpus_one_book_per_line.txt",
             "demo": "demo_one_article_per_line.txt"}
BOOKS_UNAVAILABLE = ("BooksCorpus can no longer be downloaded (Smashwords blocks it; NVIDIA/DeepLearningExamples"
                     "#536): put your copy, one .txt per book, in {dir} or pass --books_dir, then run "
                     "--action text_formatting --dataset bookscorpus")


def working_dir() -> Path:
    wd = os.environ.get("BERT_PREP_WORKING_DIR")
    if not wd:
        raise SystemExit("bertPrep: set BERT_PREP_WORKING_DIR to the data folder, e.g. "
                         "export BERT_PREP_WORKING_DIR=$PWD/data_prep")
    return Path(wd)


def sharded_dir(wd: Path, args: argparse.Namespace) -> Path:
    return wd / (f"sharded_training_shards_{args.n_training_shards}_test_shards_{args.n_test_shards}"
                 f"_fraction_{args.fraction_test_set}")


def hdf5_dir(wd: Path, args: argparse.Namespace) -> Path:
    return wd / (f"hdf5_lower_case_{int(args.do_lower_case)}_seq_len_{args.max_seq_length}"
                 f"_max_pred_{args.max_predictions_per_seq}_masked_lm_prob_{args.masked_lm_prob}"
                 f"_random_seed_{args.random_seed}_dupe_factor_{args.dupe_factor}")


# ----------------------------------------------------------------------------- actions


def download(wd: Path, dataset: str, args: argparse.Namespace) -> None:
    dl = str(wd / "download")
    if dataset == "all":
        for name in ("wikicorpus_en", "squad", "google_pretrained_weights", "glue"):
            download(wd, name, args)
    elif dataset == "wikicorpus_en":
        print(downloaders.download_wikipedia(dl))
    elif dataset in ("bookscorpus", "books_wiki_en_corpus"):
        if dataset == "books_wiki_en_corpus":
            download(wd, "wikicorpus_en", args)
        books = Path(args.books_dir or wd / "download" / "bookscorpus")
        if not any(books.glob("**/*.txt")):
            raise SystemExit("bertPrep: " + BOOKS_UNAVAILABLE.format(dir=books))
    elif dataset == "squad":
        downloaders.download_squad(dl)
    elif dataset == "google_pretrained_weights":
        downloaders.download_google_weights(dl)
    elif dataset in ("glue", "mrpc", "sst-2"):
        downloaders.download_glue(dl, args.glue_tasks if dataset == "glue" else [dataset])
    elif dataset == "demo":
        from data.demo_corpus import build_demo
        print(build_demo(str(wd / "download" / "demo"), vocab=args.demo_vocab, vocab_size=args.demo_vocab_size))


def text_formatting_step(wd: Path, dataset: str, args: argparse.Namespace) -> None:
    out_dir = wd / "formatted_one_article_per_line"
    if dataset in ("books_wiki_en_corpus", "all"):
        for name in ("bookscorpus", "wikicorpus_en"):
            text_formatting_step(wd, name, args)
        return
    if dataset not in FORMATTED:
        raise SystemExit(f"bertPrep: text_formatting is for wikicorpus_en, bookscorpus, books_wiki_en_corpus "
                         f"or demo, not {dataset}")
    output = out_dir / FORMATTED[dataset]
    if dataset == "wikicorpus_en":
        extracted = wd / "extracted" / "wikicorpus_en"
        if not args.skip_wikiextractor:
            run_wikiextractor(wd / "download" / "wikicorpus_en" / "wikicorpus_en.xml.bz2", extracted, args.n_processes)
        n = text_formatting.format_wikicorpus(str(extracted), str(output))
    elif dataset == "bookscorpus":
        books = Path(args.books_dir or wd / "download" / "bookscorpus")
        if not any(books.glob("**/*.txt")):
            raise SystemExit("bertPrep: " + BOOKS_UNAVAILABLE.format(dir=books))
        n = text_formatting.format_books(str(books), str(output))
    else:
        corpus = wd / "download" / "demo" / "corpus.txt"
        # The corpus is written before the vocab is trained: one without the other is a stopped build.
        if not (corpus.is_file() and corpus.with_name("vocab.txt").is_file()):
            download(wd, "demo", args)
        n = text_formatting.format_plain_text([str(corpus)], str(output))
    print(f"{output}: {n} articles")


def run_wikiextractor(dump: Path, extracted: Path, n_processes: int) -> None:
    if any(extracted.glob("*/wiki_*")):
        return  # already extracted
    if not dump.is_file():
        raise SystemExit(f"bertPrep: {dump} is missing: run --action download --dataset wikicorpus_en first")
    cmd = [sys.executable, "-m", "wikiextractor.WikiExtractor", str(dump), "-b", "100M",
           "--processes", str(n_processes), "-o", str(extracted)]
    try:
        subprocess.run(cmd, check=True)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"bertPrep: WikiExtractor failed ({e}): pip install wikiextractor==3.0.6 "
                         f"(newer HEADs break, NVIDIA/DeepLearningExamples#1091), or extract yourself into "
                         f"{extracted} and pass --skip_wikiextractor 1") from None


def sharding_inputs(wd: Path, dataset: str, args: argparse.Namespace) -> list[str]:
    if args.input_files:
        return args.input_files.split(",")
    formatted = wd / "formatted_one_article_per_line"
    names = {"books_wiki_en_corpus": ["bookscorpus", "wikicorpus_en"]}.get(dataset, [dataset])
    if any(name not in FORMATTED for name in names):
        raise SystemExit(f"bertPrep: sharding is for wikicorpus_en, bookscorpus, books_wiki_en_corpus or demo "
                         f"(or pass --input_files), not {dataset}")
    return [str(formatted / FORMATTED[name]) for name in names]


def sharding_step(wd: Path, dataset: str, args: argparse.Namespace) -> None:
    out = sharded_dir(wd, args) / dataset
    result = shard_articles(sharding_inputs(wd, dataset, args), str(out), dataset, args.n_training_shards,
                            args.n_test_shards, args.fraction_test_set, args.segmentation_method,
                            args.n_processes, args.random_seed)
    print(f"{out}: {result.articles} articles, {result.sentences} sentences, "
          f"{len(result.training_files)} training + {len(result.test_files)} test shards")


def default_vocab(wd: Path, dataset: str) -> str:
    candidates = [wd / "download" / "demo" / "vocab.txt"] if dataset == "demo" else []
    candidates += [wd / "download" / "google_pretrained_weights" / "uncased_L-24_H-1024_A-16" / "vocab.txt",
                   REPO_VOCAB]
    return str(next(p for p in candidates if p.is_file()))


def _create_one(job: tuple) -> tuple[str, int]:
    text, output, vocab, cfg, lower, seed = job
    return output, create_shard([text], output, vocab, cfg, lower, seed, n_processes=1, progress=False)


def create_hdf5_step(wd: Path, dataset: str, args: argparse.Namespace) -> None:
    src = sharded_dir(wd, args) / dataset
    texts = sorted(src.glob(f"{dataset}_training_*.txt"), key=_shard_number)
    texts += sorted(src.glob(f"{dataset}_test_*.txt"), key=_shard_number)
    if not texts:
        raise SystemExit(f"bertPrep: no shards in {src}: run --action sharding with the same --n_training_shards, "
                         f"--n_test_shards and --fraction_test_set first")
    out = hdf5_dir(wd, args) / dataset
    vocab = args.vocab_file or default_vocab(wd, dataset)
    cfg = InstanceConfig(args.max_seq_length, args.max_predictions_per_seq, args.masked_lm_prob,
                         args.short_seq_prob, args.dupe_factor)
    jobs = []
    for text in texts:
        output = out / (text.stem + ".hdf5")
        if output.exists():
            continue  # complete: shards are renamed into place only when finished
        if text.stat().st_size == 0:
            logger.warning("skipping empty shard %s", text)
            continue
        jobs.append((str(text), str(output), vocab, cfg, args.do_lower_case, args.random_seed))
    print(f"{len(jobs)} of {len(texts)} shards to create in {out} (vocab {vocab})")
    from tqdm import tqdm
    with Pool(max(1, min(args.n_processes, len(jobs) or 1))) as pool:
        for output, n in tqdm(pool.imap_unordered(_create_one, jobs), total=len(jobs), desc="hdf5 shards"):
            logger.info("%s: %d instances", output, n)


def _shard_number(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Preprocessing application for BERT pretraining data.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--action", required=True,
                   choices=["download", "text_formatting", "sharding", "create_hdf5_files"])
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--input_files", help="comma-separated article-per-line files to shard (overrides the default)")
    p.add_argument("--books_dir", help="your BooksCorpus copy (one .txt per book)")
    p.add_argument("--glue_tasks", nargs="*", help="GLUE tasks to download (default: all nine + diagnostic)")
    p.add_argument("--n_training_shards", type=int, default=256)
    p.add_argument("--n_test_shards", type=int, default=256)
    p.add_argument("--fraction_test_set", type=float, default=0.1)
    p.add_argument("--segmentation_method", default="nltk", choices=["nltk", "regex"],
                   help="nltk punkt when installed (falls back to the regex splitter), or regex")
    p.add_argument("--n_processes", type=int, default=4)
    p.add_argument("--random_seed", type=int, default=12345)
    p.add_argument("--dupe_factor", type=int, default=5)
    p.add_argument("--masked_lm_prob", type=float, default=0.15)
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--max_predictions_per_seq", type=int, default=20)
    p.add_argument("--short_seq_prob", type=float, default=0.1)
    p.add_argument("--do_lower_case", type=int, default=1, choices=[0, 1])
    p.add_argument("--vocab_file", help="default: the dataset's vocab (demo), Google's uncased vocab, vocab/vocab")
    p.add_argument("--skip_wikiextractor", type=int, default=0, choices=[0, 1])
    p.add_argument("--demo_vocab", default="auto", help="demo vocab: auto, train or a path (see demo_corpus.py)")
    p.add_argument("--demo_vocab_size", type=int, default=8000)
    p.add_argument("--interactive_json_config_generator", help="unused; kept for NVIDIA's CLI")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    wd = working_dir()
    action = {"download": download, "text_formatting": text_formatting_step, "sharding": sharding_step,
              "create_hdf5_files": create_hdf5_step}[args.action]
    try:
        action(wd, args.dataset, args)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"bertPrep: {e}") from None


if __name__ == "__main__":
    main()
