"""Catalog products as queries, as served and as evaluated: closeup by product, home by history.

The model was trained to align *frozen* query vectors (through each surface's adapter) with
products, so a catalog product used as a query is its frozen query vector (itemsage.data.product_query:
its main image vector, or its title's text-encoder vector), not its learned embedding:

- `closeup_by_product`: each product's frozen vector -> the closeup adapter -> top-k of the index,
  leaving out the product itself and any ids the caller excludes (k results still come back when
  the catalog has them: the search goes deep enough to cover every excluded id).
- `home_by_history`: a history's frozen vectors (unit rows) -> Ward clusters and their medoids
  (home.cluster_history, PinnerSage) -> each medoid through the home adapter (the closeup adapter
  when the model has no home surface) -> per-cluster top lists merged by cluster importance
  (home.allocate, home.merge_candidates). Importance is the cluster's item count, or, given each
  item's time, its time-decayed count sum(0.5 ** (age / half_life)) as in PinnerSage. History
  products are left out of the results unless `keep_history`.

Both take a batch of queries and a list of result sizes `ks`, and search the index once per batch
at the depth the largest k needs: the service calls them with one query and one k (`Service.closeup`,
`Service.home`), `itemsage evaluate` with every test query and K = 1, 10, 100. Over an exact (flat)
index a request with a smaller k gets exactly the prefix-merge this computes; over HNSW a deeper
search may find slightly different neighbours. `adapt(surface, x [B, Dq]) -> [B, D]` is the caller's
adapter (the service's `_adapt`; `model_adapter(model)` for evaluation); `index` is anything with the
ProductIndex contract (`search`, `query_vector`, `__len__`): a faiss version, a live index, Milvus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from itemsage.index.home import WARD_RELATIVE_THRESHOLD, allocate, cluster_history, merge_for_ks

DEFAULT_HALF_LIFE_DAYS = 30.0  # recency weighting: an engagement this old counts half (see docs/METHOD.md)
SECONDS_PER_DAY = 86_400.0
EVAL_HISTORY = 10  # evaluate: a history is the last this-many distinct train-window products (chosen on validation)

Adapt = Callable[[str, np.ndarray], np.ndarray]


def model_adapter(model: Any) -> Adapt:
    """`adapt(surface, x [B, Dq]) -> [B, D]` unit rows through an ItemSageModel's query adapters (torch)."""
    import torch

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    def adapt(surface: str, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device)
            return model.encode_queries(surface, q).float().cpu().numpy()

    return adapt


def home_surface(query_dims: dict[str, int]) -> str:
    """The adapter a home history goes through: home's, else closeup's (both take frozen product vectors)."""
    return "home" if "home" in query_dims else "closeup"


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norms [N, 1] of float rows [N, D]: `np.linalg.norm(x, axis=1, keepdims=True)`, the same
    operations (so the same bits) without its Python-level dispatch, which a one-row request notices."""
    return np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows [N, D] scaled to unit length in float64 (a zero row stays zero), as float32."""
    x = np.asarray(x, dtype=np.float64)
    norms = row_norms(x)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def top_k_excluding(index: Any, q: np.ndarray, ks: Sequence[int], exclude: Sequence[set[str]]
                    ) -> list[list[tuple[list[str], list[float]]]]:
    """Per query row and per k, the top-k (ids, scores) of `index` leaving out that row's `exclude`.

    q [B, D]; one search at depth max(ks) + the largest exclude set (capped at the index size), so
    every k still gets k results when the catalog holds them; row b reads only its own depth,
    max(ks) + |exclude[b]|, as a request of its own would. Returns out[b][j] for ks[j].
    """
    if len(q) == 0:
        return []
    top = max(ks)
    depth = max(min(top + max((len(e) for e in exclude), default=0), len(index)), 1)
    if len(q) == 1 and hasattr(index, "search_one") and np.isfinite(q).all():  # a request's one query:
        ids, scores = index.search_one(np.ascontiguousarray(q[0], dtype=np.float32), depth)  # no padding
        keep = [(p, s) for p, s in zip(ids, scores) if p not in exclude[0]][:top]
        return [[([p for p, _ in keep[:k]], [s for _, s in keep[:k]]) for k in ks]]
    ids, scores = index.search(np.ascontiguousarray(q, dtype=np.float32), depth)  # [B, depth]
    out = []
    for b in range(len(q)):
        keep: list[tuple[str, float]] = []
        for p, s in zip(ids[b][:top + len(exclude[b])], scores[b][:top + len(exclude[b])]):
            if p and p not in exclude[b]:
                keep.append((p, float(s)))
                if len(keep) == top:
                    break
        out.append([([p for p, _ in keep[:k]], [s for _, s in keep[:k]]) for k in ks])
    return out


def closeup_by_product(index: Any, adapt: Adapt, product_ids: Sequence[str], ks: Sequence[int], *,
                       exclude_self: bool = True, exclude: Sequence[set[str]] | None = None
                       ) -> list[list[tuple[list[str], list[float]]]]:
    """Closeup results of catalog products queried by their frozen vectors through the closeup adapter.

    product_ids [B] -> out[b][j] = (ids, scores) of the top ks[j], best first. `exclude[b]`: more
    ids to leave out of row b's results. Raises KeyError (an id not in the index) or
    index.NoProductQueries (an index built before products had frozen query vectors).
    """
    x = unit_rows(index.query_vector(list(product_ids)))  # [B, Dq] frozen query vectors
    q = adapt("closeup", x)  # [B, D] product space
    masks = [set(exclude[b]) if exclude is not None else set() for b in range(len(product_ids))]
    if exclude_self:
        for b, pid in enumerate(product_ids):
            masks[b].add(pid)
    return top_k_excluding(index, q, ks, masks)


@dataclass
class HomeResult:
    """One history's home feed: per k the merged (ids, scores, cluster_of), and its clusters.

    labels [H] cluster of each history item (clusters numbered by importance, most important first),
    medoids [C] positions in the history, sizes [C] items, importance [C] shares summing to 1.
    """

    results: list[tuple[list[str], list[float], list[int]]]
    labels: np.ndarray
    medoids: np.ndarray
    sizes: list[int]
    importance: list[float]


def cluster_importance(labels: np.ndarray, times: np.ndarray | None = None, now: float | None = None,
                       half_life_days: float = DEFAULT_HALF_LIFE_DAYS) -> np.ndarray:
    """Each cluster's importance [C]: its item count, or with `times` [H] (Unix seconds) the
    time-decayed count sum over members of 0.5 ** (age_days / half_life_days), age from `now`
    (default: the latest time given; an item after `now` counts 1). PinnerSage's importance."""
    c = int(labels.max()) + 1 if len(labels) else 0
    if times is None:
        weights = np.ones(len(labels))
    else:
        t = np.asarray(times, dtype=np.float64)
        age_days = np.maximum((float(t.max()) if now is None else float(now)) - t, 0.0) / SECONDS_PER_DAY
        weights = np.exp2(-age_days / half_life_days)
        if not weights.sum() > 0:  # every item so old that its weight underflows: count items instead
            weights = np.ones(len(labels))
    return np.bincount(labels, weights=weights, minlength=c)


def plan_home(x: np.ndarray, max_clusters: int, times: np.ndarray | None = None, now: float | None = None,
              half_life_days: float = DEFAULT_HALF_LIFE_DAYS, *, ward_relative: float = WARD_RELATIVE_THRESHOLD,
              ward_threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A history's frozen vectors [H, Dq] -> (labels [H], medoids [C], importance [C]), the clusters
    renumbered by importance (ties: cluster_history's order, largest first). Unit rows are clustered,
    the Ward tree cut at `ward_relative` x the history's median pairwise distance, or at the absolute
    `ward_threshold` when given (home.cluster_history)."""
    labels, medoids = cluster_history(unit_rows(x), max_clusters, relative=ward_relative, threshold=ward_threshold)
    weight = cluster_importance(labels, times, now, half_life_days)  # [C]
    order = sorted(range(len(medoids)), key=lambda c: (-weight[c], c))
    renumber = np.empty(len(order), dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return renumber[labels], medoids[order], weight[order]


def home_by_history(index: Any, adapt: Adapt, surface: str, histories: Sequence[Sequence[str]], ks: Sequence[int], *,
                    max_clusters: int = 5, times: Sequence[Sequence[float] | None] | None = None,
                    now: Sequence[float | None] | None = None, half_life_days: float = DEFAULT_HALF_LIFE_DAYS,
                    keep_history: bool = False, exclude: Sequence[set[str]] | None = None,
                    frozen: Sequence[np.ndarray] | None = None, ward_relative: float = WARD_RELATIVE_THRESHOLD,
                    ward_threshold: float | None = None) -> list[HomeResult]:
    """Home feeds of a batch of histories (product ids), each as `Service.home` serves it.

    Per history: frozen vectors (`index.query_vector`, or `frozen[b]` [H, Dq] when the caller gives
    them, e.g. a request's own vectors) -> `plan_home` -> medoids through `surface`'s adapter -> one
    index search for all the batch's medoids -> per k, the clusters' lists merged by importance
    (home.allocate's shares of k, then the best remaining). History products are excluded unless
    `keep_history`; `exclude[b]` adds more. `ward_relative` / `ward_threshold`: the Ward cut (`plan_home`).
    Raises KeyError / NoProductQueries as `closeup_by_product`.
    """
    plans, masks = [], []
    for b, history in enumerate(histories):
        x = frozen[b] if frozen is not None else index.query_vector(list(history))  # [H, Dq]
        t = None if times is None or times[b] is None else np.asarray(times[b], dtype=np.float64)
        labels, medoids, weight = plan_home(x, max_clusters, t, None if now is None else now[b], half_life_days,
                                            ward_relative=ward_relative, ward_threshold=ward_threshold)
        plans.append((labels, medoids, weight, x))
        masks.append((set() if keep_history else set(history)) | (set(exclude[b]) if exclude is not None else set()))
    if not plans:
        return []
    medoid_rows = np.concatenate([unit_rows(x[medoids]) for _, medoids, _, x in plans])  # [sum C, Dq]
    q = adapt(surface, medoid_rows)  # [sum C, D]
    depth = max(min(max(ks) + max(len(m) for m in masks), len(index)), 1)  # enough for any quota (see merge)
    all_ids, all_scores = index.search(np.ascontiguousarray(q, dtype=np.float32), depth)  # [sum C, depth]
    out, start = [], 0
    for (labels, medoids, weight, _), mask in zip(plans, masks):
        own = max(ks) + len(mask)  # the depth a request of its own would search (see above)
        ids, scores = all_ids[start:start + len(medoids), :own], all_scores[start:start + len(medoids), :own]
        start += len(medoids)
        shares = weight / weight.sum()
        results = merge_for_ks(ids, scores, [allocate(k, shares.tolist()) for k in ks], mask, list(ks))
        out.append(HomeResult(results=results, labels=labels, medoids=medoids,
                              sizes=np.bincount(labels, minlength=len(medoids)).tolist(), importance=shares.tolist()))
    return out


# ---- user-level metrics (the recommender libraries' protocol) ------------------------------------


def user_recall_ndcg(ranked: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> tuple[float, float]:
    """Recall@k and NDCG@k averaged over users, as RecBole and Microsoft Recommenders define them.

    ranked[u]: user u's ranked list (at least its first k are read); relevant[u]: u's relevant set
    (users with none must be left out by the caller). Recall@k = hits in the top k / |relevant|;
    NDCG@k = DCG / IDCG with DCG = sum over hits at 1-based rank r of 1 / log2(r + 1), IDCG the DCG
    of min(|relevant|, k) hits at the top.
    """
    if not ranked:
        return float("nan"), float("nan")
    recalls, ndcgs = [], []
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k] rank r (1-based) -> 1 / log2(r + 1)
    for items, rel in zip(ranked, relevant):
        hits = np.array([p in rel for p in list(items)[:k]], dtype=bool)
        recalls.append(hits.sum() / len(rel))
        ndcgs.append(float(discount[:len(hits)][hits].sum() / discount[:min(len(rel), k)].sum()))
    return float(np.mean(recalls)), float(np.mean(ndcgs))
