"""Public downloads for data preparation, through `file_utils` (resumable, retried, checksummed,
safe extraction). Each downloader fills NVIDIA's folder under `$BERT_PREP_WORKING_DIR/download`.

BooksCorpus cannot be downloaded any more (Smashwords blocks the crawler; NVIDIA/
DeepLearningExamples#536, #211, #489): put your own copy, one .txt file per book, in
`download/bookscorpus/` (or pass --books_dir to bertPrep.py).
"""
from __future__ import annotations

import csv
import os
import shutil
from typing import Any

from atomic_io import atomic_text_writer

WIKI_URL = "https://dumps.wikimedia.org/enwiki/latest/enwiki-latest-pages-articles.xml.bz2"

SQUAD_FILES = {  # url -> path under download/squad (no published checksums; the dumps are fixed)
    "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json": "v1.1/train-v1.1.json",
    "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json": "v1.1/dev-v1.1.json",
    "https://worksheets.codalab.org/rest/bundles/0xbcd57bee090b421c982906709c8c27e1/contents/blob/":
        "v1.1/evaluate-v1.1.py",
    "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v2.0.json": "v2.0/train-v2.0.json",
    "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json": "v2.0/dev-v2.0.json",
    "https://worksheets.codalab.org/rest/bundles/0x6b567e1cf2e041ec80d7098f031c5c9e/contents/blob/":
        "v2.0/evaluate-v2.0.py",
}

GLUE_BASE = "https://dl.fbaipublicfiles.com/glue/data/"
GLUE_ZIPS = {"CoLA": "CoLA.zip", "SST-2": "SST-2.zip", "QQP": "QQP-clean.zip", "STS-B": "STS-B.zip",
             "MNLI": "MNLI.zip", "QNLI": "QNLI.zip", "RTE": "RTE.zip", "WNLI": "WNLI.zip"}
GLUE_TASKS = ("CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI", "diagnostic")
GLUE_TASK_ALIASES = {t.lower(): t for t in GLUE_TASKS} | {"sst": "SST-2", "sts": "STS-B", "ax": "diagnostic"}
MRPC_URLS = {
    "msr_paraphrase_train.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
    "msr_paraphrase_test.txt": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_test.txt",
    "dev_ids.tsv": GLUE_BASE + "mrpc_dev_ids.tsv",
}
DIAGNOSTIC_URL = GLUE_BASE + "AX.tsv"

GOOGLE_WEIGHTS_BASE = "https://storage.googleapis.com/bert_models/"
# zip -> SHA-256 of the files inside it, as NVIDIA's downloader checks them.
_GOOGLE_CKPT = ("bert_config.json", "bert_model.ckpt.data-00000-of-00001", "bert_model.ckpt.index",
                "bert_model.ckpt.meta", "vocab.txt")
GOOGLE_WEIGHTS = {
    "2018_10_18/uncased_L-12_H-768_A-12.zip": dict(zip(_GOOGLE_CKPT, (
        "7b4e5f53efbd058c67cda0aacfafb340113ea1b5797d9ce6ee411704ba21fcbc",
        "58580dc5e0bf0ae0d2efd51d0e8272b2f808857f0a43a88aaf7549da6d7a8a84",
        "04c1323086e2f1c5b7c0759d8d3e484afbb0ab45f51793daab9f647113a0117b",
        "dd5682170a10c3ea0280c2e9b9a45fee894eb62da649bbdea37b38b0ded5f60e",
        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"))),
    "2018_10_18/uncased_L-24_H-1024_A-16.zip": dict(zip(_GOOGLE_CKPT, (
        "bfa42236d269e2aeb3a6d30412a33d15dbe8ea597e2b01dc9518c63cc6efafcb",
        "bc6b3363e3be458c99ecf64b7f472d2b7c67534fd8f564c0556a678f90f4eea1",
        "68b52f2205ffc64dc627d1120cf399c1ef1cbc35ea5021d1afc889ffe2ce2093",
        "6fcce8ff7628f229a885a593625e3d5ff9687542d5ef128d9beb1b0c05edc4a1",
        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"))),
    "2018_10_18/cased_L-12_H-768_A-12.zip": dict(zip(_GOOGLE_CKPT, (
        "f11dfb757bea16339a33e1bf327b0aade6e57fd9c29dc6b84f7ddb20682f48bc",
        "734d5a1b68bf98d4e9cb6b6692725d00842a1937af73902e51776905d8f760ea",
        "517d6ef5c41fc2ca1f595276d6fccf5521810d57f5a74e32616151557790f7b1",
        "5f8a9771ff25dadd61582abb4e3a748215a10a6b55947cbb66d0f0ba1694be98",
        "eeaa9875b23b04b4c54ef759d03db9d1ba1554838f8fb26c5d96fa551df93d02"))),
    "2018_10_18/cased_L-24_H-1024_A-16.zip": dict(zip(_GOOGLE_CKPT, (
        "7adb2125c8225da495656c982fd1c5f64ba8f20ad020838571a3f8a954c2df57",
        "6ff33640f40d472f7a16af0c17b1179ca9dcc0373155fb05335b6a4dd1657ef0",
        "ef42a53f577fbe07381f4161b13c7cab4f4fc3b167cec6a9ae382c53d18049cf",
        "d2ddff3ed33b80091eac95171e94149736ea74eb645e575d942ec4a5e01a40a1",
        "eeaa9875b23b04b4c54ef759d03db9d1ba1554838f8fb26c5d96fa551df93d02"))),
}


def _file_utils():
    import file_utils  # imported lazily: only downloads need requests
    return file_utils


def fetch(url: str, dest: str, sha256: str | None = None, **download_kw: Any) -> str:
    """`url` at `dest` (kept if already there). The partial download lives in file_utils' cache
    (resumed on a rerun) and is moved into place only when complete and verified."""
    if os.path.isfile(dest):
        return dest
    cached = _file_utils().cached_path(url, sha256=sha256, **download_kw)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.{os.getpid()}.tmp"
    shutil.copyfile(cached, tmp)
    os.replace(tmp, dest)
    return dest


def download_wikipedia(download_dir: str, **download_kw: Any) -> str:
    return fetch(WIKI_URL, os.path.join(download_dir, "wikicorpus_en", "wikicorpus_en.xml.bz2"), **download_kw)


def download_squad(download_dir: str, **download_kw: Any) -> list[str]:
    return [fetch(url, os.path.join(download_dir, "squad", rel), **download_kw) for url, rel in SQUAD_FILES.items()]


def download_google_weights(download_dir: str, base_url: str = GOOGLE_WEIGHTS_BASE,
                            **download_kw: Any) -> list[str]:
    """Download and unzip Google's BERT checkpoints; every extracted file must match its SHA-256."""
    fu = _file_utils()
    out_dir = os.path.join(download_dir, "google_pretrained_weights")
    folders = []
    for rel, hashes in GOOGLE_WEIGHTS.items():
        folder = os.path.join(out_dir, os.path.basename(rel)[:-len(".zip")])
        if not all(os.path.isfile(os.path.join(folder, f)) for f in hashes):
            fu.safe_extract(fu.cached_path(base_url + rel, **download_kw), out_dir)
        bad = [f for f, digest in hashes.items() if fu.sha256_of(os.path.join(folder, f)) != digest]
        if bad:
            raise ValueError(f"SHA-256 mismatch in {folder}: {', '.join(bad)}; delete the folder and the "
                             f"cached zip ({base_url + rel}) and download again")
        folders.append(folder)
    return folders


def glue_task_names(tasks: list[str] | None) -> list[str]:
    if not tasks:
        return list(GLUE_TASKS)
    names = []
    for task in tasks:
        name = GLUE_TASK_ALIASES.get(task.lower())
        if name is None:
            raise ValueError(f"unknown GLUE task {task!r}: choose from {', '.join(GLUE_TASKS)}")
        names.append(name)
    return names


def download_glue(download_dir: str, tasks: list[str] | None = None, base_url: str = GLUE_BASE,
                  mrpc_urls: dict[str, str] | None = None, **download_kw: Any) -> list[str]:
    """GLUE tasks into download/glue/<Task>/ (train/dev/test.tsv), the diagnostic set into
    download/glue/diagnostic/diagnostic.tsv."""
    fu = _file_utils()
    glue_dir = os.path.join(download_dir, "glue")
    done = []
    for task in glue_task_names(tasks):
        if task == "MRPC":
            format_mrpc({name: fetch(url, os.path.join(glue_dir, "MRPC", name), **download_kw)
                         for name, url in (mrpc_urls or MRPC_URLS).items()}, os.path.join(glue_dir, "MRPC"))
        elif task == "diagnostic":
            fetch(base_url + "AX.tsv", os.path.join(glue_dir, "diagnostic", "diagnostic.tsv"), **download_kw)
        else:
            fu.safe_extract(fu.cached_path(base_url + GLUE_ZIPS[task], **download_kw), glue_dir)
        done.append(os.path.join(glue_dir, task))
    return done


def format_mrpc(files: dict[str, str], out_dir: str) -> None:
    """train/dev/test.tsv from the MSR paraphrase files and GLUE's dev ids (GLUE's own split)."""
    with open(files["dev_ids.tsv"], encoding="utf-8-sig") as f:
        dev_ids = {tuple(row[:2]) for row in csv.reader(f, delimiter="\t") if len(row) >= 2}
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    train, dev = [header], [header]
    with open(files["msr_paraphrase_train.txt"], encoding="utf-8-sig") as f:
        next(f)
        for line in f:
            row = line.rstrip("\n").split("\t")
            if len(row) == 5:
                (dev if (row[1], row[2]) in dev_ids else train).append("\t".join(row) + "\n")
    test = ["index\t#1 ID\t#2 ID\t#1 String\t#2 String\n"]
    with open(files["msr_paraphrase_test.txt"], encoding="utf-8-sig") as f:
        next(f)
        for index, line in enumerate(f):
            row = line.rstrip("\n").split("\t")
            if len(row) == 5:
                test.append("\t".join([str(index), *row[1:]]) + "\n")
    for name, lines in (("train.tsv", train), ("dev.tsv", dev), ("test.tsv", test)):
        with atomic_text_writer(os.path.join(out_dir, name)) as f:
            f.writelines(lines)
