"""Ingest's readers: input files (or a catalog in memory) -> streaming batches, and the file checks.

A Parquet file is read as pyarrow RecordBatches, a JSON Lines file as lists of dicts; a directory is
read file by file in sorted name order. `check_schema` refuses a file that cannot be used at all
(unreadable, no rows, a required column missing or of the wrong type) before ingest writes anything,
with a `DataError` that says how to fix it. The rules a user sees are in itemsage.ingest's module doc.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from itemsage import artifacts, schema
from itemsage.data.normalise import KIND_EXPECTED, KIND_FIX, KIND_JSON, arrow_accepts

log = logging.getLogger(__name__)


class DataError(ValueError):
    """An input file cannot be used at all; the message names the file, the column, what was
    expected, what was found and how to fix it."""


_PARQUET = (".parquet", ".pq")
_BATCH_BYTES = 64 << 20  # a Parquet batch holds at most `batch_rows` rows and about this many bytes
_JSONL = (".jsonl", ".json", ".ndjson")


@dataclass
class Source:
    """One input file, read in streaming batches of a Parquet RecordBatch or a list of JSON dicts."""

    path: Path
    role: str
    fmt: str  # "parquet" | "jsonl"
    num_rows: int | None = None  # known from Parquet metadata; for JSON Lines after a full pass
    data: Any = None  # in memory instead of a file: a pyarrow Table ("parquet") or a list of dicts ("jsonl")
    option: str | None = None  # the flag that named it (default --<role>); "" when given to the Python API

    @property
    def point(self) -> str:
        """How to give another input, in the caller's words: "point --catalog at" or "pass"."""
        option = f"--{self.role}" if self.option is None else self.option
        return f"point {option} at" if option else "pass"

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


def input_files(path: str | Path, role: str, option: str | None = None) -> list[Source]:
    """The files of an input path; `option`: the flag that named it (default --<role>; "" for the Python API)."""
    path = Path(path)
    point = Source(path, role, "", option=option).point.capitalize()
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        files = [p for p in entries if p.suffix.lower() in _PARQUET + _JSONL]
        skipped = [p.name for p in entries if p not in files]
        if skipped:
            log.warning("%s directory %s: skipping files that are neither Parquet nor JSON Lines: %s",
                        role, path, ", ".join(skipped[:10]))
        if not files:
            raise DataError(f"{role} directory {path} holds no .parquet, .jsonl or .json files. "
                            f"{point} a file or a directory of such files.")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{role} path {path} does not exist. {point} a .parquet/.jsonl file "
                        "or a directory of them.")
    sources = []
    for p in files:
        suffix = p.suffix.lower()
        if suffix not in _PARQUET + _JSONL:
            raise DataError(f"{role} file {p}: unknown format '{suffix or '(no extension)'}'; accepted "
                            f"extensions: {', '.join(_PARQUET + _JSONL)} (Parquet, or JSON Lines: one JSON "
                            f"object per line). Convert the file (renaming it does not change its format), "
                            f"e.g. {_convert_hint(p)}.")
        sources.append(Source(p, role, "parquet" if suffix in _PARQUET else "jsonl", option=option))
    return sources


def _convert_hint(p: Path) -> str:
    """How to convert a file of an unknown format to Parquet, with pandas."""
    target = p.with_suffix(".parquet").name
    if p.suffix.lower() in (".csv", ".tsv", ".txt"):
        sep = ", sep='\\t'" if p.suffix.lower() == ".tsv" else ""
        return (f"pandas.read_csv('{p.name}'{sep}, dtype={{'product_id': str}}).to_parquet('{target}') "
                "(list columns such as image_embeddings need parsing first)")
    return f"load it with pandas (pandas.read_excel, read_json, ...) and write df.to_parquet('{target}')"


def check_schema(src: Source, kinds: dict[str, str], required: Sequence[str]) -> None:
    """Refuse a file that cannot be used at all: unreadable, no rows, required column missing or of
    the wrong type. Cheap: Parquet metadata, or the first 1,000 JSON records."""
    where = f"{src.role} {src.path}" if src.data is not None else f"{src.role} file {src.path}"
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
    if rows == 0 and src.data is not None:
        raise DataError(f"{where}: has no rows; pass at least one product.")
    if rows == 0:
        raise DataError(f"{where}: has no rows. Remove the empty file or {src.point} a file with data.")
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(
            f"{where}: required column '{missing[0]}' is missing (expected {KIND_EXPECTED[kinds[missing[0]]]}; "
            f"found columns: {', '.join(names) or 'none'}). Add the column, or rename the column that holds it.")
    if bad:
        c = bad[0]
        raise DataError(f"{where}: column '{c}' has type {found[c]}, expected {KIND_EXPECTED[kinds[c]]}. "
                        f"Fix: {KIND_FIX[kinds[c]].format(c=c)}.")


def fingerprint(path: Path, sha256_max_bytes: int) -> str:
    stat = path.stat()
    if stat.st_size > sha256_max_bytes:
        return f"size-mtime:{stat.st_size}:{stat.st_mtime_ns}"
    return f"sha256:{artifacts.sha256_file(path)}"


def total_rows(sources: list[Source]) -> int | None:
    """Rows of all sources, when known (Parquet metadata; JSON Lines after the time pass)."""
    return None if any(s.num_rows is None for s in sources) else sum(s.num_rows for s in sources)


def catalog_sources(catalog: Any, option: str | None = None) -> list[Source]:
    """Sources of a catalog: a .parquet/.jsonl/.json file or a directory of them, or in memory a
    pyarrow Table, a pandas DataFrame or a list of dicts (one per product). `option`: as `input_files`'."""
    if isinstance(catalog, (str, Path)):
        return input_files(catalog, "catalog", option)
    if isinstance(catalog, pa.Table):
        return [Source(Path("<table>"), "catalog", "parquet", catalog.num_rows, data=catalog)]
    if type(catalog).__name__ == "DataFrame" and hasattr(catalog, "to_dict"):  # pandas, without importing it
        table = pa.Table.from_pandas(catalog, preserve_index=False)
        return [Source(Path("<dataframe>"), "catalog", "parquet", table.num_rows, data=table)]
    if isinstance(catalog, list):
        bad = next((i for i, r in enumerate(catalog) if not isinstance(r, dict)), None)
        if bad is not None:
            raise DataError(f"catalog list item {bad} is a {type(catalog[bad]).__name__}; expected one dict per "
                            "product ({'product_id': ..., 'title': ...}).")
        return [Source(Path("<records>"), "catalog", "jsonl", len(catalog), data=catalog)]
    raise DataError(f"catalog of type {type(catalog).__name__} is not readable; pass a path to a .parquet/.jsonl "
                    "file or directory, a pyarrow Table, a pandas DataFrame or a list of dicts.")


def numeric_times(fmt: str, batch: Any) -> bool:
    """Whether a batch gives its timestamps as numbers (read as epoch seconds or milliseconds)."""
    if fmt == "parquet":
        names = batch.schema.names
        return schema.TIMESTAMP in names and (pa.types.is_integer(batch.schema.field(schema.TIMESTAMP).type)
                                              or pa.types.is_floating(batch.schema.field(schema.TIMESTAMP).type))
    return any(isinstance(r.get(schema.TIMESTAMP), (int, float)) and not isinstance(r.get(schema.TIMESTAMP), bool)
               for r in batch)
