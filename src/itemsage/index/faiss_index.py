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
                                  manifest.json  kind 'index': config, count, dim, inputs, recall, tuning
    INDEX_ROOT/CURRENT                           text: the served version's name, replaced atomically

                                  attributes.arrow  the filterable columns (index/attributes.py), when given
`load` checks every file's sha256 against the manifest, then the dimension and count, so a torn or
corrupted index is refused, never served. Every build tunes ef / nprobe to a recall@10 target against
exact search, unfiltered and under filters (index/tuning.py: manifest `search_tuning`), and stores
the recall: a speed figure without its recall means nothing. `search` takes a filter and ids to
leave out, applied inside the search (index/planner.py).

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
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.config import from_dict, require
from itemsage.index.attributes import ATTRIBUTES_FILE, AttributeStore
from itemsage.index.config import (
    IVFPQ_MIN_VECTORS,
    IVFPQ_TRAIN_PER_LIST,
    NEIGHBOUR_RECALL,
    RECALL_K,
    IndexConfig,
    default_nprobe,
    ivfpq_parameters,
    stats_from_manifest,
)
from itemsage.index.filters import FilterMasks
from itemsage.index.planner import FaissSearch, RowMask, SearchTuning, plan
from itemsage.index.query_vectors import (
    _check_query_vectors,
    load_query_vectors,
    no_product_queries,
    save_query_vectors,
)
from itemsage.index.tuning import tune, unit_rows
from itemsage.schema import PRODUCT_ID, PRODUCT_QUERY

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.faiss"
IDS_FILE = "ids.parquet"
QUERY_VECTORS_FILE = "query_vectors.safetensors"
DEFAULT_EF_SEARCH = 128  # HNSW's unfiltered ef before tuning (and of versions built before it)


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
        self._faiss: FaissSearch | None = None  # the faiss calls of searches (_search)
        if self.config.kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(self.dim, self.config.m, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = self.config.ef_construction
            self._index.hnsw.efSearch = self.config.ef_search or DEFAULT_EF_SEARCH
        elif self.config.kind == "flat":
            self._index = faiss.IndexFlatIP(self.dim)
        else:
            self._index = None  # IVF-PQ must see data before it exists: see _train_ivfpq
        self._ids, self._row_of = np.empty(0, dtype=object), {}  # [N] product_id of faiss row n; id -> row
        self.manifest: dict[str, Any] = {}  # set by save/load
        self.stats: dict[str, Any] = {}  # build time and measured recall, set by build/load
        self.version: str | None = None  # the version directory's name once saved or loaded
        self._query_vectors: np.ndarray | None = None  # [N, Dq] frozen query vectors in row order, if any
        self.product_query: dict[str, Any] | None = None  # {"source", "fields", "dim"} of those
        self.tuning = SearchTuning.untuned(self.config.kind, self.config.ef_search or DEFAULT_EF_SEARCH,
                                           self.config.nprobe or 1)  # set by build (measured) and load
        self.set_attributes(None)  # .attributes: the filterable columns; .filters: filter -> RowMask, cached

    # ---- the four verbs -------------------------------------------------------------------------

    @classmethod
    def build(
        cls, ids: np.ndarray | list[str], vectors: np.ndarray, kind: str = "hnsw", *,
        query_vectors: np.ndarray | None = None, product_query: dict[str, Any] | None = None,
        attributes: pa.Table | None = None, **options: Any
    ) -> ProductIndex:
        """A new index holding `vectors` [N, D] under `ids` [N]; tunes its searches to `recall_target`
        and measures its recall@10 (see `stats`, `tuning`; index/tuning.py).
        `query_vectors` [N, Dq]: the products' frozen query vectors (with `product_query`, the dataset
        manifest's entry describing them), kept beside the index for `query_vector`.
        `attributes`: the products' filterable columns, one row per id in `ids`' order
        (index/attributes.py); filters of `search` select on them."""
        config = from_dict(IndexConfig, {"kind": kind, **options}, section="index")
        vectors = np.asarray(vectors)
        require(vectors.ndim == 2, f"vectors must be a 2-D array [N, D], got shape {vectors.shape}")
        index = cls(vectors.shape[1], config)
        index.product_query = product_query
        start = time.perf_counter()
        index.add(ids, vectors, query_vectors)
        index.stats = {"build_seconds": round(time.perf_counter() - start, 3)}
        if attributes is not None:
            require(attributes.num_rows == len(index), f"attributes hold {attributes.num_rows} rows for "
                    f"{len(index)} vectors; give one row per id, in the ids' order")
            index.set_attributes(AttributeStore.from_table(attributes, attributes.column_names))
        fixed = config.ef_search if config.kind == "hnsw" else config.nprobe
        index.tuning, recall = tune(index._search(), unit_rows(vectors), target=config.recall_target,
                                    fixed=fixed, evaluation_queries=config.recall_sample, seed=config.seed)
        index._set_unfiltered(index.tuning)
        index.stats.update(recall)
        index.stats["tuning_seconds"] = round(time.perf_counter() - start - index.stats["build_seconds"], 3)
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

    def search(self, queries: np.ndarray, k: int, *, filter: Any = None,
               exclude: Iterable[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` products per query row among those that pass `filter` and are not in `exclude`.

        queries [Q, D] -> (ids [Q, K] str (object array), scores [Q, K] float32), best first; when fewer
        than k products pass, the tail is padded with '' and -inf. `filter`: the filter language of
        index/filters.py over the version's attributes (FilterError when it does not fit them);
        `exclude`: product ids left out (ids not in the index are ignored). Both are applied inside
        the search (planner.py), so k results come back whenever k products pass.
        """
        queries = self._check_matrix(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        mask = self.mask(filter, exclude)
        scores, rows = self.search_rows(np.ascontiguousarray(queries, dtype=np.float32), int(k), mask)
        found = rows >= 0  # faiss marks missing results with -1
        ids = np.full(rows.shape, "", dtype=object)
        ids[found] = self._ids[rows[found]]
        return ids, np.where(found, scores, np.float32(-np.inf)).astype(np.float32)

    def search_one(self, query: np.ndarray, k: int, *, filter: Any = None,
                   exclude: Iterable[str] = ()) -> tuple[list[str], list[float]]:
        """`search` of one query [D] without its checks and padding: the (up to) k products found, as
        (ids, scores) lists, best first; the rows `search` returns for it, less the '' / -inf padding.

        For a caller whose query is already a finite float32 vector of width `dim` and whose `k` is a
        positive int (the service's adapters give that); `search` checks both.
        """
        scores, rows = self.search_rows(query.reshape(1, -1), k, self.mask(filter, exclude))
        found = rows[0] >= 0
        return self._ids[rows[0][found]].tolist(), scores[0][found].tolist()

    def mask(self, filter: Any = None, exclude: Iterable[str] = ()) -> RowMask | None:
        """The rows a search may return: those passing `filter`, less `exclude`'s; None: every row."""
        mask = self.filters.mask(filter)
        rows = [self._row_of[p] for p in exclude if p in self._row_of]
        if rows:
            mask = (mask or RowMask.all(len(self))).without(rows)
        return mask

    def search_rows(self, queries: np.ndarray, k: int, mask: RowMask | None) -> tuple[np.ndarray, np.ndarray]:
        """The search itself, over faiss rows: queries [Q, D] float32 -> (scores [Q, k], rows [Q, k]),
        -1 where fewer than k rows pass. No mask: one ANN (or flat) call at the tuned unfiltered value;
        a mask: per query, the plan of planner.py (exact over the passing rows, or ANN with the mask
        inside the search at the tuned ef / nprobe)."""
        n = len(self)
        if n == 0 or len(queries) == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        if mask is None:
            kk = min(k, n)
            scores, rows = self._index.search(queries, kk)  # [Q, kk] at the index's own ef / nprobe
        else:
            search = self._search()
            out = [plan(search, self.tuning, queries[i : i + 1], k, mask)[:2] for i in range(len(queries))]
            scores, rows = (out[0][0][None], out[0][1][None]) if len(out) == 1 else map(np.stack, zip(*out))
        if rows.shape[1] < k:  # fewer rows than k: pad
            scores = np.pad(scores, ((0, 0), (0, k - rows.shape[1])), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, k - rows.shape[1])), constant_values=-1)
        return scores, rows

    def _search(self) -> FaissSearch:
        """The faiss calls of this index (planner.FaissSearch): ANN, exact over rows, the probe; made
        once per size of the index (an add makes a new one)."""
        if self._faiss is None or self._faiss.n != len(self):
            exact = {"hnsw": lambda: faiss.downcast_index(self._index.storage), "flat": lambda: self._index,
                     "ivfpq": lambda: self._vectors}[self.config.kind]()
            self._faiss = FaissSearch(self.config.kind, self._index, exact, self._ivf)
        return self._faiss

    def _set_unfiltered(self, tuning: SearchTuning) -> None:
        """Search unfiltered at the tuned value (a value fixed in the config wins; tuning used it)."""
        if tuning.values:
            self._search().set_unfiltered(int(tuning.values[0]))

    def set_attributes(self, store: AttributeStore | None) -> None:
        """The filterable columns of the rows (None: none); `len(store)` must be the index's."""
        if store is not None and store.n != len(self):
            raise ValueError(f"the attributes hold {store.n} rows, the index {len(self)}")
        self.attributes = store
        self.filters = FilterMasks(store)

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
        queries: dict[str, Any] = {"search_tuning": self.tuning.to_dict()}
        if self.attributes is not None:
            queries["attributes"] = self.attributes.write(version_dir / ATTRIBUTES_FILE)
            files.append(ATTRIBUTES_FILE)
        if self._query_vectors is not None:
            save_query_vectors(version_dir / QUERY_VECTORS_FILE, self._query_vectors)
            files.append(QUERY_VECTORS_FILE)
            queries[PRODUCT_QUERY] = {**(self.product_query or {}), "dim": int(self._query_vectors.shape[1])}
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
        attributes = None
        if ATTRIBUTES_FILE in manifest["files"]:
            attributes = AttributeStore.open(version_dir / ATTRIBUTES_FILE)
            if attributes.n != count or attributes.kinds != manifest.get("attributes", {}):
                problems.append(f"{ATTRIBUTES_FILE} holds {attributes.n} rows of {attributes.kinds}, the manifest "
                                f"says {count} of {manifest.get('attributes')}")
        if problems:
            raise ArtifactError(f"refusing to load the index in {version_dir}: " + "; ".join(problems)
                                + ". Rebuild it with `itemsage index`.")
        index = cls(dim, config)
        if config.kind == "ivfpq":
            index._set_ivfpq(raw, vectors)
            index._mapped = True
        else:
            index._index, index._faiss = raw, None
        if "search_tuning" in manifest:
            index.tuning = SearchTuning.from_dict(manifest["search_tuning"])
        else:  # built before tuning: its configured value
            index.tuning = SearchTuning.untuned(config.kind, config.ef_search, config.nprobe or index.nprobe or 1)
        index._set_unfiltered(index.tuning)
        if ef_search is not None and config.kind == "hnsw":  # an explicit value at load wins
            raw.hnsw.efSearch = ef_search
        if nprobe is not None and config.kind == "ivfpq":
            index._ivf.nprobe = nprobe
        index._ids = np.asarray(ids.to_pylist(), dtype=object)
        index._row_of = {pid: row for row, pid in enumerate(index._ids)}
        if len(index._row_of) != count:
            raise ArtifactError(f"refusing to load the index in {version_dir}: ids.parquet has duplicate "
                                "product ids. Rebuild it with `itemsage index`.")
        index.manifest = manifest
        index._query_vectors = query_vectors
        index.set_attributes(attributes)
        index.product_query = manifest.get(PRODUCT_QUERY) if query_vectors is not None else None
        index.stats = stats_from_manifest(manifest, ("build_seconds", "tuning_seconds", "recall_queries", "index_bytes",
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
    def ef_search(self, value: int) -> None:  # the unfiltered value (filtered searches: `tuning`)
        require(self.config.kind == "hnsw" and int(value) >= 1, f"ef_search (HNSW only) must be >= 1, got {value}")
        self._index.hnsw.efSearch = int(value)

    @property
    def nprobe(self) -> int | None:
        return int(self._ivf.nprobe) if self._ivf is not None else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        require(self._ivf is not None and int(value) >= 1, f"nprobe (trained IVF-PQ only) must be >= 1, got {value}")
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
        self._ivf, self._vectors, self._faiss = ivf, vectors, None
        self._ivf.nprobe = self.config.nprobe or default_nprobe(self.config.nlist)
        if not self.tuning.recall:  # not tuned (yet): the value searched unfiltered
            self.tuning = SearchTuning.untuned("ivfpq", 0, int(self._ivf.nprobe))
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
        home query; itemsage.data.product_query). KeyError names the ids not in the index; NoProductQueries
        when the index was built before products had query vectors."""
        if self._query_vectors is None:
            raise no_product_queries(f"index version {self.version or '(unsaved)'}", self.manifest)
        rows = self._rows(product_ids)
        return self._query_vectors[rows].astype(np.float32, copy=False)  # [N, Dq]: a copy (fancy indexing)

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
