"""The data's own ceiling beside every model (SPEC §9): on a dataset of the demo shop, the best
Recall@K a ranking can reach knowing every latent of the row (`oracle`) or only what the query shows
(`observable`), and, to explain the gap, with content alone (`features`) or with popularity from
train-window counts (`train_counts`); ceiling_ranks.py defines them, ceiling_model.py scores them.

Same pairs, same protocol as the evaluation: every pair of the window, ranked among the whole
catalog, closeup pairs with their query product left out, home pairs keeping theirs. Ties: a
ceiling's ranking ties often (products its knowledge cannot tell apart), so its figures are the
expected Recall@K under a random order of the tied products (metrics.expected_recall); models keep
evaluate's pessimistic rule, which their continuous scores seldom meet.

Which datasets: those ingested from a demo-data directory that recorded its latents (ceiling_data.py
says how it is found and checked); any other gets {"available": False, "reason": ...}, and so does a
shop over MAX_PRODUCTS products (the cost grows as test pairs x products per category).

Cost and cache: about 13 s of CPU (one core) for oracle + observable at 20,000 products, reading the
shop included, and about 360 MB. The per-pair
counts of each (window, kind) are kept in DATASET/ceiling/<window>-<kind>.parquet with the
fingerprints they were computed from, so a re-run, a second model or compare's every run read them.
Deleting the folder only costs the recomputation.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itemsage import artifacts, schema
from itemsage.evaluate.ceiling_data import NoCeiling, demo_config, find_shop, window_rows
from itemsage.evaluate.ceiling_ranks import KINDS, TRAIN_COUNT_ALPHA
from itemsage.metrics import DEFAULT_KS, bucket_figures, expected_recall

log = logging.getLogger(__name__)

CEILING_DIR = "ceiling"
VERSION = 1  # of the ceiling's definition: cached counts of another version are recomputed
MAX_PRODUCTS = 100_000
REPORT_KINDS = ("oracle", "observable")  # in every report; compare adds features and train_counts
TIE_RULE = "random"


def _cache_key(dataset_dir: Path, shop_dir: Path, window: str, kind: str) -> dict[str, Any]:
    return {"version": VERSION, "window": window, "kind": kind, "alpha": TRAIN_COUNT_ALPHA,
            "dataset": artifacts.fingerprint(dataset_dir), "shop": artifacts.fingerprint(shop_dir)}


def _read_cached(path: Path, key: dict[str, Any], rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"itemsage_ceiling", b"{}"))
    except (OSError, ValueError, pa.ArrowException):
        return None
    if meta != key or table.num_rows != rows:
        return None
    return table["greater"].to_numpy().astype(np.int64), table["tied"].to_numpy().astype(np.int64)


def ceiling_counts(dataset_dir: str | Path, kinds: Sequence[str] = REPORT_KINDS, window: str = "test",
                   ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """({kind: (greater, tied) [T] per row of the window's file}, info) from the cache or computed;
    NoCeiling when the dataset has none. info: the shop, seconds per kind (None: read from the cache)."""
    from itemsage.data.demo_shop import DemoShop, read_latents
    from itemsage.evaluate.ceiling_ranks import ranks_for

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown ceiling kind(s) {unknown}; known: {', '.join(KINDS)}")
    dataset_dir = Path(dataset_dir)
    shop_dir, manifest = find_shop(dataset_dir)
    cfg = demo_config(manifest)
    if cfg.products > MAX_PRODUCTS:
        raise NoCeiling(f"its shop has {cfg.products:,} products; the ceiling is computed up to {MAX_PRODUCTS:,} "
                        "(its cost grows as test pairs x products per category: hours at a million)")
    n_rows = pq.read_metadata(dataset_dir / schema.WINDOW_FILES[window]).num_rows
    out, seconds = {}, {}
    paths = {k: dataset_dir / CEILING_DIR / f"{window}-{k}.parquet" for k in kinds}
    keys = {k: _cache_key(dataset_dir, shop_dir, window, k) for k in kinds}
    for kind in kinds:
        cached = _read_cached(paths[kind], keys[kind], n_rows)
        if cached is not None:
            out[kind], seconds[kind] = cached, None
    missing = tuple(k for k in kinds if k not in out)
    if missing:
        start = time.perf_counter()
        latents = read_latents(shop_dir)
        shop = DemoShop(cfg)
        rows = window_rows(dataset_dir, shop_dir, latents, cfg.products, window)
        log.info("ceiling: %d %s pairs of %s matched to its shop's latents in %.1f s", len(rows), window, shop_dir,
                 time.perf_counter() - start)

        def done(kind: str, s: float) -> None:
            seconds[kind] = round(s, 1)
            log.info("ceiling %s: %d pairs in %.1f s", kind, len(rows), s)

        for kind, (greater, tied) in ranks_for(missing, shop, latents.medoid, rows, done).items():
            out[kind] = (greater, tied)
            table = pa.table({"greater": greater.astype(np.int32), "tied": tied.astype(np.int32)})
            table = table.replace_schema_metadata({"itemsage_ceiling": json.dumps(keys[kind])})
            artifacts.atomic_write_parquet(paths[kind], table)
    return out, {"shop": str(shop_dir.resolve()), "products": cfg.products, "seconds": seconds}


def _groups(tasks: np.ndarray) -> dict[str, np.ndarray]:
    """Each task, each surface and `all` -> its pairs' mask."""
    surfaces = np.array([t.split(".")[0] for t in tasks.tolist()], dtype=object)
    out = {t: tasks == t for t in sorted(set(tasks.tolist()))}
    out.update({s: surfaces == s for s in schema.SURFACES if (surfaces == s).any()})
    out["all"] = np.ones(len(tasks), bool)
    return out


def figures(greater: np.ndarray, tied: np.ndarray, tasks: np.ndarray, counts: np.ndarray,
            ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """One kind's figures under the random tie rule: {"recall": {group: {"recall@k", "n"}}, "buckets":
    {bucket: {"recall@10", "median_rank", "n"}}}; groups: tasks, surfaces, all."""
    hits = {k: expected_recall(greater, tied, k) for k in ks}
    recall = {name: {**{f"recall@{k}": float(hits[k][sel].mean()) if sel.any() else None for k in ks},
                     "n": int(sel.sum())} for name, sel in _groups(tasks).items()}
    expected_rank = greater + tied / 2.0  # 0-based, the mean place among the tied
    return {"recall": recall, "buckets": bucket_figures(expected_recall(greater, tied, 10), expected_rank, counts)}


def ceiling_figures(dataset_dir: str | Path, source_rows: np.ndarray, tasks: np.ndarray, counts: np.ndarray,
                    ks: Sequence[int] = DEFAULT_KS, kinds: Sequence[str] = REPORT_KINDS,
                    window: str = "test") -> dict[str, Any]:
    """The evaluation's "ceiling" block for its pairs: `source_rows` [Q] their rows in the window's file,
    `tasks` [Q], `counts` [Q] their engaged product's train-window count. {"available": False,
    "reason"} for a dataset without one; else {"available": True, "tie_rule", "kinds": {kind:
    figures()}, "shop", "products", "seconds"}."""
    try:
        counts_by_kind, info = ceiling_counts(dataset_dir, kinds, window)
    except NoCeiling as err:
        log.info("no ceiling for %s: %s", dataset_dir, err)
        return {"available": False, "reason": str(err)}
    tasks = np.asarray(tasks).astype(str).astype(object)
    out: dict[str, Any] = {"available": True, "tie_rule": TIE_RULE, "window": window, **info, "kinds": {}}
    for kind in kinds:
        greater, tied = counts_by_kind[kind]
        out["kinds"][kind] = figures(greater[source_rows], tied[source_rows], tasks, counts, ks)
    return out
