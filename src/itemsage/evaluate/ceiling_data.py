"""The ceiling's inputs: the demo shop a dataset was ingested from, and a window's rows matched to
the rows the generator drew (with their latents).

Which shop: the dataset manifest's inputs (`itemsage ingest` records each input file's path, as it
was given, and its `sha256:` fingerprint). A dataset has a ceiling when its two inputs are the
`catalog.parquet` and `engagements.parquet` of one demo-data directory, found at the recorded path
(a relative one from the current directory, else from a directory above the dataset's) and whose
manifest gives the same sha256 for both: the dataset was ingested from exactly those files. That directory must also hold the latents
(demo_shop/latents.py) and verify against its manifest, and every catalog product must have been
kept by ingest (the ceiling ranks the shop's products). Anything else raises `NoCeiling` with the
reason, which the reports print.

Which rows: a dataset row is the generator's row with the same (timestamp, user, product,
engagement), a key unique within a demo shop's log (checked: a key drawn twice must come from one
query). The dataset may reorder or split rows; it cannot have invented one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itemsage import artifacts, schema

log = logging.getLogger(__name__)


class NoCeiling(Exception):
    """The dataset has no ceiling; str(err) says why, in words a report can print."""


def _index_of(ids: Any, prefix: str) -> np.ndarray:
    """'p000123' -> 123: the demo shop numbers its products and users in order (prefix + zero-padded)."""
    return pc.cast(pc.utf8_slice_codeunits(ids, len(prefix)), pa.int64()).to_numpy(zero_copy_only=False)


def find_shop(dataset_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the demo-data directory the dataset was ingested from, its verified manifest); NoCeiling if none."""
    from itemsage.data.demo_shop import CATALOG_FILE, ENGAGEMENTS_FILE, LATENTS_FILE, MANIFEST_KIND, MEDOIDS_FILE

    inputs = artifacts.read_manifest(dataset_dir, kind="dataset").get("inputs") or {}
    paths = {Path(p).name: Path(p) for p in inputs}
    if set(paths) != {CATALOG_FILE, ENGAGEMENTS_FILE} or len(inputs) != 2 or len({p.parent for p in paths.values()}) != 1:
        raise NoCeiling(f"its inputs ({', '.join(sorted(inputs)) or 'none recorded'}) are not the {CATALOG_FILE} and "
                        f"{ENGAGEMENTS_FILE} of one demo-data directory (itemsage demo-data)")
    recorded = paths[CATALOG_FILE].parent
    # A relative path is the one ingest was given: from the current directory, else from a directory above
    # the dataset (the directory ingest ran in, when the dataset was written below it).
    tries = [recorded] if recorded.is_absolute() else [recorded, *(up / recorded for up in
                                                                   Path(dataset_dir).resolve().parents)]
    shop = next((d for d in tries if (d / artifacts.MANIFEST).is_file()), None)
    if shop is None:
        raise NoCeiling(f"the demo-data directory it was ingested from ({recorded}, as ingest recorded it) is not "
                        "there any more (a relative path is tried from the current directory and from every "
                        "directory above the dataset)")
    shown = os.path.abspath(shop)
    manifest = artifacts.read_manifest(shop)
    if manifest.get("kind") != MANIFEST_KIND:
        raise NoCeiling(f"its inputs' directory {shown} holds a '{manifest.get('kind')}' artifact, not a demo shop")
    files = manifest["files"]
    for name, given_path in paths.items():
        given, meta, path = inputs[str(given_path)], files.get(name, {}), shop / name
        if given.startswith("size-mtime:"):  # a file too large to hash at ingest: its size and time then
            same = path.is_file() and given == f"size-mtime:{path.stat().st_size}:{path.stat().st_mtime_ns}" \
                and path.stat().st_size == meta.get("bytes")
        else:
            same = given == f"sha256:{meta.get('sha256')}"
        if not same:
            raise NoCeiling(f"{shown}/{name} is not the file it was ingested from (another fingerprint)")
    if LATENTS_FILE not in files or MEDOIDS_FILE not in files:
        raise NoCeiling(f"{shown} was generated before demo-data recorded its latents; generate the shop again "
                        "(same seed: byte-identical catalog and log) and ingest it")
    try:
        artifacts.verify_manifest(shop, kind=MANIFEST_KIND, record=True)
    except artifacts.ArtifactError as err:
        raise NoCeiling(f"{shown} does not verify against its manifest ({err})") from None
    return shop, manifest


def demo_config(manifest: dict[str, Any]):
    """The DemoConfig a demo-data manifest was written with."""
    from itemsage.data.demo_shop import DemoConfig

    config = dict(manifest["config"])
    config["surface_mix"] = tuple(config["surface_mix"])
    return DemoConfig(**config)


@dataclass
class WindowRows:
    """A dataset window's rows (its file's order) with the generator's latents of their queries.

    Products and users are the shop's indices (product i: the catalog's i-th row)."""

    product: np.ndarray  # [T] engaged product
    engagement: np.ndarray  # [T] 0 click, 1 save, 2 add_to_cart, 3 checkout (schema.ENGAGEMENTS' order)
    surface: np.ndarray  # [T] 0 search, 1 closeup, 2 home (schema.SURFACES' order)
    user: np.ndarray  # [T]
    query: np.ndarray  # [T] the generator's query number
    cluster: np.ndarray  # [T] the query's interest cluster
    anchor: np.ndarray  # [T] search target / viewed product
    template: np.ndarray  # [T] search template
    day: np.ndarray  # [T] the query's day
    query_product: np.ndarray  # [T] the row's query_product_id (-1: none), as the dataset gives it
    train_counts: np.ndarray  # [N] train-window rows per product (every engagement), as evaluate counts them

    def __len__(self) -> int:
        return len(self.product)


def _codes(column: Any, names: tuple[str, ...]) -> np.ndarray:
    """A string column of known values -> their positions in `names` (int64)."""
    return pc.index_in(column, value_set=pa.array(list(names))).to_numpy(zero_copy_only=False).astype(np.int64)


def _keys(time_ms: np.ndarray, user: np.ndarray, product: np.ndarray, engagement: np.ndarray) -> np.ndarray:
    """Structured (time, user, product, engagement) keys, sortable and searchable as one value."""
    out = np.empty(len(time_ms), [("t", "<i8"), ("u", "<i8"), ("p", "<i8"), ("e", "<i8")])
    out["t"], out["u"], out["p"], out["e"] = time_ms, user, product, engagement
    return out


def _log_keys(path: Path, extra: tuple[str, ...] = ()) -> tuple[np.ndarray, pa.Table]:
    """A log's (time, user, product, engagement) keys [R], and its table of those columns and `extra`."""
    cols = [schema.ENGAGEMENT, schema.PRODUCT_ID, schema.TIMESTAMP, schema.USER_ID, *extra]
    t = pq.read_table(path, columns=[c for c in cols if c in pq.ParquetFile(path).schema_arrow.names])
    if t.num_rows and (t[schema.USER_ID].null_count or t[schema.PRODUCT_ID].null_count):
        raise NoCeiling(f"{path} has rows without a user or product, which a demo shop never writes")
    keys = _keys(t[schema.TIMESTAMP].cast(pa.int64()).to_numpy(), _index_of(t[schema.USER_ID], "u"),
                 _index_of(t[schema.PRODUCT_ID], "p"), _codes(t[schema.ENGAGEMENT], schema.ENGAGEMENTS))
    return keys, t


def window_rows(dataset_dir: str | Path, shop_dir: Path, latents: Any, products: int,
                window: str = "test") -> WindowRows:
    """The window's rows matched to the shop log's rows; NoCeiling where a row is not the shop's."""
    from itemsage.data.demo_shop import ENGAGEMENTS_FILE

    dataset_dir = Path(dataset_dir)
    n_kept = pq.read_metadata(dataset_dir / schema.PRODUCTS_FILE).num_rows
    if n_kept != products:
        raise NoCeiling(f"ingest kept {n_kept:,} of the shop's {products:,} products, and the ceiling ranks them all")
    gen, _ = _log_keys(shop_dir / ENGAGEMENTS_FILE)
    if len(gen) != len(latents.query):
        raise NoCeiling(f"{shop_dir} holds {len(latents.query):,} latent rows for {len(gen):,} log rows")
    order = np.argsort(gen, kind="stable")
    gen_sorted = gen[order]
    want, t = _log_keys(dataset_dir / schema.WINDOW_FILES[window], (schema.SURFACE, schema.QUERY_PRODUCT_ID))
    at = np.minimum(np.searchsorted(gen_sorted, want), max(len(gen_sorted) - 1, 0))
    if len(want) and (len(gen_sorted) == 0 or np.any(gen_sorted[at] != want)):
        missing = int(np.sum(gen_sorted[at] != want)) if len(gen_sorted) else len(want)
        raise NoCeiling(f"{missing:,} of its {window} rows are not rows of the shop's log")
    rows = order[at]
    twice = np.flatnonzero(gen_sorted[1:] == gen_sorted[:-1])  # a key drawn twice: both rows of one query?
    if len(twice) and np.any(latents.query[order[twice]] != latents.query[order[twice + 1]]):
        raise NoCeiling("two queries of the shop's log drew the same (time, user, product, engagement)")
    qp = t[schema.QUERY_PRODUCT_ID] if schema.QUERY_PRODUCT_ID in t.column_names else pa.nulls(t.num_rows, pa.string())
    query_product = np.where(pc.is_valid(qp).to_numpy(zero_copy_only=False), _index_of(qp.fill_null("p-1"), "p"), -1)
    train = pq.read_table(dataset_dir / schema.TRAIN_FILE, columns=[schema.PRODUCT_ID])
    out = WindowRows(product=want["p"].copy(), engagement=want["e"].copy(),
                     surface=_codes(t[schema.SURFACE], schema.SURFACES), user=want["u"].copy(),
                     query=latents.query[rows], cluster=latents.cluster[rows], anchor=latents.anchor[rows],
                     template=latents.template[rows], day=latents.day[rows], query_product=query_product,
                     train_counts=np.bincount(_index_of(train[schema.PRODUCT_ID], "p"), minlength=products))
    # The latents must name the query products the log shows (the viewed product; the medoid).
    closeup, home = out.surface == 1, out.surface == 2
    if np.any(out.anchor[closeup] != out.query_product[closeup]) or np.any(
            latents.medoid[out.user[home], out.cluster[home]] != out.query_product[home]):
        raise NoCeiling(f"the latents in {shop_dir} do not name the query products of its log")
    return out
