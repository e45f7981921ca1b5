"""Evaluation: Recall@K per surface x engagement, exact and through the ANN index (SPEC §9).

The metric is a pure function of plain arrays (as in sentence-transformers' evaluators), so it is
tested on hand-built cases; `evaluate()` only gathers the arrays.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
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
def embed_catalog(tower: torch.nn.Module, store, device: torch.device | str = "cpu", chunk: int = 2048) -> torch.Tensor:
    """The tower over every product of a ProductStore, in chunks -> [N, D] float32 unit rows."""
    was = tower.training
    tower.eval()
    try:
        parts = [
            tower(store.batch(np.arange(i, min(i + chunk, len(store)))).to(device)).float()
            for i in range(0, len(store), chunk)
        ]
    finally:
        tower.train(was)
    return torch.cat(parts) if parts else torch.zeros(0, 0)


@torch.inference_mode()
def embed_pair_queries(adapters: torch.nn.Module, pairs, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each pair's frozen query vector through its surface's adapter -> [Q, D] unit rows."""
    was = adapters.training
    adapters.eval()
    try:
        out = torch.zeros(len(pairs), adapters.out_dim, device=device)
        for surface, table in pairs.queries.items():
            pos = np.flatnonzero(pairs.surface == surface)
            if len(pos):
                vectors = table[torch.from_numpy(pairs.query_row[pos])].to(device)
                out[torch.from_numpy(pos).to(device)] = adapters(surface, vectors).float()
    finally:
        adapters.train(was)
    return out


def evaluate(
    model_dir: str | Path,
    dataset_dir: str | Path,
    *,
    index_root: str | Path | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    sample: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Recall@K of every eval-window pair, ranking its product among the whole catalog.

    Returns {"exact": ..., "ann": ... (when an index is given), "cold_start": {...},
    "popularity": ..., "data": counts}; each block maps task -> {"recall@k": .., "n": ..}.
    The ANN block ranks through the served index (its version is recorded); the exact block uses
    the model's own embeddings of the catalog, the reference the index is measured against.
    """
    from itemsage import schema
    from itemsage.features import ProductStore
    from itemsage.model import load_model
    from itemsage.train import load_pairs

    from itemsage.artifacts import verify_dataset

    verify_dataset(dataset_dir)  # refuses a dataset without a manifest, or a file that does not match it
    loaded = load_model(model_dir, device=device)
    cfg = loaded.config
    store = ProductStore.from_dataset(dataset_dir, loaded.vocab, cfg.text_fields, cfg.max_images)
    pairs = load_pairs(dataset_dir, schema.EVAL_FILE, store, sample=sample, seed=seed)
    if len(pairs) == 0:
        raise ValueError(f"{dataset_dir}/{schema.EVAL_FILE} has no pairs to evaluate")
    log.info("evaluating %d eval pairs against %d products", len(pairs), len(store))

    catalog = embed_catalog(loaded.tower, store, device)  # [N, D]
    queries = embed_pair_queries(loaded.adapters, pairs, device)  # [Q, D]
    positive_rows = torch.from_numpy(pairs.product_row).to(catalog.device)
    tasks = pairs.task.astype(str)
    exact = exact_ranks(queries, catalog, positive_rows)

    train_ids = pq.read_table(Path(dataset_dir) / schema.TRAIN_FILE, columns=[schema.PRODUCT_ID])
    train_counts = np.bincount(store.index_of(train_ids[schema.PRODUCT_ID].to_pylist()), minlength=len(store))
    popular = popularity_ranks(train_counts, pairs.product_row)
    cold = train_counts[pairs.product_row] == 0

    result: dict[str, Any] = {
        "data": {
            "products": len(store),
            "eval_pairs": len(pairs),
            "cold_start_pairs": int(cold.sum()),
            "cold_start_products": int((train_counts == 0).sum()),
            "model_fingerprint": loaded.fingerprint,
        },
        "exact": group_recall(exact, tasks, ks),
        "popularity": group_recall(popular, tasks, ks),
        "cold_start": {"exact": group_recall(exact[cold], tasks[cold], ks)},
    }
    if index_root is not None:
        from itemsage.index import load_current

        index = load_current(index_root)
        retrieved, _ = index.search(queries.cpu().numpy(), max(ks))
        ann = first_hit_positions(retrieved, store.ids[pairs.product_row])
        result["ann"] = group_recall(ann, tasks, ks)
        result["cold_start"]["ann"] = group_recall(ann[cold], tasks[cold], ks)
        result["data"]["index_version"] = index.version
        result["data"]["index_recall_vs_exact"] = index.manifest.get("recall_at_10")
    return result


def recall_table(result: dict[str, Any], k: int = 10) -> list[tuple[str, ...]]:
    """Rows (task, n, exact, ann, popularity, cold exact) of Recall@k, for the CLI and the report."""
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
        ))
    return rows


def write_report(result: dict[str, Any], out_dir: str | Path, *, title: str = "Evaluation") -> Path:
    """evaluation.json (every number) + report.md (Recall@1/10/100 tables) + manifest, atomically."""
    from itemsage import artifacts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_json(out_dir / "evaluation.json", result)
    lines = [f"# {title}", ""]
    data = result["data"]
    lines += [
        f"{data['eval_pairs']} eval-window pairs ranked against {data['products']} products "
        f"({data['cold_start_pairs']} pairs on cold-start products, never engaged in the train window).",
        "",
    ]
    if "index_version" in data:
        lines += [f"ANN: index version `{data['index_version']}`, its recall@10 against exact search "
                  f"{data.get('index_recall_vs_exact')}.", ""]
    for k in DEFAULT_KS:
        lines += [f"## Recall@{k}", "", "| task | pairs | exact | ANN | popularity | cold-start (exact) |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(row) + " |" for row in recall_table(result, k)]
        lines.append("")
    artifacts.atomic_write_text(out_dir / "report.md", "\n".join(lines))
    artifacts.write_manifest(out_dir, "evaluation", counts={"eval_pairs": data["eval_pairs"]},
                             inputs={"model": data["model_fingerprint"]})
    return out_dir / "report.md"
