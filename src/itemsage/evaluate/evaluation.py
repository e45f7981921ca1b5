"""Evaluation: Recall@K per surface x engagement, exact and through the ANN index.

The catalog side is read, not recomputed: `evaluate` ranks against the vectors `itemsage embed`
wrote (an embeddings directory) and the index built from them, so the figures are those of what is
served; flat search over those vectors is the exact reference. Only the queries go through the
model (its adapters). Embeddings or an index made by another model are refused: the embeddings
manifest and the index manifest record the model fingerprint, as `serve` checks.

Besides cold-start pairs (product never engaged in the train window), test pairs are split into
*seen* (the same surface, query and product already occur together in the train window: a model can
score them by memorising) and *unseen* (the rest).

The metric is a pure function of plain arrays (as in sentence-transformers' evaluators), so it is
tested on hand-built cases; `evaluate()` only gathers the arrays.

Every figure comes from the test window (test.parquet). The validation window chose the model
(train.py's best checkpoint and early stopping), so a figure from it would flatter the model.

The report (`write_report`) adds pictures to the tables: a Recall@K curve per surface (K = 1..100,
recall_at_k.png), the training curves read from the run's TensorBoard logs (loss and validation
Recall@10 against steps, training_curves.png; the logs are found beside the model, RUN/tensorboard
for RUN/model), and a gallery of nearest neighbours (a few test queries per surface with their
top-10 titles, the engaged product marked).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (1, 10, 100)
CURVE_KS: tuple[int, ...] = tuple(range(1, 101))  # the Recall@K curve
GALLERY_QUERIES = 3  # per surface
LOSS_TAG, VALIDATION_TAG = "loss/total", "validation/recall@10/all"  # train.py's TensorBoard scalars


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


@torch.inference_mode()
def embed_catalog(model: torch.nn.Module, store, device: torch.device | str = "cpu", chunk: int = 2048) -> torch.Tensor:
    """model.encode_products over every product of a ProductStore, in chunks -> [N, D] float32 unit rows."""
    was = model.training
    model.eval()
    try:
        parts = [
            model.encode_products(store.batch(np.arange(i, min(i + chunk, len(store)))).to(device)).float()
            for i in range(0, len(store), chunk)
        ]
    finally:
        model.train(was)
    return torch.cat(parts) if parts else torch.zeros(0, 0)


@torch.inference_mode()
def embed_pair_queries(model: torch.nn.Module, pairs, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each pair's frozen query vector through model.encode_queries -> [Q, D] unit rows."""
    was = model.training
    model.eval()
    try:
        out = torch.zeros(len(pairs), model.out_dim, device=device)
        for surface, table in pairs.queries.items():
            pos = np.flatnonzero(pairs.surface == surface)
            if len(pos):
                vectors = table[torch.from_numpy(pairs.query_row[pos])].to(device)
                out[torch.from_numpy(pos).to(device)] = model.encode_queries(surface, vectors).float()
    finally:
        model.train(was)
    return out


class CatalogIds:
    """The ranked catalog's product ids (an embeddings directory's, in its order): what `load_pairs`
    needs of a catalog (`ids`, `index_of`) without featurising any product."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = np.asarray(ids, dtype=object)
        self._row_of = {pid: i for i, pid in enumerate(self.ids.tolist())}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, product_id: str) -> bool:
        return product_id in self._row_of

    def index_of(self, product_ids: Iterable[str]) -> np.ndarray:
        """Rows [K] int64 of `product_ids`; KeyError naming the ids the embeddings do not hold."""
        product_ids = list(product_ids)
        rows = [self._row_of.get(pid, -1) for pid in product_ids]
        if -1 in rows:
            unknown = [pid for pid, r in zip(product_ids, rows) if r < 0]
            raise KeyError(f"{len(unknown)} product id(s) not in the embeddings, e.g. {unknown[:5]}")
        return np.asarray(rows, dtype=np.int64)


def read_catalog_embeddings(embeddings_dir: str | Path, model_fingerprint: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(ids [N], vectors [N, D] float32, manifest) of a verified embeddings directory written by
    `itemsage embed` with the model `model_fingerprint`; ArtifactError for another model's."""
    from itemsage.artifacts import ArtifactError
    from itemsage.index.faiss_index import read_embeddings

    ids, vectors, manifest = read_embeddings(embeddings_dir)  # verifies every shard against the manifest
    made_by = manifest.get("inputs", {}).get("model")
    if made_by != model_fingerprint:
        raise ArtifactError(f"{embeddings_dir} holds embeddings of model {made_by}, but the model evaluated is "
                            f"{model_fingerprint}; embed the catalog with this model (`itemsage embed MODEL DATASET "
                            "--out DIR`) and pass that directory")
    return ids, vectors, manifest


def check_index(index: Any, model_fingerprint: str, dim: int) -> None:
    """Refuse an index of another width or built from another model's embeddings (as serve does)."""
    from itemsage.artifacts import ArtifactError

    if index.dim != dim:
        raise ArtifactError(f"index version {index.version} holds {index.dim}-d vectors but the model embeds into "
                            f"{dim}-d; index embeddings of this model")
    built_from = index.manifest.get("inputs", {}).get("model")
    if built_from != model_fingerprint:
        raise ArtifactError(f"index version {index.version} was built from embeddings of model {built_from}, but the "
                            f"model evaluated is {model_fingerprint}; re-embed the catalog with this model and index it")


def encode_queries(loaded: Any, pairs: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each pair's query in the product space -> [Q, D] unit rows. The one place evaluation encodes
    queries (the model's adapters over the frozen query vectors)."""
    return embed_pair_queries(loaded.model, pairs, device)


def _vector_digests(column: Any) -> list[bytes | None]:
    """A list<float32> column -> per row a 16-byte digest of its float32 bytes (None where null)."""
    import hashlib

    import pyarrow as pa

    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if len(column) == 0:
        return []
    column = column.cast(pa.list_(pa.float32()))
    values = column.flatten().to_numpy(zero_copy_only=False)  # every row's floats, back to back
    offsets = column.offsets.to_numpy(zero_copy_only=False) - column.offsets[0].as_py()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [hashlib.blake2b(values[offsets[i]:offsets[i + 1]].tobytes(), digest_size=16).digest() if valid[i] else None
            for i in range(len(column))]


def pair_keys(table: Any) -> list[bytes]:
    """One key per log row: (surface, query, product), for telling a test pair seen in training.

    A query is told apart as `train.load_pairs` does: a search row's text unless the row gives a
    vector, otherwise its vector (float32 bytes). `table`: pyarrow, with surface, product_id and
    any of query_text / query_embedding.
    """
    from itemsage import schema

    n = table.num_rows
    names = table.column_names
    texts = table[schema.QUERY_TEXT].to_pylist() if schema.QUERY_TEXT in names else [None] * n
    vectors = _vector_digests(table[schema.QUERY_EMBEDDING]) if schema.QUERY_EMBEDDING in names else [None] * n
    keys = []
    for s, t, v, p in zip(table[schema.SURFACE].to_pylist(), texts, vectors, table[schema.PRODUCT_ID].to_pylist()):
        query = b"v" + v if v is not None else (b"t" + t.encode() if s == "search" and t is not None else b"-")
        keys.append(b"\0".join((s.encode(), query, p.encode())))
    return keys


def seen_in_train(train_table: Any, test_table: Any) -> np.ndarray:
    """[N_test] bool: the test row's (surface, query, product) also occurs in the train window.
    Engagement type and time are ignored: a repeat of the same query leading to the same product
    is memorisable whatever the engagement."""
    seen = set(pair_keys(train_table))
    return np.fromiter((k in seen for k in pair_keys(test_table)), dtype=bool, count=test_table.num_rows)


def _log_columns(path: Path) -> list[str]:
    from itemsage import schema

    names = pq.ParquetFile(path).schema_arrow.names
    return [c for c in (schema.SURFACE, schema.PRODUCT_ID, schema.QUERY_TEXT, schema.QUERY_EMBEDDING) if c in names]


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
    positive_rows = torch.from_numpy(pairs.product_row).to(catalog.device)
    tasks = pairs.task.astype(str)
    exact = exact_ranks(queries, catalog, positive_rows)

    train_path, test_path = Path(dataset_dir) / schema.TRAIN_FILE, Path(dataset_dir) / window_file
    train_table = pq.read_table(train_path, columns=_log_columns(train_path))
    train_ids = [pid for pid in train_table[schema.PRODUCT_ID].to_pylist() if pid in store]
    train_counts = np.bincount(store.index_of(train_ids), minlength=len(store))
    popular = popularity_ranks(train_counts, pairs.product_row)
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
        },
        "exact": group_recall(exact, tasks, ks),
        "popularity": group_recall(popular, tasks, ks),
        "cold_start": {"exact": group_recall(exact[cold], tasks[cold], ks)},
        "seen": {"exact": group_recall(exact[seen], tasks[seen], ks)},
        "unseen": {"exact": group_recall(exact[~seen], tasks[~seen], ks)},
        "recall_curve": recall_curve(exact, pairs.surface.astype(str)),
        "gallery": neighbour_gallery(dataset_dir, store, pairs, queries, catalog, exact, gallery, seed,
                                     file=window_file),
        "training_curves": training_curves(model_dir),
    }
    index = None
    if index_root is not None:
        from itemsage.index.faiss_index import load_current

        index = load_current(index_root)
        check_index(index, loaded.fingerprint, int(loaded.config.out_dim))
        retrieved, _ = index.search(queries.cpu().numpy(), max(ks))
        ann = first_hit_positions(retrieved, store.ids[pairs.product_row])
        result["ann"] = group_recall(ann, tasks, ks)
        for name, mask in (("cold_start", cold), ("seen", seen), ("unseen", ~seen)):
            result[name]["ann"] = group_recall(ann[mask], tasks[mask], ks)
        result["data"]["index_version"] = index.version
        result["data"]["neighbour_recall_at_10"] = index.stats.get("neighbour_recall_at_10")
        result["data"]["index_from_these_embeddings"] = (
            index.manifest.get("inputs", {}).get("embeddings") == result["data"]["embeddings_fingerprint"])
    if served:
        result["served"] = _served(loaded, dataset_dir, embeddings_dir, emb_manifest, ids, vectors, index, store,
                                   pairs, exact, popular, ks, history, window_file=window_file,
                                   queries=queries, catalog=catalog)
    return result


def _served(loaded: Any, dataset_dir: str | Path, embeddings_dir: str | Path, emb_manifest: dict[str, Any],
            ids: np.ndarray, vectors: np.ndarray, index: Any, store: CatalogIds, pairs: Any, exact: np.ndarray,
            popular: np.ndarray, ks: Sequence[int], history: int | None, *, window_file: str | None = None,
            queries: torch.Tensor | None = None, catalog: torch.Tensor | None = None) -> dict[str, Any]:
    """evaluate()'s "served" block: `served_paths` over an exact (flat) index of the embeddings and their
    frozen query vectors, and over the served index when it holds them too."""
    from itemsage import schema
    from itemsage.index.faiss_index import ProductIndex, read_query_vectors

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
                      file: str | None = None) -> list[dict[str, Any]]:
    """A few seeded test pairs per surface: the query, its top-k products (id, title, score) with the
    engaged one marked, and the engaged product's rank among the whole catalog."""
    from itemsage import schema

    rng = np.random.default_rng(seed)
    chosen = []
    for s in sorted(set(pairs.surface.astype(str).tolist())):
        rows = np.flatnonzero(pairs.surface.astype(str) == s)
        chosen += sorted(rng.choice(rows, min(per_surface, len(rows)), replace=False).tolist())
    if not chosen:
        return []
    scores, top = (queries[chosen] @ catalog.T).topk(min(k, catalog.shape[0]), dim=1)  # [G, k]
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


def training_curves(model_dir: str | Path) -> dict[str, list[list[float]]]:
    """{tag: [[step, value, seconds], ...]} of the training loss and validation Recall@10, read from the
    run's TensorBoard logs beside the model (RUN/tensorboard for RUN/model); {} when there are none.
    `seconds`: wall time since the run's first logged point (its first step), so curves of runs of
    different speeds can be set against time. A resumed run's logs repeat steps after its checkpoint;
    TensorBoard's reader drops the orphaned ones (its seconds then include the pause)."""
    from itemsage.schema import TENSORBOARD_DIR

    logs = Path(model_dir).resolve().parent / TENSORBOARD_DIR
    if not logs.is_dir():
        return {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs), size_guidance={"scalars": 0}).Reload()  # 0: keep every point
    tags = set(events.Tags().get("scalars", []))
    scalars = {tag: events.Scalars(tag) for tag in (LOSS_TAG, VALIDATION_TAG) if tag in tags}
    start = min((e.wall_time for points in scalars.values() for e in points), default=0.0)
    return {tag: [[e.step, e.value, round(e.wall_time - start, 3)] for e in points] for tag, points in scalars.items()}


def recall_table(result: dict[str, Any], k: int = 10) -> list[tuple[str, ...]]:
    """Rows (task, n, exact, ann, popularity, cold exact, seen exact, unseen exact) of Recall@k, for
    the CLI and the report (seen: the pair's (surface, query, product) occurs in the train window)."""
    rows = []
    tasks = [t for t in result["exact"] if t != "all"] + ["all"]
    key = f"recall@{k}"

    def cell(block: dict[str, Any] | None, task: str) -> str:
        if not block or task not in block or block[task]["n"] == 0:
            return "–"
        return f"{block[task][key]:.3f}"

    for task in tasks:
        rows.append((
            task,
            str(result["exact"][task]["n"]),
            cell(result["exact"], task),
            cell(result.get("ann"), task),
            cell(result["popularity"], task),
            cell(result["cold_start"]["exact"], task),
            cell(result.get("seen", {}).get("exact"), task),
            cell(result.get("unseen", {}).get("exact"), task),
        ))
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path) -> None:
    from itemsage import artifacts

    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)


def plot_recall_curves(path: str | Path, curves: dict[str, dict[str, Any]], title: str,
                       colours: dict[str, str] | None = None) -> Path:
    """Recall@K against K (log axis), one panel per surface plus all, one line per run.
    `curves`: run name -> evaluate()'s "recall_curve"; `colours`: run name -> its colour (optional)."""
    plt = _pyplot()
    panels = sorted({s for c in curves.values() for s in c["exact"] if s != "all"}) + ["all"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, c in curves.items():
            if panel in c["exact"]:
                ax.plot(c["k"], c["exact"][panel], label=name, linewidth=1.4, color=(colours or {}).get(name))
        ax.set_xscale("log")
        ax.set_xlim(1, max(max(c["k"]) for c in curves.values()))
        ax.set_ylim(0, 1)
        ax.axvline(10, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(panel)
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Recall@K (exact, test window)")
    if len(curves) > 1:
        axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    _save_png(fig, Path(path))
    return Path(path)


def plot_training_curves(path: str | Path, runs: dict[str, dict[str, list[list[float]]]], title: str,
                         chosen: dict[str, int | None] | None = None) -> Path:
    """Training loss and validation Recall@10 against steps, one line per run, the chosen model's
    evaluation circled. `runs`: run name -> training_curves(); `chosen`: run name -> its best step."""
    plt = _pyplot()
    fig, (loss_ax, recall_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curves in runs.items():
        if curves.get(LOSS_TAG):
            steps, values = zip(*((p[0], p[1]) for p in curves[LOSS_TAG]))
            loss_ax.plot(steps, values, label=name, linewidth=1.0)
        if curves.get(VALIDATION_TAG):
            steps, values = zip(*((p[0], p[1]) for p in curves[VALIDATION_TAG]))
            line, = recall_ax.plot(steps, values, marker="o", markersize=3, label=name, linewidth=1.2)
            best = (chosen or {}).get(name)
            if best in steps:
                recall_ax.plot([best], [values[steps.index(best)]], marker="o", markersize=10, fillstyle="none",
                               color=line.get_color(), label="the chosen model" if len(runs) == 1 else None)
    top = max((p[1] for c in runs.values() for p in c.get(VALIDATION_TAG, [])), default=1.0)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss (mixed-negative softmax)")
    recall_ax.set(title="validation Recall@10 (chooses the model)", xlabel="step", ylabel="Recall@10",
                  ylim=(0, min(1.0, 1.2 * top + 0.02)))
    for ax in (loss_ax, recall_ax):
        ax.grid(alpha=0.3)
    if recall_ax.get_legend_handles_labels()[0]:
        recall_ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    _save_png(fig, Path(path))
    return Path(path)


def gallery_markdown(gallery: list[dict[str, Any]]) -> list[str]:
    """The gallery as Markdown: per query, its top-10 titles with the engaged product in bold."""
    def md(text: str) -> str:  # a title may hold characters that Markdown tables and emphasis read
        return "".join("\\" + c if c in "|*_`[]<>\\" else c for c in text)

    lines = []
    for g in gallery:
        user = f", user `{g['user_id']}`" if g.get("user_id") else ""
        lines += [f"**{g['surface']}** ({g['task']}{user}): {md(g['query'])}; engaged: *{md(g['engaged']['title'])}* "
                  f"(`{g['engaged']['product_id']}`), rank {g['engaged_rank']} in the catalog", "",
                  "| # | product | score |", "|---:|---|---:|"]
        for i, t in enumerate(g["top"], 1):
            name = f"{md(t['title']) or '(no title)'} (`{t['product_id']}`)"
            lines.append(f"| {i} | {'**✔ ' + name + '**' if t['engaged'] else name} | {t['score']:.3f} |")
        lines.append("")
    return lines


def write_report(result: dict[str, Any], out_dir: str | Path, *, title: str = "Evaluation") -> Path:
    """evaluation.json (every number) + report.md (Recall@1/10/100 tables, the gallery) +
    recall_at_k.png + training_curves.png (when the run's logs were found) + manifest, atomically."""
    from itemsage import artifacts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_json(out_dir / "evaluation.json", result)
    lines = [f"# {title}", ""]
    data = result["data"]
    lines += [
        f"{data['eval_pairs']} test-window pairs ranked against {data['products']} products "
        f"({data['cold_start_pairs']} pairs on cold-start products, never engaged in the train window; "
        f"{data.get('seen_pairs', 0)} *seen* pairs whose surface, query and product already occur together in the "
        f"train window, {data.get('unseen_pairs', 0)} *unseen*). The catalog is ranked by its embeddings as "
        "`itemsage embed` wrote them (exact: flat search over them). "
        "The validation window chose the model; no figure here comes from it.",
        "",
    ]
    if "index_version" in data:
        lines += [f"ANN: index version `{data['index_version']}`, its recall@10 against exact search "
                  f"{data.get('neighbour_recall_at_10')}.", ""]
    for k in DEFAULT_KS:
        lines += [f"## Recall@{k}", "", "| task | pairs | exact | ANN | popularity | cold-start (exact) | seen (exact) "
                  "| unseen (exact) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(row) + " |" for row in recall_table(result, k)]
        lines.append("")
    lines += served_markdown(result)
    files = ["report.md", "evaluation.json"]
    if result.get("recall_curve"):
        plot_recall_curves(out_dir / "recall_at_k.png", {"model": result["recall_curve"]}, "Recall@K per surface")
        lines += ["## Recall@K, K = 1..100", "", "![Recall@K per surface](recall_at_k.png)", ""]
        files.append("recall_at_k.png")
    lines += ["## Training curves", ""]
    if result.get("training_curves"):
        plot_training_curves(out_dir / "training_curves.png", {"model": result["training_curves"]}, "Training",
                             chosen={"model": data.get("best_step")})
        lines += ["![Training loss and validation Recall@10](training_curves.png)", ""]
        files.append("training_curves.png")
    else:
        lines += ["No TensorBoard logs beside the model (RUN/tensorboard for RUN/model).", ""]
    if result.get("gallery"):
        lines += ["## Nearest neighbours", "",
                  "A few test-window queries per surface, their top 10 by exact search; the engaged product "
                  "in bold with ✔ (if it is in the top 10).", "", *gallery_markdown(result["gallery"])]
    artifacts.atomic_write_text(out_dir / "report.md", "\n".join(lines))
    artifacts.write_manifest(out_dir, "evaluation", counts={"eval_pairs": data["eval_pairs"]},
                             inputs={"model": data["model_fingerprint"], "embeddings": data.get("embeddings_fingerprint")},
                             files=files)
    return out_dir / "report.md"


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


def served_rows(result: dict[str, Any], k: int = 10) -> list[tuple[str, ...]]:
    """Rows (what, index, pairs, all, per-engagement Recall@k) of the served paths' figures, for the report."""
    served = result.get("served") or {}
    key = f"recall@{k}"
    rows = []
    labels = [("closeup_query_vector", "closeup, the log's query vector"),
              ("closeup_by_product", "closeup by product, as served"),
              ("home_query_vector", "home, the log's query vector (medoid)"),
              ("home_query_vector_masked", "home, the log's query vector, history masked"),
              ("home_by_history", "home by history, as served"),
              ("home_by_history_recency", f"home by history with times (half-life {_half_life()} days)"),
              ("home_popularity", "home, popularity")]
    for name, label in labels:
        block = served.get(name)
        if not block:
            continue
        per_index = {"": block} if "all" in block else block
        for index_name, figures in per_index.items():
            engagements = [t for t in figures if t != "all"]
            cells = "; ".join(f"{t.split('.')[-1]} {figures[t][key]:.3f}" for t in engagements)
            rows.append((label, index_name or "–", str(figures["all"]["n"]), f"{figures['all'][key]:.3f}", cells))
    return rows


def _half_life() -> float:
    from itemsage.index.by_product import DEFAULT_HALF_LIFE_DAYS

    return DEFAULT_HALF_LIFE_DAYS


def served_markdown(result: dict[str, Any]) -> list[str]:
    """The report's section on products as queries as served, and the user-level protocol."""
    served = result.get("served")
    if not served:
        return []
    if "skipped" in served:
        return ["## Products as queries, as served", "", f"Not evaluated: {served['skipped']}.", ""]
    data = served["data"]
    lines = ["## Products as queries, as served", "",
             "Closeup by product and home by history computed by the service's own code (by_product.py) over "
             "the test pairs that name their query product (closeup) and the home pairs of users with a "
             f"train-window history (their last {data['history']} distinct products; {data['home_pairs_without_history']} "
             f"home pairs without one are left out), history products excluded; home through the "
             f"{data['home_surface']} adapter. `exact`: a flat index of the embeddings; `ann`: the served index. "
             "Beside them, the query-vector and popularity figures of the same pairs.", "",
             "| Recall@10 | index | pairs | all | per engagement |", "|---|---|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in served_rows(result, 10)]
    user = served.get("user_level") or {}
    if user.get("users"):
        ks = sorted(int(key.split("@")[1]) for key in user["popularity"] if key.startswith("recall@"))
        lines += ["", f"### User-level protocol ({user['users']} users)", "",
                  "As RecBole and Microsoft Recommenders report: per user with test engagements, the whole catalog "
                  "ranked from the user's query (closeup: their most recent train-window product; home: their "
                  "history), every train-window product of theirs masked; relevant: their other test-window "
                  "products; Recall@K and NDCG@K averaged over users.", "",
                  "| query | index | " + " | ".join(f"Recall@{k} | NDCG@{k}" for k in ks) + " |",
                  "|---|---|" + "---:|---:|" * len(ks)]
        for name in ("closeup", "home"):
            for index_name, row in (user.get(name) or {}).items():
                lines.append(f"| {name} | {index_name} | " + " | ".join(
                    f"{row[f'recall@{k}']:.3f} | {row[f'ndcg@{k}']:.3f}" for k in ks) + " |")
        row = user["popularity"]
        lines.append("| popularity | – | " + " | ".join(f"{row[f'recall@{k}']:.3f} | {row[f'ndcg@{k}']:.3f}"
                                                      for k in ks) + " |")
    return lines + [""]
