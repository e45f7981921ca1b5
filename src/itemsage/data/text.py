"""Text features: the tokeniser and the shared vocabulary (docs/METHOD.md), built by ingest.

Tokens are word unigrams, word bigrams and character trigrams of the normalised text (`tokenize`
documents the exact rules). One vocabulary, built by frequency over every field of the training
catalog, maps tokens to ids; out-of-vocabulary tokens are dropped. The tower turns each field's bag
of ids into a vector (model/hash_embedding.py).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import math
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from itemsage.artifacts import atomic_write_json
from itemsage.config import require

log = logging.getLogger(__name__)

VOCAB_FORMAT = "itemsage-vocab"
VOCAB_VERSION = 1
DEFAULT_MAX_UNIGRAMS = 200_000
DEFAULT_MAX_BIGRAMS = 1_000_000
DEFAULT_MAX_TRIGRAMS = 64_000
_CACHED_MAX_CHARS = 64  # strings up to this length have their token ids memoised

# ------------------------------------------------------------------------------------------------
# Tokeniser
# ------------------------------------------------------------------------------------------------


class Tokens(NamedTuple):
    unigrams: list[str]
    bigrams: list[str]
    trigrams: list[str]


def normalize(text: str) -> str:
    """Unicode NFKC (full-width and compatibility forms to their plain form), then case folding."""
    return unicodedata.normalize("NFKC", text).casefold()


@functools.cache
def _word_pattern() -> re.Pattern[str]:
    # A word is a run of letters, digits and combining marks. Python's `\w` alone misses the
    # combining marks, which would cut Devanagari or Thai words apart at every vowel sign. Built on
    # first use (a ~0.2 s scan of the Unicode table); `_` is in `\w` and is split off by `_words`.
    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == "M":
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    marks = "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
    return re.compile(rf"[\w{marks}]+")


_ASCII_WORD = re.compile(r"[a-zA-Z0-9]+")  # the same rule on ASCII text, 3x faster


def _words(s: str) -> list[str]:
    if s.isascii():
        return _ASCII_WORD.findall(s)
    words = _word_pattern().findall(s)
    if "_" in s:  # `_` is connector punctuation: it separates words
        words = [w for word in words for w in word.split("_") if w]
    return words


def tokenize(text: str) -> Tokens:
    """Word unigrams, word bigrams and character trigrams of `normalize(text)`.

    - unigrams: maximal runs of word characters, i.e. Unicode letters, digits and combining marks.
      Everything else separates words and is dropped: whitespace, punctuation (including `_`, `'`
      and `-`: "t-shirt" gives `t`, `shirt`), symbols and emoji. Scripts written without spaces
      (Chinese, Japanese) give one unigram per run ("木製の椅子" is one word); their trigrams carry
      the finer structure.
    - bigrams: each pair of consecutive unigrams joined by `#` ("wood chair" -> `wood#chair`).
      Unigrams never contain `#`, so a bigram can never equal a unigram.
    - trigrams: every 3-character window of the normalised string after stripping it, replacing each
      whitespace run by one `#` and adding `#` at both ends. All other characters stay as they are,
      punctuation and emoji included ("wood chair" -> `#wo woo ood od# d#c #ch cha hai air ir#`;
      "a!" -> `#a! a!#`).

    Duplicates are kept in order ("a a" gives unigram `a` twice). An empty or whitespace-only
    string gives no tokens.
    """
    s = normalize(text)
    # str.split() splits on runs of exactly the characters `\s` matches and drops the ends.
    pieces = s.split()
    if not pieces:
        return Tokens([], [], [])
    words = _words(s)
    bigrams = [f"{a}#{b}" for a, b in zip(words, words[1:])]
    padded = f"#{'#'.join(pieces)}#"
    trigrams = list(map("".join, zip(padded, padded[1:], padded[2:])))
    return Tokens(words, bigrams, trigrams)


def field_strings(value: Any) -> list[str]:
    """A field's value as a list of non-empty strings.

    None and NaN give []; a string gives [it] unless blank; a list (or tuple, numpy or Arrow array)
    gives its items that are not None, NaN or blank. Numbers are turned into their text (`42`).
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, (list, tuple, np.ndarray, pa.Array, pa.ChunkedArray)):
        items = value.to_pylist() if isinstance(value, (pa.Array, pa.ChunkedArray)) else value
        out = []
        for item in items:
            if item is None or (isinstance(item, float) and math.isnan(item)):
                continue
            text = item if isinstance(item, str) else str(item)
            if text.strip():
                out.append(text)
        return out
    return [str(value)]


# ------------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------------


def _most_frequent(counts: collections.Counter[str], cap: int) -> list[str]:
    """The `cap` most frequent tokens, most frequent first, ties broken by the token string."""
    if cap <= 0 or not counts:
        return []
    if len(counts) > cap:
        # Find the cap-th largest count without sorting millions of tokens; keep everything above it
        # and fill the rest with the tied tokens in string order.
        values = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
        threshold = int(np.partition(values, len(values) - cap)[len(values) - cap])
        above = [t for t, c in counts.items() if c > threshold]
        tied = sorted(t for t, c in counts.items() if c == threshold)
        chosen = above + tied[: cap - len(above)]
    else:
        chosen = list(counts)
    return sorted(chosen, key=lambda t: (-counts[t], t))


class Vocabulary:
    """One shared vocabulary for all text fields: token string -> id.

    Ids are unigrams first, then bigrams, then trigrams (each most frequent first), so the same
    string as a bigram and as a trigram (`a#b`) has two different ids.
    """

    def __init__(self, unigrams: Sequence[str], bigrams: Sequence[str], trigrams: Sequence[str]):
        self.unigrams = list(unigrams)
        self.bigrams = list(bigrams)
        self.trigrams = list(trigrams)
        n_uni, n_bi = len(self.unigrams), len(self.bigrams)
        self._uni = {t: i for i, t in enumerate(self.unigrams)}
        self._bi = {t: n_uni + i for i, t in enumerate(self.bigrams)}
        self._tri = {t: n_uni + n_bi + i for i, t in enumerate(self.trigrams)}
        for kind, tokens, index in (("unigram", self.unigrams, self._uni),
                                    ("bigram", self.bigrams, self._bi),
                                    ("trigram", self.trigrams, self._tri)):
            if len(index) != len(tokens):
                raise ValueError(f"vocabulary lists a {kind} twice; each token must appear once.")
        # Short field values repeat a lot (brands, colours, categories): tokenise each distinct one
        # once. Long ones (descriptions) are mostly unique and would only fill the memory.
        self._cached_ids = functools.lru_cache(maxsize=1 << 16)(self._string_ids)
        self._fingerprint: str | None = None

    @classmethod
    def build(
        cls,
        fields: Iterable[Any],
        max_unigrams: int = DEFAULT_MAX_UNIGRAMS,
        max_bigrams: int = DEFAULT_MAX_BIGRAMS,
        max_trigrams: int = DEFAULT_MAX_TRIGRAMS,
        *,
        chunk_strings: int = 200_000,
    ) -> Vocabulary:
        """Count tokens over `fields` (one item = one field's value: a list of strings or a string)
        and keep the most frequent of each kind up to the caps (ties: token string order).

        Streams: holds the token counters plus at most `chunk_strings` raw strings at a time.
        """
        for name, cap in (("max_unigrams", max_unigrams), ("max_bigrams", max_bigrams),
                          ("max_trigrams", max_trigrams)):
            require(isinstance(cap, int) and cap >= 0, f"vocab.{name} must be an integer >= 0, got {cap!r}")
        uni: collections.Counter[str] = collections.Counter()
        bi: collections.Counter[str] = collections.Counter()
        tri: collections.Counter[str] = collections.Counter()

        def count(strings: list[str]) -> None:
            # Tokenise each distinct string once and weight its tokens by its repeat count.
            for s, n in collections.Counter(strings).items():
                tokens = tokenize(s)
                if n == 1:  # Counter.update(list) counts in C
                    uni.update(tokens.unigrams)
                    bi.update(tokens.bigrams)
                    tri.update(tokens.trigrams)
                else:
                    for counter, toks in ((uni, tokens.unigrams), (bi, tokens.bigrams), (tri, tokens.trigrams)):
                        for t in toks:
                            counter[t] += n

        pending: list[str] = []
        for value in fields:
            pending.extend(field_strings(value))
            if len(pending) >= chunk_strings:
                count(pending)
                pending = []
        count(pending)
        vocab = cls(_most_frequent(uni, max_unigrams), _most_frequent(bi, max_bigrams),
                    _most_frequent(tri, max_trigrams))
        log.info("vocabulary: %d unigrams (of %d seen), %d bigrams (of %d), %d trigrams (of %d)",
                 len(vocab.unigrams), len(uni), len(vocab.bigrams), len(bi), len(vocab.trigrams), len(tri))
        return vocab

    def __len__(self) -> int:
        return len(self.unigrams) + len(self.bigrams) + len(self.trigrams)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and (self.unigrams, self.bigrams, self.trigrams) == (
            other.unigrams, other.bigrams, other.trigrams)

    def __repr__(self) -> str:
        return (f"Vocabulary({len(self.unigrams)} unigrams, {len(self.bigrams)} bigrams, "
                f"{len(self.trigrams)} trigrams)")

    def _string_ids(self, s: str) -> tuple[int, ...]:
        tokens = tokenize(s)
        ids = [i for i in map(self._uni.get, tokens.unigrams) if i is not None]
        ids += [i for i in map(self._bi.get, tokens.bigrams) if i is not None]
        ids += [i for i in map(self._tri.get, tokens.trigrams) if i is not None]
        return tuple(ids)

    def string_ids(self, s: str) -> tuple[int, ...]:
        """Ids of one string's tokens (unigrams, then bigrams, then trigrams), OOV dropped."""
        return self._cached_ids(s) if len(s) <= _CACHED_MAX_CHARS else self._string_ids(s)

    def token_ids(self, strings: Any) -> np.ndarray:
        """A field's token ids [T] int64: each string tokenised apart (no bigram across two items),
        concatenated; OOV tokens dropped, repeats kept."""
        ids: list[int] = []
        for s in field_strings(strings):
            ids.extend(self.string_ids(s))
        return np.asarray(ids, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"format": VOCAB_FORMAT, "version": VOCAB_VERSION, "unigrams": self.unigrams,
                "bigrams": self.bigrams, "trigrams": self.trigrams}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file {path} does not exist; run `itemsage ingest` to build it.")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
            raise ValueError(f"{path} is not an itemsage vocabulary (expected \"format\": \"{VOCAB_FORMAT}\").")
        if data.get("version") != VOCAB_VERSION:
            raise ValueError(f"{path} has vocabulary version {data.get('version')}, this itemsage reads "
                             f"{VOCAB_VERSION}; rebuild it with `itemsage ingest`.")
        return cls(data["unigrams"], data["bigrams"], data["trigrams"])

    def fingerprint(self) -> str:
        """Short sha256 of the token lists: equal fingerprints mean identical ids."""
        if self._fingerprint is None:
            blob = json.dumps([self.unigrams, self.bigrams, self.trigrams], ensure_ascii=False,
                              separators=(",", ":"))
            self._fingerprint = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
        return self._fingerprint


def known_text(table: pa.Table, vocab: Vocabulary, text_fields: Sequence[str]) -> np.ndarray:
    """[B] bool: the product has a token of `vocab` in one of `text_fields` (products in the dataset
    format: one list<string> column per field; a plain string column is read as one item). A product
    with none, and no image, is read as nothing by the tower: its vector is an empty product's."""
    known = np.zeros(table.num_rows, bool)
    for name in text_fields:
        if name not in table.column_names:
            continue
        column = table.column(name).combine_chunks()
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            column = pa.array([field_strings(v) for v in column.to_pylist()], pa.list_(pa.string()))
        values = column.flatten().to_pylist()  # every string of the field, product after product
        hit = np.fromiter((bool(s) and bool(vocab.string_ids(s)) for s in values), bool, count=len(values))
        parents = pc.list_parent_indices(column).to_numpy()  # [strings] the product of each
        known |= np.bincount(parents[hit], minlength=table.num_rows) > 0
    return known
