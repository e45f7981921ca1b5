"""Benchmark the product index: HNSW and IVF-PQ build time, memory, and queries/s at a measured recall@10.

Data: N unit vectors from a Gaussian mixture (clusters of uneven size around random centres), which
resembles learned embeddings more than uniform random vectors do. Queries are held-out draws from
the same mixture. Exact flat search runs in the same process on the same queries: it is the recall
reference and the speed baseline. Every speed figure is printed beside its recall.

    python benchmarks/bench_index.py                      # 1,000,000 x 256 (minutes on 2 cores)
    python benchmarks/bench_index.py --n 100000 --queries 500
    python benchmarks/bench_index.py --kinds ivfpq --threads 1   # IVF-PQ and exact only, one core

IVF-PQ is built with the parameters `ivfpq_parameters` chooses for N, saved, and loaded back the way
the service loads it (re-rank vectors memory-mapped), then swept over nprobe x refine_factor.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from itemsage.index.config import IndexConfig
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.recall import neighbour_recall


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def anon_bytes() -> int:
    """Anonymous resident memory of this process (Linux; excludes memory-mapped files' page cache)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gaussian_mixture(n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator,
                     centres: np.ndarray | None = None, weights: np.ndarray | None = None,
                     chunk: int = 100_000, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n unit vectors [n, dim]: centre (unit) + spread * noise (unit-length), renormalised. `labels`
    (int [n], optional): filled with each vector's cluster."""
    if centres is None:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.5  # Zipf-like cluster sizes
        weights /= weights.sum()
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        which = rng.choice(len(centres), size=hi - lo, p=weights)
        if labels is not None:
            labels[lo:hi] = which
        noise = rng.standard_normal((hi - lo, dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x = centres[which] + spread * noise
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres, weights


def timed_search(index: ProductIndex, queries: np.ndarray, k: int, repeats: int = 1) -> tuple[np.ndarray, float]:
    """(ids [Q, k], queries/s), the best of `repeats` runs over the whole query batch in one call."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ids, _ = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return ids, len(queries) / best


def one_at_a_time(index: ProductIndex, queries: np.ndarray, k: int) -> float:
    """Queries/s when each query is its own call, as a server sees them (no batching across requests)."""
    start = time.perf_counter()
    for i in range(len(queries)):
        index.search(queries[i : i + 1], k)
    return len(queries) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--spread", type=float, default=1.0, help="noise length relative to a unit centre")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef-search", default="16,32,64,96,128,192,256,512")
    p.add_argument("--kinds", default="hnsw,ivfpq", help="comma-separated: hnsw, ivfpq")
    p.add_argument("--nprobe", default="32,64,128,256", help="IVF-PQ lists probed (sweep)")
    p.add_argument("--refine-factor", default="1,4,10", help="IVF-PQ shortlist = factor * k (sweep)")
    p.add_argument("--single", type=int, default=100, help="queries timed one call each")
    p.add_argument("--threads", type=int, default=0, help="faiss threads (0 = all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write every number here")
    p.add_argument("--save-index", type=Path, help="keep the built HNSW index.faiss here")
    p.add_argument("--ivf-dir", type=Path, help="keep the IVF-PQ version here; reuse it if it exists (same data)")
    args = p.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    k = 10
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    base, centres, weights = gaussian_mixture(args.n, args.dim, args.clusters, args.spread, rng)
    queries, _, _ = gaussian_mixture(args.queries, args.dim, args.clusters, args.spread, rng, centres, weights)
    ids = np.array([f"p{i}" for i in range(args.n)], dtype=object)
    print(f"data: {args.n:,} x {args.dim} ({args.clusters} clusters, spread {args.spread}) "
          f"generated in {time.perf_counter() - t0:.1f} s; faiss threads: {faiss.omp_get_max_threads()}")

    # Exact reference: flat inner-product search over the same vectors. It is timed before the HNSW
    # build and again after the sweep, and the faster time is kept: on a shared machine the load
    # changes over a long run, and the baseline must not look slower than it is.
    flat = ProductIndex(args.dim, IndexConfig(kind="flat"))
    flat.add(ids, base)
    exact_ids, exact_qps = timed_search(flat, queries, k)
    exact_single = one_at_a_time(flat, queries[: args.single], k)
    print(f"exact flat: {exact_qps:,.1f} queries/s batched, {exact_single:,.1f} one query per call")

    kinds = [x.strip() for x in args.kinds.split(",") if x.strip()]
    points = []
    build_s = file_bytes = rss_delta = float("nan")
    ivf_points, ivf = [], None
    if "ivfpq" in kinds:
        ivf = bench_ivfpq(args, ids, base, queries, exact_ids, k)
        ivf_points = ivf["points"]
    if "hnsw" not in kinds:
        args.ef_search = ""
    rss0 = rss_bytes()
    hnsw = None
    if "hnsw" in kinds:
        hnsw = ProductIndex(args.dim, IndexConfig(kind="hnsw", m=args.m, ef_construction=args.ef_construction))
    if hnsw is not None:
        start = time.perf_counter()
        hnsw.add(ids, base)
        build_s = time.perf_counter() - start
        rss_delta = rss_bytes() - rss0
        with tempfile.TemporaryDirectory() as tmp:
            path = str(args.save_index) if args.save_index else os.path.join(tmp, "index.faiss")
            faiss.write_index(hnsw._index, path)
            file_bytes = os.path.getsize(path)
        print(f"HNSW build (m={args.m}, ef_construction={args.ef_construction}): {build_s:.1f} s, "
              f"{args.n / build_s:,.0f} vectors/s; {file_bytes / args.n:.0f} B/vector on disk, "
              f"{rss_delta / args.n:.0f} B/vector RSS delta")

    for ef in [int(x) for x in args.ef_search.split(",") if x]:
        hnsw.ef_search = ef
        found, qps = timed_search(hnsw, queries, k, repeats=3)
        single = one_at_a_time(hnsw, queries[: args.single], k)
        points.append({"ef_search": ef, "recall_at_10": neighbour_recall(found, exact_ids), "qps": qps,
                       "qps_single": single})

    _, exact_qps_after = timed_search(flat, queries, k)
    exact_single_after = one_at_a_time(flat, queries[: args.single], k)
    print(f"exact flat again after the sweep: {exact_qps_after:,.1f} queries/s batched, "
          f"{exact_single_after:,.1f} one query per call")
    exact_qps, exact_single = max(exact_qps, exact_qps_after), max(exact_single, exact_single_after)
    for pt in points + ivf_points:
        pt["speedup"], pt["speedup_single"] = pt["qps"] / exact_qps, pt["qps_single"] / exact_single
    print()
    print(f"{args.queries} queries; 'batched' = all queries in one call (faiss spreads them over its "
          f"threads, flat search uses BLAS); 'one per call' = {args.single} queries, one call each")
    print()
    print("| index | ef_search | recall@10 vs exact | queries/s batched | speed-up | "
          "queries/s one per call | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| flat (exact) | - | 1.0000 | {exact_qps:,.1f} | 1.0x | {exact_single:,.1f} | 1.0x |")
    for pt in points:
        print(f"| HNSW m={args.m} | {pt['ef_search']} | {pt['recall_at_10']:.4f} | {pt['qps']:,.0f} | "
              f"{pt['speedup']:.1f}x | {pt['qps_single']:,.0f} | {pt['speedup_single']:.1f}x |")
    for pt in ivf_points:
        print(f"| IVF-PQ {ivf['spec']} | nprobe {pt['nprobe']}, refine x{pt['refine_factor']} | "
              f"{pt['recall_at_10']:.4f} | {pt['qps']:,.0f} | {pt['speedup']:.1f}x | {pt['qps_single']:,.0f} | "
              f"{pt['speedup_single']:.1f}x |")
    good = [pt for pt in points if pt["recall_at_10"] >= 0.95]
    best = max(good, key=lambda pt: pt["qps"]) if good else None
    print()
    print("| index | N | D | build s | bytes/vector in memory (file) | bytes/vector (RSS delta) | x raw float32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    raw = 4 * args.dim
    if hnsw is not None:
        print(f"| HNSW | {args.n:,} | {args.dim} | {build_s:.1f} | {file_bytes / args.n:.0f} | "
              f"{rss_delta / args.n:.0f} | {file_bytes / args.n / raw:.2f} |")
    if ivf is not None:
        print(f"| IVF-PQ {ivf['spec']} | {args.n:,} | {args.dim} | {ivf['build_seconds']:.1f} | "
              f"{ivf['index_bytes_per_vector']:.0f} | {ivf['load_rss_bytes_per_vector']:.0f} | "
              f"{ivf['index_bytes_per_vector'] / raw:.3f} |")
        print(f"IVF-PQ re-rank vectors: {ivf['rerank_bytes_per_vector']:.0f} B/vector in vectors.faiss, "
              "memory-mapped from disk (not counted above: the page cache holds the rows searches touch)")
        good_ivf = [pt for pt in ivf_points if pt["recall_at_10"] >= 0.95]
        best_ivf = max(good_ivf, key=lambda pt: pt["qps"]) if good_ivf else None
        if best_ivf:
            print(f"IVF-PQ fastest point with recall@10 >= 0.95: nprobe {best_ivf['nprobe']}, refine "
                  f"x{best_ivf['refine_factor']}, recall {best_ivf['recall_at_10']:.4f}: batched "
                  f"{best_ivf['qps']:,.0f} queries/s = {best_ivf['speedup']:.1f}x exact; one per call "
                  f"{best_ivf['qps_single']:,.0f} queries/s = {best_ivf['speedup_single']:.1f}x exact (target >= 20x)")
        else:
            print("IVF-PQ: no point reached recall@10 >= 0.95; widen --nprobe / --refine-factor")
    print()
    if hnsw is None:
        pass
    elif best:
        print(f"fastest point with recall@10 >= 0.95: ef_search={best['ef_search']}, recall "
              f"{best['recall_at_10']:.4f}: batched {best['qps']:,.0f} queries/s = {best['speedup']:.1f}x "
              f"exact; one per call {best['qps_single']:,.0f} queries/s = {best['speedup_single']:.1f}x "
              "exact (target >= 20x)")
    else:
        print("no ef_search reached recall@10 >= 0.95; widen --ef-search")
    if args.json:
        args.json.write_text(json.dumps({
            "n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread,
            "queries": args.queries, "m": args.m, "ef_construction": args.ef_construction,
            "threads": faiss.omp_get_max_threads(), "build_seconds": build_s,
            "file_bytes_per_vector": file_bytes / args.n, "rss_bytes_per_vector": rss_delta / args.n,
            "exact_qps": exact_qps, "exact_qps_single": exact_single, "points": points, "best": best,
            "ivfpq": ivf,
        }, indent=2))


def bench_ivfpq(args: argparse.Namespace, ids: np.ndarray, base: np.ndarray, queries: np.ndarray,
                exact_ids: np.ndarray, k: int) -> dict:
    """Build IVF-PQ (parameters from N), save, load it as the service does, sweep nprobe x refine."""
    with tempfile.TemporaryDirectory() as tmp:
        vdir = args.ivf_dir or Path(tmp) / "v"
        if (vdir / "manifest.json").exists():  # built by an earlier run on the same --n/--seed data
            build_s = json.loads((vdir / "manifest.json").read_text())["build_seconds"]
            print(f"IVF-PQ: reusing {vdir} (built in {build_s:.1f} s)")
        else:
            index = ProductIndex(args.dim, IndexConfig(kind="ivfpq", threads=args.threads, seed=args.seed))
            start = time.perf_counter()
            index.add(ids, base)
            build_s = time.perf_counter() - start
            index.stats = {"build_seconds": round(build_s, 3)}
            index.save(vdir)
            del index
        rss0 = anon_bytes()
        loaded = ProductIndex.load(vdir)  # re-rank vectors memory-mapped, as served
        load_rss = anon_bytes() - rss0  # faiss codes + the Python id map (~200 B/id, as for every kind)
        c = loaded.config
        spec = f"IVF{c.nlist},PQ{c.pq_m}x{c.pq_nbits}"
        print(f"IVF-PQ build ({spec}, parameters from N): {build_s:.1f} s, {args.n / build_s:,.0f} vectors/s",
              flush=True)
        stats = loaded.stats
        print(f"IVF-PQ: index.faiss {stats['index_bytes'] / args.n:.1f} B/vector, vectors.faiss "
              f"{stats['rerank_vectors_bytes'] / args.n:.0f} B/vector (memory-mapped); anonymous RSS after load "
              f"+{load_rss / args.n:.1f} B/vector", flush=True)
        points = []
        for nprobe in [int(x) for x in args.nprobe.split(",") if x]:
            loaded.nprobe = nprobe
            for factor in [int(x) for x in args.refine_factor.split(",") if x]:
                loaded._index.k_factor = float(factor)
                timed_search(loaded, queries[:50], k)  # warm the page cache for these rows
                found, qps = timed_search(loaded, queries, k, repeats=3)
                single = one_at_a_time(loaded, queries[: args.single], k)
                points.append({"nprobe": loaded.nprobe, "refine_factor": factor,
                               "recall_at_10": neighbour_recall(found, exact_ids), "qps": qps, "qps_single": single})
                print(f"  nprobe {loaded.nprobe} refine x{factor}: recall@10 {points[-1]['recall_at_10']:.4f}, "
                      f"{qps:,.0f} q/s batched, {single:,.0f} q/s one per call", flush=True)
        out = {"spec": spec, "nlist": c.nlist, "pq_m": c.pq_m, "pq_nbits": c.pq_nbits, "default_nprobe": c.nprobe,
               "build_seconds": build_s, "index_bytes_per_vector": stats["index_bytes"] / args.n,
               "rerank_bytes_per_vector": stats["rerank_vectors_bytes"] / args.n,
               "load_rss_bytes_per_vector": load_rss / args.n, "points": points}
        del loaded
    return out


if __name__ == "__main__":
    main()
