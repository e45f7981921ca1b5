"""The graph artifact: `DATASET/graph/` (or `itemsage graph --out DIR`), its files and its reader.

A directory written whole as `<out>.tmp-<pid>` and renamed into place at the end
(`artifacts.temp_dir` / `publish_dir`), ending with a `manifest.json` (kind `graph`) that lists the
sha256 of every file; the reader verifies them before use. Files:

- `features.parquet`: one row per product, in products.parquet's row order:
  `product_id: string`, `graph_tokens: fixed_size_list<float16>[G*D]` (G tokens of width D, each a
  unit row, zeros where masked), `graph_mask: fixed_size_list<bool>[G]` (True = the token exists),
  `graph_hash: string` (see `graph_hash`; "" for a product with no token).
- `neighbours.parquet` (optional, config `neighbours`): `product_id: string`, `neighbour_rows:
  list<int32>` (rows of features.parquet, most visited first), `visits: list<float32>`.

The model reads the features through `read_graph_features`; nothing else about the files is its
business.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itemsage import artifacts
from itemsage.artifacts import ArtifactError

log = logging.getLogger(__name__)

KIND = "graph"
GRAPH_FORMAT = 1  # the layout of the files below; the manifest's own format is artifacts.FORMAT_VERSION
GRAPH_DIR = "graph"  # the default location, inside the dataset directory (beside query_cache/, ceiling/)
FEATURES_FILE = "features.parquet"
NEIGHBOURS_FILE = "neighbours.parquet"
PRODUCT_ID, TOKENS, MASK, HASH = "product_id", "graph_tokens", "graph_mask", "graph_hash"
NEIGHBOUR_ROWS, VISITS = "neighbour_rows", "visits"


def graph_dir_of(dataset_dir: str | Path) -> Path:
    """A dataset's default graph directory: DATASET/graph."""
    return Path(dataset_dir) / GRAPH_DIR


@dataclass
class GraphFeatures:
    """A graph artifact's features in memory, row i = products.parquet's row i.

    Axes: N products, G tokens (`names`), D width (`dim`)."""

    ids: np.ndarray  # [N] object (str)
    tokens: np.ndarray  # [N, G, D] float16: unit rows where mask, zeros elsewhere
    mask: np.ndarray  # [N, G] bool: True = the token exists (read it), False = zeros (do not)
    hashes: np.ndarray  # [N] object (str): graph_hash, "" where the product has no token
    names: tuple[str, ...]  # [G] token names, in order
    dim: int  # D
    manifest: dict[str, Any] = field(repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def float32(self, rows: Any = None) -> np.ndarray:
        """[len(rows), G, D] float32 copy of the tokens of `rows` (an index array, a slice, or None: all)."""
        return np.asarray(self.tokens if rows is None else self.tokens[rows], dtype=np.float32)


# ---- writing (into a temporary directory that build.py publishes whole) ------------------------------


def features_schema(g: int, d: int) -> Any:
    import pyarrow as pa

    return pa.schema([(PRODUCT_ID, pa.string()), (TOKENS, pa.list_(pa.float16(), g * d)),
                      (MASK, pa.list_(pa.bool_(), g)), (HASH, pa.string())])


def write_features(path: Path, ids: Any, blocks: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
                   g: int, d: int) -> None:
    """features.parquet from (first row, tokens [B, G, D] float16, mask [B, G], hashes [B]) blocks in
    row order, one row group per block (only one block in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = features_schema(g, d)
    # no dictionary, no statistics: every value is distinct, and a list's min/max says nothing (4x less CPU)
    with artifacts.atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, use_dictionary=False,
                                                               write_statistics=False) as writer:
        for lo, tokens, mask, hashes in blocks:
            b = len(mask)
            writer.write_table(pa.table([
                ids[lo:lo + b],
                # float16 values by their buffer (pa.array converts float16 value by value: 0.2 s per block)
                pa.FixedSizeListArray.from_arrays(pa.Array.from_buffers(
                    pa.float16(), tokens.size, [None, pa.py_buffer(np.ascontiguousarray(tokens, "<f2"))]), g * d),
                pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), g),
                pa.array(hashes, pa.string()),
            ], schema=schema))


def write_neighbours(path: Path, ids: Any, matrix: Any) -> None:
    """neighbours.parquet from a [N, N] CSR of visit counts: per product its neighbours' rows, most
    visited first (ties: the lower row), and their counts."""
    import pyarrow as pa

    matrix = matrix.tocsr()
    matrix.sort_indices()
    n = matrix.shape[0]
    # one stable sort of a 64-bit key: the row, then the float32 count's bits reversed (counts >= 0: larger
    # first); equal counts keep the column order
    row = np.repeat(np.arange(n, dtype=np.uint64), np.diff(matrix.indptr))
    bits = np.uint32(0xFFFFFFFF) - matrix.data.astype(np.float32).view(np.uint32)
    order = np.argsort((row << np.uint64(32)) | bits.astype(np.uint64), kind="stable")
    offsets = pa.array(matrix.indptr.astype(np.int32))
    table = pa.table({PRODUCT_ID: ids,
                      NEIGHBOUR_ROWS: pa.ListArray.from_arrays(offsets, pa.array(matrix.indices[order].astype(np.int32))),
                      VISITS: pa.ListArray.from_arrays(offsets, pa.array(matrix.data[order].astype(np.float32)))})
    artifacts.atomic_write_parquet(path, table, use_dictionary=[PRODUCT_ID], write_statistics=False)


def read_neighbours(graph_dir: str | Path, dataset_fingerprint: str | None = None) -> tuple[np.ndarray, Any]:
    """A graph directory's neighbours.parquet, verified: (product ids [N] object, [N, N] float32 CSR of
    visit counts, row i = product i's top-T walk neighbours). ArtifactError when it was not written."""
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    graph_dir = Path(graph_dir)
    manifest = read_manifest(graph_dir, dataset_fingerprint)
    if NEIGHBOURS_FILE not in manifest["files"]:
        raise ArtifactError(f"{graph_dir} was built without neighbour lists (graph.neighbours = false); build it "
                            "again with neighbours = true in the [graph] table of a --config file.")
    table = pq.read_table(graph_dir / NEIGHBOURS_FILE)
    rows, visits = table[NEIGHBOUR_ROWS].combine_chunks(), table[VISITS].combine_chunks()
    n = len(table)
    offsets = rows.offsets.to_numpy()
    matrix = sp.csr_matrix((visits.flatten().to_numpy(), rows.flatten().to_numpy(), offsets - offsets[0]),
                           shape=(n, n))
    return table[PRODUCT_ID].to_numpy(), matrix


def _refuse_other_dataset(graph_dir: Path, manifest: dict[str, Any], dataset_fingerprint: str) -> None:
    built_from = manifest.get("inputs", {}).get("dataset")
    if built_from != dataset_fingerprint:
        default = graph_dir.name == GRAPH_DIR
        raise ArtifactError(
            f"{graph_dir} holds the graph features of another dataset (built from dataset {built_from}, this "
            f"dataset is {dataset_fingerprint}): the dataset was re-ingested or the graph belongs elsewhere. "
            f"Run `itemsage graph DATASET{'' if default else f' --out {graph_dir}'}` to build them for this "
            "dataset.")


def read_manifest(graph_dir: str | Path, dataset_fingerprint: str | None = None) -> dict[str, Any]:
    """The verified manifest of a graph directory (every file's sha256 checked; unchanged files are
    not re-hashed, as for datasets: artifacts.verify_manifest's record). Refuses a directory that is
    not a finished graph artifact, a tampered file, and, given `dataset_fingerprint`, another
    dataset's graph."""
    graph_dir = Path(graph_dir)
    if not graph_dir.exists():
        raise ArtifactError(f"{graph_dir} does not exist: no graph features were built there. Run "
                            "`itemsage graph DATASET` first (it writes DATASET/graph/).")
    manifest = artifacts.verify_manifest(graph_dir, kind=KIND, record=True)
    if manifest.get("graph_format") != GRAPH_FORMAT:
        raise ArtifactError(f"{graph_dir} has graph_format {manifest.get('graph_format')}, this itemsage reads "
                            f"{GRAPH_FORMAT}; run `itemsage graph DATASET` again.")
    if dataset_fingerprint is not None:
        _refuse_other_dataset(graph_dir, manifest, dataset_fingerprint)
    return manifest


def read_graph_features(graph_dir: str | Path, dataset_fingerprint: str | None = None) -> GraphFeatures:
    """A graph directory's features.parquet as arrays (see GraphFeatures), verified first.

    `dataset_fingerprint` (`artifacts.fingerprint(dataset_dir)`): refuse, with an ArtifactError that
    names `itemsage graph DATASET`, a graph built from another dataset. The tokens stay float16
    (N x G x D x 2 bytes: 1.5 GB at 1M products x 3 x 256); `.float32(rows)` widens a slice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    graph_dir = Path(graph_dir)
    manifest = read_manifest(graph_dir, dataset_fingerprint)
    names = tuple(manifest["tokens"])
    dim = int(manifest["dim"])
    g = len(names)
    path = graph_dir / FEATURES_FILE
    parquet = pq.ParquetFile(path)
    n = parquet.metadata.num_rows
    expected = features_schema(g, dim)
    found = parquet.schema_arrow
    same = found.names == expected.names and all(  # compared by type, not the list's child field name
        a.type == b.type or (pa.types.is_fixed_size_list(a.type) and pa.types.is_fixed_size_list(b.type)
                             and a.type.list_size == b.type.list_size and a.type.value_type == b.type.value_type)
        for a, b in zip(found, expected))
    if not same or n != manifest["counts"]["products"]:
        raise ArtifactError(f"{path} does not hold what its manifest describes ({n:,} rows of {found.types}; "
                            f"expected {manifest['counts']['products']:,} rows of {expected.types}). Run "
                            "`itemsage graph DATASET` again.")
    tokens = np.empty((n, g, dim), np.float16)
    mask = np.empty((n, g), bool)
    ids, hashes = [], []
    lo = 0
    for batch in parquet.iter_batches(batch_size=65_536):
        hi = lo + batch.num_rows
        # [b, G*D] -> [b, G, D]: the flat values of a fixed-size list, row by row
        tokens[lo:hi] = batch[TOKENS].flatten().to_numpy().reshape(hi - lo, g, dim)
        mask[lo:hi] = batch[MASK].flatten().to_numpy(zero_copy_only=False).reshape(hi - lo, g)
        ids.append(batch[PRODUCT_ID].to_numpy(zero_copy_only=False))
        hashes.append(batch[HASH].to_numpy(zero_copy_only=False))
        lo = hi
    return GraphFeatures(ids=np.concatenate(ids) if ids else np.empty(0, object), tokens=tokens, mask=mask,
                         hashes=np.concatenate(hashes) if hashes else np.empty(0, object), names=names, dim=dim,
                         manifest=manifest)
