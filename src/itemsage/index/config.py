"""How an index is built and searched (`IndexConfig`, stored in each version's manifest) and the rule
that sizes IVF-PQ from the catalog (`ivfpq_parameters`; docs/ARCHITECTURE.md has the table).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from itemsage.config import require

log = logging.getLogger(__name__)


KINDS = ("hnsw", "flat", "ivfpq")
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


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How the index is built and searched. Stored in the manifest; `ef_search` can change at load.

    kind: 'hnsw' (approximate, fast), 'ivfpq' (approximate, compressed: tens of millions of vectors
        on one machine) or 'flat' (exact; small catalogs and the evaluation reference).
    m: HNSW links per node (memory ~ 2*m*4 bytes per vector on top of the vector itself).
    ef_construction: HNSW candidate list while building (higher = better graph, slower build).
    ef_search: HNSW candidate list of an unfiltered search (higher = better recall, slower queries);
        0 (default) = the smallest value that reaches `recall_target`, measured by the build
        (index/tuning.py, which also tunes the values for filtered searches).
    nlist, pq_m, pq_nbits: IVF-PQ lists, sub-quantizers and bits per sub-quantizer code; 0 = chosen
        from the catalog size and width (`ivfpq_parameters`).
    nprobe: IVF-PQ lists probed by an unfiltered search; 0 (default) = tuned like ef_search.
    refine_factor: IVF-PQ re-ranks the `refine_factor * k` best candidates by the codes with the
        full vectors (1 = only re-score the k found, exactly).
    recall_target: the recall@10 against exact search that tuning reaches (on held-out perturbed
        catalog vectors, with a margin), unfiltered and under filters; a version that cannot reach it
        unfiltered is refused.
    recall_sample: queries used to measure recall@10 against exact search at build time.
    threads: faiss OpenMP threads; 0 keeps faiss's default (all cores).
    """

    kind: str = "hnsw"
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 0
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 4
    nprobe: int = 0
    refine_factor: int = 20
    recall_target: float = 0.95
    recall_sample: int = 1000
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.kind in KINDS, f"index.kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        require(self.m >= 2, f"index.m (HNSW links per node) must be >= 2, got {self.m}")
        require(self.ef_construction >= 1, f"index.ef_construction must be >= 1, got {self.ef_construction}")
        require(self.ef_search >= 0, f"index.ef_search must be >= 0 (0 = tuned), got {self.ef_search}")
        require(self.nlist >= 0, f"index.nlist must be >= 0 (0 = from the catalog size), got {self.nlist}")
        require(self.pq_m >= 0, f"index.pq_m must be >= 0 (0 = from the vector width), got {self.pq_m}")
        require(self.pq_nbits in (4, 8), f"index.pq_nbits must be 4 (fast-scan) or 8, got {self.pq_nbits}")
        require(self.nprobe >= 0, f"index.nprobe must be >= 0 (0 = tuned), got {self.nprobe}")
        require(self.refine_factor >= 1, f"index.refine_factor must be >= 1, got {self.refine_factor}")
        require(0 < self.recall_target <= 1, f"index.recall_target must be in (0, 1], got {self.recall_target}")
        require(self.recall_sample >= 0, f"index.recall_sample must be >= 0, got {self.recall_sample}")
        require(self.threads >= 0, f"index.threads must be >= 0 (0 = all cores), got {self.threads}")


IVFPQ_MIN_VECTORS = 1000
IVFPQ_TRAIN_PER_LIST = 40


def ivfpq_parameters(n: int, dim: int, config: IndexConfig) -> IndexConfig:
    """`config` with IVF-PQ's size-dependent parameters filled in where they are 0 (the documented rule).

    nlist: the power of two nearest 4 * sqrt(N) (faiss suggests 4 to 16 sqrt(N) lists), at most N / 39 so
        k-means sees >= 39 points per list. 20k -> 512, 100k -> 1,024, 1M -> 4,096, 10M -> 16,384.
    pq_m: D / 2 sub-vectors (the largest divisor of D up to D / 2): two dims per 4-bit code, so a code is
        D / 4 bytes, 1/16 of the float32 vector (64 B at D = 256; faiss adds an 8 B id per entry).
    nprobe: left as given: 0 means tuned at build (index/tuning.py) to reach the recall target; before
        tuning, searches probe nlist / 32 lists (`default_nprobe`).
    """
    nlist = config.nlist or max(1, min(2 ** round(np.log2(4 * np.sqrt(n))), n // 39))
    pq_m = config.pq_m or max(d for d in range(1, max(1, dim // 2) + 1) if dim % d == 0)
    require(dim % pq_m == 0, f"index.pq_m ({pq_m}) must divide the vector width ({dim})")
    return dataclasses.replace(config, nlist=nlist, pq_m=pq_m, nprobe=min(config.nprobe, nlist))


def default_nprobe(nlist: int) -> int:
    return max(1, nlist // 32)
