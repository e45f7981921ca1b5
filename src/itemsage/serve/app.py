"""The candidate-generation service: FastAPI over one model and one index version (docs/ARCHITECTURE.md).

    POST /v1/search   {text | vector, k}                       text -> query encoder -> adapter -> top-k
    POST /v1/closeup  {product_id | vector | image, k, exclude}  a product, an image vector or file -> top-k
    POST /v1/home     {history | vectors, k, max_clusters, times} PinnerSage clusters -> merged top-k
    POST /v1/embed    {product: {text fields, image_embeddings}} one product -> its embedding
    GET  /healthz, /readyz, /metrics (Prometheus text);  POST /admin/reload (Bearer token)
    POST /admin/products {products: [...]}  upsert: embed with the served model, searchable on reply
    POST /admin/products/delete {ids}       delete: never returned again (both Bearer token; live.py)

Every retrieval response carries `ids` and `scores` (inner products of unit vectors, higher = more
similar, best first) and the `index_version` that answered. Query vectors pass through the model's
query adapter of their surface. A catalog product as a query (closeup by `product_id`, home by
`history`) is its frozen query vector, kept in the index, through the closeup or home adapter, as in
training (by_product.py, which `itemsage evaluate` scores with the same code); closeup's
`product_to_product` option searches with the product's learned embedding instead.

Bad requests get a 4xx with a message, never a 5xx: bodies are strict pydantic models that refuse
unknown fields, NaN/inf, booleans or strings as numbers, and strings that are not valid UTF-8 (a
lone surrogate); widths and ids are checked against the model and the index, and the validation
handler never echoes the offending input (echoing a NaN back is itself a 500 in FastAPI's default).
Query vectors are scaled to unit length in float64 before the adapter (which is scale-invariant), so
values up to float32's limit search by their direction; an embedding that still comes out non-finite
is refused with a 422. An uploaded image larger than `max_image_pixels` is refused from its header
(413) before it is decoded. A body that stops arriving gets a 408 after `body_timeout_s` of silence
(or `body_deadline_s` in all) and the connection is closed; idle keep-alive connections close after
`keep_alive_s` (uvicorn's setting). A real bug is a 500 that keeps the connection open.

Hot reload loads and verifies a whole index version before swapping one reference; a request reads
that reference once, so requests in flight finish on the old index and none fails.

Inference (torch, faiss) blocks, so the endpoints are plain `def`s that FastAPI runs in its thread
pool, except the sub-millisecond cases of search and closeup, which run on the event loop (see
`create_app`) and, as `application/json`, are answered before FastAPI's routing (`_answer_now`,
middleware.FastPathMiddleware: same validation, same bytes); `run()` sets torch and faiss to one
thread each because requests are single queries and parallelism comes from concurrent requests.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hmac
import io
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from itemsage.artifacts import ArtifactError
from itemsage.config import ConfigError, require
from itemsage.index import by_product
from itemsage.index import live as live_lib
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.query_vectors import NoProductQueries
from itemsage.index.versions import LocalVersions, VersionNotFound, point_current
from itemsage.schema import IMAGE_EMBEDDINGS, PRODUCT_ID
from itemsage.serve.bodies import (  # noqa: F401  (MAX_HISTORY: serve.MAX_HISTORY, as before)
    MAX_HISTORY,
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
from itemsage.index.live_log import LiveLog, delete_record, upsert_record

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a home request of 1000 x 256 floats as JSON is ~5 MB
DEFAULT_MAX_K = 1000
DEFAULT_KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this
DEFAULT_QUERY_CACHE = 10_000  # recent search texts whose query vectors are kept
DEFAULT_QUERY_BATCH = 8  # concurrent search texts encoded together (1: one at a time; BENCHMARKS.md)
QUERY_ENCODERS = ("onnx", "onnx-int8", "torch")
# Exact inner products one query may scan on the event loop (rows x dim): 5,000 x 256 takes about
# 0.7 ms on one core of the development machine; a larger scan goes to the thread pool.
FAST_EXACT_VALUES = 1_500_000


def _norms(x: np.ndarray) -> np.ndarray:
    """L2 norms [N] of rows [N, D], scaled by each row's largest |value| first: exact in float64 for
    any finite float32 values (a plain float32 norm overflows from about 1e19 and underflows below 1e-19)."""
    x = np.asarray(x, dtype=np.float64)
    peak = np.abs(x).max(axis=1)  # [N]
    safe = np.where(peak > 0, peak, 1.0)
    return np.linalg.norm(x / safe[:, None], axis=1) * peak


def _fast_search(index: Any) -> bool:
    """Whether one search of `index` is cheap enough for the event loop: an in-memory HNSW graph or
    an exact scan of at most FAST_EXACT_VALUES values, plus a live index's exact scan of its upserts.
    IVF-PQ is not (its re-ranking reads the memory-mapped full vectors: disk), nor is any other backend."""
    base = getattr(index, "base", index)  # a live.LiveIndex: its version
    kind = getattr(getattr(base, "config", None), "kind", None)
    if kind not in ("hnsw", "flat"):
        return False
    exact_rows = getattr(index, "side_rows", 0) + (len(base) if kind == "flat" else 0)
    return exact_rows * int(base.dim) <= FAST_EXACT_VALUES


def _plain_adapters(adapters: torch.nn.Module) -> dict[str, np.ndarray | None]:
    """The surfaces whose adapter is an identity or a bias-free Linear (then L2 normalisation, as
    `tower.QueryAdapters`) -> the map as a float32 matrix [Dq, D] (None: identity). Other adapters
    are left out and run through torch."""
    maps: dict[str, np.ndarray | None] = {}
    for surface, module in getattr(adapters, "maps", {}).items():
        if isinstance(module, torch.nn.Identity):
            maps[surface] = None
        elif type(module) is torch.nn.Linear and module.bias is None:
            maps[surface] = np.ascontiguousarray(module.weight.detach().float().numpy().T)  # [Dq, D]
    return maps


# ---- the service: model, served index, encoders ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Served:
    """What one request reads once: the index and its version, swapped together by reload."""

    index: Any  # ProductIndex, or index_milvus.MilvusIndex (the same search interface)
    version: str


class Service:
    """Everything the endpoints compute, independent of HTTP. Errors are `RequestError`s."""

    def __init__(
        self,
        model_dir: str | Path,
        index_root: str | Path | Any,
        *,
        max_k: int = DEFAULT_MAX_K,
        text_encoder: Any = None,
        image_encoder: Any = None,
        max_image_pixels: int | None = None,
        query_encoder: str = "onnx",
        query_cache: int = DEFAULT_QUERY_CACHE,
        query_batch: int = DEFAULT_QUERY_BATCH,
    ) -> None:
        """`index_root`: a local index root, or a versions object with `resolve(version)` and `load(target)`
        (LocalVersions, index_milvus.MilvusVersions): the index backend seam."""
        from itemsage.encoders.image import DEFAULT_MAX_PIXELS
        from itemsage.encoders.text import QueryVectorCache
        from itemsage.model.model import load_model

        require(max_k >= 1, f"max_k must be >= 1, got {max_k}")
        require(query_encoder in QUERY_ENCODERS,
                f"query_encoder must be one of {', '.join(QUERY_ENCODERS)}, got '{query_encoder}'")
        require(query_batch >= 1, f"query_batch must be >= 1 (1: no batching), got {query_batch}")
        self.query_encoder = query_encoder
        self.query_batch = query_batch
        self.query_cache = QueryVectorCache(query_cache)  # text -> product-space query vector
        self._live_lock = threading.Lock()  # orders updates against the reload swap
        self.max_k = max_k
        self.max_image_pixels = int(max_image_pixels or DEFAULT_MAX_PIXELS)
        require(self.max_image_pixels >= 1, f"max_image_pixels must be >= 1, got {max_image_pixels}")
        self.versions = (index_root if hasattr(index_root, "resolve") and hasattr(index_root, "load")
                         else LocalVersions(index_root))
        self.index_root = getattr(self.versions, "root", None)  # a local index root; None for Milvus
        # Live updates log beside a local index root; a Milvus collection is updated in Milvus itself.
        self.live_log = LiveLog(self.index_root) if self.index_root is not None else None
        self.model = load_model(model_dir)
        self.model.model.eval()  # model.ItemSageModel: tower, adapters, logit scale
        self.out_dim = int(self.model.config.out_dim)
        # The adapters as numpy matrices: a one-row torch call costs ~100 us of dispatch, numpy a few.
        self._adapter_maps = _plain_adapters(self.model.model.adapters)
        self.served = self._with_live(self._check_index(self.versions.load(self.versions.resolve(None))))
        self._text_encoder = text_encoder
        self._image_encoder = image_encoder
        self._encoder_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        log.info("serving model %s with index version %s (%d products)",
                 self.model.fingerprint, self.served.version, len(self.served.index))

    # -- index versions --

    def _check_index(self, index: ProductIndex) -> Served:
        """Refuse an index of another width, or one built from another model's embeddings."""
        if index.dim != self.out_dim:
            raise ArtifactError(f"index version {index.version} holds {index.dim}-d vectors but the model "
                                f"embeds into {self.out_dim}-d; index embeddings of this model")
        built_from = index.manifest.get("inputs", {}).get("model")
        if built_from and built_from != self.model.fingerprint:
            raise ArtifactError(f"index version {index.version} was built from embeddings of model "
                                f"{built_from}, but the server runs model {self.model.fingerprint}; "
                                "re-embed the catalog with this model and index it")
        return Served(index, str(index.version))

    def _with_live(self, served: Served) -> Served:
        """The version with the live log's later updates replayed onto it (as it is without a log)."""
        if self.live_log is None:
            return served
        index = live_lib.replay(served.index, self.live_log, self.model.fingerprint)  # type: ignore[arg-type]
        return Served(index, served.version)  # type: ignore[arg-type]

    def reload(self, version: str | None, persist: bool = True) -> ReloadResponse:
        """Load (and verify) a version fully, then swap one reference. Old requests keep the old one.

        `persist`: also point CURRENT at the version (an atomic replace), so a restart serves it too.
        """
        with self._reload_lock:  # one reload at a time; requests never wait on this lock
            start = time.perf_counter()
            try:
                target = self.versions.resolve(version)  # a version directory, or a Milvus collection
            except ValueError as err:
                raise RequestError(422, str(err)) from None
            except VersionNotFound as err:  # no CURRENT pointer (alias), or no such version
                raise RequestError(404, str(err)) from None
            name = getattr(target, "name", target)
            try:
                new = self._check_index(self.versions.load(target))
                with self._live_lock:  # no update lands between the log's replay and the swap
                    new = self._with_live(new)
                    if persist and version and self.index_root is not None:
                        try:
                            point_current(self.index_root, name)
                        except OSError as err:
                            raise RequestError(409, f"index version '{name}' was not swapped in: "
                                               f"CURRENT could not be written ({err}); fix the index root's "
                                               'permissions or reload with "persist": false') from None
                    previous = self.served
                    self.served = new  # the swap: one reference assignment
            except (ArtifactError, ConfigError, OSError, RuntimeError, ValueError, KeyError) as err:
                # faiss raises RuntimeError on unreadable files; the manifest check usually comes first.
                raise RequestError(409, f"index version '{name}' was refused and the "
                                   f"previous version ({self.served.version}) keeps serving: {err}") from None
            seconds = time.perf_counter() - start
            log.info("reloaded index: %s -> %s in %.2f s", previous.version, new.version, seconds)
            return ReloadResponse(index_version=new.version, previous_version=previous.version,
                                  products=len(new.index), seconds=round(seconds, 3))

    # -- query helpers --

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise RequestError(422, f"k must be between 1 and {self.max_k}, got {k}")

    def _query_width(self, surface: str) -> int:
        dims = self.model.query_dims
        if surface not in dims:
            raise RequestError(400, f"this model has no {surface} query adapter (it was trained on "
                               f"{', '.join(sorted(dims)) or 'no'} queries); use another endpoint or "
                               "retrain with this surface's engagement logs")
        return int(dims[surface])

    def _as_matrix(self, rows: list[list[float]], width: int, what: str) -> np.ndarray:
        """JSON rows -> float32 [N, width], refusing wrong widths, overflow to inf, and zero rows.

        The rows come back as sent (float32); `_query_rows` scales query rows for the adapters.
        """
        return self._checked_rows(rows, width, what)[0]

    def _checked_rows(self, rows: list[list[float]], width: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """`_as_matrix`'s rows [N, width] float32 and their norms [N] (float64)."""
        for i, row in enumerate(rows):
            if len(row) != width:
                where = f"{what}[{i}]" if len(rows) > 1 else what
                raise RequestError(422, f"{where} has {len(row)} values; this model expects {width}")
        x = np.asarray(rows, dtype=np.float64)
        with np.errstate(over="ignore"):
            x32 = x.astype(np.float32)
        if not np.all(np.isfinite(x32)):
            raise RequestError(422, f"{what} holds values outside the float32 range; send finite values")
        norms = _norms(x32)  # [N]; float32 underflow counts as zero
        if np.any(norms < 1e-12):
            raise RequestError(422, f"{what} is all zeros (or nearly); a zero vector has no direction to search by")
        return x32, norms

    def _query_rows(self, rows: list[list[float]], width: int, what: str) -> np.ndarray:
        """Query rows -> unit rows float32 [N, width], the norm taken in float64.

        The query adapters are bias-free linear maps followed by L2 normalisation, so scaling a row
        changes nothing but keeps float32 from overflowing (values near 1e19 square past its range).
        """
        x, norms = self._checked_rows(rows, width, what)
        return (x / norms[:, None]).astype(np.float32)

    def _adapt(self, surface: str, x: np.ndarray) -> np.ndarray:
        """Query vectors [B, Dq] -> product space [B, D] unit rows via the surface's adapter."""
        if surface in self._adapter_maps and x.shape[-1] == self.model.query_dims[surface]:
            weight = self._adapter_maps[surface]  # [Dq, D], None: identity
            with np.errstate(over="ignore", invalid="ignore"):
                q = np.asarray(x, dtype=np.float32) if weight is None else np.asarray(x, dtype=np.float32) @ weight
                q = q / np.maximum(by_product.row_norms(q), np.float32(1e-12))  # as fn.normalize
        else:
            with torch.inference_mode():
                q = self.model.model.encode_queries(surface, torch.from_numpy(x)).float().numpy()  # [B, D]
        if not np.isfinite(q).all():
            raise RequestError(422, f"the {surface} query vector is too large to normalise; scale it down")
        return q

    def _product_vectors(self, served: Served, product_ids: list[str]) -> np.ndarray:
        try:  # one lookup: a live delete between a membership check and the read cannot slip in
            return served.index.vector(product_ids).astype(np.float32)  # [N, D]
        except KeyError:
            missing = [p for p in dict.fromkeys(product_ids) if p not in served.index]
            shown = ", ".join(repr(p) for p in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise RequestError(404, f"unknown product id(s) {shown or 'deleted meanwhile'}: not in index "
                               f"version {served.version}") from None

    def _top_k(self, served: Served, q: np.ndarray, k: int, exclude: set[str] = frozenset()) -> Candidates:
        """Top-k of one query [1, D] from the served index, leaving out `exclude` and padding (the same
        search as evaluation's, by_product.top_k_excluding)."""
        (ids, scores), = by_product.top_k_excluding(served.index, q, [k], [exclude])[0]
        return Candidates(ids=ids, scores=scores, index_version=served.version)

    def text_encoder(self) -> Any:
        from itemsage.encoders.text import BatchingEncoder

        with self._encoder_lock:  # created once, on first use (loading MiniLM takes seconds)
            if self._text_encoder is None:
                from itemsage.encoders.text import (
                    OnnxTextQueryEncoder,
                    TextQueryEncoder,
                )

                self._text_encoder = (TextQueryEncoder() if self.query_encoder == "torch" else
                                      OnnxTextQueryEncoder(quantize=self.query_encoder == "onnx-int8"))
            if self.query_batch > 1 and not isinstance(self._text_encoder, BatchingEncoder):
                self._text_encoder = BatchingEncoder(self._text_encoder, self.query_batch)  # concurrent searches
            return self._text_encoder

    def warm_up(self) -> None:
        """Load the text encoder now (seconds) instead of on the first search request."""
        from itemsage.encoders.text import TextQueryEncoder

        if self._text_encoder is not None or self.model.query_dims.get("search") == TextQueryEncoder.dim:
            self.text_encoder().encode(["warm up"])
        self._embed_products([ProductIn(product_id="warm-up", title="warm up")], ["warm-up"])  # first tower run

    def _image_encoder_dim(self) -> int:
        if self._image_encoder is not None:
            return int(self._image_encoder.dim)
        from itemsage.encoders.image import ImageEncoder

        return int(ImageEncoder.dim)

    def image_encoder(self) -> Any:
        with self._encoder_lock:
            if self._image_encoder is None:
                from itemsage.encoders.image import ImageEncoder

                self._image_encoder = ImageEncoder(max_pixels=self.max_image_pixels)
            return self._image_encoder

    # -- endpoints --

    def search(self, req: SearchRequest, *, encode: bool = True) -> Candidates | None:
        """`encode=False`: None instead of running the text encoder for a text not in the query cache."""
        self._check_k(req.k)
        served = self.served
        width = self._query_width("search")
        if req.text is not None:
            if not req.text.strip():
                raise RequestError(422, "text is blank; send the words of the search query")
            # A hit skips the encoder (and its lock): the adapter is fixed for the server's life, and
            # only vectors that passed the width check below are cached.
            q = self.query_cache.get(req.text)  # [D]
            if q is None and not encode:
                return None  # evicted since the caller looked: the caller encodes it elsewhere
            if q is None:
                encoder = self.text_encoder()
                if int(encoder.dim) != width:
                    raise RequestError(400, f"this model's search adapter takes {width}-d vectors, but the text "
                                       f"encoder gives {encoder.dim}-d; send `vector` of width {width} instead")
                x = np.asarray(encoder.encode([req.text]), dtype=np.float32)  # [1, 384]
                q = self._adapt("search", x)[0]
                self.query_cache.put(req.text, q)
            return self._top_k(served, q[None, :], req.k)
        x = self._query_rows([req.vector], width, "vector")
        return self._top_k(served, self._adapt("search", x), req.k)

    def closeup(self, req: CloseupRequest) -> Candidates:
        self._check_k(req.k)
        served = self.served
        exclude = set(req.exclude or ())
        if req.product_id is not None and req.product_to_product:
            q = self._product_vectors(served, [req.product_id])  # its learned embedding, already in product space
            return self._top_k(served, q, req.k, exclude | ({req.product_id} if req.exclude_self else set()))
        if req.product_id is not None:  # its frozen query vector through the closeup adapter (by_product.py)
            self._query_width("closeup")
            with self._by_product_errors(served, "closeup", [req.product_id]):
                (((ids, scores),),) = by_product.closeup_by_product(
                    served.index, self._adapt, [req.product_id], [req.k], exclude_self=req.exclude_self,
                    exclude=[exclude])
            return Candidates(ids=ids, scores=scores, index_version=served.version)
        width = self._query_width("closeup")
        if req.vector is not None:
            x = self._query_rows([req.vector], width, "vector")
        else:
            x = self._encode_image(req.image or "", width)
        return self._top_k(served, self._adapt("closeup", x), req.k, exclude)

    @contextlib.contextmanager
    def _by_product_errors(self, served: Served, surface: str, ids: list[str]) -> Any:
        """A product query's lookups as 4xx: an unknown id 404, an index without frozen query vectors (or
        of another width than the model's adapter) 409."""
        width = int(self.model.query_dims.get(surface, 0))
        have = int(getattr(served.index, "query_dim", 0) or 0) if getattr(served.index, "has_query_vectors", False) else 0
        if surface and have and have != width:
            self._product_vectors(served, ids)  # an unknown id is the more specific error (404)
            raise RequestError(409, f"index version {served.version} holds {have}-d product query vectors, but this "
                               f"model's {surface} adapter takes {width}-d; index a dataset whose product queries "
                               "(ingest --product-query) match the model's training logs")
        try:
            yield
        except NoProductQueries as err:
            self._product_vectors(served, ids)  # an unknown id is the more specific error (404)
            raise RequestError(409, f"{err}. Until then, closeup by product_id can search with the product's "
                               'learned embedding ("product_to_product": true), and home can take `vectors`') from None
        except KeyError as err:
            raise RequestError(404, f"unknown product id(s): {err.args[0] if err.args else err} (index version "
                               f"{served.version})") from None

    def _encode_image(self, b64: str, width: int) -> np.ndarray:
        encoder_dim = self._image_encoder_dim()
        if encoder_dim != width:
            raise RequestError(400, f"the built-in image encoder gives {encoder_dim}-d vectors but this model's "
                               f"closeup queries are {width}-d (the catalog's image width); encode the image "
                               f"with the catalog's encoder and send `vector` instead")
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "image is not valid base64; send the file's bytes base64-encoded") from None
        if not data:
            raise RequestError(422, "image is empty; send the file's bytes base64-encoded")
        self._check_pixels(data)
        with tempfile.TemporaryDirectory(prefix="itemsage-image-") as tmp:
            path = Path(tmp) / "query"
            path.write_bytes(data)
            vectors, errors = self.image_encoder().encode_paths([str(path)], progress=False)
        if errors and errors[0]:  # the message names our temp file; the user knows it as "the image"
            raise RequestError(422, errors[0].replace(repr(str(path)), "the uploaded image"))
        return self._query_rows(np.asarray(vectors, dtype=np.float64).tolist(), width, "image vector")

    def _check_pixels(self, data: bytes) -> None:
        """413 for an image whose header declares more than `max_image_pixels` (nothing is decoded)."""
        from PIL import Image, UnidentifiedImageError

        from itemsage.encoders.image import ImageTooLarge, check_pixels

        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                check_pixels(image, self.max_image_pixels)
        except ImageTooLarge as err:
            raise RequestError(413, f"the uploaded image {err}") from None
        except Image.DecompressionBombError as err:  # PIL's own limit, met while reading some headers
            raise RequestError(413, f"the uploaded image is too large to decode: {err}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            pass  # not an image PIL knows: the encoder reports it in its own words

    def home(self, req: HomeRequest) -> HomeResponse:
        """PinnerSage over the history's frozen query vectors (by_product.home_by_history)."""
        self._check_k(req.k)
        served = self.served
        dims = self.model.query_dims
        surface = by_product.home_surface(dims)
        width = self._query_width(surface)
        frozen = None
        if req.vectors is not None:
            frozen = [self._query_rows(req.vectors, width, "vectors")]  # [H, Dq]
            history = [f"#vector-{i}" for i in range(len(req.vectors))]  # never an index id: nothing to exclude
        else:
            history = list(req.history or [])
        with self._by_product_errors(served, surface if req.history is not None else "", history):
            (result,) = by_product.home_by_history(
                served.index, self._adapt, surface, [history], [req.k], max_clusters=req.max_clusters,
                times=[req.times], now=[req.now], half_life_days=req.half_life_days,
                keep_history=req.keep_history or req.vectors is not None, exclude=[set(req.exclude or ())],
                frozen=frozen)
        top, top_scores, cluster_of = result.results[0]
        clusters = [
            Cluster(medoid=int(m), size=result.sizes[c], importance=result.importance[c],
                    members=np.flatnonzero(result.labels == c).tolist())
            for c, m in enumerate(result.medoids)
        ]
        return HomeResponse(ids=top, scores=top_scores, index_version=served.version, clusters=clusters,
                            cluster_of=cluster_of)

    def embed(self, req: EmbedRequest) -> EmbedResponse:
        vector = self._embed_products([req.product], ["product"])[0]  # [D]
        return EmbedResponse(product_id=req.product.product_id, vector=vector.tolist(), dim=len(vector),
                             model_fingerprint=self.model.fingerprint)

    def _embed_products(self, products: list[ProductIn], names: list[str]) -> np.ndarray:
        """Products -> their embeddings [N, D] by the served tower; `names` label each in errors."""
        cfg = self.model.config
        columns: dict[str, list] = {IMAGE_EMBEDDINGS: []}
        records: list[dict[str, Any]] = []
        for product, name in zip(products, names):
            extra = product.__pydantic_extra__ or {}
            unknown = sorted(set(extra) - set(cfg.text_fields))
            if unknown:
                raise RequestError(422, f"unknown {name} field(s) {', '.join(unknown)}; this model reads "
                                   f"{', '.join(cfg.text_fields)} and {IMAGE_EMBEDDINGS}")
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
        bad = ~np.all(np.isfinite(vectors), axis=1) | (np.abs(_norms(np.nan_to_num(vectors)) - 1.0) > 1e-3)  # [N]
        for i in np.flatnonzero(bad):
            images = columns[IMAGE_EMBEDDINGS][i]
            if not images:  # text alone cannot overflow the tower: a bug, not a bad request
                raise RuntimeError(f"the embedding of a text-only product is not a finite unit vector: {vectors[i, :4]}")
            largest = max(abs(v) for row in images for v in row)
            raise RequestError(422, f"the embedding of {names[i]} is not finite: its image_embeddings (largest "
                               f"|value| {largest:.3g}) are too large for this model; send the vectors of the "
                               "catalog's image encoder, on the scale the model was trained on")
        return vectors

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

    # -- live updates (live.py) --

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
        vectors = self._embed_products(req.products, [f"products[{i}]" for i in range(len(ids))])  # [N, D]
        products = [p.model_dump(exclude_none=True) for p in req.products]
        queries = self._product_query_vectors(products)  # [N, Dq] or None
        updates = [upsert_record(pid, v, self.model.fingerprint, p, None if queries is None else queries[i])
                   for i, (pid, v, p) in enumerate(zip(ids, vectors, products))]
        return self._apply_updates(updates, ids, [])

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
            try:
                records = self.live_log.append(updates, floor=index.applied_seq)  # fsynced
            except ArtifactError as err:
                raise RequestError(409, str(err)) from None
            except OSError as err:
                raise RequestError(503, f"the live log could not be written ({err}); nothing was changed") from None
            index.apply(records)
            return UpdateResponse(ids=ids, unknown=unknown, seq=index.applied_seq, index_version=served.version,
                                  products=len(index))

    def info(self) -> dict[str, Any]:
        served = self.served
        return {
            "index_version": served.version,
            "products": len(served.index),
            "index_kind": served.index.config.kind,
            "neighbour_recall_at_10": served.index.stats.get("neighbour_recall_at_10"),
            "live_updates": served.index.info() if isinstance(served.index, live_lib.LiveIndex) else None,
            "model_fingerprint": self.model.fingerprint,
            "query_dims": dict(self.model.query_dims),
            "dim": self.out_dim,
            "max_k": self.max_k,
        }


# ---- the app ------------------------------------------------------------------------------------


def _answer_now(body_model: type[BaseModel], answer: Any) -> Any:
    """A FastPathMiddleware handler: a JSON body -> `answer(request)`'s Candidates as FastAPI would send
    them, or None (FastAPI's route takes the request: a body it refuses, or work for the thread pool).

    The body is parsed as FastAPI parses it (`json.loads`) and validated by the same pydantic model,
    so a body accepted here is one the route accepts, with the same values. The response bytes are
    the ones FastAPI's `response_model` serialisation writes (pydantic-core, by alias); a refusal of
    the service is the `RequestError` handler's response."""
    validate = body_model.model_validate
    to_json = Candidates.__pydantic_serializer__.to_json

    def handle(body: bytes) -> Response | None:
        try:
            req = validate(json.loads(body))
        except Exception:  # any refusal, worded by FastAPI: invalid JSON, a validation error, ...
            return None
        try:
            found = answer(req)
        except RequestError as err:
            return error_response(err.status, err.message)
        return None if found is None else Response(to_json(found, by_alias=True), media_type="application/json")

    return handle


def create_app(
    model_dir: str | Path,
    index_root: str | Path,
    *,
    reload_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_k: int = DEFAULT_MAX_K,
    text_encoder: Any = None,
    image_encoder: Any = None,
    max_image_pixels: int | None = None,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    body_deadline_s: float = DEFAULT_BODY_DEADLINE_S,
    query_encoder: str = "onnx",
    query_cache: int = DEFAULT_QUERY_CACHE,
    query_batch: int = DEFAULT_QUERY_BATCH,
    products: str | Path | None = None,
) -> FastAPI:
    """The service over the model in `model_dir` and the index version CURRENT names in `index_root`.

    The model and index load now, so a broken artifact stops the server before it binds. Encoders
    left as None are the built-in ones, created on first use; tests pass fakes with `dim` and
    `encode(texts)` / `encode_paths(paths, progress=False)`. `reload_token` None disables reload and
    the live-update endpoints. `max_image_pixels` (default: the image encoder's) bounds an uploaded
    image by its header's size. `query_encoder`: 'onnx' (default), 'onnx-int8' or 'torch' for the
    built-in text encoder; `query_cache`: how many recent search texts keep their vectors (0: none);
    `query_batch`: up to this many concurrent search texts are encoded in one call (1: no batching).
    `products` (a dataset or catalog) gives the page at `/` its titles and images (itemsage.page).
    """
    require(max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {max_body_bytes}")
    require(body_timeout_s > 0 and body_deadline_s >= body_timeout_s,
            f"body_timeout_s ({body_timeout_s}) must be > 0 and body_deadline_s ({body_deadline_s}) at least as long")
    service = Service(model_dir, index_root, max_k=max_k, text_encoder=text_encoder, image_encoder=image_encoder,
                      max_image_pixels=max_image_pixels, query_encoder=query_encoder, query_cache=query_cache,
                      query_batch=query_batch)
    metrics = Metrics(service.info)
    app = FastAPI(
        title="ItemSage candidate generation",
        description="Top-k products for search, closeup and home from one product embedding.",
        version=__import__("itemsage").__version__,
    )
    app.state.service = service
    app.state.metrics = metrics

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        # Never echo `input` (a NaN there makes the JSON response itself fail) or `ctx`; a field name
        # from the request (an unknown key) may hold a lone surrogate, so locations are made printable.
        errors = [{"loc": [_printable(p) if isinstance(p, str) else p for p in e.get("loc", ())],
                   "msg": _printable(str(e.get("msg", ""))), "type": e.get("type", "")} for e in err.errors()]
        return error_response(422, _validation_message(err.errors()), errors=errors)

    # Search and closeup are async so that their cheap cases (a vector, a product id, a cached text:
    # one small matmul and one index search, well under a millisecond) run on the event loop; a
    # thread-pool hop costs about as much as that work. What takes milliseconds (a new text through
    # the text encoder, where concurrent texts batch across pool threads, or an image) still runs in
    # the pool, so the loop keeps serving meanwhile. So does every search of a remote index (Milvus:
    # a network round trip), i.e. whenever the service has no local index root, and every search of
    # a served version whose search is not cheap (`_fast_search`: IVF-PQ, a large exact scan), which
    # is decided per request since a reload may swap the kind.
    local_index = service.index_root is not None

    def search_now(req: SearchRequest) -> Candidates | None:
        """The search on the event loop when it is cheap; None: it goes to the thread pool."""
        if local_index and _fast_search(service.served.index):
            if req.text is None:
                return service.search(req)
            if req.text in service.query_cache:  # a pool thread may evict it before the read: then None
                return service.search(req, encode=False)
        return None

    def closeup_now(req: CloseupRequest) -> Candidates | None:
        if local_index and req.image is None and _fast_search(service.served.index):
            return service.closeup(req)
        return None

    @app.post("/v1/search", response_model=Candidates, tags=["retrieval"])
    async def search(req: SearchRequest) -> Candidates:
        """Products for a text search query (or a precomputed search-query vector)."""
        found = search_now(req)
        return found if found is not None else await run_in_threadpool(service.search, req)

    @app.post("/v1/closeup", response_model=Candidates, tags=["retrieval"])
    async def closeup(req: CloseupRequest) -> Candidates:
        """Products like an indexed product, an image vector, or an image file."""
        found = closeup_now(req)
        return found if found is not None else await run_in_threadpool(service.closeup, req)

    @app.post("/v1/home", response_model=HomeResponse, tags=["retrieval"])
    def home(req: HomeRequest) -> HomeResponse:
        """PinnerSage-style home feed candidates from a user's engagement history."""
        return service.home(req)

    @app.post("/v1/embed", response_model=EmbedResponse, tags=["retrieval"])
    def embed(req: EmbedRequest) -> EmbedResponse:
        """The embedding of one product (for a product not yet indexed)."""
        return service.embed(req)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> dict[str, Any]:
        """Readiness: the model and an index version are loaded."""
        return {"status": "ready", **service.info()}

    @app.get("/metrics", response_class=PlainTextResponse, tags=["operations"])
    async def metrics_text() -> PlainTextResponse:
        """Prometheus text exposition: requests by endpoint and status, latency histograms."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def authorize(authorization: Optional[str], action: str) -> None:
        """The bearer-token scheme of every /admin/* route; `action` ("reload", "live updates") names what is refused."""
        if reload_token is None:
            raise RequestError(403, f"{action} refused: disabled without a token; start the server with one "
                               "(itemsage serve --reload-token-env VAR, with VAR set)")
        if not authorization:
            raise RequestError(401, f"{action} needs the header `Authorization: Bearer <token>`")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), reload_token.encode()):
            raise RequestError(403, f"{action} refused: wrong token")

    @app.post("/admin/reload", response_model=ReloadResponse, tags=["operations"],
              responses={401: {"description": "no token"}, 403: {"description": "wrong token or reload disabled"},
                         404: {"description": "unknown version"}, 409: {"description": "version refused"}})
    def reload(body: Optional[ReloadRequest] = None,
               authorization: Optional[str] = Header(None)) -> ReloadResponse:
        """Swap to another index version (default: CURRENT) after loading and verifying it in full.

        A named version also becomes CURRENT (atomically), so a restart serves it, unless `persist` is false.
        """
        authorize(authorization, "reload")
        try:
            result = service.reload(body.version if body else None, body.persist if body else True)
        except RequestError:
            metrics.reload("refused")
            raise
        metrics.reload("ok")
        return result


    auth_errors = {401: {"description": "no token"}, 403: {"description": "wrong token or updates disabled"},
                   409: {"description": "another process writes this index root's live log"}}

    @app.post("/admin/products", response_model=UpdateResponse, tags=["live updates"], responses=auth_errors)
    def upsert(req: UpsertRequest, authorization: Optional[str] = Header(None)) -> UpdateResponse:
        """Add or replace products: embedded by the served model, durable and searchable on reply."""
        authorize(authorization, "live updates")
        return service.upsert(req)

    @app.post("/admin/products/delete", response_model=UpdateResponse, tags=["live updates"], responses=auth_errors)
    def delete(req: DeleteRequest, authorization: Optional[str] = Header(None)) -> UpdateResponse:
        """Delete products: durable on reply, never returned again (ids not indexed come back as `unknown`)."""
        authorize(authorization, "live updates")
        return service.delete(req)

    from itemsage.serve.page import add_page

    add_page(app, products)
    paths: set[str] = set()

    def route_paths() -> set[str]:
        if not paths:
            paths.update(getattr(r, "path", "") for r in app.routes)
        return paths

    # Added last = outermost: metrics see the body limit's 413s and the 500s too. The fast path is
    # innermost: the body limit, the 500 handler and the metrics see its requests as any other.
    app.add_middleware(FastPathMiddleware, routes={"/v1/search": _answer_now(SearchRequest, search_now),
                                                   "/v1/closeup": _answer_now(CloseupRequest, closeup_now)})
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout_s=body_timeout_s,
                       deadline_s=body_deadline_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics, paths=route_paths)
    return app


def uvicorn_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                   keep_alive_s: float = DEFAULT_KEEP_ALIVE_S) -> Any:
    """The uvicorn settings the service runs with: idle keep-alive connections close after `keep_alive_s`.

    The event loop and HTTP parser are uvicorn's "auto" choice: uvloop and httptools, both dependencies
    (asyncio and h11 only where they cannot be installed)."""
    import uvicorn

    require(keep_alive_s > 0, f"keep_alive_s must be > 0, got {keep_alive_s}")
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_keep_alive=keep_alive_s)


def run(
    model_dir: str | Path,
    index_root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    reload_token: str | None = None,
    threads: int = 1,
    log_level: str = "info",
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    query_encoder: str = "onnx",
    query_cache: int = DEFAULT_QUERY_CACHE,
    query_batch: int = DEFAULT_QUERY_BATCH,
    products: str | Path | None = None,
) -> None:
    """Serve with uvicorn (blocking). `threads` = torch, faiss and ONNX Runtime threads per request."""
    import uvicorn

    require(threads >= 1, f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    import faiss

    faiss.omp_set_num_threads(threads)
    app = create_app(model_dir, index_root, reload_token=reload_token, body_timeout_s=body_timeout_s,
                     body_deadline_s=max(DEFAULT_BODY_DEADLINE_S, body_timeout_s), query_encoder=query_encoder,
                     query_cache=query_cache, query_batch=query_batch,
                     products=products)
    app.state.service.warm_up()
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level, keep_alive_s=keep_alive_s)).run()
