"""The demo shop's latents that its files never show, recorded beside them for the evaluation's
ceiling (evaluate/ceiling*.py): the best Recall@K any model could reach on a dataset of this shop.

    DIR/latents.parquet   row-aligned with engagements.parquet: each log row's query (numbered in
                          generation order) and that query's draws: its user's interest `cluster`
                          (0..2), `anchor` (the search target or the viewed product; drawn but unused
                          for home), search `template`, `engaged` (positions drawn, before duplicates
                          are dropped) and `day`
    DIR/medoids.parquet   per user, in user order: `medoid`, the product each of their interest
                          clusters' home query is (the medoid of its history's main images)

Products and users are numbered as the files number them: product i is the catalog's i-th row (id
"p" + zero-padded i), user u the u-th user ("u" + zero-padded u); -1 is none. The generator records
the arrays it drew (logs.py, `EngagementLogs.engagement_chunk`), so recording draws no random number
and the catalog and the log stay byte-identical for a seed. The rest of the latent world (products'
category, style, brand, popularity, launch day; users' tier, styles, clusters, activity) is rebuilt
from the manifest's config by `DemoShop(cfg)`, which is cheap; these two files hold what is not.

The latents may be read to compute a ceiling, never to train or choose a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LATENTS_FILE = "latents.parquet"
MEDOIDS_FILE = "medoids.parquet"

LATENTS_SCHEMA = pa.schema([("query", pa.int64()), ("cluster", pa.int8()), ("anchor", pa.int32()),
                            ("template", pa.int8()), ("engaged", pa.int8()), ("day", pa.int16())])


def latents_table(*, query: np.ndarray, cluster: np.ndarray, anchor: np.ndarray, template: np.ndarray,
                  engaged: np.ndarray, day: np.ndarray) -> pa.Table:
    """One row per log row (the arrays [R], in the log's row order) in LATENTS_SCHEMA."""
    columns = {"query": query, "cluster": cluster, "anchor": anchor, "template": template, "engaged": engaged,
               "day": day}
    return pa.table({f.name: pa.array(np.asarray(columns[f.name]).astype(f.type.to_pandas_dtype()), f.type)
                     for f in LATENTS_SCHEMA})


def medoids_table(medoid: np.ndarray) -> pa.Table:
    """medoid [U, K] product indices -> one row per user: `medoid` fixed_size_list<int32>[K]."""
    users, k = medoid.shape
    flat = pa.array(medoid.astype(np.int32).ravel(), pa.int32())
    return pa.table({"medoid": pa.FixedSizeListArray.from_arrays(flat, k)})


@dataclass
class ShopLatents:
    """The recorded latents: per log row [R] (engagements.parquet's order) and per user [U, K]."""

    query: np.ndarray  # [R] int64 the row's query, numbered in generation order
    cluster: np.ndarray  # [R] the query's interest cluster of its user
    anchor: np.ndarray  # [R] search target / viewed product (-1: none)
    template: np.ndarray  # [R] search query template
    engaged: np.ndarray  # [R] positions drawn for the query
    day: np.ndarray  # [R] the query's day (products launched by then can be drawn)
    medoid: np.ndarray  # [U, K] each user cluster's home query product


def read_latents(shop_dir: str | Path) -> ShopLatents:
    """The two files of a demo-data directory as arrays (int64)."""
    shop_dir = Path(shop_dir)
    rows = pq.read_table(shop_dir / LATENTS_FILE)
    med = pq.read_table(shop_dir / MEDOIDS_FILE)["medoid"].combine_chunks()
    k = med.type.list_size
    medoid = med.flatten().to_numpy().astype(np.int64).reshape(-1, k)
    return ShopLatents(**{name: rows[name].to_numpy().astype(np.int64) for name in LATENTS_SCHEMA.names},
                       medoid=medoid)
