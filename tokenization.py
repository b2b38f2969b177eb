"""BERT WordPiece tokenization: text -> tokens -> vocabulary ids.

Two stages, as in the original BERT:
  BasicTokenizer      cleans the text (drops control characters, maps whitespace to spaces),
                      puts spaces around CJK ideographs, lower-cases and strips accents when
                      asked, and splits on whitespace and punctuation.
  WordpieceTokenizer  splits every word greedily into the longest vocabulary pieces,
                      continuation pieces carrying a "##" prefix; a word it cannot cover becomes [UNK].

`BertTokenizer` chains both and maps tokens to ids. Its `encode_batch` is the bulk path used
for data creation: it runs the same pipeline in the Rust `tokenizers` library when that is
importable and gives exactly the ids of the pure-Python path (tests/test_tokenization.py checks this).
"""
from __future__ import annotations

import collections
import logging
import os
import re
import unicodedata
from typing import Iterable

from atomic_io import atomic_text_writer

logger = logging.getLogger(__name__)

VOCAB_NAME = "vocab.txt"
UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")
WORDPIECE_PREFIX = "##"
MAX_INPUT_CHARS_PER_WORD = 100


def load_vocab(vocab_file: str | os.PathLike) -> "collections.OrderedDict[str, int]":
    """Read a WordPiece vocabulary (one token per line, id = line number) into token -> id."""
    path = os.fspath(vocab_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"vocab file {path!r} not found: pass a WordPiece vocab.txt (one token per line), "
            f"e.g. vocab/vocab from this repository")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"vocab file {path!r} is not UTF-8 text ({e.reason} at byte {e.start}): pass a WordPiece "
            f"vocab.txt with one token per line, e.g. vocab/vocab") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    vocab: collections.OrderedDict[str, int] = collections.OrderedDict()
    for index, line in enumerate(lines):
        token = line.rstrip("\r")  # tolerate Windows line endings
        if not token.strip():
            raise ValueError(
                f"vocab file {path!r} line {index + 1} is blank: a WordPiece vocab has one token "
                f"on every line; remove the blank line (ids are line numbers, so check the file)")
        if token in vocab:
            raise ValueError(
                f"vocab file {path!r} lists {token!r} twice (lines {vocab[token] + 1} and {index + 1}): "
                f"every token must appear once; fix or regenerate the vocab")
        vocab[token] = index
    if not vocab:
        raise ValueError(f"vocab file {path!r} is empty: pass a WordPiece vocab.txt, e.g. vocab/vocab")
    if UNK_TOKEN not in vocab:
        raise ValueError(
            f"vocab file {path!r} has no {UNK_TOKEN} token: this is not a BERT WordPiece vocab; "
            f"pass one such as vocab/vocab")
    return vocab


def whitespace_tokenize(text: str) -> list[str]:
    """Split on runs of whitespace, dropping empty pieces."""
    return text.split()


# --- character classes, as BERT defines them, on the Unicode data of the Rust tokenizers ---------

# The reference implementation is transformers' BertTokenizerFast, i.e. the Rust `tokenizers`
# library, whose general-category tables are older than this Python's unicodedata (14.0). Measured
# over every code point (single characters between two letters): the code points below are the ones
# where the two disagree, listed with the category the Rust tables give them. "Cn" are characters
# added to Unicode after those tables (U+2E43 .. U+2E5D punctuation, new combining marks and format
# characters): unknown there, so they are neither punctuation, control nor a mark to strip. The
# other entries changed category in later Unicode versions. tests/test_tokenization.py checks the
# whole range against BertTokenizerFast, so a new Python or tokenizers release shows up there.
_RUST_CATEGORY_RANGES = {
    "Cn": (
        "61D 7FD 890-891 898-89F 8CA-8E2 9FD-9FE A76 AFA-AFF B55 C04 C3C C77 C84 D00 D3B-D3C D81 EBA 180F "
        "1885-1886 1ABF-1ACE 1B7D-1B7E 1DF6-1DFB 2E43-2E4F 2E52-2E5D A82C A8C5 A8FF A9BD 10D24-10D27 "
        "10EAB-10EAD 10F46-10F50 10F55-10F59 10F82-10F89 11070 11073-11074 110C2 110CD 111CF 1123E 1133B "
        "11438-1143F 11442-11444 11446 1144B-1144F 1145A-1145B 1145D-1145E 11660-1166C 116B9 1182F-11837 "
        "11839-1183B 1193B-1193C 1193E 11943-11946 119D4-119D7 119DA-119DB 119E0 119E2 11A01-11A0A "
        "11A33-11A38 11A3B-11A47 11A51-11A56 11A59-11A5B 11A8A-11A96 11A98-11A9C 11A9E-11AA2 11C30-11C36 "
        "11C38-11C3D 11C3F 11C41-11C45 11C70-11C71 11C92-11CA7 11CAA-11CB0 11CB2-11CB3 11CB5-11CB6 "
        "11D31-11D36 11D3A 11D3C-11D3D 11D3F-11D45 11D47 11D90-11D91 11D95 11D97 11EF3-11EF4 11EF7-11EF8 "
        "11FFF 12FF1-12FF2 13430-13438 16E97-16E9A 16F4F 16FE2 16FE4 1CF00-1CF2D 1CF30-1CF46 1E000-1E006 "
        "1E008-1E018 1E01B-1E021 1E023-1E024 1E026-1E02A 1E130-1E136 1E2AE 1E2EC-1E2EF 1E944-1E94A "
        "1E95E-1E95F "
    ),
    "Po": "166D 111C9",  # U+166D is So since Unicode 12, U+111C9 Mn since Unicode 11
    "Mn": "1734",  # Mc since Unicode 14
}


def _parse_ranges(spec: str) -> list[int]:
    code_points = []
    for item in spec.split():
        lo, _, hi = item.partition("-")
        code_points.extend(range(int(lo, 16), int(hi or lo, 16) + 1))
    return code_points


_RUST_CATEGORY = {cp: category for category, spec in _RUST_CATEGORY_RANGES.items() for cp in _parse_ranges(spec)}


def _category(char: str) -> str:
    """The general category BertTokenizerFast sees for `char`."""
    return _RUST_CATEGORY.get(ord(char)) or unicodedata.category(char)


def _is_whitespace(char: str) -> bool:
    if char in " \t\n\r":
        return True
    return _category(char) == "Zs"


def _is_control(char: str) -> bool:
    # Tab, newline and carriage return are whitespace to BERT, not control characters.
    # Unassigned code points (Cn) are kept, as the Rust tokenizers do: which code points are
    # unassigned depends on the Unicode version of this Python, and such a character is [UNK]
    # anyway.
    if char in "\t\n\r":
        return False
    return _category(char) in ("Cc", "Cf", "Co", "Cs")


def _is_punctuation(char: str) -> bool:
    # All non-alphanumeric ASCII counts ("$", "^", "`" are symbols in Unicode, not punctuation),
    # plus every Unicode punctuation category.
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return _category(char).startswith("P")


# The CJK Unified Ideographs blocks. Hangul, kana and other scripts are written with spaces
# (or are tokenized as words), so only ideographs get a token each. Extension E starts at
# U+2B820, but the Rust tokenizers start its range at U+2B920, and equality with them wins.
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


_CJK_RE = re.compile("([" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _CJK_RANGES) + "])")


class BasicTokenizer:
    """Cleaning, CJK spacing, optional lower-casing with accent stripping, punctuation splitting."""

    def __init__(self, do_lower_case: bool = True, never_split: Iterable[str] = SPECIAL_TOKENS):
        self.do_lower_case = do_lower_case
        self.never_split = frozenset(never_split)

    def tokenize(self, text: str) -> list[str]:
        text = self._tokenize_cjk(self._clean(text))
        tokens = []
        for word in whitespace_tokenize(text):
            if word in self.never_split:
                tokens.append(word)
                continue
            if self.do_lower_case:
                word = _strip_accents(_lower(word))
            tokens.extend(self._split_on_punctuation(word))
        return tokens

    @staticmethod
    def _clean(text: str) -> str:
        out = []
        for char in text:
            cp = ord(char)
            if cp == 0 or cp == 0xFFFD or _is_control(char):
                continue
            out.append(" " if _is_whitespace(char) else char)
        return "".join(out)

    @staticmethod
    def _tokenize_cjk(text: str) -> str:
        return _CJK_RE.sub(r" \1 ", text)

    @staticmethod
    def _split_on_punctuation(word: str) -> list[str]:
        pieces: list[str] = []
        current: list[str] = []
        for char in word:
            if _is_punctuation(char):
                if current:
                    pieces.append("".join(current))
                    current = []
                pieces.append(char)
            else:
                current.append(char)
        if current:
            pieces.append("".join(current))
        return pieces


def _lower(text: str) -> str:
    # Character by character: str.lower() on a whole word turns a final "Σ" into "ς", which
    # neither the Rust tokenizers nor transformers do (both give "σ").
    return "".join(c.lower() for c in text)


def _strip_accents(text: str) -> str:
    # Decompose, then drop the combining marks: "é" -> "e" + U+0301 -> "e".
    return "".join(c for c in unicodedata.normalize("NFD", text) if _category(c) != "Mn")


class WordpieceTokenizer:
    """Greedy longest-match-first split of each word into vocabulary pieces."""

    def __init__(self, vocab: dict[str, int], unk_token: str = UNK_TOKEN,
                 max_input_chars_per_word: int = MAX_INPUT_CHARS_PER_WORD):
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word

    def tokenize(self, text: str) -> list[str]:
        """`text` should already have passed through BasicTokenizer."""
        tokens = []
        for word in whitespace_tokenize(text):
            tokens.extend(self._split_word(word))
        return tokens

    def _split_word(self, word: str) -> list[str]:
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_token]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            prefix = WORDPIECE_PREFIX if start > 0 else ""
            while end > start and prefix + word[start:end] not in self.vocab:
                end -= 1
            if end == start:  # no piece covers word[start]: the whole word is unknown
                return [self.unk_token]
            pieces.append(prefix + word[start:end])
            start = end
        return pieces


class BertTokenizer:
    """BasicTokenizer + WordpieceTokenizer over a vocabulary file, with id conversion.

    `never_split` tokens (by default the special tokens of the vocab) are cut out of the raw
    text wherever they occur, case-sensitively, and kept whole: "the [MASK]." gives
    ["the", "[MASK]", "."], as the Hugging Face tokenizers do.
    """

    def __init__(self, vocab_file: str | os.PathLike, do_lower_case: bool = True,
                 max_len: int | None = None, never_split: Iterable[str] | None = None):
        path = os.fspath(vocab_file)
        if os.path.isdir(path):
            path = os.path.join(path, VOCAB_NAME)
        self.vocab = load_vocab(path)
        self.ids_to_tokens = collections.OrderedDict((i, t) for t, i in self.vocab.items())
        self.do_lower_case = do_lower_case
        self.max_len = max_len if max_len is not None else int(1e12)
        if never_split is None:
            never_split = [t for t in SPECIAL_TOKENS if t in self.vocab]
        never_split = tuple(dict.fromkeys(never_split))
        missing = [t for t in never_split if t not in self.vocab]
        if missing:
            raise ValueError(
                f"never_split tokens {missing} are not in vocab {path!r}: they could only become "
                f"{UNK_TOKEN}; add them to the vocab or leave them out of never_split")
        self.never_split = never_split
        # never_split is applied to the raw text (below), so the basic tokenizer must not apply
        # it again: "[MA\x00SK]" is cleaned to "[MASK]" but is not a special token.
        self.basic_tokenizer = BasicTokenizer(do_lower_case=do_lower_case, never_split=())
        self.wordpiece_tokenizer = WordpieceTokenizer(self.vocab)
        # Longest first, so a never_split token that contains another one wins.
        self._never_split_re = (
            re.compile("|".join(re.escape(t) for t in sorted(never_split, key=len, reverse=True)))
            if never_split else None)
        self._fast = None  # built on first use of encode_batch

    @property
    def unk_token_id(self) -> int:
        return self.vocab[UNK_TOKEN]

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for chunk, is_special in self._split_never_split(text):
            if is_special:
                tokens.append(chunk)
                continue
            for word in self.basic_tokenizer.tokenize(chunk):
                tokens.extend(self.wordpiece_tokenizer.tokenize(word))
        return tokens

    def _split_never_split(self, text: str) -> list[tuple[str, bool]]:
        if self._never_split_re is None:
            return [(text, False)]
        chunks, start = [], 0
        for match in self._never_split_re.finditer(text):
            chunks.append((text[start:match.start()], False))
            chunks.append((match.group(), True))
            start = match.end()
        chunks.append((text[start:], False))
        return chunks

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Token -> id; a token outside the vocab maps to [UNK]."""
        unk = self.unk_token_id
        ids = [self.vocab.get(token, unk) for token in tokens]
        self._check_length(ids)
        return ids

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        tokens = []
        for i in ids:
            token = self.ids_to_tokens.get(int(i))
            if token is None:
                raise ValueError(f"token id {i} is outside the vocab (ids 0..{len(self.vocab) - 1}); "
                                 f"were the ids made with another vocab?")
            tokens.append(token)
        return tokens

    def encode(self, text: str) -> list[int]:
        """Ids of one text, no [CLS]/[SEP] added (pure-Python path)."""
        return self.convert_tokens_to_ids(self.tokenize(text))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Ids of many texts, no [CLS]/[SEP] added, identical to `encode` on each text.

        Uses the Rust `tokenizers` pipeline when it is importable (many times faster); the
        character classes above follow its Unicode tables, so both paths give the same ids. A
        text holding a lone surrogate, which Rust strings cannot hold, takes the Python path.
        """
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: texts[{i}] is {type(text).__name__}, not str; "
                                f"decode bytes first (e.g. with .decode('utf-8'))")
        fast = self._fast_tokenizer()
        if fast is None:
            return [self.encode(text) for text in texts]
        ids: list[list[int] | None] = [None] * len(texts)
        fast_indices = []
        for i, text in enumerate(texts):
            if _has_surrogate(text):
                ids[i] = self.encode(text)
            else:
                fast_indices.append(i)
        encodings = fast.encode_batch([texts[i] for i in fast_indices], add_special_tokens=False)
        for i, enc in zip(fast_indices, encodings):
            self._check_length(enc.ids)
            ids[i] = enc.ids
        return ids

    @property
    def has_fast_path(self) -> bool:
        return self._fast_tokenizer() is not None

    def _fast_tokenizer(self):
        if self._fast is None:
            self._fast = _build_fast_tokenizer(self) or False
        return self._fast or None

    def _check_length(self, ids: list[int]) -> None:
        if len(ids) > self.max_len:
            raise ValueError(
                f"token sequence of length {len(ids)} is longer than max_len={self.max_len}: "
                f"truncate the text or raise max_len")

    def save_vocabulary(self, vocab_path: str | os.PathLike) -> str:
        """Write the vocab (one token per line, in id order) to a file, or to vocab.txt inside a
        directory; atomic. Returns the file written."""
        path = os.fspath(vocab_path)
        if os.path.isdir(path):
            path = os.path.join(path, VOCAB_NAME)
        with atomic_text_writer(path) as f:
            for token in self.ids_to_tokens.values():
                f.write(token + "\n")
        return path


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _build_fast_tokenizer(tok: BertTokenizer):
    """The same pipeline in the `tokenizers` library, or None when it is not installed."""
    try:
        from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    except ImportError:
        logger.info("tokenizers is not installed: encode_batch uses the pure-Python tokenizer")
        return None
    fast = Tokenizer(models.WordPiece(
        dict(tok.vocab), unk_token=UNK_TOKEN, continuing_subword_prefix=WORDPIECE_PREFIX,
        max_input_chars_per_word=tok.wordpiece_tokenizer.max_input_chars_per_word))
    fast.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True,
        strip_accents=tok.do_lower_case, lowercase=tok.do_lower_case)
    fast.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Matched in the raw text, case-sensitively, like BertTokenizer._split_never_split.
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tok.never_split])
    return fast
