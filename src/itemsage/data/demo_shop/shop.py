"""The shop's latent world (never written): products' category, brand, colours, pattern, materials,
size, visual style and popularity; users' price tier, styles and interest clusters; and the catalog
rendered from them chunk by chunk (`DemoShop.catalog_chunks`). The logs are drawn by
demo_shop/logs.py, a base of `DemoShop`.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from itemsage import schema
from itemsage.data.demo_shop.config import DemoConfig
from itemsage.data.demo_shop.draws import (
    GroupSampler,
    choice,
    draw,
    id_strings,
    joined_list,
    list_column,
    render,
    strings,
    unit,
)
from itemsage.data.demo_shop.logs import EngagementLogs
from itemsage.data.demo_shop.world import (
    COLORS,
    DAY_MS,
    DESCRIPTION_TEMPLATES,
    GROUPS,
    IMAGES,
    LEAVES,
    MARKETPLACES,
    PATTERN_WEIGHTS,
    PATTERNS,
    PRODUCTS,
    SENTENCES,
    TEXT,
    TIER_PRICE,
    TIER_SHARE,
    TITLE_NOISE,
    TITLE_TEMPLATES,
    USER_CLUSTERS,
    USER_STYLES,
    USERS,
    W_CATEGORY,
    W_COLOR,
    W_MAIN_IMAGE_NOISE,
    W_OTHER_IMAGE_NOISE,
    W_PATTERN,
    W_PRODUCT_NOISE,
    W_STYLE,
    WORLD,
    brand_candidates,
    stream_rng,
)


@dataclass
class ProductLatents:
    """The hidden truth of every product (length-N arrays). Never written to the catalog."""

    category: np.ndarray
    subtype: np.ndarray  # index into the shop's product types
    style: np.ndarray  # latent visual style: image-only signal
    brand: np.ndarray  # text-only signal
    color: np.ndarray
    color2: np.ndarray  # -1: one colour
    pattern: np.ndarray
    material: np.ndarray  # text-only signal
    material2: np.ndarray  # -1: one material
    size: np.ndarray  # index into the shop's sizes; text-only signal
    size_type: np.ndarray
    price: np.ndarray
    n_images: np.ndarray
    launch_day: np.ndarray  # 0: on sale from the start; d > 0: appears on day d (cold start)
    popularity: np.ndarray  # Zipf-like weight


@dataclass
class UserLatents:
    """The hidden preferences of every user (U rows; K = 3 interest clusters)."""

    tier: np.ndarray  # [U] price tier 0..3
    styles: np.ndarray  # [U, 2] preferred styles
    cluster_category: np.ndarray  # [U, K]
    cluster_style: np.ndarray  # [U, K]
    cluster_brand: np.ndarray  # [U, K]
    cluster_cum: np.ndarray  # [U, K] cumulative cluster weights (last = 1)
    activity: np.ndarray  # [U] relative number of queries
    medoid: np.ndarray | None = None  # [U, K] product whose main image is the home query


class DemoShop(EngagementLogs):
    """A seeded shop: taxonomy, brands, products and users, plus the functions that render the
    catalog and the engagement logs chunk by chunk. `DemoShop(cfg)` is cheap to rebuild, so tests
    read the latent truth from it (`shop.products.style`, ...) without it ever being written."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        start = dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.timezone.utc)
        self.t0 = int(start.timestamp() * 1000)  # the logs' first millisecond (day 0)
        self._build_taxonomy()
        rng = stream_rng(cfg.seed, WORLD)
        self._build_brands(rng)
        self._build_vectors(rng)
        self.products = self._build_products()
        self.product_ids = id_strings("p", cfg.products)
        self._build_samplers()
        self.users = self._build_users()
        self.user_ids = id_strings("u", cfg.n_users)

    # -- world --------------------------------------------------------------------------------

    def _build_taxonomy(self) -> None:
        groups = list(GROUPS)
        self.category_paths = [leaf[0] for leaf in LEAVES]
        self.category_group = np.array([groups.index(leaf[1]) for leaf in LEAVES])
        self.category_noun = [leaf[2] for leaf in LEAVES]
        self.category_price = np.array([leaf[4] for leaf in LEAVES], dtype=np.float64)
        self.subtypes: list[str] = []
        sub_start, sub_count = [], []
        for _, _, noun, modifiers, _ in LEAVES:
            sub_start.append(len(self.subtypes))
            sub_count.append(len(modifiers))
            self.subtypes += [f"{m} {noun}" for m in modifiers]
        self.subtype_category = np.repeat(np.arange(len(LEAVES)), sub_count)
        self.category_sub_start, self.category_sub_count = np.array(sub_start), np.array(sub_count)
        self._group_count = np.bincount(self.category_group, minlength=len(groups))
        self._group_start = np.concatenate([[0], np.cumsum(self._group_count)[:-1]])
        self._group_leaves = np.argsort(self.category_group, kind="stable")
        self.product_types = [f"{self.category_paths[c].split(' > ')[-1]} > {s.title()}"
                              for c, s in zip(self.subtype_category, self.subtypes)]
        # Materials: one shared vocabulary; sizes and size types: one flat list (group-local ids).
        self.materials = sorted({m for mats, _, _ in GROUPS.values() for m in mats})
        self.group_materials = [np.array([self.materials.index(m) for m in mats]) for mats, _, _ in GROUPS.values()]
        self.sizes: list[str] = []
        self.size_types: list[str] = []
        self.group_sizes, self.group_size_types = [], []
        for _, sizes, size_types in GROUPS.values():
            self.group_sizes.append(np.arange(len(self.sizes), len(self.sizes) + len(sizes)))
            self.sizes += list(sizes)
            self.group_size_types.append(np.arange(len(self.size_types), len(self.size_types) + len(size_types)))
            self.size_types += list(size_types)

    def _build_brands(self, rng: np.random.Generator) -> None:
        cfg, n_cat = self.cfg, len(LEAVES)
        two, three = brand_candidates()  # short names first, longer ones only when needed
        pick = np.concatenate([rng.permutation(len(two)), len(two) + rng.permutation(len(three))])
        self.brand_names = [(two + three)[i] for i in pick[: cfg.brands]]
        self.brand_tier = choice(rng, TIER_SHARE, cfg.brands)
        self.brand_size = rng.lognormal(0.0, 1.0, cfg.brands)  # some brands carry far more products
        # Each brand sells 1-4 categories, mostly within one group; every category gets a brand.
        pairs: list[tuple[int, int]] = []
        for b in range(cfg.brands):
            group = rng.integers(len(GROUPS))
            in_group = np.flatnonzero(self.category_group == group)
            k = min(int(rng.integers(1, 5)), len(in_group))
            cats = set(rng.choice(in_group, size=k, replace=False).tolist())
            if rng.random() < 0.2:
                cats.add(int(rng.integers(n_cat)))
            pairs += [(b, c) for c in sorted(cats)]
        covered = {c for _, c in pairs}
        for c in range(n_cat):
            if c not in covered:
                pairs.append((int(rng.integers(cfg.brands)), c))
        self.pair_brand = np.array([b for b, _ in pairs])
        self.pair_category = np.array([c for _, c in pairs])
        self.category_weight = rng.dirichlet(np.full(n_cat, 3.0))
        self.color_weight = rng.dirichlet(np.full(len(COLORS), 4.0))
        self.style_weight = rng.dirichlet(np.full(cfg.styles, 8.0))

    def _build_vectors(self, rng: np.random.Generator) -> None:
        d = self.cfg.image_dim

        def basis(n: int) -> np.ndarray:
            return unit(rng.standard_normal((n, d)).astype(np.float32))

        self.style_vectors = basis(self.cfg.styles)
        self.category_vectors = basis(len(LEAVES))
        self.color_vectors = basis(len(COLORS))
        self.pattern_vectors = basis(len(PATTERNS))
        # Pre-mixed pairs, so a product's visible part is two gathers: [S*C, D] and [colours*P, D].
        self._style_category = (W_STYLE * self.style_vectors[:, None, :]
                                + W_CATEGORY * self.category_vectors[None, :, :]).reshape(-1, d)
        self._color_pattern = (W_COLOR * self.color_vectors[:, None, :]
                               + W_PATTERN * self.pattern_vectors[None, :, :]).reshape(-1, d)
        self.main_images: np.ndarray | None = None  # [N, D], filled while the catalog is rendered

    # -- products -----------------------------------------------------------------------------

    def _build_products(self) -> ProductLatents:
        cfg = self.cfg
        brand_by_category = GroupSampler(self.pair_category, self.brand_size[self.pair_brand])
        chunks = []
        for chunk, start in enumerate(range(0, cfg.products, cfg.catalog_chunk)):
            n = min(cfg.catalog_chunk, cfg.products - start)
            rng = stream_rng(cfg.seed, PRODUCTS, chunk)
            cat = choice(rng, self.category_weight, n)
            group = self.category_group[cat]
            sub = self.category_sub_start[cat] + (rng.random(n) * self.category_sub_count[cat]).astype(np.int64)
            brand = self.pair_brand[brand_by_category.sample(rng, cat)]
            color = choice(rng, self.color_weight, n)
            color2 = np.where(rng.random(n) < 0.2, choice(rng, self.color_weight, n), -1)
            color2[color2 == color] = -1
            # Materials and sizes come from the category's group.
            mat_pick = rng.random((n, 2))
            sizes_pick, types_pick = rng.random(n), rng.random(n)
            material, material2 = np.empty(n, np.int64), np.empty(n, np.int64)
            size, size_type = np.empty(n, np.int64), np.empty(n, np.int64)
            for g in range(len(GROUPS)):
                rows = np.flatnonzero(group == g)
                mats = self.group_materials[g]
                material[rows] = mats[(mat_pick[rows, 0] * len(mats)).astype(np.int64)]
                material2[rows] = mats[(mat_pick[rows, 1] * len(mats)).astype(np.int64)]
                size[rows] = self.group_sizes[g][(sizes_pick[rows] * len(self.group_sizes[g])).astype(np.int64)]
                types = self.group_size_types[g]
                size_type[rows] = types[(types_pick[rows] * len(types)).astype(np.int64)]
            material2[(rng.random(n) >= 0.2) | (material2 == material)] = -1
            price = (self.category_price[cat] * TIER_PRICE[self.brand_tier[brand]]
                     * rng.lognormal(0.0, 0.3, n))
            late = rng.random(n) < cfg.late_fraction
            launch = np.where(late, rng.integers(1, cfg.days, n), 0)
            if start == 0:
                launch[0] = 0  # at least one product is on sale from day 0
            chunks.append(dict(
                category=cat, subtype=sub, style=choice(rng, self.style_weight, n), brand=brand,
                color=color, color2=color2, pattern=choice(rng, np.array(PATTERN_WEIGHTS), n),
                material=material, material2=material2, size=size, size_type=size_type,
                price=np.round(price, 2),
                n_images=choice(rng, 0.7 ** np.arange(cfg.max_images), n) + 1,  # main image first
                launch_day=launch,
                # Zipf-like: weight = u^-s has a power-law tail of exponent 1/s.
                popularity=(1.0 - rng.random(n)) ** -cfg.popularity_skew,
            ))
        dtypes = dict(category=np.int16, subtype=np.int16, style=np.int16, brand=np.int32, color=np.int8,
                      color2=np.int8, pattern=np.int8, material=np.int16, material2=np.int16,
                      size=np.int16, size_type=np.int16, price=np.float64, n_images=np.int8,
                      launch_day=np.int16, popularity=np.float64)
        return ProductLatents(**{k: np.concatenate([c[k] for c in chunks]).astype(t) for k, t in dtypes.items()})

    def _build_samplers(self) -> None:
        p, cfg = self.products, self.cfg
        n_cat, n_mat = len(LEAVES), len(self.materials)
        cat, brand = p.category.astype(np.int64), p.brand.astype(np.int64)

        def sampler(keys: np.ndarray) -> GroupSampler:
            return GroupSampler(keys, p.popularity, p.launch_day, cfg.days)

        self.by_any = sampler(np.zeros(cfg.products, np.int64))
        self.by_category = sampler(cat)
        self.by_category_style = sampler(cat * cfg.styles + p.style)
        self.by_brand_category = sampler(brand * n_cat + cat)
        # One sampler per search template: the products sharing the attributes its query names.
        self.query_keys = (
            lambda a: (brand[a] * n_cat + cat[a]) * n_mat + p.material[a],
            lambda a: p.color[a].astype(np.int64) * n_cat + cat[a],
            lambda a: ((p.material[a].astype(np.int64) * len(self.subtypes) + p.subtype[a]) * len(self.sizes)
                       + p.size[a]),
            lambda a: brand[a] * n_cat + cat[a],
            lambda a: (p.color[a].astype(np.int64) * len(PATTERNS) + p.pattern[a]) * n_cat + cat[a],
            lambda a: p.material[a].astype(np.int64) * n_cat + cat[a],
        )
        all_rows = np.arange(cfg.products)
        self.by_query = [self.by_brand_category if t == 3 else sampler(key(all_rows))
                         for t, key in enumerate(self.query_keys)]

    # -- users --------------------------------------------------------------------------------

    def _build_users(self) -> UserLatents:
        cfg, K = self.cfg, USER_CLUSTERS
        brand_for = GroupSampler(self.pair_category * 4 + self.brand_tier[self.pair_brand],
                                  self.brand_size[self.pair_brand])
        brand_any = GroupSampler(self.pair_category, self.brand_size[self.pair_brand])
        chunks = []
        for chunk, start in enumerate(range(0, cfg.n_users, 50_000)):
            n = min(50_000, cfg.n_users - start)
            rng = stream_rng(cfg.seed, USERS, chunk)
            tier = choice(rng, TIER_SHARE, n)
            styles = np.stack([choice(rng, self.style_weight, n) for _ in range(USER_STYLES)], 1)
            # First interest anywhere; the others mostly in the same group (a home person, ...).
            cats = np.empty((n, K), np.int64)
            cats[:, 0] = choice(rng, self.category_weight, n)
            group = self.category_group[cats[:, 0]]
            for k in range(1, K):
                # A uniform leaf of the first interest's group, via per-group offsets.
                in_group = self._group_leaves[self._group_start[group]
                                              + (rng.random(n) * self._group_count[group]).astype(np.int64)]
                cats[:, k] = np.where(rng.random(n) < 0.6, in_group, choice(rng, self.category_weight, n))
            cstyle = styles[np.arange(n)[:, None], rng.integers(0, USER_STYLES, (n, K))]
            # A brand per cluster that sells its category, preferably in the user's price tier.
            pair = draw(rng, [(brand_for, (cats * 4 + tier[:, None]).ravel()), (brand_any, cats.ravel())])
            weights = rng.dirichlet(np.ones(K), n)
            chunks.append(dict(tier=tier, styles=styles, cluster_category=cats, cluster_style=cstyle,
                               cluster_brand=self.pair_brand[pair].reshape(n, K),
                               cluster_cum=np.cumsum(weights, 1), activity=rng.lognormal(0.0, 1.0, n)))
        users = UserLatents(**{k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})
        users.cluster_cum[:, -1] = 1.0
        self._user_sampler = GroupSampler(np.zeros(cfg.n_users, np.int64), users.activity)
        return users

    # -- image vectors ------------------------------------------------------------------------

    def _visible(self, products: np.ndarray) -> np.ndarray:
        """[n] products -> [n, D] style + category + colour + pattern (not normalised).

        Brand, material and size do not enter: they are text-only signal."""
        p = self.products
        v = self._style_category[p.style[products].astype(np.int64) * len(LEAVES) + p.category[products]]
        v += self._color_pattern[p.color[products].astype(np.int64) * len(PATTERNS) + p.pattern[products]]
        c2 = p.color2[products]
        two = np.flatnonzero(c2 >= 0)  # a second colour shares the colour weight with the first
        v[two] += (W_COLOR * (math.sqrt(0.5) - 1.0)) * self.color_vectors[p.color[products[two]]]
        v[two] += (W_COLOR * math.sqrt(0.5)) * self.color_vectors[c2[two]]
        return v

    def image_vectors(self, start: int, counts: np.ndarray) -> np.ndarray:
        """All image vectors of products [start, start + len(counts)), main image first:
        [sum(counts), D] float32 unit rows = visible part + product noise + per-image noise."""
        cfg = self.cfg
        n, d = len(counts), cfg.image_dim
        rng = stream_rng(cfg.seed, IMAGES, start)
        scale = np.float32(1.0 / math.sqrt(d))  # unit expected norm of a noise vector
        product = self._visible(np.arange(start, start + n))
        product += rng.standard_normal((n, d), dtype=np.float32) * (scale * W_PRODUCT_NOISE)
        owner = np.repeat(np.arange(n), counts)
        first = np.cumsum(counts) - counts
        w_image = np.full(len(owner), W_OTHER_IMAGE_NOISE * scale, np.float32)
        w_image[first] = W_MAIN_IMAGE_NOISE * scale
        v = rng.standard_normal((len(owner), d), dtype=np.float32)
        v *= w_image[:, None]
        v += product[owner]
        return unit(v)

    def main_image(self, products: np.ndarray) -> np.ndarray:
        """[n] products -> [n, D] their main image vectors (from the rendered catalog)."""
        if self.main_images is None:
            raise RuntimeError("render the catalog first (catalog_chunks / catalog_table) with "
                               "`main_images` set; the main images are kept while it is written.")
        return np.asarray(self.main_images[np.asarray(products, dtype=np.int64)])

    # -- catalog ------------------------------------------------------------------------------

    def catalog_chunks(self) -> Iterator[pa.Table]:
        for start in range(0, self.cfg.products, self.cfg.catalog_chunk):
            yield self.catalog_table(start, min(start + self.cfg.catalog_chunk, self.cfg.products))

    def catalog_table(self, start: int, stop: int) -> pa.Table:
        """Catalog rows [start, stop): text fields built from templates, price, image vectors."""
        p, n = self.products, stop - start
        idx = np.arange(start, stop)
        rng = stream_rng(self.cfg.seed, TEXT, start)
        brand = p.brand[idx]

        def names(vocab: list[str] | tuple[str, ...], ids: np.ndarray) -> pa.Array:
            return strings(vocab).take(pa.array(ids.astype(np.int64)))

        color, color2 = p.color[idx].astype(np.int64), p.color2[idx].astype(np.int64)
        mat, mat2 = p.material[idx].astype(np.int64), p.material2[idx].astype(np.int64)
        color_names, mat_names = strings(COLORS), strings(self.materials)
        fields = {
            "brand": names(self.brand_names, brand),
            "color": names(COLORS, color),
            "colors": joined_list(names(COLORS, color), names(COLORS, np.maximum(color2, 0)), color2 >= 0, " and "),
            "material": names(self.materials, mat),
            "materials": joined_list(names(self.materials, mat), names(self.materials, np.maximum(mat2, 0)),
                                      mat2 >= 0, " and "),
            "pattern": names(PATTERNS, p.pattern[idx]),
            "subtype": names(self.subtypes, p.subtype[idx]),
            "size": names(self.sizes, p.size[idx]),
            "size_type": names(self.size_types, p.size_type[idx]),
            "noise": names(("",) + TITLE_NOISE,  # half the titles carry a noise word
                           np.where(rng.random(n) < 0.5, rng.integers(1, len(TITLE_NOISE) + 1, n), 0)),
            "sentence": names(SENTENCES, rng.integers(0, len(SENTENCES), n)),
        }
        title = render(TITLE_TEMPLATES, rng.integers(0, len(TITLE_TEMPLATES), n), fields)
        description = render(DESCRIPTION_TEMPLATES, rng.integers(0, len(DESCRIPTION_TEMPLATES), n), fields)
        # A brand's own shop or a marketplace; the link names the product.
        brand_domains = [f"{b.lower()}.example" for b in self.brand_names]
        marketplace = rng.random(n) < 0.4
        domain = pc.if_else(pa.array(marketplace), names(MARKETPLACES, rng.integers(0, len(MARKETPLACES), n)),
                            names(brand_domains, brand))
        ids = self.product_ids.slice(start, n)
        links = pc.binary_join_element_wise(pa.scalar("https://"), domain, pa.scalar("/products/"), ids, "")

        # image_embeddings: list<list<float32>>, main image first.
        counts = p.n_images[idx].astype(np.int64)
        vectors = self.image_vectors(start, counts)  # [images, D]
        if self.main_images is not None:
            self.main_images[start:stop] = vectors[np.cumsum(counts) - counts]
        d = self.cfg.image_dim
        inner = pa.ListArray.from_arrays(pa.array(np.arange(len(vectors) + 1, dtype=np.int32) * d),
                                         pa.array(vectors.ravel()))
        images = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)), inner)

        return pa.table({
            schema.PRODUCT_ID: ids,
            "title": title,
            "description": description,
            "brand": fields["brand"],
            "colors": list_column(color, color2, color_names),
            "materials": list_column(mat, mat2, mat_names),
            "patterns": fields["pattern"],
            "size": fields["size"],
            "size_type": fields["size_type"],
            "product_type": names(self.product_types, p.subtype[idx]),
            "category": names(self.category_paths, p.category[idx]),
            "domain": domain,
            "links": links,
            "price": pa.array(p.price[idx]),
            # When the product went on sale (the day it can first be engaged), as a shop's catalog records it.
            schema.LISTED_AT: pa.array(self.t0 + p.launch_day[idx].astype(np.int64) * DAY_MS).cast(
                pa.timestamp("ms", tz="UTC")),
            schema.IMAGE_EMBEDDINGS: images,
        })
