"""Ablations of the ItemSage tower on one split: each variant trained like a `compare` row.

Every variant is the `itemsage` compare row with ModelConfig (and optionally TrainConfig) overrides,
trained with the same step cap, validation-window early stopping and patience, embedded as
`itemsage embed` does and evaluated on the test window by exact search. Runs go one at a time
(one core: set OMP_NUM_THREADS=1); a finished variant (its result.json) is skipped on a re-run.
Writes OUT/ablations.md (a table) and OUT/ablations.json.

    OMP_NUM_THREADS=1 python benchmarks/ablate.py DATASET --out OUT \
        --variant baseline= --variant type_emb=type_embedding=true,dropout=0 ...

A variant is `name=key=value,key=value`; keys are ModelConfig options, or `train.<option>` for a
TrainConfig option. Values are parsed as JSON where they parse (true, 0, 256), else kept as strings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from itemsage import artifacts
from itemsage.evaluate.compare_runs import CompareConfig, run_one, seed_scores

KEYS = ("all", "search", "closeup", "home", "cold_start", "seen", "unseen")


def parse_variant(text: str) -> tuple[str, dict, dict]:
    name, _, spec = text.partition("=")
    model, train = {}, {}
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        (train if key.startswith("train.") else model)[key.removeprefix("train.")] = value
    return name, model, train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant", action="append", default=[], help="name=key=value,...")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--random-negatives-ratio", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--validation-sample", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    rows = []
    for text in args.variant:
        name, model, train = parse_variant(text)
        cfg = CompareConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, runs=("itemsage",),
                            seeds=1, eval_every=args.eval_every, patience=args.patience,
                            validation_sample=args.validation_sample, seed=args.seed,
                            train_overrides={"random_negatives_ratio": args.random_negatives_ratio,
                                             **train, "model": model})
        start = time.perf_counter()
        result = run_one("itemsage", args.seed, args.dataset, args.out / name, cfg, progress=False)
        run = result["run"]
        scores = seed_scores(result)
        rows.append({"name": name, "model": model, "train": train, "parameters": run["parameters"],
                     "steps": run["steps"], "best_step": run["best_step"], "stopped_by": run["stopped_by"],
                     "validation": run["validation_recall_at_10"], "train_seconds": run["train_seconds"],
                     "wall_seconds": run.get("wall_seconds"), **{k: scores.get(k) for k in KEYS}})
        print(f"{name}: {json.dumps({k: rows[-1][k] for k in ('steps', 'best_step', *KEYS)})} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        write(args.out, rows, args)
    return 0


def write(out: Path, rows: list[dict], args: argparse.Namespace) -> None:
    def f(v):
        return "–" if v is None else f"{v:.3f}"

    lines = [f"Ablations: preset {args.preset}, batch {args.batch_size}, random negatives {args.random_negatives_ratio:g}×B, "
             f"seed {args.seed}, validation every {args.eval_every} steps, patience {args.patience}, cap {args.steps} "
             "steps. Recall@10, test window, exact search.", "",
             "| variant | overrides | params | steps (best) | stopped by | val | " + " | ".join(KEYS) + " | train s |",
             "|---|---|---:|---|---|---:|" + "---:|" * len(KEYS) + "---:|"]
    for r in rows:
        over = ", ".join(f"{k}={v}" for k, v in {**r["model"], **{f"train.{k}": v for k, v in r["train"].items()}}.items())
        lines.append(f"| {r['name']} | {over or '(preset)'} | {r['parameters']:,} | {r['steps']} ({r['best_step']}) | "
                     f"{r['stopped_by']} | {f(r['validation'])} | " + " | ".join(f(r[k]) for k in KEYS)
                     + f" | {r['train_seconds']:.0f} |")
    artifacts.atomic_write_text(out / "ablations.md", "\n".join(lines) + "\n")
    artifacts.atomic_write_json(out / "ablations.json", rows)


if __name__ == "__main__":
    sys.exit(main())
