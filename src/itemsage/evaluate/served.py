"""Products as queries, as served: closeup by product and home by history computed by the service's own
code (index/by_product.py) over the test pairs, and the user-level protocol (RecBole's, Microsoft
Recommenders'): per user, the whole catalog ranked with their train-window products masked,
Recall@K and NDCG@K averaged over users.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from itemsage.evaluate.inputs import CatalogIds
from itemsage.metrics import DEFAULT_KS, group_recall, masked_ranks

log = logging.getLogger(__name__)


# ---- products as queries, as served (by_product.py: the service's own code) ----------------------


def user_histories(train_table: Any, catalog: CatalogIds, n: int) -> dict[str, tuple[list[str], list[float], set[str]]]:
    """user -> (history, times, engaged) from the train window: `history` the user's last `n` distinct
    catalog products by their latest engagement (oldest first), `times` those engagements' Unix
    seconds, `engaged` every product the user engaged with. `train_table` has user_id, product_id,
    timestamp; rows without a user are skipped."""
    from itemsage import schema

    users = train_table[schema.USER_ID].to_pylist()
    products = train_table[schema.PRODUCT_ID].to_pylist()
    times = train_table[schema.TIMESTAMP].cast("int64").to_numpy(zero_copy_only=False) / 1000.0  # ms -> s
    latest: dict[str, dict[str, float]] = {}
    for u, p, t in zip(users, products, times.tolist()):
        if u is None or p not in catalog:
            continue
        seen = latest.setdefault(u, {})
        if t >= seen.get(p, -np.inf):
            seen[p] = t
    out = {}
    for u, seen in latest.items():
        ordered = sorted(seen, key=lambda p: (seen[p], p))[-n:]  # oldest first; ties by id
        out[u] = (ordered, [seen[p] for p in ordered], set(seen))
    return out


def hit_recall(hits: dict[int, np.ndarray], groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Recall@k per group label plus `all` from hit flags: hits[k] [Q] bool (engaged product in the top k)."""
    result: dict[str, dict[str, float]] = {}
    for name in [*sorted(set(groups.tolist())), "all"]:
        sel = np.ones(len(groups), bool) if name == "all" else groups == name
        result[name] = {f"recall@{k}": (float(h[sel].mean()) if sel.any() else float("nan")) for k, h in hits.items()}
        result[name]["n"] = int(sel.sum())
    return result


def _hits(lists: list[list[tuple[list[str], ...]]], owner: np.ndarray, positives: np.ndarray,
          ks: Sequence[int]) -> dict[int, np.ndarray]:
    """hits[k] [Q]: query q's positive is in lists[owner[q]]'s top-k list (its j-th entry for ks[j])."""
    sets = [[set(entry[0]) for entry in per_query] for per_query in lists]
    return {k: np.fromiter((positives[q] in sets[owner[q]][j] for q in range(len(owner))), bool, len(owner))
            for j, k in enumerate(ks)}


def served_paths(loaded: Any, dataset_dir: str | Path, indexes: dict[str, Any], catalog: CatalogIds, pairs: Any,
                 exact: np.ndarray, popular: np.ndarray, train_table: Any, ks: Sequence[int] = DEFAULT_KS,
                 history: int | None = None, *, window_file: str | None = None,
                 queries: torch.Tensor | None = None, catalog_vectors: torch.Tensor | None = None) -> dict[str, Any]:
    """Closeup by product and home by history as `Service.closeup` / `Service.home` compute them
    (by_product.py), per engagement over the test pairs, next to the query-vector figures of the same
    pairs; and the user-level protocol (`user_level`). `indexes`: name ("exact", "ann") -> an index
    holding the products' frozen query vectors. A user's history is their train-window products
    (`user_histories`, the last `history`, default by_product.EVAL_HISTORY), excluded from their home
    candidates as the service does by default. Home pairs of users without a train-window history
    are left out of every home figure here (counted in `data`). With `queries` [Q, D] and
    `catalog_vectors` [N, D] (the pairs' query vectors, the embedded catalog), "home_query_vector_masked"
    ranks each home pair's query vector with the user's history left out too (like for like).
    `window_file`: the window the pairs come from (default the test window)."""
    from itemsage import schema
    from itemsage.index import by_product

    n_history = history or by_product.EVAL_HISTORY
    test_path = Path(dataset_dir) / (window_file or schema.TEST_FILE)
    names = pq.ParquetFile(test_path).schema_arrow.names
    cols = [c for c in (schema.USER_ID, schema.QUERY_PRODUCT_ID) if c in names]
    test = pq.read_table(test_path, columns=cols).take(pairs.source_row)
    surface, tasks = pairs.surface.astype(str), pairs.task.astype(str)
    positives = catalog.ids[pairs.product_row]
    users = (np.asarray(test[schema.USER_ID].to_pylist(), dtype=object) if schema.USER_ID in cols
             else np.full(len(pairs), None, dtype=object))
    histories = user_histories(train_table, catalog, n_history)
    adapt = by_product.model_adapter(loaded.model)
    home_surface = by_product.home_surface(loaded.query_dims)
    out: dict[str, Any] = {"data": {"history": n_history, "home_surface": home_surface}}

    # Closeup by product: test pairs naming their query product, itself left out (the service's default).
    qpid = (np.asarray(test[schema.QUERY_PRODUCT_ID].to_pylist(), dtype=object) if schema.QUERY_PRODUCT_ID in cols
            else np.full(len(pairs), None, dtype=object))
    rows = np.flatnonzero((surface == "closeup") & np.array([q is not None and q in catalog for q in qpid], bool))
    out["data"]["closeup_pairs"] = int(len(rows))
    if len(rows):
        distinct, owner = np.unique(qpid[rows].astype(str), return_inverse=True)
        out["closeup_query_vector"] = {"exact": group_recall(exact[rows], tasks[rows], ks)}
        out["closeup_by_product"] = {}
        for name, index in indexes.items():
            started = time.perf_counter()
            lists = by_product.closeup_by_product(index, adapt, distinct.tolist(), ks)
            out["closeup_by_product"][name] = hit_recall(_hits(lists, owner, positives[rows], ks), tasks[rows])
            log.info("closeup by product (%s): %d pairs, %d products in %.1f s", name, len(rows), len(distinct),
                     time.perf_counter() - started)

    # Home by history: every test home pair of a user with a train-window history.
    rows = np.flatnonzero((surface == "home") & np.array([u in histories for u in users], bool))
    out["data"]["home_pairs"] = int(len(rows))
    out["data"]["home_pairs_without_history"] = int((surface == "home").sum() - len(rows))
    if len(rows):
        distinct, owner = np.unique(users[rows].astype(str), return_inverse=True)
        hist = [histories[u][0] for u in distinct]
        times = [histories[u][1] for u in distinct]
        out["home_query_vector"] = {"exact": group_recall(exact[rows], tasks[rows], ks)}
        if queries is not None and catalog_vectors is not None:
            masks = [catalog.index_of(histories[u][0]) for u in users[rows]]
            masked = masked_ranks(queries[rows.tolist()], catalog_vectors, pairs.product_row[rows], masks)
            out["home_query_vector_masked"] = {"exact": group_recall(masked, tasks[rows], ks)}
        out["home_popularity"] = group_recall(popular[rows], tasks[rows], ks)
        out["home_by_history"], out["home_by_history_recency"] = {}, {}
        for name, index in indexes.items():
            for key, given in (("home_by_history", None), ("home_by_history_recency", times)):
                started = time.perf_counter()
                results = by_product.home_by_history(index, adapt, home_surface, hist, ks, times=given)
                lists = [r.results for r in results]
                out[key][name] = hit_recall(_hits(lists, owner, positives[rows], ks), tasks[rows])
                log.info("%s (%s): %d pairs, %d users in %.1f s", key, name, len(rows), len(distinct),
                         time.perf_counter() - started)
    out["user_level"] = user_level(indexes, adapt, home_surface, histories, users, positives, catalog,
                                   train_table, ks)
    return out


def user_level(indexes: dict[str, Any], adapt: Any, home_surface: str, histories: dict[str, Any], users: np.ndarray,
               positives: np.ndarray, catalog: CatalogIds, train_table: Any, ks: Sequence[int]) -> dict[str, Any]:
    """The recommender libraries' protocol (RecBole, Microsoft Recommenders): for each user with test
    engagements and a train-window history, rank the catalog from the user's query, leave out every
    product the user engaged with in the train window, and average Recall@k and NDCG@k over users.
    The user's relevant set: their distinct test-window products not in that train set. Queries:
    closeup from the user's most recent train-window product, home from their history (the last N),
    both through by_product as served; popularity (train-window counts) as the baseline."""
    from itemsage.index import by_product

    relevant: dict[str, set[str]] = {}
    for u, p in zip(users.tolist(), positives.tolist()):
        if u in histories and p not in histories[u][2]:
            relevant.setdefault(u, set()).add(p)
    chosen = sorted(relevant)
    result: dict[str, Any] = {"users": len(chosen)}
    if not chosen:
        return result
    rel = [relevant[u] for u in chosen]
    masks = [histories[u][2] for u in chosen]

    def scores(lists: list[list[list[str]]]) -> dict[str, float]:
        row: dict[str, float] = {}
        for j, k in enumerate(ks):
            row[f"recall@{k}"], row[f"ndcg@{k}"] = by_product.user_recall_ndcg([l[j] for l in lists], rel, k)
        return row

    for name, index in indexes.items():
        started = time.perf_counter()
        closeup = by_product.closeup_by_product(index, adapt, [histories[u][0][-1] for u in chosen], ks, exclude=masks)
        home = by_product.home_by_history(index, adapt, home_surface, [histories[u][0] for u in chosen], ks,
                                          exclude=masks)
        result.setdefault("closeup", {})[name] = scores([[ids for ids, _ in per_k] for per_k in closeup])
        result.setdefault("home", {})[name] = scores([[r[0] for r in h.results] for h in home])
        log.info("user level (%s): %d users in %.1f s", name, len(chosen), time.perf_counter() - started)
    from itemsage import schema

    counts = np.bincount(catalog.index_of([p for p in train_table[schema.PRODUCT_ID].to_pylist() if p in catalog]),
                         minlength=len(catalog))
    top = catalog.ids[np.argsort(-counts, kind="stable")[:max(ks) + max(len(m) for m in masks)]].tolist()
    popular = [[p for p in top if p not in m] for m in masks]
    result["popularity"] = scores([[ranked[:k] for k in ks] for ranked in popular])
    return result
