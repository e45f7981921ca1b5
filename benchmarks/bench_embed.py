"""Benchmark `embed`: products/s end to end, and the tower's achieved FLOP/s against a plain matmul.

For each preset (default `cpu` and `paper`) a randomly initialised model embeds a generated catalog
(titles, descriptions and the other text fields, a few 256-d image vectors per product) through the
real `embed` (Parquet in, featurise, tower, Parquet shards out). Then one batch is timed stage by
stage: featurising (Python tokenisation and lookup) and the tower's forward pass. The tower's FLOP/s
uses `itemsage.model.flops_per_product` for the padded batch it executes, and is compared with the
FLOP/s of a plain float32 matmul measured in the same run on the same threads.

    python benchmarks/bench_embed.py                        # cpu and paper, 4,096 products
    python benchmarks/bench_embed.py --presets cpu --n 20000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from itemsage import artifacts, schema
from itemsage.data.text import Vocabulary
from itemsage.embed.shards import embed
from itemsage.model.batch import featurize
from itemsage.model.config import flops_per_product, model_config
from itemsage.model.model import load_model, save_model
from itemsage.model.tower import ItemSage, QueryAdapters

IMAGE_DIM = 256
WORDS = [f"w{i}" for i in range(3000)]  # a Zipf-ish vocabulary of words


def generate_products(n: int, rng: np.random.Generator) -> pa.Table:
    """n products in the dataset format: every text field filled, title ~8 words, description ~40."""
    p = 1.0 / np.arange(1, len(WORDS) + 1)
    p /= p.sum()

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS, size=words, p=p))

    lengths = {"title": 8, "description": 40, "brand": 1, "colors": 2, "materials": 2, "patterns": 1,
               "size": 1, "size_type": 1, "product_type": 4, "category": 5, "domain": 1, "links": 3}
    columns: dict[str, list] = {schema.PRODUCT_ID: [f"p{i}" for i in range(n)]}
    for field in schema.TEXT_FIELDS:
        columns[field] = [[text(lengths.get(field, 2))] for _ in range(n)]
    images = rng.standard_normal((n, 4, IMAGE_DIM)).astype(np.float32)
    counts = rng.integers(1, 5, size=n)  # 1..4 images
    columns[schema.IMAGE_EMBEDDINGS] = [images[i, : counts[i]].tolist() for i in range(n)]
    columns[schema.CONTENT_HASH] = [f"h{i}" for i in range(n)]
    return pa.table(columns)


def matmul_flops(seconds: float = 2.0, size: int = 1024) -> float:
    """FLOP/s of a plain float32 [size x size] @ [size x size] matmul, best sustained over `seconds`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    return runs * 2 * size**3 / (time.perf_counter() - start)


def bench_preset(preset: str, table: pa.Table, batch_size: int, work: Path) -> dict:
    torch.manual_seed(0)
    cfg = model_config(preset)
    vocab = Vocabulary.build(v for f in schema.TEXT_FIELDS for v in table.column(f).to_pylist())
    tower = ItemSage(cfg, len(vocab), IMAGE_DIM)
    adapters = QueryAdapters({"search": 384}, cfg.out_dim)
    model_dir, data_dir, out_dir = work / f"model-{preset}", work / "data", work / f"emb-{preset}"
    save_model(model_dir, tower, adapters, cfg, vocab, image_dim=IMAGE_DIM, query_dims={"search": 384})
    if not (data_dir / schema.PRODUCTS_FILE).exists():
        artifacts.atomic_write_parquet(data_dir / schema.PRODUCTS_FILE, table)
        artifacts.write_manifest(data_dir, "dataset", counts={"products": table.num_rows})

    summary = embed(model_dir, data_dir, out_dir, batch_size=batch_size, progress=False)

    # Stage by stage on one batch: featurising, then the tower (best of a few runs).
    model = load_model(model_dir)
    piece = table.slice(0, min(batch_size, table.num_rows))
    feat_s = tower_s = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        batch = featurize(piece, model.vocab, cfg.text_fields, cfg.max_images, IMAGE_DIM)
        feat_s = min(feat_s, time.perf_counter() - start)
        start = time.perf_counter()
        with torch.inference_mode():
            model.model.encode_products(batch)
        tower_s = min(tower_s, time.perf_counter() - start)
    slots = batch.images.shape[1]  # M: the padded image slots the batch executes
    flops = flops_per_product(cfg, slots, len(cfg.text_fields), image_dim=IMAGE_DIM)
    return {
        "preset": preset, "params": sum(p.numel() for p in model.tower.parameters()),
        "products": summary.count, "end_to_end": summary.products_per_second,
        "featurize": len(piece) / feat_s, "tower": len(piece) / tower_s,
        "flops_per_product": flops, "tower_flops": flops * len(piece) / tower_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="cpu,paper")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    table = generate_products(args.n, np.random.default_rng(args.seed))
    peak = matmul_flops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            rows.append(bench_preset(preset, table, args.batch_size, Path(tmp)))
    peak_after = matmul_flops()  # the machine may be shared: measure the reference on both sides
    print(f"{args.n:,} generated products (12 text fields, 1-4 images of {IMAGE_DIM}-d), batch "
          f"{args.batch_size}, torch threads {torch.get_num_threads()}; plain 1024^3 float32 matmul: "
          f"{peak / 1e9:,.1f} GFLOP/s before, {peak_after / 1e9:,.1f} after")
    print()
    print("| preset | tower params | end-to-end products/s | featurise products/s | tower products/s | "
          "tower MFLOP/product | tower GFLOP/s | % of matmul |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    reference = max(peak, peak_after)
    for r in rows:
        print(f"| {r['preset']} | {r['params']:,} | {r['end_to_end']:,.0f} | {r['featurize']:,.0f} | "
              f"{r['tower']:,.0f} | {r['flops_per_product'] / 1e6:.1f} | {r['tower_flops'] / 1e9:.1f} | "
              f"{100 * r['tower_flops'] / reference:.0f}% |")


if __name__ == "__main__":
    main()
