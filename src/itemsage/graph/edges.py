"""The co-engagement graph of the train window: train.parquet (never validation or test) -> a weighted,
undirected product x product graph (scipy CSR), the sum of four edge types:

- `session`: products a user engaged with close in time. A user's rows in time order, consecutive
  rows on one product merged (weights summed), each linked to the user's next `session_window`
  ones within `session_gap_hours`.
- `closeup` / `home`: a closeup or home row's `query_product_id` (the viewed product; the home
  feed's query product) and its engaged product.
- `search`: products engaged from the same search text (normalised: NFKC, case-folded, whitespace
  collapsed). In each text's rows in time order (consecutive rows on one product merged), a row is
  linked to the text's next `search_window` rows: a sliding window, not a clique, so a head query
  with 100k rows gives 100k x window edges, not 10^10 pairs.

A row weighs `engagement_weights[engagement] x weight x 0.5^(age / recency_half_life_days)`, its age
measured from the train window's last engagement. A window edge weighs the geometric mean of its two
rows' weights, a closeup/home edge its row's; times `edge_type_weights[type]`, summed over repeats.
Each type keeps each product's `max_degree` strongest edges (`cap_degree`); so does their sum, after
the optional hub down-weighting (`hub_exponent`).

Axes: N products (products.parquet's row order), R train rows. Everything is array arithmetic; the
Python loops run over edge types and window offsets, never over rows, products or edges.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from itemsage import schema
from itemsage.data.text import normalize
from itemsage.graph.config import GraphConfig

log = logging.getLogger(__name__)

_HOUR_MS, _DAY_MS = 3_600_000, 86_400_000


@dataclass
class TrainRows:
    """The train window's rows as arrays, in time order; products as products.parquet rows."""

    product: np.ndarray  # [R] int32, -1: not in products.parquet
    query_product: np.ndarray  # [R] int32, -1: none
    surface: np.ndarray  # [R] int8, index into schema.SURFACES, -1: other
    user: np.ndarray  # [R] int32 user code, -1: none
    text: np.ndarray  # [R] int32 normalised search text code, -1: none
    weight: np.ndarray  # [R] float64: engagement weight x row weight x recency decay (0: not used)
    time: np.ndarray  # [R] int64 ms since the epoch
    last_ms: int | None  # the train window's last engagement (None: an empty window)


@dataclass
class Graph:
    """The train window's product graph. Row i = products.parquet row i."""

    adjacency: sp.csr_matrix  # [N, N] float32: the edge types' sum, hub-weighted, degree-capped (rows: out-edges)
    by_type: dict[str, sp.csr_matrix]  # each edge type's [N, N] float32, degree-capped
    engaged: np.ndarray  # [N] bool: engaged, or a query product, in a used train-window row
    last_ms: int | None  # the train window's last engagement (ms), the recency decay's reference
    stats: dict[str, Any]

    @property
    def n(self) -> int:
        return self.adjacency.shape[0]


# ---- reading train.parquet ----------------------------------------------------------------------


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[Any]]:
    """A dictionary column -> ([R] int32 codes, -1 for null; the dictionary's values)."""
    if column.num_chunks == 0:
        return np.empty(0, np.int32), []
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    column = column.unify_dictionaries()
    dictionary = column.chunk(0).dictionary
    indices = pa.chunked_array([c.indices for c in column.chunks], type=column.type.index_type)
    codes = pc.fill_null(indices.cast(pa.int32()), -1).to_numpy()
    return codes, dictionary


def _column(path: Path, name: str, present: set[str], dictionary: bool = False) -> pa.ChunkedArray | None:
    """One column of a Parquet file (None when the file has no such column), read alone so that only
    one column's Arrow buffers are in memory at a time."""
    if name not in present:
        return None
    return pq.read_table(path, columns=[name], read_dictionary=[name] if dictionary else None)[name]


def _product_rows(column: pa.ChunkedArray | None, ids: pa.Array, rows: int) -> np.ndarray:
    """Product ids -> [R] int32 products.parquet rows, -1 for null or unknown."""
    if column is None:
        return np.full(rows, -1, np.int32)
    codes, dictionary = _codes(column)
    lookup = np.append(pc.fill_null(pc.index_in(dictionary, value_set=ids), -1).to_numpy().astype(np.int32), -1)
    return lookup[codes]  # code -1 reads the appended -1


def _text_groups(column: pa.ChunkedArray | None, rows: int) -> np.ndarray:
    """Search texts -> [R] int32 group codes, one per normalised text (-1 for null or empty)."""
    if column is None:
        return np.full(rows, -1, np.int32)
    codes, dictionary = _codes(column)
    # one normalisation per distinct text (the dictionary), not per row
    normal = np.array([" ".join(normalize(t).split()) for t in dictionary.to_pylist()] + [""], dtype=object)
    _, inverse = np.unique(normal, return_inverse=True)
    inverse = inverse.astype(np.int32)
    inverse[normal == ""] = -1  # null (the appended entry) and texts that normalise to nothing
    return inverse[codes]


def read_train(dataset_dir: str | Path, ids: pa.Array, cfg: GraphConfig) -> TrainRows:
    """DATASET/train.parquet as arrays: the columns the graph needs, one at a time, in time order."""
    path = Path(dataset_dir) / schema.TRAIN_FILE
    present = set(pq.read_schema(path).names)
    t = _column(path, schema.TIMESTAMP, present).cast(pa.int64()).to_numpy()
    rows = len(t)
    order = None
    if rows > 1 and not bool((t[1:] >= t[:-1]).all()):  # ingest writes it sorted; a hand-made file may not be
        order = np.argsort(t, kind="stable")
        t = t[order]

    def ordered(a: np.ndarray) -> np.ndarray:
        return a if order is None else a[order]

    product = ordered(_product_rows(_column(path, schema.PRODUCT_ID, present, True), ids, rows))
    query_product = ordered(_product_rows(_column(path, schema.QUERY_PRODUCT_ID, present, True), ids, rows))
    codes, dictionary = _codes(_column(path, schema.ENGAGEMENT, present, True))
    per_engagement = np.array([cfg.engagement_weights.get(v, 0.0) for v in dictionary.to_pylist()] + [0.0])
    w = ordered(per_engagement[codes])  # code -1 (null) reads the appended 0
    weight = _column(path, schema.WEIGHT, present)
    if weight is not None:
        w *= ordered(pc.fill_null(weight, 1.0).to_numpy().astype(np.float64))
    last_ms = int(t[-1]) if rows else None
    if cfg.recency_half_life_days > 0 and rows:
        w *= np.exp2(-(last_ms - t) / (cfg.recency_half_life_days * _DAY_MS))
    codes, dictionary = _codes(_column(path, schema.SURFACE, present, True))
    surface = ordered(np.array([schema.SURFACES.index(s) if s in schema.SURFACES else -1
                                for s in dictionary.to_pylist()] + [-1], np.int8)[codes])
    user_column = _column(path, schema.USER_ID, present, True)
    user = ordered(_codes(user_column)[0]) if user_column is not None else np.full(rows, -1, np.int32)
    text = ordered(_text_groups(_column(path, schema.QUERY_TEXT, present, True), rows))
    return TrainRows(product, query_product, surface, user, text, w, t, last_ms)


# ---- edges ------------------------------------------------------------------------------------------


def _merge_runs(group: np.ndarray, product: np.ndarray, w: np.ndarray, t: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive rows with the same (group, product) -> one row: weights summed, first time kept."""
    if len(group) == 0:
        return group, product, w, t
    start = np.ones(len(group), bool)
    start[1:] = (group[1:] != group[:-1]) | (product[1:] != product[:-1])
    first = np.flatnonzero(start)
    return group[first], product[first], np.add.reduceat(w, first), t[first]


def window_pairs(group: np.ndarray, product: np.ndarray, w: np.ndarray, t: np.ndarray, window: int,
                 max_gap_ms: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by (group, time) -> the pairs (row k, row k + d), d = 1..window, in one group, on
    two different products, at most `max_gap_ms` apart (None: any gap); weight sqrt(w_k w_k+d).
    Returns ([P] int32 product, [P] int32 product, [P] float64 weight)."""
    src, dst, wt = [np.empty(0, np.int32)], [np.empty(0, np.int32)], [np.empty(0)]
    for d in range(1, min(window, len(group) - 1) + 1):
        a, b = np.arange(len(group) - d), np.arange(d, len(group))
        keep = (group[a] == group[b]) & (product[a] != product[b])
        if max_gap_ms is not None:
            keep &= (t[b] - t[a]) <= max_gap_ms
        a, b = a[keep], b[keep]
        src.append(product[a])
        dst.append(product[b])
        wt.append(np.sqrt(w[a] * w[b]))
    return np.concatenate(src), np.concatenate(dst), np.concatenate(wt)


def symmetric(a: np.ndarray, b: np.ndarray, w: np.ndarray, n: int) -> sp.csr_matrix:
    """Undirected edges (a_k, b_k, w_k), a_k != b_k -> [n, n] float32 CSR holding both directions,
    repeats summed. The repeats are summed once, on the upper triangle, before it is mirrored."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    upper = sp.csr_matrix((w.astype(np.float32), (lo, hi)), shape=(n, n))  # sums duplicates
    upper.eliminate_zeros()  # weights that underflow float32 (rows decayed for years): no edge
    full = (upper + upper.T).tocsr()
    full.sort_indices()
    return full


def cap_degree(m: sp.csr_matrix, k: int, block: int = 1 << 22) -> sp.csr_matrix:
    """Each row's k largest entries (ties: the lower column); entries must be >= 0. Rows with <= k
    entries stay whole. The heavy rows' entries are ranked by one stable argsort of a 64-bit key per
    block of rows holding about `block` entries (the row, then the float32 weight's bits reversed:
    larger first), which keeps the canonical CSR's column order among equal weights; the blocks bound
    the sort's memory (~40 bytes per entry of a block) whatever the matrix's size."""
    m = m.tocsr()
    m.sum_duplicates()  # canonical: columns sorted within each row
    nnz = np.diff(m.indptr)
    heavy = np.flatnonzero(nnz > k)
    if not len(heavy):
        return m
    keep = np.ones(m.nnz, bool)
    ends = np.cumsum(nnz[heavy])
    for rows in np.split(heavy, np.searchsorted(ends, np.arange(block, ends[-1], block), side="right")):
        if not len(rows):
            continue
        per = nnz[rows]
        first = np.cumsum(per) - per  # each row's first position in the block
        within = np.arange(int(per.sum())) - np.repeat(first, per)  # an entry's position within its row
        sel = np.repeat(m.indptr[rows].astype(np.int64), per) + within
        row = np.repeat(np.arange(len(rows), dtype=np.uint64), per)
        bits = np.maximum(m.data[sel], 0).astype(np.float32).view(np.uint32)  # order-preserving for x >= 0
        key = (row << np.uint64(32)) | (np.uint32(0xFFFFFFFF) - bits).astype(np.uint64)
        del row, bits
        order = sel[np.argsort(key, kind="stable")]  # by row, larger first
        keep[order[within >= k]] = False  # `within` of the sorted block: its rank in the row
    indptr = np.concatenate([[0], np.cumsum(np.minimum(nnz, k))]).astype(m.indptr.dtype)
    return sp.csr_matrix((m.data[keep], m.indices[keep], indptr), shape=m.shape)


def edge_types(rows: TrainRows, n: int, cfg: GraphConfig) -> Iterator[tuple[str, sp.csr_matrix, int]]:
    """Each edge type's [n, n] graph (symmetric, uncapped) and its pair count, one type at a time (so
    that only one uncapped graph is in memory), in `edge_type_weights` order."""
    used = (rows.product >= 0) & (rows.weight > 0)
    factor = cfg.edge_type_weights
    for name in [t for t in factor if factor[t]]:
        if name in ("session", "search"):
            group, window = (rows.user, cfg.session_window) if name == "session" else (rows.text, cfg.search_window)
            if not window:
                continue
            sel = np.flatnonzero(used & (group >= 0) & ((rows.surface == 0) if name == "search" else True))
            sel = sel[np.argsort(group[sel], kind="stable")]  # by group, still in time order within it
            g, p, w, t = _merge_runs(group[sel], rows.product[sel], rows.weight[sel], rows.time[sel])
            gap = cfg.session_gap_hours * _HOUR_MS if name == "session" else None
            a, b, ew = window_pairs(g, p, w, t, window, gap)
            del sel, g, p, w, t
            yield name, symmetric(a, b, ew * factor[name], n), len(a)
        else:  # closeup, home: the row's query product and its engaged product
            sel = np.flatnonzero(used & (rows.surface == schema.SURFACES.index(name)) & (rows.query_product >= 0)
                                 & (rows.query_product != rows.product))
            yield name, symmetric(rows.query_product[sel], rows.product[sel], rows.weight[sel] * factor[name], n), len(sel)


def down_weight_hubs(m: sp.csr_matrix, strength: np.ndarray, exponent: float) -> sp.csr_matrix:
    """w_ij / (s_i s_j)^(exponent / 2), s = `strength` [N] (each product's summed edge weight, before any
    cap): an edge into a product that is linked to much counts for less."""
    if exponent == 0 or m.nnz == 0:
        return m
    row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    s = strength.astype(np.float64)
    m = m.copy()
    m.data = (m.data / (s[row] * s[m.indices]) ** (exponent / 2)).astype(np.float32)
    m.eliminate_zeros()
    return m


def _percentiles(x: np.ndarray) -> list[int]:
    return [int(np.percentile(x, q)) for q in (50, 99, 100)] if len(x) else [0, 0, 0]


def build_graph(rows: TrainRows, n: int, cfg: GraphConfig) -> Graph:
    """The train window's graph over n products from its rows (see the module doc)."""
    strength = np.zeros(n)  # each product's summed edge weight before any cap (the hub weighting's)
    by_type: dict[str, sp.csr_matrix] = {}
    pairs: dict[str, int] = {}
    for name, raw, count in edge_types(rows, n, cfg):
        strength += np.asarray(raw.sum(axis=1), dtype=np.float64).ravel()
        by_type[name], pairs[name] = cap_degree(raw, cfg.max_degree), count
        del raw
    total = sp.csr_matrix((n, n), dtype=np.float32)
    for m in by_type.values():
        total = total + m
    adjacency = cap_degree(down_weight_hubs(total.tocsr(), strength, cfg.hub_exponent), cfg.max_degree)
    del total
    adjacency.sort_indices()
    used = (rows.product >= 0) & (rows.weight > 0)
    engaged = np.zeros(n, bool)
    engaged[rows.product[used]] = True
    engaged[rows.query_product[used & (rows.query_product >= 0)]] = True
    degree = np.diff(adjacency.indptr)
    in_degree = np.bincount(adjacency.indices, minlength=n)
    stats = {"train_rows": len(rows.product), "used_rows": int(used.sum()), "engaged_products": int(engaged.sum()),
             "pairs_by_type": pairs, "edges_by_type": {k: int(m.nnz) for k, m in by_type.items()},
             "edges": int(adjacency.nnz), "products_with_edges": int((degree > 0).sum()),
             "degree_p50_p99_max": _percentiles(degree[degree > 0]),
             "in_degree_p50_p99_max": _percentiles(in_degree[in_degree > 0])}
    return Graph(adjacency, by_type, engaged, rows.last_ms, stats)
