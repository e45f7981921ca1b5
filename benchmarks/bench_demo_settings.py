"""Compare the demo's training settings at a fixed step count, on one dataset, one run at a time.

Wall-clock budgets mislead on a shared machine, so each setting is trained for a fixed number of
steps (`train(max_steps=...)`, the minute budget off) and scored on the validation window: Recall@10
over all tasks of a stratified sample (`--val-sample` pairs, larger than training's own 2,000-pair
selection sample, so two settings' difference is not sampling noise), the exact rank of each pair's
product among the whole catalog. The test window is left alone (it scores only the final choice,
through `itemsage demo`).

Each run also records its median step time and the load average while it ran, so the step count a
minute budget gives can be estimated from the ratio of step times to a reference setting measured
in the same sitting (`--ref`).

    itemsage demo-data --products 20000 --out S && itemsage ingest --catalog S/catalog.parquet \
        --logs S/engagements.parquet --out D          # or reuse an `itemsage demo` run's dataset/
    python benchmarks/bench_demo_settings.py D --out runs/settings --steps 1100 \
        --run 'main={}' --run 'r025={"random_negatives_ratio": 0.25}'

Results are appended to OUT/results.jsonl, one JSON object a run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from itemsage import schema
from itemsage.model.batch import ProductStore
from itemsage.model.model import load_model
from itemsage.train.config import TrainConfig
from itemsage.train.loop import MODEL_DIR, train
from itemsage.train.pairs import load_pairs
from itemsage.train.validation import held_out_recall

# The demo's own training options on main (src/itemsage/demo.py before this benchmark's changes).
MAIN_DEMO = dict(preset="cpu", batch_size=1024, random_negatives_ratio=1.0, checkpoint_every=200, eval_every=250)


def validation_recall(model_dir: Path, dataset: Path, sample: int, seed: int) -> dict[str, float]:
    loaded = load_model(model_dir)
    cfg = loaded.config
    store = ProductStore.from_dataset(dataset, loaded.vocab, cfg.text_fields, cfg.max_images, progress=False)
    pairs = load_pairs(dataset, schema.VALIDATION_FILE, store, sample=sample, seed=seed)
    recall = held_out_recall(loaded.model, store, pairs, torch.device("cpu"))
    surfaces: dict[str, list[float]] = {}
    for task, r in recall.items():
        if task != "all":
            surfaces.setdefault(task.split(".")[0], []).append(r["recall@10"])
    out = {"all": recall["all"]["recall@10"], "n": recall["all"]["n"]}
    out.update({s: sum(v) / len(v) for s, v in surfaces.items()})  # mean over a surface's tasks
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True, help="Training steps of every run (no minute budget).")
    ap.add_argument("--run", action="append", required=True,
                    help="NAME=JSON: TrainConfig overrides on top of main's demo settings, e.g. "
                         "'lr2={\"lr\": 0.002}'. A 'model' key holds ModelConfig overrides.")
    ap.add_argument("--val-sample", type=int, default=12_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.run:
        name, _, overrides = spec.partition("=")
        options = {**MAIN_DEMO, **json.loads(overrides or "{}")}
        steps = options.pop("steps", args.steps)
        cfg = TrainConfig(max_steps=steps, max_minutes=None, seed=args.seed, **options)
        run_dir = args.out / name
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        result = train(args.dataset, run_dir, cfg, progress=False)
        train_s = time.perf_counter() - t0
        load_after = os.getloadavg()
        val = validation_recall(run_dir / MODEL_DIR, args.dataset, args.val_sample, args.seed + 1)
        row = {"name": name, "options": options, "steps": result.steps, "best_step": result.best_step,
               "median_step_s": round(result.median_step_s, 4), "pairs_per_s": round(result.pairs_per_s, 1),
               "train_wall_s": round(train_s, 1), "selection_recall@10": result.final_recall.get("all", {}).get("recall@10"),
               "validation_recall@10": val, "load_before": load_before, "load_after": load_after,
               "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        print(json.dumps(row), flush=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
