"""Home by history, as served, across its options: the Ward cut, max_clusters and the history length.

    python benchmarks/bench_home_history.py RUN/model DATASET --embeddings EMB --window validation --out study.json

Scores the window's home pairs of users with a train-window history (as `itemsage evaluate` does)
through by_product.home_by_history (the service's code) over an exact (flat) index of the
embeddings, for each variant of the options, next to the home query-vector figure (unmasked and with
the same history masked) and popularity over the same pairs. Choose on `--window validation`; the
test window gives the final figures only. Prints a Markdown table (Recall@10 and @100, mean clusters
per history) and writes every figure to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from itemsage import schema
from itemsage.evaluate.inputs import CatalogIds, encode_queries
from itemsage.evaluate.served import user_histories
from itemsage.index import by_product
from itemsage.index.build import read_embeddings, read_query_vectors
from itemsage.index.faiss_index import ProductIndex
from itemsage.metrics import exact_ranks, masked_ranks, popularity_ranks
from itemsage.model.model import load_model
from itemsage.train.pairs import load_pairs

KS = (10, 100)
# (history length, max_clusters, Ward cut: ("relative", factor) or ("absolute", distance), keep_history)
DEFAULT_VARIANTS = [
    (50, 5, ("absolute", 1.0), False),  # the code before this study
    (50, 5, ("absolute", 1.0), True),
    *[(50, 5, ("relative", f), False) for f in (1.0, 1.5, 2.0, 3.0)],
    *[(50, 5, ("absolute", d), False) for d in (1.5, 2.0, 3.0)],
    *[(50, c, ("relative", 2.0), False) for c in (1, 2, 3, 8)],
    *[(n, 5, ("relative", 2.0), False) for n in (10, 20, 100)],
]


def parse_variant(text: str) -> tuple[int, int, tuple[str, float], bool]:
    """'50,5,relative,2.0[,keep]' -> (50, 5, ("relative", 2.0), False)."""
    parts = text.split(",")
    return int(parts[0]), int(parts[1]), (parts[2], float(parts[3])), len(parts) > 4 and parts[4] == "keep"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--embeddings", type=Path, required=True)
    parser.add_argument("--window", choices=("validation", "test"), default="validation")
    parser.add_argument("--variant", action="append", type=parse_variant,
                        help="history,max_clusters,relative|absolute,value[,keep] (repeatable; default: the sweep)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = args.variant or DEFAULT_VARIANTS

    loaded = load_model(args.model)
    ids, vectors, manifest = read_embeddings(args.embeddings)
    frozen = read_query_vectors(args.embeddings, manifest)
    index = ProductIndex.build(ids, vectors, kind="flat", query_vectors=frozen)
    catalog = CatalogIds(ids)
    window_file = schema.WINDOW_FILES[args.window]
    home_tasks = tuple(f"home.{e}" for e in ("click", "save", "add_to_cart", "checkout"))
    pairs = load_pairs(args.dataset, window_file, catalog, tasks=home_tasks)
    users = np.asarray(pq.read_table(args.dataset / window_file, columns=[schema.USER_ID])
                       .take(pairs.source_row)[schema.USER_ID].to_pylist(), dtype=object)
    train = pq.read_table(args.dataset / schema.TRAIN_FILE, columns=[schema.USER_ID, schema.PRODUCT_ID, schema.TIMESTAMP])
    counts = np.bincount(catalog.index_of([p for p in train[schema.PRODUCT_ID].to_pylist() if p in catalog]),
                         minlength=len(catalog))
    lengths = sorted({v[0] for v in variants} | {by_product.EVAL_HISTORY})
    histories = {n: user_histories(train, catalog, n) for n in lengths}
    # The same pairs for every variant: users with a train-window history (any length has the same users).
    rows = np.flatnonzero(np.array([u in histories[by_product.EVAL_HISTORY] for u in users], bool))
    positives = catalog.ids[pairs.product_row[rows]]
    catalog_vectors = torch.from_numpy(vectors)
    queries = encode_queries(loaded, pairs, "cpu")[rows.tolist()]  # [Q, D]
    positive_rows = pairs.product_row[rows]
    exact = exact_ranks(queries, catalog_vectors, torch.from_numpy(positive_rows))
    result: dict = {"window": args.window, "pairs": int(len(rows)), "users": int(len(set(users[rows]))),
                    "without_history": int(len(pairs) - len(rows)),
                    "query_vector": {f"recall@{k}": float((exact < k).mean()) for k in KS},
                    "popularity": {f"recall@{k}": float((popularity_ranks(counts, positive_rows) < k).mean()) for k in KS},
                    "query_vector_masked": {}, "in_history": {}, "variants": []}
    for n in lengths:
        masks = [catalog.index_of(histories[n][u][0]) for u in users[rows]]
        masked = masked_ranks(queries, catalog_vectors, positive_rows, masks)
        result["query_vector_masked"][n] = {f"recall@{k}": float((masked < k).mean()) for k in KS}
        result["in_history"][n] = float(np.mean([p in set(histories[n][u][0]) for p, u in zip(positives, users[rows])]))
    distinct, owner = np.unique(users[rows].astype(str), return_inverse=True)
    adapt = by_product.model_adapter(loaded.model)
    surface = by_product.home_surface(loaded.query_dims)
    for n, max_clusters, (rule, value), keep in variants:
        started = time.perf_counter()
        cut = {"ward_relative": value} if rule == "relative" else {"ward_threshold": value}
        out = by_product.home_by_history(index, adapt, surface, [histories[n][u][0] for u in distinct], KS,
                                         max_clusters=max_clusters, keep_history=keep, **cut)
        found = [[set(r[0]) for r in o.results] for o in out]
        row = {"history": n, "max_clusters": max_clusters, "rule": rule, "value": value, "keep_history": keep,
               "mean_clusters": float(np.mean([len(o.medoids) for o in out])),
               "at_cap": float(np.mean([len(o.medoids) == max_clusters for o in out])),
               "seconds": round(time.perf_counter() - started, 1)}
        for j, k in enumerate(KS):
            row[f"recall@{k}"] = float(np.mean([positives[q] in found[owner[q]][j] for q in range(len(rows))]))
        result["variants"].append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.window} window: {result['pairs']} home pairs of {result['users']} users "
          f"({result['without_history']} pairs without a train-window history left out)")
    for name in ("query_vector", "popularity"):
        print(f"{name}: " + ", ".join(f"{m} {v:.3f}" for m, v in result[name].items()))
    for n in lengths:
        print(f"query vector, last-{n} history masked: " + ", ".join(
            f"{m} {v:.3f}" for m, v in result["query_vector_masked"][n].items())
              + f"; positives in that history: {result['in_history'][n]:.1%}")
    print("\n| history | max_clusters | Ward cut | history | clusters (mean) | at cap | Recall@10 | Recall@100 |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for r in result["variants"]:
        cut = f"{r['value']:g} x median pairwise" if r["rule"] == "relative" else f"{r['value']:g} (absolute)"
        print(f"| {r['history']} | {r['max_clusters']} | {cut} | {'kept' if r['keep_history'] else 'excluded'} | "
              f"{r['mean_clusters']:.2f} | {r['at_cap']:.0%} | {r['recall@10']:.3f} | {r['recall@100']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
