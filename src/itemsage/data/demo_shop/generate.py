"""Writing a demo-data directory (`itemsage demo-data`): catalog.parquet, engagements.parquet, the
latents the evaluation's ceiling reads (latents.parquet, medoids.parquet: demo_shop/latents.py) and
manifest.json, chunk by chunk (the writer encodes one chunk on a thread while the next is
generated), with the main image vectors in a scratch memory-mapped file the OS may page out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itemsage import artifacts, schema
from itemsage.config import ConfigError
from itemsage.data.demo_shop.config import DemoConfig
from itemsage.data.demo_shop.latents import LATENTS_FILE, MEDOIDS_FILE, medoids_table
from itemsage.data.demo_shop.shop import DemoShop

log = logging.getLogger(__name__)


CATALOG_FILE = "catalog.parquet"
ENGAGEMENTS_FILE = "engagements.parquet"
MANIFEST_KIND = "demo-data"
# Every file a demo-data directory holds besides its manifest; the latents are for the evaluation's
# ceiling only (demo_shop/latents.py), never read by ingest or training.
SHOP_FILES = (CATALOG_FILE, ENGAGEMENTS_FILE, LATENTS_FILE, MEDOIDS_FILE)


def _prepare_out_dir(out: Path) -> None:
    """Refuse a directory holding anything but (part of) an earlier demo-data output; clear that.

    A run killed half-way leaves at most our own files (and hidden temp files), without a manifest:
    those are recognised by name, so the re-run simply starts over."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`--out` ({out}) is a file; pass a directory path (it is created if missing).")
    if not out.exists():
        return
    ours = {*SHOP_FILES, artifacts.MANIFEST}
    foreign = sorted(e.name for e in out.iterdir() if e.name not in ours and not e.name.startswith("."))
    kind = None
    if (out / artifacts.MANIFEST).is_file():
        with contextlib.suppress(ValueError, OSError):
            kind = json.loads((out / artifacts.MANIFEST).read_text()).get("kind")
        if kind != MANIFEST_KIND:
            foreign.append(f"{artifacts.MANIFEST} of a '{kind}' artifact")
    if foreign:
        raise ConfigError(
            f"`--out` ({out}) holds other files ({', '.join(foreign[:5])}); demo-data will not write over "
            "them. Pass a new or empty directory."
        )
    # The manifest goes first, so a run killed half-way never looks finished.
    (out / artifacts.MANIFEST).unlink(missing_ok=True)
    for name in SHOP_FILES:
        (out / name).unlink(missing_ok=True)
    for pattern in (*(f".{name}.*.tmp" for name in SHOP_FILES), ".main_images.*.tmp"):
        for leftover in out.glob(pattern):
            leftover.unlink()


@contextlib.contextmanager
def _parquet_writer(target: Path) -> Iterator[Any]:
    """Yield write(table): one row group per call, into a temp file renamed over `target` at the end.

    Encoding runs on a background thread (pyarrow releases the GIL), so the next chunk is generated
    while the previous one is written; at most one chunk waits. Dictionary encoding and statistics
    only for the scalar columns: on float vectors they cost time and save nothing."""
    with artifacts.atomic_path(target) as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        writer: pq.ParquetWriter | None = None
        pending: Future | None = None

        def write(table: pa.Table) -> None:
            nonlocal writer, pending
            if writer is None:
                scalar = [f.name for f in table.schema if not pa.types.is_list(f.type)]
                strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
                # zstd(1): as fast as snappy here, and about halves the log, whose query vectors
                # repeat across the rows of one query.
                writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=strings, write_statistics=scalar,
                                          compression="zstd", compression_level=1)
            if pending is not None:
                pending.result()  # row groups stay in order; an error surfaces here
            pending = pool.submit(writer.write_table, table, row_group_size=len(table))

        try:
            yield write
            if pending is not None:
                pending.result()
        finally:
            if pending is not None:
                pending.exception()  # wait, so the writer is not closed under a running write
            if writer is not None:
                writer.close()


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Any]:
    from itemsage.progress import progress_bar

    with progress_bar(enabled, unit="rows") as bar:
        yield bar


def generate_demo_data(out_dir: str | Path, cfg: DemoConfig | None = None, *,
                       progress: bool = True) -> dict[str, Any]:
    """Write `catalog.parquet`, `engagements.parquet`, the latents (`latents.parquet`, `medoids.parquet`:
    demo_shop/latents.py) and `manifest.json` under `out_dir`.

    Memory stays bounded: the catalog is written `catalog_chunk` products per row group and the log
    about `chunk_rows` rows per row group. Returns the manifest."""
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    _prepare_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("demo-data: %d products, %d users, %d days, seed %d", cfg.products, cfg.n_users, cfg.days, cfg.seed)
    shop = DemoShop(cfg)
    plan = shop.plan()
    counts = np.zeros((3, 4), np.int64)
    n_images = 0
    # The main image of every product is kept for the closeup and home queries, in a scratch file
    # the OS can page out, so memory stays bounded at any catalog size.
    scratch = out / f".main_images.{os.getpid()}.tmp"
    try:
        shop.main_images = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32,
                                                     shape=(cfg.products, cfg.image_dim))
        with _progress_bar(progress) as bar:
            task = bar.add_task("catalog", total=cfg.products)
            with _parquet_writer(out / CATALOG_FILE) as write:
                for table in shop.catalog_chunks():
                    write(table)
                    n_images += pc.sum(pc.list_value_length(table[schema.IMAGE_EMBEDDINGS])).as_py()
                    bar.advance(task, len(table))
            task = bar.add_task("home queries", total=cfg.n_users)
            shop.compute_medoids(advance=lambda k: bar.advance(task, k))
            artifacts.atomic_write_parquet(out / MEDOIDS_FILE, medoids_table(shop.users.medoid))
            task = bar.add_task("engagements", total=sum(c[3] for c in plan))
            first_query = 0
            with _parquet_writer(out / ENGAGEMENTS_FILE) as write, _parquet_writer(out / LATENTS_FILE) as record:
                for i, (day, t0, t1, n) in enumerate(plan):
                    table, c, latents = shop.engagement_chunk(day, t0, t1, n, i, first_query)
                    write(table)
                    record(latents)
                    counts += c
                    first_query += n
                    bar.advance(task, n)
    finally:
        shop.main_images = None
        scratch.unlink(missing_ok=True)
    tasks = {schema.task_name(s, e): int(counts[i, j])
             for i, s in enumerate(schema.SURFACES) for j, e in enumerate(schema.ENGAGEMENTS)}
    manifest_counts = {
        "products": cfg.products,
        "images": int(n_images),
        "late_products": int((shop.products.launch_day > 0).sum()),
        "users": cfg.n_users,
        "rows": int(counts.sum()),
        "rows_per_task": tasks,
    }
    manifest = artifacts.write_manifest(out, MANIFEST_KIND, config=cfg.to_dict(), counts=manifest_counts,
                                        files=list(SHOP_FILES))
    log.info("demo-data: wrote %d products and %d log rows to %s", cfg.products, counts.sum(), out)
    return manifest
