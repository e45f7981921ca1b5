"""Filtered search in Milvus: the filter language as scalar fields and boolean expressions, and a plan
of its own, since Milvus's filtered HNSW has faiss's failure on selective filters (Milvus Lite runs
faiss HNSW with an ID selector per segment: 3.8 results of 10 at ef 128 when 25 of 20,000 rows pass).

The collection holds each filterable column as a nullable scalar field named as the column
(`attribute_fields`; filters.milvus_expression has the types and the meaning of a missing value).
`search_filtered` then, per query:

1. counts the passing rows (`count(*)` with the expression, cached per expression: a version never
   changes) and answers nothing when none pass;
2. FLAT, or at most `exact_max_rows` passing: exact, over the passing rows' vectors fetched with the
   expression (Milvus FLAT with the expression is exact already);
3. otherwise probes the query's nearest rows without the filter, reading the filter's columns, and
   evaluates the filter on them here (filters.compile_filter over a store of those rows): when k of
   them pass they are the answer; else the search runs with the expression and ef (nprobe) widened as
   the passing share falls (the smaller of the collection's and the probe's share);
4. an answer shorter than min(k, passing) is redone exactly (up to `exact_fetch_max` rows fetched).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from itemsage.index.attributes import BOOL, INTEGER, NUMBER, STRING, STRINGS, TIME, AttributeStore, format_time
from itemsage.index.filters import compile_filter, milvus_expression
from itemsage.index.planner import PROBE

log = logging.getLogger(__name__)

ID_FIELD = "product_id"
VECTOR_FIELD = "vector"
MAX_EF = 32_768  # Milvus's upper bound for HNSW's ef
QUERY_LIMIT = 16_384  # Milvus's most rows per query() (offset + limit)
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


def attribute_fields(schema: Any, kinds: dict[str, str], store: AttributeStore, reserved: set[str]) -> None:
    """Add one nullable scalar field per attribute column to a pymilvus `schema`."""
    from pymilvus import DataType

    for name, kind in kinds.items():
        if not _FIELD_NAME.match(name) or name in reserved:
            raise ValueError(f"attribute column '{name}' cannot be a Milvus field (letters, digits and '_', not "
                             f"{', '.join(sorted(reserved))}); rename it or leave it out with --filterable")
        column = store.columns[name]
        if kind in (STRING, STRINGS):
            longest = max((len(v.encode()) for v in column.values), default=1)
            params = {"max_length": max(1, min(65_535, longest))}
            if kind == STRING:
                schema.add_field(name, DataType.VARCHAR, nullable=True, **params)
            else:
                widest = int(np.diff(column.offsets).max()) if column.n else 1
                schema.add_field(name, DataType.ARRAY, element_type=DataType.VARCHAR, nullable=True,
                                 max_capacity=max(1, min(4096, widest)), **params)
        else:
            schema.add_field(name, {NUMBER: DataType.DOUBLE, INTEGER: DataType.INT64, TIME: DataType.INT64,
                                    BOOL: DataType.BOOL}[kind], nullable=True)


def attribute_rows(store: AttributeStore, lo: int, hi: int) -> list[dict[str, Any]]:
    """Rows lo..hi of the store as Milvus field values (times as int64 microseconds; missing: None)."""
    table = store.table(np.arange(lo, hi))
    out = [dict() for _ in range(hi - lo)]
    for name, kind in store.kinds.items():
        column = table.column(name)
        if kind == TIME:
            import pyarrow as pa

            values = column.cast(pa.int64()).to_pylist()
        else:
            values = column.to_pylist()
        for row, value in zip(out, values):
            row[name] = value
    return out


class MilvusFilters:
    """The filtered-search plan of one collection (see the module doc)."""

    MAX_CACHED = 256

    def __init__(self, client: Any, collection: str, kinds: dict[str, str], count: int, config: Any) -> None:
        self.client, self.collection, self.kinds, self.n, self.config = client, collection, kinds, count, config
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def expression(self, filter: Any, exclude: set[str]) -> str | None:
        expr = milvus_expression(filter, self.kinds)  # FilterError for a filter that does not fit
        if exclude:
            ids = ", ".join(json.dumps(p, ensure_ascii=False) for p in sorted(exclude))
            expr = f"{expr} and ({ID_FIELD} not in [{ids}])" if expr else f"({ID_FIELD} not in [{ids}])"
        return expr

    def count(self, expr: str) -> int:
        with self._lock:
            if expr in self._counts:
                self._counts.move_to_end(expr)
                return self._counts[expr]
        rows = self.client.query(self.collection, filter=expr, output_fields=["count(*)"])
        found = int(rows[0]["count(*)"]) if rows else 0
        with self._lock:
            self._counts[expr] = found
            while len(self._counts) > self.MAX_CACHED:
                self._counts.popitem(last=False)
        return found

    def search(self, q: np.ndarray, k: int, filter: Any, exclude: set[str]) -> tuple[list[str], list[float], str]:
        """Top-k (ids, scores, path) of one query q [D] among the passing products (module doc)."""
        expr = self.expression(filter, exclude)
        if expr is None:
            ids, scores = self._ann(q, k, None, None)
            return ids, scores, "ann"
        passing = self.count(expr)
        if passing == 0:
            return [], [], "none"
        if self.config.index_type == "FLAT":
            ids, scores = self._ann(q, k, expr, None)
            return ids, scores, "exact"
        if passing <= self.config.exact_max_rows:
            return (*self._exact(q, k, expr, passing), "exact")
        columns = sorted(filter) if isinstance(filter, dict) else []
        p = min(max(PROBE, k), self.n)
        hits = self._ann_rows(q, p, None, None, columns)
        ok = self._passing(hits, filter, exclude)
        chosen = [h for h, good in zip(hits, ok) if good]
        if len(chosen) >= k:  # the query's nearest rows hold k passing ones
            return [h[ID_FIELD] for h in chosen[:k]], [float(h["distance"]) for h in chosen[:k]], "probe"
        share = min(passing / self.n, (len(chosen) + 0.5) / max(len(hits), 1))
        ids, scores = self._ann(q, k, expr, share)
        if len(ids) < min(k, passing) and passing <= self.config.exact_fetch_max:
            return (*self._exact(q, k, expr, passing), "ann+exact")
        if len(ids) < min(k, passing):
            log.warning("Milvus returned %d of %d results for a filter passing %d rows (too many to search exactly)",
                        len(ids), k, passing)
        return ids, scores, "ann"

    def _params(self, share: float | None) -> dict[str, Any]:
        c = self.config
        if c.index_type == "HNSW":
            ef = c.ef_search if share is None else min(MAX_EF, max(c.ef_search, math.ceil(c.ef_search / share)))
            return {"metric_type": "IP", "params": {"ef": int(ef)}}
        if c.index_type == "IVF_FLAT":
            nprobe = c.nprobe if share is None else min(c.nlist, max(c.nprobe, math.ceil(c.nprobe / share)))
            return {"metric_type": "IP", "params": {"nprobe": int(nprobe)}}
        return {"metric_type": "IP", "params": {}}

    def _ann_rows(self, q: np.ndarray, k: int, expr: str | None, share: float | None,
                  columns: list[str] = ()) -> list[dict[str, Any]]:
        hits = self.client.search(self.collection, data=[np.asarray(q, np.float32).tolist()], limit=k,
                                  anns_field=VECTOR_FIELD, search_params=self._params(share),
                                  output_fields=[ID_FIELD, *columns], **({"filter": expr} if expr else {}))[0]
        rows = []
        for h in sorted(hits, key=lambda h: -h["distance"]):
            entity = h.get("entity") or {}
            rows.append({ID_FIELD: h.get(ID_FIELD, entity.get(ID_FIELD, h.get("id"))), "distance": h["distance"],
                         **{c: entity.get(c, h.get(c)) for c in columns}})
        return rows

    def _ann(self, q: np.ndarray, k: int, expr: str | None, share: float | None) -> tuple[list[str], list[float]]:
        rows = self._ann_rows(q, k, expr, share)
        return [r[ID_FIELD] for r in rows], [float(r["distance"]) for r in rows]

    def _passing(self, rows: list[dict[str, Any]], filter: Any, exclude: set[str]) -> np.ndarray:
        """The filter evaluated here on rows Milvus returned with the filter's columns (bool [len(rows)])."""
        ok = np.array([r[ID_FIELD] not in exclude for r in rows], dtype=bool)
        if not filter or not rows:
            return ok
        kinds = {c: self.kinds[c] for c in filter}
        records = [{c: (format_time(r[c]) if self.kinds[c] == TIME and r[c] is not None else r[c]) for c in kinds}
                   for r in rows]
        mask = compile_filter(AttributeStore.from_products(records, kinds), filter)
        return ok if mask is None else ok & mask

    def _exact(self, q: np.ndarray, k: int, expr: str, passing: int) -> tuple[list[str], list[float]]:
        """Exact top-k over the `passing` rows' vectors, fetched with the expression (one query up to
        Milvus's 16,384 rows a query; beyond, page by page with a query iterator)."""
        if passing <= QUERY_LIMIT:
            rows = self.client.query(self.collection, filter=expr, output_fields=[ID_FIELD, VECTOR_FIELD],
                                     limit=passing)
            pages = [rows]
        else:
            pages = []
            iterator = self.client.query_iterator(self.collection, batch_size=QUERY_LIMIT, filter=expr,
                                                  output_fields=[ID_FIELD, VECTOR_FIELD])
            try:
                while page := iterator.next():
                    pages.append(page)
            finally:
                iterator.close()
        ids = [r[ID_FIELD] for page in pages for r in page]
        if not ids:
            return [], []
        vectors = np.asarray([r[VECTOR_FIELD] for page in pages for r in page], dtype=np.float32)  # [passing, D]
        scores = vectors @ np.asarray(q, np.float32)
        top = np.argsort(-scores, kind="stable")[:k]
        return [ids[i] for i in top], scores[top].tolist()
