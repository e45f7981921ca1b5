"""A catalog alone (`embed_from_catalog`, `itemsage embed MODEL --catalog FILE`): no logs, no ingest.

The catalog is checked row by row with ingest's own checks (`data.ingest.check_products`: the same
reasons, the model's text fields and image width) into `OUT/catalog/` (products.parquet,
rejects.jsonl, manifest.json of kind 'catalog'), and that directory is then embedded exactly like a
dataset's products (embed/shards.py), so a re-run resumes and `incremental` re-embeds only new or
changed products. The validation is skipped when the input files (sha256) and the model's fields
are unchanged. The products' frozen query vectors (`query_vector`, for closeup and home by product)
come from the source the model's training dataset used (the model's `extra.product_query`, recorded
by train), computed by `data.product_query.product_query_vectors` as ingest computes them; a model
saved before that record, or an image source with a product that has no image, gives no query
vectors (a warning says which).
"""


from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itemsage import artifacts, schema
from itemsage.embed.graph_tokens import graph_inputs
from itemsage.embed.shards import DEFAULT_SHARD_ROWS, EmbedSummary, check_out, embed

log = logging.getLogger(__name__)


CATALOG_DIR = "catalog"  # OUT/catalog: the validated catalog of embed_from_catalog


def embed_from_catalog(
    model_dir: str | Path,
    catalog: str | Path,
    out_dir: str | Path,
    batch_size: int = 1024,
    incremental: bool = False,
    progress: bool = True,
    *,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    device: str | None = None,
    image_encoder: Any = None,
    text_encoder: Any = None,
    graph_dir: str | Path | None = None,
    no_graph: bool = False,
) -> tuple[EmbedSummary, int]:
    """Embed a catalog file or directory (Parquet or JSON Lines) without engagement logs.

    Returns (the embed summary, rows rejected). Rejected rows, with their reasons, are in
    `out_dir/catalog/rejects.jsonl`; a catalog whose every row is rejected raises DataError.
    `text_encoder` replaces the built-in TextQueryEncoder for the products' query vectors when the
    model's source is text (as in `ingest`). A model that reads graph tokens needs `graph_dir` (the
    graph of the dataset whose engagements these products have: matched by product id), or
    `no_graph` to embed every product from its content alone; this is checked before anything is written.
    """
    from itemsage.model.model import CONFIG_FILE

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    artifacts.read_manifest(model_dir, kind="model")
    config = artifacts.read_json(model_dir / CONFIG_FILE)
    existed = out_dir.exists()
    model_fp = artifacts.fingerprint(model_dir)
    _, graph_fp = graph_inputs(model_dir, out_dir / CATALOG_DIR, graph_dir, no_graph, catalog=True)
    try:
        rejected = stage_catalog(catalog, out_dir / CATALOG_DIR, text_fields=tuple(config["model"]["text_fields"]),
                                 image_dim=int(config["image_dim"]) or None,
                                 max_images=int(config["model"]["max_images"]), image_encoder=image_encoder,
                                 product_query=config.get("extra", {}).get(schema.PRODUCT_QUERY),
                                 text_encoder=text_encoder,
                                 before_replacing=lambda fp: check_out(out_dir, model_fp, fp, incremental, graph_fp))
    except BaseException:
        if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a refused catalog leaves nothing behind
        raise
    summary = embed(model_dir, out_dir / CATALOG_DIR, out_dir, batch_size, incremental, progress,
                    shard_rows=shard_rows, device=device, graph_dir=graph_dir, no_graph=no_graph)
    return summary, rejected


def stage_catalog(catalog: str | Path, target: str | Path, *, text_fields: tuple[str, ...], image_dim: int | None,
                  max_images: int, image_encoder: Any = None, batch_rows: int = 65_536,
                  product_query: dict[str, Any] | None = None, text_encoder: Any = None,
                  before_replacing: Any = None) -> int:
    """Validate `catalog` into the directory `target` (products.parquet, rejects.jsonl, manifest.json,
    written under a temp name and renamed); returns the rows rejected. Nothing is done when `target`
    already holds this catalog (same input sha256s) checked for the same fields, image width and
    query-vector source. `product_query` ({"source", "fields", "dim"}, the model's record of its
    dataset's): each kept product gets its frozen query vector from that source (`query_vector`, and
    the manifest's `product_query`), see `_add_query_vectors`. `before_replacing(fingerprint)`, given,
    is called with the new catalog's fingerprint before `target` is replaced: raising there (embed's
    refusal of the out directory) leaves `target` as it was."""
    import shutil

    from itemsage.data.ingest import DataError, catalog_sources, check_products
    from itemsage.data.rejects import RejectsFile

    target = Path(target)
    sources = catalog_sources(catalog)
    identity = {"text_fields": list(text_fields), "image_dim": image_dim, "max_images": max_images,
                "product_query": product_query.get("source") if isinstance(product_query, dict) else None}
    inputs = {str(s.path): f"sha256:{artifacts.sha256_file(s.path)}" for s in sources}
    if (target / artifacts.MANIFEST).is_file():
        old = artifacts.read_manifest(target, kind="catalog")
        if old["config"] == identity and old["inputs"] == inputs:
            log.info("%s already holds this catalog, validated; not checking it again", target)
            return int(old["counts"]["rejected"])
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kept = 0
    rejects = None
    try:
        writer = None
        rejects = RejectsFile(tmp / schema.REJECTS_FILE)  # as ingest's: the first 100 rows of each reason
        for table, entries in check_products(catalog, text_fields=text_fields, image_dim=image_dim,
                                             max_images=max_images, batch_rows=batch_rows,
                                             image_encoder=image_encoder, room=rejects.room("catalog")):
            rejects.write("catalog", entries)
            if writer is None:
                writer = pq.ParquetWriter(tmp / schema.PRODUCTS_FILE, table.schema, compression="zstd")
            writer.write_table(table)  # one row group per batch: embed seeks by row group
            kept += table.num_rows
        rejects.close()
        if writer is not None:
            writer.close()
        rejected = sum(rejects.counts.values())
        if refusal := rejects.refusal("catalog", kept + rejected, rejected):
            raise DataError(refusal)
        if rejects.sampled:
            log.info("catalog: %s", rejects.note())
        reasons = rejects.counts
        missing = _without_query_vectors(tmp / schema.PRODUCTS_FILE, product_query) if identity["product_query"] \
            else None
        entry = (_add_query_vectors(tmp / schema.PRODUCTS_FILE, product_query, text_encoder)
                 if identity["product_query"] and not missing else None)
        artifacts.write_manifest(tmp, "catalog", config=identity, inputs=inputs,
                                 counts={"products": kept, "rejected": rejected, "rejects": dict(reasons),
                                         "rejects_written": rejects.written},
                                 files=[schema.PRODUCTS_FILE, schema.REJECTS_FILE],
                                 extra={schema.PRODUCT_QUERY: entry} if entry else
                                 {schema.PRODUCT_QUERY_MISSING: missing} if missing else None)
        if before_replacing is not None:
            before_replacing(artifacts.fingerprint(tmp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        if rejects is not None:
            rejects.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("catalog: %d products kept, %d rejected -> %s", kept, rejected, target)
    return rejected


def _without_query_vectors(path: Path, entry: dict[str, Any]) -> str | None:
    """Why the staged catalog (`path`) cannot have query vectors from `entry["source"]`, logged as a
    warning; None when it can. An image source needs every product's main image (a query_vector column
    has no gaps)."""
    if entry["source"] != "image":
        return None
    table = pq.read_table(path, columns=[schema.PRODUCT_ID, schema.IMAGE_EMBEDDINGS])
    lengths = pc.list_value_length(table.column(schema.IMAGE_EMBEDDINGS)).fill_null(0).to_numpy(zero_copy_only=False)
    missing = np.flatnonzero(lengths == 0)
    if not len(missing):
        return None
    first = table.column(schema.PRODUCT_ID)[int(missing[0])].as_py()
    why = (f"{len(missing):,} of the catalog's products have no image ({len(missing):,} of {len(lengths):,}; the first: "
           f"{first!r}), but "
           "the model's product query vectors are main image vectors (product_query source 'image', from its "
           "training dataset). Give every product an image and re-run `itemsage embed --catalog` and "
           "`itemsage index`")
    log.warning("no product query vectors written, so closeup and home by product id are not served from this "
                "index: %s.", why)
    return why


def _add_query_vectors(path: Path, entry: dict[str, Any], text_encoder: Any = None) -> dict[str, Any]:
    """Append each product's frozen query vector from `entry["source"]` to the staged products.parquet
    (`path`, rewritten row group by row group, so embed still seeks by row group); returns the
    manifest's product_query entry. The caller checked `_without_query_vectors` first."""
    from itemsage.data import product_query

    source = entry["source"]
    if source == "text" and text_encoder is None:  # loaded once here, not once per row group below
        from itemsage.encoders.text import TextQueryEncoder

        text_encoder = TextQueryEncoder()
    parquet = pq.ParquetFile(path)
    out = path.with_name(f".query-{path.name}")
    dim = None
    with contextlib.ExitStack() as stack:
        writer = None
        for g in range(parquet.num_row_groups):
            table = parquet.read_row_group(g)
            block = product_query.product_query_vectors(table, source, text_encoder=text_encoder)  # [b, Dq]
            dim = block.shape[1]
            if dim != int(entry["dim"]):
                raise ValueError(f"the products' {source} query vectors are {dim}-d, but the model was trained on "
                                 f"{entry['dim']}-d ones (its product_query); embed with the encoder it was trained "
                                 "with")
            offsets = pa.array(np.arange(len(block) + 1, dtype=np.int32) * dim)
            table = table.append_column(pa.field(schema.QUERY_VECTOR, pa.list_(pa.float32())),
                                        pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1))))
            if writer is None:
                writer = stack.enter_context(pq.ParquetWriter(out, table.schema, compression="zstd"))
            writer.write_table(table)  # one row group per row group
    os.replace(out, path)
    return product_query.manifest_entry(source, dim)
