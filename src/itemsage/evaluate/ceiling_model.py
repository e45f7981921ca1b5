"""The demo shop's draws as probabilities: for a query and what is known about it, each product's
probability of being among the products the query engaged with by an engagement type.

What is ranked for a query q and engagement e: P(j in S_e(q) | knowledge), S_e the set of products
q engaged with by e. A query adds |S_e ∩ top k| hits to Recall@k over its rows, so this inclusion
probability is the ranking with the highest expected Recall@k given that knowledge. The generator
(data/demo_shop/logs.py) draws n = min(Geometric(1/2), 6) positions per query, each position a
product drawn with per-position probability q_j; a product is engaged if some position drew it:
inclusion(q_j) = 1 - E_n[(1 - q_j)^n], n marginalised (search: the first position is the target).
Then the funnel: P(e | engaged) = the user's save / add-to-cart / checkout rate for the product.

Per-position probabilities, the generator's samplers (weights in demo_shop/world.py), among the
products launched by the query's day, each drawn with probability proportional to its popularity w:
- search: the target first; later positions 0.9 the group its text names (the template's
  attributes of the target), 0.1 the target's category;
- closeup: 0.8 the viewed product's (category, style), 0.15 its category, 0.05 anything; drawing
  the viewed product draws again from the same part, twice draws from its category;
- home: 0.88 the query's interest cluster, 0.08 a uniformly drawn one of the user's three, 0.04
  anything; a cluster draws 0.5 by (category, style), 0.3 by (brand, category), 0.2 by category.

Every distribution is local to a few categories plus an "anything" part beta * w_j, so a batch of
queries is held as exact scores on its `idx` products (its categories) and, elsewhere, the dense
score inclusion(beta * w_j) times the funnel factor of j's group (its style for saves, its brand for
add-to-cart and checkout): nondecreasing in w_j within a group, which ceiling_ranks.py counts
without scoring every product.

The generator's latents are read to compute a ceiling only, never to train or choose a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from itemsage.data.demo_shop import world as W

SEARCH, CLOSEUP, HOME = 0, 1, 2
CLICK, SAVE, CART, CHECKOUT = 0, 1, 2, 3
FUNNEL = ("Y", "Zcart", "Zcheckout")  # the funnel tables (see Population)

# P(n = k), k = 1..6: min(Geometric(p), MAX) positions drawn per query; TAIL[i] = P(n > i).
_p = W.ENGAGED_GEOMETRIC_P
P_N = np.array([_p * (1 - _p) ** (k - 1) for k in range(1, W.MAX_ENGAGED_PER_QUERY)]
               + [(1 - _p) ** (W.MAX_ENGAGED_PER_QUERY - 1)])
TAIL = 1.0 - np.concatenate([[0.0], np.cumsum(P_N)[:-1]])
MEAN_N = float(TAIL.sum())  # E[n], the slope of inclusion() at 0

CLOSEUP_MIX = (W.CLOSEUP_SAME_STYLE_BELOW, W.CLOSEUP_SAME_CATEGORY_BELOW - W.CLOSEUP_SAME_STYLE_BELOW,
               1.0 - W.CLOSEUP_SAME_CATEGORY_BELOW)  # (category, style), category, anything
HOME_ANYTHING = 1.0 - W.HOME_ANYTHING_ABOVE
HOME_OWN = 1.0 - W.HOME_OTHER_CLUSTER_BELOW - HOME_ANYTHING  # the query's own cluster (besides a uniform draw)


def _series(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """sum_i coef[i] x^i by Horner's rule, elementwise."""
    acc = np.full_like(x, coef[-1])
    for c in coef[-2::-1]:
        acc *= x
        acc += c
    return acc


def inclusion(q: np.ndarray, first_known: bool = False) -> np.ndarray:
    """P(a product drawn with per-position probability q is among the query's engaged products):
    1 - E[(1 - q)^n] = q sum_i P(n > i) (1 - q)^i, a sum of positive terms, so small q keep their
    relative precision; `first_known`: the first position is fixed (search's target), so only n - 1
    positions draw: q sum_i P(n > i + 1) (1 - q)^i."""
    q = np.asarray(q, np.float64)
    return q * _series(1.0 - q, TAIL[1:] if first_known else TAIL)


def inclusion_inverse(y: np.ndarray) -> np.ndarray:
    """x in [0, 1] with inclusion(x) = y for y in [0, 1); +inf for y >= 1. inclusion is increasing and
    concave, so Newton's method from y / inclusion'(0), below the root, climbs to it (quadratically:
    about 5 steps to machine precision)."""
    y = np.asarray(y, np.float64)
    solvable = y < 1.0
    target = np.where(solvable, y, 0.0)
    x = np.clip(target / MEAN_N, 0.0, 1.0)
    d_coef = TAIL[1:] * np.arange(1, len(TAIL))  # G(u) = sum_i TAIL[i] u^i, G'(u) = sum_i i TAIL[i] u^(i-1)
    for _ in range(30):
        one = 1.0 - x
        g = _series(one, TAIL)
        step = (target - x * g) / (g - x * _series(one, d_coef))  # h(x) = x G(1 - x), h' = G - x G'
        x = np.minimum(x + step, 1.0)
        if np.all(np.abs(step) <= 1e-14 * x):
            break
    return np.where(solvable, x, np.inf)


class Products:
    """The products' group keys as the generator's samplers use them, and the funnel's product groups."""

    def __init__(self, shop: Any) -> None:
        p, cfg = shop.products, shop.cfg
        self.n, self.n_styles, self.n_cat, self.n_brands = cfg.products, cfg.styles, len(W.LEAVES), cfg.brands
        self.cat = p.category.astype(np.int64)
        self.style = p.style.astype(np.int64)
        self.brand = p.brand.astype(np.int64)
        self.launch = p.launch_day.astype(np.int64)
        self.popularity = p.popularity.astype(np.float64)
        self.cs = self.cat * self.n_styles + self.style
        self.bc = self.brand * self.n_cat + self.cat
        order = np.argsort(self.cat, kind="stable")
        bounds = np.searchsorted(self.cat[order], np.arange(self.n_cat + 1))
        self.members = [order[bounds[c]:bounds[c + 1]] for c in range(self.n_cat)]  # each sorted
        rows = np.arange(self.n)
        # Search: compact ids of the group each template's text names [6, N], and their offsets.
        self.tkey = np.stack([np.unique(key(rows), return_inverse=True)[1].ravel() for key in shop.query_keys])
        self.t_size = self.tkey.max(1) + 1
        self.t_offset = np.concatenate([[0], np.cumsum(self.t_size)[:-1]])
        # The funnel factor's product groups per engagement: none (click), style (save), brand.
        self.group = {CLICK: np.zeros(self.n, np.int64), SAVE: self.style, CART: self.brand, CHECKOUT: self.brand}
        self.n_groups = {CLICK: 1, SAVE: self.n_styles, CART: self.n_brands, CHECKOUT: self.n_brands}

    def local(self, categories: np.ndarray) -> np.ndarray:
        """The products of some categories, sorted."""
        cats = np.unique(categories)
        return self.members[int(cats[0])] if len(cats) == 1 else np.sort(np.concatenate([self.members[c] for c in cats]))


class Day:
    """The products on sale on one day under one popularity vector w: their weights and the total
    weight of every group a sampler draws from."""

    def __init__(self, products: Products, w: np.ndarray, day: int) -> None:
        P = products
        self.products, self.day = P, day
        self.w = np.where(P.launch <= day, w, 0.0)  # [N] 0 before launch
        self.any = float(self.w.sum())
        self.c = np.bincount(P.cat, self.w, P.n_cat)
        self.cs = np.bincount(P.cs, self.w, P.n_cat * P.n_styles)
        self.bc = np.bincount(P.bc, self.w, P.n_brands * P.n_cat)
        self.t = np.concatenate([np.bincount(P.tkey[t], self.w, P.t_size[t]) for t in range(len(P.tkey))])

    def preferred(self, c: np.ndarray, s: np.ndarray, b: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A cluster's draw (EngagementLogs._preferred) for clusters (c, s, b) [M] on products idx (which
        must hold their categories): 0.5 by (category, style), 0.3 by (brand, category), 0.2 by
        category; an empty group falls back to the category, an empty category to anything.
        -> (probabilities [M, L], 1.0 where the category is empty [M])."""
        P = self.products
        wc, wcs, wbc = self.c[c], self.cs[c * P.n_styles + s], self.bc[b * P.n_cat + c]
        in_c = P.cat[idx][None, :] == c[:, None]  # [M, L]
        cat_part = in_c / np.where(wc > 0, wc, 1.0)[:, None]
        cs_part = np.where((wcs > 0)[:, None], (in_c & (P.style[idx][None, :] == s[:, None]))
                           / np.where(wcs > 0, wcs, 1.0)[:, None], cat_part)
        bc_part = np.where((wbc > 0)[:, None], (in_c & (P.brand[idx][None, :] == b[:, None]))
                           / np.where(wbc > 0, wbc, 1.0)[:, None], cat_part)
        mix = W.PREFERRED_MIX
        out = (mix[0] * cs_part + mix[1] * bc_part + mix[2] * cat_part) * self.w[idx][None, :]
        empty = wc <= 0
        out[empty] = 0.0
        return out, empty.astype(np.float64)


class Population:
    """The shop's users as (user, cluster) rows weighted as the generator draws a query's user
    (activity) and cluster (its weight), with each user's funnel tables: Y [U, S] 1 where a style is
    one of theirs; Zcart, Zcheckout [U, brands] their add-to-cart and checkout probability for an
    engaged product of that brand."""

    def __init__(self, shop: Any, medoid: np.ndarray) -> None:
        u = shop.users
        U, K = u.tier.shape[0], W.USER_CLUSTERS
        self.U, self.K = U, K
        act = u.activity / u.activity.sum()
        cw = np.diff(np.concatenate([np.zeros((U, 1)), u.cluster_cum], 1), axis=1)
        self.weight = (act[:, None] * cw).ravel()  # [U*K] P(a query's user and cluster)
        self.c, self.s = u.cluster_category.astype(np.int64), u.cluster_style.astype(np.int64)
        self.b = u.cluster_brand.astype(np.int64)
        self.medoid = medoid.ravel()  # [U*K] each cluster's home query product
        self._by_medoid = np.argsort(self.medoid, kind="stable")
        self.Y = np.zeros((U, shop.cfg.styles))
        self.Y[np.arange(U)[:, None], u.styles] = 1.0
        gap = np.abs(shop.brand_tier[None, :] - u.tier[:, None])  # [U, brands]
        match = np.zeros(gap.shape, bool)
        match[np.arange(U)[:, None], u.cluster_brand] = True
        self.Zcart = W.CART_RATE * W.TIER_GAP_FACTOR[gap] * np.where(match, W.CART_BRAND_FACTOR[1],
                                                                     W.CART_BRAND_FACTOR[0])
        self.Zcheckout = self.Zcart * W.CHECKOUT_GIVEN_CART * np.where(gap == 0, W.CHECKOUT_TIER_FACTOR[1],
                                                                      W.CHECKOUT_TIER_FACTOR[0])

    def candidates(self, medoid: int) -> np.ndarray:
        """The (user, cluster) rows (user * K + cluster) whose home query is product `medoid`."""
        lo, hi = np.searchsorted(self.medoid[self._by_medoid], [medoid, medoid + 1])
        return np.sort(self._by_medoid[lo:hi])

    def tables(self, users: np.ndarray) -> dict[str, np.ndarray]:
        return {"Y": self.Y[users], "Zcart": self.Zcart[users], "Zcheckout": self.Zcheckout[users]}


def group_factors(engagement: int, tables: dict[str, np.ndarray], rows: int) -> np.ndarray:
    """[B, groups] P(engagement | engaged) per product group (Products.group) from funnel tables
    [B, *] (a user's, or expected over a posterior); clicks: ones [rows, 1]."""
    if engagement == CLICK:
        return np.ones((rows, 1))
    if engagement == SAVE:
        low, high = W.SAVE_STYLE_FACTOR
        return W.SAVE_RATE * (low + (high - low) * tables["Y"])
    return tables["Zcart" if engagement == CART else "Zcheckout"]


class AnchorPosterior:
    """Per product j of a category, as if it were a query's anchor (the closeup's viewed product, a
    search's target): A_j, the population's probability of drawing it (weight x P(the cluster's draw
    gives j)), and the funnel tables expected over the (user, cluster) posterior given it."""

    def __init__(self, day: Day, pop: Population) -> None:
        self.day, self.pop = day, pop
        P = day.products
        self.cl_c, self.cl_s, self.cl_b = pop.c.ravel(), pop.s.ravel(), pop.b.ravel()
        self.cl_u = np.repeat(np.arange(pop.U), pop.K)
        empty = day.c[self.cl_c] <= 0  # clusters whose category has nothing on sale draw anything
        self.empty_w = pop.weight[empty].sum()
        self.empty_tables = {n: pop.weight[empty] @ getattr(pop, n)[self.cl_u[empty]] for n in FUNNEL}
        self.by_cat = [np.flatnonzero((self.cl_c == c) & ~empty) for c in range(P.n_cat)]
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def tables(self, c: int) -> dict[str, np.ndarray]:
        """Category c's products (Products.members[c] order): A [P_c], Y [P_c, S], Zcart, Zcheckout."""
        if c in self._cache:
            return self._cache[c]
        d, pop, P = self.day, self.pop, self.day.products
        prods, cl = P.members[c], self.by_cat[c]
        wc = d.c[c]
        mix = W.PREFERRED_MIX
        # kernel [P_c, C_c]: P(the cluster's draw gives the product) / its weight, times the cluster's weight
        ker = np.full((len(prods), len(cl)), mix[2] / wc if wc > 0 else 0.0)
        if wc > 0 and len(cl):
            wcs, wbc = d.cs[c * P.n_styles + self.cl_s[cl]], d.bc[self.cl_b[cl] * P.n_cat + c]
            same_s = P.style[prods][:, None] == self.cl_s[cl][None, :]
            ker += mix[0] * np.where(wcs[None, :] > 0, same_s / np.maximum(wcs, 1e-300)[None, :], 1.0 / wc)
            same_b = P.brand[prods][:, None] == self.cl_b[cl][None, :]
            ker += mix[1] * np.where(wbc[None, :] > 0, same_b / np.maximum(wbc, 1e-300)[None, :], 1.0 / wc)
            ker *= pop.weight[cl][None, :]
        mass = ker.sum(1) + self.empty_w / d.any  # [P_c]
        users = self.cl_u[cl]
        out = {"A": d.w[prods] * mass}
        for n in FUNNEL:
            out[n] = (ker @ getattr(pop, n)[users] + self.empty_tables[n][None, :] / d.any) / np.maximum(mass, 1e-300)[:, None]
        self._cache[c] = out
        return out


def own_factors(engagement: int, tables: dict[str, np.ndarray], idx: np.ndarray, P: Products) -> np.ndarray:
    """[L] each product's funnel factor from its own row of per-product tables (AnchorPosterior's)."""
    if engagement == SAVE:
        low, high = W.SAVE_STYLE_FACTOR
        return W.SAVE_RATE * (low + (high - low) * tables["Y"][np.arange(len(idx)), P.style[idx]])
    name = "Zcart" if engagement == CART else "Zcheckout"
    return tables[name][np.arange(len(idx)), P.brand[idx]]


@dataclass
class Batch:
    """Scores of B queries that share their local products `idx` [L]: exact there (`local(e)` ->
    [B, L]); elsewhere inclusion(beta [B] * w_j) times group_factors(e, tables)[b, group of j]."""

    idx: np.ndarray
    beta: np.ndarray
    tables: dict[str, np.ndarray] | None  # the dense part's funnel tables [B, *] (None: no dense part)
    local: Callable[[int], np.ndarray]


def search_batch(day: Day, pop: Population, post: AnchorPosterior | None, c: int, template: np.ndarray,
                 group: np.ndarray, anchor: np.ndarray, user: np.ndarray) -> Batch:
    """Searches in category c: template [B], the group its text names (Products.tkey) [B]; the oracle
    (post None) also knows the target `anchor` and the `user`."""
    P = day.products
    idx = P.members[c]
    wl = day.w[idx]
    in_group = P.tkey[template[:, None], idx[None, :]] == group[:, None]  # [B, L]
    text_total = day.t[P.t_offset[template] + group]
    share = W.SEARCH_CATEGORY_SHARE
    q = ((1.0 - share) * in_group / text_total[:, None] + share / day.c[c]) * wl
    g = inclusion(q, first_known=True)  # [B, L] later positions
    B = len(template)
    if post is None:  # the target is known: always engaged
        g[np.arange(B), np.searchsorted(idx, anchor)] = 1.0
        tables = pop.tables(user)
        return Batch(idx, np.zeros(B), None, lambda e: g * group_factors(e, tables, B)[:, P.group[e][idx]])
    # The target unknown: one of the products the text names, with probability proportional to the
    # population's anchor prior A. P(j in S) = pi_j + (1 - pi_j) g_j; with the funnel, j's own
    # factor where j is the target, the factor averaged over the target posterior where it is not.
    T = post.tables(c)
    pi = np.where(in_group & (wl > 0), T["A"][None, :], 0.0)
    pi /= np.maximum(pi.sum(1, keepdims=True), 1e-300)

    def local(e: int) -> np.ndarray:
        if e == CLICK:
            return pi + (1.0 - pi) * g
        own = pi * own_factors(e, T, idx, P)[None, :]
        name = "Y" if e == SAVE else "Zcart" if e == CART else "Zcheckout"
        mean = group_factors(e, {name: pi @ T[name]}, B)[:, P.group[e][idx]]
        return own + g * (mean - own)

    return Batch(idx, np.zeros(B), None, local)


def closeup_batch(day: Day, pop: Population, post: AnchorPosterior | None, c: int, anchor: np.ndarray,
                  user: np.ndarray) -> Batch:
    """Closeups of viewed products `anchor` [B] in category c; the oracle (post None) knows the user."""
    P = day.products
    idx = P.members[c]
    wl = day.w[idx]
    at = np.searchsorted(idx, anchor)
    rows = np.arange(len(anchor))
    same = P.cs[idx][None, :] == P.cs[anchor][:, None]
    cat = wl / day.c[c]  # [L]
    parts = (same * wl / day.cs[P.cs[anchor]][:, None], np.broadcast_to(cat, same.shape),
             np.broadcast_to(wl / day.any, same.shape))
    q = np.zeros(same.shape)
    for weight, d in zip(CLOSEUP_MIX, parts):
        d_a = d[rows, at][:, None]  # drawing the viewed product draws again, then from its category
        q += weight * (d * (1.0 + d_a) + d_a ** 2 * cat)
    q[rows, at] = 0.0
    inc = inclusion(q)
    beta = CLOSEUP_MIX[2] * (1.0 + day.w[anchor] / day.any) / day.any  # elsewhere: only "anything"
    if post is None:
        tables = pop.tables(user)
    else:  # the user's funnel given the viewed product
        T = post.tables(c)
        tables = {n: T[n][at] for n in FUNNEL}
    return Batch(idx, beta, tables, lambda e: inc * group_factors(e, tables, len(anchor))[:, P.group[e][idx]])


def _home_draws(day: Day, pop: Population, users: np.ndarray, clusters: np.ndarray,
                idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position probabilities [M, L] on idx (holding the users' categories) of home queries of
    (users, clusters) [M], and their 'anything' weight beta [M]."""
    M = len(users)
    mix = np.full((M, pop.K), W.HOME_OTHER_CLUSTER_BELOW / pop.K)
    mix[np.arange(M), clusters] += HOME_OWN
    vals, empty = day.preferred(pop.c[users].ravel(), pop.s[users].ravel(), pop.b[users].ravel(), idx)
    q = np.einsum("mk,mkl->ml", mix, vals.reshape(M, pop.K, len(idx)))
    beta = (HOME_ANYTHING + (mix * empty.reshape(M, pop.K)).sum(1)) / day.any
    return q + beta[:, None] * day.w[idx][None, :], beta


def home_oracle_batch(day: Day, pop: Population, user: int, clusters: np.ndarray) -> Batch:
    """Home queries of one user from their clusters [B]: the user's three clusters drawn exactly."""
    P = day.products
    idx = P.local(pop.c[user])
    users = np.full(len(clusters), user)
    q, beta = _home_draws(day, pop, users, clusters, idx)
    inc = inclusion(q)
    tables = pop.tables(users)
    return Batch(idx, beta, tables, lambda e: inc * group_factors(e, tables, len(users))[:, P.group[e][idx]])


def home_observable_batch(day: Day, pop: Population, medoid: int) -> Batch:
    """A home query known by its medoid only: the mixture over the (user, cluster) candidates whose
    medoid it is, weighted as queries draw them, each with its own draws and funnel.

    Outside a candidate's own three categories its per-position probability is beta w_j, the same for
    every candidate, so the mixture is inclusion(beta w_j) times the expected funnel factor, plus,
    on each candidate's own products, its difference from that: computed on those products only."""
    P = day.products
    cand = pop.candidates(medoid)
    post = pop.weight[cand] / pop.weight[cand].sum()
    cu, ck = cand // pop.K, cand % pop.K
    cats = pop.c[cu]  # [C, K]
    mix = np.full(cats.shape, W.HOME_OTHER_CLUSTER_BELOW / pop.K)
    mix[np.arange(len(cu)), ck] += HOME_OWN
    empty = day.c[cats] <= 0
    beta = (HOME_ANYTHING + (mix * empty).sum(1)) / day.any  # [C]
    own = pop.tables(cu)
    tables = {n: (post @ own[n])[None, :] for n in FUNNEL}  # the funnel expected over the candidates [1, *]
    if not np.all(beta == beta[0]):  # an empty category in some candidates: no common dense part,
        idx = np.arange(P.n)  # so every product is scored exactly
        q, _ = _home_draws(day, pop, cu, ck, idx)
        inc = inclusion(q)  # [C, N]
        return Batch(idx, np.zeros(1), tables, lambda e: post[None, :] @ (
            inc * group_factors(e, own, len(cu))[:, P.group[e][idx]]))
    idx = P.local(cats.ravel())
    # Each candidate's own products: one entry per (candidate, product of one of its categories).
    first = np.ones(cats.shape, bool)
    for k in range(1, pop.K):
        first[:, k] = (cats[:, [k]] != cats[:, :k]).all(1)
    who, which = np.nonzero(first)
    parts = [P.members[c] for c in cats[who, which].tolist()]
    entry_cand = np.repeat(who, [len(m) for m in parts])
    j = np.concatenate(parts)
    cat_j, style_j, brand_j, w_j = P.cat[j], P.style[j], P.brand[j], day.w[j]
    base = beta[0] * w_j
    q = base.copy()
    pm = W.PREFERRED_MIX
    for k in range(pop.K):  # each cluster's draw (Day.preferred) on the entries of its category
        c, st, br = cats[:, k], pop.s[cu, k], pop.b[cu, k]
        wc, wcs, wbc = day.c[c], day.cs[c * P.n_styles + st], day.bc[br * P.n_cat + c]
        by_cat = np.where(wc > 0, mix[:, k] * (pm[2] + pm[0] * (wcs <= 0) + pm[1] * (wbc <= 0))
                          / np.where(wc > 0, wc, 1.0), 0.0)  # [C] per unit weight, empty groups fall back
        by_cs = np.where((wc > 0) & (wcs > 0), mix[:, k] * pm[0] / np.where(wcs > 0, wcs, 1.0), 0.0)
        by_bc = np.where((wc > 0) & (wbc > 0), mix[:, k] * pm[1] / np.where(wbc > 0, wbc, 1.0), 0.0)
        e = np.flatnonzero(cat_j == c[entry_cand])
        ce = entry_cand[e]
        q[e] += (by_cat[ce] + (style_j[e] == st[ce]) * by_cs[ce] + (brand_j[e] == br[ce]) * by_bc[ce]) * w_j[e]
    diff = post[entry_cand] * (inclusion(q) - inclusion(base))  # [E]
    at = np.searchsorted(idx, j)
    rest = inclusion(beta[0] * day.w[idx])  # [L]

    def local(e: int) -> np.ndarray:
        factor = group_factors(e, own, len(cu))[entry_cand, P.group[e][j]] if e != CLICK else 1.0
        mean = group_factors(e, tables, 1)[0, P.group[e][idx]]
        return (np.bincount(at, diff * factor, len(idx)) + rest * mean)[None, :]

    return Batch(idx, beta[:1], tables, local)
