"""Home feed: PinnerSage clustering of a user's history and the merge of the clusters' candidates.

`cluster_history` cuts a Ward tree of the history's vectors into interests and picks each one's
medoid; `allocate` shares k results among the clusters by importance (largest remainder);
`merge_candidates` interleaves the clusters' ranked lists into one, without repeats. Used by the
service's `/v1/home` and `itemsage evaluate`, through by_product.home_by_history.
"""

from __future__ import annotations

import math

import numpy as np

# PinnerSage cuts the Ward tree at a distance threshold, then keeps a few clusters; `max_clusters`
# caps the count. A fixed distance fits one vector space only: in the demo's frozen image space two
# unrelated unit vectors lie about 1.4 apart and even a user's own items about 1.2, so a cut at 1.0
# (two singletons merge when their cosine is above 0.5) merged almost nothing and every history hit
# the cap. The cut is therefore relative to the history's own scale: `relative` times the median
# pairwise Euclidean distance of its items (scale-free: the same history scaled by any factor gives
# the same clusters). The Ward height of a merge grows with the clusters' sizes, so the factor sits
# above 1. Chosen on the validation window (BENCHMARKS.md, "Products as queries, as served").
WARD_RELATIVE_THRESHOLD = 1.5
SMALL_HISTORY = 3  # fewer items than this form one cluster: too few to find separate interests


def ward_threshold(vectors: np.ndarray, relative: float = WARD_RELATIVE_THRESHOLD) -> float:
    """The Ward cut of a history [H, D]: `relative` x the median pairwise Euclidean distance of its rows."""
    from scipy.spatial.distance import pdist

    distances = pdist(np.asarray(vectors, dtype=np.float64))  # [H (H - 1) / 2]
    return float(relative * np.median(distances)) if len(distances) else 0.0


def cluster_history(vectors: np.ndarray, max_clusters: int, *, relative: float = WARD_RELATIVE_THRESHOLD,
                    threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ward clusters of a history and each cluster's medoid, as in PinnerSage.

    vectors [H, D] -> (labels [H] in 0..C-1, medoids [C] positions in the history). The Ward tree is
    cut at `threshold` when given (an absolute distance), else at `ward_threshold(vectors, relative)`;
    more than `max_clusters` clusters cut the same tree into `max_clusters`. Clusters are numbered by
    size, largest first (ties: earliest first member). The medoid is the member with the smallest
    summed Euclidean distance to the cluster's other members (ties: earliest).
    """
    h = len(vectors)
    if h < SMALL_HISTORY or max_clusters == 1:
        labels = np.zeros(h, dtype=np.int64)
    else:
        from scipy.cluster.hierarchy import fcluster, linkage

        x = np.asarray(vectors, dtype=np.float64)
        tree = linkage(x, method="ward")  # the Ward tree, built once
        cut = ward_threshold(x, relative) if threshold is None else float(threshold)
        labels = fcluster(tree, cut, criterion="distance")  # merges below the cut
        if labels.max() > max_clusters:  # too many interests: cut the same tree higher
            labels = fcluster(tree, max_clusters, criterion="maxclust")
    # Renumber: largest first, then by first appearance.
    found = np.unique(labels)
    order = sorted(found, key=lambda c: (-int((labels == c).sum()), int(np.argmax(labels == c))))
    renumber = {int(c): i for i, c in enumerate(order)}
    labels = np.array([renumber[int(c)] for c in labels], dtype=np.int64)
    medoids = np.empty(len(order), dtype=np.int64)
    for c in range(len(order)):
        members = np.flatnonzero(labels == c)
        x = vectors[members].astype(np.float64)  # [n, D]
        sq = (x * x).sum(axis=1)  # [n]
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))  # [n, n]
        medoids[c] = members[int(np.argmin(dist.sum(axis=1)))]
    return labels, medoids


def allocate(k: int, sizes: list[int]) -> list[int]:
    """Split k result slots across clusters in proportion to `sizes` (largest remainder, ties first)."""
    total = sum(sizes)
    raw = [k * s / total for s in sizes]
    quota = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(raw[c] - quota[c]), c))
    for c in by_remainder[: k - sum(quota)]:
        quota[c] += 1
    return quota


def merge_candidates(
    ids: np.ndarray, scores: np.ndarray, quotas: list[int], exclude: set[str], k: int
) -> tuple[list[str], list[float], list[int]]:
    """Merge per-cluster result lists into one list of up to k products.

    ids, scores [C, K'] (clusters by importance, each list best first). Each cluster contributes
    up to its quota of products not excluded and not already taken; unfilled slots go to the best
    remaining candidates of any cluster. A product found by several clusters keeps its best score.
    Returns (ids, scores, cluster) sorted by score, best first.
    """
    return merge_for_ks(ids, scores, [quotas], exclude, [k])[0]


def merge_for_ks(
    ids: np.ndarray, scores: np.ndarray, quotas: list[list[int]], exclude: set[str], ks: list[int]
) -> list[tuple[list[str], list[float], list[int]]]:
    """`merge_candidates` for several k at once (quotas[j] for ks[j]): the best scores and their order,
    which do not depend on k, are found once."""
    best: dict[str, tuple[float, int]] = {}
    for c in range(len(ids)):
        for pid, s in zip(ids[c], scores[c]):
            if pid and pid not in exclude and (pid not in best or s > best[pid][0]):
                best[pid] = (float(s), c)
    by_score = sorted(best, key=lambda p: (-best[p][0], p))
    out = []
    for quota_of, k in zip(quotas, ks):
        chosen: dict[str, None] = {}  # insertion-ordered set
        for c, quota in enumerate(quota_of):
            taken = 0
            for pid in ids[c]:
                if taken >= quota:
                    break
                if pid in best and pid not in chosen:
                    chosen[pid] = None
                    taken += 1
        for pid in by_score:
            if len(chosen) >= k:
                break
            chosen.setdefault(pid, None)
        ranked = sorted(chosen, key=lambda p: (-best[p][0], p))
        out.append((ranked, [best[p][0] for p in ranked], [best[p][1] for p in ranked]))
    return out
