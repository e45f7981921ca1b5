"""The ceilings' ranks: for every pair of a window and every kind of knowledge, how many products
score above the engaged product and how many tie with it, counted without scoring the catalog.

The kinds (what a ranking may know; ceiling_model.py turns that into scores):
- `oracle`: every latent of the row: the user, the query's interest cluster, the search target;
  the products' true popularity.
- `observable`: what the query shows (search: its text, i.e. the template and the target's group;
  closeup: the viewed product; home: the medoid product), the generator's structure and the
  products' true popularity. The user and cluster are a posterior over the shop's users, weighted as
  queries draw them: search and closeup by their probability of drawing the target / viewed
  product; home over the (user, cluster) pairs whose medoid is the query product.
- `features`: as observable with every product's popularity equal (what content alone tells).
- `train_counts`: as observable with popularity estimated by train-window engagements + 1.

Counting: a batch's exact scores on its local products are compared with the engaged product's score
directly; elsewhere the score is nondecreasing in the product's weight within its funnel group, so
"above" and "tied" become weight thresholds (ceiling_model.inclusion_inverse), counted per group by
binary search over the products sorted by (group, weight) (`DenseCounter`), less the local products'
dense scores (compared directly); the dense parts of all a day's batches are counted in one pass
(`count_dense`). Scores within a relative 1e-10 tie (one probability summed in another order).
Closeup pairs leave their query product out of the ranking, as the evaluation does; a pair whose
engaged product is that product is unreachable (rank N).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from itemsage.evaluate.ceiling_data import WindowRows
from itemsage.evaluate.ceiling_model import (
    CART,
    CHECKOUT,
    CLICK,
    CLOSEUP,
    HOME,
    SAVE,
    SEARCH,
    AnchorPosterior,
    Batch,
    Day,
    Population,
    Products,
    closeup_batch,
    group_factors,
    home_observable_batch,
    home_oracle_batch,
    inclusion,
    inclusion_inverse,
    search_batch,
)

log = logging.getLogger(__name__)

KINDS = ("oracle", "observable", "features", "train_counts")
TRAIN_COUNT_ALPHA = 1.0  # train_counts' popularity: train-window engagements + this
RTOL = 1e-10  # scores this close (relatively) tie: one probability summed in another order
_GROUPING = {CLICK: 0, SAVE: 1, CART: 2, CHECKOUT: 2}  # engagements whose funnel groups products alike


class DenseCounter:
    """Products sorted by (group, weight): per (row, group), how many have a weight above a threshold."""

    def __init__(self, w: np.ndarray, group: np.ndarray, n_groups: int) -> None:
        self.values = np.unique(w)  # the distinct weights, sorted
        self.span = len(self.values) + 1
        self.keys = np.sort(group * self.span + np.searchsorted(self.values, w))  # group, then weight rank
        self.ends = np.searchsorted(self.keys, (np.arange(n_groups) + 1) * self.span)

    def above(self, threshold: np.ndarray, strict: bool) -> np.ndarray:
        """[P, G] thresholds -> [P, G] products of each group with weight > (strict) or >= threshold."""
        first = np.searchsorted(self.values, threshold, side="right" if strict else "left")  # rank from which
        g = np.arange(threshold.shape[1])[None, :]
        return self.ends[g] - np.searchsorted(self.keys, g * self.span + first)


def _thresholds(y: np.ndarray, factor: np.ndarray, beta: np.ndarray, strict: bool) -> np.ndarray:
    """Weights t [P, G] with {w: inclusion(beta w) factor > y} = {w > t} (strict), or {w: ... >= y} =
    {w >= t}; y, beta [P], factor [P, G] >= 0."""
    y, beta = y[:, None], beta[:, None]
    slope = (beta * factor) > 0  # else the score is 0 for every weight
    with np.errstate(divide="ignore", invalid="ignore"):
        t = inclusion_inverse(np.where(slope & (y > 0), y / np.where(factor > 0, factor, 1.0), 0.0)) / beta
    if strict:
        return np.where(y < 0, -np.inf, np.where(~slope, np.inf, np.where(y == 0, 0.0, t)))
    return np.where(y <= 0, -np.inf, np.where(~slope, np.inf, t))


@dataclass
class DensePart:
    """Pairs whose products outside their batch's `idx` are still to be counted (DenseCounter):
    their rows in the window [P], score bounds hi, lo [P], funnel factors per group [P, G], beta [P]."""

    pairs: np.ndarray
    hi: np.ndarray
    lo: np.ndarray
    factor: np.ndarray
    beta: np.ndarray


def count_local(batch: Batch, e: int, slots: np.ndarray, positive: np.ndarray, exclude: np.ndarray,
                day: Day) -> tuple[np.ndarray, np.ndarray, DensePart | None]:
    """(greater, tied) [P] of pairs ranked by their query's scores for engagement e, counted on the
    batch's local products, and what is left to count elsewhere (None: every other product scores 0,
    counted here). `slots` [P] their query in the batch, `positive` [P] the engaged product,
    `exclude` [P] a product left out (-1: none; a pair whose engaged product it is gets rank N from the
    caller). The rest is counted over all products by weight, so the local products' dense scores are
    subtracted here (`DensePart.pairs` is filled by the caller)."""
    P = day.products
    idx, rows = batch.idx, np.arange(len(slots))
    S = batch.local(e)[slots]  # [P, L]
    beta = batch.beta[slots]
    dense = batch.tables is not None and bool(np.any(beta > 0))
    if dense:
        F = np.broadcast_to(group_factors(e, {n: v[slots] for n, v in batch.tables.items()}, len(slots)),
                            (len(slots), P.n_groups[e]))  # [P, G]
        D = inclusion(beta[:, None] * day.w[idx][None, :]) * F[:, P.group[e][idx]]  # [P, L] the dense part here

    def score(j: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(idx, j), len(idx) - 1)
        inside = idx[at] == j
        if not dense:
            return np.where(inside, S[rows, at], 0.0)
        return np.where(inside, S[rows, at], inclusion(beta * day.w[j]) * F[rows, P.group[e][j]])

    s = score(positive)
    hi, lo = s + np.abs(s) * RTOL, s - np.abs(s) * RTOL
    greater = (S > hi[:, None]).sum(1)
    tied = (S >= lo[:, None]).sum(1) - greater - 1  # less the engaged product itself
    rest = None
    if dense:  # all products by their dense score are counted later: less the local ones here
        local_above = (D > hi[:, None]).sum(1)
        greater -= local_above
        tied -= (D >= lo[:, None]).sum(1) - local_above
        rest = DensePart(np.zeros(0, np.int64), hi, lo, np.ascontiguousarray(F), beta)
    else:  # every other product scores 0
        outside = P.n - len(idx)
        greater += outside * (hi < 0)
        tied += outside * ((lo <= 0) & (hi >= 0))
    has = (exclude >= 0) & (exclude != positive)
    if has.any():  # the product left out
        sx = score(np.where(has, exclude, positive))
        greater -= has & (sx > hi)
        tied -= has & (sx >= lo) & (sx <= hi)
    return greater, tied, rest


def count_dense(parts: list[DensePart], counter: DenseCounter) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pairs, greater, tied) of the dense parts of pairs (one engagement grouping), counted at once."""
    pairs = np.concatenate([p.pairs for p in parts])
    hi, lo, beta = (np.concatenate([getattr(p, n) for p in parts]) for n in ("hi", "lo", "beta"))
    factor = np.concatenate([p.factor for p in parts])
    above = counter.above(_thresholds(hi, factor, beta, strict=True), strict=True).sum(1)
    at_least = counter.above(_thresholds(lo, factor, beta, strict=False), strict=False).sum(1)
    return pairs, above, at_least - above


def _batches(batch_of: np.ndarray, key_of: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Group pairs [P] by batch, then by key: yields per batch (its pairs' positions [Pb], their key's
    slot among the batch's keys [Pb], one pair position per key in slot order [B])."""
    order = np.lexsort((key_of, batch_of))
    b, k = batch_of[order], key_of[order]
    new_key = np.r_[True, (k[1:] != k[:-1]) | (b[1:] != b[:-1])]
    slot = np.cumsum(new_key) - 1
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(order)]):
        pairs = order[start:end]
        yield pairs, slot[start:end] - slot[start], pairs[new_key[start:end]]


def _plan(surface: int, oracle: bool, rows: WindowRows, sel: np.ndarray, P: Products, pop: Population,
          day: Day, post: AnchorPosterior | None) -> tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], Batch]]:
    """(batch [P], key [P], build(one pair per key -> Batch)) for the pairs `sel` of one surface and day:
    pairs of one key share their scores, keys of one batch their local products."""
    a, u, k = rows.anchor[sel], rows.user[sel], rows.cluster[sel]
    if surface == SEARCH:
        t = rows.template[sel]
        group = P.tkey[t, a]
        if oracle:
            return P.cat[a], rows.query[sel], lambda f: search_batch(day, pop, None, int(P.cat[a[f[0]]]), t[f],
                                                                     group[f], a[f], u[f])
        return P.cat[a], P.t_offset[t] + group, lambda f: search_batch(day, pop, post, int(P.cat[a[f[0]]]), t[f],
                                                                       group[f], a[f], u[f])
    if surface == CLOSEUP:
        key = a * pop.U + u if oracle else a
        return P.cat[a], key, lambda f: closeup_batch(day, pop, post, int(P.cat[a[f[0]]]), a[f], u[f])
    if oracle:
        return u, k, lambda f: home_oracle_batch(day, pop, int(u[f[0]]), k[f])
    medoid = pop.medoid[u * pop.K + k]
    return medoid, medoid, lambda f: home_observable_batch(day, pop, int(medoid[f[0]]))


def kind_weights(kind: str, P: Products, rows: WindowRows) -> np.ndarray:
    """The popularity a kind ranks with [N]."""
    if kind in ("oracle", "observable"):
        return P.popularity
    if kind == "features":
        return np.ones(P.n)
    if kind == "train_counts":
        return rows.train_counts + TRAIN_COUNT_ALPHA
    raise ValueError(f"unknown ceiling kind {kind!r}; known: {', '.join(KINDS)}")


def kind_ranks(kind: str, P: Products, pop: Population, rows: WindowRows) -> tuple[np.ndarray, np.ndarray]:
    """(greater, tied) [T] of every pair of `rows` under ceiling `kind`."""
    oracle = kind == "oracle"
    w = kind_weights(kind, P, rows)
    greater = np.zeros(len(rows), np.int64)
    tied = np.zeros(len(rows), np.int64)
    ranked = np.zeros(len(rows), bool)
    exclude = np.where(rows.surface == CLOSEUP, rows.query_product, -1)
    for d in np.unique(rows.day).tolist():
        day = Day(P, w, d)
        post = None if oracle else AnchorPosterior(day, pop)
        counters: dict[int, DenseCounter] = {}

        def counter(e: int) -> DenseCounter:
            if _GROUPING[e] not in counters:
                counters[_GROUPING[e]] = DenseCounter(day.w, P.group[e], P.n_groups[e])
            return counters[_GROUPING[e]]

        for surface in (SEARCH, CLOSEUP, HOME):
            sel = np.flatnonzero((rows.day == d) & (rows.surface == surface))
            if len(sel) == 0:
                continue
            batch_of, key_of, build = _plan(surface, oracle, rows, sel, P, pop, day, post)
            rest: dict[int, list[DensePart]] = {}
            for at, slots, first in _batches(batch_of, key_of):
                batch = build(first)
                pairs = sel[at]
                eng = rows.engagement[pairs]
                for e in np.unique(eng).tolist():
                    m = eng == e
                    g, t, part = count_local(batch, e, slots[m], rows.product[pairs[m]], exclude[pairs[m]], day)
                    greater[pairs[m]], tied[pairs[m]], ranked[pairs[m]] = g, t, True
                    if part is not None:
                        part.pairs = pairs[m]
                        rest.setdefault(e, []).append(part)
            for e, parts in rest.items():
                pairs, g, t = count_dense(parts, counter(e))
                greater[pairs] += g
                tied[pairs] += t
    if not ranked.all():
        raise RuntimeError(f"ceiling {kind}: {int(np.sum(~ranked))} pairs were not ranked")
    unreachable = (exclude >= 0) & (exclude == rows.product)  # left out of its own ranking: a miss
    greater[unreachable], tied[unreachable] = P.n, 0
    # A local product's dense score is classified by comparison, elsewhere by weight thresholds: a score
    # within rounding of a tie bound could count once too few (never seen); counts stay >= 0.
    return np.maximum(greater, 0), np.maximum(tied, 0)


def popularity_counts(rows: WindowRows, n_products: int) -> tuple[np.ndarray, np.ndarray]:
    """(greater, tied) [T] ranking every product by its train-window count, the closeup query product
    left out: the evaluation's popularity row, counted as the ceilings count (a check of both)."""
    counts = rows.train_counts.astype(np.float64)
    counter = DenseCounter(counts, np.zeros(n_products, np.int64), 1)
    s = counts[rows.product][:, None]
    greater = counter.above(s, strict=True)[:, 0]
    tied = counter.above(s, strict=False)[:, 0] - greater - 1
    x = np.where(rows.surface == CLOSEUP, rows.query_product, -1)
    has = (x >= 0) & (x != rows.product)
    sx = counts[np.maximum(x, 0)]
    greater -= has & (sx > s[:, 0])
    tied -= has & (sx == s[:, 0])
    unreachable = (x >= 0) & (x == rows.product)
    return np.where(unreachable, n_products, greater), np.where(unreachable, 0, tied)


def ranks_for(kinds: tuple[str, ...], shop: Any, medoid: np.ndarray, rows: WindowRows,
              log_each: Callable[[str, float], None] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{kind: (greater, tied)} for `kinds`, the products and population built once."""
    import time

    P, pop = Products(shop), Population(shop, medoid)
    out = {}
    for kind in kinds:
        start = time.perf_counter()
        out[kind] = kind_ranks(kind, P, pop, rows)
        if log_each is not None:
            log_each(kind, time.perf_counter() - start)
    return out
