"""Benchmark training throughput: pairs/s of the real `train()` step, and achieved FLOP/s.

Data: a generated demo shop (demo_data + ingest, 256-d images, up to 4 per product, twelve text
fields), trained on its closeup and home tasks only so no text-encoder time enters the setup (the
tower's cost does not depend on the query surface). Each step runs B positives plus R = 4B random
negatives through the tower (one forward and backward over B + R products), the mixed-negative loss
and the optimiser.

FLOP/s: model.flops_per_product of the padded batch the tower executes (the batch's image slots and
all F text fields) times (B + R) products, times 3 for forward + backward, divided by the median step
time; compared with a plain float32 torch matmul (2048 x 2048) measured in the same process, so the
fraction is about this machine and this moment (the load of other processes included).

Two counts: "executed" is what the tower runs now (flops_per_product); "stock" is the same function
computed the stock way, keys and values projected for every token in the [CLS] layer (what the code
before 2026-11-27 executed, `stock_flops_per_product`). The stock count fixes the work, so its
fraction compares runs of different code like pairs/s does; the executed fraction says how well the
hardware is used on the work actually done.

    python benchmarks/bench_train.py                       # cpu and paper presets, B = 1024
    python benchmarks/bench_train.py --presets cpu --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from itemsage import schema
from itemsage.data.demo_shop import CATALOG_FILE, ENGAGEMENTS_FILE, DemoConfig, generate_demo_data
from itemsage.data.ingest import IngestConfig, ingest
from itemsage.data.text import Vocabulary
from itemsage.model.batch import ProductStore
from itemsage.model.config import flops_per_product, model_config
from itemsage.train.config import TrainConfig
from itemsage.train.loop import train

TASKS = tuple(schema.task_name(s, e) for s in ("closeup", "home") for e in schema.ENGAGEMENTS)


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul: the median of `repeats` timed runs after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def stock_flops_per_product(cfg, image_count: int, token_count: int, *, image_dim: int = 256) -> int:
    """flops_per_product with the [CLS] layer counted as the stock computation: K and V projected for
    all S positions, the [CLS] query, scores and weighted sum, output projection, feed-forward."""
    D, S = cfg.d_model, 1 + image_count + token_count
    folded = flops_per_product(cfg, image_count, token_count, image_dim=image_dim)
    if cfg.aggregator != "transformer":
        return folded
    folded_cls = 2 * D * D * 2 + 2 * S * D * cfg.heads * 2 + 2 * D * D * 2
    stock_cls = 2 * S * D * 2 * D + 2 * D * D + 2 * S * D * 2 + 2 * D * D
    return folded - folded_cls + stock_cls


def padded_slots(dataset: Path, preset: str, rows: int, seed: int = 0) -> int:
    """Image slots M of a batch of `rows` random products (the store pads to the batch's most images)."""
    cfg = model_config(preset)
    store = ProductStore.from_dataset(dataset, Vocabulary.load(dataset / schema.VOCAB_FILE), cfg.text_fields,
                                      cfg.max_images, progress=False)
    batch = store.batch(np.random.default_rng(seed).integers(0, len(store), rows))
    return int(batch.images.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="cpu,paper")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=4.0, help="random negatives per positive")
    ap.add_argument("--steps", type=int, default=4, help="steps per preset; the first is warm-up, not timed")
    ap.add_argument("--products", type=int, default=5000)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shop, dataset = Path(tmp) / "shop", Path(tmp) / "dataset"
        generate_demo_data(shop, DemoConfig(products=args.products, seed=0), progress=False)
        ingest(shop / CATALOG_FILE, shop / ENGAGEMENTS_FILE, dataset, IngestConfig(progress=False))
        reference = matmul_flops()
        rows = []
        for preset in args.presets.split(","):
            cfg = TrainConfig(preset=preset, batch_size=args.batch_size, random_negatives_ratio=args.ratio,
                              max_steps=args.steps, warmup_steps=1, tasks=TASKS, eval_sample=0,
                              checkpoint_every=0, device="cpu")
            result = train(dataset, Path(tmp) / f"run-{preset}", cfg, progress=False)
            products = args.batch_size + cfg.num_random_negatives
            mcfg = model_config(preset)
            m = padded_slots(dataset, preset, products)
            flops = 3 * products * flops_per_product(mcfg, m, len(mcfg.text_fields), image_dim=256)
            stock = 3 * products * stock_flops_per_product(mcfg, m, len(mcfg.text_fields), image_dim=256)
            achieved = flops / result.median_step_s
            rows.append((preset, args.batch_size, cfg.num_random_negatives, result.steps - 1, result.median_step_s,
                         args.batch_size / result.median_step_s, achieved, achieved / reference,
                         stock / result.median_step_s / reference))
        reference = (reference + matmul_flops()) / 2  # before and after: the machine's load drifts

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; float32 2048x2048 matmul: "
          f"{reference / 1e9:.1f} GFLOP/s (mean of before and after)\n")
    print("| preset | B positives | R random negatives | timed steps | median step s | pairs/s | "
          "executed GFLOP/s (fwd+bwd, 3x fwd) | fraction of matmul, executed | fraction of matmul, stock count |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset, b, r, n, step_s, pps, achieved, frac, stock_frac in rows:
        print(f"| {preset} | {b} | {r} | {n} | {step_s:.2f} | {pps:,.0f} | {achieved / 1e9:.1f} | {frac:.2f} "
              f"| {stock_frac:.2f} |")


if __name__ == "__main__":
    main()
