"""The text query encoder on one thread: PyTorch vs ONNX Runtime fp32 vs int8, and int8's recall cost.

    python benchmarks/bench_query_encoder.py [--corpus 5000] [--queries 1000]

Latency: one query per call (what the server does per search request), after warm-up, median and
p99 over the query set, single thread (`torch.set_num_threads(1)`, ONNX Runtime intra-op 1).
Batching: the same queries in batches of 4 (what batching 4 concurrent requests would give).

Recall cost of int8: a corpus of demo-shop product titles is embedded with the fp32 encoder; each
query's exact top-10 over it with its fp32 vector is the reference, and recall@10 is the share of
that top-10 the int8 vector's exact top-10 finds (the ranking change the encoder alone causes,
independent of any trained model). Queries: short "colour material item" texts like bench_serve's
plus titles of other demo products.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import search_queries  # noqa: E402


def timings(encode, texts: list[str], batch: int = 1) -> np.ndarray:
    for t in texts[:20]:
        encode([t])  # warm-up
    out = []
    for start in range(0, len(texts), batch):
        t0 = time.perf_counter()
        encode(texts[start : start + batch])
        out.append((time.perf_counter() - t0) * 1e3 / batch)
    return np.asarray(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=int, default=5000, help="demo product titles to search")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--timed", type=int, default=300, help="queries timed per encoder")
    args = p.parse_args()
    torch.set_num_threads(1)
    from itemsage.data.demo_shop import DemoConfig, DemoShop
    from itemsage.encoders.onnx_text import OnnxTextQueryEncoder
    from itemsage.encoders.text import TextQueryEncoder

    shop = DemoShop(DemoConfig(products=args.corpus + args.queries // 2))
    titles = [t[0] if isinstance(t, list) else t for t in shop.catalog_table(0, shop.cfg.products).column("title").to_pylist()]
    corpus, title_queries = titles[: args.corpus], titles[args.corpus :]
    queries = search_queries(args.queries - len(title_queries), seed=1) + title_queries

    encoders = {"torch (sentence-transformers)": TextQueryEncoder(), "onnx fp32": OnnxTextQueryEncoder(threads=1),
                "onnx int8": OnnxTextQueryEncoder(quantize=True, threads=1)}
    print(f"latency per query, 1 thread, {args.timed} queries (shared machine):\n")
    print("| encoder | p50 ms (1/call) | p99 ms (1/call) | ms per query in batches of 4 |")
    print("|---|---:|---:|---:|")
    for name, enc in encoders.items():
        one = timings(enc.encode, queries[: args.timed])
        four = timings(enc.encode, queries[: args.timed], batch=4)
        print(f"| {name} | {np.median(one):.2f} | {np.percentile(one, 99):.2f} | {np.median(four):.2f} |")

    fp32, int8 = encoders["onnx fp32"], encoders["onnx int8"]
    base = fp32.encode(corpus, batch_size=128)  # [N, 384]
    q32, q8 = fp32.encode(queries), int8.encode(queries)  # [Q, 384]
    ref = np.argsort(-(q32 @ base.T), axis=1)[:, :10]
    got = np.argsort(-(q8 @ base.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, got)])
    torch_q = encoders["torch (sentence-transformers)"].encode(queries)
    print(f"\n{len(queries)} queries over {len(corpus)} demo titles: int8 recall@10 vs fp32 = {recall:.4f}; "
          f"cosine(int8, fp32) mean {np.mean((q8 * q32).sum(1)):.4f}, min {np.min((q8 * q32).sum(1)):.4f}; "
          f"max |onnx fp32 - torch| = {np.abs(q32 - torch_q).max():.2e}")


if __name__ == "__main__":
    main()
