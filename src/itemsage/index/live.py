"""Live updates: products upserted and deleted between index builds, durable across a kill -9.

An index version is built in batch; a shop changes products all day. The server takes upserts
(features in, embedded by the served model) and deletes, writes each to an append-only log
(index/live_log.py) and fsyncs it before answering, and applies it to a `LiveIndex`: the served
version plus

- a small exact side index of upserted vectors, searched with the main index and merged by score;
- a bitmap of the main index's rows still alive (not deleted, not replaced by a newer upsert), the
  base of every search's row mask (index/planner.py): hidden rows are skipped inside the search, so
  k results still come back;
- the upserts' filterable attributes (the logged product records, in the version's column kinds), so
  a filter sees an upsert's new values on the next request and after a replay.

An index version's manifest may carry `live_seq`: the last logged update folded into it. What is
served is that version plus every logged update with a larger `seq`, replayed at start and at each
reload. `compact` (`itemsage index --compact`) folds the log into a new version, publishes it
(CURRENT, as for any build) and drops the folded lines from the log; the server picks the new
version up on its next `/admin/reload`, replaying only what came after.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.index.attributes import AttributeStore, concat_tables
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.filters import compile_filter
from itemsage.index.planner import RowMask
from itemsage.index.live_log import DELETE, UPSERT, LiveLog, decode_vector
from itemsage.index.query_vectors import NoProductQueries, no_product_queries
from itemsage.index.versions import claim_new_version, load_current, release_claim, version_path
from itemsage.index.versions import publish as publish_version

log = logging.getLogger(__name__)


# ---- the served index with its updates ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _View:
    """One consistent state, swapped whole by each update; a search reads it once."""

    alive: RowMask | None  # main-index rows not deleted or replaced (None: all of them)
    side_vectors: np.ndarray  # [M, D] upserted unit vectors (rows never change once published)
    side_ids: np.ndarray  # [M] product ids (object)
    side_alive: np.ndarray  # bool [M]: False once the id is upserted again or deleted
    side_row: dict[str, int]  # product id -> its live side row
    side_query: np.ndarray  # [M, Dq] upserted frozen query vectors (NaN: the update carried none); Dq 0 = none
    side_products: tuple[dict[str, Any], ...]  # [M] the upserts' logged product records
    side_attributes: AttributeStore | None  # [M] their filterable columns (the version's kinds)

    @property
    def hidden_count(self) -> int:
        return 0 if self.alive is None else self.alive.n - self.alive.count


def _query_vector_or_nan(record: dict[str, Any], dim: int) -> np.ndarray | float:
    """An upsert's logged query vector, or NaN (none) when it has none or one of another width: the log
    outlives index versions, and a version whose product query source differs must still replay."""
    given = record.get("query_vector")
    if given is None:
        return np.nan
    vector = np.frombuffer(base64.b64decode(given), dtype="<f4")
    if vector.shape != (dim,):
        log.warning("update %s: product %r was logged with a %d-d query vector, this index version's are %d-d; "
                    "its query vector is left out until it is upserted again", record.get("seq"), record.get("id"),
                    vector.size, dim)
        return np.nan
    return decode_vector(given, dim)


class LiveIndex:
    """A `ProductIndex` version plus the updates logged after it, with the index's search verbs.

    `search`, `vector`, `in` and `len` see deletes and upserts; `config`, `stats`, `manifest` and
    `version` are the version's. Updates are applied under a lock; searches never wait for them.
    """

    def __init__(self, base: ProductIndex) -> None:
        self.base = base
        self.applied_seq = int(base.manifest.get("live_seq", 0))
        n = len(base)
        self._buffer = np.zeros((64, base.dim), dtype=np.float32)  # grows by doubling
        self.query_dim = base.query_dim or 0  # 0: the version has no product query vectors
        self._query_buffer = np.zeros((64, self.query_dim), dtype=np.float32)  # grows with _buffer
        self._count = 0
        self._lock = threading.Lock()
        self.upserts = 0
        self.deletes = 0
        self._view = _View(None, self._buffer[:0], np.empty(0, dtype=object), np.zeros(0, dtype=bool), {},
                           self._query_buffer[:0], (), None)
        del n

    # -- what the served index delegates --

    config = property(lambda self: self.base.config)
    stats = property(lambda self: self.base.stats)
    manifest = property(lambda self: self.base.manifest)
    version = property(lambda self: self.base.version)
    dim = property(lambda self: self.base.dim)

    def _base_row(self, view: _View, product_id: str) -> int:
        row = self.base.row(product_id)
        if row >= 0 and view.alive is not None and not view.alive.contains(np.array([row]))[0]:
            return -1
        return row

    def __contains__(self, product_id: object) -> bool:
        view = self._view
        return product_id in view.side_row or (isinstance(product_id, str) and self._base_row(view, product_id) >= 0)

    def __len__(self) -> int:
        view = self._view
        return len(self.base) - view.hidden_count + len(view.side_row)

    @property
    def side_rows(self) -> int:
        """Upserted rows every search scans exactly (dead ones included), until the next compaction."""
        return len(self._view.side_ids)

    def vector(self, product_ids: list[str] | np.ndarray) -> np.ndarray:
        """The current unit vectors [N, D] of `product_ids`; KeyError names ids deleted or never indexed."""
        out, _ = self._lookup(product_ids, "side_vectors", self.dim, self.base.vector)
        return out

    def _lookup(self, product_ids: list[str] | np.ndarray, side: str, width: int,
                read_base: Any) -> tuple[np.ndarray, list[str]]:
        """Rows [N, width] of `product_ids`: an upsert's from the view's `side` matrix, the version's
        through `read_base(ids)`. Also returns the ids read from the side. KeyError names ids deleted
        or never indexed."""
        view = self._view
        product_ids = list(product_ids)
        out = np.empty((len(product_ids), width), dtype=np.float32)
        side_rows, missing, base_at, base_ids, from_side = getattr(view, side), [], [], [], []
        for i, pid in enumerate(product_ids):
            if pid in view.side_row:
                out[i] = side_rows[view.side_row[pid]]
                from_side.append(pid)
            elif self._base_row(view, pid) >= 0:
                base_at.append(i)
                base_ids.append(pid)
            else:
                missing.append(pid)
        if missing:
            shown = ", ".join(repr(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise KeyError(f"{len(missing)} product id(s) not in the index: {shown}")
        if base_ids:
            out[base_at] = read_base(base_ids)
        return out, from_side

    @property
    def has_query_vectors(self) -> bool:
        return self.base.has_query_vectors

    @property
    def product_query(self) -> dict[str, Any] | None:
        return self.base.product_query

    def query_vector(self, product_ids: list[str] | np.ndarray) -> np.ndarray:
        """The current frozen query vectors [N, Dq] of `product_ids` (upserts included); KeyError names
        ids deleted or never indexed; NoProductQueries when the version has none (or an upsert was
        logged without one)."""
        if not self.base.has_query_vectors:
            raise no_product_queries(f"index version {self.version}", self.base.manifest)
        product_ids = list(product_ids)
        out, from_side = self._lookup(product_ids, "side_query", self.query_dim, self.base.query_vector)
        if from_side:
            upserted = set(from_side)
            unknown = [pid for pid, row in zip(product_ids, out) if pid in upserted and np.isnan(row).any()]
            if unknown:
                raise NoProductQueries(
                    f"product {unknown[0]!r} was upserted without a product query vector of this index version's "
                    "width (by a server older than product queries, or onto another index version); "
                    "upsert it again")
        return out

    @property
    def attributes(self) -> AttributeStore | None:
        """The version's filterable columns (upserts' are searched apart, see `search`)."""
        return self.base.attributes

    @property
    def filters(self) -> Any:
        return self.base.filters

    @property
    def tuning(self) -> Any:
        return self.base.tuning

    def search(self, queries: np.ndarray, k: int, *, filter: Any = None,
               exclude: Any = ()) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the version and the upserts, merged by score, among the products that pass
        `filter` and are not in `exclude` (the version's hidden rows, its filtered-out and excluded rows
        are one row mask inside its search; the upserts are searched exactly over their passing rows).

        queries [Q, D] -> (ids [Q, K], scores [Q, K]) like `ProductIndex.search`, padded with '' / -inf.
        """
        queries = self.base._check_matrix(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        return self._search(np.ascontiguousarray(queries, dtype=np.float32), int(k), filter, exclude)

    def search_one(self, query: np.ndarray, k: int, *, filter: Any = None,
                   exclude: Any = ()) -> tuple[list[str], list[float]]:
        """`search` of one query [D] as (ids, scores) lists without the padding (`ProductIndex.search_one`,
        the same caller's contract)."""
        view = self._view
        if view.side_row:
            ids, scores = self._search(query.reshape(1, -1), k, filter, exclude)
            keep = [i for i, p in enumerate(ids[0]) if p]
            return [ids[0][i] for i in keep], scores[0][keep].tolist()
        found_scores, rows = self.base.search_rows(query.reshape(1, -1), k, self._base_mask(view, filter, exclude))
        found = rows[0] >= 0
        return self.base.ids[rows[0][found]].tolist(), found_scores[0][found].tolist()

    def _base_mask(self, view: _View, filter: Any, exclude: Any) -> RowMask | None:
        """The version's rows a search may return: alive, passing `filter`, not in `exclude`."""
        mask = self.base.filters.mask(filter)  # FilterError before anything else
        if view.alive is not None:
            mask = view.alive if mask is None else mask.intersect(view.alive)
        rows = [r for r in (self.base.row(p) for p in exclude) if r >= 0] if exclude is not None else []
        if rows:
            mask = (mask or RowMask.all(len(self.base))).without(rows)
        return mask

    def _search(self, queries: np.ndarray, k: int, filter: Any, exclude: Any) -> tuple[np.ndarray, np.ndarray]:
        view = self._view
        scores, found = self.base.search_rows(queries, k, self._base_mask(view, filter, exclude))  # [Q, K]
        ids = np.full(found.shape, "", dtype=object)
        ids[found >= 0] = self.base.ids[found[found >= 0]]
        scores = np.where(found >= 0, scores, np.float32(-np.inf)).astype(np.float32)
        side = self._side_rows(view, filter, set(exclude) if exclude is not None else set())
        if len(side) == 0:
            return ids, scores
        side_scores = queries @ view.side_vectors[side].T  # [Q, M'] exact inner products
        take = min(k, len(side))
        top = np.argsort(-side_scores, axis=1, kind="stable")[:, :take]  # [Q, take]
        all_ids = np.concatenate([ids, view.side_ids[side][top]], axis=1)  # [Q, K + take]
        all_scores = np.concatenate([scores, np.take_along_axis(side_scores, top, axis=1)], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]  # [Q, K] best first
        return np.take_along_axis(all_ids, order, axis=1), np.take_along_axis(all_scores, order, axis=1)

    def _side_rows(self, view: _View, filter: Any, exclude: set[str]) -> np.ndarray:
        """The live upserted rows passing `filter`, less `exclude`'s (int [M'])."""
        if not view.side_row:
            return np.empty(0, dtype=np.int64)
        passing = view.side_alive.copy()
        if filter and view.side_attributes is not None:
            mask = compile_filter(view.side_attributes, filter)
            if mask is not None:
                passing &= mask
        for pid in exclude:
            row = view.side_row.get(pid)
            if row is not None:
                passing[row] = False
        return np.flatnonzero(passing)

    # -- applying updates --

    def apply(self, records: list[dict[str, Any]], model: str | None = None) -> None:
        """Apply logged updates in order (each with seq > `applied_seq`), publishing one new view."""
        if not records:
            return
        with self._lock:
            view = self._view
            side_row = dict(view.side_row)
            upserts = [r for r in records if r["op"] == UPSERT]
            if model is not None:
                other = {r.get("model") for r in upserts} - {model}
                if other:
                    raise ArtifactError(
                        f"the live log holds updates embedded by model {', '.join(map(str, sorted(other)))}, "
                        f"but this index serves model {model}; compact them into an index of that model, or "
                        "move the live log away (its updates are then lost)")
            count, applied, counts = self._count, self.applied_seq, [0, 0]  # committed at the end
            need = count + len(upserts)
            if need > len(self._buffer):  # grow: old views keep the old buffer
                grown = np.zeros((max(need, 2 * len(self._buffer)), self.dim), dtype=np.float32)
                grown[:count] = self._buffer[:count]
                self._buffer = grown
                grown_query = np.zeros((len(grown), self.query_dim), dtype=np.float32)
                grown_query[:count] = self._query_buffer[:count]
                self._query_buffer = grown_query
            ids, products = list(view.side_ids), list(view.side_products)
            alive = np.concatenate([view.side_alive, np.zeros(len(upserts), dtype=bool)])
            hidden: list[int] = []
            for record in records:
                seq, pid = int(record["seq"]), record["id"]
                if seq <= applied:
                    raise ValueError(f"update {seq} is not after the last applied update {applied}")
                row = self.base.row(pid)
                if row >= 0:
                    hidden.append(row)  # the version's vector is never returned again
                if pid in side_row:
                    alive[side_row.pop(pid)] = False
                if record["op"] == UPSERT:
                    vector = decode_vector(record["vector"], self.dim)
                    self._buffer[count] = vector / max(float(np.linalg.norm(vector)), 1e-12)  # past every view
                    if self.query_dim:
                        self._query_buffer[count] = _query_vector_or_nan(record, self.query_dim)
                    side_row[pid] = count
                    ids.append(pid)
                    products.append(record.get("product") or {})
                    alive[count] = True
                    count += 1
                    counts[0] += 1
                elif record["op"] == DELETE:
                    counts[1] += 1
                else:
                    raise ValueError(f"unknown update op {record['op']!r} in update {seq}")
                applied = seq
            kept = view.alive
            if hidden:
                kept = (kept or RowMask.all(len(self.base))).without(np.asarray(hidden))
            side_attributes = view.side_attributes
            if upserts and self.base.attributes is not None:
                side_attributes = AttributeStore.from_products(products, self.base.attributes.kinds, lenient=True)
            self._count, self.applied_seq = count, applied
            self.upserts += counts[0]
            self.deletes += counts[1]
            self._view = _View(kept, self._buffer[:count], np.asarray(ids, dtype=object), alive, side_row,
                               self._query_buffer[:count], tuple(products), side_attributes)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, Any]:
        """(ids [N], vectors [N, D], attributes: a table of N rows or None) of every live product: the
        version's visible rows, then the upserts."""
        view = self._view
        visible = view.alive.rows() if view.alive is not None else np.arange(len(self.base))
        base_ids = self.base.ids[visible]
        side_rows = np.fromiter(view.side_row.values(), dtype=np.int64, count=len(view.side_row))
        ids = np.concatenate([base_ids, view.side_ids[side_rows]]).astype(object)
        vectors = np.concatenate([self.base.vector(base_ids), view.side_vectors[side_rows]]).astype(np.float32)
        store = self.base.attributes
        attributes = None
        if store is not None:
            tables = [store.table(visible)]
            if view.side_attributes is not None and len(side_rows):
                tables.append(view.side_attributes.table(side_rows))
            attributes = concat_tables(tables, store.kinds)
        return ids, vectors, attributes

    def info(self) -> dict[str, Any]:
        view = self._view
        return {"applied_seq": self.applied_seq, "upserted": len(view.side_row), "hidden": view.hidden_count,
                "upserts_applied": self.upserts, "deletes_applied": self.deletes}


def replay(base: ProductIndex, live_log: LiveLog, model: str | None = None) -> LiveIndex:
    """The version `base` with every logged update after the ones folded into it."""
    live = LiveIndex(base)
    records, floor = live_log.read(after=live.applied_seq)
    if floor > live.applied_seq:
        raise ArtifactError(
            f"the live log was compacted through update {floor}, but index version {base.version} holds "
            f"updates only through {live.applied_seq}: serving it would lose updates. Serve the version the "
            f"compaction published (see {live_log.path}'s first line), or move the live log away.")
    live.apply(records, model)
    if records:
        log.info("replayed %d live updates onto index version %s (through update %d)",
                 len(records), base.version, live.applied_seq)
    return live


# ---- compaction (`itemsage index --compact`) -----------------------------------------------------------


def compact(
    index_root: str | Path, *, version: str | None = None, publish: bool = True
) -> tuple[ProductIndex, Path, int] | None:
    """Fold the live log into a new index version of CURRENT's kind and parameters; publish it.

    Returns (the new index, its directory, updates folded), or None when there is nothing to fold.
    The log keeps only updates that arrived during the build; a running server serves the new
    version after its next reload. With `publish=False` the log is left whole.
    """
    index_root = Path(index_root)
    base = load_current(index_root)
    live_log = LiveLog(index_root)
    live = replay(base, live_log, base.manifest.get("inputs", {}).get("model"))
    folded = live.upserts + live.deletes
    if not folded:
        return None
    ids, vectors, attributes = live.snapshot()
    if not len(ids):
        raise ArtifactError("the live updates delete every product of the index; an index needs at least one")
    if version and (version_path(index_root, version) / artifacts.MANIFEST).exists():
        raise ArtifactError(f"index version {version_path(index_root, version)} already exists; pass another "
                            "--version name")
    config = dataclasses.asdict(base.config)
    query_vectors = live.query_vector(ids) if live.has_query_vectors else None  # [N, Dq], carried along
    new = ProductIndex.build(ids, vectors, **config, query_vectors=query_vectors,
                             product_query=base.product_query, attributes=attributes)
    inputs = {"base_version": base.version or "", "live_log": f"through update {live.applied_seq}"}
    if base.manifest.get("inputs", {}).get("model"):
        inputs["model"] = base.manifest["inputs"]["model"]
    # A generated name is claimed (unique) just before the save; a failed save gives it back.
    version_dir = version_path(index_root, version) if version else claim_new_version(index_root)
    try:
        new.save(version_dir, inputs=inputs, extra={"live_seq": live.applied_seq})
    except BaseException:
        if not version:
            release_claim(version_dir)
        raise
    if publish:
        publish_version(index_root, version_dir)
        live_log.drop_through(live.applied_seq, version_dir.name)
    log.info("compacted %d live updates into index version %s (%d products)", folded, version_dir.name, len(new))
    return new, version_dir, folded
