"""Embed the catalog: the product tower over every product, in streaming batches (docs/ARCHITECTURE.md).

Output, an embeddings directory:

    part-00000.parquet ...   product_id: string, vector: fixed_size_list<float32, D>, content_hash: string,
                             query_vector: fixed_size_list<float32, Dq> (the product's frozen query
                             vector, copied from products.parquet; absent for datasets made before it)
    manifest.json            kind 'embeddings', written last: model and dataset fingerprints, count, dim,
                             the shard files in catalog order, product_query (source, fields, dim) when
                             the shards carry query vectors, dataset_dir (the dataset's absolute path:
                             `itemsage index` reads the filterable attributes there)

Shards. Shard s holds catalog rows [s * shard_rows, (s + 1) * shard_rows) of products.parquet, in
catalog order. It is streamed into a temp file batch by batch and renamed into place after its last
row, so a shard file exists only when it is complete. A re-run after a kill skips the shards that
exist (seeking to the first missing one by Parquet row group) and redoes the one that was torn: each
product lands in exactly one shard. `progress.json` pins the run's identity (model and dataset
fingerprints, shard_rows, generation) so a resumed run uses the same row ranges, and refuses to mix
shards from another model.

Incremental (`incremental=True`). Given a finished directory from the same model, a new
*generation* of shards is written beside the old one (`part-00000-g1.parquet`, ...) over the current
catalog: products whose `content_hash` equals the old one keep their old vector (copied), new or
changed products go through the tower, products no longer in the catalog simply are not written.
The new manifest (one atomic replace) switches readers to the new generation; the old generation's
files are deleted after it. A kill at any point leaves either the old set or the new set readable,
and the partial new generation resumes like a full run. The lookup of old vectors holds a
product_id -> (old shard, row, content_hash) map in memory (~150 bytes per product), and reads old
shards' vectors with a small cache; that suits catalogs of tens of millions on one machine.

Engines. `embed_batch(model, table) -> table` is a pure function of one batch; `embed` drives it
locally with resume and incremental; embed/ray_engine.py hands it to Ray Data. A catalog without
logs is validated and embedded by embed/catalog.py.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from itemsage import artifacts, schema
from itemsage.artifacts import ArtifactError
from itemsage.config import require
from itemsage.embed.graph_tokens import graph_inputs

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
GRAPH_HASH = "graph_hash"
VECTOR = "vector"
DEFAULT_SHARD_ROWS = 100_000


@dataclasses.dataclass
class EmbedSummary:
    out_dir: Path
    count: int  # products in the finished directory
    dim: int
    shards: int
    embedded: int  # products run through the tower by this call
    reused: int  # incremental: vectors copied from the previous generation
    removed: int  # incremental: products of the previous generation no longer in the catalog
    skipped_shards: int  # shards already complete from an interrupted earlier run
    seconds: float
    model_fingerprint: str
    dataset_fingerprint: str
    generation: int
    unreadable: int = 0  # products the model reads nothing of (no image, no vocabulary token): an empty product's vector

    @property
    def products_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def shard_name(shard: int, generation: int = 0) -> str:
    return f"part-{shard:05d}.parquet" if generation == 0 else f"part-{shard:05d}-g{generation}.parquet"


def output_schema(dim: int, query_dim: int | None = None, popularity: bool = False, graph: bool = False) -> pa.Schema:
    """The shard schema; `query_dim`: the width of the products' frozen query vectors (None: no such
    column); `popularity`: a float32 column of each product's popularity in retrieval units (the
    model's b_p / logit scale, model/popularity.py), for a model with a popularity term; `graph`: a
    `graph_hash` string column (the product's graph tokens' hash, "" when it has none), for a model
    that reads graph tokens, so --incremental re-embeds a product whose graph tokens changed."""
    return pa.schema([
        pa.field(schema.PRODUCT_ID, pa.string(), nullable=False),
        pa.field(VECTOR, pa.list_(pa.float32(), dim), nullable=False),
        pa.field(schema.CONTENT_HASH, pa.string()),
        *([pa.field(schema.QUERY_VECTOR, pa.list_(pa.float32(), query_dim), nullable=False)]
          if query_dim is not None else []),
        *([pa.field(schema.POPULARITY, pa.float32(), nullable=False)] if popularity else []),
        *([pa.field(GRAPH_HASH, pa.string(), nullable=False)] if graph else []),
    ])


def _fixed(vectors: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


def _query_vectors(table: pa.Table) -> np.ndarray | None:
    """The products' frozen query vectors [B, Dq] from products.parquet's list<float32> column, or None
    when the dataset predates them."""
    if schema.QUERY_VECTOR not in table.column_names:
        return None
    column = table.column(schema.QUERY_VECTOR).combine_chunks()
    if table.num_rows == 0:
        return np.zeros((0, 0), np.float32)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or (lengths != lengths[0]).any():
        raise ArtifactError(f"products.parquet's {schema.QUERY_VECTOR} column holds vectors of several widths "
                            "or nulls; re-run `itemsage ingest` to rewrite it.")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, int(lengths[0]))


def _vectors_table(ids: pa.Array, vectors: np.ndarray, hashes: pa.Array, query: np.ndarray | None = None,
                   popularity: np.ndarray | None = None, graph_hashes: list[str] | None = None) -> pa.Table:
    """ids [B], vectors [B, D] float32, hashes [B], query vectors [B, Dq] or None, popularity [B] or
    None, graph hashes [B] or None -> the shard schema."""
    arrays = [ids.cast(pa.string()), _fixed(vectors), hashes.cast(pa.string())]
    if query is not None:
        arrays.append(_fixed(query))
    if popularity is not None:
        arrays.append(pa.array(np.asarray(popularity, np.float32), pa.float32()))
    if graph_hashes is not None:
        arrays.append(pa.array(graph_hashes, pa.string()))
    return pa.Table.from_arrays(arrays, schema=output_schema(
        vectors.shape[1], None if query is None else query.shape[1], popularity is not None, graph_hashes is not None))


def _column_or_nulls(table: pa.Table, name: str) -> pa.Array:
    if name in table.column_names:
        return table.column(name).combine_chunks()
    return pa.nulls(table.num_rows, pa.string())


# ---- the engine-agnostic batch function ---------------------------------------------------------


def embed_batch(model: Any, batch: pa.RecordBatch | pa.Table, graph: Any = None) -> pa.Table:
    """Products (dataset format, B rows) -> table of product_id, vector [B, D] float32, content_hash
    (and query_vector [B, Dq], copied, when the products have it; popularity [B] for a model with a
    popularity term; graph_hash [B] for a model that reads graph tokens).

    `model` is an `itemsage.model.LoadedModel`; `graph`: the products' graph tokens by id
    (model.batch.GraphInputs) for a model that reads them. Pure: the same rows give the same vectors
    whatever batch they come in (up to float rounding), which is what lets any engine split the catalog.
    """
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    ids = table.column(schema.PRODUCT_ID).combine_chunks()
    hashes = _column_or_nulls(table, schema.CONTENT_HASH)
    vectors = (model.embed_table(table, graph) if table.num_rows  # [B, D] unit rows
               else np.zeros((0, model.config.out_dim), np.float32))
    id_list = ids.to_pylist()
    return _vectors_table(ids, vectors, hashes, _query_vectors(table), model.popularity(vectors, id_list),
                          _graph_hashes(model, graph, id_list))


def _graph_hashes(model: Any, graph: Any, product_ids: list[str]) -> list[str] | None:
    """The products' graph hashes for a model that reads graph tokens ("" without), else None."""
    if not model.reads_graph:
        return None
    return graph.hashes_of(product_ids) if graph is not None else [""] * len(product_ids)


# ---- the local engine: resumable, incremental ---------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    return artifacts.read_json(path) if path.is_file() else None


def _row_pieces(parquet: pq.ParquetFile, first_row: int, batch_size: int, shard_rows: int,
                columns: list[str]) -> Iterator[tuple[int, int, pa.Table]]:
    """(shard, global start row, table) pieces of at most batch_size rows, never crossing a shard
    boundary, from the row group holding `first_row` on (earlier row groups are not read)."""
    meta = parquet.metadata
    starts = np.concatenate([[0], np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])])
    group = int(np.searchsorted(starts, first_row, side="right") - 1) if meta.num_row_groups else 0
    row = int(starts[group]) if meta.num_row_groups else 0
    batches = parquet.iter_batches(batch_size=batch_size, columns=columns,
                                   row_groups=list(range(group, meta.num_row_groups)))
    for record_batch in batches:
        table = pa.Table.from_batches([record_batch])
        offset = 0
        while offset < table.num_rows:
            shard = (row + offset) // shard_rows
            take = min(table.num_rows - offset, (shard + 1) * shard_rows - (row + offset))
            yield shard, row + offset, table.slice(offset, take)
            offset += take
        row += table.num_rows


class _OldVectors:
    """The previous generation, for incremental runs: product_id -> (shard, row, content_hash and,
    for a model that reads graph tokens, graph_hash), and vectors read from its shards on demand (a
    small cache; shards are visited roughly in order)."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.shards: list[str] = list(manifest["shards"])
        self.where: dict[str, tuple[int, int, str | None]] = {}
        for s, name in enumerate(self.shards):
            has_graph = GRAPH_HASH in pq.read_schema(out_dir / name).names
            table = pq.read_table(out_dir / name, columns=[schema.PRODUCT_ID, schema.CONTENT_HASH]
                                  + ([GRAPH_HASH] if has_graph else []))
            keys = table.column(1).to_pylist()
            if has_graph:  # a product is unchanged when its content and its graph tokens are
                keys = [None if h is None else f"{h}|{g}" for h, g in zip(keys, table.column(2).to_pylist())]
            for row, (pid, h) in enumerate(zip(table.column(0).to_pylist(), keys)):
                self.where[pid] = (s, row, h)
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def vectors(self, shard: int) -> np.ndarray:
        if shard not in self._cache:
            column = pq.read_table(self.out_dir / self.shards[shard], columns=[VECTOR]).column(VECTOR)
            dim = column.type.list_size
            values = pa.chunked_array([c.flatten() for c in column.chunks], pa.float32()).to_numpy()
            self._cache[shard] = values.reshape(-1, dim)  # [rows, D]
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard)
        return self._cache[shard]


def _embed_piece(model: Any, piece: pa.Table, old: _OldVectors | None,
                 graph: Any = None) -> tuple[pa.Table, int, int]:
    """(output table, products embedded, vectors reused) for one piece of the catalog."""
    if old is None:
        return embed_batch(model, piece, graph), piece.num_rows, 0
    ids = piece.column(schema.PRODUCT_ID).to_pylist()
    hashes = piece.column(schema.CONTENT_HASH).to_pylist()
    graph_hashes = _graph_hashes(model, graph, ids)
    if graph_hashes is not None:
        hashes = [None if h is None else f"{h}|{g}" for h, g in zip(hashes, graph_hashes)]
    found = [old.where.get(pid) for pid in ids]
    keep = np.array([f is not None and h is not None and f[2] == h for f, h in zip(found, hashes)], dtype=bool)
    vectors = np.empty((piece.num_rows, model.config.out_dim), dtype=np.float32)  # [B, D]
    for i in np.flatnonzero(keep):
        s, row, _ = found[i]
        vectors[i] = old.vectors(s)[row]
    todo = np.flatnonzero(~keep)
    if len(todo):
        fresh = embed_batch(model, piece.take(pa.array(todo)), graph)
        values = fresh.column(VECTOR).combine_chunks().flatten().to_numpy()
        vectors[todo] = values.reshape(len(todo), -1)
    # Popularity follows from the vector and the id (model/popularity.py): reused rows get it again.
    table = _vectors_table(piece.column(schema.PRODUCT_ID).combine_chunks(), vectors,
                           piece.column(schema.CONTENT_HASH).combine_chunks(), _query_vectors(piece),
                           model.popularity(vectors, ids), graph_hashes)
    return table, len(todo), int(keep.sum())


def _product_query(dataset_dir: Path, parquet: pq.ParquetFile) -> dict[str, Any] | None:
    """The dataset manifest's product_query entry when products.parquet carries query vectors, else None."""
    entry = artifacts.read_manifest(dataset_dir).get(schema.PRODUCT_QUERY)
    if schema.QUERY_VECTOR not in parquet.schema_arrow.names or not isinstance(entry, dict):
        return None
    return entry


def _missing_query_vectors(dataset_dir: Path) -> dict[str, Any]:
    """The dataset's record of why its products have no query vectors (embed --catalog), carried on."""
    why = artifacts.read_manifest(dataset_dir).get(schema.PRODUCT_QUERY_MISSING)
    return {schema.PRODUCT_QUERY_MISSING: why} if isinstance(why, str) else {}


def _after_shard(shard: int) -> None:
    """Called after each shard is complete (tests patch it to simulate a kill)."""


def check_out(out_dir: Path, model_fp: str, dataset_fp: str, incremental: bool,
              graph_fp: str | None = None) -> dict[str, Any] | None:
    """Refuse (ArtifactError) an `out_dir` this run must not write into, reading only: embeddings or a
    partial run of another model, finished embeddings of another catalog without `incremental`, shards
    of no itemsage run. Returns its finished manifest, if any. `embed --catalog` calls it before it
    replaces OUT/catalog, so a refused run changes nothing. `graph_fp`: the graph artifact the products'
    graph tokens come from (a model that reads them); other graph tokens make another catalog version."""
    finished = None
    if (out_dir / artifacts.MANIFEST).is_file():
        finished = artifacts.read_manifest(out_dir, kind="embeddings")
        old_model = finished["inputs"].get("model")
        if old_model != model_fp:
            raise ArtifactError(
                f"{out_dir} holds embeddings from model {old_model}, this run uses model {model_fp}; "
                "vectors of two models must never be mixed. Pass a new --out directory.")
        if not _same_input(finished, dataset_fp, graph_fp) and not incremental:
            raise ArtifactError(
                f"{out_dir} holds finished embeddings of another version of the catalog (dataset "
                f"{finished['inputs'].get('dataset')}, graph {finished['inputs'].get('graph')}; now {dataset_fp}, "
                f"graph {graph_fp}). Pass --incremental to update them, or a new --out directory to embed "
                "from scratch.")
    pending = _read_json(out_dir / PROGRESS_FILE)
    if finished is None and pending is None and any(out_dir.glob("part-*.parquet")):
        raise ArtifactError(f"{out_dir} holds part-*.parquet files but no {PROGRESS_FILE} or manifest of an "
                            "itemsage embed run; refusing to overwrite them. Pass an empty --out directory.")
    if pending is not None and pending.get("model") != model_fp:
        raise ArtifactError(
            f"{out_dir} holds a partial run of model {pending.get('model')}, this run uses model "
            f"{model_fp}; shards of two models must never be mixed. Pass a new --out directory "
            f"(or delete {out_dir} to start over).")
    return finished


def _same_input(finished: dict[str, Any], dataset_fp: str, graph_fp: str | None) -> bool:
    return finished["inputs"].get("dataset") == dataset_fp and finished["inputs"].get("graph") == graph_fp


def _plan(out_dir: Path, model_fp: str, dataset_fp: str, incremental: bool, shard_rows: int,
          graph_fp: str | None = None) -> tuple[dict[str, Any] | None, int, int] | None:
    """Decide from what `out_dir` holds what this run is: None when it is already complete, else
    (finished manifest of the previous generation or None, generation to write, shard_rows).
    Refuses to mix models (`check_out`); pins the run's identity in progress.json so a kill can be resumed."""
    finished = check_out(out_dir, model_fp, dataset_fp, incremental, graph_fp)
    if finished is not None and _same_input(finished, dataset_fp, graph_fp):
        (out_dir / PROGRESS_FILE).unlink(missing_ok=True)  # left if a run died right after its manifest
        _remove_unreferenced(out_dir, keep=set(finished["shards"]))
        return None
    if finished is None and incremental:
        log.info("%s holds no finished embeddings; embedding the whole catalog", out_dir)
    generation = finished["generation"] + 1 if finished is not None else 0

    identity = {"model": model_fp, "dataset": dataset_fp, "graph": graph_fp, "generation": generation,
                "base": artifacts.fingerprint(out_dir) if finished is not None else None}
    pending = _read_json(out_dir / PROGRESS_FILE)
    if pending is not None and {k: pending.get(k) for k in identity} == identity:
        shard_rows = int(pending["shard_rows"])  # the row ranges of the run being resumed
    else:
        if pending is not None:  # a partial run over an older catalog: no manifest refers to its shards
            log.info("discarding a partial run over another catalog version in %s", out_dir)
        _remove_unreferenced(out_dir, keep=set(finished["shards"]) if finished else set())
        artifacts.atomic_write_json(out_dir / PROGRESS_FILE, {**identity, "shard_rows": shard_rows})
    for stale in out_dir.glob(".part-*.tmp"):  # temp files of a killed writer
        stale.unlink()
    return finished, generation, shard_rows


def embed(
    model_dir: str | Path,
    dataset_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 1024,
    incremental: bool = False,
    progress: bool = True,
    *,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    device: str | None = None,
    graph_dir: str | Path | None = None,
    no_graph: bool = False,
) -> EmbedSummary:
    """Embed every product of `dataset_dir/products.parquet` into `out_dir` (see the module doc).

    Re-running after a kill resumes; re-running on a finished directory with the same model and
    dataset does nothing; `incremental` re-embeds only new or changed products (content, or graph
    tokens after a graph refresh). A model that reads graph tokens takes them from `graph_dir`
    (default DATASET/graph, `itemsage graph`), or from none with `no_graph` (content alone).
    """
    from itemsage.model.model import load_model

    require(isinstance(batch_size, int) and batch_size >= 1, f"embed.batch_size must be >= 1, got {batch_size!r}")
    require(isinstance(shard_rows, int) and shard_rows >= 1, f"embed.shard_rows must be >= 1, got {shard_rows!r}")
    model_dir, dataset_dir, out_dir = Path(model_dir), Path(dataset_dir), Path(out_dir)
    products = dataset_dir / schema.PRODUCTS_FILE
    if not products.is_file():
        raise FileNotFoundError(f"{products} does not exist; write the dataset with `itemsage ingest`.")
    started = time.perf_counter()
    model_fp = artifacts.fingerprint(model_dir)  # reads the manifest only; load_model verifies files
    staged = artifacts.read_manifest(dataset_dir).get("kind") == "catalog"  # embed --catalog's checked copy
    # Refuses an unfinished or corrupted dataset, naming the file.
    artifacts.verify_dataset(dataset_dir, kind="catalog" if staged else "dataset")
    dataset_fp = artifacts.fingerprint(dataset_dir)
    parquet = pq.ParquetFile(products)
    if incremental and schema.CONTENT_HASH not in parquet.schema_arrow.names:
        raise ArtifactError(f"{products} has no {schema.CONTENT_HASH} column, so --incremental cannot "
                            "tell changed products; re-run `itemsage ingest`, which writes it.")
    graph, graph_fp = graph_inputs(model_dir, dataset_dir, graph_dir, no_graph, staged)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(out_dir, model_fp, dataset_fp, incremental, shard_rows, graph_fp)
    if plan is None:
        manifest = artifacts.read_manifest(out_dir, kind="embeddings")
        log.info("%s is already complete for this model and dataset; nothing to do", out_dir)
        return EmbedSummary(out_dir, manifest["count"], manifest["dim"], len(manifest["shards"]), 0, 0, 0,
                            len(manifest["shards"]), time.perf_counter() - started, model_fp, dataset_fp,
                            manifest["generation"], manifest["counts"].get("unreadable", 0))
    finished, generation, shard_rows = plan

    model = load_model(model_dir, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dim = model.config.out_dim
    old = _OldVectors(out_dir, finished) if finished is not None else None
    num_rows = parquet.metadata.num_rows
    num_shards = -(-num_rows // shard_rows)
    names = [shard_name(s, generation) for s in range(num_shards)]
    done = {s for s, name in enumerate(names) if (out_dir / name).is_file()}  # files appear only complete
    first_missing = next((s for s in range(num_shards) if s not in done), num_shards)
    columns = [c for c in parquet.schema_arrow.names
               if c in (schema.PRODUCT_ID, schema.IMAGE_EMBEDDINGS, schema.CONTENT_HASH, schema.QUERY_VECTOR,
                        *model.config.text_fields)]
    product_query = _product_query(dataset_dir, parquet)
    query_dim = product_query["dim"] if product_query else None
    if done:
        log.info("resuming: %d of %d shards already complete", len(done), num_shards)

    embedded = reused = 0
    with _progress_bar(progress) as bar:
        task = bar.add_task("embedding products", total=num_rows,
                            completed=sum(min(shard_rows, num_rows - s * shard_rows) for s in done))
        pieces = _row_pieces(parquet, first_missing * shard_rows, batch_size, shard_rows, columns)
        for shard, shard_pieces in itertools.groupby(pieces, key=lambda p: p[0]):
            if shard in done:
                continue
            # The shard streams into a temp file and is renamed into place after its last row.
            with artifacts.atomic_path(out_dir / names[shard]) as tmp:
                with pq.ParquetWriter(tmp, output_schema(dim, query_dim, model.has_popularity,
                                                         model.reads_graph)) as writer:
                    for _, _, piece in shard_pieces:
                        table, n_embedded, n_reused = _embed_piece(model, piece, old, graph)
                        writer.write_table(table)
                        embedded += n_embedded
                        reused += n_reused
                        bar.advance(task, piece.num_rows)
            _after_shard(shard)

    # All shards exist: the manifest (written last, atomically) makes the directory finished and
    # switches readers to this generation; then the previous generation's files go.
    removed = len(old.where) - sum(pid in old.where for pid in _catalog_ids(parquet)) if old else 0
    unreadable = count_unreadable(model, parquet)
    artifacts.write_manifest(
        out_dir, "embeddings",
        config={"batch_size": batch_size, "shard_rows": shard_rows},
        inputs={"model": model_fp, "dataset": dataset_fp, **({"graph": graph_fp} if graph_fp else {})},
        counts={"products": num_rows, "unreadable": unreadable},
        files=names,
        extra={"count": num_rows, "dim": dim, "shards": names, "generation": generation,
               schema.POPULARITY: model.has_popularity,
               # where `itemsage index` reads the products' filterable attributes (index/build.py)
               "dataset_dir": str(dataset_dir.resolve()),
               **({schema.PRODUCT_QUERY: product_query} if product_query else
                  _missing_query_vectors(dataset_dir))},
    )
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)
    _remove_unreferenced(out_dir, keep=set(names))
    seconds = time.perf_counter() - started
    log.info("embedded %d products (%d reused, %d removed) into %s in %.1f s", embedded, reused,
             removed, out_dir, seconds)
    return EmbedSummary(out_dir, num_rows, dim, num_shards, embedded, reused, removed,
                        len(done), seconds, model_fp, dataset_fp, generation, unreadable)


def count_unreadable(model: Any, parquet: pq.ParquetFile) -> int:
    """How many of the catalog's products `model` reads nothing of (no image, no text token in its
    vocabulary: `LoadedModel.unreadable`), each embedded as an empty product; logs a warning naming
    the first ones. A pass over the text fields and image lists, without the tower."""
    names = parquet.schema_arrow.names
    columns = [c for c in (schema.PRODUCT_ID, schema.IMAGE_EMBEDDINGS, *model.config.text_fields) if c in names]
    count, first = 0, []
    for batch in parquet.iter_batches(batch_size=65_536, columns=columns):
        table = pa.Table.from_batches([batch])
        rows = np.flatnonzero(model.unreadable(table))
        count += len(rows)
        first += table.column(schema.PRODUCT_ID).take(pa.array(rows[:3 - len(first)])).to_pylist() if len(first) < 3 else []
    if count:
        log.warning("%d of %d products (%.1f%%) have no image and no word the model's vocabulary knows (e.g. %s): "
                    "the model reads nothing of them, so each has exactly the vector of an empty product. A catalog "
                    "in another language than the training catalog's does this; train a model on it.", count,
                    parquet.metadata.num_rows, 100 * count / max(1, parquet.metadata.num_rows), ", ".join(first))
    return count



def _catalog_ids(parquet: pq.ParquetFile) -> Iterator[str]:
    for record_batch in parquet.iter_batches(columns=[schema.PRODUCT_ID]):
        yield from record_batch.column(0).to_pylist()


def _remove_unreferenced(out_dir: Path, keep: set[str]) -> None:
    """Delete shard files no manifest or current run refers to (an old generation, a discarded run)."""
    for path in out_dir.glob("part-*.parquet"):
        if path.name not in keep:
            path.unlink()


def _progress_bar(enabled: bool):
    from itemsage.progress import progress_bar

    return progress_bar(enabled, unit="products")


