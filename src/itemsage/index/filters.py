"""The filter language: which products a request may get back, as a JSON object of column -> condition.

    {"category": ["shoes", "boots"]}        one of these values (a list column: any of its elements is)
    {"brand": "acme"}                       this value
    {"brand": {"not": ["acme"]}}            none of these values ({"not": "acme"} too)
    {"price": {"gte": 10, "lt": 50}}        a range: gte, gt, lte, lt (numbers, integers, times)
    {"listed_at": {"gte": "2026-01-01T00:00:00Z"}}   times are ISO-8601 strings with a zone
    {"in_stock": true}                      booleans: true or false

Conditions on several columns are ANDed. A product without a value in a column (null, an empty list)
matches no value and no range, and passes `not`. A value list may be empty (nothing passes) and holds
at most MAX_VALUES values. The columns are those the index version stores (`itemsage index` writes
them; manifest `attributes`); anything else, a value of the wrong type, or an operator that does not
fit the column raises `FilterError`, which names the column and lists the filterable ones (the
service's 422).

`compile_filter(store, spec)` turns a filter into a bool mask over the store's rows with numpy, one
vectorised pass per condition; `milvus_expression` writes the same filter as a Milvus boolean
expression (index/milvus.py), with the same meaning.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from itemsage.index.attributes import (
    BOOL,
    INTEGER,
    KIND_NAMES,
    NUMBER,
    STRING,
    STRINGS,
    TIME,
    AttributeStore,
    parse_time,
)
from itemsage.index.planner import RowMask

RANGE_OPS = ("gte", "gt", "lte", "lt")
NOT = "not"
MAX_VALUES = 1000  # values in one condition's list
MAX_CONDITIONS = 64  # columns in one filter


class FilterError(ValueError):
    """A filter that does not fit the index's attributes: the service answers 422 with this message."""

    def __init__(self, column: str | None, problem: str, kinds: dict[str, str]) -> None:
        self.column = column
        self.filterable = sorted(kinds)
        listed = ", ".join(f"{name} ({KIND_NAMES[kinds[name]]})" for name in self.filterable)
        where = f"filter column '{column}': " if column is not None else "filter: "
        tail = (f"Filterable columns: {listed}" if listed else
                "This index version stores no filterable columns; build it with `itemsage index` from "
                "embeddings of a dataset (or give --attributes) to filter")
        super().__init__(f"{where}{problem}. {tail}")


def canonical(spec: Any) -> str:
    """One string per filter meaning's spelling (keys sorted): the key of compiled-filter caches."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=True)


def _show(value: Any) -> str:
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _value(kind: str, v: Any, fail: Callable[[str], None]) -> Any:
    """A JSON value as the column's stored value (times as int64 microseconds)."""
    if kind in (STRING, STRINGS):
        if not isinstance(v, str):
            fail(f"expects strings, got {_show(v)}")
        return v
    if kind in (NUMBER, INTEGER):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            fail(f"expects finite numbers, got {_show(v)}")
        return v
    if kind == BOOL:
        if not isinstance(v, bool):
            fail(f"expects true or false, got {_show(v)}")
        return v
    micros = parse_time(v)
    if micros is None:
        fail(f"expects ISO-8601 times with a zone (e.g. \"2026-01-01T00:00:00Z\"), got {_show(v)}")
    return micros


def _values(kind: str, given: Any, fail: Callable[[str], None]) -> list[Any]:
    items = given if isinstance(given, list) else [given]
    if len(items) > MAX_VALUES:
        fail(f"lists at most {MAX_VALUES} values, got {len(items)}")
    return [_value(kind, v, fail) for v in items]


def parse(spec: Any, kinds: dict[str, str]) -> list[tuple[str, str, Any]]:
    """A filter -> its conditions [(column, op, operand)], checked against `kinds` ({column: kind}).

    op: "in" (operand: a list of stored values), "not" (the same), or a range op (one stored value).
    Raises FilterError. An empty filter ({}) or None has no conditions."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise FilterError(None, f"must be a JSON object of column -> condition, got {_show(spec)}", kinds)
    if len(spec) > MAX_CONDITIONS:
        raise FilterError(None, f"has {len(spec)} columns; at most {MAX_CONDITIONS}", kinds)
    out: list[tuple[str, str, Any]] = []
    for name, cond in spec.items():
        def fail(problem: str, name: str = name) -> None:
            raise FilterError(name, problem, kinds)

        kind = kinds.get(name)
        if kind is None:
            fail("not a filterable column of this index version")
        if not isinstance(cond, dict):
            out.append((name, "in", _values(kind, cond, fail)))
            continue
        ops = set(cond)
        if ops == {NOT}:
            out.append((name, NOT, _values(kind, cond[NOT], fail)))
        elif ops and ops <= set(RANGE_OPS):
            if kind not in (NUMBER, INTEGER, TIME):
                fail(f"ranges ({', '.join(sorted(ops))}) apply to numbers, integers and times; this is a "
                     f"{KIND_NAMES[kind]} column: give a value, a list of values or {{\"not\": [...]}}")
            for op in RANGE_OPS:
                if op in cond:
                    if isinstance(cond[op], (list, dict)):
                        fail(f"'{op}' takes one value, got {_show(cond[op])}")
                    out.append((name, op, _value(kind, cond[op], fail)))
        elif NOT in ops and ops - {NOT} <= set(RANGE_OPS):
            fail("'not' cannot be combined with gte/gt/lte/lt in one condition")
        else:
            unknown = sorted(ops - set(RANGE_OPS) - {NOT}) or sorted(ops)
            fail(f"operator(s) {', '.join(map(repr, unknown)) or '(none)'} not understood: give a value, a list "
                 "of values, {\"not\": [...]}, or a range with gte, gt, lte, lt")
    return out


def compile_filter(store: AttributeStore, spec: Any) -> np.ndarray | None:
    """The rows of `store` that pass `spec`: bool [N]; None when the filter has no conditions."""
    conditions = parse(spec, store.kinds)
    mask: np.ndarray | None = None
    for name, op, operand in conditions:
        column = store.columns[name]
        if op == "in":
            hit = column.member(operand)
        elif op == NOT:
            hit = ~column.member(operand)
        else:
            hit = column.compare(op, operand)
        mask = hit if mask is None else np.logical_and(mask, hit, out=mask)
    return mask


# ---- Milvus boolean expressions (index/milvus.py stores the columns as scalar fields) --------------


def _literal(kind: str, value: Any) -> str:
    if kind in (STRING, STRINGS):
        return json.dumps(value, ensure_ascii=False)  # a double-quoted string, escaped as JSON
    if kind == BOOL:
        return "true" if value else "false"
    if kind in (INTEGER, TIME) and float(value).is_integer() and abs(value) < 2 ** 62:
        return str(int(value))
    return repr(float(value))


def milvus_expression(spec: Any, kinds: dict[str, str]) -> str | None:
    """The filter as a Milvus boolean expression over nullable scalar fields named as the columns, None
    when it has no conditions. Raises FilterError as `parse`.

    Fields (index/milvus.py): a string is VARCHAR, a list of strings ARRAY<VARCHAR>, a number DOUBLE, an
    integer INT64, a time INT64 microseconds since the epoch, a boolean BOOL; a missing value is null.
    Membership and ranges never pass a null; `not` is written `(field is null or not (...))`, so a
    missing value passes it whatever the server's three-valued logic does: the meaning of compile_filter."""
    parts = []
    for name, op, operand in parse(spec, kinds):
        kind = kinds[name]
        if op in RANGE_OPS:
            symbol = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}[op]
            parts.append(f"({name} {symbol} {_literal(kind, operand)})")
            continue
        values = ", ".join(_literal(kind, v) for v in dict.fromkeys(operand))
        if not operand:
            member = "false"
        elif kind == STRINGS:
            member = f"ARRAY_CONTAINS_ANY({name}, [{values}])"
        else:
            member = f"{name} in [{values}]"
        parts.append(f"({member})" if op == "in" else f"({name} is null or not ({member}))")
    return " and ".join(parts) if parts else None


class FilterMasks:
    """Filters compiled over one store, as RowMasks (planner.py), the latest MAX_CACHED kept: shops send
    the same few filters again and again, and compiling one costs up to milliseconds at 1M rows."""

    MAX_CACHED = 64

    def __init__(self, store: AttributeStore | None) -> None:
        self.store = store
        self._cache: OrderedDict[str, RowMask] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def kinds(self) -> dict[str, str]:
        return self.store.kinds if self.store is not None else {}

    def mask(self, spec: Any) -> RowMask | None:
        """The rows passing `spec` (None: no conditions, every row). Raises FilterError."""
        if not spec and (spec is None or isinstance(spec, dict)):
            return None
        if self.store is None:
            parse(spec, {})  # refuses every column: this version stores none
        key = canonical(spec)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        mask = compile_filter(self.store, spec)
        rows = RowMask.from_bool(mask) if mask is not None else None
        if rows is not None:
            with self._lock:
                self._cache[key] = rows
                while len(self._cache) > self.MAX_CACHED:
                    self._cache.popitem(last=False)
        return rows
