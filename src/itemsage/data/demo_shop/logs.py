"""The engagement logs of the demo shop, drawn from its latent world chunk by chunk: users' home
queries (PinnerSage-like medoids of their cluster histories), the search, closeup and home queries
and the products they lead to, and the funnel (click, save, add to cart, checkout).

`EngagementLogs` is a base class of `DemoShop` (demo_shop/shop.py): it reads the shop's config,
products, users, samplers and vocabulary.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from itemsage import schema
from itemsage.data.demo_shop.draws import choice, draw, render, strings, unit
from itemsage.data.demo_shop.latents import latents_table
from itemsage.data.demo_shop.world import (
    CART_BRAND_FACTOR,
    CART_RATE,
    CHECKOUT_GIVEN_CART,
    CHECKOUT_TIER_FACTOR,
    CLOSEUP_SAME_CATEGORY_BELOW,
    CLOSEUP_SAME_STYLE_BELOW,
    COLORS,
    DAY_MS,
    ENGAGED_GEOMETRIC_P,
    EVENTS,
    HISTORY,
    HOME_ANYTHING_ABOVE,
    HOME_OTHER_CLUSTER_BELOW,
    LEAVES,
    MAX_ENGAGED_PER_QUERY,
    MEDOIDS,
    PATTERNS,
    PREFERRED_MIX,
    QUERY_PREFIX_WEIGHTS,
    QUERY_PREFIXES,
    QUERY_TEMPLATE_WEIGHTS,
    QUERY_TEMPLATES,
    ROWS_PER_QUERY,
    SAVE_RATE,
    SAVE_STYLE_FACTOR,
    SEARCH_CATEGORY_SHARE,
    TIER_GAP_FACTOR,
    USER_CLUSTERS,
    W_CLOSEUP_QUERY_NOISE,
    stream_rng,
)


class EngagementLogs:
    """The logs of a `DemoShop` (its base class): home queries, then the log chunk by chunk."""

    # -- users' home queries ------------------------------------------------------------------

    def compute_medoids(self, chunk: int = 20_000, advance=lambda n: None) -> None:
        """PinnerSage-like home queries: for each user cluster, the medoid of the main image
        vectors of H history products drawn from that cluster (before the log window)."""
        u, cfg, K = self.users, self.cfg, USER_CLUSTERS
        medoid = np.empty((cfg.n_users, K), np.int64)
        for c, start in enumerate(range(0, cfg.n_users, chunk)):
            stop = min(start + chunk, cfg.n_users)
            rng = stream_rng(cfg.seed, MEDOIDS, c)
            cat = np.repeat(u.cluster_category[start:stop].ravel(), HISTORY)
            style = np.repeat(u.cluster_style[start:stop].ravel(), HISTORY)
            history = draw(rng, [(self.by_category_style, cat * cfg.styles + style),
                                  (self.by_category, cat), (self.by_any, np.zeros_like(cat))], day=0)
            vec = self.main_image(history).reshape(-1, HISTORY, cfg.image_dim)  # [U*K, H, D]
            sim = vec @ vec.transpose(0, 2, 1)  # [U*K, H, H] cosine
            best = sim.sum(-1).argmax(-1)  # the history product closest to all others
            medoid[start:stop] = history.reshape(-1, HISTORY)[np.arange(len(best)), best].reshape(-1, K)
            advance(stop - start)
        u.medoid = medoid

    # -- engagement logs ----------------------------------------------------------------------

    def _preferred(self, rng: np.random.Generator, cat: np.ndarray, style: np.ndarray,
                   brand: np.ndarray, day: int) -> np.ndarray:
        """Products a user's interest cluster leads to: half by (category, style), a third by
        (brand, category), the rest by category; popular products more often."""
        n, s = len(cat), self.cfg.styles
        mode = choice(rng, np.array(PREFERRED_MIX), n)
        out = np.full(n, -1, np.int64)
        first = [self.by_category_style, self.by_brand_category, self.by_category]
        keys = [cat * s + style, brand * len(LEAVES) + cat, cat]
        for m in range(3):
            rows = np.flatnonzero(mode == m)
            out[rows] = draw(rng, [(first[m], keys[m][rows]), (self.by_category, cat[rows]),
                                    (self.by_any, np.zeros(len(rows), np.int64))], day)
        return out

    def plan(self) -> list[tuple[int, int, int, int]]:
        """Chunks of the log: (day, start_ms, stop_ms, queries), in time order.

        Query volume grows a little over the window and is higher at weekends; a day splits into
        equal time slices of about `chunk_rows` rows each."""
        cfg = self.cfg
        total = cfg.engagements_per_product * cfg.products / ROWS_PER_QUERY
        start = dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.timezone.utc)
        t0 = self.t0
        days = np.arange(cfg.days)
        weekend = ((start.weekday() + days) % 7) >= 5
        weight = (1.0 + 0.5 * days / cfg.days) * np.where(weekend, 1.15, 1.0)
        per_day = np.floor(total * weight / weight.sum() + 0.5).astype(np.int64)
        per_chunk = max(1, int(cfg.chunk_rows / ROWS_PER_QUERY))
        out = []
        for d, q in enumerate(per_day):
            pieces = max(1, math.ceil(q / per_chunk))
            for j in range(pieces):
                lo = t0 + d * DAY_MS + j * DAY_MS // pieces
                hi = t0 + d * DAY_MS + (j + 1) * DAY_MS // pieces
                out.append((d, lo, hi, int(q * (j + 1) // pieces - q * j // pieces)))
        return out

    def engagement_chunk(self, day: int, t0: int, t1: int, n: int, index: int,
                         first_query: int = 0) -> tuple[pa.Table, np.ndarray, pa.Table]:
        """The log rows of `n` queries in [t0, t1) ms, in session order, counts [surface, engagement],
        and the rows' latents (demo_shop/latents.py: each row's query, numbered from `first_query`, and
        that query's draws), row-aligned with the log rows. Recording them draws no random number."""
        cfg, p, u = self.cfg, self.products, self.users
        rng = stream_rng(cfg.seed, EVENTS, index)
        # -- queries [n]
        user = self._user_sampler.sample(rng, np.zeros(n, np.int64))
        surface = choice(rng, np.array(cfg.surface_mix, dtype=np.float64), n)  # 0 search, 1 closeup, 2 home
        q_time = rng.integers(t0, t1, n)
        cluster = (rng.random(n)[:, None] > u.cluster_cum[user]).sum(1)
        cat = u.cluster_category[user, cluster]
        style = u.cluster_style[user, cluster]
        brand = u.cluster_brand[user, cluster].astype(np.int64)
        # The search target or the product being viewed in closeup.
        anchor = self._preferred(rng, cat, style, brand, day)
        template = choice(rng, QUERY_TEMPLATE_WEIGHTS, n)

        # -- engaged products: one interaction per (query, product) [m]
        n_eng = np.minimum(rng.geometric(ENGAGED_GEOMETRIC_P, n), MAX_ENGAGED_PER_QUERY)
        q = np.repeat(np.arange(n), n_eng)
        pos = np.arange(len(q)) - np.repeat(np.cumsum(n_eng) - n_eng, n_eng)
        product = np.full(len(q), -1, np.int64)
        r = rng.random(len(q))
        srf, a = surface[q], anchor[q]
        ac = p.category[np.maximum(a, 0)].astype(np.int64)
        # search: the target first, then products sharing the query's attributes (10%: its category).
        rows = np.flatnonzero((srf == 0) & (pos == 0))
        product[rows] = a[rows]
        for t, key in enumerate(self.query_keys):
            rows = np.flatnonzero((srf == 0) & (pos > 0) & (template[q] == t) & (r >= SEARCH_CATEGORY_SHARE) & (a >= 0))
            product[rows] = self.by_query[t].sample(rng, key(a[rows]), day)
        rows = np.flatnonzero((srf == 0) & (pos > 0) & (r < SEARCH_CATEGORY_SHARE) & (a >= 0))
        product[rows] = self.by_category.sample(rng, ac[rows], day)
        # closeup: the viewed product's category and style (15%: category only, 5%: anything).
        rows = np.flatnonzero((srf == 1) & (a >= 0))
        a_style = p.style[a[rows]].astype(np.int64)
        rr = r[rows]
        cs_key = np.where(rr < CLOSEUP_SAME_STYLE_BELOW, ac[rows] * cfg.styles + a_style, -1)
        attempts = [(self.by_category_style, cs_key), (self.by_category, np.where(rr < CLOSEUP_SAME_CATEGORY_BELOW, ac[rows], -1)),
                    (self.by_any, np.zeros(len(rows), np.int64))]
        product[rows] = draw(rng, attempts, day)
        # Drawing the viewed product itself (popular, or alone in a small group): draw again, then
        # fall back to its category.
        again = np.flatnonzero(product[rows] == a[rows])
        product[rows[again]] = draw(rng, [(sampler, keys[again]) for sampler, keys in attempts], day)
        again = rows[product[rows] == a[rows]]
        product[again] = self.by_category.sample(rng, ac[again], day)
        # home: the query's interest cluster (8%: another of the user's clusters, 4%: anything).
        rows = np.flatnonzero(srf == 2)
        uq, kq = user[q[rows]], cluster[q[rows]]
        other = r[rows] < HOME_OTHER_CLUSTER_BELOW
        kq = np.where(other, rng.integers(0, USER_CLUSTERS, len(rows)), kq)
        product[rows] = self._preferred(rng, u.cluster_category[uq, kq], u.cluster_style[uq, kq],
                                        u.cluster_brand[uq, kq].astype(np.int64), day)
        anything = rows[r[rows] > HOME_ANYTHING_ABOVE]
        product[anything] = self.by_any.sample(rng, np.zeros(len(anything), np.int64), day)
        # Keep one interaction per (query, product); a closeup never engages the viewed product.
        keep = (product >= 0) & ~((srf == 1) & (product == a))
        key = q.astype(np.int64) * cfg.products + product
        _, first = np.unique(np.where(keep, key, -1 - np.arange(len(key))), return_index=True)
        inter = np.sort(first[keep[first]])
        q, pos, product = q[inter], pos[inter], product[inter]
        iu = user[q]

        # -- the funnel: click always; save, add_to_cart, checkout with user-dependent rates
        style_match = (p.style[product][:, None] == u.styles[iu]).any(1)
        gap = np.abs(self.brand_tier[p.brand[product]] - u.tier[iu])
        brand_match = (p.brand[product][:, None] == u.cluster_brand[iu]).any(1)
        save = rng.random(len(q)) < SAVE_RATE * np.where(style_match, SAVE_STYLE_FACTOR[1], SAVE_STYLE_FACTOR[0])
        cart_factor = TIER_GAP_FACTOR[gap] * np.where(brand_match, CART_BRAND_FACTOR[1], CART_BRAND_FACTOR[0])
        cart = rng.random(len(q)) < CART_RATE * cart_factor
        checkout_factor = np.where(gap == 0, CHECKOUT_TIER_FACTOR[1], CHECKOUT_TIER_FACTOR[0])
        checkout = cart & (rng.random(len(q)) < CHECKOUT_GIVEN_CART * checkout_factor)
        t_click = q_time[q] + pos * rng.integers(5_000, 90_000, len(q))
        t_save = t_click + rng.integers(1_000, 30_000, len(q))
        t_cart = t_click + rng.integers(20_000, 600_000, len(q))
        t_checkout = t_cart + rng.integers(60_000, 1_800_000, len(q))
        row_inter = np.concatenate([np.arange(len(q)), np.flatnonzero(save), np.flatnonzero(cart),
                                    np.flatnonzero(checkout)])
        row_eng = np.repeat(np.arange(4), [len(q), save.sum(), cart.sum(), checkout.sum()])
        row_time = np.minimum(np.concatenate([t_click, t_save[save], t_cart[cart], t_checkout[checkout]]), t1 - 1)
        # Session order: queries by start time, each query's rows together and in time order. A
        # query's rows then share Parquet pages, so its repeated query vector compresses away.
        order = np.lexsort((row_time, q[row_inter], q_time[q[row_inter]]))
        row_inter, row_eng, row_time = row_inter[order], row_eng[order], row_time[order]
        row_q = q[row_inter]

        # -- queries: text for search, an image-space vector for closeup and home
        searches = np.flatnonzero(surface == 0)
        text = pa.nulls(n, pa.string())
        if len(searches):
            a = anchor[searches]
            fields = {
                "prefix": strings(QUERY_PREFIXES).take(pa.array(choice(rng, QUERY_PREFIX_WEIGHTS, len(a)))),
                "brand": pc.utf8_lower(strings(self.brand_names).take(pa.array(p.brand[a].astype(np.int64)))),
                "material": strings(self.materials).take(pa.array(p.material[a].astype(np.int64))),
                "noun": strings(self.category_noun).take(pa.array(p.category[a].astype(np.int64))),
                "color": strings(COLORS).take(pa.array(p.color[a].astype(np.int64))),
                "pattern": strings(PATTERNS).take(pa.array(p.pattern[a].astype(np.int64))),
                "subtype": strings(self.subtypes).take(pa.array(p.subtype[a].astype(np.int64))),
                "size": pc.utf8_lower(strings(self.sizes).take(pa.array(p.size[a].astype(np.int64)))),
            }
            rendered = render(QUERY_TEMPLATES, template[searches], fields)
            slot = np.full(n, -1, np.int64)
            slot[searches] = np.arange(len(searches))
            text = rendered.take(pa.array(slot, mask=slot < 0))
        with_vector = np.flatnonzero(surface > 0)
        vec_slot = np.full(n, -1, np.int64)
        vec_slot[with_vector] = np.arange(len(with_vector))
        source = np.where(surface[with_vector] == 1, anchor[with_vector],
                          u.medoid[user[with_vector], cluster[with_vector]])
        qvec = self.main_image(source)  # [queries with a vector, D]
        # closeup: the viewed product's main image plus noise (drawn from a per-chunk pool of
        # random directions: n gathers instead of n x D fresh normals).
        closeups = np.flatnonzero(surface[with_vector] == 1)
        pool = rng.standard_normal((min(4096, max(1, len(closeups))), cfg.image_dim), dtype=np.float32)
        pool *= np.float32(W_CLOSEUP_QUERY_NOISE / math.sqrt(cfg.image_dim))
        qvec[closeups] += pool[rng.integers(0, len(pool), len(closeups))]
        qvec[closeups] = unit(qvec[closeups])
        # The catalog product each vector query is: the viewed product (closeup) or the medoid
        # (home). Read from the draws above; no random number is drawn for it.
        query_product = np.full(n, -1, np.int64)
        query_product[with_vector] = source
        row_query_product = query_product[row_q]  # [rows] -1: a search row
        row_vec = vec_slot[row_q]
        has_vec = row_vec >= 0
        d = cfg.image_dim
        offsets = np.concatenate([[0], np.cumsum(has_vec * d)]).astype(np.int32)
        embedding = pa.ListArray.from_arrays(pa.array(offsets), pa.array(qvec[row_vec[has_vec]].ravel()),
                                             mask=pa.array(~has_vec))
        row_surface = surface[row_q]
        table = pa.table({
            schema.SURFACE: strings(schema.SURFACES).take(pa.array(row_surface)),
            schema.ENGAGEMENT: strings(schema.ENGAGEMENTS).take(pa.array(row_eng)),
            schema.PRODUCT_ID: self.product_ids.take(pa.array(product[row_inter])),
            schema.TIMESTAMP: pa.array(row_time, type=pa.timestamp("ms", tz="UTC")),
            schema.USER_ID: self.user_ids.take(pa.array(user[row_q])),
            schema.QUERY_TEXT: text.take(pa.array(row_q)),
            schema.QUERY_EMBEDDING: embedding,
            schema.QUERY_PRODUCT_ID: self.product_ids.take(pa.array(np.maximum(row_query_product, 0),
                                                                    mask=row_query_product < 0)),
        })
        counts = np.bincount(row_surface * 4 + row_eng, minlength=12).reshape(3, 4)
        latents = latents_table(query=first_query + row_q, cluster=cluster[row_q], anchor=anchor[row_q],
                                template=template[row_q], engaged=n_eng[row_q], day=np.full(len(row_q), day))
        return table, counts, latents
