"""Ingest: validate, normalise and time-split a catalog and engagement logs into a dataset (docs/ARCHITECTURE.md).

`ingest(catalog, logs, out, config)` reads Parquet and JSON Lines files (or directories of them, in
sorted name order) in streaming batches and writes the dataset directory described in
docs/ARCHITECTURE.md: products.parquet, train.parquet, validation.parquet, test.parquet, rejects.jsonl,
vocab.json and manifest.json. The row checks themselves are in itemsage.validate.

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
  valid image vector (or `image_dim`, `--image-dim`) fixes the dataset's image width; a
  bad_vector_width detail names the width and the file and row that fixed it.
- Every catalog (or log) row rejected: DataError naming the top reasons, nothing written. More than
  half rejected: the run still writes the dataset (the rejects are its report), with a warning shown
  first in the summary (and kept in the manifest) naming the top reason.
- Numeric timestamps that all fall before 1990 (e.g. 1, 2, 3: read as seconds after 1970) give a
  warning in the summary: they are probably counters, not epoch times.
- Query vectors: one width per surface, fixed by its first valid row; a search row with only
  `query_text` stands for a 384-d text-encoder vector and a closeup row with only `query_image_path`
  for an image-encoder vector (the path is encoded here and stored as `query_embedding`). A
  `query_embedding` of length 0 counts as absent.
- Products as queries: each kept product gets its frozen query vector (`query_vector` in
  products.parquet; `product_query`, `--product-query auto|image|text`: the main image vector, or the
  text encoder's vector of the title; see itemsage.product_query), computed after the catalog pass and
  held in memory (4 x Dq bytes per product) for the log pass. A closeup or home row may name
  `query_product_id` instead of a query vector: an id that is not a kept product is rejected
  (unknown_query_product); else the product's vector becomes the row's `query_embedding` (a row with
  both keeps its own vector). `query_product_id` is kept in the windows as given.
- content_hash: sha256 of the product's features (see `content_hash`), so `embed --incremental`
  re-embeds exactly the products whose text or images changed.
- Input fingerprints in the manifest: `sha256:<hex>` of the file's bytes, or `size-mtime:<bytes>:<ns>`
  for files larger than `sha256_max_bytes` (1 GiB by default), where hashing would be a long extra pass.

Split: three windows in time order. train.parquet trains the model, validation.parquet chooses it
(early stopping and the best checkpoint), test.parquet gives every reported figure. Two protocols:
- `split="global"` (default): one pair of split times for every row. Rows at or after `test_from` are
  test, rows at or after `validation_from` (and before `test_from`) are validation, the rest train.
  Without given times: test_from = max - test_fraction * span and validation_from = test_from -
  validation_fraction * span, over every readable timestamp in the logs (span = max - min).
- `split="per-user"`: each user's own engagements in time order (ties in input order); the user's
  last `test_fraction` of them are test, the `validation_fraction` before those validation, the rest
  train. Counts are floor(fraction * n), and a window whose share is between 0 and 1 row gets one
  row while the user keeps at least 2 for train, test first (RecBole's ratio split; Microsoft
  Recommenders' python_chrono_split is the same idea). A user with one engagement is train only.
  Rows without a user_id cannot be held out per user: they all go to train (counted in the
  manifest as `no_user_train_rows`). This mode holds 12 bytes per kept log row (user code and time)
  until the logs are read, plus O(users).
`gap_hours` drops the train rows in the hours before the validation window (global: before
validation_from; per-user: before that user's first validation row), since engagement right before
the split leaks into the later windows; they are counted as `gap_rows`. An empty validation or test
window is not an error, but is named in the summary's warnings.

Passes and memory. Nothing here holds the logs, or the catalog's vectors, all at once:
1. catalog: each batch is checked and its kept products appended to a scratch Arrow IPC file; held
   in memory are the product ids seen (a Python set) and any extra input columns.
2. time pass: the logs' timestamp column only (a JSON Lines file is parsed in full for it), counted
   per minute (one counter per minute of the logs' time span).
3. logs: each batch is checked, and its kept rows appended to the scratch file of their time slab. A
   slab is a run of whole minutes holding about `sort_rows` rows, cut from the minute counts of
   pass 2 (more rows when a single minute holds more, or when the logs hold more than 256 slabs'
   worth: at most 257 scratch files are open at once); the split time is always a slab edge.
4. output: products.parquet is copied from its scratch file in batches, the vocabulary is counted
   from it in batches, and each slab in turn is read, sorted by time (ties keep input order) and
   appended to train.parquet, validation.parquet or test.parquet (or dropped, in the gap).
So peak memory is about one batch while reading (`batch_rows` rows, fewer where rows are wide: a
Parquet batch holds about 64 MiB of decoded data), one slab (twice: read and sorted) while writing,
plus the O(products) state: the id sets, the vocabulary counts and the extra catalog columns.

The output directory is written as `<out>.tmp-<pid>` and renamed to `<out>` at the end, so a killed
run never leaves something that looks complete. An existing `<out>` is replaced only if it is an
itemsage dataset: it is first renamed to `<out>.old-<pid>`, the new one renamed into place, then the
old one removed. What a killed run (SIGKILL, power loss) leaves is cleaned up by the next run into
the same `<out>`, before it reads anything: if `<out>` is missing (a kill between the two renames),
the newest `<out>.tmp-<pid>` whose files match its manifest is put in place (else a complete
`<out>.old-<pid>`), and every other `<out>.tmp-*` / `<out>.old-*` of a process no longer running is
removed. Directories of a running process (another ingest into the same `<out>`) are left alone.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itemsage import artifacts, product_query, schema
from itemsage.config import ConfigError, require, to_dict
from itemsage.validate import (
    EPOCH,
    KIND_EXPECTED,
    KIND_FIX,
    KIND_JSON,
    LOG_KINDS,
    LOG_REQUIRED,
    LOG_SCHEMA,
    Rejector,
    RowChecks,
    arrow_accepts,
    canonical,
    catalog_kinds,
    codes,
    content_hash,
    json_safe,
    parse_iso_ms,
    products_schema,
    raw_records,
    take_rows,
)

__all__ = ["DataError", "IngestConfig", "IngestSummary", "InputStats", "LOG_SCHEMA", "content_hash", "ingest",
           "summary_table"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """An input file cannot be used at all; the message names the file, the column, what was
    expected, what was found and how to fix it."""


# ------------------------------------------------------------------------------------------------
# Config and summary
# ------------------------------------------------------------------------------------------------

_RESERVED = {schema.PRODUCT_ID, schema.IMAGE_EMBEDDINGS, schema.IMAGE_PATHS, schema.CONTENT_HASH, schema.QUERY_VECTOR}
SPLITS = ("global", "per-user")


@dataclass
class IngestConfig:
    split: str = "global"  # global | per-user (see the module doc)
    validation_fraction: float = 0.1  # global: of the logs' time span; per-user: of each user's engagements
    test_fraction: float = 0.1  # the last fraction; validation is the one before it
    validation_from: str | None = None  # global only: ISO times that start validation and test (both or
    test_from: str | None = None  # neither); they win over the fractions
    gap_hours: float = 0.0  # train rows this close before the validation window are dropped
    text_fields: tuple[str, ...] = schema.TEXT_FIELDS  # fields the vocabulary is built from
    max_unigrams: int = 200_000
    max_bigrams: int = 1_000_000
    max_trigrams: int = 64_000
    batch_rows: int = 65_536  # rows per streamed batch (at most; Parquet batches also stop near 64 MiB)
    image_dim: int | None = None  # None: the first valid image vector fixes it
    max_images: int = schema.MAX_IMAGES
    image_batch_size: int = 32  # images per image-encoder call
    sort_rows: int = 250_000  # log rows per time slab, held in memory while writing train/eval in time order
    sha256_max_bytes: int = 1 << 30  # larger inputs are fingerprinted by size and mtime
    product_query: str = "auto"  # a product's frozen query vector: auto | image | text (itemsage.product_query)
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.text_fields, str):
            self.text_fields = tuple(f.strip() for f in self.text_fields.split(",") if f.strip())
        self.text_fields = tuple(self.text_fields)
        require(self.split in SPLITS, f"`ingest.split` ({self.split!r}) must be one of {', '.join(SPLITS)}.")
        for name in ("validation_from", "test_from"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, str) and parse_iso_ms(value) is not None),
                    f"`ingest.{name}` ({value!r}) is not an ISO-8601 time; "
                    "write it like 2024-03-01T00:00:00Z (no zone = UTC).")
        require((self.validation_from is None) == (self.test_from is None),
                "`ingest.validation_from` and `ingest.test_from` go together: give both split times, or neither "
                "(then the fractions place them).")
        if self.validation_from is not None:
            require(self.split == "global", "`ingest.validation_from`/`ingest.test_from` are split times of the "
                                            "global split; the per-user split takes fractions only.")
            require(parse_iso_ms(self.validation_from) <= parse_iso_ms(self.test_from),
                    f"`ingest.validation_from` ({self.validation_from}) is after `ingest.test_from` "
                    f"({self.test_from}); validation comes before test.")
        require(isinstance(self.test_fraction, (int, float)) and 0.0 < self.test_fraction < 1.0,
                f"`ingest.test_fraction` ({self.test_fraction}) must be between 0 and 1 (exclusive), "
                "e.g. 0.1 for the last tenth.")
        require(isinstance(self.validation_fraction, (int, float))
                and 0.0 <= self.validation_fraction < 1.0 - self.test_fraction,
                f"`ingest.validation_fraction` ({self.validation_fraction}) must be >= 0 and leave room for train "
                f"(validation + test fractions < 1; test is {self.test_fraction}).")
        require(isinstance(self.gap_hours, (int, float)) and math.isfinite(self.gap_hours) and self.gap_hours >= 0,
                f"`ingest.gap_hours` ({self.gap_hours}) must be a number of hours >= 0.")
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
        require(self.product_query in product_query.CHOICES,
                f"`ingest.product_query` ({self.product_query!r}) must be one of {', '.join(product_query.CHOICES)}.")
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
    validation_rows: dict[str, int]
    test_rows: dict[str, int]
    split: str  # global | per-user
    validation_from: str | None  # ISO times, UTC (global split; None for per-user)
    test_from: str | None
    gap_rows: int  # train rows dropped in the gap before validation
    image_dim: int  # 0 = the catalog has no images
    query_dims: dict[str, int]  # surface -> query vector width, for surfaces with rows
    images_truncated: int
    files: list[Path]
    warnings: list[str] = field(default_factory=list)  # shown first in the summary: most rows rejected
    product_query: dict[str, Any] = field(default_factory=dict)  # the manifest's product_query entry

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())


def summary_table(summary: IngestSummary) -> Any:
    """A Rich renderable of the summary (the CLI and the demo print it)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

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
    for col in ("task",) + schema.WINDOWS:
        tasks.add_column(col, justify="left" if col == "task" else "right")
    windows = (summary.train_rows, summary.validation_rows, summary.test_rows)
    for task in schema.ALL_TASKS:
        tasks.add_row(task, *(f"{w[task]:,}" for w in windows))
    tasks.add_row("total", *(f"{sum(w.values()):,}" for w in windows))
    files = Table(title=f"written to {summary.out}", title_justify="left")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    for path in summary.files:
        files.add_row(path.name, f"{path.stat().st_size:,}" if path.exists() else "")
    split = (f"validation from {summary.validation_from}, test from {summary.test_from}" if summary.split == "global"
             else "per-user split (each user's last engagements are validation and test)")
    gap = f", {summary.gap_rows:,} train rows dropped in the gap before validation" if summary.gap_rows else ""
    facts = (f"products kept: {summary.products:,}; {split}{gap}; "
             f"image width: {summary.image_dim}; query widths: {summary.query_dims}; "
             f"product query vectors: {summary.product_query.get('source')}, {summary.product_query.get('dim')}-d; "
             f"products with image lists cut to the maximum: {summary.images_truncated:,}")
    # Text, not markup: a detail may hold [brackets].
    warnings = [Text(f"WARNING: {w}", style="bold red") for w in summary.warnings]
    return Group(*warnings, inputs, *([rejects] if summary.rejected else []), tasks, facts, files)


# ------------------------------------------------------------------------------------------------
# Input files
# ------------------------------------------------------------------------------------------------

_PARQUET = (".parquet", ".pq")
_BATCH_BYTES = 64 << 20  # a Parquet batch holds at most `batch_rows` rows and about this many bytes
_JSONL = (".jsonl", ".json", ".ndjson")


@dataclass
class _Source:
    """One input file, read in streaming batches of a Parquet RecordBatch or a list of JSON dicts."""

    path: Path
    role: str
    fmt: str  # "parquet" | "jsonl"
    num_rows: int | None = None  # known from Parquet metadata; for JSON Lines after a full pass
    data: Any = None  # in memory instead of a file: a pyarrow Table ("parquet") or a list of dicts ("jsonl")

    def batches(self, batch_rows: int, columns: Sequence[str] | None = None) -> Iterator[tuple[int, Any]]:
        """Yield (index of the batch's first row, batch)."""
        if self.data is not None:
            step = max(1, batch_rows)
            for start in range(0, len(self.data), step):
                if self.fmt == "parquet":
                    yield start, self.data.slice(start, step).combine_chunks().to_batches()[0]
                else:
                    yield start, self.data[start:start + step]
        elif self.fmt == "parquet":
            yield from self._parquet_batches(batch_rows, columns)
        else:
            yield from self._jsonl_batches(batch_rows)

    def _parquet_batches(self, batch_rows: int, columns: Sequence[str] | None) -> Iterator[tuple[int, Any]]:
        try:
            # pre_buffer (pyarrow's default) keeps every column chunk read so far cached until the
            # reader is done: memory grows with the file. Buffered reads of 4 MiB stay flat, even
            # within a large row group.
            pf = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 22)
            if columns is not None:
                columns = [c for c in columns if c in pf.schema_arrow.names]
            start = 0
            for batch in pf.iter_batches(batch_size=_rows_per_batch(pf.metadata, columns, batch_rows), columns=columns):
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


def _rows_per_batch(meta: pq.FileMetaData, columns: Sequence[str] | None, batch_rows: int) -> int:
    """`batch_rows`, or fewer where rows are wide: a product with 20 image vectors weighs 40 log rows."""
    size = 0  # decoded bytes of the columns read, from the Parquet metadata
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if columns is None or column.path_in_schema.split(".")[0] in columns:
                size += column.total_uncompressed_size
    if size == 0 or meta.num_rows == 0:
        return batch_rows
    return int(min(batch_rows, max(1024, _BATCH_BYTES * meta.num_rows // size)))


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
            raise DataError(f"{role} file {p}: unknown format '{suffix or '(no extension)'}'; accepted "
                            f"extensions: {', '.join(_PARQUET + _JSONL)} (Parquet, or JSON Lines: one JSON "
                            f"object per line). Convert the file (renaming it does not change its format), "
                            f"e.g. {_convert_hint(p)}.")
        sources.append(_Source(p, role, "parquet" if suffix in _PARQUET else "jsonl"))
    return sources


def _convert_hint(p: Path) -> str:
    """How to convert a file of an unknown format to Parquet, with pandas."""
    target = p.with_suffix(".parquet").name
    if p.suffix.lower() in (".csv", ".tsv", ".txt"):
        sep = ", sep='\\t'" if p.suffix.lower() == ".tsv" else ""
        return (f"pandas.read_csv('{p.name}'{sep}, dtype={{'product_id': str}}).to_parquet('{target}') "
                "(list columns such as image_embeddings need parsing first)")
    return f"load it with pandas (pandas.read_excel, read_json, ...) and write df.to_parquet('{target}')"


def _check_schema(src: _Source, kinds: dict[str, str], required: Sequence[str]) -> None:
    """Refuse a file that cannot be used at all: unreadable, no rows, required column missing or of
    the wrong type. Cheap: Parquet metadata, or the first 1,000 JSON records."""
    where = f"{src.role} file {src.path}"
    if src.fmt == "parquet" and src.data is not None:
        arrow_schema, rows = src.data.schema, src.data.num_rows
        names = arrow_schema.names
        found = {name: str(arrow_schema.field(name).type) for name in names}
        bad = [name for name in names
               if name in kinds and not arrow_accepts(kinds[name], arrow_schema.field(name).type)]
    elif src.fmt == "parquet":
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
               if name in kinds and not arrow_accepts(kinds[name], arrow_schema.field(name).type)]
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
                    isinstance(v, KIND_JSON[kinds[name]]) and not isinstance(v, bool) for v in values):
                bad.append(name)
    if rows == 0:
        raise DataError(f"{where}: has no rows. Remove the empty file or point --{src.role} at a file with data.")
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(
            f"{where}: required column '{missing[0]}' is missing (expected {KIND_EXPECTED[kinds[missing[0]]]}; "
            f"found columns: {', '.join(names) or 'none'}). Add the column, or rename the column that holds it.")
    if bad:
        c = bad[0]
        raise DataError(f"{where}: column '{c}' has type {found[c]}, expected {KIND_EXPECTED[kinds[c]]}. "
                        f"Fix: {KIND_FIX[kinds[c]].format(c=c)}.")


def _fingerprint(path: Path, sha256_max_bytes: int) -> str:
    stat = path.stat()
    if stat.st_size > sha256_max_bytes:
        return f"size-mtime:{stat.st_size}:{stat.st_mtime_ns}"
    return f"sha256:{artifacts.sha256_file(path)}"


def _total_rows(sources: list[_Source]) -> int | None:
    """Rows of all sources, when known (Parquet metadata; JSON Lines after the time pass)."""
    return None if any(s.num_rows is None for s in sources) else sum(s.num_rows for s in sources)


def _reject_entries(src: _Source, batch: Any, start: int, rej: Rejector) -> list[dict[str, Any]]:
    """The rejects.jsonl entries of one checked batch: file, row, reason, detail and the input record."""
    rows = np.flatnonzero(~rej.alive)
    return [{"file": str(src.path), "row": start + r, "reason": schema.REJECT_REASONS[rej.code[r]],
             "detail": rej.details[r], "record": record}
            for r, record in zip(rows.tolist(), raw_records(src.fmt, batch, rows))]


def _check_catalog_batch(checks: RowChecks, src: _Source, start: int, batch: Any,
                         kinds: dict[str, str]) -> tuple[int, pa.Table, Rejector]:
    """(rows read, kept products in `products_schema` order, the rejections) of one catalog batch."""
    n, cols, errors = canonical(src.fmt, batch, kinds)
    rej = Rejector(n)
    table = checks.catalog_batch(src.path.parent, n, cols, errors, rej, source=src.path, start=start)
    return n, table, rej


def catalog_sources(catalog: Any) -> list[_Source]:
    """Sources of a catalog: a .parquet/.jsonl/.json file or a directory of them, or in memory a
    pyarrow Table, a pandas DataFrame or a list of dicts (one per product)."""
    if isinstance(catalog, (str, Path)):
        return _input_files(catalog, "catalog")
    if isinstance(catalog, pa.Table):
        return [_Source(Path("<table>"), "catalog", "parquet", catalog.num_rows, data=catalog)]
    if type(catalog).__name__ == "DataFrame" and hasattr(catalog, "to_dict"):  # pandas, without importing it
        table = pa.Table.from_pandas(catalog, preserve_index=False)
        return [_Source(Path("<dataframe>"), "catalog", "parquet", table.num_rows, data=table)]
    if isinstance(catalog, list):
        bad = next((i for i, r in enumerate(catalog) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"catalog list item {bad} is a {type(catalog[bad]).__name__}; expected one dict per "
                            "product ({'product_id': ..., 'title': ...}).")
        return [_Source(Path("<records>"), "catalog", "jsonl", len(catalog), data=catalog)]
    raise DataError(f"catalog of type {type(catalog).__name__} is not readable; pass a path to a .parquet/.jsonl "
                    "file or directory, a pyarrow Table, a pandas DataFrame or a list of dicts.")


def check_products(
    catalog: Any, *, text_fields: Sequence[str] = schema.TEXT_FIELDS, image_dim: int | None = None,
    max_images: int = schema.MAX_IMAGES, batch_rows: int = 65_536, image_batch_size: int = 32,
    image_encoder: Any = None,
) -> Iterator[tuple[pa.Table, list[dict[str, Any]]]]:
    """Validate a catalog alone, with ingest's own checks: yields, per batch, (kept products in
    products.parquet's schema with their content_hash, rejects.jsonl entries of the batch).

    `catalog` is anything `catalog_sources` reads. `image_dim` given (a model's image width) rejects
    image vectors of another width, as `--image-dim` does in ingest. Raises DataError for a catalog
    that cannot be used at all (missing product_id, a column of the wrong type, no rows). Relative
    `image_paths` resolve against the file's directory, or the working directory for data in memory.
    """
    text_columns = schema.TEXT_FIELDS + tuple(f for f in text_fields if f not in schema.TEXT_FIELDS)
    kinds = catalog_kinds(text_columns)
    sources = catalog_sources(catalog)
    for src in sources:
        _check_schema(src, kinds, [schema.PRODUCT_ID])
    checks = RowChecks(text_columns=text_columns, max_images=max_images, image_dim=image_dim,
                       image_batch_size=image_batch_size, image_encoder=image_encoder)
    for src in sources:
        for start, batch in src.batches(batch_rows):
            _, table, rej = _check_catalog_batch(checks, src, start, batch, kinds)
            yield table, _reject_entries(src, batch, start, rej)


# ------------------------------------------------------------------------------------------------
# Scratch files: the kept products and the kept log rows, by time slab
# ------------------------------------------------------------------------------------------------

_ROW_GROUP_ROWS = 65_536  # rows per Parquet row group of train/eval: readers can stream them
# zstd: the demo's vectors shrink 2.4x (snappy: 1.0x) for ~30% more write time, and less disk to wait on.
_COMPRESSION = "zstd"
# Scratch files: lz4 halves them and is faster than writing them uncompressed.
_SCRATCH = pa.ipc.IpcWriteOptions(compression="lz4")
# Dictionary encoding only where values repeat; a float vector column would only pay for the attempt.
_LOG_DICTIONARY = [schema.SURFACE, schema.ENGAGEMENT, schema.PRODUCT_ID, schema.USER_ID, schema.QUERY_TEXT]
_MAX_SLABS = 256  # time slabs (scratch files open at once while reading the logs), plus one per split time
TRAIN, GAP, VALIDATION, TEST = 0, 1, 2, 3  # window code of a kept log row (GAP rows are dropped)
_WINDOW_CODES = {"train": TRAIN, "validation": VALIDATION, "test": TEST}


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
    return pa.array([None if v is None else json.dumps(json_safe(v), ensure_ascii=False) for v in values], pa.string())


def _scratch_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of a scratch Arrow IPC file, one at a time (read, not memory-mapped, so
    pages already used do not stay in this process's resident memory)."""
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


class _MinuteCounts:
    """Rows per minute of the logs' timestamps, as sorted numpy arrays: O(minutes spanned) memory."""

    def __init__(self) -> None:
        self.minutes = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_len = 0

    def add(self, ms: np.ndarray) -> None:
        minutes, counts = np.unique(ms // 60_000, return_counts=True)
        self._pending.append((minutes, counts))
        self._pending_len += len(minutes)
        if self._pending_len > max(len(self.minutes), 4096):  # merges cost O(pending), amortised
            self._merge()

    def _merge(self) -> None:
        if self._pending:
            minutes = np.concatenate([self.minutes] + [m for m, _ in self._pending])
            counts = np.concatenate([self.counts] + [c for _, c in self._pending])
            self.minutes, where = np.unique(minutes, return_inverse=True)
            self.counts = np.bincount(where, weights=counts, minlength=len(self.minutes)).astype(np.int64)
            self._pending, self._pending_len = [], 0

    def slab_edges(self, split_ms: Sequence[int], sort_rows: int) -> np.ndarray:
        """Sorted inner edges (ms) of the time slabs: runs of whole minutes with about `sort_rows`
        rows each (more when one minute holds more, or when more than _MAX_SLABS slabs would be
        needed), plus the global split times, so no slab straddles one."""
        self._merge()
        target = max(sort_rows, -(-int(self.counts.sum()) // _MAX_SLABS))
        slab = (np.cumsum(self.counts) - self.counts) // target  # [minutes] slab of each minute's first row
        starts = np.flatnonzero(np.diff(slab) > 0) + 1  # minutes that open a new slab
        return np.union1d(self.minutes[starts] * 60_000, np.array(split_ms, np.int64))


class _GlobalSplit:
    """Windows by time alone: train before validation_ms - gap_ms, then the gap, then validation from
    validation_ms, then test from test_ms."""

    def __init__(self, validation_ms: int, test_ms: int, gap_ms: int):
        self.bounds = np.array([validation_ms - gap_ms, validation_ms, test_ms], np.int64)

    def add(self, table: pa.Table) -> None:
        """Nothing to learn from the rows."""

    def fit(self) -> None:
        """Nothing to learn from the rows."""

    def label(self, table: pa.Table) -> np.ndarray:
        ts = table.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()  # [n]
        return np.searchsorted(self.bounds, ts, side="right")  # [n] TRAIN, GAP, VALIDATION or TEST

    def first_open(self, ms: int) -> int:
        """The first window code that rows at or after `ms` can still have."""
        return int(np.searchsorted(self.bounds, ms, side="right"))


class _PerUserSplit:
    """Each user's last engagements to validation and test (module doc). `add` sees every kept row in
    read order, `fit` fixes each user's cut ranks, then `label` must see the rows in time order (ties
    in read order), as `_TimeSlabs.finish` writes them: a row's rank in its user's history is the
    count of that user's rows labelled before it."""

    def __init__(self, validation_fraction: float, test_fraction: float, gap_ms: int):
        self.fractions = (validation_fraction, test_fraction)
        self.gap_ms = gap_ms
        self.codes: dict[str, int] = {}  # user_id -> user number
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []  # per batch: user numbers (-1: none), times

    def _users(self, column: Any, grow: bool) -> np.ndarray:
        """[n] user numbers of a user_id column, -1 where it is null."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()  # one array, so one dictionary
        encoded = pc.dictionary_encode(column)
        names = encoded.dictionary.to_pylist()
        number = np.array([self.codes.setdefault(u, len(self.codes)) if grow else self.codes[u] for u in names]
                          + [-1], np.int64)  # the last entry stands for null
        index = encoded.indices.fill_null(len(names)).to_numpy()
        return number[index]

    def add(self, table: pa.Table) -> None:
        ts = table.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()
        self.parts.append((self._users(table.column(schema.USER_ID), grow=True).astype(np.int32), ts))

    def fit(self) -> None:
        users = np.concatenate([u for u, _ in self.parts]) if self.parts else np.zeros(0, np.int32)
        ts = np.concatenate([t for _, t in self.parts]) if self.parts else np.zeros(0, np.int64)
        self.parts = []
        has = users >= 0
        users, ts = users[has], ts[has]
        order = np.argsort(ts, kind="stable")  # time order, ties in read order ...
        order = order[np.argsort(users[order], kind="stable")]  # ... within each user
        n = np.bincount(users, minlength=len(self.codes))  # [U] rows per user
        fv, ft = self.fractions
        n_val, n_test = np.floor(fv * n + 1e-9).astype(np.int64), np.floor(ft * n + 1e-9).astype(np.int64)
        n_train = n - n_val - n_test
        for share, counts in ((ft * n, n_test), (fv * n, n_val)):  # RecBole: test first, then validation
            bump = (n_train > 1) & (share > 0) & (share < 1)
            counts += bump
            n_train -= bump
        self.cut_validation, self.cut_test = n_train, n_train + n_val  # [U] ranks where the windows start
        first = np.cumsum(n) - n  # [U] each user's first row in `order`
        later = n_val + n_test > 0
        self.validation_ms = np.full(len(n), np.iinfo(np.int64).max, np.int64)  # [U] time of the first later row
        self.validation_ms[later] = ts[order[first[later] + n_train[later]]]
        self.seen = np.zeros(len(n), np.int64)  # [U] rows labelled so far

    def label(self, table: pa.Table) -> np.ndarray:
        users = self._users(table.column(schema.USER_ID), grow=False)  # [n]
        ts = table.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()  # [n]
        label = np.full(len(users), TRAIN, np.int64)
        has = np.flatnonzero(users >= 0)
        u = users[has]
        by_user = np.argsort(u, kind="stable")  # rows grouped by user, time order within each
        sorted_u = u[by_user]
        group_start = np.flatnonzero(np.r_[True, sorted_u[1:] != sorted_u[:-1]])
        sizes = np.diff(np.r_[group_start, len(sorted_u)])
        within = np.arange(len(sorted_u)) - np.repeat(group_start, sizes)  # [m] rank within this table
        rank = np.empty(len(u), np.int64)
        rank[by_user] = self.seen[sorted_u] + within
        self.seen += np.bincount(u, minlength=len(self.seen))
        window = np.where(rank >= self.cut_test[u], TEST, np.where(rank >= self.cut_validation[u], VALIDATION, TRAIN))
        if self.gap_ms:
            window[(window == TRAIN) & (ts[has] >= self.validation_ms[u] - self.gap_ms)] = GAP
        label[has] = window
        return label

    def first_open(self, ms: int) -> int:
        """Every window stays open: any user's next row may be train, validation or test."""
        return TRAIN


class _TimeSlabs:
    """Kept log rows, bucketed by time into one scratch Arrow IPC file per slab, in input order; at
    the end each slab in turn is read, sorted by time and its rows appended to train.parquet,
    validation.parquet or test.parquet (or dropped, in the gap), as `split` labels them."""

    def __init__(self, scratch: Path, edges: np.ndarray, split: _GlobalSplit | _PerUserSplit):
        self.scratch = scratch
        self.edges = edges  # [E] sorted; slab k holds edges[k-1] <= t < edges[k]
        self.split = split
        self.files: dict[int, tuple[Any, Any]] = {}  # slab -> (file, IPC writer)
        self.rows = 0  # kept rows added
        # rows per task (ALL_TASKS order), per window code TRAIN, GAP, VALIDATION, TEST
        self.tasks = np.zeros((4, len(schema.ALL_TASKS)), np.int64)
        self.no_user_train_rows = 0  # per-user split: rows without a user_id, all train

    def add(self, table: pa.Table) -> None:
        n = table.num_rows
        if n == 0:
            return
        self.rows += n
        self.split.add(table)
        ts = table.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()  # [n] never null in kept rows
        slab = np.searchsorted(self.edges, ts, side="right")  # [n]
        if (slab == slab[0]).all():  # time-ordered input: the common case, no reordering
            self._write(int(slab[0]), table)
            return
        order = np.argsort(slab, kind="stable")  # group rows by slab, input order within each
        table, slab = take_rows(table, order), slab[order]
        bounds = [0, *(np.flatnonzero(np.diff(slab)) + 1).tolist(), n]
        for a, b in zip(bounds[:-1], bounds[1:]):
            self._write(int(slab[a]), table.slice(a, b - a))

    def _write(self, slab: int, table: pa.Table) -> None:
        if slab not in self.files:
            sink = pa.OSFile(str(self.scratch / f"slab-{slab:05d}.arrow"), "wb")
            self.files[slab] = (sink, pa.ipc.new_file(sink, LOG_SCHEMA, options=_SCRATCH))
        self.files[slab][1].write_table(table)

    def close(self) -> None:
        for sink, writer in self.files.values():
            if not sink.closed:
                writer.close()
                sink.close()

    def finish(self, targets: dict[str, Path], on_rows: Callable[[int], None]) -> None:
        """Write the windows (`targets`: window name -> file) in time order: one slab in memory at a
        time, one Parquet writer per window."""
        self.close()
        self.split.fit()
        with contextlib.ExitStack() as stack:
            writers = {}
            for window, target in targets.items():
                tmp = stack.enter_context(artifacts.atomic_path(target))
                writers[_WINDOW_CODES[window]] = stack.enter_context(contextlib.closing(pq.ParquetWriter(
                    tmp, LOG_SCHEMA, use_dictionary=_LOG_DICTIONARY, compression=_COMPRESSION)))
            for k in sorted(self.files):
                path = self.scratch / f"slab-{k:05d}.arrow"
                # one chunk per column: the scratch's record batches are freed as soon as they are copied
                slab = pa.Table.from_batches(list(_scratch_batches(path)), LOG_SCHEMA).combine_chunks()
                path.unlink()
                ts = slab.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()
                order = np.argsort(ts, kind="stable")  # ties keep input order
                if (np.diff(order) < 0).any():
                    slab = take_rows(slab, order)
                window = self.split.label(slab)  # [n]
                task = codes(slab.column(schema.SURFACE), schema.SURFACES) * len(schema.ENGAGEMENTS) + codes(
                    slab.column(schema.ENGAGEMENT), schema.ENGAGEMENTS)  # [n] index into ALL_TASKS
                np.add.at(self.tasks, (window, task), 1)
                if isinstance(self.split, _PerUserSplit):
                    self.no_user_train_rows += int(slab.column(schema.USER_ID).null_count)
                for code, writer in writers.items():
                    rows = np.flatnonzero(window == code)
                    if len(rows):
                        writer.write_table(slab if len(rows) == slab.num_rows else take_rows(slab, rows),
                                           row_group_size=_ROW_GROUP_ROWS)
                on_rows(slab.num_rows)
                # A Parquet writer holds buffers about a slab's size: close each one as soon as its
                # window is over (global split: every later row is at least this late).
                for code in [c for c in writers if c < self.split.first_open(int(ts.max()) if len(ts) else 0)]:
                    writers.pop(code).close()
                del slab

    def window_rows(self, window: str) -> dict[str, int]:
        """Rows per task (every task listed) of a window: train, validation or test."""
        return dict(zip(schema.ALL_TASKS, self.tasks[_WINDOW_CODES[window]].tolist()))

    @property
    def gap_rows(self) -> int:
        return int(self.tasks[GAP].sum())


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


class _Ingest:
    """State of one ingest run: the row checks, the counts, the rejects file, the scratch files."""

    def __init__(self, config: IngestConfig, tmp: Path, progress: Any, image_encoder: Any):
        self.config = config
        self.progress = progress
        self.scratch = tmp / ".scratch"
        self.text_columns = schema.TEXT_FIELDS + tuple(f for f in config.text_fields if f not in schema.TEXT_FIELDS)
        self.checks = RowChecks(text_columns=self.text_columns, max_images=config.max_images,
                                image_dim=config.image_dim, image_batch_size=config.image_batch_size,
                                image_encoder=image_encoder)
        self.rejects_file = open(tmp / schema.REJECTS_FILE, "w", encoding="utf-8")
        self.reject_counts: collections.Counter[str] = collections.Counter()
        # role -> reason -> rows, and the first detail of each (role, reason): the summary's warnings
        self.role_rejects: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.first_details: dict[tuple[str, str], str] = {}
        self.stats: list[InputStats] = []
        self.products = 0
        self.extras = _Extras()
        self.lo_ms: int | None = None  # earliest and latest readable log timestamp
        self.hi_ms: int | None = None
        self.numeric_times = False  # some log timestamps were given as numbers (epoch seconds or ms)

    def close_rejects(self) -> None:
        if not self.rejects_file.closed:
            self.rejects_file.flush()
            os.fsync(self.rejects_file.fileno())
            self.rejects_file.close()

    def write_rejects(self, src: _Source, batch: Any, start: int, rej: Rejector) -> int:
        entries = _reject_entries(src, batch, start, rej)
        for entry in entries:
            reason = entry["reason"]
            self.reject_counts[reason] += 1
            self.role_rejects[src.role][reason] += 1
            self.first_details.setdefault((src.role, reason), f"{src.path} row {entry['row']}: {entry['detail']}")
            self.rejects_file.write(json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n")
        return len(entries)

    # -- catalog

    def read_catalog(self, sources: list[_Source]) -> None:
        """Check every catalog row; kept products go to the products scratch file, extras to memory."""
        kinds = catalog_kinds(self.text_columns)
        task = self.progress.add_task("catalog", total=_total_rows(sources))
        with pa.OSFile(str(self.scratch / "products.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, products_schema(self.text_columns), options=_SCRATCH) as scratch:
            for src in sources:
                stats = InputStats(str(src.path), "catalog")
                self.stats.append(stats)
                for start, batch in src.batches(self.config.batch_rows):
                    n, table, rej = _check_catalog_batch(self.checks, src, start, batch, kinds)
                    keep = rej.alive
                    if src.fmt == "parquet":
                        mask = pa.array(keep)
                        extra = {c: batch.column(c).filter(mask) for c in batch.schema.names if c not in kinds}
                    else:
                        names = dict.fromkeys(k for r in batch for k in r if k not in kinds)
                        extra = {c: [r.get(c) for r, k in zip(batch, keep) if k] for c in names}
                    for computed in (schema.CONTENT_HASH, schema.QUERY_VECTOR):
                        if computed in extra:
                            log.warning("%s: ignoring the input column '%s'; ingest computes it", src.path, computed)
                            del extra[computed]
                    if table.num_rows:
                        scratch.write_table(table)
                    self.extras.add(extra, table.num_rows)
                    self.products += table.num_rows
                    stats.rows_read += n
                    stats.rows_rejected += self.write_rejects(src, batch, start, rej)
                    stats.rows_kept += table.num_rows
                    self.progress.advance(task, n)

    def product_queries(self, text_encoder: Any) -> dict[str, Any]:
        """Each kept product's frozen query vector (itemsage.product_query), in scratch order, held in
        `checks` for the log pass; returns the manifest's `product_query` entry."""
        without_image = 0
        for batch in _scratch_batches(self.scratch / "products.arrow"):
            lengths = pc.list_value_length(batch.column(schema.IMAGE_EMBEDDINGS)).fill_null(0)
            without_image += int((lengths.to_numpy(zero_copy_only=False) == 0).sum())
        try:
            source = product_query.choose_source(self.config.product_query, products=self.products,
                                                 without_image=without_image)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        task = self.progress.add_task(f"product query vectors ({source})", total=self.products)
        ids: list[str] = []
        blocks: list[np.ndarray] = []
        for batch in _scratch_batches(self.scratch / "products.arrow"):
            table = pa.Table.from_batches([batch])
            blocks.append(product_query.product_query_vectors(table, source, text_encoder=text_encoder))
            ids += table.column(schema.PRODUCT_ID).to_pylist()
            self.progress.advance(task, table.num_rows)
        dim = blocks[0].shape[1] if blocks else 0  # no product kept: ingest refuses the catalog before this
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)  # [P, Dq]
        self.checks.product_query_rows = {pid: i for i, pid in enumerate(ids)}
        self.checks.product_query_vectors = vectors
        log.info("product query vectors: %s, %d-d, %d products", source, dim, len(ids))
        return product_query.manifest_entry(source, dim)

    def write_products(self, target: Path) -> None:
        """products.parquet: the scratch batches with their frozen query vectors and slices of the extra
        columns appended."""
        extras = self.extras.columns()
        core = products_schema(self.text_columns, query_vector=True)
        vectors = self.checks.product_query_vectors  # [P, Dq] in scratch order
        no_dictionary = {schema.PRODUCT_ID, schema.IMAGE_EMBEDDINGS, schema.CONTENT_HASH, schema.QUERY_VECTOR}
        dictionary = [f"{f}.list.element" for f in core.names if f not in no_dictionary]
        with artifacts.atomic_path(target) as tmp:
            writer = None
            start = 0
            try:
                for batch in _scratch_batches(self.scratch / "products.arrow"):
                    table = pa.Table.from_batches([batch])
                    block = vectors[start:start + batch.num_rows]  # [b, Dq]
                    offsets = pa.array(np.arange(len(block) + 1, dtype=np.int32) * block.shape[1])
                    table = table.append_column(pa.field(schema.QUERY_VECTOR, pa.list_(pa.float32())),
                                                pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1))))
                    for name, column in extras.items():
                        table = table.append_column(name, column.slice(start, batch.num_rows))
                    start += batch.num_rows
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=dictionary,
                                                  compression=_COMPRESSION)
                    writer.write_table(table)
                if writer is None:  # no product kept
                    table = core.empty_table()
                    for name, column in extras.items():
                        table = table.append_column(name, column.slice(0, 0))
                    pq.write_table(table, tmp, compression=_COMPRESSION)
            finally:
                if writer is not None:
                    writer.close()

    def build_vocabulary(self) -> Any:
        from itemsage.features import Vocabulary

        task = self.progress.add_task("vocabulary", total=self.products)

        def fields() -> Iterator[list[str]]:
            # One item = all strings of one field in one batch: the counts are per string, so this
            # counts the same as one item per product, with far fewer Python calls.
            for batch in _scratch_batches(self.scratch / "products.arrow"):
                for f in self.config.text_fields:
                    yield pc.list_flatten(batch.column(f)).to_pylist()
                self.progress.advance(task, batch.num_rows)

        c = self.config
        return Vocabulary.build(fields(), max_unigrams=c.max_unigrams, max_bigrams=c.max_bigrams,
                                max_trigrams=c.max_trigrams)

    # -- logs

    def time_pass(self, sources: list[_Source]) -> _MinuteCounts:
        """Rows per minute over every readable timestamp (and the exact min and max): a pass over the
        timestamp column only."""
        minutes = _MinuteCounts()
        task = self.progress.add_task("time span", total=_total_rows(sources))
        for src in sources:
            rows = 0
            for _, batch in src.batches(self.config.batch_rows, [schema.TIMESTAMP]):
                n, cols, _ = canonical(src.fmt, batch, {schema.TIMESTAMP: "time"})
                self.numeric_times = self.numeric_times or _numeric_times(src.fmt, batch)
                ts = cols[schema.TIMESTAMP]
                if ts.null_count < n:
                    ms = ts.drop_null().to_numpy()
                    lo, hi = int(ms.min()), int(ms.max())
                    self.lo_ms = lo if self.lo_ms is None else min(self.lo_ms, lo)
                    self.hi_ms = hi if self.hi_ms is None else max(self.hi_ms, hi)
                    minutes.add(ms)
                rows += n
                self.progress.advance(task, n)
            src.num_rows = rows
        return minutes

    def read_logs(self, sources: list[_Source], slabs: _TimeSlabs) -> None:
        task = self.progress.add_task("logs", total=_total_rows(sources))
        for src in sources:
            stats = InputStats(str(src.path), "logs")
            self.stats.append(stats)
            for start, batch in src.batches(self.config.batch_rows, list(LOG_KINDS)):
                n, cols, errors = canonical(src.fmt, batch, LOG_KINDS)
                rej = Rejector(n)
                table = self.checks.log_batch(src.path, n, cols, errors, rej, start=start)
                slabs.add(table)
                stats.rows_read += n
                stats.rows_rejected += self.write_rejects(src, batch, start, rej)
                stats.rows_kept += table.num_rows
                self.progress.advance(task, n)

    def time_warning(self) -> str | None:
        """A warning when numeric timestamps all read as times before 1990: small numbers such as
        1, 2, 3 (a step counter, days) are seconds after 1970-01-01 here, not what was meant."""
        if not self.numeric_times or self.hi_ms is None or self.hi_ms >= _PLAUSIBLE_EPOCH_MS:
            return None
        return (f"the log timestamps are numbers and all read as times before 1990 (from {_iso(self.lo_ms)} to "
                f"{_iso(self.hi_ms)}): numbers are seconds since 1970-01-01 UTC (milliseconds from 1e11 on). "
                "If they count steps or days, write epoch seconds or ISO-8601 times instead; the time split "
                "only needs their order, so it is still made.")

    def refusal(self, role: str) -> str | None:
        """The error when every `role` row was rejected (None otherwise): nothing is written then."""
        read = sum(s.rows_read for s in self.stats if s.role == role)
        rejected = sum(s.rows_rejected for s in self.stats if s.role == role)
        if not read or rejected < read:
            return None
        what = {"catalog": "catalog", "logs": "log"}[role]
        reasons = "; ".join(f"{reason} ({count:,}), first: {self.first_details[(role, reason)]}"
                            for reason, count in self.role_rejects[role].most_common(3))
        return (f"every one of the {read:,} {what} rows was rejected; nothing was written. Reasons: {reasons}. "
                "Fix the rows (the reasons say how) and run again.")

    def rejection_warning(self, role: str, out: Path) -> str | None:
        """A warning when more than half of the `role` rows were rejected (None otherwise): how many,
        the top reason with its first detail, and where every row's reason is."""
        read = sum(s.rows_read for s in self.stats if s.role == role)
        rejected = sum(s.rows_rejected for s in self.stats if s.role == role)
        if not read or 2 * rejected <= read:
            return None
        reason, count = self.role_rejects[role].most_common(1)[0]
        what = {"catalog": "catalog", "logs": "log"}[role]
        share = (f"ALL {read:,} {what} rows were" if rejected == read else
                 f"{rejected:,} of {read:,} {what} rows ({100 * rejected // read}%) were")
        text = (f"{share} rejected, most as {reason} ({count:,}). "
                f"First: {self.first_details[(role, reason)]}. Every rejected row and its reason: "
                f"{out / schema.REJECTS_FILE}")
        if role == "catalog" and rejected == read:
            text += ". No product was kept, so every log row is rejected too"
        return text + "."


_PLAUSIBLE_EPOCH_MS = 631_152_000_000  # 1990-01-01 UTC: engagement logs from before it are unlikely


def _numeric_times(fmt: str, batch: Any) -> bool:
    """Whether a batch gives its timestamps as numbers (read as epoch seconds or milliseconds)."""
    if fmt == "parquet":
        names = batch.schema.names
        return schema.TIMESTAMP in names and (pa.types.is_integer(batch.schema.field(schema.TIMESTAMP).type)
                                              or pa.types.is_floating(batch.schema.field(schema.TIMESTAMP).type))
    return any(isinstance(r.get(schema.TIMESTAMP), (int, float)) and not isinstance(r.get(schema.TIMESTAMP), bool)
               for r in batch)


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


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _complete(directory: Path) -> bool:
    try:
        artifacts.verify_manifest(directory, kind="dataset")
    except (artifacts.ArtifactError, OSError, KeyError, TypeError):
        return False
    return True


def recover_leftovers(out: Path) -> list[Path]:
    """Finish or remove what killed runs left beside `out` (see the module doc); returns what was removed."""
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(\d+)")
    leftovers: list[tuple[str, Path]] = []
    if out.parent.is_dir():
        for path in out.parent.iterdir():
            match = pattern.fullmatch(path.name)
            if match and path.is_dir() and (int(match.group(2)) == os.getpid() or not _running(int(match.group(2)))):
                leftovers.append((match.group(1), path))
    if not out.exists():
        # Killed between the two renames of `_publish`: the new dataset is complete in a tmp dir.
        newest_first = sorted(leftovers, key=lambda kp: (kp[0] != "tmp", -kp[1].stat().st_mtime_ns))
        for kind, path in newest_first:
            if _complete(path):
                os.replace(path, out)
                artifacts._fsync_dir(out.parent)
                log.warning("recovered the dataset %s from %s, left by an ingest that was killed while "
                            "replacing it", out, path.name)
                leftovers.remove((kind, path))
                break
    removed = []
    for _, path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a killed ingest", path)
        removed.append(path)
    return removed


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


class _Laps:
    """Logs how long each pass took, and its rows per second."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, name: str, rows: int | None) -> None:
        now = time.perf_counter()
        seconds = now - self.last
        speed = f" ({rows / seconds:,.0f} rows/s)" if rows and seconds > 0 else ""
        log.info("%s: %s in %.1f s%s", name, f"{rows:,} rows" if rows is not None else "done", seconds, speed)
        self.last = now


def _iso(ms: int) -> str:
    when = EPOCH + dt.timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def ingest(catalog: str | Path, logs: str | Path, out: str | Path, config: IngestConfig | None = None, *,
           image_encoder: Any = None, text_encoder: Any = None) -> IngestSummary:
    """Validate, normalise and time-split `catalog` and `logs` into the dataset directory `out`.

    `catalog` and `logs` are a .parquet/.jsonl/.json file or a directory of them. `image_encoder`
    (anything with `dim` and `encode_paths`) replaces the built-in ImageEncoder, which is otherwise
    loaded only when an image path needs encoding; `text_encoder` (anything with `dim` and `encode`)
    replaces the built-in TextQueryEncoder for the products' frozen query vectors when those are
    text vectors (`config.product_query`). Raises DataError for an unusable input file
    (before anything is written) and ConfigError for a bad option.
    """
    from rich.progress import MofNCompleteColumn, Progress

    config = config or IngestConfig()
    out = Path(out)
    recover_leftovers(out)
    catalog_sources = _input_files(catalog, "catalog")
    log_sources = _input_files(logs, "logs")
    text_columns = schema.TEXT_FIELDS + tuple(f for f in config.text_fields if f not in schema.TEXT_FIELDS)
    for src in catalog_sources:
        _check_schema(src, catalog_kinds(text_columns), [schema.PRODUCT_ID])
    for src in log_sources:
        _check_schema(src, LOG_KINDS, LOG_REQUIRED)
    _check_out(out)

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ".scratch").mkdir(parents=True)
    run: _Ingest | None = None
    slabs: _TimeSlabs | None = None
    try:
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not config.progress) as progress:
            run = _Ingest(config, tmp, progress, image_encoder)
            lap = _Laps()
            run.read_catalog(catalog_sources)
            lap("catalog", sum(s.rows_read for s in run.stats))
            # Every row rejected: refused, nothing written (the error names the reasons). More than
            # half: the dataset is written, with a warning first in the summary.
            if refusal := run.refusal("catalog"):
                raise DataError(refusal)
            warnings = [run.rejection_warning("catalog", out)]
            # Before the logs: a row's query_product_id stands for its product's frozen vector.
            product_query_entry = run.product_queries(text_encoder)
            lap("product query vectors", run.products)

            minutes = run.time_pass(log_sources)
            lap("time pass", _total_rows(log_sources))
            gap_ms = int(round(config.gap_hours * 3_600_000))
            split: _GlobalSplit | _PerUserSplit
            if config.split == "per-user":
                split_ms: list[int] = []
                split = _PerUserSplit(config.validation_fraction, config.test_fraction, gap_ms)
                log.info("per-user split: each user's last %g of engagements is test, the %g before it validation",
                         config.test_fraction, config.validation_fraction)
            else:
                if config.validation_from is not None:
                    split_ms = [parse_iso_ms(config.validation_from), parse_iso_ms(config.test_from)]
                else:
                    lo, hi = (run.lo_ms, run.hi_ms) if run.lo_ms is not None else (0, 0)
                    test_ms = hi - int(config.test_fraction * (hi - lo))
                    split_ms = [test_ms - int(config.validation_fraction * (hi - lo)), test_ms]
                split = _GlobalSplit(split_ms[0], split_ms[1], gap_ms)
                log.info("validation from %s, test from %s", _iso(split_ms[0]), _iso(split_ms[1]))
            edges = [split_ms[0] - gap_ms, *split_ms] if split_ms else []
            slabs = _TimeSlabs(tmp / ".scratch", minutes.slab_edges(edges, config.sort_rows), split)
            del minutes
            run.read_logs(log_sources, slabs)
            if refusal := run.refusal("logs"):
                raise DataError(refusal)
            # Not logged here: the summary shows them first (the CLI prints it), and the manifest keeps them.
            warnings = [w for w in warnings + [run.rejection_warning("logs", out), run.time_warning()] if w]
            run.close_rejects()
            run.checks.seen_ids.clear()  # O(products) strings no later pass needs
            run.checks.kept_ids.clear()
            run.checks.product_query_rows = {}
            lap("logs", _total_rows(log_sources))

            run.write_products(tmp / schema.PRODUCTS_FILE)
            vocab = run.build_vocabulary()
            vocab.save(tmp / schema.VOCAB_FILE)
            lap("products and vocabulary", run.products)
            task = progress.add_task("sorting into windows", total=slabs.rows)
            slabs.finish({w: tmp / schema.WINDOW_FILES[w] for w in schema.WINDOWS}, lambda k: progress.advance(task, k))
            shutil.rmtree(tmp / ".scratch")
            lap("train/validation/test in time order", slabs.rows)

        checks = run.checks
        rejects = {reason: run.reject_counts.get(reason, 0) for reason in schema.REJECT_REASONS}
        rows = {w: slabs.window_rows(w) for w in schema.WINDOWS}  # window -> task -> rows
        for w in ("validation", "test"):  # logged, not a summary warning: those are about rejected rows
            if slabs.rows and not sum(rows[w].values()):
                log.warning("the %s window is empty: %s; change --%s-fraction%s.", w,
                            "no user has enough engagements (or no row has a user_id) for the per-user split"
                            if config.split == "per-user" else "no log row falls in it", w,
                            f" or --{w}-from" if config.split == "global" else "")
        image_dim = checks.image_dim or 0
        counts = {
            "products": run.products, "catalog_rows": sum(s.rows_read for s in run.stats if s.role == "catalog"),
            "log_rows": sum(s.rows_read for s in run.stats if s.role == "logs"),
            "rejects": rejects, "rejected": sum(rejects.values()),
            **{f"{w}_rows": rows[w] for w in schema.WINDOWS}, **{w: sum(rows[w].values()) for w in schema.WINDOWS},
            "gap_rows": slabs.gap_rows, "no_user_train_rows": slabs.no_user_train_rows,
            "image_dim": image_dim, "query_dims": dict(checks.query_dims), "images_truncated": checks.images_truncated,
            "vocab_size": len(vocab),
        }
        windows_from = {"validation_from": _iso(split_ms[0]), "test_from": _iso(split_ms[1])} if split_ms else \
            {"validation_from": None, "test_from": None}
        manifest_config = {**to_dict(config), **windows_from,
                           "split_rule": ("per-user" if config.split == "per-user" else
                                          "given" if config.validation_from is not None else "fractions"),
                           "text_columns": list(text_columns), "catalog": str(catalog), "logs": str(logs)}
        inputs = {str(s.path): _fingerprint(s.path, config.sha256_max_bytes) for s in catalog_sources + log_sources}
        artifacts.write_manifest(tmp, "dataset", config=manifest_config, inputs=inputs, counts=counts,
                                 extra={"input_files": {"catalog": [str(s.path) for s in catalog_sources],
                                                        "logs": [str(s.path) for s in log_sources]},
                                        "warnings": warnings, schema.PRODUCT_QUERY: product_query_entry})
        lap("manifest", None)
        _publish(tmp, out)
    except BaseException:  # nothing half-written survives, not even on Ctrl-C
        if slabs is not None:
            slabs.close()
        if run is not None:
            run.rejects_file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    files = [out / name for name in (schema.PRODUCTS_FILE, schema.TRAIN_FILE, schema.VALIDATION_FILE,
                                     schema.TEST_FILE, schema.REJECTS_FILE, schema.VOCAB_FILE, artifacts.MANIFEST)]
    summary = IngestSummary(out=out, inputs=run.stats, rejects=rejects, products=run.products,
                            train_rows=rows["train"], validation_rows=rows["validation"], test_rows=rows["test"],
                            split=config.split, validation_from=windows_from["validation_from"],
                            test_from=windows_from["test_from"], gap_rows=slabs.gap_rows,
                            image_dim=image_dim, query_dims=dict(checks.query_dims),
                            images_truncated=checks.images_truncated, files=files, warnings=warnings,
                            product_query=product_query_entry)
    log.info("ingest: %d products, %d train, %d validation and %d test rows (%d dropped in the gap), "
             "%d rejected rows -> %s", summary.products, counts["train"], counts["validation"], counts["test"],
             slabs.gap_rows, summary.rejected, out)
    return summary
