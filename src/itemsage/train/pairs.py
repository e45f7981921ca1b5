"""The training data: (query, engaged product) pairs, their sampler and the batch builder.

`load_pairs` reads one window (train, validation or test) into `Pairs` with each surface's frozen
query vectors built once; `Sampler` draws seeded positives (the task mixture, `_mixture`) and
uniform random negatives; `Prefetch` builds the next batch while the current step runs. Used by
train.py (all of it) and evaluate.py (`load_pairs`).

Choices: sampling is with replacement from a fixed distribution over the training rows (natural
frequency; add_to_cart/checkout rows times `upweight_conversions`), drawn by one seeded numpy
Generator; every DDP rank holds an identical sampler and draws the same global batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from itemsage import schema
from itemsage.model.batch import ProductStore

log = logging.getLogger(__name__)

CONVERSIONS = ("add_to_cart", "checkout")


@dataclass
class Pairs:
    """The (query, engaged product) rows of one split; query vectors deduplicated per surface."""

    queries: dict[str, Tensor]  # surface -> [U_s, Dq_s] distinct frozen query vectors
    surface: np.ndarray  # [N] str (object)
    query_row: np.ndarray  # [N] int64 row in queries[surface]
    query_key: np.ndarray  # [N] int64 stable identity of (surface, query), for accidental-hit masking
    product_row: np.ndarray  # [N] int64 row in the ProductStore (also the product's id in the loss)
    task: np.ndarray  # [N] str (object), surface.engagement
    engagement: np.ndarray  # [N] str (object)
    weight: np.ndarray  # [N] float32, the row's `weight` column
    source_row: np.ndarray | None = None  # [N] int64 row of each pair in its window's file
    # [N] int64 store row of the log's query_product_id (the viewed product, a medoid), -1 where the row
    # names none or one outside the store: what a closeup ranking leaves out (metrics.closeup_exclusions)
    query_product_row: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.product_row)

    @property
    def query_dims(self) -> dict[str, int]:
        return {s: int(q.shape[1]) for s, q in self.queries.items()}

    def take(self, keep: np.ndarray) -> "Pairs":
        """The pairs where `keep` [N] is True (every per-row field, the query tables as they are)."""
        rows = {f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), np.ndarray)}
        return dataclasses.replace(self, **rows)


def _key(data: bytes) -> int:
    """Stable signed int64 of some bytes (blake2b, never Python's salted hash)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _vectors(column: Any) -> np.ndarray:
    """A list<float> column without nulls -> [N, D] float32 (one width, which ingest guarantees)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    n = len(column)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    if values.size % n or np.any(pc.list_value_length(column).to_numpy(zero_copy_only=False) != values.size // n):
        raise ValueError("query_embedding vectors of one surface have different widths; re-run `itemsage ingest`")
    return values.reshape(n, values.size // n)


def load_pairs(dataset_dir: str | Path, file: str, store: ProductStore, *, tasks: tuple[str, ...] = (),
               sample: int | None = None, seed: int = 0, progress: bool = False) -> Pairs:
    """Read a window (train.parquet, validation.parquet or test.parquet) and build its query vectors once.

    Search rows with text use the frozen text encoder (query_encoder.cached_text_embeddings, cached in
    the dataset directory); every other row uses its `query_embedding`. `tasks` keeps only those
    tasks; `sample` keeps an equal share per task (stratified, seeded).
    """
    path = Path(dataset_dir) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `itemsage ingest` to write the dataset.")
    names = pq.ParquetFile(path).schema_arrow.names
    cols = [c for c in (schema.SURFACE, schema.ENGAGEMENT, schema.PRODUCT_ID, schema.WEIGHT,
                        schema.QUERY_TEXT, schema.QUERY_EMBEDDING, schema.QUERY_PRODUCT_ID) if c in names]
    table = pq.read_table(path, columns=cols)
    task = np.char.add(np.char.add(np.asarray(table[schema.SURFACE].to_numpy(zero_copy_only=False), dtype=str), "."),
                       np.asarray(table[schema.ENGAGEMENT].to_numpy(zero_copy_only=False), dtype=str))
    keep = np.isin(task, tasks) if tasks else np.ones(len(task), bool)
    if sample is not None:  # equal share per task, seeded; a smaller task gives all its rows
        rng = np.random.default_rng(seed)
        present = sorted(set(task[keep].tolist()))
        share = math.ceil(sample / max(1, len(present)))
        chosen = []
        for t in present:
            rows = np.flatnonzero(keep & (task == t))
            chosen.append(rows if len(rows) <= share else np.sort(rng.choice(rows, share, replace=False)))
        keep = np.zeros(len(task), bool)
        keep[np.concatenate(chosen) if chosen else []] = True
    rows = np.flatnonzero(keep)
    table, task = table.take(rows), task[rows]
    n = table.num_rows

    surface = np.asarray(table[schema.SURFACE].to_numpy(zero_copy_only=False), dtype=object)
    has_text = (pc.is_valid(table[schema.QUERY_TEXT]).to_numpy(zero_copy_only=False)
                if schema.QUERY_TEXT in names else np.zeros(n, bool))
    has_vec = (pc.is_valid(table[schema.QUERY_EMBEDDING]).to_numpy(zero_copy_only=False)
               if schema.QUERY_EMBEDDING in names else np.zeros(n, bool))
    queries: dict[str, Tensor] = {}
    query_row = np.zeros(n, np.int64)
    query_key = np.zeros(n, np.int64)
    for s in sorted(set(surface.tolist())):
        in_s = surface == s
        # Search text: distinct strings through the frozen encoder (cached), unless a vector is given.
        by_text = in_s & has_text & ~has_vec if s == "search" else np.zeros(n, bool)
        by_vec = in_s & has_vec
        missing = in_s & ~by_text & ~by_vec
        if missing.any():
            raise ValueError(f"{path}: {int(missing.sum())} {s} row(s) have no query vector or text; "
                             "re-run `itemsage ingest`, which rejects them (reason missing_query)")
        parts: list[np.ndarray] = []
        if by_text.any():
            from itemsage.encoders.text import cached_text_embeddings

            idx = np.flatnonzero(by_text)
            texts = np.asarray(table[schema.QUERY_TEXT].filter(by_text).to_pylist(), dtype=object).astype(str)
            distinct, inverse = np.unique(texts, return_inverse=True)
            vectors = cached_text_embeddings(dataset_dir, distinct.tolist(), progress=progress)  # [U, 384]
            parts.append(np.asarray(vectors, dtype=np.float32))
            query_row[idx] = inverse
            keys = np.array([_key(f"{s}\0t\0{t}".encode()) for t in distinct.tolist()], np.int64)
            query_key[idx] = keys[inverse]
        if by_vec.any():
            idx = np.flatnonzero(by_vec)
            vecs = np.ascontiguousarray(_vectors(table[schema.QUERY_EMBEDDING].filter(by_vec)))  # [n_s, Dq]
            as_bytes = vecs.view(np.dtype((np.void, vecs.shape[1] * 4))).ravel()  # [n_s] one raw row each
            distinct, inverse = np.unique(as_bytes, return_inverse=True)
            offset = sum(len(p) for p in parts)
            if parts and parts[0].shape[1] != vecs.shape[1]:
                raise ValueError(f"{path}: search query vectors are {vecs.shape[1]}-d but the text encoder "
                                 f"gives {parts[0].shape[1]}-d; re-run `itemsage ingest`")
            parts.append(np.frombuffer(distinct.tobytes(), np.float32).reshape(len(distinct), vecs.shape[1]))
            query_row[idx] = offset + inverse.ravel()
            keys = np.array([_key(f"{s}\0v\0".encode() + d.tobytes()) for d in distinct], np.int64)
            query_key[idx] = keys[inverse.ravel()]
        queries[s] = torch.from_numpy(np.concatenate(parts).copy())

    weight = (table[schema.WEIGHT].to_numpy(zero_copy_only=False).astype(np.float32)
              if schema.WEIGHT in names else np.ones(n, np.float32))
    query_product_row = np.full(n, -1, np.int64)
    if schema.QUERY_PRODUCT_ID in names:
        at = pc.index_in(table[schema.QUERY_PRODUCT_ID], value_set=pa.array(list(store.ids), pa.string()))
        query_product_row = at.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return Pairs(
        queries=queries, surface=surface, query_row=query_row, query_key=query_key,
        product_row=store.index_of(table[schema.PRODUCT_ID].to_pylist()),
        task=np.asarray(task, dtype=object),
        engagement=np.asarray(table[schema.ENGAGEMENT].to_numpy(zero_copy_only=False), dtype=object),
        weight=np.nan_to_num(weight, nan=1.0),
        source_row=rows.astype(np.int64),
        query_product_row=query_product_row,
    )


def negative_pool(dataset_dir: str | Path, store: ProductStore) -> np.ndarray | None:
    """The catalog rows random negatives are drawn from: the products on sale by the end of the train
    window, i.e. without a `listed_at` or listed at or before the train window's last engagement;
    None when that is every product (or the catalog gives no `listed_at`).

    A product listed later did not exist while those engagements happened: drawn as a negative at
    every step, never as a positive, it would be pushed away from every query before its first
    engagement, which is what a model trained on a catalog snapshot never does to tomorrow's products.
    """
    dataset_dir = Path(dataset_dir)
    products = pq.ParquetFile(dataset_dir / schema.PRODUCTS_FILE)
    if schema.LISTED_AT not in products.schema_arrow.names:
        return None
    table = products.read(columns=[schema.PRODUCT_ID, schema.LISTED_AT])
    listed = table.column(schema.LISTED_AT)
    if listed.null_count == len(listed):
        return None
    times = pq.read_table(dataset_dir / schema.TRAIN_FILE, columns=[schema.TIMESTAMP]).column(schema.TIMESTAMP)
    last_ms = pc.max(pc.cast(times, pa.int64())).as_py()  # the train window's last engagement (None: empty)
    if last_ms is None:
        return None
    later = pc.greater(pc.cast(listed, pa.int64()), last_ms).fill_null(False).to_numpy(zero_copy_only=False)  # [P]
    if not later.any():
        return None
    rows = store.index_of(table.column(schema.PRODUCT_ID).to_pylist())  # [P] store row of each product
    keep = np.ones(len(store), bool)
    keep[rows[later]] = False
    log.info("random negatives: %d of %d products (%d listed after the train window's last engagement "
             "are left out)", int(keep.sum()), len(store), int(later.sum()))
    return np.flatnonzero(keep)


class NegativeGroups:
    """The catalog's categories for category-matched random negatives: group_of [N] each store row's
    category code (-1: none), and each category's rows of the negative pool (members[starts[g]:starts[g+1]])."""

    def __init__(self, group_of: np.ndarray, pool: np.ndarray) -> None:
        self.group_of = group_of  # [N] int64
        in_pool = pool[group_of[pool] >= 0]
        order = np.argsort(group_of[in_pool], kind="stable")
        self.members = in_pool[order]  # pool rows grouped by category
        counts = np.bincount(group_of[in_pool], minlength=int(group_of.max(initial=-1)) + 1)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # [G + 1]
        self.sizes = counts  # [G] pool rows per category

    @classmethod
    def from_dataset(cls, dataset_dir: str | Path, store: ProductStore, pool: np.ndarray | None,
                     field: str = "category") -> NegativeGroups | None:
        """Groups by the catalog's `field` (its first value: a category path), None when it has none."""
        products = pq.ParquetFile(Path(dataset_dir) / schema.PRODUCTS_FILE)
        if field not in products.schema_arrow.names:
            return None
        table = products.read(columns=[schema.PRODUCT_ID, field])
        first = pc.list_element(table.column(field), 0) if pa.types.is_list(table.column(field).type) \
            else table.column(field)
        values = first.to_pylist()
        if all(v is None or v == "" for v in values):
            return None
        codes: dict[str, int] = {}
        group = np.array([-1 if not v else codes.setdefault(v, len(codes)) for v in values], np.int64)
        group_of = np.full(len(store), -1, np.int64)
        group_of[store.index_of(table.column(schema.PRODUCT_ID).to_pylist())] = group
        return cls(group_of, np.arange(len(store)) if pool is None else pool)


class Sampler:
    """Seeded draws of positives (the task mixture) and random negatives.

    Every DDP rank holds an identical copy and draws the same global batch. `pool`: the catalog rows
    negatives are drawn from (default: every row). With `groups` and `share` > 0, that share of the
    negatives is drawn from the categories of the batch's positives (a positive drawn at random, then
    a product of its category at random): the negatives a query's product is told apart from within
    its category, which uniform draws rarely give (docs/METHOD.md). `log_q` gives each negative's
    expected number of draws, the correction that keeps the sampled softmax unbiased.
    """

    def __init__(self, probs: np.ndarray, catalog_size: int, seed: int, pool: np.ndarray | None = None,
                 groups: NegativeGroups | None = None, share: float = 0.0):
        self.cdf = np.cumsum(probs / probs.sum())  # [N]
        self.catalog_size = catalog_size
        self.pool = pool
        self.groups, self.share = (groups, share) if groups is not None and share > 0 else (None, 0.0)
        self.rng = np.random.default_rng(seed)

    @property
    def pool_size(self) -> int:
        return self.catalog_size if self.pool is None else len(self.pool)

    def positives(self, b: int) -> np.ndarray:  # [B] row indices into Pairs
        return np.minimum(np.searchsorted(self.cdf, self.rng.random(b), side="right"), len(self.cdf) - 1)

    def _uniform(self, r: int) -> np.ndarray:
        drawn = self.rng.integers(0, self.pool_size, r)
        return drawn if self.pool is None else self.pool[drawn]

    def negatives(self, r: int, positive_products: np.ndarray | None = None) -> np.ndarray:
        """[R] catalog rows of the pool: uniform, or a `share` of them from the categories of
        `positive_products` [B] (store rows); a positive without a category draws uniformly."""
        if self.groups is None or positive_products is None:
            return self._uniform(r)
        rc = int(round(r * self.share))
        uniform = self._uniform(r - rc)
        g = self.groups
        group = g.group_of[positive_products[self.rng.integers(0, len(positive_products), rc)]]  # [rc]
        usable = group >= 0
        usable[usable] = g.sizes[group[usable]] > 0
        picks = np.empty(rc, np.int64)
        u = self.rng.random(rc)
        gs = group[usable]
        picks[usable] = g.members[g.starts[gs] + (u[usable] * g.sizes[gs]).astype(np.int64)]
        picks[~usable] = self._uniform(int((~usable).sum()))
        return np.concatenate([uniform, picks])

    def log_q(self, negatives: np.ndarray, positive_products: np.ndarray, r: int) -> np.ndarray:
        """[R] log of each negative's expected number of draws among this step's `r` (the random
        term's correction): (r - rc) / N uniform, plus rc x the share of positives in its category over
        the category's size, plus rc x the share of positives without a category over N."""
        n = self.pool_size
        if self.groups is None:
            return np.full(len(negatives), np.log(r / n))
        g = self.groups
        rc = int(round(r * self.share))
        pos_group = g.group_of[positive_products]
        usable = pos_group >= 0
        usable[usable] = g.sizes[pos_group[usable]] > 0
        per_group = np.bincount(pos_group[usable], minlength=len(g.sizes)) / len(positive_products)  # [G]
        expected = np.full(len(negatives), ((r - rc) + rc * (~usable).mean()) / n)
        neg_group = g.group_of[negatives]
        has = neg_group >= 0
        expected[has] += rc * per_group[neg_group[has]] / np.maximum(g.sizes[neg_group[has]], 1)
        return np.log(expected)

    def fork(self) -> Sampler:
        """A copy with its own generator in the same state (it draws what this sampler would)."""
        twin = Sampler.__new__(Sampler)
        twin.cdf, twin.catalog_size, twin.pool = self.cdf, self.catalog_size, self.pool
        twin.groups, twin.share = self.groups, self.share
        twin.rng = np.random.default_rng()
        twin.rng.bit_generator.state = self.rng.bit_generator.state
        return twin


class Prefetch:
    """The step's batches, each built in a background thread while the step before it runs.

    `ahead`, a fork of the sampler, draws batch k+1 on the calling thread when batch k is handed
    out (draws stay in order: deterministic), and `build(rows, negatives)` runs in the thread. The
    sampler itself is moved to the state after batch k's draw only when batch k is handed out, so a
    checkpoint taken after step k saves the state that redraws batch k+1 on resume.

    `background=False` builds each batch when it is handed out instead (same batches, same order):
    on a CPU whose cores all run torch's intra-op threads, a builder thread only competes with the
    step (measured in docs/METHOD.md); `train` uses the thread on CUDA or when a core is spare.
    """

    def __init__(self, sampler: Sampler, b: int, r: int, build: Any, background: bool = True,
                 product_row: np.ndarray | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.sampler, self.ahead, self.b, self.r, self.build = sampler, sampler.fork(), b, r, build
        self.product_row = product_row  # [N pairs] store rows: category-matched negatives read the positives
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="itemsage-batch") if background else None
        self.pending: tuple[np.ndarray, np.ndarray, dict[str, Any], Any] | None = None

    def _start(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any], Any]:
        rows = self.ahead.positives(self.b)  # [B]
        negs = self.ahead.negatives(self.r, None if self.product_row is None else self.product_row[rows])  # [R]
        built = self.pool.submit(self.build, rows, negs) if self.pool is not None else None
        return rows, negs, self.ahead.rng.bit_generator.state, built

    def next(self) -> tuple[np.ndarray, np.ndarray, Any]:
        """(positive rows [B], negative rows [R], built batch) of the next step; starts the one after."""
        rows, negs, state, built = self.pending if self.pending is not None else self._start()
        self.sampler.rng.bit_generator.state = state  # the sampler has now drawn this batch
        self.pending = self._start()
        return rows, negs, built.result() if built is not None else self.build(rows, negs)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _mixture(pairs: Pairs, cfg: Any) -> np.ndarray:
    """Sampling weight per row: natural frequency, conversions times upweight_conversions."""
    p = np.ones(len(pairs))
    p[np.isin(pairs.engagement, CONVERSIONS)] *= cfg.upweight_conversions
    return p


def _loss_weights(pairs: Pairs, cfg: Any) -> np.ndarray:
    """Per-row loss weight: the row's weight times its engagement's weight (default 1)."""
    by_engagement = {e: cfg.engagement_weights.get(e, 1.0) for e in schema.ENGAGEMENTS}
    return pairs.weight * np.array([by_engagement[e] for e in pairs.engagement], np.float32)
