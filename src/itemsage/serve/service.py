"""The service's computation, independent of HTTP: one model and one served index version, the query
encoders, and the retrieval endpoints (search, closeup, home). serve/app.py puts FastAPI over it;
serve/products.py adds the product writes (/v1/embed and the live updates).

Query vectors pass through the model's query adapter of their surface. A catalog product as a query
(closeup by `product_id`, home by `history`) is its frozen query vector, kept in the index, through
the closeup or home adapter, as in training (index/by_product.py, which `itemsage evaluate` scores
with the same code); closeup's `product_to_product` option searches with the product's learned
embedding instead. Query vectors are scaled to unit length in float64 before the adapter (which is
scale-invariant), so values up to float32's limit search by their direction; an embedding that
still comes out non-finite is refused with a 422. An uploaded image larger than `max_image_pixels`
is refused from its header (413) before it is decoded.

Hot reload loads and verifies a whole index version before swapping one reference (`Served`); a
request reads that reference once, so requests in flight finish on the old index and none fails.
Errors are `RequestError`s (serve/bodies.py), which the app turns into 4xx responses.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itemsage.artifacts import ArtifactError
from itemsage.config import ConfigError, require
from itemsage.index import by_product
from itemsage.index import live as live_lib
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.filters import FilterError
from itemsage.index.live_log import LiveLog
from itemsage.index.query_vectors import NoProductQueries
from itemsage.index.versions import LocalVersions, VersionNotFound, point_current
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
from itemsage.serve.products import ProductUpdates, _norms

log = logging.getLogger(__name__)


DEFAULT_MAX_K = 1000
DEFAULT_QUERY_CACHE = 10_000  # recent search texts whose query vectors are kept
DEFAULT_QUERY_BATCH = 8  # concurrent search texts encoded together (1: one at a time; BENCHMARKS.md)
QUERY_ENCODERS = ("onnx", "onnx-int8", "torch")


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


@contextlib.contextmanager
def _filter_errors(served: Served) -> Any:
    """A filter that does not fit the served version's attributes: 422 naming the column and listing the
    filterable ones (filters.FilterError's message)."""
    try:
        yield
    except FilterError as err:
        raise RequestError(422, f"{err} (index version {served.version})") from None


@dataclasses.dataclass(frozen=True)
class Served:
    """What one request reads once: the index and its version, swapped together by reload."""

    index: Any  # ProductIndex, or index_milvus.MilvusIndex (the same search interface)
    version: str


class Service(ProductUpdates):
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
        live_writer: bool = False,
    ) -> None:
        """`index_root`: a local index root, or a versions object with `resolve(version)` and `load(target)`
        (LocalVersions, index_milvus.MilvusVersions): the index backend seam. `live_writer`: claim the
        index root's live log now, unless another process writes it (then this one follows it; see
        serve/products.py); without it the log is claimed on the first update."""
        from itemsage.encoders.image import DEFAULT_MAX_PIXELS
        from itemsage.serve.query_cache import QueryVectorCache
        from itemsage.model.model import load_model

        require(max_k >= 1, f"max_k must be >= 1, got {max_k}")
        require(query_encoder in QUERY_ENCODERS,
                f"query_encoder must be one of {', '.join(QUERY_ENCODERS)}, got '{query_encoder}'")
        require(query_batch >= 1, f"query_batch must be >= 1 (1: no batching), got {query_batch}")
        self.query_encoder = query_encoder
        self.query_batch = query_batch
        self.query_cache = QueryVectorCache(query_cache)  # text -> product-space query vector
        self._live_lock = threading.RLock()  # orders updates (and a follower's replay) against the reload swap
        self.max_k = max_k
        self.max_image_pixels = int(max_image_pixels or DEFAULT_MAX_PIXELS)
        require(self.max_image_pixels >= 1, f"max_image_pixels must be >= 1, got {max_image_pixels}")
        self.versions = (index_root if hasattr(index_root, "resolve") and hasattr(index_root, "load")
                         else LocalVersions(index_root))
        self.index_root = getattr(self.versions, "root", None)  # a local index root; None for Milvus
        # Live updates log beside a local index root; a Milvus collection is updated in Milvus itself.
        self.live_log = LiveLog(self.index_root) if self.index_root is not None else None
        self._follow_reset()
        if live_writer and self.live_log is not None:
            self.claim_live_log()  # before the first replay: a writer never misses a line
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
                    self._follow_reset()  # a follower reads the log again from the start, after `new`'s updates
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

    def _top_k(self, served: Served, q: np.ndarray, k: int, exclude: set[str] = frozenset(),
               filter: Any = None) -> Candidates:
        """Top-k of one query [1, D] from the served index among the products passing `filter`, leaving
        out `exclude` (both inside the search; the same search as evaluation's, by_product.top_k)."""
        with _filter_errors(served):
            (ids, scores), = by_product.top_k(served.index, q, [k], [exclude], filter)[0]
        return Candidates(ids=ids, scores=scores, index_version=served.version)

    def filters(self) -> dict[str, Any]:
        """The served version's filterable columns: kind, most common values or range (GET /v1/filters)."""
        served = self.served
        store = getattr(served.index, "attributes", None)
        cached = getattr(self, "_filters_of", None)
        if cached is None or cached[0] is not served:
            summary = store.summary() if store is not None else [  # Milvus: the kinds, no values here
                {"name": name, "kind": kind} for name, kind in sorted(getattr(served.index, "kinds", {}).items())]
            self._filters_of = cached = (served, {"index_version": served.version, "columns": summary})
        return cached[1]

    def text_encoder(self) -> Any:
        from itemsage.serve.query_cache import BatchingEncoder

        with self._encoder_lock:  # created once, on first use (loading MiniLM takes seconds)
            if self._text_encoder is None:
                from itemsage.encoders.onnx_text import OnnxTextQueryEncoder
                from itemsage.encoders.text import TextQueryEncoder

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
        self._embed_products([ProductIn(product_id="warm-up", title="warm up")], ["warm-up"], warn=False)  # first run

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
            return self._top_k(served, q[None, :], req.k, filter=req.filter)
        x = self._query_rows([req.vector], width, "vector")
        return self._top_k(served, self._adapt("search", x), req.k, filter=req.filter)

    def closeup(self, req: CloseupRequest) -> Candidates:
        self._check_k(req.k)
        served = self.served
        exclude = set(req.exclude or ())
        if req.product_id is not None and req.product_to_product:
            q = self._product_vectors(served, [req.product_id])  # its learned embedding, already in product space
            return self._top_k(served, q, req.k, exclude | ({req.product_id} if req.exclude_self else set()), req.filter)
        if req.product_id is not None:  # its frozen query vector through the closeup adapter (by_product.py)
            self._query_width("closeup")
            with self._by_product_errors(served, "closeup", [req.product_id]):
                (((ids, scores),),) = by_product.closeup_by_product(
                    served.index, self._adapt, [req.product_id], [req.k], exclude_self=req.exclude_self,
                    exclude=[exclude], filter=req.filter)
            return Candidates(ids=ids, scores=scores, index_version=served.version)
        width = self._query_width("closeup")
        if req.vector is not None:
            x = self._query_rows([req.vector], width, "vector")
        else:
            x = self._encode_image(req.image or "", width)
        return self._top_k(served, self._adapt("closeup", x), req.k, exclude, req.filter)

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
            with _filter_errors(served):
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
                               f"closeup queries are {width}-d: it was trained on another encoder's image vectors "
                               "(its catalog's image_embeddings). `image` needs a model trained on the built-in "
                               "encoder's vectors (a catalog with image_paths); for this one, encode the image with "
                               "the catalog's encoder and send `vector` instead")
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
                frozen=frozen, filter=req.filter)
        top, top_scores, cluster_of = result.results[0]
        clusters = [
            Cluster(medoid=int(m), size=result.sizes[c], importance=result.importance[c],
                    members=np.flatnonzero(result.labels == c).tolist())
            for c, m in enumerate(result.medoids)
        ]
        return HomeResponse(ids=top, scores=top_scores, index_version=served.version, clusters=clusters,
                            cluster_of=cluster_of)


    def info(self) -> dict[str, Any]:
        served = self.served
        return {
            "index_version": served.version,
            "products": len(served.index),
            "index_kind": served.index.config.kind,
            "neighbour_recall_at_10": served.index.stats.get("neighbour_recall_at_10"),
            "live_updates": served.index.info() if isinstance(served.index, live_lib.LiveIndex) else None,
            "live_log": self.live_log_info(),
            # what a product is as a query, so what an upsert needs: "image" -> its image_embeddings
            "product_query": getattr(served.index, "product_query", None),
            "model_fingerprint": self.model.fingerprint,
            "query_dims": dict(self.model.query_dims),
            "dim": self.out_dim,
            "max_k": self.max_k,
        }
