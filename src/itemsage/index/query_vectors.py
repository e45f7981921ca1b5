"""The products' frozen query vectors beside an index version (query_vectors.safetensors: tensor
"query_vector" [N, Dq] float32 in ids.parquet's row order, memory-mapped at load): what closeup by
product and home by history read, so the service never re-encodes a product.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.schema import PRODUCT_QUERY_MISSING, QUERY_VECTOR

log = logging.getLogger(__name__)


class NoProductQueries(ArtifactError):
    """The index (or embeddings) predates products' frozen query vectors."""


def no_product_queries(where: str, manifest: dict[str, Any] | None = None) -> NoProductQueries:
    """The refusal for an index without product query vectors; `manifest` (the index's) may say why
    (`product_query_missing`: e.g. a catalog product without an image), else it predates them."""
    why = (manifest or {}).get(PRODUCT_QUERY_MISSING)
    if isinstance(why, str):
        return NoProductQueries(f"{where} holds no product query vectors: {why}")
    return NoProductQueries(
        f"{where} holds no product query vectors (it was made before products could be queries); re-run "
        "`itemsage ingest`, `itemsage embed` and `itemsage index` to add them")


def _check_query_vectors(query_vectors: Any, n: int) -> np.ndarray:
    q = np.asarray(query_vectors, dtype=np.float32)
    if q.ndim != 2 or len(q) != n or q.shape[1] < 1:
        raise ValueError(f"query_vectors must be [N, Dq] with one row per id ({n}), got shape {q.shape}")
    if not np.isfinite(q).all():
        raise ValueError("query_vectors contain NaN or inf")
    return q


def save_query_vectors(path: Path, vectors: np.ndarray) -> None:
    """[N, Dq] float32 as a safetensors file (tensor "query_vector"), written atomically."""
    from safetensors.numpy import save_file

    with artifacts.atomic_path(path) as tmp:
        save_file({QUERY_VECTOR: np.ascontiguousarray(vectors, dtype=np.float32)}, str(tmp))


def load_query_vectors(path: Path) -> np.ndarray:
    """The "query_vector" tensor [N, Dq] of a safetensors file, memory-mapped read-only (the format is
    an 8-byte little-endian header size, a JSON header, then the raw data)."""
    import json
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    info = header.get(QUERY_VECTOR)
    if not isinstance(info, dict) or info.get("dtype") != "F32" or len(info.get("shape", [])) != 2:
        raise ArtifactError(f"{path} holds no float32 [N, Dq] tensor '{QUERY_VECTOR}'; rebuild the index.")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != 4 * shape[0] * shape[1]:
        raise ArtifactError(f"{path}: the tensor's data size does not match its shape {shape}; rebuild the index.")
    if shape[0] == 0:
        return np.zeros(shape, np.float32)
    # A plain ndarray over the map (it keeps the map open): indexing a np.memmap runs Python code per call.
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + size + begin, shape=shape).view(np.ndarray)
