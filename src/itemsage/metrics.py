"""Recall@K and ranks from plain arrays: the metric of training's validation and of evaluate.

Pure functions of arrays (as sentence-transformers' evaluators), tested on hand-built cases. Ties
are broken pessimistically everywhere (an equal score ranks ahead), so a degenerate model that maps
every product to one vector scores zero rather than perfect.
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
    queries: torch.Tensor, products: torch.Tensor, positive_rows: torch.Tensor, chunk: int = 1024
) -> np.ndarray:
    """0-based rank of each query's engaged product among all products, by inner product.

    queries [Q, D], products [N, D], positive_rows [Q] (row of the engaged product in `products`).
    Ties are broken pessimistically (an equal score ranks ahead), so a degenerate model that maps
    everything to one vector scores zero rather than perfect.
    """
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]  # [C, D]
        rows = positive_rows[start : start + chunk]
        scores = q @ products.T  # [C, N]
        pos = scores.gather(1, rows[:, None])  # [C, 1]
        better_or_equal = (scores >= pos).sum(dim=1) - 1  # the positive itself is not ahead of itself
        out.append(better_or_equal.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


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


def popularity_ranks(train_counts: np.ndarray, positive_rows: np.ndarray) -> np.ndarray:
    """Ranks under the popularity baseline: every query gets the catalog sorted by train-window count.

    Ties are pessimistic as in `exact_ranks`: a product ranks behind every product with a count at
    least its own, so never-engaged products rank last.
    """
    counts = np.asarray(train_counts)
    sorted_counts = np.sort(counts)
    c = counts[np.asarray(positive_rows)]
    at_least = len(counts) - np.searchsorted(sorted_counts, c, side="left")  # products with count >= c
    return at_least - 1
