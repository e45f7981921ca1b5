"""The candidate-generation service: FastAPI over `Service` (serve/service.py; docs/ARCHITECTURE.md).

    POST /v1/search   {text | vector, k, filter}               text -> query encoder -> adapter -> top-k
    POST /v1/closeup  {product_id | vector | image, k, exclude, filter}  a product, an image -> top-k
    POST /v1/home     {history | vectors, k, max_clusters, times, filter} PinnerSage clusters -> merged top-k
    GET  /v1/filters                                            the filterable columns (kinds, values)
    POST /v1/embed    {product: {text fields, image_embeddings}} one product -> its embedding
    GET  /healthz, /readyz, /metrics (Prometheus text);  POST /admin/reload (Bearer token)
    POST /admin/products {products: [...]}  upsert: embed with the served model, searchable on reply
    POST /admin/products/delete {ids}       delete: never returned again (both Bearer token; index/live.py)

Every retrieval response carries `ids` and `scores` (inner products of unit vectors, higher = more
similar, best first) and the `index_version` that answered.

Bad requests get a 4xx with a message, never a 5xx: bodies are strict pydantic models that refuse
unknown fields, NaN/inf, booleans or strings as numbers, and strings that are not valid UTF-8 (a
lone surrogate); widths and ids are checked against the model and the index, and the validation
handler never echoes the offending input (echoing a NaN back is itself a 500 in FastAPI's default).
A body that stops arriving gets a 408 after `body_timeout_s` of silence (or `body_deadline_s` in
all) and the connection is closed; idle keep-alive connections close after `keep_alive_s`
(uvicorn's setting). A real bug is a 500 that keeps the connection open.

Inference (torch, faiss) blocks, so the endpoints are plain `def`s that FastAPI runs in its thread
pool, except the sub-millisecond cases of search and closeup, which run on the event loop (see
`create_app`) and, as `application/json`, are answered before FastAPI's routing (`_answer_now`,
middleware.FastPathMiddleware: same validation, same bytes); `run()` sets torch and faiss to one
thread each because requests are single queries and parallelism comes from concurrent requests.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from itemsage.config import require
from itemsage.index.filters import FilterError
from itemsage.index.planner import SHORT_CUT_ROWS
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
from itemsage.serve.service import DEFAULT_MAX_K, DEFAULT_QUERY_BATCH, DEFAULT_QUERY_CACHE, Service

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a home request of 1000 x 256 floats as JSON is ~5 MB
DEFAULT_KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this

# Exact inner products one query may scan on the event loop (rows x dim): 5,000 x 256 takes about
# 0.7 ms on one core of the development machine; a larger scan goes to the thread pool.
FAST_EXACT_VALUES = 1_500_000


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


def _cheap_plan(index: Any, filter: Any, exclude: Any) -> bool:
    """Whether a search under `filter` and `exclude` is cheap whatever its plan (planner.plan): no filter
    and a few ids left out (the plan's short cut), or a filter passing so few products that even an
    exact scan of them all stays under FAST_EXACT_VALUES. Anything else (its plan may scan many rows or
    walk the graph at a large ef) goes to the thread pool; so does a filter that does not fit (its 422)."""
    if len(exclude or ()) > SHORT_CUT_ROWS:
        return False
    if not filter:
        return True
    try:
        mask = index.filters.mask(filter)  # compiled once, cached by the index
    except FilterError:
        return False
    return mask is None or mask.count * int(index.dim) <= FAST_EXACT_VALUES


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
    `products` (a dataset or catalog) gives the page at `/` its titles and images (itemsage.serve.page).
    """
    require(max_body_bytes >= 1024, f"max_body_bytes must be >= 1024, got {max_body_bytes}")
    require(body_timeout_s > 0 and body_deadline_s >= body_timeout_s,
            f"body_timeout_s ({body_timeout_s}) must be > 0 and body_deadline_s ({body_deadline_s}) at least as long")
    service = Service(model_dir, index_root, max_k=max_k, text_encoder=text_encoder, image_encoder=image_encoder,
                      max_image_pixels=max_image_pixels, query_encoder=query_encoder, query_cache=query_cache,
                      query_batch=query_batch, live_writer=reload_token is not None)
    metrics = Metrics(service.info)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        service.close()  # the live log's writer lock: a server started after this one may take it

    app = FastAPI(
        title="ItemSage candidate generation",
        description="Top-k products for search, closeup and home from one product embedding.",
        version=__import__("itemsage").__version__,
        lifespan=lifespan,
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
        index = service.served.index
        if local_index and _fast_search(index) and _cheap_plan(index, req.filter, ()):
            if req.text is None:
                return service.search(req)
            if req.text in service.query_cache:  # a pool thread may evict it before the read: then None
                return service.search(req, encode=False)
        return None

    def closeup_now(req: CloseupRequest) -> Candidates | None:
        index = service.served.index
        if local_index and req.image is None and _fast_search(index) and _cheap_plan(index, req.filter, req.exclude):
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

    @app.get("/v1/filters", tags=["retrieval"])
    def filters() -> dict[str, Any]:
        """The served version's filterable columns: each one's kind and its most common values (strings)
        or its range (numbers, times): what a request's `filter` may name."""
        return service.filters()

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
        """Readiness: the model and an index version are loaded. `live_log.role`: "writer" (this server
        takes the live updates of its index root) or "follower" (another server does; this one replays them)."""
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
