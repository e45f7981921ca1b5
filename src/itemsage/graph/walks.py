"""PinSage's importance neighbourhoods: each product's top-T most visited products under random walks
with restart on the graph (edges.py), with their visit counts.

From every product with an edge, `walks_per_node` walks of `walk_length` steps; a step returns to the
start with probability `restart`, else moves to a neighbour drawn with probability proportional to the
edge weight. The `top_t` most visited other products (ties: the lower row) are the neighbourhood.

- The walks of `walk_chunk` start products advance together as arrays (a Python loop over steps and
  chunks, none over products or walks). A neighbour is drawn by inverse CDF over its row's cumulative
  weights, started from a guide table of 2 x degree slots per row (Chen & Asau 1974): O(1) expected
  per draw, whatever the degree.
- A step from the start product itself is not sampled into the counts: its landing is replaced by its
  expectation, (1 - restart) x the start's transition row per step begun on the start (the first hop
  Rao-Blackwellised). The strongest neighbours are mostly one hop away, so the top of every list is
  exact; hops >= 2 are sampled.
- Every draw is a counter-based hash (SplitMix64) of (seed, start product, walk, step): a product's
  neighbourhood depends on the seed and the graph only, not on `walk_chunk`, on which products are
  walked with it, or on the order of anything.

Axes: N products, W walkers of a chunk (chunk x walks_per_node), L steps, T neighbours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from itemsage.graph.config import GraphConfig
from itemsage.graph.edges import cap_degree

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014) of uint64 counters: well-mixed uint64."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, counter: np.ndarray) -> np.ndarray:
    """[K] float64 uniform in [0, 1), one per uint64 counter: the top 53 bits of
    splitmix64(splitmix64(seed) + counter x golden ratio), SplitMix64's own sequence for a stream."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as intended
        key = splitmix64(np.array([seed], np.uint64))[0]
        z = splitmix64(key + counter.astype(np.uint64) * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Sampler:
    """Weighted neighbour draws for many walkers at once, over a CSR matrix with positive entries."""

    def __init__(self, m: sp.csr_matrix) -> None:
        indptr = m.indptr.astype(np.int64)
        deg = np.diff(indptr)
        self.indices, self.deg = m.indices, deg
        index = np.int32 if m.nnz < 2**31 else np.int64  # the guide table's entries: positions in `cum`
        row = np.repeat(np.arange(m.shape[0]), deg)
        cum = np.cumsum(m.data.astype(np.float64))
        before = np.concatenate([[0.0], cum])
        base, total = before[indptr[:-1]], before[indptr[1:]] - before[indptr[:-1]]
        cum = (cum - base[row]) / total[row]  # each row's CDF
        cum[indptr[1:][deg > 0] - 1] = 1.0  # exact: a draw in [0, 1) always ends inside its row
        self.cum = cum
        # guide[gptr[r] + j] = the first entry k of row r with cum[k] > j / S_r, S_r = 2 deg_r slots
        slots = 2 * deg
        self.gptr = np.concatenate([[0], np.cumsum(slots)])
        prev = np.concatenate([[0.0], cum[:-1]])
        prev[indptr[:-1][deg > 0]] = 0.0
        s_row = slots[row].astype(np.float64)
        cover = (np.ceil(cum * s_row) - np.ceil(prev * s_row)).astype(np.int64)  # slots whose first entry is k
        self.guide = np.repeat(np.arange(len(cum), dtype=index), cover)

    def step(self, cur: np.ndarray, u: np.ndarray) -> np.ndarray:
        """cur [W] rows with degree > 0, u [W] uniform in [0, 1) -> [W] the drawn neighbours' rows."""
        j = (u * (2 * self.deg[cur])).astype(np.int64)
        k = self.guide[self.gptr[cur] + j].astype(np.int64)
        todo = np.flatnonzero(self.cum[k] <= u)
        while len(todo):  # a few entries at most: the guide slot starts at or before the answer
            k[todo] += 1
            todo = todo[self.cum[k[todo]] <= u[todo]]
        return self.indices[k]


@dataclass
class Neighbours:
    """Importance neighbourhoods: row i holds product i's top-T visited products and their visit counts
    (the first hop by its expectation, so counts are not whole numbers)."""

    matrix: sp.csr_matrix  # [N, N] float32, at most top_t entries per row, never the product itself

    def of(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour rows [T], visit counts [T]) of one product, most visited first (ties: lower row)."""
        a, b = self.matrix.indptr[row], self.matrix.indptr[row + 1]
        cols, counts = self.matrix.indices[a:b], self.matrix.data[a:b]
        order = np.lexsort((cols, -counts))
        return cols[order], counts[order]


def _walk_chunk(adjacency: sp.csr_matrix, sampler: Sampler, rowsum: np.ndarray, starts: np.ndarray,
                cfg: GraphConfig) -> sp.coo_matrix:
    """The top-T visit counts of the walks from `starts` [C]: [C, N] COO, row c = starts[c]."""
    n, c, r, alpha = adjacency.shape[0], len(starts), cfg.walks_per_node, cfg.restart
    home = np.repeat(np.arange(c, dtype=np.int64), r)  # [W] walker -> its start's position in the chunk
    origin = starts[home]
    walk = np.tile(np.arange(r, dtype=np.uint64), c)  # [W] the walker's number among its start's walks
    counter = (origin.astype(np.uint64) * np.uint64(r) + walk) * np.uint64(cfg.walk_length)  # + step
    cur = origin.copy()
    at_start = np.zeros(c, np.float64)  # steps begun on the start, per start
    visits = np.empty((cfg.walk_length, len(cur)), np.int64)  # [L, W]
    for step in range(cfg.walk_length):
        u = uniforms(cfg.seed, counter + np.uint64(step))
        on = cur == origin
        at_start += np.bincount(home[on], minlength=c)
        go = u >= alpha  # else: restart
        nxt = origin.copy()
        nxt[go] = sampler.step(cur[go], (u[go] - alpha) / (1.0 - alpha))  # the same draw, uniform again
        visits[step] = np.where(on, origin, nxt)  # a first hop is counted by its expectation, below
        cur = nxt
    hops = visits != origin[None, :]
    sampled = sp.csr_matrix((np.ones(int(hops.sum()), np.float32),
                             (np.broadcast_to(home, visits.shape)[hops], visits[hops])), shape=(c, n))
    # the first hops' expectation: steps begun on the start x (1 - restart) x the start's transition row
    first = adjacency[starts]
    first = sp.csr_matrix(first.multiply((at_start * (1.0 - alpha) / rowsum[starts])[:, None]), dtype=np.float32)
    counts = (sampled + first).tocsr()
    counts.data[counts.indices == np.repeat(starts, np.diff(counts.indptr))] = 0.0  # never the start itself
    counts.eliminate_zeros()
    return cap_degree(counts, cfg.top_t).tocoo()


def neighbourhoods(adjacency: sp.csr_matrix, cfg: GraphConfig,
                   advance: Callable[[int], None] | None = None) -> Neighbours:
    """Each product's top-T neighbours by visit count of random walks with restart (module doc).

    adjacency: [N, N] non-negative weights, every product that has an out-edge is a start; a product
    reached by an edge must have an out-edge (edges.py's graphs: symmetric before the cap, and the cap
    keeps at least one edge). `advance(k)`: called after each chunk with its number of start products."""
    n = adjacency.shape[0]
    sampler = Sampler(adjacency)
    rowsum = np.asarray(adjacency.sum(axis=1), dtype=np.float64).ravel()
    starts_all = np.flatnonzero(sampler.deg > 0)
    rows, cols, counts = [np.empty(0, np.int32)], [np.empty(0, np.int32)], [np.empty(0, np.float32)]
    for lo in range(0, len(starts_all), cfg.walk_chunk):
        starts = starts_all[lo:lo + cfg.walk_chunk]
        top = _walk_chunk(adjacency, sampler, rowsum, starts, cfg)
        rows.append(starts[top.row].astype(np.int32))
        cols.append(top.col.astype(np.int32))
        counts.append(top.data.astype(np.float32))
        if advance is not None:
            advance(len(starts))
    matrix = sp.csr_matrix((np.concatenate(counts), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    matrix.sort_indices()
    return Neighbours(matrix)
