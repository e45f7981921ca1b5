"""Catalog products as queries, as served and as evaluated: closeup by product, home by history.

The model was trained to align *frozen* query vectors (through each surface's adapter) with
products, so a catalog product used as a query is its frozen query vector (itemsage.data.product_query:
its main image vector, or its title's text-encoder vector), not its learned embedding:

- `closeup_by_product`: each product's frozen vector -> the closeup adapter -> top-k of the index,
  leaving out the product itself and any ids the caller excludes, among the products that pass the
  caller's filter (all inside the index's search: k results still come back when k products pass).
- `home_by_history`: a history's frozen vectors (unit rows) -> Ward clusters and their medoids
  (home.cluster_history, PinnerSage) -> each medoid through the home adapter (the closeup adapter
  when the model has no home surface) -> per-cluster top lists merged by cluster importance
  (home.allocate, home.merge_candidates). Importance is the cluster's item count, or, given each
  item's time, its time-decayed count sum(0.5 ** (age / half_life)) as in PinnerSage. History
  products are left out of the results unless `keep_history`; a filter applies to every cluster.

Both take a batch of queries and a list of result sizes `ks`, and search at the depth the largest k
needs, each row with its own exclusions (a filter and exclusions are one row mask inside the
index's search, index/planner.py): the service calls them with one query and one k (`Service.closeup`,
`Service.home`), `itemsage evaluate` with every test query and K = 1, 10, 100. Over an exact (flat)
index a request with a smaller k gets exactly the prefix-merge this computes; over HNSW a deeper
search may find slightly different neighbours. `adapt(surface, x [B, Dq]) -> [B, D]` is the caller's
adapter (the service's `_adapt`; `model_adapter(model)` for evaluation); `index` is anything with the
ProductIndex contract (`search(q, k, filter=, exclude=)`, `query_vector`, `__len__`): a faiss version,
a live index, Milvus.
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


def top_k(index: Any, q: np.ndarray, ks: Sequence[int], exclude: Sequence[set[str]], filter: Any = None
          ) -> list[list[tuple[list[str], list[float]]]]:
    """Per query row and per k, the top-k (ids, scores) of `index` among the products passing `filter`
    and not in that row's `exclude` (both applied inside the search). q [B, D] -> out[b][j] for ks[j]."""
    top = max(ks) if ks else 0
    out = []
    for b in range(len(q)):
        query = np.ascontiguousarray(q[b], dtype=np.float32)
        if hasattr(index, "search_one") and np.isfinite(query).all():  # no checks, no padding
            ids, scores = index.search_one(query, top, filter=filter, exclude=exclude[b])
        else:
            found, found_scores = index.search(query[None, :], top, filter=filter, exclude=exclude[b])
            keep = [i for i, p in enumerate(found[0]) if p]
            ids, scores = [found[0][i] for i in keep], [float(found_scores[0][i]) for i in keep]
        out.append([(list(ids[:k]), list(scores[:k])) for k in ks])
    return out


def closeup_by_product(index: Any, adapt: Adapt, product_ids: Sequence[str], ks: Sequence[int], *,
                       exclude_self: bool = True, exclude: Sequence[set[str]] | None = None, filter: Any = None
                       ) -> list[list[tuple[list[str], list[float]]]]:
    """Closeup results of catalog products queried by their frozen vectors through the closeup adapter.

    product_ids [B] -> out[b][j] = (ids, scores) of the top ks[j], best first. `exclude[b]`: more
    ids to leave out of row b's results; `filter`: the products a result may be (index/filters.py).
    Raises KeyError (an id not in the index), index.NoProductQueries (an index built before products
    had frozen query vectors) or filters.FilterError.
    """
    x = unit_rows(index.query_vector(list(product_ids)))  # [B, Dq] frozen query vectors
    q = adapt("closeup", x)  # [B, D] product space
    masks = [set(exclude[b]) if exclude is not None else set() for b in range(len(product_ids))]
    if exclude_self:
        for b, pid in enumerate(product_ids):
            masks[b].add(pid)
    return top_k(index, q, ks, masks, filter)


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
                    ward_threshold: float | None = None, filter: Any = None) -> list[HomeResult]:
    """Home feeds of a batch of histories (product ids), each as `Service.home` serves it.

    Per history: frozen vectors (`index.query_vector`, or `frozen[b]` [H, Dq] when the caller gives
    them, e.g. a request's own vectors) -> `plan_home` -> medoids through `surface`'s adapter -> one
    index search for all the batch's medoids -> per k, the clusters' lists merged by importance
    (home.allocate's shares of k, then the best remaining). History products are excluded unless
    `keep_history`; `exclude[b]` adds more; `filter` applies to every list. `ward_relative` /
    `ward_threshold`: the Ward cut (`plan_home`). Raises KeyError / NoProductQueries / FilterError as
    `closeup_by_product`.
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
    q = np.ascontiguousarray(adapt(surface, medoid_rows), dtype=np.float32)  # [sum C, D]
    depth = max(min(max(ks), len(index)), 1)  # a cluster's quota is at most k (home.allocate)
    out, start = [], 0
    for (labels, medoids, weight, _), mask in zip(plans, masks):
        # one search per history: its medoids [C, D] under one row mask (filter, history, exclude)
        ids, scores = index.search(q[start:start + len(medoids)], depth, filter=filter, exclude=mask)
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
