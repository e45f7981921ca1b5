"""Ingest: validate, normalise and time-split a catalog and engagement logs into a dataset (SPEC §1, §2).

`ingest(catalog, logs, out, config)` reads Parquet and JSON Lines files (or directories of them, in
sorted name order) in streaming batches and writes the dataset directory described in
docs/ARCHITECTURE.md: products.parquet, train.parquet, eval.parquet, rejects.jsonl, vocab.json and
manifest.json.

Two kinds of bad input:
- a bad ROW goes to rejects.jsonl with exactly one reason from `schema.REJECT_REASONS`, and the run
  goes on. `row` there is the 0-based index of the record in its file (for JSON Lines: blank lines
  are not counted, so it is the line number minus one when the file has none). Checks run in a fixed
  order and the first failing one names the reason.
- a bad FILE (unknown format, unreadable, a required column missing or of the wrong type, no rows)
  raises `DataError` before anything is written: every input's schema is checked first (Parquet
  metadata; the first 1,000 records of a JSON Lines file). A JSON line that does not parse, found
  later, also raises `DataError`, and the half-written output is removed.

Rules a user may need to know:
- Timestamps: Arrow timestamps and dates (naive ones are read as UTC), ISO-8601 strings (Python's
  `datetime.fromisoformat`; no zone = UTC), or numbers since the Unix epoch: a value whose magnitude
  is below 1e11 is seconds, otherwise milliseconds (1e11 s is the year 5138, 1e11 ms is March 1973,
  so only millisecond times before 1973 are misread). Stored as timestamp[ms, UTC].
- product_id: strings, or integers (written as their decimal text). Ids are otherwise kept as given;
  an empty or blank id is missing.
- Duplicate product ids: the first row with an id claims it; every later row with that id is
  rejected, even when the first one was itself rejected (its log rows then become unknown_product).
- Images: a product keeps its first `max_images` (20) image vectors; longer lists are cut and the
  cut is counted in the summary, not rejected. The checks (width, NaN/inf) apply to the kept vectors.
  `image_paths` are used only for products without `image_embeddings`; relative paths are resolved
  against the directory of the file that names them; any unreadable file rejects the row. The first
  valid image vector (or `image_dim`) fixes the dataset's image width.
- Query vectors: one width per surface, fixed by its first valid row; a search row with only
  `query_text` stands for a 384-d text-encoder vector and a closeup row with only `query_image_path`
  for an image-encoder vector (the path is encoded here and stored as `query_embedding`). A
  `query_embedding` of length 0 counts as absent.
- content_hash: sha256 of the product's features (see `content_hash`), so `embed --incremental`
  re-embeds exactly the products whose text or images changed.
- Input fingerprints in the manifest: `sha256:<hex>` of the file's bytes, or `size-mtime:<bytes>:<ns>`
  for files larger than `sha256_max_bytes` (1 GiB by default), where hashing would be a long extra pass.

Split: rows at or after the split time are eval. Without `split_at` the split time is
`max - eval_fraction * (max - min)` over every readable timestamp in the logs, found by a first,
cheap pass that reads only the timestamp column (a JSON Lines file is parsed twice for it).

Memory: the catalog's ids and its kept products (as an Arrow table) are held in memory, as are the
vocabulary counts. Log rows are streamed: each batch is validated and its kept rows appended, sorted,
to a scratch Arrow IPC file per split in small record batches. The final train/eval files are then written
in time order one slab at a time: a slab is a run of whole minutes holding about `sort_rows` rows
(more when a single minute holds more), so at most that many log rows are in memory at once.

The output directory is written as `<out>.tmp-<pid>` and renamed to `<out>` at the end, so a killed
run never leaves something that looks complete. An existing `<out>` is replaced only if it is an
itemsage dataset.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itemsage import artifacts, schema
from itemsage.config import ConfigError, require, to_dict

log = logging.getLogger(__name__)


class DataError(ValueError):
    """An input file cannot be used at all; the message names the file, the column, what was
    expected, what was found and how to fix it."""


# ------------------------------------------------------------------------------------------------
# Config and summary
# ------------------------------------------------------------------------------------------------

TEXT_QUERY_DIM = 384  # all-MiniLM-L6-v2; used when itemsage.query_encoder cannot be imported
_RESERVED = {schema.PRODUCT_ID, schema.IMAGE_EMBEDDINGS, schema.IMAGE_PATHS, schema.CONTENT_HASH}


@dataclass
class IngestConfig:
    split_at: str | None = None  # ISO time; rows at or after it are eval. Wins over eval_fraction.
    eval_fraction: float = 0.2  # else: the last fraction of the logs' time span is eval
    text_fields: tuple[str, ...] = schema.TEXT_FIELDS  # fields the vocabulary is built from
    max_unigrams: int = 200_000
    max_bigrams: int = 1_000_000
    max_trigrams: int = 64_000
    batch_rows: int = 65_536  # rows per streamed batch
    image_dim: int | None = None  # None: the first valid image vector fixes it
    max_images: int = schema.MAX_IMAGES
    image_batch_size: int = 32  # images per image-encoder call
    sort_rows: int = 500_000  # log rows held in memory while writing train/eval in time order
    sha256_max_bytes: int = 1 << 30  # larger inputs are fingerprinted by size and mtime
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.text_fields, str):
            self.text_fields = tuple(f.strip() for f in self.text_fields.split(",") if f.strip())
        self.text_fields = tuple(self.text_fields)
        if self.split_at is not None:
            require(isinstance(self.split_at, str) and _parse_iso_ms(self.split_at) is not None,
                    f"`ingest.split_at` ({self.split_at!r}) is not an ISO-8601 time; "
                    "write it like 2024-03-01T00:00:00Z (no zone = UTC).")
        require(isinstance(self.eval_fraction, (int, float)) and 0.0 < self.eval_fraction < 1.0,
                f"`ingest.eval_fraction` ({self.eval_fraction}) must be between 0 and 1 (exclusive), "
                "e.g. 0.2 for the last fifth of the time span.")
        require(len(self.text_fields) > 0, "`ingest.text_fields` is empty; name at least one text field.")
        require(len(set(self.text_fields)) == len(self.text_fields),
                f"`ingest.text_fields` lists a field twice: {list(self.text_fields)}")
        for name in self.text_fields:
            require(isinstance(name, str) and name.strip() == name and name != "" and name not in _RESERVED,
                    f"`ingest.text_fields` has {name!r}, which is not a usable text column name.")
        for name in ("max_unigrams", "max_bigrams", "max_trigrams"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, f"`ingest.{name}` ({value}) must be an integer >= 0.")
        for name in ("batch_rows", "max_images", "image_batch_size", "sort_rows"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"`ingest.{name}` ({value}) must be an integer >= 1.")
        require(self.image_dim is None or (isinstance(self.image_dim, int) and self.image_dim >= 1),
                f"`ingest.image_dim` ({self.image_dim}) must be a positive integer or unset.")
        require(isinstance(self.sha256_max_bytes, int) and self.sha256_max_bytes >= 0,
                f"`ingest.sha256_max_bytes` ({self.sha256_max_bytes}) must be an integer >= 0.")


@dataclass
class InputStats:
    path: str
    role: str  # "catalog" | "logs"
    rows_read: int = 0
    rows_kept: int = 0
    rows_rejected: int = 0


@dataclass
class IngestSummary:
    out: Path
    inputs: list[InputStats]
    rejects: dict[str, int]  # reason -> rows, every reason listed
    products: int
    train_rows: dict[str, int]  # task "surface.engagement" -> rows, every task listed
    eval_rows: dict[str, int]
    split_at: str  # ISO time, UTC
    image_dim: int  # 0 = the catalog has no images
    query_dims: dict[str, int]  # surface -> query vector width, for surfaces with rows
    images_truncated: int
    files: list[Path]

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())


def summary_table(summary: IngestSummary) -> Any:
    """A Rich renderable of the summary (the CLI and the demo print it)."""
    from rich.console import Group
    from rich.table import Table

    inputs = Table(title="inputs", title_justify="left")
    for col in ("input", "role", "read", "kept", "rejected"):
        inputs.add_column(col, justify="left" if col in ("input", "role") else "right")
    for s in summary.inputs:
        inputs.add_row(s.path, s.role, f"{s.rows_read:,}", f"{s.rows_kept:,}", f"{s.rows_rejected:,}")
    rejects = Table(title=f"rejected rows: {summary.rejected:,}", title_justify="left")
    rejects.add_column("reason")
    rejects.add_column("rows", justify="right")
    for reason, n in summary.rejects.items():
        if n:
            rejects.add_row(reason, f"{n:,}")
    tasks = Table(title="pairs per task", title_justify="left")
    for col in ("task", "train", "eval"):
        tasks.add_column(col, justify="left" if col == "task" else "right")
    for task in schema.ALL_TASKS:
        tasks.add_row(task, f"{summary.train_rows[task]:,}", f"{summary.eval_rows[task]:,}")
    tasks.add_row("total", f"{sum(summary.train_rows.values()):,}", f"{sum(summary.eval_rows.values()):,}")
    files = Table(title=f"written to {summary.out}", title_justify="left")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    for path in summary.files:
        files.add_row(path.name, f"{path.stat().st_size:,}" if path.exists() else "")
    facts = (f"products kept: {summary.products:,}; eval from {summary.split_at}; "
             f"image width: {summary.image_dim}; query widths: {summary.query_dims}; "
             f"products with image lists cut to the maximum: {summary.images_truncated:,}")
    return Group(inputs, *([rejects] if summary.rejected else []), tasks, facts, files)


# ------------------------------------------------------------------------------------------------
# Input files, formats and column kinds
# ------------------------------------------------------------------------------------------------

_PARQUET = (".parquet", ".pq")
_JSONL = (".jsonl", ".json", ".ndjson")

# A column's kind says which types are accepted and what it is normalised to.
_KIND_EXPECTED = {
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
_KIND_FIX = {
    "id": "store ids as strings, e.g. df['{c}'] = df['{c}'].astype(str) before writing",
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
_KIND_JSON = {
    "id": (str, int), "str": (str,), "label": (str, int), "text": (str, list, int, float), "paths": (str, list),
    "time": (str, int, float), "num": (int, float), "vec": (list,), "vecs": (list,),
}
_CANONICAL = {
    "id": pa.string(), "str": pa.string(), "label": pa.string(),
    "text": pa.list_(pa.string()), "paths": pa.list_(pa.string()),
    "time": pa.int64(),  # epoch milliseconds, UTC
    "num": pa.float64(), "vec": pa.list_(pa.float32()), "vecs": pa.list_(pa.list_(pa.float32())),
}

_LOG_KINDS = {
    schema.SURFACE: "str", schema.ENGAGEMENT: "str", schema.PRODUCT_ID: "id", schema.TIMESTAMP: "time",
    schema.USER_ID: "label", schema.WEIGHT: "num", schema.QUERY_TEXT: "str",
    schema.QUERY_EMBEDDING: "vec", schema.QUERY_IMAGE_PATH: "str",
}
_LOG_REQUIRED = (schema.SURFACE, schema.ENGAGEMENT, schema.PRODUCT_ID, schema.TIMESTAMP)
# train.parquet / eval.parquet. Only user_id, query_text and query_embedding hold nulls.
LOG_SCHEMA = pa.schema([
    (schema.SURFACE, pa.string()),
    (schema.ENGAGEMENT, pa.string()),
    (schema.PRODUCT_ID, pa.string()),
    (schema.TIMESTAMP, pa.timestamp("ms", tz="UTC")),
    (schema.USER_ID, pa.string()),
    (schema.WEIGHT, pa.float32()),
    (schema.QUERY_TEXT, pa.string()),
    (schema.QUERY_EMBEDDING, pa.list_(pa.float32())),
])


def _catalog_kinds(text_columns: Sequence[str]) -> dict[str, str]:
    kinds = {schema.PRODUCT_ID: "id", schema.IMAGE_EMBEDDINGS: "vecs", schema.IMAGE_PATHS: "paths"}
    kinds.update({f: "text" for f in text_columns})
    return kinds


def _strlike(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _listlike(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _arrow_accepts(kind: str, t: pa.DataType) -> bool:
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
            _listlike(t.value_type) and _arrow_accepts("vec", t.value_type)))
    raise ValueError(kind)


@dataclass
class _Source:
    """One input file, read in streaming batches of a Parquet RecordBatch or a list of JSON dicts."""

    path: Path
    role: str
    fmt: str  # "parquet" | "jsonl"
    num_rows: int | None = None  # known from Parquet metadata; for JSON Lines after a full pass

    def batches(self, batch_rows: int, columns: Sequence[str] | None = None) -> Iterator[tuple[int, Any]]:
        """Yield (index of the batch's first row, batch)."""
        if self.fmt == "parquet":
            yield from self._parquet_batches(batch_rows, columns)
        else:
            yield from self._jsonl_batches(batch_rows)

    def _parquet_batches(self, batch_rows: int, columns: Sequence[str] | None) -> Iterator[tuple[int, Any]]:
        try:
            pf = pq.ParquetFile(self.path)
            if columns is not None:
                columns = [c for c in columns if c in pf.schema_arrow.names]
            start = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield start, batch
                start += batch.num_rows
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.role} file {self.path}: could not be read as Parquet ({e}). "
                            "Check that the file is complete and not corrupted.") from e

    def _jsonl_batches(self, batch_rows: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        records: list[dict[str, Any]] = []
        start = 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise DataError(
                        f"{self.role} file {self.path}, line {line_no}: not valid JSON ({e}). Expected JSON "
                        "Lines: one JSON object per line. Fix or remove that line.") from e
                if not isinstance(record, dict):
                    raise DataError(
                        f"{self.role} file {self.path}, line {line_no}: expected a JSON object "
                        f"({{\"column\": value, ...}}), found a {type(record).__name__}. Write one object per line.")
                records.append(record)
                if len(records) >= batch_rows:
                    yield start, records
                    start += len(records)
                    records = []
        if records:
            yield start, records


def _input_files(path: str | Path, role: str) -> list[_Source]:
    path = Path(path)
    option = f"--{role}"
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        files = [p for p in entries if p.suffix.lower() in _PARQUET + _JSONL]
        skipped = [p.name for p in entries if p not in files]
        if skipped:
            log.warning("%s directory %s: skipping files that are neither Parquet nor JSON Lines: %s",
                        role, path, ", ".join(skipped[:10]))
        if not files:
            raise DataError(f"{role} directory {path} holds no .parquet, .jsonl or .json files. "
                            f"Point {option} at a file or a directory of such files.")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{role} path {path} does not exist. Point {option} at a .parquet/.jsonl file "
                        "or a directory of them.")
    sources = []
    for p in files:
        suffix = p.suffix.lower()
        if suffix not in _PARQUET + _JSONL:
            raise DataError(f"{role} file {p}: unknown format '{suffix or '(no extension)'}'; expected "
                            ".parquet or .jsonl/.json (JSON Lines). Rename or convert the file.")
        sources.append(_Source(p, role, "parquet" if suffix in _PARQUET else "jsonl"))
    return sources


def _check_schema(src: _Source, kinds: dict[str, str], required: Sequence[str]) -> None:
    """Refuse a file that cannot be used at all: unreadable, no rows, required column missing or of
    the wrong type. Cheap: Parquet metadata, or the first 1,000 JSON records."""
    where = f"{src.role} file {src.path}"
    if src.fmt == "parquet":
        try:
            meta = pq.read_metadata(src.path)
            arrow_schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{where}: could not be read as Parquet ({e}). Check the file is a complete "
                            "Parquet file, or rename it to .jsonl if it holds JSON Lines.") from e
        src.num_rows = meta.num_rows
        names = arrow_schema.names
        found = {name: str(arrow_schema.field(name).type) for name in names}
        bad = [name for name in names
               if name in kinds and not _arrow_accepts(kinds[name], arrow_schema.field(name).type)]
        rows = meta.num_rows
    else:
        try:
            first = next(src.batches(1000), (0, []))[1]
        except OSError as e:
            raise DataError(f"{where}: could not be read ({e}).") from e
        rows = len(first)
        names = list(dict.fromkeys(k for record in first for k in record))
        found, bad = {}, []
        for name in names:
            values = [r[name] for r in first if r.get(name) is not None]
            types = sorted({"bool" if isinstance(v, bool) else "integer" if isinstance(v, int)
                            else type(v).__name__ for v in values})
            found[name] = " / ".join(types) or "null"
            if name in kinds and values and not any(
                    isinstance(v, _KIND_JSON[kinds[name]]) and not isinstance(v, bool) for v in values):
                bad.append(name)
    if rows == 0:
        raise DataError(f"{where}: has no rows. Remove the empty file or point --{src.role} at a file with data.")
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(
            f"{where}: required column '{missing[0]}' is missing (expected {_KIND_EXPECTED[kinds[missing[0]]]}; "
            f"found columns: {', '.join(names) or 'none'}). Add the column, or rename the column that holds it.")
    if bad:
        c = bad[0]
        raise DataError(f"{where}: column '{c}' has type {found[c]}, expected {_KIND_EXPECTED[kinds[c]]}. "
                        f"Fix: {_KIND_FIX[kinds[c]].format(c=c)}.")


def _fingerprint(path: Path, sha256_max_bytes: int) -> str:
    stat = path.stat()
    if stat.st_size > sha256_max_bytes:
        return f"size-mtime:{stat.st_size}:{stat.st_mtime_ns}"
    return f"sha256:{artifacts.sha256_file(path)}"


# ------------------------------------------------------------------------------------------------
# Normalising one column to its canonical Arrow type
# ------------------------------------------------------------------------------------------------

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MS = dt.timedelta(milliseconds=1)
_MIN_MS = (dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc) - _EPOCH) // _MS
_MAX_MS = (dt.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=dt.timezone.utc) - _EPOCH) // _MS
_SECONDS_BELOW = 10**11  # an epoch number below this magnitude is seconds, else milliseconds

# column errors: row -> (reason or None for the column's default reason, detail)
Errors = dict[int, tuple[str | None, str]]


def _parse_iso_ms(text: str) -> int | None:
    """Epoch milliseconds of an ISO-8601 time (no zone = UTC), or None."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except (ValueError, TypeError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return (when - _EPOCH) // _MS


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
        ms = _parse_iso_ms(value)
        return (ms, None) if ms is not None else (None, f"timestamp {value!r} is not an ISO-8601 time")
    if isinstance(value, dt.datetime):
        value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return (value - _EPOCH) // _MS, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ms = _epoch_ms(value)
        return (ms, None) if ms is not None else (None, f"timestamp {value!r} is not a usable epoch time")
    return None, f"timestamp {value!r} ({type(value).__name__}) is neither an ISO-8601 string nor an epoch number"


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


def _from_arrow(kind: str, arr: pa.Array) -> tuple[pa.Array, Errors]:
    """A Parquet column (already type-checked) in its canonical type."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
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
    from itemsage.features import field_strings

    errors: Errors = {}
    if kind in ("text", "paths"):
        return pa.array([field_strings(v) for v in values], _CANONICAL[kind]), {}
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
        if v is None or (isinstance(v, ok_types) and not isinstance(v, bool)):
            out.append(v if v is None or kind == "num" else str(v))
        elif kind == "label":  # a user id is only carried along: keep any value as text
            out.append(json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        else:
            errors[i] = (None, f"{name} must be {_KIND_EXPECTED[kind].replace(' column', '')} "
                               f"value, got {type(v).__name__} {_short(v)}")
            out.append(None)
    return pa.array(out, _CANONICAL[kind]), errors


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


def _canonical(src: _Source, batch: Any, kinds: dict[str, str]) -> tuple[int, dict[str, pa.Array], dict[str, Errors]]:
    """(rows, canonical columns, row errors per column) of one batch; absent columns are null."""
    columns: dict[str, pa.Array] = {}
    errors: dict[str, Errors] = {}
    if src.fmt == "parquet":
        n = batch.num_rows
        for name, kind in kinds.items():
            arr = batch.column(name) if name in batch.schema.names else pa.nulls(n)
            columns[name], errors[name] = _from_arrow(kind, arr)
    else:
        n = len(batch)
        for name, kind in kinds.items():
            columns[name], errors[name] = _from_json(kind, name, [r.get(name) for r in batch])
    return n, columns, errors


def _raw_record(src: _Source, batch: Any, i: int) -> dict[str, Any]:
    row = batch.slice(i, 1).to_pylist()[0] if src.fmt == "parquet" else batch[i]
    return _json_safe(row)


def _json_safe(value: Any) -> Any:
    """A value JSON can hold: NaN/inf become the strings "NaN"/"Infinity"/"-Infinity", times ISO text."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return str(value)


# ------------------------------------------------------------------------------------------------
# Row checks
# ------------------------------------------------------------------------------------------------


class _Rejector:
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


def _member(values: list[Any], allowed: Any) -> np.ndarray:
    """[n] bool: value in `allowed` (a Python set lookup per row; None is never a member)."""
    allowed = allowed if isinstance(allowed, (set, frozenset)) else frozenset(allowed)
    return np.fromiter((v in allowed for v in values), bool, count=len(values))


def _np(arr: pa.Array, fill: Any) -> np.ndarray:
    return arr.fill_null(fill).to_numpy(zero_copy_only=False)


def _present(arr: pa.Array) -> np.ndarray:
    """[n] bool: a string that is not null or blank."""
    return _np(pc.not_equal(pc.utf8_trim_whitespace(arr), ""), False)


def _vector_stats(vectors: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a list<float32> array: (length [n] with null = 0, has a non-finite value [n], flat values)."""
    n = len(vectors)
    lengths = _np(pc.list_value_length(vectors), 0).astype(np.int64)
    values = _np(pc.list_flatten(vectors), np.nan).astype(np.float32, copy=False)
    parents = pc.list_parent_indices(vectors).to_numpy()
    nonfinite = np.bincount(parents[~np.isfinite(values)], minlength=n) > 0
    return lengths, nonfinite, values


def _nested(blocks: list[np.ndarray], dim: int) -> pa.Array:
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


class _Extras:
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
            arrays = [pa.nulls(c) if isinstance(c, int) else c if isinstance(c, pa.Array) else _loose_array(c)
                      for c in chunks]
            try:
                out[name] = pa.concat_tables(
                    [pa.table({name: a}) for a in arrays], promote_options="permissive").column(name)
            except (pa.ArrowException, TypeError):  # types clash across files: keep as JSON text
                values = [v for a in arrays for v in a.to_pylist()]
                out[name] = pa.chunked_array([_loose_array(values, force_json=True)])
        return out


def _loose_array(values: list[Any], force_json: bool = False) -> pa.Array:
    if not force_json:
        try:
            return pa.array(values)
        except (pa.ArrowException, TypeError, ValueError):
            pass
    return pa.array([None if v is None else json.dumps(_json_safe(v), ensure_ascii=False) for v in values], pa.string())


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


class _SplitWriter:
    """One split's kept log rows: sorted runs in a scratch Arrow IPC file (fast to write, read back by
    record batch, deleted at the end), then written to Parquet in time order."""

    GROUP_ROWS = 4096  # small record batches keep each one's time range narrow, so a slab reads few

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.writer: pa.ipc.RecordBatchFileWriter | None = None
        self.group_min: list[int] = []
        self.group_max: list[int] = []
        self.minutes: collections.Counter[int] = collections.Counter()
        self.tasks: collections.Counter[str] = collections.Counter()
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.take(pc.sort_indices(table, [(schema.TIMESTAMP, "ascending")])).combine_chunks()  # stable
        ts = table.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()
        if self.writer is None:
            self.writer = pa.ipc.new_file(self.scratch, LOG_SCHEMA)
        start = 0
        for batch in table.to_batches(max_chunksize=self.GROUP_ROWS):
            self.writer.write_batch(batch)
            self.group_min.append(int(ts[start]))
            self.group_max.append(int(ts[start + batch.num_rows - 1]))
            start += batch.num_rows
        minutes, counts = np.unique(ts // 60_000, return_counts=True)
        self.minutes.update(dict(zip(minutes.tolist(), counts.tolist())))
        for row in table.group_by([schema.SURFACE, schema.ENGAGEMENT]).aggregate([([], "count_all")]).to_pylist():
            self.tasks[schema.task_name(row[schema.SURFACE], row[schema.ENGAGEMENT])] += row["count_all"]
        self.rows += table.num_rows

    def finish(self, target: Path, sort_rows: int, on_rows: Callable[[int], None]) -> None:
        """Write `target` sorted by timestamp (ties keep input order), one time slab at a time."""
        with artifacts.atomic_path(target) as tmp:
            out = pq.ParquetWriter(tmp, LOG_SCHEMA)
            if self.writer is None:
                out.write_table(LOG_SCHEMA.empty_table())
            else:
                self.writer.close()
                with pa.memory_map(str(self.scratch)) as source:
                    scratch = pa.ipc.open_file(source)
                    if scratch.num_record_batches != len(self.group_min):
                        raise RuntimeError(f"{self.scratch}: expected {len(self.group_min)} record batches, "
                                           f"found {scratch.num_record_batches}")
                    lo_g, hi_g = np.asarray(self.group_min), np.asarray(self.group_max)
                    for lo, hi in self._slabs(sort_rows):
                        groups = np.flatnonzero((lo_g < hi) & (hi_g >= lo)).tolist()
                        slab = pa.Table.from_batches([scratch.get_batch(i) for i in groups], LOG_SCHEMA)
                        ts = slab.column(schema.TIMESTAMP).cast(pa.int64())
                        slab = slab.filter(pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi)))
                        slab = slab.take(pc.sort_indices(slab, [(schema.TIMESTAMP, "ascending")]))
                        out.write_table(slab)
                        on_rows(slab.num_rows)
                self.scratch.unlink()
            out.close()

    def _slabs(self, sort_rows: int) -> list[tuple[int, int]]:
        """[lo, hi) ms ranges of whole minutes with about `sort_rows` rows each, covering every row."""
        slabs, start, rows = [], None, 0
        minutes = sorted(self.minutes)
        for i, minute in enumerate(minutes):
            start = minute if start is None else start
            rows += self.minutes[minute]
            if rows >= sort_rows or i == len(minutes) - 1:
                hi = (minutes[i + 1] if i + 1 < len(minutes) else minute + 1) * 60_000
                slabs.append((start * 60_000, hi))
                start, rows = None, 0
        return slabs


class _Ingest:
    """State of one ingest run: the catalog ids, the widths fixed so far, the counts, the rejects."""

    def __init__(self, config: IngestConfig, tmp: Path, progress: Any, image_encoder: Any):
        self.config = config
        self.tmp = tmp
        self.progress = progress
        self._image_encoder = image_encoder
        self.text_columns = schema.TEXT_FIELDS + tuple(f for f in config.text_fields if f not in schema.TEXT_FIELDS)
        self.rejects_file = open(tmp / schema.REJECTS_FILE, "w", encoding="utf-8")
        self.reject_counts: collections.Counter[str] = collections.Counter()
        self.stats: list[InputStats] = []
        self.seen_ids: set[str] = set()
        self.kept_ids: set[str] = set()
        self.image_dim: int | None = config.image_dim
        self.query_dims: dict[str, int] = {}
        self.images_truncated = 0

    # -- shared helpers

    def close_rejects(self) -> None:
        if not self.rejects_file.closed:
            self.rejects_file.flush()
            os.fsync(self.rejects_file.fileno())
            self.rejects_file.close()

    def image_encoder(self) -> Any:
        if self._image_encoder is None:
            from itemsage.image_encoder import ImageEncoder

            self._image_encoder = ImageEncoder()
        return self._image_encoder

    def image_encoder_dim(self) -> int:
        if self._image_encoder is not None:
            return int(self._image_encoder.dim)
        from itemsage.image_encoder import ImageEncoder

        return int(ImageEncoder.dim)

    def encode_images(self, paths: list[str]) -> tuple[np.ndarray, list[str | None]]:
        encoder = self.image_encoder()
        vectors, errors = encoder.encode_paths(paths, batch_size=self.config.image_batch_size, progress=False)
        return np.asarray(vectors, dtype=np.float32), list(errors)

    def write_rejects(self, src: _Source, batch: Any, start: int, rejector: _Rejector) -> int:
        rows = np.flatnonzero(~rejector.alive)
        for r in rows:
            reason = schema.REJECT_REASONS[rejector.code[r]]
            self.reject_counts[reason] += 1
            entry = {"file": str(src.path), "row": start + int(r), "reason": reason,
                     "detail": rejector.details[int(r)], "record": _raw_record(src, batch, int(r))}
            self.rejects_file.write(json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n")
        return len(rows)

    # -- catalog

    def read_catalog(self, sources: list[_Source]) -> pa.Table:
        kinds = _catalog_kinds(self.text_columns)
        tables: list[pa.Table] = []
        extras = _Extras()
        task = self.progress.add_task("catalog", total=_total_rows(sources))
        for src in sources:
            stats = InputStats(str(src.path), "catalog")
            self.stats.append(stats)
            for start, batch in src.batches(self.config.batch_rows):
                n, cols, errors = _canonical(src, batch, kinds)
                rejector = _Rejector(n)
                table = self._catalog_batch(src, n, cols, errors, rejector)
                keep = rejector.alive
                if src.fmt == "parquet":
                    extra = {c: batch.column(c).filter(pa.array(keep)) for c in batch.schema.names if c not in kinds}
                else:
                    names = dict.fromkeys(k for r in batch for k in r if k not in kinds)
                    extra = {c: [r.get(c) for r, k in zip(batch, keep) if k] for c in names}
                if schema.CONTENT_HASH in extra:
                    log.warning("%s: ignoring the input column '%s'; ingest computes it", src.path, schema.CONTENT_HASH)
                    del extra[schema.CONTENT_HASH]
                tables.append(table)
                extras.add(extra, table.num_rows)
                stats.rows_read += n
                stats.rows_rejected += self.write_rejects(src, batch, start, rejector)
                stats.rows_kept += table.num_rows
                self.progress.advance(task, n)
        products = pa.concat_tables(tables)
        for name, column in extras.columns().items():
            products = products.append_column(name, column)
        return products

    def _catalog_batch(self, src: _Source, n: int, cols: dict[str, pa.Array], errors: dict[str, Errors],
                       rej: _Rejector) -> pa.Table:
        """Check one catalog batch (rejections land in `rej`) and return its kept products."""
        max_images = self.config.max_images
        ids = cols[schema.PRODUCT_ID].to_pylist()
        rej.reject_errors(errors[schema.PRODUCT_ID], "missing_product_id")
        rej.reject(~_present(cols[schema.PRODUCT_ID]), "missing_product_id", "product_id is missing or empty")
        duplicate = np.zeros(n, bool)
        for r in np.flatnonzero(rej.alive):  # the first row with an id claims it, kept or not
            if ids[r] in self.seen_ids:
                duplicate[r] = True
            else:
                self.seen_ids.add(ids[r])
        rej.reject(duplicate, "duplicate_product_id",
                   lambda r: f"product_id {ids[r]!r} appeared in an earlier catalog row; the first one is kept")

        # Given image vectors: cut to max_images, then NaN/inf. [I] below = all image vectors of the batch.
        rej.reject_errors(errors[schema.IMAGE_EMBEDDINGS], "non_finite_vector")
        given = cols[schema.IMAGE_EMBEDDINGS]
        given_counts = _np(pc.list_value_length(given), 0)  # [n] before the cut
        given = pc.list_slice(given, 0, max_images)
        given_kept = np.minimum(given_counts, max_images)  # [n]
        inner = pc.list_flatten(given)  # [I] list<float32>
        inner_row = pc.list_parent_indices(given).to_numpy()  # [I] row of each vector
        widths, vec_bad, values = _vector_stats(inner)  # [I], [I], flat values
        row_nonfinite = np.bincount(inner_row[vec_bad], minlength=n) > 0
        rej.reject(row_nonfinite, "non_finite_vector",
                   lambda r: f"image vector {int(np.flatnonzero(vec_bad[inner_row == r])[0])} contains NaN or inf")

        # Image files, for products without given vectors.
        rej.reject_errors(errors[schema.IMAGE_PATHS], "unreadable_image")
        paths_col = cols[schema.IMAGE_PATHS]
        path_counts = _np(pc.list_value_length(paths_col), 0)
        use_paths = rej.alive & (given_counts == 0) & (path_counts > 0)
        encoded: dict[int, np.ndarray] = {}  # row -> [m, D] vectors of its image files
        if use_paths.any():
            rows = np.flatnonzero(use_paths)
            row_paths = [[str(_resolve(src, p)) for p in paths_col[int(r)].as_py()[:max_images]] for r in rows]
            vectors, errs = self.encode_images([p for ps in row_paths for p in ps])
            failed: dict[int, str] = {}
            at = 0
            for r, ps in zip(rows, row_paths):
                bad = [_image_error(p, e) for p, e in zip(ps, errs[at:at + len(ps)]) if e is not None]
                if bad:
                    failed[int(r)] = bad[0]
                else:
                    encoded[int(r)] = vectors[at:at + len(ps)]
                at += len(ps)
            rej.reject(np.isin(np.arange(n), list(failed)), "unreadable_image", lambda r: failed[r])
        image_counts = np.where(use_paths, path_counts, given_counts)  # [n] before the cut

        # Image width: the first valid vector (in row order) fixes it, unless configured.
        alive = rej.alive
        if self.image_dim is None:
            firsts = []
            candidates = np.flatnonzero(~vec_bad & (widths > 0) & alive[inner_row])
            if len(candidates):
                firsts.append((int(inner_row[candidates[0]]), int(widths[candidates[0]])))
            firsts += [(r, v.shape[1]) for r, v in encoded.items() if alive[r]][:1]
            if firsts:
                self.image_dim = min(firsts)[1]
                log.info("image width %d, fixed by the first valid image vector", self.image_dim)
        dim = self.image_dim
        # With no width yet, every vector an alive row has is empty (width 0): wrong too.
        wrong = np.bincount(inner_row[(widths != dim) if dim is not None else (widths == 0)], minlength=n) > 0
        for r, v in encoded.items():
            wrong[r] |= v.shape[1] != dim
        rej.reject(wrong, "bad_vector_width", lambda r: self._image_width_detail(r, encoded, widths, inner_row))

        # Kept products: text lists, images [m, D], content hash.
        keep = rej.alive
        keep_rows = np.flatnonzero(keep)
        self.images_truncated += int((image_counts[keep] > max_images).sum())
        mask = pa.array(keep)
        texts = {f: cols[f].filter(mask) for f in self.text_columns}
        text_lists = [texts[f].to_pylist() for f in self.text_columns]
        starts = np.concatenate([[0], np.cumsum(given_kept)])  # first vector of each row in [I]
        vec_starts = np.concatenate([[0], np.cumsum(widths)])  # first value of each vector
        blocks, hashes = [], []
        for j, r in enumerate(keep_rows):
            if r in encoded:
                block = encoded[r]
            elif given_kept[r]:
                a, b = vec_starts[starts[r]], vec_starts[starts[r + 1]]
                block = values[a:b].reshape(given_kept[r], dim)
            else:
                block = np.zeros((0, dim or 0), np.float32)
            blocks.append(block)
            hashes.append(content_hash([t[j] for t in text_lists], block))
        self.kept_ids.update(ids[r] for r in keep_rows)
        columns = {schema.PRODUCT_ID: cols[schema.PRODUCT_ID].filter(mask), **texts,
                   schema.IMAGE_EMBEDDINGS: _nested(blocks, dim or 0),
                   schema.CONTENT_HASH: pa.array(hashes, pa.string())}
        return pa.table(columns)

    def _image_width_detail(self, r: int, encoded: dict[int, np.ndarray], widths: np.ndarray,
                            inner_row: np.ndarray) -> str:
        how = "--image-dim" if self.config.image_dim is not None else "the first valid image vector"
        if r in encoded:
            return (f"image files encode to {encoded[r].shape[1]}-d vectors, but the dataset's image width is "
                    f"{self.image_dim} (fixed by {how})")
        row_widths = widths[inner_row == r]
        if self.image_dim is None:
            return f"image vector {int(np.flatnonzero(row_widths == 0)[0])} is empty"
        j = int(np.flatnonzero(row_widths != self.image_dim)[0])
        return (f"image vector {j} has width {int(row_widths[j])}, the dataset's image width is "
                f"{self.image_dim} (fixed by {how})")

    # -- logs

    def time_span(self, sources: list[_Source]) -> tuple[int, int] | None:
        """(min, max) epoch ms of every readable timestamp: a pass over the timestamp column only."""
        lo, hi = None, None
        task = self.progress.add_task("time span", total=_total_rows(sources))
        for src in sources:
            rows = 0
            for _, batch in src.batches(self.config.batch_rows, [schema.TIMESTAMP]):
                n, cols, _ = _canonical(src, batch, {schema.TIMESTAMP: "time"})
                ts = cols[schema.TIMESTAMP]
                if ts.null_count < n:
                    span = pc.min_max(ts)
                    b_lo, b_hi = span["min"].as_py(), span["max"].as_py()
                    lo, hi = (b_lo, b_hi) if lo is None else (min(lo, b_lo), max(hi, b_hi))
                rows += n
                self.progress.advance(task, n)
            src.num_rows = rows
        return None if lo is None else (lo, hi)

    def read_logs(self, sources: list[_Source], split_ms: int, train: _SplitWriter, eval_: _SplitWriter) -> None:
        task = self.progress.add_task("logs", total=_total_rows(sources))
        for src in sources:
            stats = InputStats(str(src.path), "logs")
            self.stats.append(stats)
            for start, batch in src.batches(self.config.batch_rows, list(_LOG_KINDS)):
                n, cols, errors = _canonical(src, batch, _LOG_KINDS)
                rejector = _Rejector(n)
                table = self._log_batch(src, n, cols, errors, rejector)
                ts = table.column(schema.TIMESTAMP).cast(pa.int64())
                is_eval = pc.greater_equal(ts, split_ms)
                train.add(table.filter(pc.invert(is_eval)))
                eval_.add(table.filter(is_eval))
                stats.rows_read += n
                stats.rows_rejected += self.write_rejects(src, batch, start, rejector)
                stats.rows_kept += table.num_rows
                self.progress.advance(task, n)

    def _log_batch(self, src: _Source, n: int, cols: dict[str, pa.Array], errors: dict[str, Errors],
                   rej: _Rejector) -> pa.Table:
        """Check one batch of log rows (rejections land in `rej`) and return its kept rows."""
        ids = cols[schema.PRODUCT_ID].to_pylist()
        surface = cols[schema.SURFACE].to_pylist()
        engagement = cols[schema.ENGAGEMENT].to_pylist()
        rej.reject_errors(errors[schema.PRODUCT_ID], "missing_product_id")
        rej.reject(~_present(cols[schema.PRODUCT_ID]), "missing_product_id", "product_id is missing or empty")
        rej.reject_errors(errors[schema.SURFACE], "unknown_surface")
        rej.reject(~_member(surface, schema.SURFACES), "unknown_surface",
                   lambda r: f"surface {surface[r]!r} is not one of {', '.join(schema.SURFACES)}")
        rej.reject_errors(errors[schema.ENGAGEMENT], "unknown_engagement")
        rej.reject(~_member(engagement, schema.ENGAGEMENTS), "unknown_engagement",
                   lambda r: f"engagement {engagement[r]!r} is not one of {', '.join(schema.ENGAGEMENTS)}")
        rej.reject_errors(errors[schema.TIMESTAMP], "bad_timestamp")
        rej.reject(~_np(pc.is_valid(cols[schema.TIMESTAMP]), False), "bad_timestamp", "timestamp is missing")
        rej.reject_errors(errors[schema.WEIGHT], "bad_weight")
        weight = _np(cols[schema.WEIGHT], 1.0)
        rej.reject(~(np.isfinite(weight) & (weight >= 0)), "bad_weight",
                   lambda r: f"weight {weight[r]} must be a finite number >= 0")

        # The query: search needs text or a vector, closeup a vector or an image, home a vector.
        rej.reject_errors(errors[schema.QUERY_TEXT], "missing_query")
        rej.reject_errors(errors[schema.QUERY_IMAGE_PATH], "unreadable_image")
        rej.reject_errors(errors[schema.QUERY_EMBEDDING], "non_finite_vector")
        emb = cols[schema.QUERY_EMBEDDING]
        emb_len, emb_nonfinite, _ = _vector_stats(emb)
        has_emb = emb_len > 0
        has_text = _present(cols[schema.QUERY_TEXT])
        has_img = _present(cols[schema.QUERY_IMAGE_PATH])
        surf = np.array(surface, dtype=object)
        is_search, is_closeup, is_home = (surf == "search"), (surf == "closeup"), (surf == "home")
        ok_query = (is_search & (has_text | has_emb)) | (is_closeup & (has_emb | has_img)) | (is_home & has_emb)
        needs = {"search": "query_text or query_embedding", "closeup": "query_embedding or query_image_path",
                 "home": "query_embedding"}
        rej.reject(~ok_query, "missing_query", lambda r: f"a {surface[r]} row needs {needs[surface[r]]}")

        rej.reject(~_member(ids, self.kept_ids), "unknown_product",
                   lambda r: f"product_id {ids[r]!r} is not in the catalog (or its catalog row was rejected)")
        rej.reject(has_emb & emb_nonfinite, "non_finite_vector", "query_embedding contains NaN or inf")

        # Query width: the vector's length, or the width its encoder will give; one per surface.
        implied = emb_len.copy()
        text_only = is_search & has_text & ~has_emb
        image_only = is_closeup & has_img & ~has_emb
        if (text_only & rej.alive).any():
            implied[text_only] = _text_query_dim()
        if (image_only & rej.alive).any():
            implied[image_only] = self.image_encoder_dim()
        alive = rej.alive
        for s in schema.SURFACES:
            rows = np.flatnonzero(alive & (surf == s))
            if s not in self.query_dims and len(rows):
                self.query_dims[s] = int(implied[rows[0]])
                log.info("%s query width %d, fixed by %s row %d", s, self.query_dims[s], src.path, rows[0])
        expected = np.array([self.query_dims.get(s, -1) if isinstance(s, str) else -1 for s in surface], dtype=np.int64)
        rej.reject(implied != expected, "bad_vector_width", lambda r: _query_width_detail(
            surface[r], int(implied[r]), int(expected[r]), bool(text_only[r]), bool(image_only[r])))

        # Closeup image queries: encode now, store as query_embedding.
        encode = image_only & rej.alive
        if encode.any():
            rows = np.flatnonzero(encode)
            paths_col = cols[schema.QUERY_IMAGE_PATH]
            paths = [str(_resolve(src, paths_col[int(r)].as_py())) for r in rows]
            vectors, errs = self.encode_images(paths)
            failed = {int(r): _image_error(p, e) for r, p, e in zip(rows, paths, errs) if e is not None}
            rej.reject(np.isin(np.arange(n), list(failed)), "unreadable_image", lambda r: failed[r])
            # Splice the vectors in: take from [given rows ; encoded rows].
            take = np.arange(n)
            take[rows] = n + np.arange(len(rows))
            new = pa.array(list(vectors), pa.list_(pa.float32())) if len(rows) else pa.nulls(0, emb.type)
            emb = pa.concat_arrays([emb, new]).take(pa.array(take))

        keep = pa.array(rej.alive)
        columns = {
            schema.SURFACE: cols[schema.SURFACE], schema.ENGAGEMENT: cols[schema.ENGAGEMENT],
            schema.PRODUCT_ID: cols[schema.PRODUCT_ID],
            schema.TIMESTAMP: cols[schema.TIMESTAMP].cast(pa.timestamp("ms", tz="UTC")),
            schema.USER_ID: cols[schema.USER_ID],
            schema.WEIGHT: pa.array(weight.astype(np.float32)),
            schema.QUERY_TEXT: cols[schema.QUERY_TEXT],
            schema.QUERY_EMBEDDING: emb,
        }
        return pa.Table.from_pydict(columns).filter(keep).cast(LOG_SCHEMA)


def _query_width_detail(surface: str, got: int, expected: int, text_only: bool, image_only: bool) -> str:
    what = ("query_text stands for a {g}-d text-encoder vector" if text_only else
            "query_image_path encodes to a {g}-d image vector" if image_only else
            "query_embedding has width {g}").format(g=got)
    return (f"{what}, but {surface} query vectors in this dataset are {expected}-d (fixed by the first "
            f"valid {surface} row); give all {surface} rows query vectors of one width")


def _image_error(path: str, error: str) -> str:
    return error if path in error else f"could not read image {path}: {error}"


def _text_query_dim() -> int:
    try:
        from itemsage.query_encoder import TextQueryEncoder

        return int(TextQueryEncoder.dim)
    except ImportError:
        return TEXT_QUERY_DIM


def _total_rows(sources: list[_Source]) -> int | None:
    """Rows of all sources, when known (Parquet metadata; JSON Lines after the time-span pass)."""
    return None if any(s.num_rows is None for s in sources) else sum(s.num_rows for s in sources)


def _resolve(src: _Source, path: str) -> Path:
    """Relative image paths are relative to the directory of the file that names them."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else src.path.parent / p


def _check_out(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; ingest writes a directory. Choose another --out.")
    manifest = out / artifacts.MANIFEST
    kind = None
    if manifest.is_file():
        try:
            kind = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError):
            kind = None
    if any(out.iterdir()) and kind != "dataset":
        raise ConfigError(f"--out {out} exists and is not an itemsage dataset; ingest will not overwrite "
                          "it. Choose another --out or remove the directory.")


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished temp directory into place (an old dataset there is removed)."""
    old = None
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    artifacts._fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _iso(ms: int) -> str:
    when = _EPOCH + dt.timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def ingest(catalog: str | Path, logs: str | Path, out: str | Path, config: IngestConfig | None = None, *,
           image_encoder: Any = None) -> IngestSummary:
    """Validate, normalise and time-split `catalog` and `logs` into the dataset directory `out`.

    `catalog` and `logs` are a .parquet/.jsonl/.json file or a directory of them. `image_encoder`
    (anything with `dim` and `encode_paths`) replaces the built-in ImageEncoder, which is otherwise
    loaded only when an image path needs encoding. Raises DataError for an unusable input file
    (before anything is written) and ConfigError for a bad option.
    """
    from rich.progress import MofNCompleteColumn, Progress

    config = config or IngestConfig()
    out = Path(out)
    catalog_sources = _input_files(catalog, "catalog")
    log_sources = _input_files(logs, "logs")
    text_columns = schema.TEXT_FIELDS + tuple(f for f in config.text_fields if f not in schema.TEXT_FIELDS)
    for src in catalog_sources:
        _check_schema(src, _catalog_kinds(text_columns), [schema.PRODUCT_ID])
    for src in log_sources:
        _check_schema(src, _LOG_KINDS, _LOG_REQUIRED)
    _check_out(out)

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ".scratch").mkdir(parents=True)
    run: _Ingest | None = None
    try:
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not config.progress) as progress:
            run = _Ingest(config, tmp, progress, image_encoder)
            products = run.read_catalog(catalog_sources)
            if products.num_rows == 0:
                log.warning("no catalog row was kept; every log row will be rejected (see %s)", schema.REJECTS_FILE)

            if config.split_at is not None:
                split_ms = _parse_iso_ms(config.split_at)
            else:
                span = run.time_span(log_sources)
                lo, hi = span or (0, 0)
                split_ms = hi - int(config.eval_fraction * (hi - lo))
            log.info("split at %s: rows at or after it are eval", _iso(split_ms))
            train = _SplitWriter(tmp / ".scratch" / "train.parquet")
            eval_ = _SplitWriter(tmp / ".scratch" / "eval.parquet")
            run.read_logs(log_sources, split_ms, train, eval_)
            run.close_rejects()

            artifacts.atomic_write_parquet(tmp / schema.PRODUCTS_FILE, products)
            task = progress.add_task("sorting train/eval", total=train.rows + eval_.rows)
            for writer, name in ((train, schema.TRAIN_FILE), (eval_, schema.EVAL_FILE)):
                writer.finish(tmp / name, config.sort_rows, lambda k: progress.advance(task, k))
            shutil.rmtree(tmp / ".scratch")

        from itemsage.features import Vocabulary

        vocab = Vocabulary.build(
            (v for f in config.text_fields for chunk in products.column(f).chunks for v in chunk.to_pylist()),
            max_unigrams=config.max_unigrams, max_bigrams=config.max_bigrams, max_trigrams=config.max_trigrams)
        vocab.save(tmp / schema.VOCAB_FILE)

        rejects = {reason: run.reject_counts.get(reason, 0) for reason in schema.REJECT_REASONS}
        train_rows = {t: train.tasks.get(t, 0) for t in schema.ALL_TASKS}
        eval_rows = {t: eval_.tasks.get(t, 0) for t in schema.ALL_TASKS}
        image_dim = run.image_dim or 0
        counts = {
            "products": products.num_rows, "catalog_rows": sum(s.rows_read for s in run.stats if s.role == "catalog"),
            "log_rows": sum(s.rows_read for s in run.stats if s.role == "logs"),
            "rejects": rejects, "rejected": sum(rejects.values()),
            "train_rows": train_rows, "eval_rows": eval_rows, "train": train.rows, "eval": eval_.rows,
            "image_dim": image_dim, "query_dims": dict(run.query_dims), "images_truncated": run.images_truncated,
            "vocab_size": len(vocab),
        }
        manifest_config = {**to_dict(config), "split_at": _iso(split_ms), "split_at_ms": split_ms,
                           "split_rule": "given" if config.split_at is not None else "eval_fraction",
                           "text_columns": list(text_columns), "catalog": str(catalog), "logs": str(logs)}
        inputs = {str(s.path): _fingerprint(s.path, config.sha256_max_bytes) for s in catalog_sources + log_sources}
        artifacts.write_manifest(tmp, "dataset", config=manifest_config, inputs=inputs, counts=counts,
                                 extra={"input_files": {"catalog": [str(s.path) for s in catalog_sources],
                                                        "logs": [str(s.path) for s in log_sources]}})
        _publish(tmp, out)
    except BaseException:  # nothing half-written survives, not even on Ctrl-C
        if run is not None:
            run.rejects_file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    files = [out / name for name in (schema.PRODUCTS_FILE, schema.TRAIN_FILE, schema.EVAL_FILE,
                                     schema.REJECTS_FILE, schema.VOCAB_FILE, artifacts.MANIFEST)]
    summary = IngestSummary(out=out, inputs=run.stats, rejects=rejects, products=products.num_rows,
                            train_rows=train_rows, eval_rows=eval_rows, split_at=_iso(split_ms),
                            image_dim=image_dim, query_dims=dict(run.query_dims),
                            images_truncated=run.images_truncated, files=files)
    log.info("ingest: %d products, %d train and %d eval rows, %d rejected rows -> %s",
             summary.products, train.rows, eval_.rows, summary.rejected, out)
    return summary
