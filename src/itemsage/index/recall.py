"""An ANN index's recall@10 against exact search over its own vectors, measured on perturbed catalog
vectors (queries near the catalog, like real ones): every build records it in its manifest.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


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
