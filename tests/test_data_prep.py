"""data/: sentence splitting, balanced sharding, text formatting, demo corpus/vocab/task,
downloaders against a local HTTP server, and the bertPrep pipeline with NVIDIA's folder names."""
import collections
import functools
import hashlib
import http.server
import os
import random
import threading
import zipfile
from pathlib import Path

import h5py
import pytest

from data import bertPrep, demo_corpus, downloaders, sharding, text_formatting

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- sentences and shards


def test_regex_sentence_splitter():
    text = ("Mr. Smith went to Washington on Jan. 5. He said \"Hello!\" Then (e.g. here) it ended. "
            "The U.S. economy grew 3.5 percent. J. R. R. Tolkien wrote books. Is it? Yes.")
    assert sharding.split_sentences_regex(text) == [
        "Mr. Smith went to Washington on Jan. 5.", "He said \"Hello!\"", "Then (e.g. here) it ended.",
        "The U.S. economy grew 3.5 percent.", "J. R. R. Tolkien wrote books.", "Is it?", "Yes."]
    assert sharding.split_sentences_regex("no capital after. this stays one") == ["no capital after. this stays one"]


def test_balance_is_within_one_item_and_ends_with_more_shards_than_items():
    rng = random.Random(0)
    sizes = [rng.randint(1, 1000) for _ in range(500)]
    assignment = sharding.balance(sizes, 7)
    loads = [sum(s for s, a in zip(sizes, assignment) if a == k) for k in range(7)]
    assert max(loads) - min(loads) <= max(sizes)
    assert sorted(set(sharding.balance([5, 3], 4))) == [0, 1]  # two shards stay empty, no endless loop


def write_articles(path: Path, n: int) -> list[list[str]]:
    rng = random.Random(1)
    articles = [[f"Article {a} sentence {s} has {rng.randint(1, 99)} words." for s in range(rng.randint(1, 9))]
                for a in range(n)]
    path.write_text("".join(" ".join(a) + "\n\n" for a in articles))
    return articles


def read_docs(path: Path) -> list[list[str]]:
    return [block.split("\n") for block in path.read_text().strip("\n").split("\n\n") if block]


def test_shard_articles_keeps_every_sentence_once_and_balances(tmp_path):
    articles = write_articles(tmp_path / "in.txt", 400)
    result = sharding.shard_articles([str(tmp_path / "in.txt")], str(tmp_path / "out"), "wiki", 5, 2, 0.2,
                                     "regex", n_processes=2, seed=3)
    assert [Path(f).name for f in result.training_files] == [f"wiki_training_{i}.txt" for i in range(5)]
    assert [Path(f).name for f in result.test_files] == ["wiki_test_0.txt", "wiki_test_1.txt"]
    docs = {name: read_docs(Path(name)) for name in result.training_files + result.test_files}
    all_docs = sorted(d for ds in docs.values() for d in ds)
    assert all_docs == sorted(articles)  # one sentence per line, blank line between articles
    test_docs = sum(len(docs[f]) for f in result.test_files)
    assert 0.12 < test_docs / len(articles) < 0.28
    sizes = [Path(f).stat().st_size for f in result.training_files]
    assert max(sizes) - min(sizes) < 200  # within about one article
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    again = sharding.shard_articles([str(tmp_path / "in.txt")], str(tmp_path / "out2"), "wiki", 5, 2, 0.2,
                                    "regex", n_processes=1, seed=3)
    assert [Path(f).read_text() for f in again.training_files] == [Path(f).read_text() for f in result.training_files]


def test_sharding_removes_the_sentence_files_a_kill_left_and_nothing_else(tmp_path):
    write_articles(tmp_path / "in.txt", 20)
    out = tmp_path / "out"
    out.mkdir()
    stale, kept = out / ".wiki_sentences.4242.tmp", [out / ".books_sentences.4242.tmp", out / "wiki_notes.tmp"]
    for path in [stale] + kept:
        path.write_text("partial")
    sharding.shard_articles([str(tmp_path / "in.txt")], str(out), "wiki", 2, 1, 0.2, "regex")
    assert not stale.exists() and all(p.exists() for p in kept)


def test_sharding_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_formatting"):
        sharding.shard_articles([str(tmp_path / "missing.txt")], str(tmp_path), "x", 2, 1, 0.1, "regex")
    with pytest.raises(ValueError, match="fraction_test_set"):
        sharding.shard_articles([str(tmp_path / "x")], str(tmp_path), "x", 2, 1, 1.5, "regex")


# ----------------------------------------------------------------------------- text formatting


def test_wikiextractor_formatting_drops_titles(tmp_path):
    extracted = tmp_path / "extracted" / "AA"
    extracted.mkdir(parents=True)
    (extracted / "wiki_00").write_text(
        '<doc id="1" url="u" title="Anarchism">\nAnarchism\n\nAnarchism is a philosophy.\nIt is old.\n</doc>\n'
        '<doc id="2" url="u" title="Empty">\nEmpty\n\n</doc>\n'
        '<doc id="3" url="u" title="Autism">\nAutism\n\nAutism is a condition.\n\nSecond paragraph.\n</doc>\n')
    out = tmp_path / "formatted" / "wiki.txt"
    assert text_formatting.format_wikicorpus(str(tmp_path / "extracted"), str(out)) == 2
    assert out.read_text() == ("Anarchism is a philosophy. It is old.\n\n"
                               "Autism is a condition. Second paragraph.\n\n")
    with pytest.raises(FileNotFoundError, match="WikiExtractor"):
        text_formatting.format_wikicorpus(str(tmp_path / "nothing"), str(out))


def test_books_and_plain_text_formatting(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("Chapter one.\n\nIt was dark.\n")
    (tmp_path / "books" / "b.txt").write_text("Another book.\n")
    out = tmp_path / "books.txt"
    assert text_formatting.format_books(str(tmp_path / "books"), str(out)) == 2
    assert out.read_text() == "Chapter one. It was dark.\n\nAnother book.\n\n"
    (tmp_path / "plain.txt").write_text("Doc one line a.\nline b.\n\n\nDoc two.\n")
    assert text_formatting.format_plain_text([str(tmp_path / "plain.txt")], str(out)) == 2
    assert out.read_text() == "Doc one line a. line b.\n\nDoc two.\n\n"
    with pytest.raises(FileNotFoundError, match="BooksCorpus can no longer be downloaded"):
        text_formatting.format_books(str(tmp_path / "none"), str(out))


def test_formatting_nothing_keeps_an_earlier_output_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("Chapter one.\n")
    out = tmp_path / "formatted_one_article_per_line" / "bookscorpus_one_book_per_line.txt"
    assert text_formatting.format_books(str(tmp_path / "books"), str(out)) == 1
    (tmp_path / "books" / "a.txt").write_text("\n\n")  # e.g. a copy that is still being made
    monkeypatch.setenv("BERT_PREP_WORKING_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        bertPrep.main(["--action", "text_formatting", "--dataset", "bookscorpus", "--books_dir", str(tmp_path / "books")])
    message = str(info.value)
    assert message.startswith("bertPrep: no articles") and str(out) in message and "\n" not in message, message
    assert out.read_text() == "Chapter one.\n\n" and [p.name for p in out.parent.iterdir()] == [out.name]


# ----------------------------------------------------------------------------- demo corpus


def test_prose_filter_drops_code_grammar_and_headings():
    text = ("Heading\n*******\n\nThe statement binds a name to a value. It is simple.\n\n"
            "   x = 1\n   y = 2\n\n>>> print(1)\n1\n\nstmt ::= target \"=\" expr\n\n"
            "* A bullet item explains one more rule here.\n")
    assert demo_corpus.prose_sentences(text) == [
        "The statement binds a name to a value.", "A bullet item explains one more rule here."]


def test_wordpiece_trainer_is_deterministic_and_bert_shaped():
    counts = {"running": 30, "runner": 12, "run": 40, "jumping": 20, "jumped": 9, "walk": 5, "walked": 7}
    vocab = demo_corpus.train_wordpiece(dict(counts), vocab_size=60)
    assert vocab == demo_corpus.train_wordpiece(dict(reversed(list(counts.items()))), vocab_size=60)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) == len(set(vocab)) <= 60
    assert {"r", "##u", "##n"} <= set(vocab) and "run" in vocab  # characters, then frequent merges


def test_demo_vocab_copy_interrupted_midway_leaves_no_truncated_vocab(tmp_path, monkeypatch):
    """bertPrep takes an existing vocab.txt as done, so a half-copied one would be used."""
    def killed_midway(src, dst, **_):
        Path(dst).write_bytes(Path(src).read_bytes()[:1000])
        raise KeyboardInterrupt

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\nold\n")
    monkeypatch.setattr(demo_corpus.shutil, "copyfile", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        demo_corpus.prepare_vocab("", str(vocab), str(ROOT / "vocab" / "vocab"), 0)
    assert vocab.read_text() == "[PAD]\nold\n" and [p.name for p in tmp_path.iterdir()] == ["vocab.txt"]
    monkeypatch.undo()
    assert demo_corpus.prepare_vocab("", str(vocab), str(ROOT / "vocab" / "vocab"), 0) == str(ROOT / "vocab" / "vocab")
    assert vocab.read_bytes() == (ROOT / "vocab" / "vocab").read_bytes()


@pytest.fixture(scope="module")
def demo_documents():
    return demo_corpus.reference_documents(), demo_corpus.library_documents()


def test_demo_corpus_format_and_learnable_task(demo_documents, tmp_path):
    reference, library = demo_documents
    assert len(reference) > 30 and len(library) > 50
    demo_corpus.write_corpus(reference + library, str(tmp_path / "corpus.txt"))
    docs = read_docs(tmp_path / "corpus.txt")
    assert len(docs) == len(reference) + len(library)
    assert all(line.strip() == line and len(line.split()) >= 4 for doc in docs for line in doc)
    assert sum(len(d) for d in docs) > 5000

    sizes = demo_corpus.write_classification_task(reference, library, str(tmp_path / "SST-2"), seed=0)
    train = (tmp_path / "SST-2" / "train.tsv").read_text().splitlines()
    dev = (tmp_path / "SST-2" / "dev.tsv").read_text().splitlines()
    test = (tmp_path / "SST-2" / "test.tsv").read_text().splitlines()
    assert train[0] == "sentence\tlabel" and dev[0] == "sentence\tlabel" and test[0] == "index\tsentence"
    assert len(train) - 1 == sizes["train"] > 1000 and len(dev) - 1 == sizes["dev"] > 200
    rows = [line.split("\t") for line in train[1:]]
    assert all(len(r) == 2 and r[1] in ("0", "1") for r in rows)
    assert 0.45 < sum(r[1] == "1" for r in rows) / len(rows) < 0.55
    # The label is learnable from the words: a bag-of-words classifier beats chance clearly.
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    vectorizer = CountVectorizer()
    model = LogisticRegression(max_iter=1000).fit(vectorizer.fit_transform([r[0] for r in rows]),
                                                  [int(r[1]) for r in rows])
    dev_rows = [line.split("\t") for line in dev[1:]]
    accuracy = model.score(vectorizer.transform([r[0] for r in dev_rows]), [int(r[1]) for r in dev_rows])
    assert accuracy > 0.75



def test_demo_word_order_task_reads_as_cola_and_only_word_order_tells(demo_documents, tmp_path):
    from processors.glue import get_task
    reference, library = demo_documents
    sizes = demo_corpus.write_word_order_task(reference + library, str(tmp_path / "CoLA"), seed=0)
    task = get_task("cola")
    train, dev = task.train_examples(tmp_path / "CoLA"), task.dev_examples(tmp_path / "CoLA", task.dev[0])
    assert (len(train), len(dev)) == (sizes["train"], sizes["dev"]) and sizes["train"] > 1000
    assert 0.45 < sum(e.label == "1" for e in train) / len(train) < 0.55
    written = {s for doc in reference + library for s in doc}
    by_words = collections.Counter(tuple(sorted(e.text_a.split())) for e in train + dev)
    for e in train + dev:
        words = e.text_a.split()
        assert (e.text_a in written) == (e.label == "1")  # a shuffled sentence is never one as written
        assert by_words[tuple(sorted(words))] == 1  # no sentence appears both kept and shuffled
    shuffled = [e.text_a.split() for e in dev if e.label == "0"]
    originals = {tuple(sorted(s.split())): s.split() for s in written}
    for words in shuffled:  # first and last words stay in place
        original = originals[tuple(sorted(words))]
        assert (words[0], words[-1]) == (original[0], original[-1]) and words != original


# ----------------------------------------------------------------------------- downloaders (local server)


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def make_zip(path: Path, members: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)


def test_glue_download_layout_and_mrpc_split(server, tmp_path):
    root, url = server
    make_zip(root / "SST-2.zip", {"SST-2/train.tsv": "sentence\tlabel\ngood film\t1\n",
                                  "SST-2/dev.tsv": "sentence\tlabel\nbad\t0\n"})
    (root / "AX.tsv").write_text("index\tsentence1\tsentence2\n0\ta\tb\n")
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (root / "train.txt").write_text(header + "1\t1\t2\tA cat.\tA feline.\n0\t3\t4\tRain.\tSun.\n1\t5\t6\tX.\tY.\n")
    (root / "test.txt").write_text(header + "1\t7\t8\tHi.\tHello.\n")
    (root / "ids.tsv").write_text("3\t4\n")
    kw = dict(cache_dir=str(tmp_path / "cache"), allow_http=True, progress=False)
    mrpc = {"msr_paraphrase_train.txt": url + "train.txt", "msr_paraphrase_test.txt": url + "test.txt",
            "dev_ids.tsv": url + "ids.tsv"}
    dl = tmp_path / "download"
    downloaders.download_glue(str(dl), ["sst-2", "mrpc", "ax"], base_url=url, mrpc_urls=mrpc, **kw)
    assert (dl / "glue" / "SST-2" / "train.tsv").read_text().endswith("good film\t1\n")
    assert (dl / "glue" / "diagnostic" / "diagnostic.tsv").is_file()
    assert (dl / "glue" / "MRPC" / "train.tsv").read_text() == header + "1\t1\t2\tA cat.\tA feline.\n1\t5\t6\tX.\tY.\n"
    assert (dl / "glue" / "MRPC" / "dev.tsv").read_text() == header + "0\t3\t4\tRain.\tSun.\n"
    assert (dl / "glue" / "MRPC" / "test.tsv").read_text().splitlines()[1] == "0\t7\t8\tHi.\tHello."
    with pytest.raises(ValueError, match="unknown GLUE task"):
        downloaders.download_glue(str(dl), ["imdb"], base_url=url, **kw)


def test_zip_with_parent_member_is_rejected(server, tmp_path):
    root, url = server
    make_zip(root / "CoLA.zip", {"CoLA/train.tsv": "ok", "../../evil.txt": "pwned"})
    dl = tmp_path / "download"
    with pytest.raises(Exception, match=r"\.\."):
        downloaders.download_glue(str(dl), ["cola"], base_url=url, cache_dir=str(tmp_path / "cache"),
                                  allow_http=True, progress=False)
    assert not list(tmp_path.rglob("evil.txt")) and not (dl / "glue" / "CoLA" / "train.tsv").exists()


def test_wrong_checksum_is_rejected(server, tmp_path):
    root, url = server
    (root / "f.bin").write_bytes(b"payload")
    dest = tmp_path / "out" / "f.bin"
    kw = dict(cache_dir=str(tmp_path / "cache"), allow_http=True, progress=False)
    with pytest.raises(Exception, match="(?i)sha-?256|checksum"):
        downloaders.fetch(url + "f.bin", str(dest), sha256="0" * 64, **kw)
    assert not dest.exists()
    good = hashlib.sha256(b"payload").hexdigest()
    assert Path(downloaders.fetch(url + "f.bin", str(dest), sha256=good, **kw)).read_bytes() == b"payload"


def test_google_weights_checked_file_by_file(server, tmp_path, monkeypatch):
    root, url = server
    good = {"vocab.txt": "[PAD]\n", "bert_config.json": "{}"}
    rel = "2018_10_18/tiny_L-1.zip"
    (root / "2018_10_18").mkdir()
    make_zip(root / rel, {f"tiny_L-1/{k}": v for k, v in good.items()})
    hashes = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in good.items()}
    kw = dict(cache_dir=str(tmp_path / "cache"), allow_http=True, progress=False)
    monkeypatch.setattr(downloaders, "GOOGLE_WEIGHTS", {rel: hashes})
    [folder] = downloaders.download_google_weights(str(tmp_path / "dl"), base_url=url, **kw)
    assert Path(folder, "vocab.txt").read_text() == "[PAD]\n"
    monkeypatch.setattr(downloaders, "GOOGLE_WEIGHTS", {rel: {**hashes, "vocab.txt": "f" * 64}})
    with pytest.raises(ValueError, match="SHA-256 mismatch.*vocab.txt"):
        downloaders.download_google_weights(str(tmp_path / "dl"), base_url=url, **kw)


def test_bookscorpus_download_explains_it_is_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("BERT_PREP_WORKING_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="can no longer be downloaded"):
        bertPrep.main(["--action", "download", "--dataset", "bookscorpus"])


# ----------------------------------------------------------------------------- bertPrep pipeline


def test_bertprep_sharding_and_hdf5_folder_names(tmp_path, monkeypatch):
    monkeypatch.setenv("BERT_PREP_WORKING_DIR", str(tmp_path))
    words = [w for w in (ROOT / "vocab" / "vocab").read_text().split("\n")[2500:6000] if w.isalpha()]
    rng = random.Random(0)
    formatted = tmp_path / "formatted_one_article_per_line" / "wikicorpus_en_one_article_per_line.txt"
    formatted.parent.mkdir()
    formatted.write_text("".join(
        " ".join(" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(6)) + "\n\n"
        for _ in range(60)))
    common = ["--dataset", "wikicorpus_en", "--n_training_shards", "3", "--n_test_shards", "1",
              "--fraction_test_set", "0.1", "--n_processes", "2", "--segmentation_method", "regex"]
    bertPrep.main(["--action", "sharding", *common])
    sharded = tmp_path / "sharded_training_shards_3_test_shards_1_fraction_0.1" / "wikicorpus_en"
    assert sorted(p.name for p in sharded.iterdir()) == [
        "wikicorpus_en_test_0.txt", *[f"wikicorpus_en_training_{i}.txt" for i in range(3)]]
    hdf5 = ["--max_seq_length", "64", "--max_predictions_per_seq", "10", "--dupe_factor", "1"]
    bertPrep.main(["--action", "create_hdf5_files", *common, *hdf5])
    out = (tmp_path / "hdf5_lower_case_1_seq_len_64_max_pred_10_masked_lm_prob_0.15_random_seed_12345_dupe_factor_1"
           / "wikicorpus_en")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["wikicorpus_en_test_0.hdf5", *[f"wikicorpus_en_training_{i}.hdf5" for i in range(3)]]
    with h5py.File(out / names[1]) as f:
        assert f["input_ids"].shape[1] == 64 and f["masked_lm_ids"].shape[1] == 10
    stamp = os.path.getmtime(out / names[1])
    bertPrep.main(["--action", "create_hdf5_files", *common, *hdf5])  # finished shards are kept
    assert os.path.getmtime(out / names[1]) == stamp


def test_bertprep_demo_rebuilds_after_a_build_interrupted_before_the_vocab(tmp_path, monkeypatch):
    """corpus.txt is written before the (slow) vocab training: a run stopped in between must not
    leave create_hdf5_files to fall back silently to another vocab."""
    monkeypatch.setenv("BERT_PREP_WORKING_DIR", str(tmp_path))
    demo = tmp_path / "download" / "demo"
    demo.mkdir(parents=True)
    (demo / "corpus.txt").write_text("First sentence here.\nSecond one.\n\nOther document.\nMore text.\n")
    builds = []

    def fake_build(out, vocab, vocab_size):
        builds.append(vocab)
        (Path(out) / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
        return {}

    monkeypatch.setattr(demo_corpus, "build_demo", fake_build)
    bertPrep.main(["--action", "text_formatting", "--dataset", "demo", "--demo_vocab", "train"])
    assert builds == ["train"]
    assert bertPrep.default_vocab(tmp_path, "demo") == str(demo / "vocab.txt")
    bertPrep.main(["--action", "text_formatting", "--dataset", "demo", "--demo_vocab", "train"])
    assert builds == ["train"]  # complete: not rebuilt
