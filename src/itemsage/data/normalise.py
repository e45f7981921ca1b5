"""Ingest's column normalisation: every input column of one batch -> its one canonical Arrow type, with
the rows whose value cannot be read (and why). Which input types each column kind accepts, and the
file-level type check (`arrow_accepts`), used by itemsage.data.readers before a file is read.

Vectorised with pyarrow and numpy; a Python loop only where values came as JSON (Python objects
already) or where a row fails (its detail message). The row checks that follow are in
itemsage.data.validate.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from itemsage import schema

# ------------------------------------------------------------------------------------------------
# Column kinds: which input types a column accepts and what it is normalised to
# ------------------------------------------------------------------------------------------------

KIND_EXPECTED = {
    "id": "a string (or integer) column",
    "str": "a string column",
    "label": "a string (or integer) column",
    "text": "a string or list-of-strings column",
    "paths": "a string or list-of-strings column of image file paths",
    "time": "a timestamp, an ISO-8601 string or an integer epoch (seconds or milliseconds)",
    "num": "a numeric column",
    "vec": "a list-of-numbers column (one vector per row)",
    "vecs": "a list-of-lists-of-numbers column (one vector per image)",
}
KIND_FIX = {
    # Not plain astype(str): a float id 1.0 would become "1.0", which matches no log id "1".
    "id": ("write ids as strings at the source, or convert before writing: "
           "df['{c}'] = df['{c}'].astype('Int64').astype(str)"),
    "str": "store the values as strings",
    "label": "store the values as strings",
    "text": "store the field as a string or a list of strings",
    "paths": "store image paths as a string or a list of strings",
    "time": "store times as timestamps or ISO-8601 strings like 2024-03-01T12:00:00Z",
    "num": "store the values as floats",
    "vec": "store each vector as a list of floats",
    "vecs": "store each product's images as a list of float vectors",
}
# JSON value types that show a column has the right kind (checked on the first records).
KIND_JSON = {
    "id": (str, int), "str": (str,), "label": (str, int), "text": (str, list, int, float), "paths": (str, list),
    "time": (str, int, float, dt.date, np.datetime64), "num": (int, float), "vec": (list,), "vecs": (list,),
}
_CANONICAL = {
    "id": pa.string(), "str": pa.string(), "label": pa.string(),
    "text": pa.list_(pa.string()), "paths": pa.list_(pa.string()),
    "time": pa.int64(),  # epoch milliseconds, UTC
    "num": pa.float64(), "vec": pa.list_(pa.float32()), "vecs": pa.list_(pa.list_(pa.float32())),
}

LOG_KINDS = {
    schema.SURFACE: "str", schema.ENGAGEMENT: "str", schema.PRODUCT_ID: "id", schema.TIMESTAMP: "time",
    schema.USER_ID: "label", schema.WEIGHT: "num", schema.QUERY_TEXT: "str",
    schema.QUERY_EMBEDDING: "vec", schema.QUERY_IMAGE_PATH: "str", schema.QUERY_PRODUCT_ID: "id",
}
LOG_REQUIRED = (schema.SURFACE, schema.ENGAGEMENT, schema.PRODUCT_ID, schema.TIMESTAMP)
LOG_SCHEMA = schema.log_schema()  # the dataset's schemas live in schema.py


def catalog_kinds(text_columns: Sequence[str]) -> dict[str, str]:
    kinds = {schema.PRODUCT_ID: "id", schema.IMAGE_EMBEDDINGS: "vecs", schema.IMAGE_PATHS: "paths",
             schema.LISTED_AT: "time"}
    kinds.update({f: "text" for f in text_columns})
    return kinds


products_schema = schema.products_schema


def _strlike(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _listlike(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def arrow_accepts(kind: str, t: pa.DataType) -> bool:
    """Whether a Parquet column of type `t` can hold a column of this kind."""
    if pa.types.is_null(t):
        return True
    if pa.types.is_dictionary(t):
        t = t.value_type
    if kind in ("id", "label"):
        return _strlike(t) or pa.types.is_integer(t)
    if kind == "str":
        return _strlike(t)
    if kind == "text" and pa.types.is_integer(t):  # e.g. a numeric size; written as its decimal text
        return True
    if kind in ("text", "paths"):
        return _strlike(t) or (_listlike(t) and (_strlike(t.value_type) or pa.types.is_null(t.value_type)))
    if kind == "time":
        return pa.types.is_timestamp(t) or pa.types.is_date(t) or _strlike(t) or _numeric(t)
    if kind == "num":
        return _numeric(t)
    if kind == "vec":
        return _listlike(t) and (_numeric(t.value_type) or pa.types.is_null(t.value_type))
    if kind == "vecs":
        return _listlike(t) and (pa.types.is_null(t.value_type) or (
            _listlike(t.value_type) and arrow_accepts("vec", t.value_type)))
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------
# Normalising one column to its canonical Arrow type
# ------------------------------------------------------------------------------------------------

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MS = dt.timedelta(milliseconds=1)
_MIN_MS = (dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc) - EPOCH) // _MS
_MAX_MS = (dt.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=dt.timezone.utc) - EPOCH) // _MS
_SECONDS_BELOW = 10**11  # an epoch number below this magnitude is seconds, else milliseconds

# column errors: row -> (reason or None for the column's default reason, detail)
Errors = dict[int, tuple[str | None, str]]


def parse_iso_ms(text: str) -> int | None:
    """Epoch milliseconds of an ISO-8601 time (no zone = UTC), or None."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except (ValueError, TypeError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return (when - EPOCH) // _MS


def _epoch_ms(value: int | float) -> int | None:
    """Epoch milliseconds of a number of seconds (|v| < 1e11) or milliseconds; None if unusable."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        ms = math.floor(value * 1000 if abs(value) < _SECONDS_BELOW else value)
    else:
        ms = value * 1000 if abs(value) < _SECONDS_BELOW else value
    return ms if _MIN_MS <= ms <= _MAX_MS else None


def _time_ms(value: Any) -> tuple[int | None, str | None]:
    """(epoch ms, None) or (None, why) for one Python value."""
    if value is None:
        return None, None
    if isinstance(value, str):
        ms = parse_iso_ms(value)
        return (ms, None) if ms is not None else (None, f"timestamp {value!r} is not an ISO-8601 time")
    if isinstance(value, (dt.date, np.datetime64)):  # Python values of a catalog in memory (the API)
        return _python_time_ms(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ms = _epoch_ms(value)
        return (ms, None) if ms is not None else (None, f"timestamp {value!r} is not a usable epoch time")
    return None, f"timestamp {value!r} ({type(value).__name__}) is neither an ISO-8601 string nor an epoch number"


def _python_time_ms(value: dt.date | np.datetime64) -> tuple[int | None, str | None]:
    """(epoch ms, None) or (None, why) for a datetime (naive = UTC), a date (its midnight UTC, as an
    Arrow date column reads) or a numpy datetime64; pandas' NaT is a missing time."""
    try:
        if isinstance(value, np.datetime64):
            return (None, None) if np.isnat(value) else (int(value.astype("datetime64[ms]").astype(np.int64)), None)
        if isinstance(value, dt.datetime):
            if type(value).__name__ == "NaTType":  # pandas' missing time (a datetime subclass)
                return None, None
            value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        else:
            value = dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
        return (value - EPOCH) // _MS, None
    except (TypeError, ValueError, OverflowError) as err:
        return None, f"timestamp {value!r} is not a usable time ({err})"


def _clean_string_lists(arr: pa.Array) -> pa.Array:
    """list<string> with null lists as [] and null or blank items dropped (like features.field_strings)."""
    arr = arr.cast(pa.list_(pa.string()))
    n = len(arr)
    values = pc.list_flatten(arr)
    parents = pc.list_parent_indices(arr).to_numpy()
    keep = pc.and_(pc.is_valid(values), pc.not_equal(pc.utf8_trim_whitespace(values), "")).fill_null(False)
    keep_np = keep.to_numpy(zero_copy_only=False)
    counts = np.bincount(parents[keep_np], minlength=n) if n else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(keep))


def _from_arrow(kind: str, arr: pa.Array, name: str = "") -> tuple[pa.Array, Errors]:
    """A Parquet column (already type-checked) in its canonical type."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    bad: Errors = {}
    if kind in ("id", "str", "label", "text", "paths", "time"):
        arr, bad = _valid_utf8(arr, name)
    if bad:
        converted, errors = _from_arrow(kind, arr, name)
        return converted, {**errors, **bad}
    if pa.types.is_null(arr.type):
        arr = pa.nulls(len(arr), _CANONICAL[kind])
        return (_clean_string_lists(arr) if kind in ("text", "paths") else arr), {}
    if kind in ("text", "paths"):
        if not _listlike(arr.type):  # one string -> a one-element list
            arr = pa.ListArray.from_arrays(pa.array(np.arange(len(arr) + 1, dtype=np.int32)), arr.cast(pa.string()))
        return _clean_string_lists(arr), {}
    if kind == "time":
        return _arrow_times(arr)
    return arr.cast(_CANONICAL[kind]), {}


def _valid_utf8(arr: pa.Array, name: str) -> tuple[pa.Array, Errors]:
    """`arr` with the rows whose strings are not valid UTF-8 set to null, and their errors. Parquet does
    not check a string column's bytes; Arrow's full validation does, in one vectorised pass."""
    try:
        arr.validate(full=True)
        return arr, {}
    except pa.ArrowInvalid:
        pass
    as_bytes = arr.cast(pa.list_(pa.binary()) if _listlike(arr.type) else pa.binary()).to_pylist()
    errors: Errors = {}
    for i, value in enumerate(as_bytes):
        for item in (value if isinstance(value, list) else [value]):
            try:
                (item or b"").decode("utf-8")
            except UnicodeDecodeError as err:
                errors[i] = ("bad_text_encoding", f"{name}: byte {err.start} ({item[err.start:err.start + 1].hex()}) "
                                                  "starts no valid UTF-8 character; write the column as UTF-8 text")
                as_bytes[i] = None
                break
    typ = pa.list_(pa.string()) if _listlike(arr.type) else pa.string()
    fixed = [None if v is None else [b.decode() if b is not None else None for b in v] if isinstance(v, list)
             else v.decode() for v in as_bytes]
    return pa.array(fixed, typ), errors


def _arrow_times(arr: pa.Array) -> tuple[pa.Array, Errors]:
    t = arr.type
    if pa.types.is_timestamp(t):  # the stored value is UTC (naive ones are read as UTC)
        return arr.cast(pa.timestamp("ms", tz=t.tz), safe=False).cast(pa.int64()), {}
    if pa.types.is_date(t):
        return arr.cast(pa.timestamp("ms")).cast(pa.int64()), {}
    if pa.types.is_integer(t) and arr.null_count == 0:  # vectorised; with nulls: the loop below
        v = arr.cast(pa.int64()).to_numpy()
        ms = np.where(np.abs(v) < _SECONDS_BELOW, v * 1000, v)
        bad = (ms < _MIN_MS) | (ms > _MAX_MS)
        errors: Errors = {int(i): (None, f"timestamp {int(v[i])} is not a usable epoch time")
                          for i in np.flatnonzero(bad)}
        return pa.array(ms, pa.int64(), mask=bad), errors
    values, errors = [], {}
    for i, value in enumerate(arr.to_pylist()):  # strings, floats, or integers with nulls
        ms, why = _time_ms(value)
        values.append(ms)
        if why:
            errors[i] = (None, why)
    return pa.array(values, pa.int64()), errors


def _from_json(kind: str, name: str, values: list[Any]) -> tuple[pa.Array, Errors]:
    """A JSON column (a list of Python values, one per record) in its canonical type; values of the
    wrong type become null plus a row error."""
    from itemsage.data.text import field_strings

    errors: Errors = {}
    if kind in ("text", "paths"):
        lists = [field_strings(v) for v in values]
        try:
            return pa.array(lists, _CANONICAL[kind]), {}
        except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800" alone): that row, not the batch
            for i, strings in enumerate(lists):
                why = next((w for w in map(_not_unicode, strings) if w), None)
                if why:
                    errors[i], lists[i] = ("bad_text_encoding", f"{name}: {why}"), []
            return pa.array(lists, _CANONICAL[kind]), errors
    if kind == "time":
        out = []
        for i, v in enumerate(values):
            ms, why = _time_ms(v)
            out.append(ms)
            if why:
                errors[i] = (None, why)
        return pa.array(out, pa.int64()), errors
    if kind in ("vec", "vecs"):
        try:  # fast path: the whole column converts
            return pa.array(values, _CANONICAL[kind]), {}
        except (pa.ArrowException, TypeError, ValueError):
            pass
        out = []
        for i, v in enumerate(values):
            why = _vector_problem(kind, name, v)
            if why is not None:
                errors[i] = why
                out.append(None)
            else:
                out.append(v)
        return pa.array(out, _CANONICAL[kind]), errors
    ok_types = {"id": (str, int), "label": (str, int), "str": (str,), "num": (int, float)}[kind]
    out = []
    for i, v in enumerate(values):
        if isinstance(v, str) and (why := _not_unicode(v)):
            errors[i] = ("bad_text_encoding", f"{name}: {why}")
            out.append(None)
        elif v is None or (isinstance(v, ok_types) and not isinstance(v, bool)):
            out.append(v if v is None or kind == "num" else str(v))
        elif kind == "label":  # a user id is only carried along: keep any value as text
            out.append(json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        else:
            errors[i] = (None, f"{name} must be {KIND_EXPECTED[kind].replace(' column', '')} "
                               f"value, got {type(v).__name__} {_short(v)}")
            out.append(None)
    return pa.array(out, _CANONICAL[kind]), errors


def _not_unicode(text: str) -> str | None:
    """Why `text` cannot be stored as UTF-8 (a lone surrogate, which JSON's "\\ud800" escape alone and
    the bytes ED A0 80 both decode to), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        return (f"character {err.start} is a lone surrogate ({text[err.start]!r}), which is not Unicode text; "
                "write the file as UTF-8 (a \\uD800-\\uDFFF escape only as half of a pair)")


def unicode_problem(value: Any) -> str | None:
    """Why a JSON value (a string, or lists and objects of them) holds text UTF-8 cannot store, or None."""
    if isinstance(value, str):
        return _not_unicode(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return next((w for w in map(unicode_problem, value) if w), None)
    return None


def _vector_problem(kind: str, name: str, value: Any) -> tuple[str | None, str] | None:
    def numbers(v: Any) -> bool:
        return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

    if value is None:
        return None
    if not isinstance(value, list):
        return "bad_vector_width", f"{name} must be a list, got {type(value).__name__} {_short(value)}"
    if kind == "vec":
        return None if numbers(value) else ("non_finite_vector", f"{name} holds a value that is not a number")
    for j, vector in enumerate(value):
        if not isinstance(vector, list):
            return "bad_vector_width", f"{name}[{j}] must be a list of numbers, got {type(vector).__name__}"
        if not numbers(vector):
            return "non_finite_vector", f"{name}[{j}] holds a value that is not a number"
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def canonical(fmt: str, batch: Any, kinds: dict[str, str]) -> tuple[int, dict[str, pa.Array], dict[str, Errors]]:
    """(rows, canonical columns, row errors per column) of one batch (a Parquet RecordBatch when `fmt`
    is "parquet", else a list of JSON dicts); absent columns are null."""
    columns: dict[str, pa.Array] = {}
    errors: dict[str, Errors] = {}
    if fmt == "parquet":
        n = batch.num_rows
        for name, kind in kinds.items():
            arr = batch.column(name) if name in batch.schema.names else pa.nulls(n)
            columns[name], errors[name] = _from_arrow(kind, arr, name)
    else:
        n = len(batch)
        for name, kind in kinds.items():
            columns[name], errors[name] = _from_json(kind, name, [r.get(name) for r in batch])
    return n, columns, errors


def raw_records(fmt: str, batch: Any, rows: np.ndarray) -> list[dict[str, Any]]:
    """The input records of `rows` as JSON-safe dicts (for rejects.jsonl); one Arrow take per batch."""
    if fmt == "parquet":
        taken = batch.take(pa.array(rows, pa.int64())) if len(rows) else None
        try:
            records = taken.to_pylist() if taken is not None else []
        except UnicodeDecodeError:  # a string column holds bytes that are not UTF-8 (bad_text_encoding)
            records = _undecodable_records(taken)
    else:
        records = [batch[int(r)] for r in rows]
    return [json_safe(r) for r in records]


def _undecodable_records(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """A batch's records when a string column holds invalid UTF-8: such columns are read as bytes and
    shown with the bad bytes escaped (`\\xed`)."""
    def text(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="backslashreplace")
        return [text(v) for v in value] if isinstance(value, list) else value

    columns = {}
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            column.validate(full=True)
            columns[name] = column.to_pylist()
        except pa.ArrowInvalid:
            binary = pa.list_(pa.binary()) if _listlike(column.type) else pa.binary()
            columns[name] = [text(v) for v in column.cast(binary).to_pylist()]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def json_safe(value: Any) -> Any:
    """A value JSON can hold: NaN/inf become the strings "NaN"/"Infinity"/"-Infinity", times ISO text."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "item"):
        return json_safe(value.item())
    return str(value)


class ExtraColumns:
    """Extra catalog columns, kept as they came (one Arrow type per column across files)."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[Any]] = {}  # name -> per batch: pa.Array, list of values, or row count (absent)
        self.batch_rows: list[int] = []

    def add(self, values: dict[str, Any], n: int) -> None:
        for name in values:
            if name not in self.chunks:
                self.chunks[name] = list(self.batch_rows)  # absent in earlier batches
        for name, chunks in self.chunks.items():
            chunks.append(values.get(name, n))
        self.batch_rows.append(n)

    def columns(self) -> dict[str, pa.ChunkedArray]:
        out = {}
        for name, chunks in self.chunks.items():
            arrays = [pa.nulls(c) if isinstance(c, int) else c if isinstance(c, pa.Array) else loose_array(c)
                      for c in chunks]
            try:
                out[name] = pa.concat_tables(
                    [pa.table({name: a}) for a in arrays], promote_options="permissive").column(name)
            except (pa.ArrowException, TypeError):  # types clash across files: keep as JSON text
                values = [v for a in arrays for v in a.to_pylist()]
                out[name] = pa.chunked_array([loose_array(values, force_json=True)])
        return out


def loose_array(values: list[Any], force_json: bool = False) -> pa.Array:
    if not force_json:
        try:
            return pa.array(values)
        except (pa.ArrowException, TypeError, ValueError):
            pass
    return pa.array([None if v is None else json.dumps(json_safe(v), ensure_ascii=False) for v in values], pa.string())
