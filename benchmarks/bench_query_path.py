"""CPU per request of the service's query path in-process: the whole ASGI app (every middleware,
FastAPI, the service, the index), without HTTP or a load generator, so on a shared machine it moves
less than `bench_serve.py`'s requests/s. One thread (torch and faiss), requests one after another.

    python benchmarks/bench_query_path.py --model M --index I          # closeup, cached search, vector search
    python benchmarks/bench_query_path.py --random-fixture 50000       # bench_serve's random-init fixture

closeup: by product id (2,000 ids of the index, in turn); search: 200 texts whose query vectors are put
in the query cache first (random unit vectors: no text encoder runs); vector: one 384-d search vector.
Each row is the median over --repeats passes of --requests requests (process CPU time per request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


async def _call(app, path: str, body: bytes) -> int:
    """One POST through the ASGI app; returns the response status."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    status = []

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)  # the app never waits for a disconnect on these routes

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--index", type=Path)
    p.add_argument("--random-fixture", type=int, default=0, metavar="N")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()

    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    from itemsage.serve.app import create_app

    tmp = None
    if args.random_fixture:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_serve import random_fixture

        tmp = Path(tempfile.mkdtemp(prefix="bench-query-path-"))
        args.model, args.index = random_fixture(args.random_fixture, tmp)
    elif not (args.model and args.index):
        p.error("give --model and --index (or --random-fixture N)")
    try:
        app = create_app(args.model, args.index)
        service = app.state.service
        index = service.served.index
        ids = list(getattr(index, "base", index).ids[:2000])
        rng = np.random.default_rng(0)
        texts = [f"query text {i}" for i in range(200)]
        for text in texts:
            q = rng.standard_normal(service.out_dim).astype(np.float32)
            service.query_cache.put(text, q / np.linalg.norm(q))
        width = service.model.query_dims.get("search", 0)
        bodies = {
            "closeup": ("/v1/closeup", [json.dumps({"product_id": str(i), "k": args.k}).encode() for i in ids]),
            "search": ("/v1/search", [json.dumps({"text": t, "k": args.k}).encode() for t in texts]),
            "vector": ("/v1/search", [json.dumps({"vector": rng.standard_normal(width).tolist(), "k": args.k}).encode()]),
        }

        async def run() -> None:
            print("| request | CPU µs per request (median) | min |\n|---|---:|---:|")
            for name, (path, items) in bodies.items():
                for body in items[:50]:  # warm-up
                    status = await _call(app, path, body)
                    if status != 200:
                        raise SystemExit(f"{name}: the warm-up got HTTP {status}")
                passes = []
                for _ in range(args.repeats):
                    start = time.process_time()
                    for i in range(args.requests):
                        await _call(app, path, items[i % len(items)])
                    passes.append((time.process_time() - start) / args.requests * 1e6)
                print(f"| {name} | {np.median(passes):.0f} | {min(passes):.0f} |")

        asyncio.run(run())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
