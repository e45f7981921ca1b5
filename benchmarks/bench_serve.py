"""Throughput and latency of `itemsage serve` for closeup (by product id) and text search.

The server runs on loopback pinned to one core (`taskset -c 0`, one torch/faiss thread); the load
comes from another core (`taskset -c 1`) so client and server do not compete. Load generator: `wrk`
when installed (`apt-get install wrk` on Debian/Ubuntu, `brew install wrk` on macOS), else `hey`,
else a small asyncio + httpx generator in this file (it saturates near 1-2k requests/s on one core,
so its numbers are a floor). The table names
the one used, and carries the index's recall@10 against exact search from its manifest: a speed
figure without its recall means nothing.

    python benchmarks/bench_serve.py --model runs/demo/model --index runs/demo/index
    python benchmarks/bench_serve.py --random-fixture 50000 --duration 5     # smoke run, random init
    python benchmarks/bench_serve.py ... --runs 3 --query-cache 0   # medians of 3; every search encoded

Search bodies cycle through 500 distinct texts, so with the server's query-vector cache on (its
default) a warm server encodes none of them (the warm-up sends all 500 then): `--query-cache 0`
measures the encoder on every request. Besides requests/s and latency, each row gives the server
process's CPU time per request (from /proc): on a shared machine it moves far less than
requests/s, and 1000 / (CPU ms per request) is what one free core would serve.

Closeup by product id reads the product's frozen query vector, puts it through the closeup adapter
and does one HNSW search; search adds the MiniLM text encoder
(the dominant cost on CPU) and the search adapter.

`--filter JSON` (or `--filter auto`: the string value of a stored column closest to 1% of the catalog)
adds `closeup+filter` and `search+filter` rows: the same bodies with the filter, in the same run.
`--bare` adds, in this process after the HTTP rows, the CPU per query of the same index searched
directly with the same closeup queries: a bare faiss search (`faiss.Index.search`, the tuned ef), the
index's own search with and without the filter (`ProductIndex.search_one`), and their recall@10
against exact search over the (passing) catalog vectors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

COLORS = ["red", "blue", "green", "black", "white", "beige", "navy", "olive", "grey", "pink"]
MATERIALS = ["oak", "linen", "leather", "cotton", "steel", "wool", "velvet", "rattan", "glass", "brass"]
ITEMS = ["chair", "sofa", "lamp", "rug", "dress", "sneakers", "jacket", "mug", "vase", "backpack"]


def search_queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(COLORS)} {rng.choice(MATERIALS)} {rng.choice(ITEMS)}" for _ in range(n)]


def index_facts(index_root: Path) -> dict:
    from itemsage.artifacts import read_manifest
    from itemsage.index.faiss_index import IDS_FILE
    from itemsage.index.versions import current_version

    version_dir = current_version(index_root)
    manifest = read_manifest(version_dir, kind="index")
    ids = pq.read_table(version_dir / IDS_FILE).column(0).to_pylist()
    return {
        "version": version_dir.name,
        "kind": manifest["config"]["kind"],
        "ef_search": (manifest.get("search_tuning") or {}).get("values", [None])[0] or manifest["config"].get("ef_search"),
        "count": manifest["count"],
        "dim": manifest["dim"],
        "recall_at_10": manifest.get("neighbour_recall_at_10", manifest.get("recall_at_10")),
        "recall_queries": manifest.get("recall_queries"),
        "ids": ids,
    }


# ---- load generators -----------------------------------------------------------------------------


def _wrk_script(path: str, bodies: list[str]) -> str:
    lines = ["local bodies = {"] + [f"  {json.dumps(b)}," for b in bodies] + ["}"]
    lines += [
        "local i = 0",
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
        "request = function()",
        "  i = i + 1",
        f'  return wrk.format(nil, "{path}", nil, bodies[(i % #bodies) + 1])',
        "end",
    ]
    return "\n".join(lines) + "\n"


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, path: str, bodies: list[str], conns: int, duration: float, core: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_wrk_script(path, bodies))
    try:
        out = subprocess.run(
            ["taskset", "-c", str(core), "wrk", "-t1", f"-c{conns}", f"-d{int(duration)}s", "--latency",
             "--timeout", "10s", "-s", f.name, url],
            capture_output=True, text=True, check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    pct = {str(int(float(p))): v for p, v in re.findall(r"^\s+([\d.]+)%\s+(\S+)\s*$", out, re.M)}
    if "50" not in pct or "99" not in pct:
        raise RuntimeError(f"could not read wrk's latency distribution:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(pct["50"]),
        "p99_ms": _ms(pct["99"]),
        "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0),
        "requests": int(total.group(1)),
    }


def run_hey(url: str, path: str, bodies: list[str], conns: int, duration: float, core: int) -> dict:
    # hey sends one fixed body: the first one (the server does the same work per request).
    out = subprocess.run(
        ["taskset", "-c", str(core), "hey", "-z", f"{int(duration)}s", "-c", str(conns), "-m", "POST",
         "-T", "application/json", "-d", bodies[0], url + path],
        capture_output=True, text=True, check=True,
    ).stdout
    pct = dict(re.findall(r"^\s+(\d+)%% in ([\d.]+) secs", out.replace("%", "%%"), re.M))
    codes = re.findall(r"\[(\d+)\]\s+(\d+) responses", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": float(pct["50"]) * 1e3,
        "p99_ms": float(pct["99"]) * 1e3,
        "errors": sum(int(n) for code, n in codes if code != "200"),
        "requests": sum(int(n) for _, n in codes),
    }


async def _python_load(url: str, bodies: list[str], conns: int, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:
        end = time.perf_counter() + duration

        async def worker(w: int) -> None:
            nonlocal errors
            i = w
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    r = await client.post(url, content=bodies[i % len(bodies)],
                                          headers={"content-type": "application/json"})
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - t)
                i += conns

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(conns)))
        elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3
    return {"rps": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors, "requests": len(lat)}


def run_python(url: str, path: str, bodies: list[str], conns: int, duration: float, core: int) -> dict:
    """The asyncio generator in a child process pinned to `core`."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(bodies, f)
    try:
        out = subprocess.run(
            ["taskset", "-c", str(core), sys.executable, __file__, "--_loadgen", url + path, f.name,
             str(conns), str(duration)],
            capture_output=True, text=True, check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    return json.loads(out.strip().splitlines()[-1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


# ---- a random-init fixture for smoke runs ----------------------------------------------------------


def random_fixture(n: int, out: Path) -> tuple[Path, Path]:
    """A random-init `cpu`-preset model and an HNSW index over n clustered random 256-d vectors."""
    import torch

    from itemsage.data.text import Vocabulary
    from itemsage.index.faiss_index import ProductIndex
    from itemsage.index.versions import publish, version_path
    from itemsage.model.config import model_config
    from itemsage.model.model import save_model
    from itemsage.model.tower import ItemSage, QueryAdapters

    torch.manual_seed(0)
    cfg = model_config("cpu")
    vocab = Vocabulary.build([[f"{c} {m} {i}"] for c in COLORS for m in MATERIALS for i in ITEMS])
    query_dims = {"search": 384, "closeup": 64, "home": cfg.out_dim}
    tower = ItemSage(cfg, len(vocab), 64)
    save_model(out / "model", tower, QueryAdapters(query_dims, cfg.out_dim, cfg.adapter), cfg, vocab,
               image_dim=64, query_dims=query_dims)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(n // 100, 1), cfg.out_dim)).astype(np.float32)
    vectors = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, cfg.out_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # Each product's frozen query vector (closeup by id goes through it and the closeup adapter).
    frozen = rng.standard_normal((n, 64)).astype(np.float32)
    frozen /= np.linalg.norm(frozen, axis=1, keepdims=True)
    index = ProductIndex.build(np.array([f"p{i:07d}" for i in range(n)], dtype=object), vectors, kind="hnsw",
                               query_vectors=frozen, product_query={"source": "image", "fields": [], "dim": 64})
    version_dir = version_path(out / "index", "random")
    index.save(version_dir)
    publish(out / "index", version_dir)
    return out / "model", out / "index"


# ---- filters and the index searched directly ---------------------------------------------------------


def choose_filter(index_root: Path, given: str) -> dict:
    """The filter of the +filter rows: `given` (JSON), or for 'auto' the stored string value whose share
    of the catalog is closest to 1%."""
    if given != "auto":
        return json.loads(given)
    from itemsage.index.versions import load_current

    store = load_current(index_root).attributes
    best = None
    for name, column in (store.columns.items() if store is not None else []):
        if column.kind not in ("string", "strings"):
            continue
        values, counts = column.counts()
        for value, count in zip(values, counts):
            gap = abs(count / store.n - 0.01)
            if best is None or gap < best[0]:
                best = (gap, {name: value})
    if best is None:
        raise SystemExit("--filter auto needs an index with a string attribute column")
    return best[1]


def spec_share(index_root: Path, spec: dict) -> float:
    from itemsage.index.filters import compile_filter
    from itemsage.index.versions import load_current

    index = load_current(index_root)
    return float(compile_filter(index.attributes, spec).mean())


def bare_searches(model: Path, index_root: Path, product_ids: list[str], k: int, spec: dict | None) -> None:
    """CPU per query of the served index searched directly with the closeup queries, and its recall@10."""
    import faiss

    from itemsage.index.filters import compile_filter
    from itemsage.serve.service import Service

    faiss.omp_set_num_threads(1)
    service = Service(model, index_root, query_cache=0)
    index = service.served.index.base  # the version (a LiveIndex's base)
    frozen = index.query_vector(product_ids)
    q = service._adapt("closeup", frozen / np.linalg.norm(frozen, axis=1, keepdims=True)).astype(np.float32)
    vectors = index.vector(index.ids)
    exact = vectors @ q.T  # [N, Q]
    mask = compile_filter(index.attributes, spec) if spec is not None else None

    def timed(fn) -> tuple[float, list[list[str]]]:
        found, start = [], time.thread_time()
        for i in range(len(q)):
            found.append(fn(q[i]))
        return 1e3 * (time.thread_time() - start) / len(q), found

    def recall(found: list[list[str]], passing: np.ndarray | None) -> float:
        hits = total = 0
        for i, got in enumerate(found):
            s = exact[:, i] if passing is None else np.where(passing, exact[:, i], -np.inf)
            truth = set(index.ids[np.argsort(-s)[: min(k, int(np.isfinite(s).sum()))]].tolist())
            hits, total = hits + len(truth & set(got)), total + len(truth)
        return hits / total

    rows = [("bare faiss search (unfiltered, tuned ef)",
             lambda x: index.ids[index._index.search(x[None], k)[1][0]].tolist(), None),
            ("ProductIndex.search_one (unfiltered)", lambda x: index.search_one(x, k)[0], None)]
    if spec is not None:
        rows.append((f"ProductIndex.search_one + filter {json.dumps(spec)}",
                     lambda x: index.search_one(x, k, filter=spec)[0], mask))
    print(f"\nThe same index in this process, {len(q)} closeup queries one per call, 1 faiss thread "
          f"({index.tuning.param} {index.ef_search or index.nprobe} unfiltered):\n")
    print("| search | CPU ms / query | recall@10 vs exact |")
    print("|---|---:|---:|")
    for label, fn, passing in rows:
        for _ in range(2):  # the second pass is timed: the first warms the caches
            ms, found = timed(fn)
        print(f"| {label} | {ms:.3f} | {recall(found, passing):.4f} |")


# ---- main ------------------------------------------------------------------------------------------


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}; see its log")
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_loadgen":  # child mode of run_python
        url, bodies_file, conns, duration = sys.argv[2:6]
        bodies = json.loads(Path(bodies_file).read_text())
        print(json.dumps(asyncio.run(_python_load(url, bodies, int(conns), float(duration)))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model directory")
    p.add_argument("--index", type=Path, help="index root (its CURRENT version is served)")
    p.add_argument("--random-fixture", type=int, default=0, metavar="N",
                   help="instead of --model/--index: a random-init model and an HNSW index of N vectors")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    p.add_argument("--connections", default="4,32", help="comma-separated load levels")
    p.add_argument("--endpoints", default="closeup,search")
    p.add_argument("--port", type=int, default=18765)
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--tool", choices=["auto", "wrk", "hey", "python"], default="auto")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--runs", type=int, default=1, help="runs per row; the table shows their median")
    p.add_argument("--query-encoder", default=None, help="the server's --query-encoder (onnx, onnx-int8, torch)")
    p.add_argument("--query-cache", type=int, default=None, help="the server's --query-cache (0: off)")
    p.add_argument("--query-batch", type=int, default=None, help="the server's --query-batch (1: off)")
    p.add_argument("--filter", default=None, help="a filter (JSON) for the +filter rows, or 'auto' (~1%% of the catalog)")
    p.add_argument("--bare", action="store_true", help="also time the index searched directly (see the doc)")
    args = p.parse_args()

    tmp = None
    if args.random_fixture:
        tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        print(f"building a random-init fixture of {args.random_fixture} products in {tmp} ...", file=sys.stderr)
        args.model, args.index = random_fixture(args.random_fixture, tmp)
    elif not (args.model and args.index):
        p.error("give --model and --index (or --random-fixture N)")
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "hey" if shutil.which("hey") else "python"
    runner = {"wrk": run_wrk, "hey": run_hey, "python": run_python}[tool]

    facts = index_facts(args.index)
    rng = random.Random(0)
    sample = rng.sample(facts["ids"], min(2000, len(facts["ids"])))
    bodies = {
        "closeup": [json.dumps({"product_id": pid, "k": args.k}) for pid in sample],
        "search": [json.dumps({"text": q, "k": args.k}) for q in search_queries(500)],
    }
    spec = choose_filter(args.index, args.filter) if args.filter else None
    if spec is not None:
        for endpoint in ("closeup", "search"):
            bodies[endpoint + "+filter"] = [json.dumps({**json.loads(b), "filter": spec}) for b in bodies[endpoint]]
        print(f"filter: {json.dumps(spec)} ({spec_share(args.index, spec):.2%} of the catalog)", file=sys.stderr)
    url = f"http://127.0.0.1:{args.port}"
    env = {k: v for k, v in os.environ.items() if k != "ITEMSAGE_RELOAD_TOKEN"}
    log_file = open(Path(tempfile.gettempdir()) / f"bench-serve-{args.port}.log", "w")
    server = subprocess.Popen(
        ["taskset", "-c", str(args.server_core), sys.executable, "-m", "itemsage.cli", "serve",
         "--model", str(args.model), "--index", str(args.index), "--port", str(args.port), "--threads", "1"]
        + (["--query-encoder", args.query_encoder] if args.query_encoder else [])
        + (["--query-cache", str(args.query_cache)] if args.query_cache is not None else [])
        + (["--query-batch", str(args.query_batch)] if args.query_batch is not None else []),
        stdout=log_file, stderr=subprocess.STDOUT, env=env,
    )
    rows = []
    try:
        wait_ready(url, server)
        endpoints = args.endpoints.split(",")
        for endpoint in endpoints:  # warm-up: the first search loads MiniLM; with the cache on, all texts
            for body in bodies[endpoint][:500 if endpoint.startswith("search") and args.query_cache != 0 else 20]:
                r = httpx.post(f"{url}/v1/{endpoint.split('+')[0]}", content=body,
                               headers={"content-type": "application/json"}, timeout=120)
                r.raise_for_status()
        for endpoint in endpoints:
            for conns in [int(c) for c in args.connections.split(",")]:
                runs = []
                for run in range(args.runs):
                    print(f"{endpoint} x {conns} connections, {args.duration:.0f} s, run {run + 1} ...", file=sys.stderr)
                    cpu = cpu_seconds(server.pid)
                    runs.append(runner(url, f"/v1/{endpoint.split('+')[0]}", bodies[endpoint], conns, args.duration,
                                       args.client_core))
                    # The server's own CPU per request: much less sensitive to a busy machine than requests/s.
                    runs[-1]["cpu_ms"] = 1e3 * (cpu_seconds(server.pid) - cpu) / max(runs[-1].pop("requests"), 1)
                    print(f"  {runs[-1]}", file=sys.stderr)
                result = {key: float(np.median([r[key] for r in runs])) for key in ("rps", "p50_ms", "p99_ms", "cpu_ms")}
                result["errors"] = sum(r["errors"] for r in runs)
                rows.append((endpoint, conns, result))
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log_file.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    recall = facts["recall_at_10"]
    ef = f", ef_search {facts['ef_search']}" if facts["kind"] == "hnsw" else ""
    print(f"\nIndex `{facts['version']}`: {facts['kind']}{ef}, {facts['count']:,} products x {facts['dim']} dims, "
          f"recall@10 vs exact = {recall if recall is None else f'{recall:.4f}'} "
          f"({facts['recall_queries']} queries, from the index manifest).")
    print(f"Server: 1 uvicorn worker pinned to core {args.server_core}, 1 torch/faiss thread; load: {tool} "
          f"pinned to core {args.client_core}; {args.duration:.0f} s per run, median of {args.runs} run(s) per row "
          f"(errors: total); k = {args.k}; query encoder {args.query_encoder or 'default'}, query cache "
          f"{'default' if args.query_cache is None else args.query_cache}, query batch "
          f"{'default' if args.query_batch is None else args.query_batch}.\n")
    print("| endpoint | connections | requests/s | p50 (ms) | p99 (ms) | errors | server CPU ms/request | recall@10 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    labels = {"closeup": "closeup (product id)", "search": "search (text)",
              "closeup+filter": "closeup (product id) + filter", "search+filter": "search (text) + filter"}
    for endpoint, conns, r in rows:
        print(f"| {labels.get(endpoint, endpoint)} | {conns} | {r['rps']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['errors']} | {r['cpu_ms']:.3f} | {recall if recall is None else f'{recall:.3f}'} |")
    if args.bare:
        bare_searches(args.model, args.index, sample[:500], args.k, spec)


if __name__ == "__main__":
    main()
