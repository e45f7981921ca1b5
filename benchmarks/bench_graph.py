"""The graph stage's cost: `itemsage graph DATASET` under /usr/bin/time -v, with the manifest's per-step
wall, CPU and peak memory, as Markdown (BENCHMARKS.md, "The graph stage").

    OMP_NUM_THREADS=1 python benchmarks/bench_graph.py DATASET [DATASET ...]

Each dataset's graph is written to its default place (DATASET/graph), replacing an earlier one. The
first run on a dataset also hashes its files (verify dataset); later runs use the verification record.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from itemsage import artifacts
from itemsage.graph import graph_dir_of

TIME_FIELDS = {"User time (seconds)": "user_s", "System time (seconds)": "sys_s",
               "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall", "Maximum resident set size (kbytes)": "rss_kib"}


def run(dataset: Path) -> dict:
    load = os.getloadavg()[0]
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "itemsage.cli", "-q", "graph", str(dataset),
                           "--no-progress"], capture_output=True, text=True, check=True)
    measured = {}
    for line in proc.stderr.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in TIME_FIELDS:
            measured[TIME_FIELDS[key]] = value
    parts = [float(p) for p in measured["wall"].split(":")]
    wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    manifest = artifacts.read_manifest(graph_dir_of(dataset))
    return {"dataset": dataset, "load": (load, os.getloadavg()[0]), "wall_s": wall,
            "cpu_s": float(measured["user_s"]) + float(measured["sys_s"]), "rss_gib": int(measured["rss_kib"]) / 2**20,
            "manifest": manifest}


def markdown(result: dict) -> str:
    m, counts = result["manifest"], result["manifest"]["counts"]
    head = (f"`{result['dataset']}`: {counts['products']:,} products, {counts['train_rows']:,} train rows, "
            f"{counts['edges']:,} edges; load average {result['load'][0]:.1f} before, {result['load'][1]:.1f} after")
    lines = [head, "", "| step | wall s | CPU s | peak memory so far |", "|---|---:|---:|---:|"]
    for name, step in m["timings"].items():
        lines.append(f"| {name} | {step['wall_s']:.1f} | {step['cpu_s']:.1f} | {step['peak_rss_gib']:.2f} GiB |")
    lines.append(f"| **whole process** (/usr/bin/time -v) | {result['wall_s']:.1f} | {result['cpu_s']:.1f} | "
                 f"{result['rss_gib']:.2f} GiB |")
    files = {name: meta["bytes"] / 2**20 for name, meta in m["files"].items()}
    lines += ["", "files: " + ", ".join(f"{name} {mib:,.1f} MiB" for name, mib in files.items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("datasets", nargs="+", type=Path)
    args = ap.parse_args()
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), f"({os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')})\n")
    for dataset in args.datasets:
        print(markdown(run(dataset)), "\n", flush=True)


if __name__ == "__main__":
    main()
