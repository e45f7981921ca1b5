"""The product index: faiss HNSW (default), IVF-PQ (compressed) or exact flat search over unit vectors.

`ProductIndex` has four verbs: `add`, `search`, `save`, `load`. Scores are inner products of unit
vectors (cosine similarity), higher = more similar, and `search` returns `(ids, scores)` like every
retrieval backend here. Faiss numbers vectors 0..N-1 in insertion order; the index keeps the
matching product ids beside it and translates.

On disk an index is a version directory (never pickle):

    INDEX_ROOT/versions/<version>/index.faiss    faiss.write_index
                                  ids.parquet    product_id per faiss row
                                  vectors.faiss  ivfpq only: the full vectors (IndexFlatIP), memory-mapped
                                  query_vectors.safetensors  the products' frozen query vectors
                                                 ("query_vector" [N, Dq] float32, ids' row order), when
                                                 the embeddings carry them; memory-mapped
                                  manifest.json  kind 'index': config, count, dim, inputs, recall
    INDEX_ROOT/CURRENT                           text: the served version's name, replaced atomically

`load` checks every file's sha256 against the manifest, then the dimension and count, so a torn or
corrupted index is refused, never served. Every build measures recall@10 of the ANN index against
exact search on a sample of queries and stores it in the manifest: a speed figure without its
recall means nothing.

IVF-PQ (`kind='ivfpq'`) keeps only a compressed code per vector in memory: an inverted file of
`nlist` lists (coarse k-means) and a product quantizer of `pq_m` sub-vectors of `pq_nbits` bits (4 bits
uses faiss's SIMD "fast-scan" kernels). A search probes `nprobe` lists, ranks by the codes, then
re-ranks a shortlist of `refine_factor * k` candidates with the full vectors (faiss IndexRefine).
The full vectors live in vectors.faiss, which `load` memory-maps: they stay on disk and the page
cache holds only the rows searches touch. Parameters left at 0 are chosen from the catalog size by
`ivfpq_parameters` (the rule is written there and in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.config import from_dict, require
from itemsage.schema import PRODUCT_ID, PRODUCT_QUERY, QUERY_VECTOR

log = logging.getLogger(__name__)

KINDS = ("hnsw", "flat", "ivfpq")
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.faiss"
IDS_FILE = "ids.parquet"
QUERY_VECTORS_FILE = "query_vectors.safetensors"
VERSIONS_DIR = "versions"
CURRENT_FILE = "CURRENT"
RECALL_K = 10
# The index's recall@10 against exact search over its own vectors (how many of the true 10 nearest
# neighbours it returns): the manifest key. Manifests written before the rename say "recall_at_10".
NEIGHBOUR_RECALL = "neighbour_recall_at_10"
_OLD_NEIGHBOUR_RECALL = "recall_at_10"


def stats_from_manifest(manifest: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """An index's stats from its manifest: `keys` that are present, and the neighbour recall under
    its name (read from the old `recall_at_10` key of an older manifest)."""
    stats = {k: manifest[k] for k in keys if k in manifest}
    recall = manifest.get(NEIGHBOUR_RECALL, manifest.get(_OLD_NEIGHBOUR_RECALL))
    if recall is not None:
        stats[NEIGHBOUR_RECALL] = recall
    return stats
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How the index is built and searched. Stored in the manifest; `ef_search` can change at load.

    kind: 'hnsw' (approximate, fast), 'ivfpq' (approximate, compressed: tens of millions of vectors
        on one machine) or 'flat' (exact; small catalogs and the evaluation reference).
    m: HNSW links per node (memory ~ 2*m*4 bytes per vector on top of the vector itself).
    ef_construction: HNSW candidate list while building (higher = better graph, slower build).
    ef_search: HNSW candidate list while searching (higher = better recall, slower queries). With
        m=32 on 1M x 256 clustered vectors (benchmarks/bench_index.py), recall@10 against exact
        search is 0.934 at 32, 0.987 at 64 and 0.9975 at the default 128: margin for real
        embeddings, which can be harder than the benchmark's mixture.
    nlist, pq_m, pq_nbits, nprobe: IVF-PQ lists, sub-quantizers, bits per sub-quantizer code and
        lists probed per query; 0 = chosen from the catalog size and width (`ivfpq_parameters`).
        `nprobe` can change at load.
    refine_factor: IVF-PQ re-ranks the `refine_factor * k` best candidates by the codes with the
        full vectors (1 = only re-score the k found, exactly).
    recall_sample: queries used to measure recall@10 against exact search at build time.
    threads: faiss OpenMP threads; 0 keeps faiss's default (all cores).
    """

    kind: str = "hnsw"
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 4
    nprobe: int = 0
    refine_factor: int = 20
    recall_sample: int = 1000
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.kind in KINDS, f"index.kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        require(self.m >= 2, f"index.m (HNSW links per node) must be >= 2, got {self.m}")
        require(self.ef_construction >= 1, f"index.ef_construction must be >= 1, got {self.ef_construction}")
        require(self.ef_search >= 1, f"index.ef_search must be >= 1, got {self.ef_search}")
        require(self.nlist >= 0, f"index.nlist must be >= 0 (0 = from the catalog size), got {self.nlist}")
        require(self.pq_m >= 0, f"index.pq_m must be >= 0 (0 = from the vector width), got {self.pq_m}")
        require(self.pq_nbits in (4, 8), f"index.pq_nbits must be 4 (fast-scan) or 8, got {self.pq_nbits}")
        require(self.nprobe >= 0, f"index.nprobe must be >= 0 (0 = from nlist), got {self.nprobe}")
        require(self.refine_factor >= 1, f"index.refine_factor must be >= 1, got {self.refine_factor}")
        require(self.recall_sample >= 0, f"index.recall_sample must be >= 0, got {self.recall_sample}")
        require(self.threads >= 0, f"index.threads must be >= 0 (0 = all cores), got {self.threads}")


class NoProductQueries(ArtifactError):
    """The index (or embeddings) predates products' frozen query vectors."""


def no_product_queries(where: str) -> NoProductQueries:
    return NoProductQueries(
        f"{where} holds no product query vectors (it was made before products could be queries); re-run "
        "`itemsage ingest`, `itemsage embed` and `itemsage index` to add them")


def _check_query_vectors(query_vectors: Any, n: int) -> np.ndarray:
    q = np.asarray(query_vectors, dtype=np.float32)
    if q.ndim != 2 or len(q) != n or q.shape[1] < 1:
        raise ValueError(f"query_vectors must be [N, Dq] with one row per id ({n}), got shape {q.shape}")
    if not np.isfinite(q).all():
        raise ValueError("query_vectors contain NaN or inf")
    return q


def save_query_vectors(path: Path, vectors: np.ndarray) -> None:
    """[N, Dq] float32 as a safetensors file (tensor "query_vector"), written atomically."""
    from safetensors.numpy import save_file

    with artifacts.atomic_path(path) as tmp:
        save_file({QUERY_VECTOR: np.ascontiguousarray(vectors, dtype=np.float32)}, str(tmp))


def load_query_vectors(path: Path) -> np.ndarray:
    """The "query_vector" tensor [N, Dq] of a safetensors file, memory-mapped read-only (the format is
    an 8-byte little-endian header size, a JSON header, then the raw data)."""
    import json
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    info = header.get(QUERY_VECTOR)
    if not isinstance(info, dict) or info.get("dtype") != "F32" or len(info.get("shape", [])) != 2:
        raise ArtifactError(f"{path} holds no float32 [N, Dq] tensor '{QUERY_VECTOR}'; rebuild the index.")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != 4 * shape[0] * shape[1]:
        raise ArtifactError(f"{path}: the tensor's data size does not match its shape {shape}; rebuild the index.")
    if shape[0] == 0:
        return np.zeros(shape, np.float32)
    # A plain ndarray over the map (it keeps the map open): indexing a np.memmap runs Python code per call.
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + size + begin, shape=shape).view(np.ndarray)


class ProductIndex:
    """Top-k retrieval of product ids by inner product over unit vectors.

    >>> index = ProductIndex(dim=256)                 # HNSW, default parameters
    >>> index.add(ids, vectors)                      # ids [N] str, vectors [N, D]
    >>> top_ids, scores = index.search(queries, k=10)  # [Q, K] str, [Q, K] float32
    """

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        require(int(dim) >= 1, f"index dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.config = config or IndexConfig()
        if self.config.threads:
            faiss.omp_set_num_threads(self.config.threads)
        self._ivf: Any = None  # ivfpq: the IVF-PQ index of codes (trained on the first add)
        self._vectors: Any = None  # ivfpq: IndexFlatIP of the full vectors, for re-ranking and lookups
        self._mapped = False  # ivfpq loaded from disk: _vectors is a read-only memory map
        if self.config.kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(self.dim, self.config.m, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = self.config.ef_construction
            self._index.hnsw.efSearch = self.config.ef_search
        elif self.config.kind == "flat":
            self._index = faiss.IndexFlatIP(self.dim)
        else:
            self._index = None  # IVF-PQ must see data before it exists: see _train_ivfpq
        self._ids = np.empty(0, dtype=object)  # [N] product_id of faiss row n
        self._row_of: dict[str, int] = {}
        self.manifest: dict[str, Any] = {}  # set by save/load
        self.stats: dict[str, Any] = {}  # build time and measured recall, set by build/load
        self.version: str | None = None  # the version directory's name once saved or loaded
        self._query_vectors: np.ndarray | None = None  # [N, Dq] frozen query vectors in row order, if any
        self.product_query: dict[str, Any] | None = None  # {"source", "fields", "dim"} of those

    # ---- the four verbs -------------------------------------------------------------------------

    @classmethod
    def build(
        cls, ids: np.ndarray | list[str], vectors: np.ndarray, kind: str = "hnsw", *,
        query_vectors: np.ndarray | None = None, product_query: dict[str, Any] | None = None, **options: Any
    ) -> ProductIndex:
        """A new index holding `vectors` [N, D] under `ids` [N]; measures its recall@10 (see `stats`).
        `query_vectors` [N, Dq]: the products' frozen query vectors (with `product_query`, the dataset
        manifest's entry describing them), kept beside the index for `query_vector`."""
        config = from_dict(IndexConfig, {"kind": kind, **options}, section="index")
        vectors = np.asarray(vectors)
        require(vectors.ndim == 2, f"vectors must be a 2-D array [N, D], got shape {vectors.shape}")
        index = cls(vectors.shape[1], config)
        index.product_query = product_query
        start = time.perf_counter()
        index.add(ids, vectors, query_vectors)
        index.stats = {"build_seconds": round(time.perf_counter() - start, 3)}
        index.stats.update(index.measure_recall(vectors))
        log.info(
            "built %s index: %d vectors x %d dims in %.1f s; recall@%d vs exact = %.4f (%d queries)",
            config.kind, len(index), index.dim, index.stats["build_seconds"], RECALL_K,
            index.stats[NEIGHBOUR_RECALL], index.stats["recall_queries"],
        )
        return index

    def add(self, ids: np.ndarray | list[str], vectors: np.ndarray, query_vectors: np.ndarray | None = None) -> None:
        """Append `vectors` [N, D] under product `ids` [N]. Rows are L2-normalised (scores are cosines).
        `query_vectors` [N, Dq] (kept as given): the products' frozen query vectors; an index holds them
        for every product or for none, as its first `add` decides."""
        ids = np.asarray(ids, dtype=object)
        vectors = self._check_matrix(vectors, "vectors")
        if query_vectors is not None:
            query_vectors = _check_query_vectors(query_vectors, len(vectors))
            if len(self._ids) and self._query_vectors is None:
                raise ValueError("this index holds no product query vectors; add products without query_vectors")
            if self._query_vectors is not None and query_vectors.shape[1] != self._query_vectors.shape[1]:
                raise ValueError(f"query_vectors are {query_vectors.shape[1]}-d, the index's are "
                                 f"{self._query_vectors.shape[1]}-d")
        elif self._query_vectors is not None:
            raise ValueError("this index holds the products' query vectors; give query_vectors for new products too")
        if self._mapped:  # faiss would abort the process appending to a memory-mapped IndexFlat
            raise ValueError("a loaded IVF-PQ index is read-only: its full vectors are memory-mapped from "
                             f"{VECTORS_FILE}. Build a new version with `itemsage index` instead.")
        if ids.ndim != 1 or len(ids) != len(vectors):
            raise ValueError(f"ids must be 1-D with one id per vector row: got {ids.shape} ids for "
                             f"{len(vectors)} vectors")
        if any(not isinstance(i, str) or not i for i in ids):
            raise ValueError("every product id must be a non-empty string")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [N, 1]
        if np.any(norms == 0):
            raise ValueError(f"vectors row {int(np.argmin(norms[:, 0]))} is all zeros; a zero vector "
                             "has no direction to search by. Drop it or fix the embedding.")
        if np.any(np.abs(norms - 1) > 1e-3):
            log.warning("vectors are not unit length (norms %.3f..%.3f); normalising them",
                        float(norms.min()), float(norms.max()))
        vectors = np.ascontiguousarray(vectors / norms, dtype=np.float32)
        start = len(self._ids)
        row_of = dict(self._row_of)
        for offset, pid in enumerate(ids):
            if pid in row_of:
                raise ValueError(f"duplicate product id '{pid}': each product may appear once in an index")
            row_of[pid] = start + offset
        if self._index is None:
            self._train_ivfpq(vectors)
        self._index.add(vectors)  # HNSW: faiss parallelises insertion over its OpenMP threads
        self._ids = np.concatenate([self._ids, ids])
        self._row_of = row_of
        if query_vectors is not None:
            self._query_vectors = (query_vectors.copy() if self._query_vectors is None
                                   else np.concatenate([self._query_vectors, query_vectors]))

    def search(
        self, queries: np.ndarray, k: int, *, selector: faiss.IDSelector | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` products per query row.

        queries [Q, D] -> (ids [Q, K] str (object array), scores [Q, K] float32), best first.
        With fewer than k products (or HNSW returning fewer), the tail is padded with '' and -inf.
        `selector` (a faiss IDSelector over faiss row numbers) limits the search to the rows it
        accepts, inside faiss, so k results still come back when rows are left out (live deletes).
        """
        queries = self._check_matrix(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        q = len(queries)
        if len(self) == 0 or q == 0:
            return np.full((q, k), "", dtype=object), np.full((q, k), -np.inf, dtype=np.float32)
        # Faiss cannot return more than ntotal results usefully; pad the rest ourselves.
        kk = min(k, len(self))
        scores, rows = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), kk,
                                          params=self._search_params(selector))  # [Q, kk]
        ids = np.full((q, k), "", dtype=object)
        out_scores = np.full((q, k), -np.inf, dtype=np.float32)
        found = rows >= 0  # faiss marks missing results with -1
        ids[:, :kk][found] = self._ids[rows[found]]
        out_scores[:, :kk][found] = scores[found]
        return ids, out_scores

    def search_one(self, query: np.ndarray, k: int, *,
                   selector: faiss.IDSelector | None = None) -> tuple[list[str], list[float]]:
        """`search` of one query [D] without its checks and padding: the (up to) k products found, as
        (ids, scores) lists, best first; the rows `search` returns for it, less the '' / -inf padding.

        For a caller whose query is already a finite float32 vector of width `dim` and whose `k` is a
        positive int (the service's adapters give that); `search` checks both.
        """
        kk = min(k, len(self))
        if kk < 1:
            return [], []
        scores, rows = self._index.search(query.reshape(1, -1), kk, params=self._search_params(selector))  # [1, kk]
        found = rows[0] >= 0  # faiss marks missing results with -1
        return self._ids[rows[0][found]].tolist(), scores[0][found].tolist()

    def _search_params(self, selector: faiss.IDSelector | None) -> Any:
        """faiss search parameters limiting a search to the rows `selector` accepts (None: no limit)."""
        if selector is None:
            return None
        if self.config.kind == "hnsw":  # HNSW takes its efSearch from the parameters when they are given
            return faiss.SearchParametersHNSW(sel=selector, efSearch=int(self._index.hnsw.efSearch))
        if self.config.kind == "ivfpq":  # IndexRefine: the selector goes to the IVF it shortlists from
            return faiss.IndexRefineSearchParameters(
                k_factor=float(self._index.k_factor),
                base_index_params=faiss.SearchParametersIVF(sel=selector, nprobe=int(self._ivf.nprobe)))
        return faiss.SearchParameters(sel=selector)

    def save(
        self,
        version_dir: str | Path,
        *,
        inputs: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write index.faiss, ids.parquet and (last) manifest.json into a new `version_dir`."""
        version_dir = Path(version_dir)
        if (version_dir / artifacts.MANIFEST).exists():
            raise ArtifactError(f"{version_dir} already holds a finished index; an index version is "
                                "never overwritten. Choose another --version name.")
        version_dir.mkdir(parents=True, exist_ok=True)
        files = [INDEX_FILE, IDS_FILE]
        with artifacts.atomic_path(version_dir / INDEX_FILE) as tmp:
            faiss.write_index(self._ivf if self.config.kind == "ivfpq" else self._index, str(tmp))
        if self.config.kind == "ivfpq":
            with artifacts.atomic_path(version_dir / VECTORS_FILE) as tmp:
                faiss.write_index(self._vectors, str(tmp))
            files.append(VECTORS_FILE)
        sizes = {"index_bytes": (version_dir / INDEX_FILE).stat().st_size}
        if self.config.kind == "ivfpq":
            sizes["rerank_vectors_bytes"] = (version_dir / VECTORS_FILE).stat().st_size
        artifacts.atomic_write_parquet(
            version_dir / IDS_FILE, pa.table({PRODUCT_ID: pa.array(self._ids.tolist(), pa.string())})
        )
        queries: dict[str, Any] = {}
        if self._query_vectors is not None:
            save_query_vectors(version_dir / QUERY_VECTORS_FILE, self._query_vectors)
            files.append(QUERY_VECTORS_FILE)
            queries = {PRODUCT_QUERY: {**(self.product_query or {}), "dim": int(self._query_vectors.shape[1])}}
        stats = self.stats
        self.manifest = artifacts.write_manifest(
            version_dir,
            "index",
            config=dataclasses.asdict(self.config),
            inputs=inputs,
            counts={"vectors": len(self)},
            files=files,
            extra={"count": len(self), "dim": self.dim, **stats, **sizes, **queries, **(extra or {})},
        )
        self.version = version_dir.name
        return version_dir

    @classmethod
    def load(cls, version_dir: str | Path, *, ef_search: int | None = None,
             nprobe: int | None = None) -> ProductIndex:
        """Read a saved version after checking every file's sha256, the dimension and the count.

        IVF-PQ's full vectors (vectors.faiss) are memory-mapped, not read into memory."""
        version_dir = Path(version_dir)
        manifest = artifacts.verify_manifest(version_dir, kind="index")
        kind = manifest.get("config", {}).get("kind")
        for name in (INDEX_FILE, IDS_FILE) + ((VECTORS_FILE,) if kind == "ivfpq" else ()):
            if name not in manifest["files"]:
                raise ArtifactError(f"{version_dir}/{artifacts.MANIFEST} does not list {name}; rebuild the index.")
        config_dict = dict(manifest["config"])
        if ef_search is not None:
            config_dict["ef_search"] = ef_search
        if nprobe is not None:
            config_dict["nprobe"] = nprobe
        config = from_dict(IndexConfig, config_dict, section="index")
        raw = faiss.read_index(str(version_dir / INDEX_FILE))
        ids = pq.read_table(version_dir / IDS_FILE, columns=[PRODUCT_ID]).column(PRODUCT_ID)
        count, dim = manifest.get("count"), manifest.get("dim")
        problems = []
        if raw.d != dim:
            problems.append(f"index.faiss has dimension {raw.d}, the manifest says {dim}")
        if raw.ntotal != count:
            problems.append(f"index.faiss holds {raw.ntotal} vectors, the manifest says {count}")
        if len(ids) != count:
            problems.append(f"ids.parquet holds {len(ids)} ids, the manifest says {count}")
        if ids.null_count:
            problems.append(f"ids.parquet has {ids.null_count} null ids")
        expected_type = {"hnsw": faiss.IndexHNSWFlat, "flat": faiss.IndexFlatIP,
                         "ivfpq": (faiss.IndexIVFPQFastScan, faiss.IndexIVFPQ)}[config.kind]
        if not isinstance(raw, expected_type) or raw.metric_type != faiss.METRIC_INNER_PRODUCT:
            problems.append(f"index.faiss is a {type(raw).__name__}, the manifest says kind '{config.kind}'")
        vectors = None
        if config.kind == "ivfpq":
            # Memory-mapped: the re-rank vectors stay on disk; the page cache keeps the rows searched.
            vectors = faiss.read_index(str(version_dir / VECTORS_FILE), faiss.IO_FLAG_MMAP_IFC)
            if not isinstance(vectors, faiss.IndexFlatIP) or vectors.d != dim or vectors.ntotal != count:
                problems.append(f"{VECTORS_FILE} holds {vectors.ntotal} x {vectors.d} "
                                f"({type(vectors).__name__}), the manifest says {count} x {dim}")
        query_vectors = None
        if QUERY_VECTORS_FILE in manifest["files"]:
            query_vectors = load_query_vectors(version_dir / QUERY_VECTORS_FILE)
            dq = (manifest.get(PRODUCT_QUERY) or {}).get("dim")
            if query_vectors.shape != (count, dq):
                problems.append(f"{QUERY_VECTORS_FILE} holds {query_vectors.shape[0]} x {query_vectors.shape[1]} "
                                f"query vectors, the manifest says {count} x {dq}")
        if problems:
            raise ArtifactError(f"refusing to load the index in {version_dir}: " + "; ".join(problems)
                                + ". Rebuild it with `itemsage index`.")
        index = cls(dim, config)
        if config.kind == "ivfpq":
            index._set_ivfpq(raw, vectors)
            index._mapped = True
        else:
            index._index = raw
        if config.kind == "hnsw":
            raw.hnsw.efSearch = config.ef_search
        index._ids = np.asarray(ids.to_pylist(), dtype=object)
        index._row_of = {pid: row for row, pid in enumerate(index._ids)}
        if len(index._row_of) != count:
            raise ArtifactError(f"refusing to load the index in {version_dir}: ids.parquet has duplicate "
                                "product ids. Rebuild it with `itemsage index`.")
        index.manifest = manifest
        index._query_vectors = query_vectors
        index.product_query = manifest.get(PRODUCT_QUERY) if query_vectors is not None else None
        index.stats = stats_from_manifest(manifest, ("build_seconds", "recall_queries", "index_bytes",
                                                     "rerank_vectors_bytes"))
        index.version = version_dir.name
        return index

    # ---- lookups and tuning ---------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index.ntotal) if self._index is not None else 0

    def __contains__(self, product_id: object) -> bool:
        return product_id in self._row_of

    def row(self, product_id: str) -> int:
        """The faiss row number of `product_id`, -1 if it is not in the index."""
        return self._row_of.get(product_id, -1)

    @property
    def ids(self) -> np.ndarray:
        """[N] product ids in faiss row order."""
        return self._ids

    @property
    def ef_search(self) -> int | None:
        return int(self._index.hnsw.efSearch) if self.config.kind == "hnsw" else None

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        require(self.config.kind == "hnsw", "ef_search applies only to an HNSW index")
        require(int(value) >= 1, f"ef_search must be >= 1, got {value}")
        self._index.hnsw.efSearch = int(value)

    @property
    def nprobe(self) -> int | None:
        return int(self._ivf.nprobe) if self._ivf is not None else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        require(self._ivf is not None, "nprobe applies only to a trained IVF-PQ index")
        require(int(value) >= 1, f"nprobe must be >= 1, got {value}")
        self._ivf.nprobe = int(value)

    def _train_ivfpq(self, vectors: np.ndarray) -> None:
        """Choose IVF-PQ's parameters from the first `vectors` [N, D] added, train on a sample of them."""
        n = len(vectors)
        if n < IVFPQ_MIN_VECTORS:
            raise ValueError(f"an IVF-PQ index trains on the vectors of its first add: {n} are too few "
                             f"(at least {IVFPQ_MIN_VECTORS}); use kind 'flat' or 'hnsw' for a catalog this small")
        self.config = ivfpq_parameters(n, self.dim, self.config)
        c = self.config
        code = f"PQ{c.pq_m}x4fs" if c.pq_nbits == 4 else f"PQ{c.pq_m}x{c.pq_nbits}"
        ivf = faiss.index_factory(self.dim, f"IVF{c.nlist},{code}", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(c.seed)
        sample = vectors[np.sort(rng.choice(n, size=min(n, IVFPQ_TRAIN_PER_LIST * c.nlist), replace=False))]
        start = time.perf_counter()
        ivf.train(sample)  # k-means for the lists, then the product quantizer on the residuals
        log.info("trained IVF%d,PQ%dx%d on %d vectors in %.1f s", c.nlist, c.pq_m, c.pq_nbits, len(sample),
                 time.perf_counter() - start)
        self._set_ivfpq(ivf, faiss.IndexFlatIP(self.dim))

    def _set_ivfpq(self, ivf: Any, vectors: Any) -> None:
        """Search through `ivf` (codes) and re-rank with `vectors` (full, IndexFlatIP; maybe memory-mapped)."""
        self._ivf, self._vectors = ivf, vectors
        self._ivf.nprobe = self.config.nprobe
        self._index = faiss.IndexRefine(ivf, vectors)  # add() feeds both; search re-ranks k_factor * k
        self._index.k_factor = float(self.config.refine_factor)

    def _rows(self, product_ids: list[str] | np.ndarray) -> np.ndarray:
        """faiss rows [N] of `product_ids`; KeyError names the ids not in the index."""
        product_ids = list(product_ids)
        missing = [p for p in product_ids if p not in self._row_of]
        if missing:
            shown = ", ".join(repr(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise KeyError(f"{len(missing)} product id(s) not in the index: {shown}")
        return np.array([self._row_of[p] for p in product_ids], dtype=np.int64)

    def vector(self, product_ids: list[str] | np.ndarray) -> np.ndarray:
        """The stored unit vectors [N, D] of `product_ids`; KeyError names the ids not in the index."""
        rows = self._rows(product_ids)
        if len(rows) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        store = self._vectors if self.config.kind == "ivfpq" else self._index  # IVF-PQ: the exact vectors
        return store.reconstruct_batch(rows)  # [N, D]

    @property
    def has_query_vectors(self) -> bool:
        return self._query_vectors is not None

    @property
    def query_dim(self) -> int | None:
        """Dq, the width of the products' frozen query vectors (None: the index has none)."""
        return None if self._query_vectors is None else int(self._query_vectors.shape[1])

    def query_vector(self, product_ids: list[str] | np.ndarray) -> np.ndarray:
        """The frozen query vectors [N, Dq] float32 of `product_ids` (what a product is as a closeup or
        home query; itemsage.product_query). KeyError names the ids not in the index; NoProductQueries
        when the index was built before products had query vectors."""
        if self._query_vectors is None:
            raise no_product_queries(f"index version {self.version or '(unsaved)'}")
        rows = self._rows(product_ids)
        return self._query_vectors[rows].astype(np.float32, copy=False)  # [N, Dq]: a copy (fancy indexing)

    def measure_recall(self, vectors: np.ndarray, k: int = RECALL_K) -> dict[str, Any]:
        """Recall@k of this index against exact search over `vectors` (the same rows it holds).

        Queries are `recall_sample` stored vectors plus Gaussian noise of half their length,
        renormalised: near the data like real queries, but not trivially their own nearest neighbour.
        """
        n = min(self.config.recall_sample, len(self))
        if n == 0 or self.config.kind == "flat":
            return {NEIGHBOUR_RECALL: 1.0, "recall_queries": n, "recall_reference": "exact"}
        rng = np.random.default_rng(self.config.seed)
        base = np.ascontiguousarray(vectors, dtype=np.float32)
        base = base / np.linalg.norm(base, axis=1, keepdims=True)  # as stored by add()
        queries = perturbed_queries(base, n, rng)  # [n, D]
        _, exact_rows = faiss.knn(queries, base, min(k, len(self)), metric=faiss.METRIC_INNER_PRODUCT)
        _, ann_rows = self._index.search(queries, min(k, len(self)))
        return {
            NEIGHBOUR_RECALL: neighbour_recall(ann_rows, exact_rows),
            "recall_queries": n,
            "recall_reference": "exact inner product on perturbed stored vectors",
        }

    def _check_matrix(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [N, {self.dim}], got {list(x.shape)}; "
                             f"this index holds {self.dim}-d vectors")
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
        if not np.all(np.isfinite(x)):
            bad = int(np.argmax(~np.all(np.isfinite(x), axis=1)))
            raise ValueError(f"{name} row {bad} holds NaN or inf; every value must be finite")
        return x


IVFPQ_MIN_VECTORS = 1000
IVFPQ_TRAIN_PER_LIST = 40


def ivfpq_parameters(n: int, dim: int, config: IndexConfig) -> IndexConfig:
    """`config` with IVF-PQ's size-dependent parameters filled in where they are 0 (the documented rule).

    nlist: the power of two nearest 4 * sqrt(N) (faiss suggests 4 to 16 sqrt(N) lists), at most N / 39 so
        k-means sees >= 39 points per list. 20k -> 512, 100k -> 1,024, 1M -> 4,096, 10M -> 16,384.
    pq_m: D / 2 sub-vectors (the largest divisor of D up to D / 2): two dims per 4-bit code, so a code is
        D / 4 bytes, 1/16 of the float32 vector (64 B at D = 256; faiss adds an 8 B id per entry).
    nprobe: nlist / 32 lists per query (128 at 1M). On the clustered benchmark data at 1M
        (benchmarks/bench_index.py) recall stopped rising past nlist / 128: the rest is margin for
        embeddings whose neighbours spread over more lists (the build's measured recall says; nprobe
        can change at load).
    """
    nlist = config.nlist or max(1, min(2 ** round(np.log2(4 * np.sqrt(n))), n // 39))
    pq_m = config.pq_m or max(d for d in range(1, max(1, dim // 2) + 1) if dim % d == 0)
    require(dim % pq_m == 0, f"index.pq_m ({pq_m}) must divide the vector width ({dim})")
    nprobe = min(config.nprobe or max(1, nlist // 32), nlist)
    return dataclasses.replace(config, nlist=nlist, pq_m=pq_m, nprobe=nprobe)


def perturbed_queries(vectors: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.5) -> np.ndarray:
    """`n` random rows of unit `vectors` [N, D] plus noise of relative length `noise`, renormalised."""
    rows = rng.choice(len(vectors), size=n, replace=False)
    q = vectors[rows].astype(np.float32)  # [n, D]
    g = rng.standard_normal(q.shape).astype(np.float32)
    q += noise * g / np.linalg.norm(g, axis=1, keepdims=True)
    return np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True))


def neighbour_recall(found: np.ndarray, exact: np.ndarray) -> float:
    """ANN quality: mean over rows of |found ∩ exact| / |exact|, for [Q, K] row (or id) arrays; -1 means
    none. Not evaluate.recall_at_k, which asks whether one engaged product is among the first k."""
    hits = 0
    total = 0
    for f, e in zip(found, exact):
        truth = {x for x in e.tolist() if x != -1}
        hits += len(truth.intersection(f.tolist()))
        total += len(truth)
    return hits / total if total else 1.0


# ---- version directories and the CURRENT pointer ------------------------------------------------


class VersionNotFound(ArtifactError):
    """No such index version (or none published): the service answers 404, not 409."""


class LocalVersions:
    """The index versions under a local INDEX_ROOT, as the service loads and reloads them.

    The seam between the service and an index backend: `resolve(None)` follows CURRENT,
    `resolve("v2")` names versions/v2 (ValueError for a bad name, VersionNotFound for a missing
    one); `load(target)` verifies and loads it. index_milvus.MilvusVersions does the same for Milvus.
    """

    def __init__(self, index_root: str | Path) -> None:
        self.root = Path(index_root)

    def __str__(self) -> str:
        return str(self.root)

    def resolve(self, version: str | None) -> Path:
        version_dir = version_path(self.root, version) if version else current_version(self.root)
        if not version_dir.is_dir():
            known = sorted(p.name for p in (self.root / VERSIONS_DIR).glob("*") if p.is_dir())
            shown = ", ".join(known[:20]) + (f" (and {len(known) - 20} more)" if len(known) > 20 else "")
            raise VersionNotFound(f"index version '{version_dir.name}' does not exist; known "
                                  f"versions: {shown or 'none'}")
        return version_dir

    def load(self, target: Path) -> ProductIndex:
        return ProductIndex.load(target)


def version_path(index_root: str | Path, version: str) -> Path:
    if not _VERSION_NAME.match(version):
        raise ValueError(f"index version name '{version}' must be letters, digits, '.', '_' or '-' "
                         "(no slashes), starting with a letter or digit")
    return Path(index_root) / VERSIONS_DIR / version


def new_version_name() -> str:
    return "v" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def publish(index_root: str | Path, version_dir: str | Path) -> None:
    """Point INDEX_ROOT/CURRENT at `version_dir` (verified first); readers see the old or the new."""
    index_root, version_dir = Path(index_root), Path(version_dir)
    expected = version_path(index_root, version_dir.name)
    if version_dir.resolve() != expected.resolve():
        raise ValueError(f"{version_dir} is not under {index_root / VERSIONS_DIR}; publish only a "
                         "version written into this index root")
    artifacts.verify_manifest(version_dir, kind="index")
    point_current(index_root, version_dir.name)
    log.info("published index version %s", version_dir.name)


def point_current(index_root: str | Path, version: str) -> None:
    """Replace INDEX_ROOT/CURRENT atomically with `version` (checked by the caller; see `publish`)."""
    version_path(index_root, version)  # the name's rules
    artifacts.atomic_write_text(Path(index_root) / CURRENT_FILE, version + "\n")


def current_version(index_root: str | Path) -> Path:
    """The version directory CURRENT points at."""
    index_root = Path(index_root)
    pointer = index_root / CURRENT_FILE
    if not pointer.is_file():
        raise VersionNotFound(f"{index_root} has no {CURRENT_FILE} file: no index version is published "
                            "there. Build one with `itemsage index EMBEDDINGS_DIR --out INDEX_ROOT`.")
    return version_path(index_root, pointer.read_text().strip())


def load_current(index_root: str | Path, *, ef_search: int | None = None) -> ProductIndex:
    """Load the version CURRENT points at (verified like `ProductIndex.load`)."""
    return ProductIndex.load(current_version(index_root), ef_search=ef_search)


# ---- from an embeddings directory (the `itemsage index` command) --------------------------------


def read_embeddings(embeddings_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(ids [N] str, vectors [N, D] float32, manifest) of a finished, verified embeddings directory."""
    embeddings_dir = Path(embeddings_dir)
    manifest = artifacts.verify_manifest(embeddings_dir, kind="embeddings")
    shards = manifest.get("shards") or sorted(name for name in manifest["files"] if name.endswith(".parquet"))
    dim = int(manifest["dim"])
    ids: list[np.ndarray] = []
    vectors: list[np.ndarray] = []
    for name in shards:
        table = pq.read_table(embeddings_dir / name, columns=[PRODUCT_ID, "vector"])
        ids.append(np.asarray(table.column(PRODUCT_ID).to_pylist(), dtype=object))
        flat = pa.chunked_array(
            [chunk.flatten() for chunk in table.column("vector").chunks], type=pa.float32()
        ).to_numpy()
        vectors.append(flat.reshape(len(table), dim))  # [rows, D]
    all_ids = np.concatenate(ids) if ids else np.empty(0, dtype=object)
    all_vectors = np.concatenate(vectors) if vectors else np.empty((0, dim), dtype=np.float32)
    if len(all_ids) != manifest.get("count"):
        raise ArtifactError(f"{embeddings_dir} holds {len(all_ids)} vectors, its manifest says "
                            f"{manifest.get('count')}; re-run `itemsage embed`.")
    return all_ids, np.ascontiguousarray(all_vectors, dtype=np.float32), manifest


def read_query_vectors(embeddings_dir: str | Path, manifest: dict[str, Any]) -> np.ndarray | None:
    """The products' frozen query vectors [N, Dq] float32 of a verified embeddings directory, in
    `read_embeddings`' row order; None when its shards predate them."""
    embeddings_dir = Path(embeddings_dir)
    entry = manifest.get(PRODUCT_QUERY)
    if not isinstance(entry, dict):
        return None
    dq = int(entry["dim"])
    shards = manifest.get("shards") or sorted(name for name in manifest["files"] if name.endswith(".parquet"))
    blocks = []
    for name in shards:
        if QUERY_VECTOR not in pq.read_schema(embeddings_dir / name).names:
            raise ArtifactError(f"{embeddings_dir}/{name} has no {QUERY_VECTOR} column but the manifest lists "
                                f"{PRODUCT_QUERY}; re-run `itemsage embed`.")
        column = pq.read_table(embeddings_dir / name, columns=[QUERY_VECTOR]).column(QUERY_VECTOR)
        flat = pa.chunked_array([chunk.flatten() for chunk in column.chunks], type=pa.float32()).to_numpy()
        blocks.append(flat.reshape(len(column), dq))  # [rows, Dq]
    return np.concatenate(blocks) if blocks else np.zeros((0, dq), np.float32)


def _finished_version(embeddings_dir: str | Path, index_root: str | Path, version_dir: Path,
                      config: IndexConfig, publish_it: bool) -> tuple[ProductIndex, Path]:
    """The existing `version_dir`, published, if it is what this build would write; else an error."""
    manifest = artifacts.read_manifest(version_dir, kind="index")
    embeddings = artifacts.fingerprint(embeddings_dir)
    same_input = manifest.get("inputs", {}).get("embeddings") == embeddings
    # threads: speed only; IVF-PQ sizes given as 0 ("from the catalog") were resolved in the saved config
    given = {k: v for k, v in dataclasses.asdict(config).items()
             if k != "threads" and not (k in ("nlist", "pq_m", "nprobe") and v == 0)}
    built = manifest.get("config", {})
    if not same_input or {k: built.get(k) for k in given} != given:
        what = "other embeddings" if not same_input else "other index options"
        raise ArtifactError(f"index version {version_dir} already exists, built from {what}; an index version is "
                            "never overwritten. Pass another --version name.")
    index = ProductIndex.load(version_dir)  # verifies every file against the manifest
    log.info("index version %s is already built from these embeddings; verified it", version_dir.name)
    if publish_it:
        publish(index_root, version_dir)
    return index, version_dir


def build_from_embeddings(
    embeddings_dir: str | Path,
    index_root: str | Path,
    config: IndexConfig | None = None,
    *,
    version: str | None = None,
    publish_it: bool = True,
) -> tuple[ProductIndex, Path]:
    """Index a finished embeddings directory into INDEX_ROOT/versions/<version>/ and publish it.

    Re-running with the name of a finished version built from the same embeddings and config (a run
    killed after its manifest, before CURRENT) verifies that version and publishes it, without a rebuild.
    """
    config = config or IndexConfig()
    version_dir = version_path(index_root, version or new_version_name())
    if (version_dir / artifacts.MANIFEST).exists():
        return _finished_version(embeddings_dir, index_root, version_dir, config, publish_it)
    ids, vectors, emb_manifest = read_embeddings(embeddings_dir)
    require(len(ids) > 0, f"{embeddings_dir} holds no embeddings; nothing to index")
    query_vectors = read_query_vectors(embeddings_dir, emb_manifest)
    index = ProductIndex.build(ids, vectors, **dataclasses.asdict(config), query_vectors=query_vectors,
                               product_query=emb_manifest.get(PRODUCT_QUERY) if query_vectors is not None else None)
    inputs = {"embeddings": artifacts.fingerprint(embeddings_dir)}
    model_fp = emb_manifest.get("inputs", {}).get("model")
    if model_fp:
        inputs["model"] = model_fp
    index.save(version_dir, inputs=inputs)
    if publish_it:
        publish(index_root, version_dir)
    return index, version_dir
