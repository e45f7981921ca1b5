"""Filtered search at full recall: the planner (exact over the passing products, or ANN with the filter
inside the search at the tuned ef / nprobe) beside post-filtering and the unfiltered search, one run.

Data: bench_index.py's 1,000,000 x 256 Gaussian mixture (2,000 clusters, spread 1.0, seed 0) with
generated attributes: `bucket` uniform in [0, 100,000), so {"bucket": {"lt": s * 100000}} passes a
share s of the catalog, independent of the vectors; `category` = the vector's cluster mod 250, so a
set of categories that leaves out the query's own passes many products but none near the query (the
anti-correlated case that breaks a planner tuned on uniform filters). Queries: perturbed catalog
vectors (other rows and noise than the build's tuning and evaluation queries), one query per call,
as the service asks; k = 10. Recall@10 is against exact search over the products that pass (numpy:
all inner products, masked). Times are this thread's CPU time (faiss and BLAS on one thread): q/s
is per core, and the three modes are interleaved query by query, their order rotating, so they see
the same load and none always meets cold caches.

    post-filter: the unfiltered search asked for 2 k / s results (at most --post-cap; HNSW at ef >= that,
                 IVF-PQ probing as many more lists), the passing ones kept
    ours: index.search_one(q, k, filter=...)
    unfiltered: index.search_one(q, k)

The index versions are built once and kept under --out (reused on the next run): the HNSW graph can
come from a file built beforehand (--hnsw-graph: faiss.write_index of an IndexHNSWFlat(256, 32, IP),
efConstruction 200, over the same vectors, in order), the IVF-PQ codes likewise (--ivf-codes).

    OMP_NUM_THREADS=1 python benchmarks/bench_filters.py --out /tmp/bench-filters --kinds ivfpq,hnsw
    python benchmarks/bench_filters.py --n 100000 --out /tmp/bf100k --queries 100   # a smaller run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
from bench_index import gaussian_mixture  # noqa: E402

from itemsage.index.attributes import AttributeStore  # noqa: E402
from itemsage.index.config import IndexConfig, ivfpq_parameters  # noqa: E402
from itemsage.index.faiss_index import ProductIndex  # noqa: E402
from itemsage.index.recall import perturbed_queries  # noqa: E402
from itemsage.index.tuning import tune  # noqa: E402
from itemsage.index.versions import version_path  # noqa: E402

K = 10
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001, 0.0001)
ANTI = (0.1, 0.5)
POST_OVERSAMPLE = 2  # post-filtering asks for 2 k / s results (at most --post-cap)


def data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [N, D], cluster [N]), generated once and kept as .npy files under --data."""
    d = Path(args.data or args.out / f"data{args.n}")
    if (d / "vectors.npy").exists():
        x, labels = np.load(d / "vectors.npy", mmap_mode="r"), np.load(d / "clusters.npy")
        if x.shape == (args.n, args.dim):
            return np.ascontiguousarray(x), labels
    rng = np.random.default_rng(0)
    labels = np.empty(args.n, np.int64)
    x, _, _ = gaussian_mixture(args.n, args.dim, 2000, 1.0, rng, labels=labels)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "vectors.npy", x)
    np.save(d / "clusters.npy", labels)
    return x, labels


def attributes(n: int, labels: np.ndarray) -> pa.Table:
    rng = np.random.default_rng(3)
    return pa.table({"bucket": pa.array(rng.integers(0, 100_000, n)),
                     "category": pa.array([f"cat{c % 250:03d}" for c in labels]),
                     "in_stock": pa.array(rng.random(n) < 0.85)})


def version(kind: str, args: argparse.Namespace, x: np.ndarray, table: pa.Table) -> ProductIndex:
    """The kind's version under --out, built (or assembled from a prebuilt faiss index) the first time."""
    directory = version_path(args.out / kind, "v1")
    if (directory / "manifest.json").exists():
        return ProductIndex.load(directory)
    ids = np.array([f"p{i:07d}" for i in range(len(x))], dtype=object)
    prebuilt = args.hnsw_graph if kind == "hnsw" else args.ivf_codes
    start = time.perf_counter()
    if prebuilt is None:
        index = ProductIndex.build(ids, x, kind, attributes=table, threads=args.threads)
    else:  # the same object ProductIndex.build makes, its faiss part read from a file built beforehand
        raw = faiss.read_index(str(prebuilt))
        assert raw.ntotal == len(x) and raw.d == x.shape[1], "the prebuilt index holds other vectors"
        config = IndexConfig(kind=kind) if kind == "hnsw" else ivfpq_parameters(len(x), x.shape[1], IndexConfig(kind=kind))
        index = ProductIndex(x.shape[1], config)
        if kind == "hnsw":
            index._index = raw
        else:
            flat = faiss.IndexFlatIP(x.shape[1])
            flat.add(x)
            index._set_ivfpq(raw, flat)
        index._ids, index._row_of = ids, {p: i for i, p in enumerate(ids)}
        index.set_attributes(AttributeStore.from_table(table))
        index.tuning, index.stats = tune(index._search(), x, target=index.config.recall_target)
        index._set_unfiltered(index.tuning)
        index.stats["prebuilt"] = str(prebuilt)
    index.stats["tuning_and_build_seconds"] = round(time.perf_counter() - start, 1)
    index.save(directory)
    return ProductIndex.load(directory)


def truth_scores(x: np.ndarray, q: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    """All inner products [Q, N] (float32), by blocks of rows."""
    out = np.empty((len(q), len(x)), np.float32)
    for lo in range(0, len(x), chunk):
        out[:, lo : lo + chunk] = q @ x[lo : lo + chunk].T
    return out


def top_k_in(scores: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray:
    s = scores if mask is None else np.where(mask, scores, -np.inf)
    top = np.argpartition(-s, k)[:k]
    top = top[np.argsort(-s[top], kind="stable")]
    return top[np.isfinite(s[top])]


def run(index: ProductIndex, q: np.ndarray, scores: np.ndarray, specs: list, masks: list, label: str,
        post_cap: int, post_queries: int) -> dict:
    """Interleaved per query: ours, post-filter, unfiltered. Recall vs exact over the passing rows."""
    n = len(index)
    ids = index.ids
    search = index._search()
    unfiltered = search.unfiltered_value()
    res = {m: {"cpu": 0.0, "hits": 0, "truth": 0, "counts": [], "queries": 0} for m in ("ours", "post", "unfiltered")}
    for i in range(len(q)):
        spec, mask = specs[i], masks[i]
        passing = int(mask.sum())
        truth = set(ids[top_k_in(scores[i], mask, K)].tolist())
        want = min(K, passing)

        def ours() -> None:
            t0 = time.thread_time()
            got, _ = index.search_one(q[i], K, filter=spec)
            record("ours", time.thread_time() - t0, got)

        def post() -> None:
            if i >= post_queries:
                return
            deep = int(min(n, post_cap, math.ceil(POST_OVERSAMPLE * K * n / max(passing, 1))))
            value = max(unfiltered, deep) if index.config.kind == "hnsw" else \
                min(index.config.nlist, math.ceil(unfiltered * deep / K))  # IVF: as many lists as the depth needs
            t0 = time.thread_time()
            _, rows = search.ann(q[i : i + 1], deep, value)  # the unfiltered search, deeper
            rows = rows[0][rows[0] >= 0]
            kept = ids[rows[mask[rows]][:K]].tolist()
            record("post", time.thread_time() - t0, kept)

        def bare() -> None:
            t0 = time.thread_time()
            index.search_one(q[i], K)
            res["unfiltered"]["cpu"] += time.thread_time() - t0
            res["unfiltered"]["queries"] += 1

        def record(mode: str, cpu: float, got: list) -> None:
            r = res[mode]
            r["cpu"] += cpu
            r["hits"] += len(truth & set(got))
            r["truth"] += want
            r["counts"].append((len(got), want))
            r["queries"] += 1

        modes = [ours, post, bare]
        for m in modes[i % 3:] + modes[: i % 3]:  # rotated: none always comes first (cold caches)
            m()
    out = {"filter": label, "passing_mean": float(np.mean([m.sum() for m in masks]))}
    for mode, r in res.items():
        entry = {"qps": round(r["queries"] / max(r["cpu"], 1e-9), 1), "queries": r["queries"]}
        if mode != "unfiltered" and r["queries"]:
            got = np.array([c for c, _ in r["counts"]])
            entry.update(recall=round(r["hits"] / max(r["truth"], 1), 4), min_results=int(got.min()),
                         mean_results=round(float(got.mean()), 2),
                         short=int(sum(c < w for c, w in r["counts"])))
        out[mode] = entry
    return out


def path_counts(index: ProductIndex, q: np.ndarray, specs: list) -> dict:
    """Which plan each query took (planner.plan's path), for the table."""
    from itemsage.index.planner import plan

    search, counts = index._search(), {}
    for i in range(len(q)):
        mask = index.mask(specs[i])
        path = "unfiltered" if mask is None else plan(search, index.tuning, q[i : i + 1], K, mask)[2]
        counts[path] = counts.get(path, 0) + 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--out", type=Path, required=True, help="where the data and index versions are kept")
    p.add_argument("--data", type=Path, help="a directory with vectors.npy and clusters.npy of this data")
    p.add_argument("--kinds", default="ivfpq,hnsw")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--post-cap", type=int, default=10_000, help="post-filter: most results asked for")
    p.add_argument("--post-queries", type=int, default=200, help="post-filter: queries timed at s < 1%%")
    p.add_argument("--hnsw-graph", type=Path)
    p.add_argument("--ivf-codes", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()[0]]
    x, labels = data(args)
    table = attributes(len(x), labels)
    q = perturbed_queries(x, args.queries, np.random.default_rng(7))
    scores = truth_scores(x, q)
    bucket = table.column("bucket").to_numpy()
    cats = np.array([c % 250 for c in labels])
    results: dict = {"n": len(x), "dim": x.shape[1], "k": K, "queries": len(q), "threads": args.threads}
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        index = version(kind, args, x, table)
        rows = []
        cases = [("unfiltered", [None] * len(q), [np.ones(len(x), bool)] * len(q))]
        for s in SELECTIVITIES:
            spec = {"bucket": {"lt": int(round(s * 100_000))}}
            cases.append((f"uniform {s:.2%}", [spec] * len(q), [bucket < spec["bucket"]["lt"]] * len(q)))
        sizes = np.bincount(cats, minlength=250) / len(x)
        for target in ANTI:  # per query: categories other than its nearest product's, ~target of the catalog
            rng, specs, masks = np.random.default_rng(5), [], []
            for i in range(len(q)):
                own = cats[int(np.argmax(scores[i]))]
                chosen, share = [], 0.0
                for c in rng.permutation(250):
                    if share >= target:
                        break
                    if c != own:
                        chosen.append(int(c))
                        share += sizes[c]
                specs.append({"category": [f"cat{c:03d}" for c in chosen]})
                masks.append(np.isin(cats, chosen))
            cases.append((f"anti-correlated {target:.0%}", specs, masks))
        for label, specs, masks in cases:
            post_queries = args.post_queries if label == "unfiltered" or masks[0].mean() >= 0.01 else \
                min(args.post_queries, 50)
            row = run(index, q, scores, specs, masks, label, args.post_cap, post_queries)
            row["paths"] = path_counts(index, q, specs)
            rows.append(row)
            print(json.dumps({kind: row}), flush=True)
        results[kind] = {"tuning": index.tuning.to_dict(), "stats": index.stats, "rows": rows}
        load.append(os.getloadavg()[0])
    results["load_average"] = load
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for kind in [k for k in results if isinstance(results[k], dict) and "rows" in results[k]]:
        t = results[kind]["tuning"]
        print(f"\n{kind}: {t['param']} by selectivity {dict(zip(t['selectivities'], t['values']))}; exact up to "
              f"{t['exact_max_rows']:,} passing\n")
        print("| filter | passing | ours: recall@10 | min / mean results (short) | q/s | paths | post-filter: "
              "recall@10 | min / mean (short) | q/s | unfiltered q/s |")
        print("|---|---:|---:|---|---:|---|---:|---|---:|---:|")
        for r in results[kind]["rows"]:
            o, pf = r["ours"], r["post"]
            post = (f"{pf['recall']:.3f} | {pf['min_results']} / {pf['mean_results']} ({pf['short']}) | {pf['qps']:,.0f}"
                    if pf.get("queries") and r["filter"] != "unfiltered" else "- | - | -")
            ours = f"{o['recall']:.3f} | {o['min_results']} / {o['mean_results']} ({o['short']}) | {o['qps']:,.0f}"
            paths = ", ".join(f"{k} {v}" for k, v in sorted(r["paths"].items()))
            print(f"| {r['filter']} | {r['passing_mean']:,.0f} | {ours} | {paths} | {post} | {r['unfiltered']['qps']:,.0f} |")
    print(f"\nload average (1 min) at start and after each kind: {', '.join(f'{v:.1f}' for v in load)}")


if __name__ == "__main__":
    main()
