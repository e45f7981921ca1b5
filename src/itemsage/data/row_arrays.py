"""The vectorised pieces the row checks are made of (data/validate.py): `Rejector` (the one reason of
each rejected row of a batch), Arrow and numpy helpers over whole columns (codes, membership, vector
widths and finiteness, taking rows), and `content_hash`, the sha256 of a product's features that
incremental embedding compares.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from itemsage import schema
from itemsage.data.normalise import Errors

log = logging.getLogger(__name__)


class Rejector:
    """The reason of each row of a batch; the first check that fails a row names its reason."""

    def __init__(self, n: int):
        self.code = np.full(n, -1, dtype=np.int16)  # index into REJECT_REASONS, -1 = alive
        self.details: dict[int, str] = {}

    @property
    def alive(self) -> np.ndarray:
        return self.code < 0

    def reject(self, mask: np.ndarray, reason: str, detail: str | Callable[[int], str]) -> None:
        rows = np.flatnonzero(mask & self.alive)
        self.code[rows] = schema.REJECT_REASONS.index(reason)
        for r in rows:
            self.details[int(r)] = detail(int(r)) if callable(detail) else detail

    def reject_errors(self, errors: Errors, default_reason: str) -> None:
        """Reject rows whose value could not be converted (JSON values of the wrong type)."""
        for row, (reason, detail) in errors.items():
            if self.code[row] < 0:
                self.code[row] = schema.REJECT_REASONS.index(reason or default_reason)
                self.details[row] = detail


def filled(arr: pa.Array, fill: Any) -> np.ndarray:
    return arr.fill_null(fill).to_numpy(zero_copy_only=False)


def present(arr: pa.Array) -> np.ndarray:
    """[n] bool: a string that is not null or blank."""
    return filled(pc.not_equal(pc.utf8_trim_whitespace(arr), ""), False)


def codes(arr: pa.Array | pa.ChunkedArray, values: Sequence[str]) -> np.ndarray:
    """[n] int64: the index of each string in `values`; -1 for null or a string not there."""
    return filled(pc.index_in(arr, value_set=pa.array(values, pa.string())), -1).astype(np.int64)


def member(values: list[Any], allowed: set[str]) -> np.ndarray:
    """[n] bool: value in `allowed` (a C-level set lookup per row; None is never a member)."""
    return np.fromiter(map(allowed.__contains__, values), bool, count=len(values))


def vector_stats(vectors: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a list<float32> array [n]: (lengths [n] with null = 0, has a NaN/inf/null value [n],
    flat values [V] with V = lengths.sum()). No per-row or per-value index arrays: a prefix sum of the
    bad values, read at each row's end and start, counts each row's bad values."""
    lengths = filled(pc.list_value_length(vectors), 0).astype(np.int64)
    flat = pc.list_flatten(vectors)  # [V]; values under null lists are skipped, as lengths says
    values = filled(flat, np.nan) if flat.null_count else flat.to_numpy(zero_copy_only=False)
    values = values.astype(np.float32, copy=False)
    bad = ~np.isfinite(values)  # [V]
    nonfinite = np.zeros(len(lengths), bool)
    if bad.any():
        ends = np.cumsum(lengths)
        seen = np.concatenate([[0], np.cumsum(bad)])  # bad values before each position
        nonfinite = seen[ends] > seen[ends - lengths]
    return lengths, nonfinite, values


def _as_binary(vectors: pa.Array) -> pa.Array:
    """A list<float32> array seen as large_binary (one byte string per vector), sharing its buffers."""
    child = vectors.values
    byte_offsets = (vectors.offsets.to_numpy().astype(np.int64) + child.offset) * 4
    validity = None if vectors.null_count == 0 else pa.array(vectors.is_valid()).buffers()[1]
    return pa.Array.from_buffers(pa.large_binary(), len(vectors), [validity, pa.py_buffer(byte_offsets),
                                                                   child.buffers()[1]])


def _from_binary(data: pa.Array, list_type: pa.DataType) -> pa.Array:
    """The inverse of `_as_binary`."""
    bufs = data.buffers()
    offsets = np.frombuffer(bufs[1], np.int64)[data.offset: data.offset + len(data) + 1]
    first = int(offsets[0]) // 4
    values = pa.Array.from_buffers(pa.float32(), int(offsets[-1]) // 4 - first, [None, bufs[2]], offset=first)
    validity = None if data.null_count == 0 else pa.array(data.is_valid()).buffers()[1]
    list_offsets = pa.py_buffer((offsets // 4 - first).astype(np.int32))
    return pa.Array.from_buffers(list_type, len(data), [validity, list_offsets], children=[values])


def take_column(column: pa.Array | pa.ChunkedArray, indices: pa.Array) -> pa.Array | pa.ChunkedArray:
    # Arrow's take on list<float> gathers value by value (about 80 MB/s here); seen as one byte string
    # per vector, the same take is a memcpy per row, about 6x faster.
    t = column.type
    if not (pa.types.is_list(t) and t.value_type == pa.float32()):
        return column.take(indices)
    if isinstance(column, pa.ChunkedArray):
        arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    else:
        arr = column
    if len(arr.values) == 0 or arr.values.null_count or len(arr.values) >= 2**31:
        return arr.take(indices)  # no values, null floats (never in kept rows), or past int32 offsets
    return _from_binary(_as_binary(arr).take(indices), t)


def take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """table.take(rows), fast for vector columns; `rows` [k] int64 row numbers."""
    indices = pa.array(rows, pa.int64())
    return pa.table({name: take_column(table.column(name), indices) for name in table.column_names},
                    schema=table.schema)


def nested(blocks: list[np.ndarray], dim: int) -> pa.Array:
    """list<list<float32>> from one [m_i, dim] block per row."""
    counts = np.array([len(b) for b in blocks], dtype=np.int64)
    flat = np.concatenate([b.reshape(-1) for b in blocks]) if counts.sum() else np.zeros(0, np.float32)
    inner_offsets = np.arange(int(counts.sum()) + 1, dtype=np.int64) * dim
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets.astype(np.int32)), pa.array(flat, pa.float32()))
    outer = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer), inner)


def content_hash(texts: Sequence[Sequence[str]], images: np.ndarray) -> str:
    """sha256 of a product's features, stable across runs, machines and input formats.

    Hashed bytes: the text fields (lists of strings, in the dataset's text-column order) as compact
    UTF-8 JSON, then `\\nimages:<M>x<D>\\n`, then the [M, D] image vectors as little-endian float32.
    """
    images = np.asarray(images, dtype="<f4")
    m = images.shape[0] if images.size else 0
    d = images.shape[1] if m and images.ndim == 2 else 0
    h = hashlib.sha256(json.dumps([list(t) for t in texts], ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    h.update(f"\nimages:{m}x{d}\n".encode())
    h.update(np.ascontiguousarray(images.reshape(m, d)).tobytes())
    return h.hexdigest()
