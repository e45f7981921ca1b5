"""The catalog's filterable columns beside the vectors: one row per index row, in the index's row order.

`itemsage index` writes them into the version as `attributes.arrow`: an uncompressed Arrow IPC file
of one record batch, which `AttributeStore.open` memory-maps (no Python object per row; the page
cache holds what filters touch). The manifest lists the file (sha256) and describes each column under
`attributes` as {column: kind}:

    kind      Arrow type stored                        from a catalog column of type
    string    dictionary<int32, utf8>                  string
    strings   list<dictionary<int32, utf8>>            list of strings (null elements dropped)
    number    float64 (a null is NaN)                  float, decimal
    integer   int64 (nulls in the validity bitmap)     any integer
    bool      bool                                     bool
    time      timestamp[us, UTC]                       timestamp (naive = UTC), date

A row without a value (null, an empty list) matches no value and no range; it passes `not`
(itemsage.index.filters has the language). Columns of other types (vectors, structs) are not
filterable and are left out. A live index keeps its upserts' attributes in a small store of its own,
built from the logged products with `from_products`, in the version's kinds.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from itemsage import artifacts
from itemsage.schema import CONTENT_HASH, IMAGE_PATHS, PRODUCT_ID

log = logging.getLogger(__name__)

ATTRIBUTES_FILE = "attributes.arrow"
STRING, STRINGS, NUMBER, INTEGER, BOOL, TIME = "string", "strings", "number", "integer", "bool", "time"
KINDS = (STRING, STRINGS, NUMBER, INTEGER, BOOL, TIME)
KIND_NAMES = {STRING: "string", STRINGS: "list of strings", NUMBER: "number", INTEGER: "integer",
              BOOL: "boolean", TIME: "time"}
# Columns of products.parquet never stored by default: ids and hashes, and free text (a filter on a
# title is a search, not a filter). `itemsage index --filterable` can still name them.
DEFAULT_SKIP = (PRODUCT_ID, CONTENT_HASH, "title", "description", "links", IMAGE_PATHS)
_TS = pa.timestamp("us", tz="UTC")
_ROWS = "__rows"  # the placeholder column of a store without filterable columns
_DICT = pa.dictionary(pa.int32(), pa.string())
ARROW_TYPES = {STRING: pa.string(), STRINGS: pa.list_(pa.string()), NUMBER: pa.float64(), INTEGER: pa.int64(),
               BOOL: pa.bool_(), TIME: _TS}


def kind_of(t: pa.DataType) -> str | None:
    """The filter kind of an Arrow type; None: not filterable (a vector, a struct, a null column)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return STRING
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and kind_of(t.value_type) == STRING:
        return STRINGS
    if pa.types.is_boolean(t):
        return BOOL
    if pa.types.is_integer(t):
        return INTEGER
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return NUMBER
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return TIME
    return None


def filterable_columns(schema: pa.Schema, requested: Iterable[str] | None = None) -> list[str]:
    """The columns of `schema` to store: `requested` (each must exist and be filterable, else ValueError
    naming it), or by default every filterable column except DEFAULT_SKIP."""
    kinds = {f.name: kind_of(f.type) for f in schema}
    usable = sorted(name for name, kind in kinds.items() if kind is not None)
    if requested is None:
        return [name for name in usable if name not in DEFAULT_SKIP]
    chosen = list(dict.fromkeys(requested))
    for name in chosen:
        if name not in kinds:
            raise ValueError(f"--filterable names column '{name}', which the attribute source does not have; "
                             f"its filterable columns: {', '.join(usable) or 'none'}")
        if kinds[name] is None:
            raise ValueError(f"--filterable names column '{name}' of type {schema.field(name).type}, which is not "
                             "filterable (strings, lists of strings, numbers, booleans and times are)")
    return chosen


def _to_time(col: pa.Array) -> pa.Array:
    if pa.types.is_date(col.type):
        col = col.cast(pa.timestamp("us"))
    if col.type.tz is None:
        col = pc.assume_timezone(col.cast(pa.timestamp("us")), "UTC")
    return col.cast(_TS)


def encode_column(col: pa.Array) -> pa.Array:
    """A filterable column in its stored form (the module doc's table)."""
    kind = kind_of(col.type)
    if kind == STRING:
        if pa.types.is_dictionary(col.type):
            col = col.cast(pa.string())
        return pc.dictionary_encode(col.cast(pa.string())).cast(_DICT)
    if kind == STRINGS:
        col = col.cast(pa.list_(pa.string()))
        lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(col)  # the elements of valid lists, in order
        keep = values.is_valid().to_numpy(zero_copy_only=False)
        if not keep.all():  # null elements inside a list are dropped
            row_of = np.repeat(np.arange(len(col)), lengths)
            lengths = np.bincount(row_of[keep], minlength=len(col))
            values = values.filter(pa.array(keep))
        codes = pc.dictionary_encode(values).cast(_DICT)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), codes)  # a null list is stored empty
    if kind == INTEGER:
        return col.cast(pa.int64())
    if kind == NUMBER:
        return col.cast(pa.float64()).fill_null(float("nan"))
    if kind == TIME:
        return _to_time(col)
    if kind == BOOL:
        return col
    raise ValueError(f"a column of type {col.type} is not filterable")


def encode_attributes(table: pa.Table, columns: Iterable[str] | None = None) -> pa.RecordBatch:
    """`columns` (default: `filterable_columns`) of `table`, encoded for storing, as one record batch."""
    names = filterable_columns(table.schema, columns)
    if not names:  # no filterable column: a placeholder keeps the row count
        return pa.RecordBatch.from_arrays([pa.nulls(table.num_rows, pa.bool_())], names=[_ROWS])
    arrays = [encode_column(table.column(name).combine_chunks()) for name in names]
    return pa.RecordBatch.from_arrays(arrays, names=names)


def write_attributes(path: str | Path, table: pa.Table, columns: Iterable[str] | None = None) -> dict[str, str]:
    """Write `table`'s filterable columns (one row per index row, in its row order) atomically as an
    uncompressed Arrow IPC file of one record batch; returns {column: kind} for the manifest."""
    batch = encode_attributes(table, columns)
    with artifacts.atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)  # no compression: the file is memory-mapped as it is
    return {name: kind_of(batch.schema.field(name).type) for name in batch.schema.names if name != _ROWS}


class Column:
    """One stored column as numpy views over its (memory-mapped) Arrow buffers, and its predicates.

    Every predicate returns bool [N]; a row without a value is False in all of them."""

    def __init__(self, name: str, arr: pa.Array) -> None:
        self.name, self.kind, self.n = name, kind_of(arr.type), len(arr)
        self.valid: np.ndarray | None = None  # bool [N], only for integer, bool and time columns with nulls
        if self.kind == STRING:
            self.values = arr.dictionary.to_pylist()
            indices = arr.indices if arr.null_count == 0 else arr.indices.fill_null(len(self.values))
            self.codes = indices.to_numpy(zero_copy_only=False)  # int32 [N]; a null: code len(values)
        elif self.kind == STRINGS:
            arr = arr if arr.offset == 0 and arr.offsets[0].as_py() == 0 else pa.concat_arrays([arr])
            self.offsets = arr.offsets.to_numpy(zero_copy_only=False)  # int32 [N + 1]
            child = arr.values.slice(0, int(self.offsets[-1]))
            self.values = child.dictionary.to_pylist()
            self.codes = child.indices.to_numpy(zero_copy_only=False)  # int32 [E], the elements' codes
            # int32 [E]: the row of each element, built once (4 B per element): "any element is one of
            # these" is then a scatter of the elements' hits onto their rows
            self.elem_row = np.repeat(np.arange(self.n, dtype=np.int32), np.diff(self.offsets))
        else:
            if arr.null_count and self.kind != NUMBER:
                self.valid = arr.is_valid().to_numpy(zero_copy_only=False)
                arr = arr.fill_null(False if self.kind == BOOL else 0)
            if self.kind == TIME:
                arr = arr.cast(pa.int64())  # microseconds since the epoch
            self.data = arr.to_numpy(zero_copy_only=False)  # [N] float64 (NaN: none) / int64 / bool
        if self.kind in (STRING, STRINGS):
            self.code_of = {v: i for i, v in enumerate(self.values)}

    def _with_value(self, hit: np.ndarray) -> np.ndarray:
        return hit if self.valid is None else hit & self.valid

    def member(self, values: list[Any]) -> np.ndarray:
        """bool [N]: the row's value (a list column: any of its elements) is one of `values`, given
        in the stored form (strings; numbers; bools; times as int64 microseconds)."""
        if self.kind in (STRING, STRINGS):
            wanted = sorted({self.code_of[v] for v in values if v in self.code_of})
            if not wanted:
                return np.zeros(self.n, dtype=bool)
            if len(wanted) <= 4:  # a few codes: one vectorised comparison each
                hit = self.codes == wanted[0]
                for code in wanted[1:]:
                    hit |= self.codes == code
            else:  # a lookup table over the dictionary (+ the null code): one gather
                table = np.zeros(len(self.values) + 1, dtype=bool)
                table[wanted] = True
                hit = table.take(self.codes)
            if self.kind == STRINGS:
                rows = np.zeros(self.n, dtype=bool)
                rows[self.elem_row[hit]] = True
                hit = rows
            return hit
        if self.kind == BOOL:
            wanted = set(values)
            hit = self.data.copy() if wanted == {True} else ~self.data if wanted == {False} else \
                np.ones(self.n, dtype=bool)
            return self._with_value(hit)
        hit = np.zeros(self.n, dtype=bool)
        for v in values:
            hit |= self.data == self._comparable(v)
        return self._with_value(hit)

    def compare(self, op: str, value: Any) -> np.ndarray:
        """bool [N]: the row's value `op` `value` (op: gte, gt, lte, lt); number, integer, time columns."""
        ufunc = {"gte": np.greater_equal, "gt": np.greater, "lte": np.less_equal, "lt": np.less}[op]
        return self._with_value(ufunc(self.data, self._comparable(value)))

    def _comparable(self, value: Any) -> Any:
        # a JSON integer past int64 (or a float) against an int64 column: compare as float, never overflow
        if self.kind in (INTEGER, TIME) and (isinstance(value, float) or abs(value) >= 2 ** 62):
            return float(value)
        return value

    def counts(self) -> tuple[list[str], np.ndarray]:
        """(values, rows holding each) of a string or list column."""
        return self.values, np.bincount(self.codes[self.codes < len(self.values)], minlength=len(self.values))

    def value_range(self) -> tuple[Any, Any] | None:
        """(min, max) of a number, integer or time column's values; None when it has none."""
        data = self.data if self.valid is None else self.data[self.valid]
        if self.kind == NUMBER:
            data = data[~np.isnan(data)]
        if len(data) == 0:
            return None
        lo, hi = data.min(), data.max()
        if self.kind == TIME:
            return format_time(int(lo)), format_time(int(hi))
        return lo.item(), hi.item()


def format_time(micros: int) -> str:
    """Microseconds since the epoch -> ISO-8601 in UTC ('2026-01-02T03:04:05Z')."""
    t = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=micros)
    return t.isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> int | None:
    """An ISO-8601 time with a zone ('2026-01-01T00:00:00Z', '...+01:00') -> int64 microseconds since
    the epoch; None when `value` is not one (a date alone or a time without a zone is not)."""
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        t = dt.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        return None
    if t.tzinfo is None:
        return None
    delta = t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class AttributeStore:
    """Filterable catalog columns, row r = index row r (see the module doc).

    >>> store = AttributeStore.open(version_dir / ATTRIBUTES_FILE)   # memory-mapped
    >>> store.kinds                                                  # {"category": "strings", ...}
    """

    def __init__(self, batch: pa.RecordBatch, source: Any = None) -> None:
        self._source = source  # keeps the memory map open while the columns' views live
        self._batch = batch
        self.n = batch.num_rows
        names = [name for name in batch.schema.names if name != _ROWS]
        self.columns = {name: Column(name, batch.column(name)) for name in names}
        self.kinds = {name: c.kind for name, c in self.columns.items()}

    @classmethod
    def open(cls, path: str | Path) -> AttributeStore:
        source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(source)
        if reader.num_record_batches != 1:
            raise artifacts.ArtifactError(f"{path} holds {reader.num_record_batches} record batches, expected 1; "
                                          "rebuild the index")
        return cls(reader.get_batch(0), source)

    @classmethod
    def from_table(cls, table: pa.Table, columns: Iterable[str] | None = None) -> AttributeStore:
        """An in-memory store of `table`'s filterable columns (or `columns`)."""
        return cls(encode_attributes(table, columns))

    @classmethod
    def from_products(cls, products: list[dict[str, Any]], kinds: dict[str, str], *,
                      lenient: bool = False) -> AttributeStore:
        """A store of `kinds`' columns from product records (a live index's upserts; see `products_table`)."""
        return cls.from_table(products_table(products, kinds, lenient=lenient), list(kinds))

    def write(self, path: str | Path) -> dict[str, str]:
        """Write the store as `write_attributes` does; returns {column: kind} for the manifest."""
        with artifacts.atomic_path(path) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, self._batch.schema) as writer:
                writer.write_batch(self._batch)
        return dict(self.kinds)

    def table(self, rows: np.ndarray | None = None) -> pa.Table:
        """The stored columns (rows: these rows only) as plain Arrow types, for writing a new version."""
        batch = self._batch if rows is None else self._batch.take(pa.array(rows, pa.int64()))
        arrays = []
        for name in self.columns:
            col = batch.column(name)
            kind = self.kinds[name]
            if kind == STRING:
                col = col.cast(pa.string())
            elif kind == STRINGS:
                col = pa.ListArray.from_arrays(col.offsets, col.values.cast(pa.string()))
            elif kind == NUMBER:  # NaN stored for a missing number: null again
                col = pc.if_else(pc.is_nan(col), pa.scalar(None, pa.float64()), col)
            arrays.append(col)
        return pa.table(arrays, names=list(self.columns)) if arrays else pa.table({})

    def summary(self, max_values: int = 100) -> list[dict[str, Any]]:
        """Per column: name, kind, and the most common values (strings) or the range (numbers, times)."""
        out = []
        for name, col in sorted(self.columns.items()):
            entry: dict[str, Any] = {"name": name, "kind": col.kind}
            if col.kind in (STRING, STRINGS):
                values, counts = col.counts()
                order = np.argsort(-counts, kind="stable")[:max_values]
                entry["values"] = [values[i] for i in order if counts[i] > 0]
                entry["distinct"] = int(np.count_nonzero(counts))
            elif col.kind in (NUMBER, INTEGER, TIME):
                found = col.value_range()
                if found is not None:
                    entry["min"], entry["max"] = found
            out.append(entry)
        return out


def concat_tables(tables: list[pa.Table], kinds: dict[str, str]) -> pa.Table:
    """Tables of `kinds`' columns (plain types, e.g. `AttributeStore.table`) as one, cast to the kinds'
    plain Arrow types."""
    fields = pa.schema([(name, ARROW_TYPES[kind]) for name, kind in kinds.items()])
    cast = [pa.table([t.column(f.name).cast(f.type) for f in fields], schema=fields) for t in tables]
    return pa.concat_tables(cast) if cast else fields.empty_table()


# ---- a product's attribute values (live upserts) ------------------------------------------------


def coerce(value: Any, kind: str, where: str) -> Any:
    """A JSON value of a product record as `kind`'s plain Arrow value (None: no value); ValueError
    says what `where` (e.g. "products[0].price") expected."""
    if value is None:
        return None
    if kind == STRINGS:
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, str) for v in items):
            return items
        raise ValueError(f"{where} must be a string or a list of strings (a filterable column of the index)")
    if kind == STRING:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str):
            return value
        raise ValueError(f"{where} must be a string (a filterable column of the index)")
    if kind == BOOL:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false (a filterable column of the index)")
    if kind in (NUMBER, INTEGER):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and kind == INTEGER and isinstance(value, float) and value.is_integer():
            value = int(value)
        if ok and (kind == NUMBER or (isinstance(value, int) and abs(value) < 2 ** 63)):
            return float(value) if kind == NUMBER else value
        what = "a finite number" if kind == NUMBER else "an integer"
        raise ValueError(f"{where} must be {what} (a filterable column of the index)")
    micros = parse_time(value)
    if micros is None:
        raise ValueError(f"{where} must be an ISO-8601 time with a zone, e.g. \"2026-01-01T00:00:00Z\" (a "
                         "filterable column of the index)")
    return micros


def products_table(products: list[dict[str, Any]], kinds: dict[str, str], *, lenient: bool = False) -> pa.Table:
    """Product records -> a table of `kinds`' columns in their plain Arrow types (absent: null).

    A value of the wrong type raises ValueError naming it; with `lenient` (a live log replayed onto a
    version whose column kinds differ from the one it was logged against) it is left out, logged."""
    columns = {}
    for name, kind in kinds.items():
        values = []
        for i, p in enumerate(products):
            try:
                values.append(coerce(p.get(name), kind, f"products[{i}].{name}"))
            except ValueError as err:
                if not lenient:
                    raise
                log.warning("%s; left out of the filterable attributes of product %r", err, p.get(PRODUCT_ID))
                values.append(None)
        if kind == TIME:
            columns[name] = pa.array(values, pa.int64()).cast(_TS)
        else:
            columns[name] = pa.array(values, ARROW_TYPES[kind])
    return pa.table(columns) if columns else pa.table({_ROWS: pa.nulls(len(products), pa.bool_())})
