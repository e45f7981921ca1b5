"""The service's product writes: a product's embedding by the served tower (/v1/embed) and the live
updates (/admin/products, /admin/products/delete; index/live.py), logged durably before the reply.

`ProductUpdates` is a part of `Service` (its base class): it reads the service's model, served
index and live log. A request's products go through ingest's own row checks and normalisation
(`data.ingest.check_products`), as `itemsage embed` and `itemsage.load(...).encode_products` do, so
a bad product gets ingest's reason and message everywhere.

Several servers on one index root: the live log has one writer, the first server started with a
token (`Service(live_writer=True)`, index/live_log.py's WRITER lock). Every other server follows
the log read-only: before a request reads the served index, it replays the lines the writer
appended since it last looked (a stat of the log when nothing changed), so it serves the writer's
updates from its next request on. Updates sent to a follower are refused (409, naming the writer);
when the writer has stopped, a follower with a token takes the log over on its next update.
`/readyz` says which this server is (`live_log.role`). Why followers, not a refusal to start: a
second process on the same index (more workers, a rolling restart, a read-only replica) is normal,
and each must serve the same products.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from itemsage.artifacts import ArtifactError
from itemsage.index import live as live_lib
from itemsage.index.attributes import products_table
from itemsage.index.live_log import delete_record, describe, upsert_record
from itemsage.schema import IMAGE_EMBEDDINGS, PRODUCT_ID
from itemsage.serve.bodies import (  # noqa: F401  (MAX_HISTORY: serve.MAX_HISTORY, as before)
    MAX_HISTORY,
    UNREADABLE,
    Candidates,
    CloseupRequest,
    Cluster,
    DeleteRequest,
    EmbedRequest,
    EmbedResponse,
    HomeRequest,
    HomeResponse,
    ProductIn,
    ReloadRequest,
    ReloadResponse,
    RequestError,
    SearchRequest,
    UpdateResponse,
    UpsertRequest,
    _printable,
    _validation_message,
    error_response,
)
from itemsage.serve.middleware import (  # noqa: F401
    DEFAULT_BODY_DEADLINE_S,
    DEFAULT_BODY_TIMEOUT_S,
    LATENCY_BUCKETS,
    BodyLimitMiddleware,
    FastPathMiddleware,
    InternalErrorMiddleware,
    Metrics,
    MetricsMiddleware,
)

log = logging.getLogger(__name__)


def _norms(x: np.ndarray) -> np.ndarray:
    """L2 norms [N] of rows [N, D], scaled by each row's largest |value| first: exact in float64 for
    any finite float32 values (a plain float32 norm overflows from about 1e19 and underflows below 1e-19)."""
    x = np.asarray(x, dtype=np.float64)
    peak = np.abs(x).max(axis=1)  # [N]
    safe = np.where(peak > 0, peak, 1.0)
    return np.linalg.norm(x / safe[:, None], axis=1) * peak


class ProductUpdates:
    """/v1/embed, upserts and deletes, following the live log; a base class of `Service` (serve/service.py)."""

    # -- the served index, and the live log's writer or follower (the module doc) --

    @property
    def served(self) -> Any:
        """What a request reads (index and version); a follower first replays the log's new lines."""
        if self.live_log is not None and not self.live_log.is_writer and self._follow_stopped is None:
            self._follow()
        return self._served

    @served.setter
    def served(self, value: Any) -> None:
        self._served = value

    def _follow_reset(self) -> None:
        self._log_position: tuple[int, int] | None = None  # how far a follower has read the log
        self._log_stamp: tuple[int, int, int] | None = None  # the log file's stamp at that read
        self._follow_stopped: str | None = None  # why a follower stopped replaying (until a reload)

    def claim_live_log(self) -> bool:
        """Become the live log's writer, unless another process is; True when this server is."""
        try:
            if self.live_log.claim():
                log.info("this server writes the live log %s", self.live_log.path)
                return True
        except OSError as err:
            log.warning("cannot claim the live log of %s (%s): this server follows it", self.index_root, err)
            return False
        log.warning("another server (%s) writes the live log %s: this server follows it read-only and "
                    "refuses updates (409) while that one runs", describe(self.live_log.writer()),
                    self.live_log.path)
        return False

    def _follow(self) -> None:
        """Replay onto the served index what the writer appended to the log since the last look."""
        stamp = self.live_log.stamp()
        if stamp == self._log_stamp:
            return
        with self._live_lock:
            index = self._served.index
            if stamp == self._log_stamp or self._follow_stopped or not isinstance(index, live_lib.LiveIndex):
                return
            try:
                records, floor, position = self.live_log.read_new(self._log_position)
                if floor > index.applied_seq:
                    raise ArtifactError(f"the live log was compacted through update {floor}, but this server had "
                                        f"applied updates only through {index.applied_seq}; POST /admin/reload "
                                        "serves the compacted version")
                index.apply([r for r in records if int(r["seq"]) > index.applied_seq], self.model.fingerprint)
            except (ArtifactError, ValueError, KeyError) as err:
                self._follow_stopped = str(err)
                log.error("stopped following the live log %s: %s", self.live_log.path, err)
                return
            self._log_position, self._log_stamp = position, stamp

    def live_log_info(self) -> dict[str, Any] | None:
        """/readyz's `live_log`: this server's role, the log, its writer (None for Milvus)."""
        if self.live_log is None:
            return None
        return {"role": "writer" if self.live_log.is_writer else "follower", "path": str(self.live_log.path),
                "writer": self.live_log.writer(), "following_stopped": self._follow_stopped}

    def close(self) -> None:
        """Give up the live log's writer lock (the app's shutdown): another server may take it over."""
        if self.live_log is not None:
            self.live_log.close()

    def embed(self, req: EmbedRequest) -> EmbedResponse:
        vectors, unreadable = self._embed_products([req.product], ["product"])
        return EmbedResponse(product_id=req.product.product_id, vector=vectors[0].tolist(), dim=vectors.shape[1],
                             model_fingerprint=self.model.fingerprint, unreadable=bool(unreadable[0]),
                             warning=UNREADABLE if unreadable[0] else None)

    def _embed_products(self, products: list[ProductIn], names: list[str], *,
                        warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Products -> (their embeddings [N, D] by the served tower, [N] bool: the model reads nothing of
        the product, logged as a warning when `warn`); `names` label each in errors."""
        cfg = self.model.config
        columns: dict[str, list] = {IMAGE_EMBEDDINGS: []}
        records: list[dict[str, Any]] = []
        attributes = self._attribute_kinds()
        for product, name in zip(products, names):
            extra = product.__pydantic_extra__ or {}
            unknown = sorted(set(extra) - set(cfg.text_fields) - set(attributes))
            if unknown:
                listed = f"; the index's filterable columns: {', '.join(sorted(attributes))}" if attributes else ""
                raise RequestError(422, f"unknown {name} field(s) {', '.join(unknown)}; this model reads "
                                   f"{', '.join(cfg.text_fields)} and {IMAGE_EMBEDDINGS}{listed}")
            for field in sorted(set(extra) & set(cfg.text_fields)):
                value = extra[field]
                if value is not None and not isinstance(value, str) and not (
                        isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    raise RequestError(422, f"{name}.{field} is a text field of the model: give a string or a list "
                                       "of strings")
            images = product.image_embeddings or []
            if len(images) > cfg.max_images:
                raise RequestError(422, f"{len(images)} image embeddings given in {name}; this model reads at "
                                   f"most {cfg.max_images} (main image first)")
            if images and not self.model.image_dim:
                raise RequestError(422, "this model was trained without image vectors; leave out image_embeddings")
            if images:
                image_rows = self._as_matrix(images, int(self.model.image_dim), f"{name}.image_embeddings")
                images = image_rows.tolist()  # as sent: the tower is not scale-invariant in its image inputs
            record = {field: (extra[field] if field in extra else getattr(product, field, None))
                      for field in cfg.text_fields}
            columns[IMAGE_EMBEDDINGS].append(images)
            records.append({PRODUCT_ID: f"#{len(records)}", **record, IMAGE_EMBEDDINGS: images})  # ids: placeholders
        table = self._checked_products(records, names)
        vectors = self.model.embed_table(table)  # [N, D]
        unreadable = self.model.unreadable(table)  # [N]
        if warn and unreadable.any():
            log.warning("%s: %s", ", ".join(names[i] for i in np.flatnonzero(unreadable)[:5]), UNREADABLE)
        bad = ~np.all(np.isfinite(vectors), axis=1) | (np.abs(_norms(np.nan_to_num(vectors)) - 1.0) > 1e-3)  # [N]
        for i in np.flatnonzero(bad):
            images = columns[IMAGE_EMBEDDINGS][i]
            if not images:  # text alone cannot overflow the tower: a bug, not a bad request
                raise RuntimeError(f"the embedding of a text-only product is not a finite unit vector: {vectors[i, :4]}")
            largest = max(abs(v) for row in images for v in row)
            raise RequestError(422, f"the embedding of {names[i]} is not finite: its image_embeddings (largest "
                               f"|value| {largest:.3g}) are too large for this model; send the vectors of the "
                               "catalog's image encoder, on the scale the model was trained on")
        return vectors, unreadable

    def _checked_products(self, records: list[dict[str, Any]], names: list[str]) -> pa.Table:
        """Request products -> the dataset format through ingest's own row checks and normalisation
        (`ingest.check_products`, as `itemsage embed` and `itemsage.load(...).encode_products` do)."""
        from itemsage.data.ingest import DataError, check_products

        cfg = self.model.config
        try:
            checked = list(check_products(records, text_fields=cfg.text_fields, image_dim=self.model.image_dim or None,
                                          max_images=cfg.max_images))
        except DataError as err:
            raise RequestError(422, str(err)) from err
        for _, rejects in checked:
            for entry in rejects:
                raise RequestError(422, f"{names[entry['row']]} was rejected ({entry['reason']}): {entry['detail']}")
        return pa.concat_tables([table for table, _ in checked])

    # -- live updates (index/live.py) --

    def upsert(self, req: UpsertRequest) -> UpdateResponse:
        """Embed the products, log them durably, and serve them from the next request on."""
        ids = [p.product_id for p in req.products]
        for i, pid in enumerate(ids):
            if not pid:
                raise RequestError(422, f"products[{i}] has no product_id; an upsert needs the id to add or replace")
        repeated = sorted({p for p in ids if ids.count(p) > 1}) if len(set(ids)) < len(ids) else []
        if repeated:
            raise RequestError(422, f"product id(s) {', '.join(map(repr, repeated[:5]))} appear more than once in "
                               "this request; send each product once")
        vectors, unreadable = self._embed_products(req.products, [f"products[{i}]" for i in range(len(ids))])
        products = [p.model_dump(exclude_none=True) for p in req.products]
        try:  # the filterable values must fit the version's columns (they are logged as sent)
            products_table(products, self._attribute_kinds())
        except ValueError as err:
            raise RequestError(422, str(err)) from None
        queries = self._product_query_vectors(products)  # [N, Dq] or None
        updates = [upsert_record(pid, v, self.model.fingerprint, p, None if queries is None else queries[i])
                   for i, (pid, v, p) in enumerate(zip(ids, vectors, products))]
        response = self._apply_updates(updates, ids, [])
        response.unreadable = [ids[i] for i in np.flatnonzero(unreadable)]
        return response

    def _attribute_kinds(self) -> dict[str, str]:
        """{column: kind} of the served version's filterable attributes (none: {})."""
        store = getattr(self.served.index, "attributes", None)
        return dict(store.kinds) if store is not None else {}

    def _product_query_vectors(self, products: list[dict[str, Any]]) -> np.ndarray | None:
        """The upserted products' frozen query vectors [N, Dq], as ingest computes them
        (product_query.product_query_vectors), when the served index keeps them; else None."""
        from itemsage.data import product_query

        index = self.served.index
        entry = getattr(index, "product_query", None)
        if not getattr(index, "has_query_vectors", False) or not entry:
            return None
        source = entry.get("source")
        if source not in product_query.SOURCES:  # e.g. ProductIndex.build(query_vectors=...) without product_query
            raise RequestError(409, f"index version {self.served.version} holds product query vectors with no recorded "
                               f"source (its manifest's product_query: {entry}), so an upserted product's cannot be "
                               "computed; rebuild the index with `itemsage index` from embeddings of an ingested "
                               "dataset, or give ProductIndex.build a product_query")
        encoder = self.text_encoder() if source == "text" else None
        try:
            queries = product_query.product_query_vectors(products, source, text_encoder=encoder)
        except ValueError as err:
            raise RequestError(422, str(err)) from err
        if queries.shape[1] != index.query_dim:
            raise RequestError(422, f"the products' query vectors are {queries.shape[1]}-d, the index's "
                               f"{index.query_dim}-d; send image_embeddings of the catalog's width")
        return queries

    def delete(self, req: DeleteRequest) -> UpdateResponse:
        """Log the deletes durably; the products are never returned again."""
        ids = list(dict.fromkeys(req.ids))
        with self._live_lock:
            index = self.served.index
            known = [p for p in ids if p in index]
            unknown = [p for p in ids if p not in index]
            return self._apply_updates([delete_record(p) for p in known], known, unknown, locked=True)

    def _apply_updates(self, updates: list[dict], ids: list[str], unknown: list[str], *,
                       locked: bool = False) -> UpdateResponse:
        with contextlib.nullcontext() if locked else self._live_lock:
            served = self.served
            index: live_lib.LiveIndex = served.index  # type: ignore[assignment]
            if self.live_log is None:
                raise RequestError(409, "live updates need a local index root (itemsage serve --index); with "
                                   "--backend milvus, write the products to Milvus and reload")
            if not self.live_log.is_writer:  # a follower: take the log over only if its writer has stopped
                if self._follow_stopped is not None:
                    raise RequestError(409, f"this server stopped following the live log ({self._follow_stopped}); "
                                       "reload it before it takes updates")
                try:
                    claimed = self.live_log.claim()
                except OSError as err:
                    raise RequestError(503, f"the live log could not be opened ({err}); nothing was changed") from None
                if not claimed:
                    raise RequestError(409, f"this server follows the live log {self.live_log.path} read-only: the "
                                       f"server process {describe(self.live_log.writer())} writes it (one writer "
                                       "per index root). Send updates to that server; this one serves them from "
                                       "its next request on, and takes the log over if that server stops.")
                self._follow()  # lines the previous writer appended, before this server's own
                served = self._served
                index = served.index
            try:
                records = self.live_log.append(updates, floor=index.applied_seq)  # fsynced
            except ArtifactError as err:
                raise RequestError(409, str(err)) from None
            except OSError as err:
                raise RequestError(503, f"the live log could not be written ({err}); nothing was changed") from None
            index.apply(records)
            return UpdateResponse(ids=ids, unknown=unknown, seq=index.applied_seq, index_version=served.version,
                                  products=len(index))
