"""The product index in Milvus, for catalogs past one machine: the same search interface as ProductIndex.

`itemsage index --backend milvus --uri URI` writes one collection per index version and points an
alias at it; `itemsage serve --backend milvus --uri URI` searches the collection the alias names.
The URI picks the deployment and nothing else changes: `./catalog.db` is Milvus Lite (a local file,
for tests and laptops), `http://host:19530` a Milvus server or cluster.

    collection <name>_<version>   product_id VARCHAR primary key, vector FLOAT_VECTOR [D] (unit, metric IP),
                                  query_vector ARRAY<FLOAT> [Dq] (the product's frozen query vector, when
                                  the embeddings carry them: a plain field, never searched, so it needs
                                  no vector index of its own), one nullable scalar field per filterable
                                  attribute column (index/milvus_search.py: filters become Milvus
                                  boolean expressions, with a plan of their own)
                                  property itemsage.manifest: JSON (kind 'index', count, dim, inputs,
                                  config, recall@10 against exact search), written after the rows
    alias <name>                  the served version (the CURRENT of a local index root)

Publishing a version is one `alter_alias` on the server: readers see the old collection or the new.
A running service keeps its collection until `/admin/reload`, which resolves the alias again (the
hot reload). A version is loaded only when its manifest property is present and its row count
matches it, so a half-written collection is never served.

pymilvus is an optional extra (`pip install itemsage[milvus]`); faiss stays the embedded default.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.config import from_dict, require
from itemsage.index.build import attribute_source, read_attributes, read_embeddings, read_query_vectors
from itemsage.index.attributes import AttributeStore
from itemsage.index.config import NEIGHBOUR_RECALL, RECALL_K, stats_from_manifest
from itemsage.index.milvus_search import MilvusFilters, attribute_fields, attribute_rows
from itemsage.index.query_vectors import no_product_queries
from itemsage.index.recall import neighbour_recall, perturbed_queries
from itemsage.index.versions import VersionNotFound, new_version_name

log = logging.getLogger(__name__)

ID_FIELD = "product_id"
VECTOR_FIELD = "vector"
QUERY_VECTOR_FIELD = "query_vector"
PRODUCT_QUERY = "product_query"  # manifest key, as in a faiss version's manifest
MANIFEST_PROPERTY = "itemsage.manifest"
MAX_ID_LENGTH = 512
INSERT_BATCH = 5_000
SEARCH_BATCH = 1_000  # queries per Milvus request (the server caps nq)
INDEX_TYPES = ("HNSW", "FLAT", "IVF_FLAT", "AUTOINDEX")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _client(uri: str) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ImportError("the Milvus backend needs pymilvus (and milvus-lite for a ./file.db URI): "
                          "pip install 'itemsage[milvus]'") from None
    return MilvusClient(uri)


@dataclasses.dataclass(frozen=True)
class MilvusConfig:
    """How the Milvus collection is indexed and searched. Stored in the manifest property.

    index_type: Milvus vector index: HNSW (default), FLAT (exact), IVF_FLAT, or AUTOINDEX (the
        server chooses). On a cluster any type the server supports (e.g. IVF_PQ) works the same way.
    m, ef_construction, ef_search: HNSW parameters, as for the faiss index.
    nlist, nprobe: IVF_FLAT lists and lists probed per query.
    recall_sample: queries used to measure recall@10 against exact search at build time.
    exact_max_rows: a filter passing at most this many products is searched exactly (their vectors
        fetched); a wider one widens ef / nprobe as it gets more selective (index/milvus_search.py).
    exact_fetch_max: the most passing rows fetched to redo exactly an answer that came back short.
    """

    index_type: str = "HNSW"
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int = 1024
    nprobe: int = 64
    recall_sample: int = 1000
    exact_max_rows: int = 10_000
    exact_fetch_max: int = 200_000
    seed: int = 0
    kind: str = "milvus"  # what /v1/info reports as index_kind

    def __post_init__(self) -> None:
        require(self.index_type in INDEX_TYPES,
                f"milvus.index_type must be one of {', '.join(INDEX_TYPES)}, got '{self.index_type}'")
        require(self.kind == "milvus", f"milvus.kind must be 'milvus', got '{self.kind}'")
        for name in ("m", "ef_construction", "ef_search", "nlist", "nprobe", "exact_max_rows", "exact_fetch_max"):
            require(getattr(self, name) >= 1, f"milvus.{name} must be >= 1, got {getattr(self, name)}")
        require(self.recall_sample >= 0, f"milvus.recall_sample must be >= 0, got {self.recall_sample}")

    def index_params(self) -> dict[str, Any]:
        return {"HNSW": {"M": self.m, "efConstruction": self.ef_construction},
                "IVF_FLAT": {"nlist": self.nlist}}.get(self.index_type, {})

    def search_params(self) -> dict[str, Any]:
        params = {"HNSW": {"ef": self.ef_search}, "IVF_FLAT": {"nprobe": self.nprobe}}.get(self.index_type, {})
        return {"metric_type": "IP", "params": params}


def collection_name(name: str, version: str) -> str:
    """`<name>_<version>` with the version's '.' and '-' as '_' (Milvus names are [A-Za-z0-9_])."""
    if not _NAME.match(name):
        raise ValueError(f"Milvus collection name '{name}' must be letters, digits and '_', starting "
                         "with a letter or '_'")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", version):
        raise ValueError(f"index version name '{version}' must be letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return f"{name}_{re.sub(r'[.-]', '_', version)}"


class MilvusIndex:
    """One index version in Milvus, searched like ProductIndex.

    >>> index = MilvusIndex.open(client, "itemsage_v1")
    >>> top_ids, scores = index.search(queries, k=10)  # [Q, K] str, [Q, K] float32, best first
    """

    def __init__(self, client: Any, collection: str, manifest: dict[str, Any]) -> None:
        self._client = client
        self.collection = collection
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.config = from_dict(MilvusConfig, manifest["config"], section="milvus")
        self.version = str(manifest.get("version", collection))
        self.stats = stats_from_manifest(manifest, ("build_seconds", "recall_queries", "recall_reference"))
        self._count = int(manifest["count"])
        self.kinds: dict[str, str] = dict(manifest.get("attributes") or {})  # the filterable columns
        self._filters = MilvusFilters(client, collection, self.kinds, self._count, self.config)
        self.attributes = None  # no local store: filters run in Milvus

    @classmethod
    def open(cls, client: Any, collection: str) -> MilvusIndex:
        """Load a finished version: its manifest property must exist and agree with the collection."""
        if not client.has_collection(collection):
            raise VersionNotFound(f"Milvus has no collection '{collection}'")
        described = client.describe_collection(collection)
        raw = (described.get("properties") or {}).get(MANIFEST_PROPERTY)
        if not raw:
            raise ArtifactError(f"Milvus collection '{collection}' has no {MANIFEST_PROPERTY} property: it was "
                                "not finished by `itemsage index --backend milvus`; rebuild it")
        manifest = json.loads(raw)
        dims = [f.get("params", {}).get("dim") for f in described.get("fields", []) if f.get("name") == VECTOR_FIELD]
        rows = int(client.get_collection_stats(collection).get("row_count", -1))
        problems = []
        if manifest.get("kind") != "index":
            problems.append(f"its manifest is of kind '{manifest.get('kind')}', not 'index'")
        if not dims or int(dims[0]) != manifest.get("dim"):
            problems.append(f"its vectors have dimension {dims[0] if dims else '?'}, "
                            f"the manifest says {manifest.get('dim')}")
        if rows != manifest.get("count"):
            problems.append(f"it holds {rows} rows, the manifest says {manifest.get('count')}")
        if problems:
            raise ArtifactError(f"refusing to serve Milvus collection '{collection}': " + "; ".join(problems)
                                + ". Rebuild it with `itemsage index --backend milvus`.")
        client.load_collection(collection)
        return cls(client, collection, manifest)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, product_id: object) -> bool:
        if not isinstance(product_id, str):
            return False
        return bool(self._client.get(self.collection, ids=[product_id], output_fields=[ID_FIELD]))

    def search(self, queries: np.ndarray, k: int, *, filter: Any = None,
               exclude: Any = ()) -> tuple[np.ndarray, np.ndarray]:
        """queries [Q, D] -> (ids [Q, K] str (object array), scores [Q, K] float32), best first, padded
        with '' and -inf where fewer than k come back (as ProductIndex.search). `filter` and `exclude`
        as ProductIndex.search: a Milvus boolean expression, searched by MilvusFilters' plan."""
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [N, {self.dim}], got {list(queries.shape)}; "
                             f"this index holds {self.dim}-d vectors")
        if not np.all(np.isfinite(queries)):
            raise ValueError("queries hold NaN or inf; every value must be finite")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        q = len(queries)
        ids = np.full((q, k), "", dtype=object)
        scores = np.full((q, k), -np.inf, dtype=np.float32)
        exclude = set(exclude) if exclude is not None else set()
        if filter or exclude:
            for row in range(q):
                found, found_scores, _ = self._filters.search(queries[row], min(k, self._count), filter, exclude)
                ids[row, : len(found)] = found
                scores[row, : len(found)] = found_scores
            return ids, scores
        limit = min(k, self._count)
        for lo in range(0, q if limit else 0, SEARCH_BATCH):
            chunk = np.ascontiguousarray(queries[lo : lo + SEARCH_BATCH], dtype=np.float32)
            hits = self._client.search(self.collection, data=list(chunk), limit=limit, anns_field=VECTOR_FIELD,
                                       search_params=self.config.search_params(), output_fields=[ID_FIELD])
            for row, found in enumerate(hits):
                found = sorted(found, key=lambda h: -h["distance"])  # IP: the distance is the score
                ids[lo + row, : len(found)] = [h[ID_FIELD] if ID_FIELD in h else h["id"] for h in found]
                scores[lo + row, : len(found)] = [h["distance"] for h in found]
        return ids, scores

    def vector(self, product_ids: list[str] | np.ndarray) -> np.ndarray:
        """The stored unit vectors [N, D] of `product_ids`; KeyError names the ids not in the index."""
        return self._stored(product_ids, VECTOR_FIELD, self.dim)  # [N, D]

    def _stored(self, product_ids: list[str] | np.ndarray, field: str, dim: int) -> np.ndarray:
        """The `field` vectors [N, dim] of `product_ids`, in their order; KeyError names the missing ids."""
        product_ids = list(product_ids)
        if not product_ids:
            return np.empty((0, dim), dtype=np.float32)
        rows = self._client.get(self.collection, ids=list(dict.fromkeys(product_ids)), output_fields=[ID_FIELD, field])
        found = {r[ID_FIELD]: r[field] for r in rows}
        missing = [p for p in product_ids if p not in found]
        if missing:
            shown = ", ".join(repr(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise KeyError(f"{len(missing)} product id(s) not in the index: {shown}")
        return np.asarray([list(found[p]) for p in product_ids], dtype=np.float32)

    @property
    def product_query(self) -> dict[str, Any] | None:
        return self.manifest.get(PRODUCT_QUERY)

    @property
    def has_query_vectors(self) -> bool:
        return isinstance(self.product_query, dict)

    @property
    def query_dim(self) -> int | None:
        return int(self.product_query["dim"]) if self.has_query_vectors else None

    def query_vector(self, product_ids: list[str] | np.ndarray) -> np.ndarray:
        """The frozen query vectors [N, Dq] of `product_ids`, as ProductIndex.query_vector: KeyError names
        the ids not in the index; NoProductQueries when the version was built without them."""
        if not self.has_query_vectors:
            raise no_product_queries(f"Milvus collection '{self.collection}'")
        return self._stored(product_ids, QUERY_VECTOR_FIELD, self.query_dim)  # [N, Dq]


class MilvusVersions:
    """The index versions of one name in Milvus, as the service loads and reloads them.

    `resolve(None)` follows the alias (the served version), `resolve("v2")` names `<name>_v2`.
    """

    def __init__(self, uri: str, name: str = "itemsage", client: Any = None) -> None:
        collection_name(name, "v")  # validates the name
        self.uri, self.name = uri, name
        if client is None:
            try:
                client = _client(uri)
            except ImportError:
                raise
            except Exception as err:  # a wrong URI, a server that is down
                raise ArtifactError(f"cannot connect to Milvus at {uri}: {err}") from err
        self._client = client

    def __str__(self) -> str:
        return f"Milvus {self.uri} alias '{self.name}'"

    def resolve(self, version: str | None) -> str:
        if version:
            collection = collection_name(self.name, version)
        else:
            aliases = self._client.list_aliases().get("aliases", [])
            if self.name not in aliases:
                raise VersionNotFound(f"Milvus at {self.uri} has no alias '{self.name}': no index version is "
                                      f"published there. Build one with `itemsage index EMBEDDINGS_DIR --backend "
                                      f"milvus --uri {self.uri}`.")
            collection = self._client.describe_alias(self.name)["collection_name"]
        if not self._client.has_collection(collection):
            known = sorted(c for c in self._client.list_collections() if c.startswith(self.name + "_"))
            raise VersionNotFound(f"index version '{version}' does not exist: Milvus has no collection "
                                  f"'{collection}'; known versions: {', '.join(known) or 'none'}")
        return collection

    def load(self, target: str) -> MilvusIndex:
        try:
            return MilvusIndex.open(self._client, target)
        except (ArtifactError, ValueError):
            raise
        except Exception as err:  # pymilvus's MilvusException and connection errors: refuse, do not crash
            raise ArtifactError(f"Milvus at {self.uri} could not open collection '{target}': {err}") from err


def build_milvus(
    embeddings_dir: str | Path,
    uri: str,
    name: str = "itemsage",
    config: MilvusConfig | None = None,
    *,
    version: str | None = None,
    publish_it: bool = True,
    client: Any = None,
    attributes: str | Path | None = None,
    filterable: list[str] | None = None,
) -> MilvusIndex:
    """Write a finished embeddings directory into the Milvus collection `<name>_<version>`, measure its
    recall@10 against exact search, store the manifest, and (publish_it) point the alias `name` at it.
    `attributes`, `filterable`: where the filterable columns come from and which (index/build.py)."""
    config = config or MilvusConfig()
    version = version or new_version_name()
    collection = collection_name(name, version)
    client = client or _client(uri)
    if client.has_collection(collection):
        raise ArtifactError(f"index version {version} already exists in Milvus (collection '{collection}'); "
                            "an index version is never overwritten. Choose another --version name.")
    ids, vectors, emb_manifest = read_embeddings(embeddings_dir)
    require(len(ids) > 0, f"{embeddings_dir} holds no embeddings; nothing to index")
    too_long = [p for p in ids if len(p.encode()) > MAX_ID_LENGTH]
    require(not too_long, f"product id '{too_long[0] if too_long else ''}' is longer than {MAX_ID_LENGTH} bytes, "
                          "the Milvus id field's width")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [N, 1]
    require(bool(np.all(norms > 0)), "an embedding row is all zeros; a zero vector has no direction to search by")
    vectors = np.ascontiguousarray(vectors / norms, dtype=np.float32)  # scores are cosines, as in faiss
    dim = vectors.shape[1]
    query_vectors = read_query_vectors(embeddings_dir, emb_manifest)  # [N, Dq] or None
    source = attribute_source(embeddings_dir, emb_manifest, attributes)
    store = AttributeStore.from_table(read_attributes(source, ids, filterable)) if source is not None else None
    kinds = dict(store.kinds) if store is not None else {}

    from pymilvus import DataType

    start = time.perf_counter()
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    if query_vectors is not None:
        schema.add_field(QUERY_VECTOR_FIELD, DataType.ARRAY, element_type=DataType.FLOAT,
                         max_capacity=query_vectors.shape[1])
    if store is not None:
        attribute_fields(schema, kinds, store, {ID_FIELD, VECTOR_FIELD, QUERY_VECTOR_FIELD})
    index_params = client.prepare_index_params()
    index_params.add_index(field_name=VECTOR_FIELD, index_type=config.index_type, metric_type="IP",
                           params=config.index_params())
    client.create_collection(collection, schema=schema, index_params=index_params)
    for lo in range(0, len(ids), INSERT_BATCH):
        rows = [{ID_FIELD: pid, VECTOR_FIELD: vec}
                for pid, vec in zip(ids[lo : lo + INSERT_BATCH], vectors[lo : lo + INSERT_BATCH])]
        if query_vectors is not None:
            for row, q in zip(rows, query_vectors[lo : lo + INSERT_BATCH].tolist()):
                row[QUERY_VECTOR_FIELD] = q
        if store is not None:
            for row, values in zip(rows, attribute_rows(store, lo, min(lo + INSERT_BATCH, len(ids)))):
                row.update(values)
        client.insert(collection, rows)
    client.flush(collection)
    wait_for_index(client, collection)
    # Released and loaded again before the recall is measured: Milvus Lite searches a collection the
    # same process inserted into exactly (its segments' indexes unused) until it is loaded anew.
    client.release_collection(collection)
    client.load_collection(collection)
    build_seconds = time.perf_counter() - start

    inputs = {"embeddings": artifacts.fingerprint(embeddings_dir)}
    if emb_manifest.get("inputs", {}).get("model"):
        inputs["model"] = emb_manifest["inputs"]["model"]
    manifest = {"kind": "index", "version": version, "collection": collection, "count": len(ids), "dim": dim,
                "config": dataclasses.asdict(config), "inputs": inputs, "build_seconds": round(build_seconds, 3)}
    if query_vectors is not None:
        manifest[PRODUCT_QUERY] = {**(emb_manifest.get(PRODUCT_QUERY) or {}), "dim": int(query_vectors.shape[1])}
    manifest["attributes"] = kinds
    if source is not None:
        inputs["attributes"] = str(source.resolve())
    index = MilvusIndex(client, collection, manifest)
    index.stats = {"build_seconds": manifest["build_seconds"], **measure_recall(index, ids, vectors, config)}
    manifest.update(index.stats)
    # The manifest goes last: a collection without it is an unfinished version and is never loaded.
    client.alter_collection_properties(collection, properties={MANIFEST_PROPERTY: json.dumps(manifest)})
    index.manifest = manifest
    log.info("wrote Milvus collection %s: %d vectors x %d dims in %.1f s; recall@%d vs exact = %.4f",
             collection, len(ids), dim, build_seconds, RECALL_K, index.stats[NEIGHBOUR_RECALL])
    if publish_it:
        publish_milvus(client, name, collection)
    return index


def wait_for_index(client: Any, collection: str, timeout_s: float = 3600.0) -> None:
    """Block until the server has indexed every row, so the recall measured next is the index's own.

    A Milvus server builds indexes in the background after a flush; Milvus Lite reports them
    finished at once and may build segment indexes on first search."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.describe_index(collection, VECTOR_FIELD) or {}
        if info.get("state", "Finished") == "Finished" and not info.get("pending_index_rows"):
            return
        if info.get("state") == "Failed":
            raise ArtifactError(f"Milvus failed to index collection '{collection}': "
                                f"{info.get('index_state_fail_reason')}")
        if time.monotonic() > deadline:
            raise ArtifactError(f"Milvus has not finished indexing '{collection}' after {timeout_s:.0f} s: {info}")
        time.sleep(1.0)


def publish_milvus(client: Any, name: str, collection: str) -> None:
    """Point the alias `name` at `collection` (a finished version): the hot swap, atomic on the server."""
    MilvusIndex.open(client, collection)  # refuses an unfinished or inconsistent collection
    if name in client.list_aliases().get("aliases", []):
        client.alter_alias(collection, name)
    else:
        client.create_alias(collection, name)
    log.info("Milvus alias %s -> %s", name, collection)


def measure_recall(index: MilvusIndex, ids: np.ndarray, vectors: np.ndarray, config: MilvusConfig,
                   k: int = RECALL_K) -> dict[str, Any]:
    """Recall@k of the Milvus index against exact search over `vectors` [N, D] (unit, the rows it holds
    under `ids` [N]), with perturbed stored vectors as queries (see index.perturbed_queries)."""
    import faiss

    n = min(config.recall_sample, len(vectors))
    if n == 0:
        return {NEIGHBOUR_RECALL: 1.0, "recall_queries": 0, "recall_reference": "exact"}
    queries = perturbed_queries(vectors, n, np.random.default_rng(config.seed))  # [n, D]
    kk = min(k, len(vectors))
    _, exact_rows = faiss.knn(queries, vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)  # [n, kk]
    found, _ = index.search(queries, kk)  # [n, kk] ids
    return {NEIGHBOUR_RECALL: neighbour_recall(found, np.asarray(ids, dtype=object)[exact_rows]),
            "recall_queries": n, "recall_reference": "exact inner product on perturbed stored vectors"}
