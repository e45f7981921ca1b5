"""Product features: text tokens, the shared vocabulary, deterministic hashing, batches (docs/METHOD.md).

Text. Each text field of a product becomes one bag of vocabulary ids; the tower sums the bag's
hash-embedded token vectors. A batch also carries its tokens deduplicated (`TokenBags`), the layout
the tower's hash bag computes on. Tokens are word unigrams, word bigrams and
character trigrams of the normalised text (`tokenize` documents the exact rules). One vocabulary,
built by frequency over every field of the training catalog, maps tokens to ids; out-of-vocabulary
tokens are dropped.

Images. A product carries up to `max_images` image vectors, main image first; a batch pads them to
the largest count present and marks the real ones in `image_mask`.

`ProductStore` holds the whole catalog featurised once, as flat (CSR) arrays, so training can gather
a batch of a few thousand products with a handful of numpy index operations per step.

Axes: B products, M images per product, F text fields, T tokens, Di image width.
"""

from __future__ import annotations

import array
import collections
import functools
import hashlib
import json
import logging
import math
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from itemsage import schema
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


# ------------------------------------------------------------------------------------------------
# Hashing (Svenstrup et al. 2017 hash embeddings)
# ------------------------------------------------------------------------------------------------

# Two fixed universal hash functions h(i) = ((a*i + b) mod p) mod num_buckets. Plain integer maths,
# so every process and machine agrees (Python's `hash` is salted per process). a < p and i < p keep
# a*i + b below 2**62, inside int64.
HASH_PRIME = 2**31 - 1
HASH_A1, HASH_B1 = 1_103_515_245, 12_345
HASH_A2, HASH_B2 = 1_664_525, 1_013_904_223


def hash_token_ids(ids: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bucket indices per token id: ids [*] int -> (h1 [*], h2 [*]) int64 in [0, num_buckets)."""
    require(isinstance(num_buckets, int) and num_buckets > 0,
            f"num_buckets must be a positive integer, got {num_buckets!r}")
    ids = ids.long()
    # Range check on CPU only: on an accelerator it would cost a host sync on every forward.
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= HASH_PRIME):
        raise ValueError(f"token ids must lie in [0, {HASH_PRIME}), got min {int(ids.min())}, max {int(ids.max())}")
    h1 = (ids * HASH_A1 + HASH_B1) % HASH_PRIME % num_buckets
    h2 = (ids * HASH_A2 + HASH_B2) % HASH_PRIME % num_buckets
    return h1, h2


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


class TokenBags(NamedTuple):
    """A batch's text bags with their tokens deduplicated: the layout the hash bag computes on.

    The T token occurrences of the batch's N = B*F bags use U distinct vocabulary ids. Read as a
    sparse N x U count matrix S, `index` + the batch's token_offsets are S in CSR form (bag n's
    occurrences are index[offsets[n]:offsets[n+1]]) and `by_token` + `starts` are S transposed
    (unique token u occurs in bags by_token[starts[u]:starts[u+1]]). The transposed half is only
    needed for a backward pass; it is None when not built.
    """

    unique: torch.Tensor  # [U] int64 distinct vocabulary ids, ascending
    index: torch.Tensor  # [T] int64 position in `unique` of each token occurrence
    by_token: torch.Tensor | None  # [T] int64 bag of each occurrence, grouped by unique token (bag order within)
    starts: torch.Tensor | None  # [U] int64 start of each unique token's group in by_token

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBags:
        return TokenBags(*(t if t is None else t.to(device, non_blocking=non_blocking) for t in self))


def token_bags(token_ids: np.ndarray, offsets: np.ndarray, *, transpose: bool) -> TokenBags:
    """Deduplicate the tokens of N bags (token_ids [T] int, offsets [N] bag starts) -> TokenBags.

    O(T + V) with no sort: the distinct ids come from a bincount, the transposed layout from a
    CSR -> CSC conversion (a counting sort, scipy.sparse).
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    counts = np.bincount(ids) if len(ids) else np.zeros(0, np.int64)
    unique = np.flatnonzero(counts)  # [U]
    remap = np.zeros(len(counts), np.int64)
    remap[unique] = np.arange(len(unique))
    index = remap[ids]  # [T]
    by_token = starts = None
    if transpose:
        import scipy.sparse

        n = len(offsets)
        indptr = np.append(np.asarray(offsets, np.int64), len(ids))  # [N + 1]
        csc = scipy.sparse.csr_matrix((np.ones(len(ids), np.float32), index, indptr),
                                      shape=(n, len(unique))).tocsc()  # counting sort by column
        by_token = torch.from_numpy(csc.indices.astype(np.int64))
        starts = torch.from_numpy(csc.indptr[:-1].astype(np.int64))
    return TokenBags(torch.from_numpy(unique), torch.from_numpy(index), by_token, starts)


@dataclass
class ProductBatch:
    """What the product tower eats. Bag (b, f) = text field f of product b is
    token_ids[token_offsets[b*F + f] : token_offsets[b*F + f + 1]] (the last bag runs to the end),
    the layout `nn.EmbeddingBag(input, offsets)` takes. `bags` is the same text deduplicated
    (`TokenBags`), built with the batch by `ProductStore.batch`; the tower builds it when absent."""

    images: torch.Tensor  # [B, M, Di] float32, zeros where absent
    image_mask: torch.Tensor  # [B, M] bool, True = image present
    token_ids: torch.Tensor  # [T] int64 vocabulary ids of all bags, concatenated
    token_offsets: torch.Tensor  # [B*F] int64 start of each bag in token_ids
    bags: TokenBags | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_fields(self) -> int:
        """F, the number of text fields (bags) per product."""
        return self.token_offsets.numel() // len(self) if len(self) else 0

    @property
    def field_mask(self) -> torch.Tensor:
        """[B, F] bool, True = the field has at least one in-vocabulary token."""
        ends = torch.cat([self.token_offsets[1:], self.token_offsets.new_tensor([self.token_ids.numel()])])
        return (ends > self.token_offsets).view(len(self), self.num_fields)

    def pin_memory(self) -> ProductBatch:
        """A copy in page-locked memory, so `.to(cuda, non_blocking=True)` overlaps with compute."""
        return ProductBatch(*(t.pin_memory() for t in (self.images, self.image_mask, self.token_ids, self.token_offsets)),
                            bags=None if self.bags is None else TokenBags(*(t if t is None else t.pin_memory()
                                                                           for t in self.bags)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ProductBatch:
        return ProductBatch(*(t.to(device, non_blocking=non_blocking) for t in
                              (self.images, self.image_mask, self.token_ids, self.token_offsets)),
                            bags=None if self.bags is None else self.bags.to(device, non_blocking))


def _exclusive_cumsum(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised: the CSR gather index."""
    offsets = _exclusive_cumsum(lengths)
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)


def _list_lengths(column: pa.Array) -> np.ndarray:
    """Per-row list length, 0 for a null list."""
    return pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _text_csr(table: pa.Table, vocab: Vocabulary, text_fields: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every (product, field) bag: (ids [T] int32, bag_starts [N*F + 1] int64)."""
    n, n_fields = table.num_rows, len(text_fields)
    per_field: list[tuple[np.ndarray, list[Any]] | list[Any]] = []
    for name in text_fields:
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            # Flatten the list column once; a product's strings are a slice of `values`.
            per_field.append((_exclusive_cumsum(_list_lengths(column)), column.flatten().to_pylist()))
        else:
            per_field.append(column.to_pylist())  # a plain string (or other scalar) column
    ids = array.array("i")
    bag_starts = np.zeros(n * n_fields + 1, dtype=np.int64)
    lookup = vocab.string_ids
    bag = 0
    for row in range(n):
        for source in per_field:
            if isinstance(source, tuple):
                starts, values = source
                strings = values[starts[row] : starts[row + 1]]
            else:
                strings = field_strings(source[row])
            for s in strings:
                if s:  # None items of a list column are skipped; blank strings give no tokens
                    ids.extend(lookup(s))
            bag += 1
            bag_starts[bag] = len(ids)
    return np.frombuffer(ids, dtype=np.int32).copy() if len(ids) else np.zeros(0, np.int32), bag_starts


def _image_csr(table: pa.Table, max_images: int, image_dim: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """The first `max_images` image vectors of each product, stacked.

    Returns (vectors [I, Di] float32, image_starts [N + 1] int64, Di). `image_dim` None = take the
    width of the first vector found (0 when there is none).
    """
    n = table.num_rows
    if schema.IMAGE_EMBEDDINGS not in table.column_names:
        return np.zeros((0, image_dim or 0), np.float32), np.zeros(n + 1, np.int64), image_dim or 0
    column = table.column(schema.IMAGE_EMBEDDINGS).combine_chunks()
    counts = _list_lengths(column)  # [N] images per product
    vectors = column.flatten()  # one entry per image vector, across all products
    widths = _list_lengths(vectors)  # [I_all]
    if image_dim is None:
        image_dim = int(widths[0]) if len(widths) else 0
    if len(widths) and not np.all(widths == image_dim):
        bad = int(np.flatnonzero(widths != image_dim)[0])
        product = int(np.searchsorted(np.cumsum(counts), bad, side="right"))
        raise ValueError(
            f"image vectors must all have width {image_dim}; product row {product} has one of width "
            f"{int(widths[bad])}. Re-run `itemsage ingest`, which rejects vectors of the wrong width.")
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    flat = flat.reshape(len(widths), image_dim)  # [I_all, Di]
    if not np.isfinite(flat).all():
        raise ValueError("image vectors contain NaN or inf; re-run `itemsage ingest`, which rejects them.")
    # Keep only each product's first max_images vectors.
    kept = np.minimum(counts, max_images)
    all_starts = _exclusive_cumsum(counts)
    flat = flat[_ragged_arange(all_starts[:-1], kept)]
    return np.ascontiguousarray(flat), _exclusive_cumsum(kept), image_dim


class ProductStore:
    """The catalog featurised once, in memory, as flat arrays (train and evaluate gather from it).

    Text: token ids of all bags concatenated (int32) plus bag starts; images: the kept vectors
    stacked [I, Di] plus per-product starts. No padding is stored; `batch` pads per batch.
    """

    def __init__(self, ids: np.ndarray, text_fields: Sequence[str], max_images: int, image_dim: int,
                 token_ids: np.ndarray, bag_starts: np.ndarray, images: np.ndarray, image_starts: np.ndarray):
        require(max_images >= 1, f"max_images must be >= 1, got {max_images}")
        self.ids = ids  # [N] product ids (object array of str)
        self.text_fields = tuple(text_fields)
        self.max_images = max_images
        self.image_dim = image_dim
        self._token_ids = token_ids  # [T_all] int32
        self._bag_starts = bag_starts  # [N*F + 1] int64
        self._images = images  # [I_all, Di] float32 or float16
        self._image_starts = image_starts  # [N + 1] int64
        self._row_of: dict[str, int] | None = None

    @classmethod
    def from_table(cls, table: pa.Table, vocab: Vocabulary, text_fields: Sequence[str], max_images: int,
                   image_dim: int | None = None, *, image_dtype: str = "float32") -> ProductStore:
        _check_columns(table.column_names, text_fields, "the products table")
        ids = np.asarray(table.column(schema.PRODUCT_ID).to_pylist(), dtype=object)
        token_ids, bag_starts = _text_csr(table, vocab, text_fields)
        images, image_starts, image_dim = _image_csr(table, max_images, image_dim)
        return cls(ids, text_fields, max_images, image_dim, token_ids, bag_starts,
                   images.astype(image_dtype, copy=False), image_starts)

    @classmethod
    def from_dataset(cls, dataset_dir: str | Path, vocab: Vocabulary, text_fields: Sequence[str],
                     max_images: int = schema.MAX_IMAGES, *, image_dtype: str = "float32",
                     batch_rows: int = 50_000, progress: bool = True) -> ProductStore:
        """Featurise `<dataset_dir>/products.parquet`, streaming it in record batches.

        `image_dtype` "float16" halves the memory of the image vectors (batches are float32 anyway).
        """
        from rich.progress import Progress

        path = Path(dataset_dir) / schema.PRODUCTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run `itemsage ingest` to write the dataset.")
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        _check_columns(names, text_fields, str(path))
        columns = [schema.PRODUCT_ID, *text_fields] + ([schema.IMAGE_EMBEDDINGS] if schema.IMAGE_EMBEDDINGS in names else [])
        parts: list[ProductStore] = []
        image_dim: int | None = None
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("featurising products", total=parquet.metadata.num_rows)
            for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                part = cls.from_table(pa.Table.from_batches([record_batch]), vocab, text_fields, max_images,
                                      image_dim, image_dtype=image_dtype)
                if part._images.shape[0]:
                    image_dim = part.image_dim  # the first batch with images fixes the width
                parts.append(part)
                bar.advance(task, record_batch.num_rows)
        if not parts:
            parts.append(cls.from_table(parquet.schema_arrow.empty_table(), vocab, text_fields, max_images))
        image_dim = image_dim or 0
        store = cls(
            ids=np.concatenate([p.ids for p in parts]),
            text_fields=text_fields, max_images=max_images, image_dim=image_dim,
            token_ids=np.concatenate([p._token_ids for p in parts]),
            bag_starts=_concat_starts([p._bag_starts for p in parts]),
            # parts read before the first image fix no width: their (empty) arrays are [0, 0]
            images=np.concatenate([p._images.reshape(len(p._images), image_dim) for p in parts]),
            image_starts=_concat_starts([p._image_starts for p in parts]),
        )
        log.info("featurised %d products: %d tokens, %d image vectors of width %d",
                 len(store), len(store._token_ids), len(store._images), image_dim)
        return store

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_fields(self) -> int:
        return len(self.text_fields)

    def index_of(self, product_ids: Iterable[str]) -> np.ndarray:
        """Rows [K] int64 of `product_ids`; KeyError naming unknown ids."""
        if self._row_of is None:
            self._row_of = {pid: i for i, pid in enumerate(self.ids)}
        row_of = self._row_of
        product_ids = list(product_ids)
        rows = [row_of.get(pid, -1) for pid in product_ids]
        if -1 in rows:
            unknown = [pid for pid, r in zip(product_ids, rows) if r < 0]
            raise KeyError(f"{len(unknown)} product id(s) not in the catalog, e.g. {unknown[:5]}")
        return np.asarray(rows, dtype=np.int64)

    def batch(self, rows: np.ndarray | Sequence[int], *, backward: bool = False) -> ProductBatch:
        """Gather products `rows` [B] into a ProductBatch (M = most images among them, at least 1).

        The text comes deduplicated too (`ProductBatch.bags`); `backward` also builds its transposed
        layout, which the hash bag's backward pass reads (training asks for it).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # [B]
        b, n_fields, n = len(rows), self.num_fields, len(self)
        if b and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"rows must lie in [0, {n}), got min {rows.min()}, max {rows.max()}")
        # Text: bag (b, f) is the store's bag rows[b]*F + f.
        bags = (rows[:, None] * n_fields + np.arange(n_fields)).reshape(-1)  # [B*F]
        lengths = self._bag_starts[bags + 1] - self._bag_starts[bags]  # [B*F]
        offsets = _exclusive_cumsum(lengths)
        token_ids = self._token_ids[_ragged_arange(self._bag_starts[bags], lengths)].astype(np.int64)  # [T]
        # Images: pad to the batch's largest count.
        starts = self._image_starts[rows]  # [B]
        counts = self._image_starts[rows + 1] - starts  # [B], already <= max_images
        m = max(1, int(counts.max()) if b else 0)
        mask = np.arange(m) < counts[:, None]  # [B, M]
        images = np.zeros((b, m, self.image_dim), dtype=np.float32)  # [B, M, Di]
        images[mask] = self._images[(starts[:, None] + np.arange(m))[mask]]
        return ProductBatch(
            images=torch.from_numpy(images),
            image_mask=torch.from_numpy(mask),
            token_ids=torch.from_numpy(token_ids),
            token_offsets=torch.from_numpy(offsets[:-1].copy()),
            bags=token_bags(token_ids, offsets[:-1], transpose=backward),
        )


def _concat_starts(parts: list[np.ndarray]) -> np.ndarray:
    """Join CSR start arrays of consecutive parts (each starts at 0 and ends at its total)."""
    out, shift = [np.zeros(1, np.int64)], 0
    for starts in parts:
        out.append(starts[1:] + shift)
        shift += int(starts[-1])
    return np.concatenate(out)


def _check_columns(names: Sequence[str], text_fields: Sequence[str], where: str) -> None:
    missing = [c for c in (schema.PRODUCT_ID, *text_fields) if c not in names]
    if missing:
        raise ValueError(f"{where} has no column(s) {missing}; it has {list(names)}. Configure text fields "
                         "that the dataset holds, or re-run `itemsage ingest`.")


def featurize(table: pa.Table, vocab: Vocabulary, text_fields: Sequence[str], max_images: int,
              image_dim: int) -> ProductBatch:
    """Featurise every row of a products table (dataset format) into one ProductBatch.

    M = the most images any row has (at least 1), capped at `max_images`; image vectors must have
    width `image_dim`.
    """
    store = ProductStore.from_table(table, vocab, text_fields, max_images, image_dim)
    return store.batch(np.arange(len(store)))
