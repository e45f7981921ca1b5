"""The search settings of an index version, measured when it is built: the smallest efSearch (HNSW) or
nprobe (IVF-PQ) that reaches a recall@10 target, unfiltered and under masks of decreasing selectivity.

Two sets of perturbed catalog vectors (`recall.perturbed_queries`: a stored vector plus noise of half
its length) play the queries: the *tuning* queries choose each value, the *evaluation* queries (other
rows, other noise) check it and give the recall the manifest records. Per selectivity s (the share of
rows a mask passes; 1.0 = unfiltered) a uniform random mask is drawn, the exact top 10 inside it is
the reference, and the grid of values is walked upwards from the previous selectivity's value until
the tuning queries reach target + margin with every answer complete; when the evaluation queries then
miss the target, the value goes up the grid until they reach it. Selectivities are tuned down to
masks of `MIN_TUNED_ROWS` passing rows, or until the grid's top no longer reaches the target: masks
more selective than the table go exact (planner.plan). The CPU time of one query at each value and of
exact search per passing row are measured too, so the plan can choose the cheaper correct path.

The unfiltered value is what the service searches with (instead of a fixed ef 128). If no value of
the grid reaches the target unfiltered (an IVF-PQ whose codes and re-ranking cannot, a graph too
sparse), the build is refused with the measured recall and what to change (`TuningError`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faiss
import numpy as np

from itemsage.index.planner import FaissSearch, RowMask, SearchTuning
from itemsage.index.recall import neighbour_recall, perturbed_queries

log = logging.getLogger(__name__)

K = 10
SELECTIVITIES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001)
MIN_TUNED_ROWS = 1000  # masks passing fewer rows are always searched exactly
TUNING_QUERIES = 500
TIMED_QUERIES = 50  # one-query calls timed per value
HNSW_GRID = (12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
IVF_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
            3072, 4096, 6144, 8192, 12288, 16384)


class TuningError(ValueError):
    """No setting of the grid reaches the recall target on this catalog: the version is refused."""


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """float32 [N, D] rows scaled to unit length (as ProductIndex.add stores them)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return np.ascontiguousarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), dtype=np.float32)


def grid(search: FaissSearch) -> list[int]:
    if search.kind == "hnsw":
        return list(HNSW_GRID)
    nlist = int(search.ivf.nlist)
    return sorted({v for v in IVF_GRID if v < nlist} | {nlist})


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, rows: np.ndarray | None, k: int,
                chunk: int = 65_536) -> np.ndarray:
    """Exact top-k rows [Q, k] of `queries` by inner product among `rows` of `vectors` (None: all),
    by blocks of rows (BLAS; memory bounded by the block)."""
    candidates = np.arange(len(vectors)) if rows is None else rows
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_r = np.full((len(queries), 0), -1, np.int64)
    for lo in range(0, len(candidates), chunk):
        part = candidates[lo : lo + chunk]
        block = vectors[part] if rows is not None or lo or len(part) < len(vectors) else vectors
        s, r = faiss.knn(queries, np.ascontiguousarray(block, dtype=np.float32), min(k, len(part)),
                         metric=faiss.METRIC_INNER_PRODUCT)
        best_s = np.concatenate([best_s, s], axis=1)
        best_r = np.concatenate([best_r, part[r]], axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)
    return best_r


def _recall(search: FaissSearch, queries: np.ndarray, truth: np.ndarray, value: int,
            mask: RowMask | None) -> tuple[float, bool]:
    """(recall@k against `truth`, every answer complete) of one batched search at `value`."""
    _, rows = search.ann(queries, truth.shape[1], value, mask)
    return neighbour_recall(rows, truth), bool((rows >= 0).all())


def _cpu_ms(fn: Any, queries: np.ndarray) -> float:
    """CPU ms of this thread per call of fn(one query [1, D])."""
    start = time.thread_time()
    for i in range(len(queries)):
        fn(queries[i : i + 1])
    return 1e3 * (time.thread_time() - start) / max(len(queries), 1)


def tune(search: FaissSearch, vectors: np.ndarray, *, target: float = 0.95, margin: float = 0.02,
         fixed: int = 0, evaluation_queries: int = 1000, seed: int = 0) -> tuple[SearchTuning, dict[str, Any]]:
    """Measure the search table of `search` over its unit `vectors` [N, D] (the rows it holds).

    `fixed` > 0: the unfiltered value is that (the user's choice: its recall is measured and a miss
    logged, not refused). Returns (the table, stats for the manifest: the unfiltered recall@10 on the
    evaluation queries and their count)."""
    n = len(vectors)
    if search.kind == "flat" or n == 0:
        tuning = SearchTuning("", target=target, margin=margin, exact_max_rows=n)
        return tuning, {"neighbour_recall_at_10": 1.0, "recall_queries": 0, "recall_reference": "exact"}
    param = "ef_search" if search.kind == "hnsw" else "nprobe"
    k = min(K, n)
    evaluation = perturbed_queries(vectors, min(evaluation_queries, n), np.random.default_rng(seed))
    tuning_q = perturbed_queries(vectors, min(TUNING_QUERIES, n), np.random.default_rng(seed + 1))
    values = grid(search)
    table = SearchTuning(param, target=target, margin=margin,
                         queries={"tuning": len(tuning_q), "evaluation": len(evaluation)})
    rng = np.random.default_rng(seed + 2)
    start = 0
    started = time.perf_counter()
    for s in SELECTIVITIES:
        if s < 1.0 and s * n < MIN_TUNED_ROWS:
            break
        mask = None if s == 1.0 else RowMask.from_bool(rng.random(n) < s)
        rows = None if mask is None else mask.rows()
        truth_t = exact_top_k(tuning_q, vectors, rows, k)
        truth_e = exact_top_k(evaluation, vectors, rows, k)
        if s == 1.0 and fixed:
            chosen = int(fixed)
        else:
            chosen = next((v for v in values[start:] if _meets(_recall(search, tuning_q, truth_t, v, mask),
                                                               target + margin)), None)
        if chosen is None:
            if s == 1.0:
                best, _ = _recall(search, evaluation, truth_e, values[-1], None)
                raise TuningError(_refusal(search, best, values[-1], target))
            log.info("%s: no %s up to %d reaches recall@%d %.2f at selectivity %g; masks as selective go exact",
                     search.kind, param, values[-1], k, target + margin, s)
            break
        recall, complete = _recall(search, evaluation, truth_e, chosen, mask)
        while (recall < target or not complete) and not (s == 1.0 and fixed) and chosen < values[-1]:
            chosen = values[values.index(chosen) + 1]  # the margin was not enough on other queries
            recall, complete = _recall(search, evaluation, truth_e, chosen, mask)
        if s == 1.0 and recall < target:
            if not fixed:
                raise TuningError(_refusal(search, recall, chosen, target))
            log.warning("%s with %s %d (as configured) reaches recall@%d %.4f < target %.2f on the evaluation "
                        "queries; leave it at 0 to tune it", search.kind, param, chosen, k, recall, target)
        start = values.index(chosen) if chosen in values else 0
        timed = evaluation[:TIMED_QUERIES]
        ms = _cpu_ms(lambda q, v=chosen, m=mask: search.ann(q, k, v, m), timed)
        table.selectivities.append(s)
        table.values.append(int(chosen))
        table.recall.append(round(recall, 4))
        table.ann_ms.append(round(ms, 4))
        log.info("tuned %s at selectivity %g: %s %d, recall@%d %.4f (evaluation queries), %.3f CPU ms/query",
                 search.kind, s, param, chosen, k, recall, ms)
    sample = np.sort(rng.choice(n, size=min(n, 20_000), replace=False))
    exact_ms = _cpu_ms(lambda q: search.exact(q, k, sample), evaluation[:20])
    table.exact_ms_per_row = round(exact_ms / len(sample), 7)
    table.exact_max_rows = _exact_max_rows(table, n)
    log.info("search tuning of %d vectors in %.1f s: exact up to %d passing rows (%.4f CPU us per row)",
             n, time.perf_counter() - started, table.exact_max_rows, 1e3 * table.exact_ms_per_row)
    return table, {"neighbour_recall_at_10": table.recall[0], "recall_queries": len(evaluation),
                   "recall_reference": "exact inner product on perturbed stored vectors"}


def _meets(result: tuple[float, bool], goal: float) -> bool:
    recall, complete = result
    return complete and recall >= goal


def _exact_max_rows(table: SearchTuning, n: int) -> int:
    """Passing rows up to which the plan goes exact without probing: masks under MIN_TUNED_ROWS, and
    the largest tuned mask whose exact search cost no more than its ANN search."""
    best = min(n, MIN_TUNED_ROWS)
    for s, ms in zip(table.selectivities[1:], table.ann_ms[1:]):
        if s * n * table.exact_ms_per_row <= ms:
            best = max(best, int(s * n))
    return best


def _refusal(search: FaissSearch, recall: float, value: int, target: float) -> str:
    if search.kind == "ivfpq":
        ivf = search.ivf
        return (f"IVF-PQ over {search.n:,} vectors reaches recall@10 {recall:.3f} at most (nprobe {value} of "
                f"{ivf.nlist} lists, re-ranking {search.ann_index.k_factor:g} x k), under the target {target:.2f}. "
                "Its 4-bit codes and re-ranking cannot find the neighbours: raise --refine-factor (e.g. 40), use "
                "--pq-nbits 8, or use --kind hnsw (or flat, exact) for a catalog this small; --recall-target "
                "lowers the target")
    return (f"HNSW over {search.n:,} vectors reaches recall@10 {recall:.3f} at most (ef_search {value}), under the "
            f"target {target:.2f}; build with a larger --m or --ef-construction, or use --kind flat (exact)")
