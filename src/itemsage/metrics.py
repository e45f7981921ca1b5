"""Recall@K and ranks from plain arrays: the metric of training's validation and of evaluate.

Pure functions of arrays (as sentence-transformers' evaluators), tested on hand-built cases. A
model's ties are broken pessimistically (an equal score ranks ahead), so a degenerate model that
maps every product to one vector scores zero rather than perfect; the demo shop's ceilings, whose
rankings tie by construction, read ties at random (`expected_recall`). Closeup pairs may leave their
query product out of the ranking (`exclude_rows`), as the service does.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


DEFAULT_KS: tuple[int, ...] = (1, 10, 100)


def recall_at_k(
    retrieved: np.ndarray, positives: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[int, float]:
    """Fraction of queries whose engaged product is among the first k retrieved.

    retrieved: [Q, K] ranked ids (best first; any dtype comparable with `positives`).
    positives: [Q] the engaged product of each query.
    Each (query, product) pair counts once, as in the paper. k larger than K is an error, since the
    answer would silently be Recall@K.
    """
    retrieved = np.asarray(retrieved)
    positives = np.asarray(positives)
    if retrieved.ndim != 2 or positives.shape != (retrieved.shape[0],):
        raise ValueError(f"expected retrieved [Q, K] and positives [Q], got {retrieved.shape} and {positives.shape}")
    if retrieved.shape[0] == 0:
        return {k: float("nan") for k in ks}
    too_big = [k for k in ks if k > retrieved.shape[1]]
    if too_big:
        raise ValueError(f"Recall@{too_big[0]} needs at least {too_big[0]} retrieved ids, got {retrieved.shape[1]}")
    hit = retrieved == positives[:, None]  # [Q, K]
    # First hit position; K where there is none.
    first = np.where(hit.any(axis=1), hit.argmax(axis=1), retrieved.shape[1])
    return {k: float((first < k).mean()) for k in ks}


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Recall@k from 0-based ranks of the engaged product (rank 0 = retrieved first)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {k: float("nan") for k in ks}
    return {k: float((ranks < k).mean()) for k in ks}


@torch.inference_mode()
def exact_ranks(
    queries: torch.Tensor, products: torch.Tensor, positive_rows: torch.Tensor, chunk: int = 1024,
    exclude_rows: np.ndarray | None = None,
) -> np.ndarray:
    """0-based rank of each query's engaged product among all products, by inner product.

    queries [Q, D], products [N, D], positive_rows [Q] (row of the engaged product in `products`).
    Ties are broken pessimistically (an equal score ranks ahead), so a degenerate model that maps
    everything to one vector scores zero rather than perfect. `exclude_rows` [Q]: a product left out
    of query q's ranking (-1: none), as the service's closeup leaves out the viewed product
    (`exclude_self`); a positive that is its query's excluded product cannot be retrieved: rank N.
    """
    n = products.shape[0]
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]  # [C, D]
        rows = positive_rows[start : start + chunk]
        scores = q @ products.T  # [C, N]
        pos = scores.gather(1, rows[:, None])  # [C, 1]
        better_or_equal = (scores >= pos).sum(dim=1) - 1  # the positive itself is not ahead of itself
        ranks = better_or_equal.cpu().numpy()
        if exclude_rows is not None:
            ex = np.asarray(exclude_rows[start : start + chunk], dtype=np.int64)
            has = ex >= 0
            if has.any():
                ex_t = torch.from_numpy(np.where(has, ex, 0)).to(scores.device)
                ahead = (scores.gather(1, ex_t[:, None]) >= pos)[:, 0].cpu().numpy()
                same = ex == rows.cpu().numpy()
                ranks = np.where(has & same, n, ranks - (has & ~same & ahead))
        out.append(ranks)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def closeup_exclusions(surfaces: np.ndarray, query_product_rows: np.ndarray | None) -> np.ndarray | None:
    """[Q] the product each pair's ranking leaves out: a closeup pair's query product (its catalog
    row, as the service's /v1/closeup leaves out the viewed product), -1 elsewhere; None when no pair
    has one. Home keeps its query product (a medoid of the user's history may be engaged again)."""
    if query_product_rows is None:
        return None
    rows = np.where(np.asarray(surfaces).astype(str) == "closeup", query_product_rows, -1)
    return rows if (rows >= 0).any() else None


@torch.inference_mode()
def masked_ranks(queries: torch.Tensor, products: torch.Tensor, positive_rows: np.ndarray,
                 masks: Sequence[np.ndarray], chunk: int = 1024) -> np.ndarray:
    """`exact_ranks` with each query's own products left out of the ranking: masks[q] holds catalog
    rows (e.g. the user's history) that cannot be retrieved for query q. A positive inside its mask is
    unreachable: rank N (a miss at every k). queries [Q, D], products [N, D], positive_rows [Q]."""
    n = products.shape[0]
    out = np.empty(len(positive_rows), dtype=np.int64)
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]  # [C, D]
        scores = q @ products.T  # [C, N]
        for j in range(q.shape[0]):
            i = start + j
            mask = np.asarray(masks[i], dtype=np.int64)
            pos = int(positive_rows[i])
            if (mask == pos).any():
                out[i] = n
                continue
            row = scores[j].clone()
            row[torch.from_numpy(mask).to(row.device)] = -torch.inf
            out[i] = int((row >= row[pos]).sum()) - 1  # ties pessimistic, as exact_ranks
    return out


def group_recall(
    ranks: np.ndarray, groups: Iterable[str], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[str, float]]:
    """Recall@k per group label (e.g. the task `closeup.click`), plus `all`. Counts included as `n`."""
    ranks = np.asarray(ranks)
    groups = np.asarray(list(groups))
    result: dict[str, dict[str, float]] = {}
    for name in sorted(set(groups.tolist())):
        sel = ranks[groups == name]
        result[name] = {f"recall@{k}": v for k, v in recall_from_ranks(sel, ks).items()} | {"n": int(sel.size)}
    result["all"] = {f"recall@{k}": v for k, v in recall_from_ranks(ranks, ks).items()} | {"n": int(ranks.size)}
    return result


def first_hit_positions(retrieved: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Position of each query's engaged product in its ranked list [Q, K]; K when it is absent.

    This turns an ANN result list into ranks that `recall_from_ranks` reads correctly for k <= K.
    """
    retrieved = np.asarray(retrieved)
    hit = retrieved == np.asarray(positives)[:, None]  # [Q, K]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), retrieved.shape[1])


def popularity_ranks(train_counts: np.ndarray, positive_rows: np.ndarray,
                     exclude_rows: np.ndarray | None = None) -> np.ndarray:
    """Ranks under the popularity baseline: every query gets the catalog sorted by train-window count.

    Ties are pessimistic as in `exact_ranks`: a product ranks behind every product with a count at
    least its own, so never-engaged products rank last. `exclude_rows` as in `exact_ranks`.
    """
    counts = np.asarray(train_counts)
    sorted_counts = np.sort(counts)
    positive_rows = np.asarray(positive_rows)
    c = counts[positive_rows]
    at_least = len(counts) - np.searchsorted(sorted_counts, c, side="left")  # products with count >= c
    ranks = at_least - 1
    if exclude_rows is not None:
        ex = np.asarray(exclude_rows)
        has, same = ex >= 0, ex == positive_rows
        ranks = np.where(has & same, len(counts), ranks - (has & ~same & (counts[np.maximum(ex, 0)] >= c)))
    return ranks


def expected_recall(greater: np.ndarray, tied: np.ndarray, k: int) -> np.ndarray:
    """P(rank < k) per pair when the `tied` products scoring as the engaged one are ordered at random
    among it (the ceilings' tie rule): `greater` products rank ahead for sure, so the engaged product
    is at any of the t + 1 places after them with equal chance: clip((k - g) / (t + 1), 0, 1)."""
    return np.clip((k - np.asarray(greater, np.float64)) / (np.asarray(tied, np.float64) + 1.0), 0.0, 1.0)


# The engaged product's train-window engagement count (SPEC §9: the tail must not be buried).
COUNT_BUCKETS: tuple[tuple[str, int, int | None], ...] = (("0", 0, 0), ("1-4", 1, 4), ("5-19", 5, 19),
                                                         (">=20", 20, None))


def bucket_figures(hits: np.ndarray, ranks: np.ndarray, counts: np.ndarray, k: int = 10,
                   known_below: int | None = None) -> dict[str, dict[str, float | None]]:
    """Recall@k and the median rank per COUNT_BUCKETS bucket of the engaged product's train-window
    count: {bucket: {"recall@k", "median_rank" (1-based), "n"}}. hits [Q]: rank < k (or its
    probability); ranks [Q] 0-based; counts [Q] the engaged products' counts. `known_below`: ranks at
    or beyond it are unknown (an ANN list's length): a median there is None."""
    hits, ranks, counts = (np.asarray(x) for x in (hits, ranks, counts))
    out: dict[str, dict[str, float | None]] = {}
    for name, lo, hi in COUNT_BUCKETS:
        sel = (counts >= lo) & (counts <= hi if hi is not None else True)
        median = float(np.median(ranks[sel])) if sel.any() else None
        if median is not None and known_below is not None and np.sort(ranks[sel])[sel.sum() // 2] >= known_below:
            median = None  # the median involves a rank past the list
        out[name] = {f"recall@{k}": float(np.mean(hits[sel])) if sel.any() else None,
                     "median_rank": None if median is None else median + 1, "n": int(sel.sum())}
    return out
