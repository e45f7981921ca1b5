"""Live updates against a real `itemsage serve` process: visibility, deletes, kill -9, throughput.

    python benchmarks/bench_live.py --model runs/demo/model --index runs/demo/index
    python benchmarks/bench_live.py --random-fixture 50000        # a random-init model, as bench_serve

The index root is copied into a temp directory first (the live log is written beside it). Steps:

1. upsert N new products one request at a time; after each reply, time until a closeup search
   (by the product's id, `exclude_self` off) returns it;
2. delete M products that a neighbour's top-50 contained; check the neighbour's top-50 no longer
   holds them and still has 50 results;
3. kill -9 the server, start it again, and check 1 and 2 again;
4. sustained upserts: wrk (`apt-get install wrk`) at C connections, batches of 1 and of B products;
5. `itemsage index --compact`, then `/admin/reload`: the time each takes.
The server is pinned to one core and wrk to the other, as in bench_serve.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import COLORS, ITEMS, MATERIALS, index_facts, random_fixture, run_wrk, wait_ready  # noqa: E402

TOKEN = "bench-live-token"
HTTP = httpx.Client(timeout=30)  # one client: httpx.post() alone builds a client (and TLS context) per call
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def new_product(pid: str, rng: random.Random, image_dim: int) -> dict:
    color, material, item = rng.choice(COLORS), rng.choice(MATERIALS), rng.choice(ITEMS)
    product = {"product_id": pid, "title": f"{color} {material} {item}", "colors": [color], "materials": [material]}
    if image_dim:
        product["image_embeddings"] = [[rng.gauss(0, 1) for _ in range(image_dim)]]
    return product


def start(args, index_root: Path, log_file) -> subprocess.Popen:
    env = {**os.environ, "ITEMSAGE_RELOAD_TOKEN": TOKEN}
    server = subprocess.Popen(
        ["taskset", "-c", str(args.server_core), sys.executable, "-m", "itemsage.cli", "serve", "--model",
         str(args.model), "--index", str(index_root), "--port", str(args.port), "--threads", "1"],
        stdout=log_file, stderr=subprocess.STDOUT, env=env)
    wait_ready(f"http://127.0.0.1:{args.port}", server)
    global HTTP
    HTTP.close()  # drop keep-alive connections to a killed server
    HTTP = httpx.Client(timeout=30)
    return server


def closeup(url: str, pid: str, k: int) -> list[str]:
    r = HTTP.post(f"{url}/v1/closeup", json={"product_id": pid, "k": k, "exclude_self": False}, timeout=30)
    return r.json()["ids"] if r.status_code == 200 else []


def check(url: str, upserted: list[str], deleted: dict[str, str]) -> tuple[int, int, int]:
    """(upserted found first by their own closeup, deleted found anywhere, neighbour lists short of 50)."""
    found = sum(closeup(url, pid, 1)[:1] == [pid] for pid in upserted)
    leaked = short = 0
    for pid, neighbour in deleted.items():
        ids = closeup(url, neighbour, 50)
        leaked += pid in ids or HTTP.post(f"{url}/v1/closeup", json={"product_id": pid}).status_code != 404
        short += len(ids) != 50
    return found, leaked, short


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--index", type=Path)
    p.add_argument("--random-fixture", type=int, default=0, metavar="N")
    p.add_argument("--upserts", type=int, default=50, help="products upserted one by one (step 1)")
    p.add_argument("--deletes", type=int, default=20, help="products deleted (step 2)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per sustained-upsert run")
    p.add_argument("--runs", type=int, default=3, help="sustained-upsert runs per batch size (median shown)")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="products per request in the batched run")
    p.add_argument("--port", type=int, default=18790)
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    args = p.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk (Debian/Ubuntu) or brew install wrk (macOS)")

    tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
    if args.random_fixture:
        args.model, args.index = random_fixture(args.random_fixture, tmp / "fixture")
    elif not (args.model and args.index):
        p.error("give --model and --index (or --random-fixture N)")
    index_root = tmp / "index"
    shutil.copytree(args.index, index_root, ignore=shutil.ignore_patterns("live"))
    facts = index_facts(index_root)
    from itemsage.model.model import load_model

    image_dim = int(load_model(args.model).image_dim or 0)
    url = f"http://127.0.0.1:{args.port}"
    rng = random.Random(0)
    log_file = open(tmp / "server.log", "ab")
    server = start(args, index_root, log_file)
    try:
        # 1. upsert -> visible
        upsert_ms, visible_ms, upserted = [], [], []
        for i in range(args.upserts):
            pid = f"live-{i:05d}"
            t0 = time.perf_counter()
            r = HTTP.post(f"{url}/admin/products", json={"products": [new_product(pid, rng, image_dim)]},
                           headers=AUTH, timeout=30)
            r.raise_for_status()
            t1 = time.perf_counter()
            while pid not in closeup(url, pid, 10):
                if time.perf_counter() - t0 > 10:
                    raise SystemExit(f"{pid} was not retrievable 10 s after its upsert")
            visible_ms.append((time.perf_counter() - t0) * 1e3)
            upsert_ms.append((t1 - t0) * 1e3)
            upserted.append(pid)
        # 2. deletes of products a neighbour's top-50 holds
        deleted: dict[str, str] = {}
        for neighbour in rng.sample(facts["ids"], 4 * args.deletes):
            ids = [p for p in closeup(url, neighbour, 50) if p != neighbour and p not in deleted
                   and p not in deleted.values()]
            if ids and neighbour not in deleted:
                deleted[ids[0]] = neighbour
            if len(deleted) == args.deletes:
                break
        r = HTTP.post(f"{url}/admin/products/delete", json={"ids": list(deleted)}, headers=AUTH, timeout=30)
        r.raise_for_status()
        before_kill = check(url, upserted, deleted)
        # 3. kill -9 and restart
        server.send_signal(signal.SIGKILL)
        server.wait()
        t0 = time.perf_counter()
        server = start(args, index_root, log_file)
        restart_s = time.perf_counter() - t0
        after_kill = check(url, upserted, deleted)
        # 4. sustained upserts
        throughput = {}
        for batch in (1, args.batch):
            bodies = [json.dumps({"products": [new_product(f"bulk-{batch}-{j}-{n}", rng, image_dim) for n in range(batch)]})
                      for j in range(200 if batch == 1 else 50)]
            runs = []
            for _ in range(args.runs):
                runs.append(run_wrk_auth(url, bodies, args))
            throughput[batch] = runs
        # 5. compaction and reload
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "itemsage.cli", "index", "--out", str(index_root), "--compact"],
                             capture_output=True, text=True)
        compact_s = time.perf_counter() - t0
        if out.returncode:
            raise SystemExit(out.stdout + out.stderr)
        t0 = time.perf_counter()
        reload = HTTP.post(f"{url}/admin/reload", headers=AUTH, timeout=600).json()
        reload_s = time.perf_counter() - t0
        after_compact = check(url, upserted, deleted)
        log_bytes = (index_root / "live" / "log.jsonl").stat().st_size
    finally:
        server.kill()
        server.wait()
        log_file.close()

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q))

    print(f"\nIndex `{facts['version']}`: {facts['kind']}, {facts['count']:,} products x {facts['dim']} dims, "
          f"recall@10 vs exact = {facts['recall_at_10']}. Server on core {args.server_core} (1 thread), "
          f"client on core {args.client_core}.\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| upsert reply (1 product, fsync'd), p50 / p99 | {pct(upsert_ms, 50):.1f} / {pct(upsert_ms, 99):.1f} ms |")
    print(f"| upsert sent -> returned by a search, p50 / max ({args.upserts} products) | "
          f"{pct(visible_ms, 50):.1f} / {max(visible_ms):.1f} ms |")
    for name, (found, leaked, short) in (("before kill -9", before_kill), ("after kill -9 + restart", after_kill),
                                         ("after compact + reload", after_compact)):
        print(f"| {name}: upserted found / deleted returned / neighbour lists short of k | "
              f"{found}/{args.upserts} / {leaked} / {short} |")
    print(f"| restart after kill -9 (process start to ready, log replayed) | {restart_s:.1f} s |")
    for batch, runs in throughput.items():
        rps = statistics.median(r["rps"] for r in runs)
        print(f"| sustained upserts, {args.connections} connections, {batch}/request (median of {len(runs)} x "
              f"{args.duration:.0f} s) | {rps * batch:,.0f} products/s ({rps:,.0f} req/s, p99 "
              f"{statistics.median(r['p99_ms'] for r in runs):.1f} ms, errors {sum(r['errors'] for r in runs)}) |")
    print(f"| `itemsage index --compact` (CLI process, all updates) | {compact_s:.1f} s |")
    print(f"| `/admin/reload` of the compacted version | {reload_s:.1f} s ({reload.get('products', '?'):,} products) |")
    print(f"| live log after compaction | {log_bytes:,} bytes |")
    shutil.rmtree(tmp, ignore_errors=True)


def run_wrk_auth(url: str, bodies: list[str], args) -> dict:
    """bench_serve's wrk runner with the bearer token added to its Lua script."""
    import bench_serve

    original = bench_serve._wrk_script

    def script(path: str, bodies: list[str]) -> str:
        return original(path, bodies).replace('wrk.method = "POST"', f'wrk.method = "POST"\nwrk.headers["Authorization"] = '
                                                                      f'"Bearer {TOKEN}"')
    bench_serve._wrk_script = script
    try:
        return run_wrk(url, "/admin/products", bodies, args.connections, args.duration, args.client_core)
    finally:
        bench_serve._wrk_script = original


if __name__ == "__main__":
    main()
