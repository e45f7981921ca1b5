"""Evaluation: Recall@K per surface x engagement on the test window, exact and through the ANN index.

The catalog side is read, not recomputed: `evaluate` ranks against the vectors `itemsage embed`
wrote (an embeddings directory) and the index built from them, so the figures are those of what is
served; flat search over those vectors is the exact reference. Only the queries go through the
model (its adapters).

Besides cold-start pairs (product never engaged in the train window), test pairs are split into
seen and unseen (inputs.py), and every figure is also given by the engaged product's train-window
engagement count (0, 1-4, 5-19, >= 20). Closeup pairs that name their query product
(`query_product_id`) rank the catalog without it, exact and ANN, as `/v1/closeup` does
(`exclude_self`); home pairs keep theirs. On a dataset of the demo shop the report sets every figure
beside the data's own ceiling (ceiling.py). The metrics are pure functions of plain arrays
(itemsage/metrics.py); `evaluate()` only gathers the arrays, and report.py writes them out.

Every figure comes from the test window (test.parquet). The validation window chose the model
(training's best checkpoint and early stopping), so a figure from it would flatter the model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from itemsage.evaluate.inputs import (
    CatalogIds,
    _log_columns,
    check_index,
    encode_queries,
    read_catalog_embeddings,
    seen_in_train,
)
from itemsage.evaluate.report import training_curves
from itemsage.evaluate.served import served_paths
from itemsage.index.build import read_popularity
from itemsage.metrics import (
    DEFAULT_KS,
    bucket_figures,
    closeup_exclusions,
    exact_ranks,
    first_hit_positions,
    group_recall,
    popularity_ranks,
    recall_from_ranks,
)
from itemsage.model.popularity import retrieval_vectors

log = logging.getLogger(__name__)

CURVE_KS: tuple[int, ...] = tuple(range(1, 101))  # the Recall@K curve
GALLERY_QUERIES = 3  # per surface


def evaluate(
    model_dir: str | Path,
    dataset_dir: str | Path,
    embeddings_dir: str | Path,
    *,
    index_root: str | Path | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    sample: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    gallery: int = GALLERY_QUERIES,
    served: bool = True,
    history: int | None = None,
    window: str = "test",
    ceiling: Sequence[str] = ("oracle", "observable"),
) -> dict[str, Any]:
    """Recall@K of every test-window pair, ranking its product among the embedded catalog.

    The catalog is what `itemsage embed` wrote to `embeddings_dir` (read, not recomputed: the
    figures are those of the vectors that get served); `exact` is flat search over those vectors,
    `ann` (when `index_root` is given) the served index built from them. Queries go through the
    model's adapters. Embeddings or an index made by another model are refused (fingerprint check).

    Returns {"exact", "ann" (with an index), "cold_start", "seen", "unseen" ({"exact", "ann"} each),
    "popularity", "data": counts, "recall_curve": {"k": [1..100], "exact": {surface: [..], "all": [..]}},
    "gallery": [...] (`gallery` queries per surface), "training_curves": {tag: [[step, value, seconds], ..]}};
    each block maps task -> {"recall@k": .., "n": ..}. "seen": test pairs whose (surface, query,
    product) occurs in the train window; "unseen" the rest. "served" (unless `served` is False):
    closeup by product and home by history exactly as the service computes them, and the user-level
    protocol (`served_paths`; `history`: a user's history length, default by_product.EVAL_HISTORY).
    `window="validation"` scores the validation window instead (for choosing options without reading
    the test window; the train window still gives popularity, seen pairs and histories).
    "buckets": {"exact", "ann", "popularity"}: Recall@10 and the median rank by the engaged product's
    train-window count (metrics.COUNT_BUCKETS). "ceiling": the demo shop's ceilings of kinds
    `ceiling` for the same pairs (ceiling.ceiling_figures; `()`: none), or why there is none.
    """
    from itemsage import schema
    from itemsage.artifacts import fingerprint, verify_dataset
    from itemsage.model.model import load_model
    from itemsage.train.pairs import load_pairs

    if window not in ("test", "validation"):
        raise ValueError(f"window must be 'test' or 'validation', got {window!r}")
    window_file = schema.WINDOW_FILES[window]
    verify_dataset(dataset_dir)  # refuses a dataset without a manifest, or a file that does not match it
    loaded = load_model(model_dir, device=device)
    ids, vectors, emb_manifest = read_catalog_embeddings(embeddings_dir, loaded.fingerprint)
    if vectors.shape[1] != loaded.config.out_dim:
        raise ValueError(f"{embeddings_dir} holds {vectors.shape[1]}-d vectors, the model embeds into "
                         f"{loaded.config.out_dim}-d; re-run `itemsage embed` with this model")
    store = CatalogIds(ids)
    try:
        pairs = load_pairs(dataset_dir, window_file, store, sample=sample, seed=seed)
    except KeyError as err:
        raise ValueError(f"{embeddings_dir} does not hold every product of the test window ({err.args[0]}); embed "
                         f"this dataset's catalog: `itemsage embed MODEL {dataset_dir} --out DIR`") from None
    if len(pairs) == 0:
        raise ValueError(f"{Path(dataset_dir) / window_file} has no pairs to evaluate; re-run `itemsage ingest` "
                         "with a larger --test-fraction or an earlier --test-from")
    log.info("evaluating %d %s-window pairs against %d embedded products", len(pairs), window, len(store))

    catalog = torch.from_numpy(vectors).to(device)  # [N, D], as embed wrote them
    queries = encode_queries(loaded, pairs, device)  # [Q, D]
    index_queries = queries  # what the ANN index is searched with (it adds the popularity dimension itself)
    # With a popularity term the model ranks by q.p + b_p / scale: [p, popularity] against [q, 1].
    popularity = read_popularity(embeddings_dir, emb_manifest)
    catalog, queries = retrieval_vectors(catalog, queries, None if popularity is None
                                         else torch.from_numpy(popularity).to(device))
    positive_rows = torch.from_numpy(pairs.product_row).to(catalog.device)
    tasks = pairs.task.astype(str)
    exclude = closeup_exclusions(pairs.surface, pairs.query_product_row)  # the viewed product, as served
    exact = exact_ranks(queries, catalog, positive_rows, exclude_rows=exclude)

    train_path, test_path = Path(dataset_dir) / schema.TRAIN_FILE, Path(dataset_dir) / window_file
    train_table = pq.read_table(train_path, columns=_log_columns(train_path))
    train_ids = [pid for pid in train_table[schema.PRODUCT_ID].to_pylist() if pid in store]
    train_counts = np.bincount(store.index_of(train_ids), minlength=len(store))
    popular = popularity_ranks(train_counts, pairs.product_row, exclude)
    counts = train_counts[pairs.product_row]  # the engaged products' train-window engagements
    cold = train_counts[pairs.product_row] == 0
    test_rows = pq.read_table(test_path, columns=_log_columns(test_path)).take(pairs.source_row)
    seen = seen_in_train(train_table, test_rows)

    result: dict[str, Any] = {
        "data": {
            "products": len(store),
            "window": window,
            "eval_pairs": len(pairs),
            "cold_start_pairs": int(cold.sum()),
            "cold_start_products": int((train_counts == 0).sum()),
            "seen_pairs": int(seen.sum()),
            "unseen_pairs": int((~seen).sum()),
            "model_fingerprint": loaded.fingerprint,
            "embeddings_fingerprint": fingerprint(embeddings_dir),
            "embeddings_dataset_matches": emb_manifest.get("inputs", {}).get("dataset") == fingerprint(dataset_dir),
            "best_step": (loaded.extra.get("training") or {}).get("best_step"),  # the validation evaluation it won
            "closeup_query_product_excluded": int((exclude >= 0).sum()) if exclude is not None else 0,
        },
        "exact": group_recall(exact, tasks, ks),
        "popularity": group_recall(popular, tasks, ks),
        "cold_start": {"exact": group_recall(exact[cold], tasks[cold], ks)},
        "seen": {"exact": group_recall(exact[seen], tasks[seen], ks)},
        "unseen": {"exact": group_recall(exact[~seen], tasks[~seen], ks)},
        "buckets": {"exact": bucket_figures(exact < 10, exact, counts),
                    "popularity": bucket_figures(popular < 10, popular, counts)},
        "recall_curve": recall_curve(exact, pairs.surface.astype(str)),
        "gallery": neighbour_gallery(dataset_dir, store, pairs, queries, catalog, exact, gallery, seed,
                                     file=window_file, exclude=exclude),
        "training_curves": training_curves(model_dir),
    }
    index = None
    if index_root is not None:
        from itemsage.index.versions import load_current

        index = load_current(index_root)
        check_index(index, loaded.fingerprint, int(loaded.config.out_dim))
        ann = first_hit_positions(ann_lists(index, index_queries.cpu().numpy(), max(ks), store, exclude),
                                  store.ids[pairs.product_row])
        result["ann"] = group_recall(ann, tasks, ks)
        result["buckets"]["ann"] = bucket_figures(ann < 10, ann, counts, known_below=max(ks))
        for name, mask in (("cold_start", cold), ("seen", seen), ("unseen", ~seen)):
            result[name]["ann"] = group_recall(ann[mask], tasks[mask], ks)
        result["data"]["index_version"] = index.version
        result["data"]["neighbour_recall_at_10"] = index.stats.get("neighbour_recall_at_10")
        result["data"]["index_from_these_embeddings"] = (
            index.manifest.get("inputs", {}).get("embeddings") == result["data"]["embeddings_fingerprint"])
    if ceiling:
        from itemsage.evaluate.ceiling import ceiling_figures

        result["ceiling"] = ceiling_figures(dataset_dir, pairs.source_row, tasks, counts, ks, kinds=tuple(ceiling),
                                            window=window)
    if served:
        result["served"] = _served(loaded, dataset_dir, embeddings_dir, emb_manifest, ids, vectors, index, store,
                                   pairs, exact, popular, ks, history, window_file=window_file,
                                   queries=queries, catalog=catalog)
    return result


def ann_lists(index: Any, queries: np.ndarray, k: int, store: CatalogIds, exclude: np.ndarray | None) -> np.ndarray:
    """ids [Q, k] of the index's top k per query; a row with an `exclude` [Q] catalog row (-1: none)
    searches one deeper and leaves that product out, as the service's closeup does."""
    if exclude is None:
        return index.search(queries, k)[0]
    out = np.empty((len(queries), k), dtype=object)
    plain, deeper = np.flatnonzero(exclude < 0), np.flatnonzero(exclude >= 0)
    if len(plain):
        out[plain] = index.search(queries[plain], k)[0]
    ids, _ = index.search(queries[deeper], k + 1)  # [Q', k + 1]
    drop = ids == store.ids[exclude[deeper]][:, None]
    drop[:, -1] |= ~drop.any(1)  # a list without the product keeps its first k
    out[deeper] = ids[~drop].reshape(len(deeper), k)
    return out


def _served(loaded: Any, dataset_dir: str | Path, embeddings_dir: str | Path, emb_manifest: dict[str, Any],
            ids: np.ndarray, vectors: np.ndarray, index: Any, store: CatalogIds, pairs: Any, exact: np.ndarray,
            popular: np.ndarray, ks: Sequence[int], history: int | None, *, window_file: str | None = None,
            queries: torch.Tensor | None = None, catalog: torch.Tensor | None = None) -> dict[str, Any]:
    """evaluate()'s "served" block: `served_paths` over an exact (flat) index of the embeddings and their
    frozen query vectors, and over the served index when it holds them too."""
    from itemsage import schema
    from itemsage.index.build import read_query_vectors
    from itemsage.index.faiss_index import ProductIndex

    query_vectors = read_query_vectors(embeddings_dir, emb_manifest)
    if query_vectors is None:
        return {"skipped": f"{embeddings_dir} holds no product query vectors (made before products could be "
                           "queries); re-run `itemsage ingest`, `itemsage embed` and `itemsage index`"}
    if "closeup" not in loaded.query_dims:
        return {"skipped": "the model has no closeup query adapter"}
    start = time.perf_counter()
    indexes = {"exact": ProductIndex.build(ids, vectors, kind="flat", query_vectors=query_vectors)}
    if index is not None and getattr(index, "has_query_vectors", False):
        indexes["ann"] = index
    train_path = Path(dataset_dir) / schema.TRAIN_FILE
    train = pq.read_table(train_path, columns=[schema.USER_ID, schema.PRODUCT_ID, schema.TIMESTAMP])
    out = served_paths(loaded, dataset_dir, indexes, store, pairs, exact, popular, train, ks, history,
                       window_file=window_file, queries=queries, catalog_vectors=catalog)
    out["data"]["seconds"] = round(time.perf_counter() - start, 1)
    log.info("served paths evaluated in %.1f s", out["data"]["seconds"])
    return out


def recall_curve(ranks: np.ndarray, surfaces: np.ndarray, ks: Sequence[int] = CURVE_KS) -> dict[str, Any]:
    """Recall@k for every k in `ks`, per surface and for all pairs: {"k": ks, "exact": {surface: [..]}}."""
    curves = {s: list(recall_from_ranks(ranks[surfaces == s], ks).values()) for s in sorted(set(surfaces.tolist()))}
    curves["all"] = list(recall_from_ranks(ranks, ks).values())
    return {"k": list(ks), "exact": curves}


def _titles(dataset_dir: str | Path, ids: Iterable[str]) -> dict[str, str]:
    """product_id -> its title (the title field's strings joined), for `ids` only."""
    from itemsage import schema

    wanted = set(ids)
    table = pq.read_table(Path(dataset_dir) / schema.PRODUCTS_FILE, columns=[schema.PRODUCT_ID, "title"])
    out = {}
    for pid, title in zip(table[schema.PRODUCT_ID].to_pylist(), table["title"].to_pylist()):
        if pid in wanted:
            out[pid] = " ".join(title or []) or "(no title)"
    return out


@torch.inference_mode()
def neighbour_gallery(dataset_dir: str | Path, store, pairs, queries: torch.Tensor, catalog: torch.Tensor,
                      ranks: np.ndarray, per_surface: int, seed: int = 0, k: int = 10,
                      file: str | None = None, exclude: np.ndarray | None = None) -> list[dict[str, Any]]:
    """A few seeded test pairs per surface: the query, its top-k products (id, title, score) with the
    engaged one marked, and the engaged product's rank among the whole catalog; `exclude` [Q] a catalog
    row each pair's list leaves out (-1: none), as `ranks` do."""
    from itemsage import schema

    rng = np.random.default_rng(seed)
    chosen = []
    for s in sorted(set(pairs.surface.astype(str).tolist())):
        rows = np.flatnonzero(pairs.surface.astype(str) == s)
        chosen += sorted(rng.choice(rows, min(per_surface, len(rows)), replace=False).tolist())
    if not chosen:
        return []
    sims = queries[chosen] @ catalog.T  # [G, N]
    if exclude is not None:
        left_out = torch.from_numpy(exclude[chosen])
        rows = torch.nonzero(left_out >= 0)[:, 0]
        sims[rows.to(sims.device), left_out[rows].to(sims.device)] = -torch.inf
    scores, top = sims.topk(min(k, catalog.shape[0]), dim=1)  # [G, k]
    top_ids = store.ids[top.cpu().numpy()]  # [G, k]
    engaged_ids = store.ids[pairs.product_row[chosen]]  # [G]
    titles = _titles(dataset_dir, set(top_ids.ravel().tolist()) | set(engaged_ids.tolist()))
    source = pq.read_table(Path(dataset_dir) / (file or schema.TEST_FILE), columns=[schema.QUERY_TEXT, schema.USER_ID])
    gallery = []
    for g, i in enumerate(chosen):
        row = int(pairs.source_row[i]) if pairs.source_row is not None else None
        text = source[schema.QUERY_TEXT][row].as_py() if row is not None else None
        user = source[schema.USER_ID][row].as_py() if row is not None else None
        surface = str(pairs.surface[i])
        query = (f'"{text}"' if text else {"search": "a search query vector", "closeup": "a closeup query vector",
                                            "home": "a home-feed user vector"}.get(surface, "a query vector"))
        gallery.append({
            "surface": surface, "task": str(pairs.task[i]), "query": query, "user_id": user, "test_row": row,
            "engaged": {"product_id": str(engaged_ids[g]), "title": titles.get(str(engaged_ids[g]), "")},
            "engaged_rank": int(ranks[i]) + 1,  # 1-based, among the whole catalog
            "top": [{"product_id": str(pid), "title": titles.get(str(pid), ""), "score": round(float(sc), 4),
                     "engaged": str(pid) == str(engaged_ids[g])}
                    for pid, sc in zip(top_ids[g].tolist(), scores[g].tolist())],
        })
    return gallery
