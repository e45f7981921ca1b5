"""Benchmark the demo-shop generator (and, when it is available, `itemsage ingest` on its output).

For each catalog size, a fresh child process runs `generate_demo_data` (so peak RSS is that run's
own, from `resource.getrusage`), then optionally another child runs ingest on the same files.
Prints Markdown tables: wall time, peak RSS, rows and bytes written, and rows per surface x
engagement.

    python benchmarks/bench_demo_data.py                          # 20,000 and 1,000,000 products
    python benchmarks/bench_demo_data.py --sizes 20000 --keep runs/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child_generate(out: str, products: int, days: int, seed: int) -> dict:
    from itemsage.data.demo_shop import DemoConfig, generate_demo_data

    start = time.perf_counter()
    manifest = generate_demo_data(out, DemoConfig(products=products, days=days, seed=seed), progress=False)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "counts": manifest["counts"],
        "bytes": {name: meta["bytes"] for name, meta in manifest["files"].items()},
    }


def child_ingest(shop: str, out: str) -> dict:
    from itemsage.data.ingest import IngestConfig, ingest

    start = time.perf_counter()
    summary = ingest(Path(shop) / "catalog.parquet", Path(shop) / "engagements.parquet", out,
                     IngestConfig(progress=False))
    wall = time.perf_counter() - start
    files = {p.name: p.stat().st_size for p in Path(out).iterdir() if p.is_file()}
    return {
        "wall_s": wall,
        "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rejected": int(summary.rejected),
        "bytes": files,
    }


def run_child(*args: str) -> dict:
    """Run this script as a child (`--child ...`); its last stdout line is a JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError("\n".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ingest_available() -> bool:
    try:
        import itemsage.data.ingest  # noqa: F401
    except ImportError:
        return False
    return True


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 1_000_000])
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ingest", action="store_true", help="Time only the generator.")
    parser.add_argument("--ingest-max-products", type=int, default=200_000,
                        help="Skip ingest above this size (its memory grows with the log: at 100k products "
                             "it peaked near 5.4 GiB, more than this 24 GiB machine has at 1M).")
    parser.add_argument("--keep", type=Path, default=None, help="Write here and keep the outputs.")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, *rest = args.child
        result = child_generate(rest[0], int(rest[1]), int(rest[2]), int(rest[3])) if kind == "generate" \
            else child_ingest(rest[0], rest[1])
        print(json.dumps(result))
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_demo_data."))
    do_ingest = not args.no_ingest and ingest_available()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.1f}; python {platform.python_version()}\n")
    generated, ingested = {}, {}
    try:
        for n in args.sizes:
            shop = root / f"shop_{n}"
            print(f"generating {n:,} products ...", file=sys.stderr, flush=True)
            generated[n] = run_child("generate", str(shop), str(n), str(args.days), str(args.seed))
            if do_ingest and n > args.ingest_max_products:
                ingested[n] = {"error": f"skipped (above --ingest-max-products {args.ingest_max_products:,})"}
            elif do_ingest:
                print(f"ingesting {n:,} products ...", file=sys.stderr, flush=True)
                try:
                    ingested[n] = run_child("ingest", str(shop), str(root / f"data_{n}"))
                except RuntimeError as err:
                    ingested[n] = {"error": "failed: " + str(err).splitlines()[-1]}
                if args.keep is None:
                    shutil.rmtree(root / f"data_{n}", ignore_errors=True)
            if args.keep is None:
                shutil.rmtree(shop, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"## itemsage demo-data ({args.days} days, seed {args.seed})\n")
    print("| products | users | images | log rows | wall s | rows/s | CPU s | peak RSS GiB | catalog GiB | log GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in generated.items():
        c = r["counts"]
        print(f"| {n:,} | {c['users']:,} | {c['images']:,} | {c['rows']:,} | {r['wall_s']:.1f} | "
              f"{c['rows'] / r['wall_s']:,.0f} | {r['cpu_s']:.1f} | {gib(r['peak_rss_bytes'])} | "
              f"{gib(r['bytes']['catalog.parquet'])} | {gib(r['bytes']['engagements.parquet'])} |")
    tasks = list(next(iter(generated.values()))["counts"]["rows_per_task"])
    print("\nRows per surface x engagement:\n")
    print("| task | " + " | ".join(f"{n:,}" for n in generated) + " |")
    print("|---|" + "---:|" * len(generated))
    for t in tasks:
        print(f"| {t} | " + " | ".join(f"{r['counts']['rows_per_task'][t]:,}" for r in generated.values()) + " |")
    if do_ingest:
        print("\n## itemsage ingest on the same files\n")
        print("| products | wall s | rows/s | CPU s | peak RSS GiB | rejected | dataset GiB |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in ingested.items():
            if "error" in r:
                print(f"| {n:,} | {r['error']} | | | | | |")
                continue
            rows = generated[n]["counts"]["rows"]
            print(f"| {n:,} | {r['wall_s']:.1f} | {rows / r['wall_s']:,.0f} | {r['cpu_s']:.1f} | "
                  f"{gib(r['peak_rss_bytes'])} | {r['rejected']:,} | {gib(sum(r['bytes'].values()))} |")
    elif not args.no_ingest:
        print("\n(itemsage.ingest is not importable: ingest not timed)")


if __name__ == "__main__":
    main()
