"""`itemsage index`: an embeddings directory (verified against its manifest) -> a new index version,
its searches tuned and its recall measured, published as CURRENT. A re-run with the same --version
publishes a version that was finished but not yet made CURRENT.

The version stores the products' filterable attributes (index/attributes.py) read from:
- `attributes=PATH` (`--attributes`): a dataset or catalog directory holding products.parquet
  (`itemsage ingest`, `itemsage embed --catalog`'s OUT/catalog), or a catalog file or directory
  (Parquet or JSON Lines) with a product_id column; joined to the index by product id;
- by default, the dataset the embeddings were made from: `itemsage embed` records its directory in
  the embeddings manifest (`dataset_dir`); it is used when it is still there and unchanged (its
  fingerprint is the one embed read); a changed one is refused (re-embed, or name it with
  `--attributes` to read it as it is now); embeddings made before that record have none.
`filterable` (`--filterable a,b`) picks the columns; by default every string, list-of-strings,
number, boolean and time column but ids, hashes and free text (title, description, links).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.config import require
from itemsage.index.config import IndexConfig
from itemsage.index.attributes import filterable_columns
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.versions import claim_new_version, publish, release_claim, version_path
from itemsage.schema import POPULARITY, PRODUCT_ID, PRODUCT_QUERY, PRODUCT_QUERY_MISSING, PRODUCTS_FILE, QUERY_VECTOR

log = logging.getLogger(__name__)


# ---- from an embeddings directory (the `itemsage index` command) --------------------------------


def read_embeddings(embeddings_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(ids [N] str, vectors [N, D] float32, manifest) of a finished, verified embeddings directory."""
    embeddings_dir = Path(embeddings_dir)
    manifest = artifacts.verify_manifest(embeddings_dir, kind="embeddings")
    shards = manifest.get("shards") or sorted(name for name in manifest["files"] if name.endswith(".parquet"))
    dim = int(manifest["dim"])
    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    for name in shards:
        table = pq.read_table(embeddings_dir / name, columns=[PRODUCT_ID, "vector"])
        ids.append(np.asarray(table.column(PRODUCT_ID).to_pylist(), dtype=object))
        flat = pa.chunked_array(
            [chunk.flatten() for chunk in table.column("vector").chunks], type=pa.float32()
        ).to_numpy()
        vectors.append(flat.reshape(len(table), dim))  # [rows, D]
    all_ids = np.concatenate(ids) if ids else np.empty(0, dtype=object)
    all_vectors = np.concatenate(vectors) if vectors else np.empty((0, dim), dtype=np.float32)
    if len(all_ids) != manifest.get("count"):
        raise ArtifactError(f"{embeddings_dir} holds {len(all_ids)} vectors, its manifest says "
                            f"{manifest.get('count')}; re-run `itemsage embed`.")
    return all_ids, np.ascontiguousarray(all_vectors, dtype=np.float32), manifest


def read_query_vectors(embeddings_dir: str | Path, manifest: dict[str, Any]) -> np.ndarray | None:
    """The products' frozen query vectors [N, Dq] float32 of a verified embeddings directory, in
    `read_embeddings`' row order; None when its shards predate them."""
    embeddings_dir = Path(embeddings_dir)
    entry = manifest.get(PRODUCT_QUERY)
    if not isinstance(entry, dict):
        return None
    dq = int(entry["dim"])
    shards = manifest.get("shards") or sorted(name for name in manifest["files"] if name.endswith(".parquet"))
    blocks = []
    for name in shards:
        if QUERY_VECTOR not in pq.read_schema(embeddings_dir / name).names:
            raise ArtifactError(f"{embeddings_dir}/{name} has no {QUERY_VECTOR} column but the manifest lists "
                                f"{PRODUCT_QUERY}; re-run `itemsage embed`.")
        column = pq.read_table(embeddings_dir / name, columns=[QUERY_VECTOR]).column(QUERY_VECTOR)
        flat = pa.chunked_array([chunk.flatten() for chunk in column.chunks], type=pa.float32()).to_numpy()
        blocks.append(flat.reshape(len(column), dq))  # [rows, Dq]
    return np.concatenate(blocks) if blocks else np.zeros((0, dq), np.float32)


def read_popularity(embeddings_dir: str | Path, manifest: dict[str, Any]) -> np.ndarray | None:
    """The products' popularity in retrieval units [N] float32 (model/popularity.py) of a verified
    embeddings directory, in `read_embeddings`' row order; None for a model without the term."""
    if not manifest.get(POPULARITY):
        return None
    embeddings_dir = Path(embeddings_dir)
    shards = manifest.get("shards") or sorted(name for name in manifest["files"] if name.endswith(".parquet"))
    blocks = []
    for name in shards:
        if POPULARITY not in pq.read_schema(embeddings_dir / name).names:
            raise ArtifactError(f"{embeddings_dir}/{name} has no {POPULARITY} column but the manifest says the "
                                "model has a popularity term; re-run `itemsage embed`.")
        blocks.append(pq.read_table(embeddings_dir / name, columns=[POPULARITY]).column(POPULARITY)
                      .to_numpy().astype(np.float32))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


# ---- the filterable attributes ---------------------------------------------------------------------


def attribute_source(embeddings_dir: str | Path, manifest: dict[str, Any],
                     attributes: str | Path | None) -> Path | None:
    """Where the attributes come from (see the module doc); None: nowhere (no filterable columns)."""
    if attributes is not None:
        path = Path(attributes)
        if not path.exists():
            raise ArtifactError(f"--attributes {path} does not exist; give a dataset directory or a catalog")
        return path
    recorded = manifest.get("dataset_dir")
    if not recorded:
        log.warning("%s does not name the dataset it was embedded from (made before embed recorded it): the index "
                    "stores no filterable attributes; give --attributes DATASET_OR_CATALOG to add them", embeddings_dir)
        return None
    dataset = Path(recorded)
    if not (dataset / artifacts.MANIFEST).is_file():
        log.warning("the dataset %s that %s was embedded from is gone: the index stores no filterable attributes; "
                    "give --attributes PATH to read them from elsewhere", dataset, embeddings_dir)
        return None
    now = artifacts.fingerprint(dataset)
    if now != manifest.get("inputs", {}).get("dataset"):
        raise ArtifactError(f"the dataset {dataset} changed since {embeddings_dir} was embedded from it (fingerprint "
                            f"{manifest.get('inputs', {}).get('dataset')}, now {now}); re-run `itemsage embed`, or "
                            "give --attributes to read its attributes as they are now")
    return dataset


def read_attributes(source: Path, ids: np.ndarray, columns: list[str] | None) -> pa.Table:
    """The attribute columns of `source` for `ids` [N], in their order (a product it lacks: nulls)."""
    if source.is_dir() and (source / PRODUCTS_FILE).is_file():
        files = [source / PRODUCTS_FILE]
    else:
        from itemsage.data.readers import input_files

        files = [src.path for src in input_files(source, "attributes")]
    tables = []
    for path in files:
        if path.suffix.lower() in (".jsonl", ".json"):
            import pyarrow.json as pj

            tables.append(pj.read_json(path))
        else:
            tables.append(pq.read_table(path))
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    if PRODUCT_ID not in table.column_names:
        raise ArtifactError(f"{source} has no {PRODUCT_ID} column to join attributes to the index by")
    schema = pa.schema([f for f in table.schema if f.name != PRODUCT_ID])
    names = filterable_columns(schema, columns)
    source_ids = table.column(PRODUCT_ID).cast(pa.string())
    where = pc.index_in(pa.array(ids.tolist(), pa.string()), value_set=source_ids)  # [N] row in source, null: none
    missing = where.null_count
    if missing:
        log.warning("%d of %d indexed products are not in %s: their attributes are empty (no filter value passes "
                    "them)", missing, len(ids), source)
    out = table.select(names).take(where)
    log.info("filterable attributes from %s: %s", source, ", ".join(names) or "none")
    return out


def _finished_version(embeddings_dir: str | Path, index_root: str | Path, version_dir: Path,
                      config: IndexConfig, publish_it: bool) -> tuple[ProductIndex, Path]:
    """The existing `version_dir`, published, if it is what this build would write; else an error."""
    manifest = artifacts.read_manifest(version_dir, kind="index")
    embeddings = artifacts.fingerprint(embeddings_dir)
    same_input = manifest.get("inputs", {}).get("embeddings") == embeddings
    # threads: speed only; IVF-PQ sizes given as 0 ("from the catalog") were resolved in the saved config
    given = {k: v for k, v in dataclasses.asdict(config).items()
             if k != "threads" and not (k in ("nlist", "pq_m", "nprobe") and v == 0)}
    built = manifest.get("config", {})
    if not same_input or {k: built.get(k) for k in given} != given:
        what = "other embeddings" if not same_input else "other index options"
        raise ArtifactError(f"index version {version_dir} already exists, built from {what}; an index version is "
                            "never overwritten. Pass another --version name.")
    index = ProductIndex.load(version_dir)  # verifies every file against the manifest
    log.info("index version %s is already built from these embeddings; verified it", version_dir.name)
    if publish_it:
        publish(index_root, version_dir)
    return index, version_dir


def build_from_embeddings(
    embeddings_dir: str | Path,
    index_root: str | Path,
    config: IndexConfig | None = None,
    *,
    version: str | None = None,
    publish_it: bool = True,
    attributes: str | Path | None = None,
    filterable: list[str] | None = None,
) -> tuple[ProductIndex, Path]:
    """Index a finished embeddings directory into INDEX_ROOT/versions/<version>/ and publish it.

    `attributes`, `filterable`: where the filterable columns come from and which (module doc).
    Re-running with the name of a finished version built from the same embeddings and config (a run
    killed after its manifest, before CURRENT) verifies that version and publishes it, without a rebuild.
    """
    config = config or IndexConfig()
    version_dir = version_path(index_root, version) if version is not None else None
    if version_dir is not None and (version_dir / artifacts.MANIFEST).exists():
        return _finished_version(embeddings_dir, index_root, version_dir, config, publish_it)
    ids, vectors, emb_manifest = read_embeddings(embeddings_dir)
    require(len(ids) > 0, f"{embeddings_dir} holds no embeddings; nothing to index")
    query_vectors = read_query_vectors(embeddings_dir, emb_manifest)
    if emb_manifest.get(POPULARITY):
        log.warning("%s carries the model's popularity term, which this index does not keep: it and the service "
                    "rank by the embeddings alone (evaluate's exact figures include the term; docs/METHOD.md, "
                    "'The popularity term')", embeddings_dir)
    source = attribute_source(embeddings_dir, emb_manifest, attributes)
    table = read_attributes(source, ids, filterable) if source is not None else None
    index = ProductIndex.build(ids, vectors, **dataclasses.asdict(config), query_vectors=query_vectors,
                               product_query=emb_manifest.get(PRODUCT_QUERY) if query_vectors is not None else None,
                               attributes=table)
    inputs = {"embeddings": artifacts.fingerprint(embeddings_dir)}
    if source is not None:
        inputs["attributes"] = str(source.resolve())
    model_fp = emb_manifest.get("inputs", {}).get("model")
    if model_fp:
        inputs["model"] = model_fp
    missing = emb_manifest.get(PRODUCT_QUERY_MISSING) if query_vectors is None else None
    extra = {PRODUCT_QUERY_MISSING: missing} if isinstance(missing, str) else None  # why: for the service's 409
    if version_dir is None:  # a generated name, unique: a build in the same second gets another one
        version_dir = claim_new_version(index_root)
        try:
            index.save(version_dir, inputs=inputs, extra=extra)
        except BaseException:
            release_claim(version_dir)
            raise
    else:
        index.save(version_dir, inputs=inputs, extra=extra)
    if publish_it:
        publish(index_root, version_dir)
    return index, version_dir
