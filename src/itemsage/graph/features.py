"""Pooling: G graph tokens per product from its neighbours' frozen content vectors, and their hash.

A token is the importance-weighted mean of content vectors over a set of neighbours, L2-normalised:
`walk` over the walk neighbourhood (walks.py, weights = visit counts), an edge type's name over that
type's 1-hop neighbours (edges.py, weights = edge weights). The product's own vector is not in it: the
tower reads that already. A product with no such neighbour (no train-window engagement, or engaged
but linked to nothing of that type) has mask False and a zero row, which must not be read.

Content vectors: `query_vector` (products.parquet's frozen query vector from ingest: the main image,
or the title's MiniLM vector) or `mean_image` (the mean of the product's image vectors).

Axes: N products, B a block of them, G tokens, D content width.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from itemsage import schema
from itemsage.config import ConfigError

BLOCK = 65_536  # products pooled (and written) together


def _batch_vectors(values: pa.Array, source: str, path: Path) -> np.ndarray:
    """One batch of products.parquet's `query_vector` or `image_embeddings` column -> [B, D] float32."""
    b = len(values)
    if source == "query_vector":
        flat = values.flatten().to_numpy().astype(np.float32, copy=False)
        width = len(flat) // b if b else 0
        lengths = pc.fill_null(pc.list_value_length(values), 0)
        if len(flat) != b * width or pc.any(pc.not_equal(lengths, width)).as_py():
            raise ConfigError(f"graph.content 'query_vector': the products of {path} do not all have a query "
                              "vector of one width; re-ingest the dataset (itemsage ingest)")
        return flat.reshape(b, width)
    images = values.flatten()  # [images of the batch] list<float>
    per = pc.fill_null(pc.list_value_length(values), 0).to_numpy()  # images per product
    width = len(images[0].values) if len(images) else 0
    flat = images.flatten().to_numpy().astype(np.float32, copy=False).reshape(len(images), width)
    sums = np.zeros((b, width), np.float32)
    has = per > 0
    sums[has] = np.add.reduceat(flat, (np.cumsum(per) - per)[has], axis=0)
    return sums / np.maximum(per, 1)[:, None].astype(np.float32)


def content_vectors(dataset_dir: str | Path, source: str = "query_vector") -> np.ndarray:
    """[N, D] float32 frozen content vectors, products.parquet's row order (zero rows: none), read in
    batches into one array (no second copy of the column in memory)."""
    path = Path(dataset_dir) / schema.PRODUCTS_FILE
    column = schema.QUERY_VECTOR if source == "query_vector" else schema.IMAGE_EMBEDDINGS
    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        raise ConfigError(f"graph.content '{source}': {path} has no `{column}` column (a dataset ingested before "
                          "products had query vectors?). Re-ingest it, or choose the other graph.content")
    out: np.ndarray | None = None
    lo = 0
    for batch in parquet.iter_batches(batch_size=BLOCK, columns=[column]):
        part = _batch_vectors(batch.column(0), source, path)
        if part.shape[1]:  # (a batch whose products have no image at all: width 0, its rows stay zero)
            if out is None:
                out = np.zeros((parquet.metadata.num_rows, part.shape[1]), np.float32)
            elif part.shape[1] != out.shape[1]:
                raise ConfigError(f"graph.content '{source}': the vectors of {path} do not all have one width; "
                                  "re-ingest the dataset (itemsage ingest)")
            out[lo:lo + len(part)] = part
        lo += len(part)
    if out is None:
        raise ConfigError(f"graph.content '{source}': no product of {path} has a vector to pool; use "
                          f"graph.content '{'query_vector' if source == 'mean_image' else 'mean_image'}'")
    return out


def pool(weights: sp.csr_matrix, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weights [B, N] (rows: importance, any scale) @ vectors [N, D] -> (unit rows [B, D] float32, zero
    where the row has no neighbour or pools to zero; mask [B] bool)."""
    part = np.asarray(weights @ vectors, dtype=np.float32)
    norm = np.linalg.norm(part, axis=1)
    ok = (np.diff(weights.indptr) > 0) & (norm > 0)
    part /= np.where(ok, norm, 1.0)[:, None]
    part[~ok] = 0.0
    return part, ok


def pooled_blocks(weights: list[sp.csr_matrix], vectors: np.ndarray, block: int = BLOCK
                  ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """One [N, N] importance matrix per token -> (first row, tokens [B, G, D] float16, mask [B, G]) per
    block of products, in row order. Rounded to float16 after normalising: |error| <= 2^-11 per value."""
    n, d = vectors.shape
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        tokens = np.zeros((hi - lo, len(weights), d), np.float16)
        mask = np.zeros((hi - lo, len(weights)), bool)
        for g, m in enumerate(weights):
            part, mask[:, g] = pool(m[lo:hi], vectors)
            tokens[:, g] = part
        yield lo, tokens, mask


def graph_hashes(tokens: np.ndarray, mask: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """[B] object: each product's graph_hash, "" where its mask is all False.

    sha256 over `itemsage-graph:<names comma-joined>:<D>\\n`, then the product's mask ([G] bytes,
    0/1), then its tokens ([G, D] little-endian float16): a product's hash changes when its tokens or
    mask do (or the token set), so `embed --incremental` re-embeds exactly those products."""
    b, g, d = tokens.shape
    head = hashlib.sha256(f"itemsage-graph:{','.join(names)}:{d}\n".encode())
    rows = np.concatenate([mask.astype(np.uint8), np.ascontiguousarray(tokens, dtype="<f2").reshape(b, g * d)
                           .view(np.uint8)], axis=1)  # [B, G + 2 G D] bytes
    out = np.full(b, "", dtype=object)
    for i in np.flatnonzero(mask.any(axis=1)):  # hashlib is C per call: ~2 s per million products
        h = head.copy()
        h.update(rows[i].data)
        out[i] = h.hexdigest()
    return out
