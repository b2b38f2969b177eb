"""tokenization.py: exact ids against transformers / tokenizers, unicode edge cases, bad vocab
files, and property tests (hypothesis). The peers are built offline from the same vocab file."""
import hashlib
import random
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenization import (BasicTokenizer, BertTokenizer, WordpieceTokenizer, load_vocab,
                          whitespace_tokenize)
VOCAB = Path(__file__).resolve().parent.parent / "vocab" / "vocab"

# Unicode edge cases on which the reference tokenizers and this one must agree id for id.
TORTURE = [
    "",
    " ",
    "\t\n\r   \u3000\u00a0\u2002",
    "\x00\x01\x07\x1b\x7f\ufffd",
    "ctrl\x00in\x01the\x7fmiddle of\ufffdwords",
    "naïve café résumé Ångström Øresund crème brûlée",
    "ÀÉÎÕÜ ß ẞ ﬁ ﬃ ǅ İstanbul ŉ ǰ",
    "e\u0301 n\u0303 a\u0300\u0301\u0302 \u0301leading combining",
    "ΟΔΟΣ Σίσυφος ΣΣ aΣ σς",
    "zero\u200bwidth \u200c\u200d join\u2060er \ufeffbom \u00adsoft\u00adhyphen",
    "日本語の文章と中文混合English text 漢字",
    "한국어 텍스트 ㅎㅏ",
    "Здравствуй, мир! Привет",
    "مرحبا بالعالم، كيف حالك؟",
    "שָׁלוֹם עולם",
    "हिन्दी भाषा, தமிழ், ภาษาไทย",
    "👍🏽 👨\u200d👩\u200d👧 🇫🇷 😀😃 ❤️ ☃ ✓",
    "a" * 100,
    "a" * 101,
    "supercalifragilistic" * 6,
    "x" * 5000,
    "$^`~|\\{}[]<>!?¿¡«»“”‘’—–…•§¶†‡",
    "[MASK] [CLS][SEP]a[PAD]b [mask] [UNK] the [MASK].",
    "[MA\x00SK] [[MASK]] [MASK][MASK]",
    "U.S.A. e-mail don't 3.14 1,000,000 #hashtag @user http://x.org/a?b=c&d",
    "\u2028line\u2029para\x85nel\x0bvt\x0cff\x1cfs",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ １２３",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝 ℌ ① ½ ²",
    "tag\U000e0041chars \ue000private\U000f0000use",
    "unassigned\u0378code\U0001fb00points \U000e0080",
    "mixed中文and한국어andРусскийandελληνικά",
    "##ing ## # ##",
]


def pydoc_paragraphs():
    from pydoc_data.topics import topics
    return [p.strip() for text in topics.values() for p in re.split(r"\n\s*\n", text) if p.strip()]


@pytest.fixture(scope="module")
def tok():
    return BertTokenizer(VOCAB)


@pytest.fixture(scope="module")
def cased_tok():
    return BertTokenizer(VOCAB, do_lower_case=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_vocab")
    shutil.copy(VOCAB, d / "vocab.txt")
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizerFast.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def wordpiece_tok():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.BertWordPieceTokenizer(str(VOCAB))


@pytest.fixture(scope="module")
def corpus():
    paragraphs = pydoc_paragraphs()
    assert len(paragraphs) > 2000 and sum(map(len, paragraphs)) > 300_000
    return paragraphs


def hf_ids(hf, texts):
    return hf(texts, add_special_tokens=False)["input_ids"]


def wp_ids(wp, texts):
    return [e.ids for e in wp.encode_batch(texts, add_special_tokens=False)]


# --- the vocab file ----------------------------------------------------------------------------

def test_shipped_vocab_is_bert_base_uncased():
    data = VOCAB.read_bytes()
    assert hashlib.md5(data).hexdigest() == "64800d5d8528ce344256daf115d4965e"
    assert data.count(b"\n") == 30522
    vocab = load_vocab(VOCAB)
    assert len(vocab) == 30522
    assert (vocab["[PAD]"], vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]) == (0, 100, 101, 102, 103)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"[UNK]\nhello\n\nworld\n", "line 3 is blank"),
    (b"[UNK]\nhello\nhello\n", "'hello' twice (lines 2 and 3)"),
    (b"hello\nworld\n", "has no [UNK]"),
    (b"[UNK]\n\xff\xfe\x00binary\n", "is not UTF-8"),
])
def test_bad_vocab_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        BertTokenizer(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_vocab_file_names_file_and_fix(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*not found.*vocab/vocab"):
        BertTokenizer(missing)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):  # a directory without vocab.txt
        BertTokenizer(tmp_path)


def test_crlf_vocab_and_directory_loading(tmp_path):
    (tmp_path / "vocab.txt").write_bytes(b"[UNK]\r\nhello\r\n##s\r\n")
    t = BertTokenizer(tmp_path)
    assert list(t.vocab) == ["[UNK]", "hello", "##s"]
    assert t.tokenize("Hellos world") == ["hello", "##s", "[UNK]"]


def test_save_vocabulary_round_trip(tok, tmp_path):
    written = tok.save_vocabulary(tmp_path)
    assert written == str(tmp_path / "vocab.txt")
    assert (tmp_path / "vocab.txt").read_bytes() == VOCAB.read_bytes()
    other = tok.save_vocabulary(tmp_path / "copy")
    assert BertTokenizer(other).vocab == tok.vocab
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "vocab.txt"]  # no temp files left


# --- conformance with the reference tokenizers ---------------------------------------------------

def test_pydoc_corpus_slow_and_fast_match_references(tok, hf_tok, wordpiece_tok, corpus):
    reference = hf_ids(hf_tok, corpus)
    assert wp_ids(wordpiece_tok, corpus) == reference  # the two peers agree with each other
    assert sum(map(len, reference)) > 100_000
    slow = [tok.encode(text) for text in corpus]
    for text, mine, ref in zip(corpus, slow, reference):
        assert mine == ref, text[:200]
    assert tok.encode_batch(corpus) == reference


@pytest.mark.parametrize("text", TORTURE, ids=range(len(TORTURE)))
def test_torture_set_matches_references(tok, hf_tok, wordpiece_tok, text):
    reference = hf_ids(hf_tok, [text])[0]
    assert wp_ids(wordpiece_tok, [text])[0] == reference
    assert tok.encode(text) == reference
    assert tok.encode_batch([text])[0] == reference
    assert tok.convert_ids_to_tokens(reference) == hf_tok.convert_ids_to_tokens(reference)


def test_torture_set_tokens(tok):
    assert tok.tokenize("") == [] and tok.tokenize(" \t\n\u3000") == []
    assert tok.tokenize("naïve Ångström") == ["naive", "ang", "##strom"]
    assert tok.tokenize("e\u0301") == ["e"]
    assert tok.tokenize("日本語") == ["日", "本", "語"]
    assert tok.tokenize("zero\u200bwidth") == tok.tokenize("zerowidth")  # U+200B is Cf: removed
    assert tok.tokenize("ctrl\x00in\x7fside") == tok.tokenize("ctrlinside") != tok.tokenize("ctrl in side")
    assert tok.tokenize("a" * 100) != ["[UNK]"] and tok.tokenize("a" * 101) == ["[UNK]"]
    assert tok.tokenize("the [MASK]. a[SEP]b [mask]") == ["the", "[MASK]", ".", "a", "[SEP]", "b", "[", "mask", "]"]
    assert tok.tokenize("ΟΔΟΣ") == ["ο", "##δ", "##ο", "##σ"]  # per-character lower-casing: no final ς
    assert tok.tokenize("$5^2`") == ["$", "5", "^", "2", "`"]  # ASCII symbols are BERT punctuation


def test_cased_mode_keeps_case_and_accents(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    extra = ["Héllo", "WORLD", "Ångström", "##É", "É", "Σ", "İ"]
    (tmp_path / "vocab.txt").write_text(VOCAB.read_text(encoding="utf-8") + "\n".join(extra) + "\n", encoding="utf-8")
    cased = BertTokenizer(tmp_path, do_lower_case=False)
    assert cased.tokenize("Héllo WORLD, Ångström ÉÉ ΟΔΟΣ İ") == [
        "Héllo", "WORLD", ",", "Ångström", "É", "##É", "[UNK]", "İ"]
    hf = transformers.BertTokenizerFast.from_pretrained(str(tmp_path), do_lower_case=False)
    wp = tokenizers.BertWordPieceTokenizer(str(tmp_path / "vocab.txt"), lowercase=False)
    texts = TORTURE + extra + pydoc_paragraphs()[:300]
    reference = hf_ids(hf, texts)
    assert wp_ids(wp, texts) == reference
    assert [cased.encode(t) for t in texts] == reference
    assert cased.encode_batch(texts) == reference
    assert BertTokenizer(tmp_path).tokenize("Héllo") == ["hello"]  # uncased strips and lowers


def test_characters_newer_than_rust_tables_follow_transformers(tok, hf_tok):
    # BertTokenizerFast's Unicode tables predate U+2E43 (Po since Unicode 10) and start CJK
    # Extension E at U+2B920: to it both are letters, so "a<char>b" is one word, here too. A lone
    # surrogate, which Rust cannot take, goes through the Python path of encode_batch.
    texts = ["a\u2e43b and more words", "x\U0002b820y", "plain text", "\ud800lone surrogate"]
    assert tok.tokenize(texts[0])[0] == "[UNK]" and tok.tokenize(texts[1]) == ["[UNK]"]
    assert hf_ids(hf_tok, texts[:3]) == [tok.encode(t) for t in texts[:3]]
    assert tok.tokenize(texts[3]) == ["lone", "sur", "##rogate"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def every_code_point() -> list[str]:
    """Each code point between two letters, so punctuation, control and marks show in the split."""
    return ["a" + chr(cp) + "b" for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp <= 0xDFFF]


def random_mixed_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)

    def char() -> str:
        r = rng.random()
        if r < 0.4:
            return rng.choice("abcdefgh XYZ.,'\t\n")
        cp = rng.randint(0x80, 0x2FFF) if r < 0.7 else rng.randint(0, sys.maxunicode)
        return "?" if 0xD800 <= cp <= 0xDFFF else chr(cp)

    return ["".join(char() for _ in range(rng.randint(1, 20))) for _ in range(n)]


def reference_ids(hf_tok, texts):
    return [e.ids for e in hf_tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


@pytest.mark.slow
def test_every_code_point_matches_transformers(tok, hf_tok):
    texts = every_code_point()
    reference = reference_ids(hf_tok, texts)
    assert [t for t, ref in zip(texts, reference) if tok.encode(t) != ref] == []
    assert tok.encode_batch(texts) == reference


def test_rare_code_points_and_random_mixes_match_transformers(tok, hf_tok):
    # The fast subset of the test above: every punctuation, symbol, mark, separator, control and
    # format character (the classes where the Unicode tables disagree), the CJK Extension E start,
    # and seeded mixed texts.
    special = [t for t in every_code_point()
               if unicodedata.category(t[1])[0] in "PSMZ" or unicodedata.category(t[1]) in ("Cc", "Cf")
               or "\U0002b800" <= t[1] <= "\U0002b9ff"]
    texts = special + random_mixed_texts(2000, seed=0)
    reference = reference_ids(hf_tok, texts)
    assert [t for t, ref in zip(texts, reference) if tok.encode(t) != ref] == []
    assert tok.encode_batch(texts) == reference


# --- the parts -----------------------------------------------------------------------------------

def test_basic_tokenizer_never_split_and_cleaning():
    basic = BasicTokenizer(do_lower_case=True, never_split=["[MASK]"])
    assert basic.tokenize(" Hello,\tWORLD!\n[MASK] [mask] ") == ["hello", ",", "world", "!", "[MASK]", "[", "mask", "]"]
    assert BasicTokenizer(do_lower_case=False).tokenize("Héllo\x00Wörld") == ["HélloWörld"]
    assert whitespace_tokenize("  a \t b\n") == ["a", "b"]


def test_wordpiece_greedy_longest_match_first():
    vocab = {t: i for i, t in enumerate(["[UNK]", "un", "una", "##aff", "##able", "##ble", "##a", "##ff"])}
    wp = WordpieceTokenizer(vocab, max_input_chars_per_word=10)
    assert wp.tokenize("unaffable") == ["una", "##ff", "##able"]  # "una" beats "un"
    assert wp.tokenize("unx") == ["[UNK]"]  # one uncovered char makes the whole word unknown
    assert wp.tokenize("un unaffable") == ["un", "una", "##ff", "##able"]
    assert wp.tokenize("unaffable!") == ["[UNK]"]  # "!" is no piece (BasicTokenizer splits it off first)
    assert wp.tokenize("un" * 6) == ["[UNK]"]  # 12 chars > max_input_chars_per_word


def test_id_conversion(tok):
    tokens = ["[CLS]", "hello", "##s", "[SEP]", "not-a-token"]
    ids = tok.convert_tokens_to_ids(tokens)
    assert ids == [101, 7592, 2015, 102, 100]
    assert tok.convert_ids_to_tokens(ids) == tokens[:4] + ["[UNK]"]
    assert tok.ids_to_tokens[7592] == "hello" and len(tok) == 30522
    with pytest.raises(ValueError, match="30522 is outside the vocab"):
        tok.convert_ids_to_tokens([30522])


def test_max_len_is_enforced_on_both_paths():
    short = BertTokenizer(VOCAB, max_len=3)
    assert short.encode("a b c") == [1037, 1038, 1039]
    with pytest.raises(ValueError, match="longer than max_len=3"):
        short.encode("a b c d")
    with pytest.raises(ValueError, match="longer than max_len=3"):
        short.encode_batch(["a b", "a b c d"])


def test_encode_batch_refuses_non_text(tok):
    with pytest.raises(TypeError, match=r"texts\[1\] is bytes, not str"):
        tok.encode_batch(["ok", b"raw bytes"])


def test_never_split_outside_vocab_is_refused():
    with pytest.raises(ValueError, match=r"never_split tokens \['<mine>'\] are not in vocab"):
        BertTokenizer(VOCAB, never_split=["[MASK]", "<mine>"])
    custom = BertTokenizer(VOCAB, never_split=["[unused0]"])
    assert custom.tokenize("x[unused0]y [MASK]") == ["x", "[unused0]", "y", "[", "mask", "]"]
    assert custom.encode_batch(["x[unused0]y [MASK]"]) == [custom.encode("x[unused0]y [MASK]")]


def test_encode_batch_without_tokenizers_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    t = BertTokenizer(VOCAB)
    assert not t.has_fast_path
    texts = ["Hello world!", "", "naïve 日本"]
    assert t.encode_batch(texts) == [t.encode(x) for x in texts]


# --- properties ----------------------------------------------------------------------------------

PIECES = ["[MASK]", "[CLS]", "[SEP]", "[PAD]", "[UNK]", "##", "un", "aff", "able", " ", "\t",
          "É", "e\u0301", "Σ", "ß", "İ", "日本", "\u200b", "\x00", "😀", "-", "'s", "a" * 99]
texts = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(PIECES)), max_size=12).map("".join)
PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _greedy_fails(word, vocab, max_chars=100):
    """Where no vocabulary piece starts at the position greedy matching reaches."""
    if len(word) > max_chars:
        return True
    start = 0
    while start < len(word):
        prefix = "##" if start else ""
        ends = [end for end in range(start + 1, len(word) + 1) if prefix + word[start:end] in vocab]
        if not ends:
            return True
        start = max(ends)
    return False


@PROPERTY
@given(texts, st.booleans())
def test_property_never_crashes_and_ids_are_in_vocab(tok, cased_tok, text, lower):
    t = tok if lower else cased_tok
    tokens = t.tokenize(text)
    ids = t.convert_tokens_to_ids(tokens)
    assert all(0 <= i < len(t.vocab) for i in ids)
    assert all(token in t.vocab for token in tokens)
    assert t.encode_batch([text, text.upper()]) == [ids, t.encode(text.upper())]


@PROPERTY
@given(texts)
def test_property_unk_only_where_no_wordpiece_matches(tok, text):
    for word in tok.basic_tokenizer.tokenize(text):
        if word in tok.never_split:
            continue
        pieces = tok.wordpiece_tokenizer.tokenize(word)
        if pieces == ["[UNK]"] and word != "[UNK]":
            assert _greedy_fails(word, tok.vocab)
        else:
            assert "".join(p[2:] if i else p for i, p in enumerate(pieces)) == word
            assert not pieces[0].startswith("##") or word.startswith("##")
            assert all(p.startswith("##") for p in pieces[1:])
        if len(word) <= 100 and word.isascii() and word.isalnum():
            assert pieces != ["[UNK]"]  # every ASCII letter and digit is a piece


@PROPERTY
@given(texts)
def test_property_matches_transformers(tok, hf_tok, text):
    fast = tok.encode_batch([text])[0]
    assert tok.encode(text) == fast == hf_ids(hf_tok, [text])[0]

