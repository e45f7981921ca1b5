"""Filtered search inside faiss: which rows a search may return, and the plan that finds their top k.

A filter (index/filters.py), the rows a live index hides (deleted or replaced) and a request's
`exclude` / `exclude_self` all become one `RowMask`: a bitmap of the rows a search may return, in
the layout faiss's `IDSelectorBitmap` reads (row r = bit r % 8 of byte r // 8), and its count. A
search under a mask never drops results after the fact; it picks one of two paths per query:

- exact: the passing rows' inner products only (`IndexFlat.search` with an `IDSelectorArray`, which
  faiss scores in place), when few rows pass;
- ANN with the bitmap inside the search (HNSW's walk, IVF-PQ's scan of the probed lists), with
  efSearch / nprobe widened as the mask gets more selective, from the table `itemsage index`
  measured for the version (`SearchTuning`, index/tuning.py).

HNSW's walk is blind to the filter (it scores every neighbour and only keeps passing ones as
results), so a selective mask finds fewer passing rows per node scored, and a mask that passes few
rows *near the query* (anti-correlated with it) fails even when it passes many elsewhere. `plan`
therefore first searches the query's `PROBE` nearest rows without the mask: when k of them pass,
they are the answer; otherwise the passing share among them (the selectivity where the query is)
chooses ef / nprobe, or exact below the tuned range or when exact is cheaper. A share far below the
catalog's (an anti-correlated filter: the answer lies outside the query's neighbourhood, which the
uniform masks of tuning never had) searches as for a DEPLETED times more selective mask, and
IVF-PQ re-ranks twice the shortlist. An ANN answer with fewer than min(k, passing) rows is redone
exactly, so k results always come back when k pass.

`FaissSearch` holds the faiss calls (and their pitfalls: HNSW's parameters replace the index's
efSearch, IndexRefine takes the selector only in `base_index_params` and its own `k_factor`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import faiss
import numpy as np

PROBE = 32  # unfiltered nearest rows searched first by `plan`
SHORT_CUT_ROWS = 64  # a mask leaving out at most this many rows of a large catalog skips the probe
DEPLETED = 4  # a probe passing under 1 / DEPLETED of the catalog's share marks an anti-correlated filter


class RowMask:
    """The rows a search may return: `bits` uint8 [ceil(N / 64) * 8] (row r = bit r % 8 of byte r // 8,
    zero past N) and `count`, the rows set."""

    __slots__ = ("bits", "n", "count")

    def __init__(self, bits: np.ndarray, n: int, count: int | None = None) -> None:
        self.bits, self.n = bits, n
        self.count = int(np.bitwise_count(bits.view(np.uint64)).sum()) if count is None else int(count)

    @staticmethod
    def nbytes(n: int) -> int:
        return -(-n // 64) * 8

    @classmethod
    def from_bool(cls, mask: np.ndarray) -> RowMask:
        """bool [N] -> its RowMask."""
        bits = np.zeros(cls.nbytes(len(mask)), dtype=np.uint8)
        packed = np.packbits(mask, bitorder="little")
        bits[: len(packed)] = packed
        return cls(bits, len(mask), int(np.count_nonzero(mask)))

    @classmethod
    def all(cls, n: int) -> RowMask:
        bits = np.zeros(cls.nbytes(n), dtype=np.uint8)
        bits[: n // 8] = 0xFF
        if n % 8:
            bits[n // 8] = (1 << (n % 8)) - 1
        return cls(bits, n, n)

    def intersect(self, other: RowMask | None) -> RowMask:
        return self if other is None else RowMask(np.bitwise_and(self.bits, other.bits), self.n)

    def without(self, rows: np.ndarray | list[int]) -> RowMask:
        """A copy with `rows` (int, any order, repeats allowed) left out."""
        bits = self.bits.copy()
        if len(rows) <= 64:  # a request's exclude_self and a few ids: plain integers beat numpy's calls
            gone = 0
            for r in set(int(r) for r in rows):
                byte, flag = r >> 3, 1 << (r & 7)
                if bits[byte] & flag:
                    bits[byte] &= 0xFF ^ flag
                    gone += 1
            return RowMask(bits, self.n, self.count - gone)
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        flags = (np.uint8(1) << (rows & 7).astype(np.uint8))
        gone = int(np.count_nonzero(bits[rows >> 3] & flags))
        np.bitwise_and.at(bits, rows >> 3, ~flags)
        return RowMask(bits, self.n, self.count - gone)

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """bool [len(rows)]: which `rows` pass (-1, faiss's "none", never does)."""
        if len(rows) <= 16:  # a probe of a few rows: plain integers beat numpy's calls
            bits = self.bits
            return np.array([r >= 0 and bool(bits[r >> 3] >> (r & 7) & 1) for r in rows.tolist()], dtype=bool)
        rows = np.asarray(rows, dtype=np.int64)
        ok = rows >= 0
        safe = np.where(ok, rows, 0)
        return ok & ((self.bits[safe >> 3] >> (safe & 7).astype(np.uint8)) & 1).astype(bool)

    def rows(self) -> np.ndarray:
        """int64 [count]: the passing rows, ascending (reads only the non-zero 64-row words)."""
        words = self.bits.view(np.uint64)
        nz = np.flatnonzero(words)
        flags = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(len(nz), 64).astype(bool)
        return (nz[:, None] * 64 + np.arange(64))[flags]

    def selector(self) -> Any:
        return faiss.IDSelectorBitmap(self.bits)  # one-argument form: it keeps `bits` alive


@dataclasses.dataclass
class SearchTuning:
    """What `itemsage index` measured for a version (manifest `search_tuning`; index/tuning.py).

    param: "ef_search" (HNSW), "nprobe" (IVF-PQ) or "" (flat: always exact).
    selectivities: the shares of passing rows tuned, descending, 1.0 (unfiltered) first; values: the
        smallest ef / nprobe whose recall@10 on the tuning queries reached target + margin there;
        recall: recall@10 on the evaluation queries at that value; ann_ms: CPU ms per query there.
    exact_ms_per_row: CPU ms of exact search per passing row; exact_max_rows: passing rows at or below
        which the plan goes exact without probing.
    """

    param: str
    target: float = 0.95
    margin: float = 0.02
    selectivities: list[float] = dataclasses.field(default_factory=list)
    values: list[int] = dataclasses.field(default_factory=list)
    recall: list[float] = dataclasses.field(default_factory=list)
    ann_ms: list[float] = dataclasses.field(default_factory=list)
    exact_ms_per_row: float = 0.0
    exact_max_rows: int = 0
    queries: dict[str, int] = dataclasses.field(default_factory=dict)

    def value_for(self, selectivity: float) -> int | None:
        """The value tuned at the nearest selectivity at or below `selectivity` (a more selective mask
        needs a wider search; within 10%, the spread of the random masks tuned on, counts as equal);
        None below the tuned range (exact)."""
        for s, v in zip(self.selectivities, self.values):
            if s <= selectivity * 1.1:
                return int(v)
        return None

    def ann_ms_for(self, value: int) -> float:
        found = [ms for v, ms in zip(self.values, self.ann_ms) if v == value]
        return found[0] if found else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchTuning:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def untuned(cls, kind: str, ef_search: int, nprobe: int) -> SearchTuning:
        """Before tuning (or a version built before it): the configured value, for masks passing half the
        rows or more; anything more selective goes exact (correct, if slower than a tuned version)."""
        param, value = {"hnsw": ("ef_search", ef_search), "ivfpq": ("nprobe", nprobe)}.get(kind, ("", 0))
        return cls(param, selectivities=[1.0, 0.5] if param else [], values=[value, value] if param else [])


class FaissSearch:
    """The faiss calls of one ProductIndex: ANN (with or without a selector), exact over rows, the probe.

    `ann_index`: IndexHNSWFlat, IndexRefine(IVF-PQ, flat) or IndexFlatIP; `exact_index`: the flat index
    of the same rows (HNSW's storage, IVF-PQ's re-rank vectors, the flat index itself)."""

    def __init__(self, kind: str, ann_index: Any, exact_index: Any, ivf: Any = None) -> None:
        self.kind, self.ann_index, self.exact_index, self.ivf = kind, ann_index, exact_index, ivf
        self.n = int(ann_index.ntotal)

    def set_unfiltered(self, value: int) -> None:
        if self.kind == "hnsw":
            self.ann_index.hnsw.efSearch = value
        elif self.kind == "ivfpq":
            self.ivf.nprobe = value

    def unfiltered_value(self) -> int:
        """The served unfiltered ef / nprobe (the index's own setting)."""
        if self.kind == "hnsw":
            return int(self.ann_index.hnsw.efSearch)
        return int(self.ivf.nprobe) if self.kind == "ivfpq" else 0

    def params(self, value: int, selector: Any = None, k_factor: float | None = None) -> Any:
        if self.kind == "hnsw":  # given parameters replace the index's efSearch: always pass it
            return faiss.SearchParametersHNSW(efSearch=int(value), sel=selector) if selector is not None \
                else faiss.SearchParametersHNSW(efSearch=int(value))
        if self.kind == "ivfpq":  # the selector only works in base_index_params; k_factor defaults to 1
            base = faiss.SearchParametersIVF(nprobe=int(value), sel=selector) if selector is not None \
                else faiss.SearchParametersIVF(nprobe=int(value))
            return faiss.IndexRefineSearchParameters(
                k_factor=float(self.ann_index.k_factor if k_factor is None else k_factor), base_index_params=base)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def ann(self, q: np.ndarray, k: int, value: int, mask: RowMask | None = None,
            k_factor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], rows [Q, k]; -1 = none) of an ANN search, inside `mask` when given (IVF-PQ:
        re-ranking k_factor x k candidates, default the index's)."""
        return self.ann_index.search(q, k, params=self.params(value, None if mask is None else mask.selector(),
                                                              k_factor))

    def exact(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], rows [Q, k]) of exact search over `rows` (int64, ascending), -1 past len(rows)."""
        kk = min(k, len(rows))
        if kk == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        selector = faiss.IDSelectorArray(rows)  # IndexFlat scores only these rows, in place
        scores, found = self.exact_index.search(q, kk, params=faiss.SearchParameters(sel=selector))
        if kk < k:
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            found = np.pad(found, ((0, 0), (0, k - kk)), constant_values=-1)
        return scores, found

    def exact_masked(self, q: np.ndarray, k: int, mask: RowMask) -> tuple[np.ndarray, np.ndarray]:
        """Exact search inside `mask`: over its rows, or (most rows passing) a full scan with the bitmap."""
        if mask.count * 2 > mask.n:
            scores, rows = self.exact_index.search(q, min(k, mask.n), params=faiss.SearchParameters(sel=mask.selector()))
            if rows.shape[1] < k:
                scores = np.pad(scores, ((0, 0), (0, k - rows.shape[1])), constant_values=-np.inf)
                rows = np.pad(rows, ((0, 0), (0, k - rows.shape[1])), constant_values=-1)
            return scores, rows
        return self.exact(q, k, mask.rows())

    def probe(self, q: np.ndarray, p: int, k: int, value: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The query's `p` nearest rows without a mask: (scores [1, p], rows [1, p]), best first, searched at
        `value` (the tuned value of the mask's selectivity: its answer must be as good as a filtered
        search's, whose k passing rows lie deeper in the ranking) or the unfiltered one."""
        value = max(self.unfiltered_value(), value or 0)
        if self.kind == "hnsw":
            return self.ann_index.search(q, p, params=self.params(max(value, p)))
        # IVF-PQ: a shortlist of refine_factor x 2k codes re-ranked (the depth a mask passing half the rows
        # needs), not refine_factor x p
        return self.ann_index.search(q, p, params=self.params(value, k_factor=max(1.0, self.ann_index.k_factor * 2 * k / p)))


def plan(search: FaissSearch, tuning: SearchTuning, q: np.ndarray, k: int,
         mask: RowMask) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-k rows inside `mask` for one query q [1, D]: (scores [k], rows [k]; -1 = none, only when
    fewer than k pass) and the path taken: "none", "exact", "probe", "ann" or "ann+exact"."""
    passing = mask.count
    if passing == 0:
        return np.full(k, -np.inf, np.float32), np.full(k, -1, np.int64), "none"
    if search.kind == "flat" or passing <= tuning.exact_max_rows:
        scores, rows = search.exact_masked(q, k, mask)
        return scores[0], rows[0], "exact"
    n = mask.n
    selectivity = passing / n
    left_out = n - passing
    if left_out <= SHORT_CUT_ROWS and left_out * 1000 <= n:
        # A few rows out of many (exclude_self, a few deletes): a search deep enough to hold them all.
        depth = min(k + left_out, n)
        scores, rows = search.ann(q, depth, max(search.unfiltered_value(), depth) if search.kind == "hnsw"
                                  else search.unfiltered_value())
        keep = mask.contains(rows[0])
        if int(keep.sum()) >= k:
            return scores[0][keep][:k], rows[0][keep][:k], "probe"
    p = max(PROBE, k)
    p_scores, p_rows = search.probe(q, min(p, n), k, tuning.value_for(selectivity))
    hit = mask.contains(p_rows[0])
    hits = int(hit.sum())
    if hits >= k:  # the query's nearest rows hold k passing ones: they are the answer
        return p_scores[0][hit][:k], p_rows[0][hit][:k], "probe"
    local = (hits + 0.5) / len(p_rows[0])  # the passing share where the query is
    # A neighbourhood far poorer in passing rows than the catalog (a filter anti-correlated with the query):
    # the answer lies beyond it, which uniform tuning never saw; search as for a DEPLETED x more selective
    # mask and (IVF-PQ) re-rank twice the shortlist. Measured at 1M: 0.93 -> 0.98 (BENCHMARKS.md).
    depleted = local * DEPLETED < selectivity
    value = tuning.value_for(min(selectivity, local) / (DEPLETED if depleted else 1))
    if value is None or passing * tuning.exact_ms_per_row <= tuning.ann_ms_for(value):
        scores, rows = search.exact_masked(q, k, mask)
        return scores[0], rows[0], "exact"
    wider = 2 * search.ann_index.k_factor if depleted and search.kind == "ivfpq" else None
    scores, rows = search.ann(q, k, value, mask, wider)
    if int((rows[0] >= 0).sum()) < min(k, passing):  # the walk met too few passing rows: redo exactly
        scores, rows = search.exact_masked(q, k, mask)
        return scores[0], rows[0], "ann+exact"
    return scores[0], rows[0], "ann"
