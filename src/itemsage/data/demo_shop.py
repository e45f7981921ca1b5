"""The demo shop: a seeded generator of a catalog and engagement logs.

No real shop's data ships offline, so `itemsage demo-data` invents one, in the INPUT format of
The data contract of docs/ARCHITECTURE.md (what a user would bring to `itemsage ingest`):

    DIR/catalog.parquet       one row per product: text fields, price, image_embeddings
    DIR/engagements.parquet   one row per (query, product, engagement); queries in time order,
                              each query's rows together (a session-ordered log)
    DIR/manifest.json         kind `demo-data`: config, counts per surface x engagement, sha256s

The world behind it is latent and never written:
- products have a category, brand (tied to a price tier and a few categories), colours, pattern,
  materials, size and a latent visual *style*. Image vectors are built from style + category +
  colour + pattern + noise, so style is visible ONLY in the images, while brand, material and size
  are visible ONLY in the text. Popularity is Zipf-like; some products launch during the window.
- users have a price tier, two preferred styles and three interest clusters (category, style,
  brand). Queries come from these interests:
  search  — text built from a target product's attributes; engaged products match those attributes;
  closeup — the image vector of the product being viewed (+ noise); engaged products share its style
            and category;
  home    — the medoid of the image vectors of a user's cluster history (PinnerSage-like); engaged
            products follow that cluster.
  Closeup and home rows name the catalog product their query vector comes from as
  query_product_id (the viewed product; the medoid, itself a product), beside the vector.
  Every engaged product is a click; some are also saved (favours the user's styles), added to cart
  and checked out (favour the user's price tier and brands), so the four tasks differ.

Everything is vectorised numpy with `np.random.Generator`s seeded per (seed, stream, chunk): the same
seed gives byte-identical files, and memory stays bounded because text, image vectors and log rows
are built and written chunk by chunk (the writer encodes one chunk on a thread while the next is
generated). Only small integer attributes of products and users (a few dozen bytes each) stay in
memory; the main image vectors, which the closeup and home queries reuse, go to a scratch
memory-mapped file that the OS may page out.

Axes: N products, U users, K interest clusters per user, H history products per cluster, D image
width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itemsage import artifacts, schema
from itemsage.config import ConfigError, require

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.parquet"
ENGAGEMENTS_FILE = "engagements.parquet"
MANIFEST_KIND = "demo-data"

# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """What to generate. Sizes scale from a thousand to millions of products."""

    products: int = 20_000
    seed: int = 0
    days: int = 28
    users: int | None = None  # None: products // 5, at least 50
    image_dim: int = 256  # the paper's PinSage width
    engagements_per_product: float = 25.0  # log rows per product, all surfaces and types
    styles: int = 24  # latent visual styles (image-only signal)
    brands: int = 300
    max_images: int = 4  # 1..max_images image vectors per product
    late_fraction: float = 0.1  # products launched during the window (cold start)
    popularity_skew: float = 0.8  # Zipf exponent of product popularity
    surface_mix: tuple[float, float, float] = (0.4, 0.4, 0.2)  # search, closeup, home queries
    start_date: str = "2024-01-01"  # first day of the logs, UTC
    catalog_chunk: int = 20_000  # products per catalog row group
    chunk_rows: int = 100_000  # about this many log rows per engagement row group

    def __post_init__(self) -> None:
        require(self.products >= 10, f"`products` ({self.products}) must be at least 10.")
        require(self.seed >= 0, f"`seed` ({self.seed}) must be a non-negative integer.")
        require(2 <= self.days <= 3650, f"`days` ({self.days}) must be between 2 and 3650.")
        require(self.users is None or self.users >= 1, f"`users` ({self.users}) must be at least 1.")
        require(8 <= self.image_dim <= 4096, f"`image_dim` ({self.image_dim}) must be in 8..4096.")
        require(self.engagements_per_product > 0,
                f"`engagements_per_product` ({self.engagements_per_product}) must be positive.")
        require(2 <= self.styles <= 1000, f"`styles` ({self.styles}) must be in 2..1000.")
        most = sum(len(names) for names in _brand_candidates())
        require(2 <= self.brands <= most, f"`brands` ({self.brands}) must be in 2..{most}.")
        require(1 <= self.max_images <= schema.MAX_IMAGES,
                f"`max_images` ({self.max_images}) must be in 1..{schema.MAX_IMAGES}.")
        require(0.0 <= self.late_fraction < 1.0,
                f"`late_fraction` ({self.late_fraction}) must be in [0, 1).")
        require(0.0 <= self.popularity_skew <= 3.0,
                f"`popularity_skew` ({self.popularity_skew}) must be in [0, 3].")
        require(len(self.surface_mix) == 3 and min(self.surface_mix) >= 0 and sum(self.surface_mix) > 0,
                f"`surface_mix` {self.surface_mix} must be three non-negative weights "
                "(search, closeup, home) with a positive sum.")
        try:
            dt.date.fromisoformat(self.start_date)
        except ValueError:
            raise ConfigError(f"`start_date` ({self.start_date!r}) must be a date like 2024-01-01.") from None
        require(self.catalog_chunk >= 1, f"`catalog_chunk` ({self.catalog_chunk}) must be positive.")
        # Offsets of the list<float32> columns are int32: one row group must hold < 2**31 floats.
        require(1_000 <= self.chunk_rows and self.chunk_rows * 2 * self.image_dim < 2**31,
                f"`chunk_rows` ({self.chunk_rows}) must be at least 1000 and below "
                f"{2**30 // self.image_dim} for image_dim {self.image_dim}.")
        require(self.catalog_chunk * self.max_images * self.image_dim < 2**31,
                f"`catalog_chunk` ({self.catalog_chunk}) is too large for {self.max_images} images "
                f"of width {self.image_dim}; lower it.")

    @property
    def n_users(self) -> int:
        return self.users if self.users is not None else max(50, self.products // 5)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "users": self.n_users}


# ------------------------------------------------------------------------------------------------
# The world's vocabulary: a Google-product-category-like taxonomy and its attributes
# ------------------------------------------------------------------------------------------------

# group: (materials, sizes, size types). Materials and sizes only ever reach the text.
_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "furniture": (("oak", "walnut", "pine", "metal", "rattan", "velvet", "leather", "teak"),
                  ("compact", "standard", "large", "oversized"), ("dimensions",)),
    "decor": (("ceramic", "glass", "brass", "marble", "wood", "concrete", "terracotta"),
              ("small", "medium", "large"), ("dimensions",)),
    "textiles": (("cotton", "linen", "wool", "jute", "polyester", "velvet", "bamboo"),
                 ("twin", "full", "queen", "king"), ("bed size", "standard")),
    "kitchen": (("stainless steel", "cast iron", "ceramic", "stoneware", "glass", "porcelain", "copper"),
                ("set of 2", "set of 4", "set of 6", "set of 8"), ("set",)),
    "apparel": (("cotton", "linen", "wool", "silk", "denim", "polyester", "cashmere"),
                ("XS", "S", "M", "L", "XL", "XXL"), ("regular", "petite", "plus", "tall")),
    "shoes": (("leather", "suede", "canvas", "mesh", "rubber"),
              ("6", "7", "8", "9", "10", "11"), ("regular", "wide")),
    "bags": (("leather", "canvas", "nylon", "suede", "straw"),
             ("mini", "small", "medium", "large"), ("regular",)),
    "jewelry": (("gold", "silver", "sterling silver", "rose gold", "pearl", "stainless steel"),
                ("one size", "adjustable", "small", "large"), ("regular",)),
}

# Leaf categories: (path, group, noun, product-type modifiers, typical price). Each product type is
# "<modifier> <noun>", so a title always contains the noun a shopper searches for.
_HG, _AA = "Home & Garden", "Apparel & Accessories"
_LEAVES: tuple[tuple[str, str, str, tuple[str, ...], float], ...] = (
    (f"{_HG} > Furniture > Chairs", "furniture", "chair", ("accent", "dining", "office"), 180),
    (f"{_HG} > Furniture > Sofas", "furniture", "sofa", ("sectional", "loveseat", "sleeper"), 900),
    (f"{_HG} > Furniture > Tables", "furniture", "table", ("coffee", "dining", "side"), 350),
    (f"{_HG} > Furniture > Beds", "furniture", "bed", ("platform", "canopy", "storage"), 700),
    (f"{_HG} > Furniture > Shelving > Bookcases", "furniture", "bookcase", ("ladder", "corner", "cube"), 250),
    (f"{_HG} > Furniture > Benches", "furniture", "bench", ("entryway", "storage", "garden"), 200),
    (f"{_HG} > Decor > Vases", "decor", "vase", ("bud", "floor", "table"), 45),
    (f"{_HG} > Decor > Artwork", "decor", "print", ("framed", "poster", "botanical"), 80),
    (f"{_HG} > Decor > Mirrors", "decor", "mirror", ("wall", "floor", "vanity"), 150),
    (f"{_HG} > Decor > Candles", "decor", "candle", ("pillar", "taper", "jar"), 25),
    (f"{_HG} > Decor > Clocks", "decor", "clock", ("wall", "mantel", "alarm"), 60),
    (f"{_HG} > Lighting > Lamps", "decor", "lamp", ("table", "floor", "desk"), 120),
    (f"{_HG} > Lighting > Light Fixtures", "decor", "light", ("pendant", "ceiling", "sconce"), 200),
    (f"{_HG} > Linens & Bedding > Bedding", "textiles", "set", ("sheet", "duvet", "quilt"), 120),
    (f"{_HG} > Decor > Throw Pillows", "textiles", "pillow", ("throw", "lumbar", "floor"), 40),
    (f"{_HG} > Linens & Bedding > Blankets", "textiles", "blanket", ("throw", "weighted", "knit"), 70),
    (f"{_HG} > Decor > Window Treatments > Curtains", "textiles", "curtain", ("blackout", "sheer", "cafe"), 60),
    (f"{_HG} > Decor > Rugs", "textiles", "rug", ("area", "runner", "round"), 220),
    (f"{_HG} > Kitchen & Dining > Cookware", "kitchen", "pan", ("frying", "saute", "grill"), 70),
    (f"{_HG} > Kitchen & Dining > Tableware > Dinnerware", "kitchen", "plate", ("dinner", "salad", "dessert"), 50),
    (f"{_HG} > Kitchen & Dining > Tableware > Drinkware", "kitchen", "mug", ("coffee", "travel", "tea"), 25),
    (f"{_HG} > Kitchen & Dining > Tableware > Serveware", "kitchen", "bowl", ("serving", "salad", "fruit"), 40),
    (f"{_HG} > Kitchen & Dining > Food Storage", "kitchen", "jar", ("storage", "spice", "cookie"), 20),
    (f"{_AA} > Clothing > Dresses", "apparel", "dress", ("midi", "maxi", "wrap"), 90),
    (f"{_AA} > Clothing > Shirts & Tops", "apparel", "top", ("tank", "crop", "tunic"), 40),
    (f"{_AA} > Clothing > Pants", "apparel", "pants", ("cargo", "chino", "jogger"), 70),
    (f"{_AA} > Clothing > Skirts", "apparel", "skirt", ("pleated", "pencil", "tiered"), 55),
    (f"{_AA} > Clothing > Outerwear > Coats & Jackets", "apparel", "jacket", ("bomber", "puffer", "rain"), 140),
    (f"{_AA} > Clothing > Sweaters", "apparel", "sweater", ("crewneck", "cardigan", "turtleneck"), 80),
    (f"{_AA} > Shoes > Sneakers", "shoes", "sneaker", ("running", "skate", "court"), 95),
    (f"{_AA} > Shoes > Boots", "shoes", "boot", ("ankle", "chelsea", "hiking"), 150),
    (f"{_AA} > Shoes > Sandals", "shoes", "sandal", ("slide", "strappy", "wedge"), 60),
    (f"{_AA} > Shoes > Heels", "shoes", "heel", ("block", "stiletto", "kitten"), 110),
    (f"{_AA} > Handbags, Wallets & Cases > Handbags", "bags", "bag", ("tote", "crossbody", "shoulder"), 120),
    (f"{_AA} > Handbags, Wallets & Cases > Backpacks", "bags", "backpack", ("laptop", "hiking", "travel"), 85),
    (f"{_AA} > Handbags, Wallets & Cases > Wallets", "bags", "wallet", ("bifold", "zip", "card"), 45),
    (f"{_AA} > Jewelry > Necklaces", "jewelry", "necklace", ("choker", "chain", "locket"), 75),
    (f"{_AA} > Jewelry > Earrings", "jewelry", "earrings", ("hoop", "stud", "drop"), 50),
    (f"{_AA} > Jewelry > Rings", "jewelry", "ring", ("stacking", "signet", "cocktail"), 65),
    (f"{_AA} > Jewelry > Bracelets", "jewelry", "bracelet", ("bangle", "cuff", "charm"), 55),
    (f"{_AA} > Jewelry > Watches", "jewelry", "watch", ("dress", "sport", "analog"), 180),
)

_COLORS = ("black", "white", "grey", "beige", "brown", "navy", "blue", "green", "olive", "red",
           "burgundy", "pink", "yellow", "orange", "purple", "teal")
_PATTERNS = ("solid", "striped", "floral", "plaid", "polka dot", "geometric", "paisley",
             "animal print", "abstract", "checkered")
_PATTERN_WEIGHTS = (0.4,) + (0.6 / 9,) * 9

# Price tiers of brands and users: budget, mid, premium, luxury.
_TIER_PRICE = np.array([0.5, 1.0, 2.0, 4.0])
_TIER_SHARE = np.array([0.35, 0.35, 0.2, 0.1])
_MARKETPLACES = ("shopmart.example", "bazaar.example", "dealhub.example", "homeandstyle.example")

# Noise in the text: independent of every latent attribute (so it says nothing about style).
_TITLE_NOISE = ("new", "classic", "everyday", "essential", "signature", "limited edition",
                "best seller", "gift idea", "free shipping", "2024 collection", "sale", "exclusive")
_SENTENCES = ("Ships in 2-3 business days.", "Easy returns within 30 days.", "Customer favourite.",
              "Care instructions on the label.", "Limited stock available.", "Designed for everyday use.",
              "Imported.", "", "")

_TITLE_TEMPLATES = (
    "{brand} {color} {material} {subtype}",
    "{subtype} - {color} {pattern} {material} | {brand}",
    "{noise} {brand} {material} {subtype}, {color}",
    "{color} {pattern} {subtype} by {brand}",
    "{brand} {subtype} in {color} (size {size})",
)
# Every description names every attribute, so the text carries all of them.
_DESCRIPTION_TEMPLATES = (
    "{brand}'s {subtype} in {materials}; {colors}, {pattern} pattern. "
    "Size {size} ({size_type}). {sentence}",
    "Made from {materials}, this {colors} {subtype} from {brand} comes in {pattern}. "
    "Available in size {size}, {size_type} fit. {sentence}",
    "{sentence} A {pattern} {colors} {subtype} by {brand}. Material: {materials}. "
    "Size: {size} ({size_type}).",
    "Shop the {brand} {subtype}: {colors}, {pattern}, {materials}. Size {size}, {size_type}. {sentence}",
)

# Search queries, built from a target product; each names the attributes its matching set shares.
_QUERY_TEMPLATES = (
    "{prefix}{brand} {material} {noun}",  # (brand, category, material)
    "{prefix}{color} {noun}",  # (colour, category)
    "{prefix}{material} {subtype} size {size}",  # (material, product type, size)
    "{prefix}{brand} {noun}",  # (brand, category)
    "{prefix}{color} {pattern} {noun}",  # (colour, pattern, category)
    "{prefix}{material} {noun}",  # (material, category)
)
_QUERY_TEMPLATE_WEIGHTS = np.array([0.2, 0.2, 0.1, 0.2, 0.15, 0.15])
_QUERY_PREFIXES = ("", "best ", "cheap ", "buy ", "new ")
_QUERY_PREFIX_WEIGHTS = np.array([0.85, 0.04, 0.04, 0.04, 0.03])


def _brand_candidates() -> tuple[list[str], list[str]]:
    """Invented, word-like brand names: (two-syllable names, three-syllable names)."""
    onsets = ("Al", "Bel", "Cor", "Dar", "El", "Fen", "Gar", "Hal", "Isk", "Jun", "Kel", "Lum", "Mar",
              "Nor", "Orv", "Pel", "Quin", "Ros", "Sol", "Tal", "Ulm", "Ver", "Wil", "Xan", "Yor", "Zel")
    middles = ("a", "e", "i", "o", "u", "ar", "en", "il", "or", "um")
    codas = ("vek", "dro", "quin", "mix", "zor", "brix", "tis", "lume", "wyn", "dax", "vik", "sko",
             "rett", "nus", "gard")
    two = [o + c for o in onsets for c in codas]
    three = [o + m + c for o in onsets for m in middles for c in codas]
    return two, three


# Image mixing weights. Components are unit vectors (noise: unit expected norm), so e.g. two
# products of one category and style have cosine ~0.6, of one category and two styles ~0.35.
_W_STYLE, _W_CATEGORY, _W_COLOR, _W_PATTERN = 0.9, 1.0, 0.6, 0.4
_W_PRODUCT_NOISE, _W_MAIN_IMAGE_NOISE, _W_OTHER_IMAGE_NOISE = 0.6, 0.3, 0.6
_W_CLOSEUP_QUERY_NOISE = 0.25

# Funnel: every engaged product is a click; saves favour the user's styles, carts and checkouts
# the user's price tier and brands (so the four tasks rank products differently).
_SAVE_RATE, _CART_RATE, _CHECKOUT_GIVEN_CART = 0.25, 0.022, 0.3
_TIER_GAP_FACTOR = np.array([2.5, 0.8, 0.25, 0.1])  # by |product tier - user tier|
_MAX_ENGAGED_PER_QUERY = 6
_ROWS_PER_QUERY = 2.35  # measured: 2.25 at 20k products, 2.47 at 1M (fewer duplicate engagements)
_USER_CLUSTERS, _USER_STYLES, _HISTORY = 3, 2, 5

# Independent random streams: (seed, stream, chunk) seeds one Generator.
_WORLD, _PRODUCTS, _TEXT, _IMAGES, _USERS, _MEDOIDS, _EVENTS = range(7)
_DAY_MS = 86_400_000


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


# ------------------------------------------------------------------------------------------------
# Vectorised helpers
# ------------------------------------------------------------------------------------------------


class _GroupSampler:
    """Draw items of a group with probability ∝ weight, among the items launched by a given day.

    Items are sorted by (group key, launch day), so a group's items available on a day form one
    contiguous run, and a single `searchsorted` over the running sum of weights draws from it.
    """

    def __init__(self, keys: np.ndarray, weights: np.ndarray, launch: np.ndarray | None = None,
                 days: int = 0) -> None:
        self.span = days + 1
        combo = keys.astype(np.int64) * self.span
        if launch is not None:
            combo += launch
        order = np.argsort(combo, kind="stable")
        self.combo = combo[order]
        self.order = order
        self.cum = np.concatenate([[0.0], np.cumsum(weights[order], dtype=np.float64)])

    def sample(self, rng: np.random.Generator, keys: np.ndarray, day: int | None = None) -> np.ndarray:
        """[n] group keys -> [n] item indices, -1 where the group has no item by `day`."""
        base = keys.astype(np.int64) * self.span
        lo = np.searchsorted(self.combo, base, "left")
        hi = np.searchsorted(self.combo, base + (self.span - 1 if day is None else day), "right")
        u = self.cum[lo] + rng.random(len(keys)) * (self.cum[hi] - self.cum[lo])
        pos = np.clip(np.searchsorted(self.cum, u, "right") - 1, lo, np.maximum(hi - 1, lo))
        pos = np.minimum(pos, len(self.order) - 1)
        return np.where(hi > lo, self.order[pos], -1)


def _draw(rng: np.random.Generator, attempts: list[tuple[_GroupSampler, np.ndarray]],
          day: int | None = None) -> np.ndarray:
    """Try samplers in order (e.g. category+style, then category, then anything); -1 if all fail."""
    out = np.full(len(attempts[0][1]), -1, dtype=np.int64)
    for sampler, keys in attempts:
        miss = np.flatnonzero(out < 0)
        if len(miss) == 0:
            break
        out[miss] = sampler.sample(rng, keys[miss], day)
    return out


def _choice(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """n draws from a categorical distribution (weights need not sum to 1)."""
    cum = np.cumsum(weights) / np.sum(weights)
    return np.minimum(np.searchsorted(cum, rng.random(n), "right"), len(weights) - 1)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def _strings(values: tuple[str, ...] | list[str]) -> pa.Array:
    return pa.array(list(values), type=pa.string())


def _render(templates: tuple[str, ...], which: np.ndarray, fields: dict[str, pa.Array]) -> pa.Array:
    """Fill template `which[i]` for row i with the rows of `fields`; vectorised per template."""
    n = len(which)
    pieces: list[pa.Array] = []
    rows_in_order: list[np.ndarray] = []
    for t, template in enumerate(templates):
        rows = np.flatnonzero(which == t)
        if len(rows) == 0:
            continue
        take = pa.array(rows)
        parts: list[Any] = []
        for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
            if literal:
                parts.append(pa.scalar(literal))
            if name:
                parts.append(fields[name].take(take))
        joined = pc.binary_join_element_wise(*parts, "")
        pieces.append(joined if isinstance(joined, pa.Array) else pa.array([joined.as_py()] * len(rows)))
        rows_in_order.append(rows)
    if not pieces:
        return pa.array([], type=pa.string())
    stacked = pa.concat_arrays(pieces)
    inverse = np.empty(n, dtype=np.int64)
    inverse[np.concatenate(rows_in_order)] = np.arange(n)
    # Collapse the double spaces an empty noise slot leaves, and trim the ends.
    text = stacked.take(pa.array(inverse))
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"\s{2,}", " "))


def _joined_list(first: pa.Array, second: pa.Array, has_second: np.ndarray, sep: str) -> pa.Array:
    """'a' or 'a{sep}b' per row."""
    both = pc.binary_join_element_wise(first, pa.scalar(sep), second, "")
    return pc.if_else(pa.array(has_second), both, first)


def _list_column(first: np.ndarray, second: np.ndarray, names: pa.Array) -> pa.Array:
    """One or two names per row (second < 0: none) as list<string>."""
    counts = 1 + (second >= 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = np.empty(offsets[-1], dtype=np.int64)
    flat[offsets[:-1]] = first
    two = np.flatnonzero(second >= 0)
    flat[offsets[two] + 1] = second[two]
    return pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(flat)))


def _id_strings(prefix: str, n: int) -> pa.Array:
    width = max(6, len(str(n - 1)))
    return pa.array(np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), width)), type=pa.string())


# ------------------------------------------------------------------------------------------------
# The shop
# ------------------------------------------------------------------------------------------------


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


class DemoShop:
    """A seeded shop: taxonomy, brands, products and users, plus the functions that render the
    catalog and the engagement logs chunk by chunk. `DemoShop(cfg)` is cheap to rebuild, so tests
    read the latent truth from it (`shop.products.style`, ...) without it ever being written."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        start = dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.timezone.utc)
        self.t0 = int(start.timestamp() * 1000)  # the logs' first millisecond (day 0)
        self._build_taxonomy()
        rng = _rng(cfg.seed, _WORLD)
        self._build_brands(rng)
        self._build_vectors(rng)
        self.products = self._build_products()
        self.product_ids = _id_strings("p", cfg.products)
        self._build_samplers()
        self.users = self._build_users()
        self.user_ids = _id_strings("u", cfg.n_users)

    # -- world --------------------------------------------------------------------------------

    def _build_taxonomy(self) -> None:
        groups = list(_GROUPS)
        self.category_paths = [leaf[0] for leaf in _LEAVES]
        self.category_group = np.array([groups.index(leaf[1]) for leaf in _LEAVES])
        self.category_noun = [leaf[2] for leaf in _LEAVES]
        self.category_price = np.array([leaf[4] for leaf in _LEAVES], dtype=np.float64)
        self.subtypes: list[str] = []
        sub_start, sub_count = [], []
        for _, _, noun, modifiers, _ in _LEAVES:
            sub_start.append(len(self.subtypes))
            sub_count.append(len(modifiers))
            self.subtypes += [f"{m} {noun}" for m in modifiers]
        self.subtype_category = np.repeat(np.arange(len(_LEAVES)), sub_count)
        self.category_sub_start, self.category_sub_count = np.array(sub_start), np.array(sub_count)
        self._group_count = np.bincount(self.category_group, minlength=len(groups))
        self._group_start = np.concatenate([[0], np.cumsum(self._group_count)[:-1]])
        self._group_leaves = np.argsort(self.category_group, kind="stable")
        self.product_types = [f"{self.category_paths[c].split(' > ')[-1]} > {s.title()}"
                              for c, s in zip(self.subtype_category, self.subtypes)]
        # Materials: one shared vocabulary; sizes and size types: one flat list (group-local ids).
        self.materials = sorted({m for mats, _, _ in _GROUPS.values() for m in mats})
        self.group_materials = [np.array([self.materials.index(m) for m in mats]) for mats, _, _ in _GROUPS.values()]
        self.sizes: list[str] = []
        self.size_types: list[str] = []
        self.group_sizes, self.group_size_types = [], []
        for _, sizes, size_types in _GROUPS.values():
            self.group_sizes.append(np.arange(len(self.sizes), len(self.sizes) + len(sizes)))
            self.sizes += list(sizes)
            self.group_size_types.append(np.arange(len(self.size_types), len(self.size_types) + len(size_types)))
            self.size_types += list(size_types)

    def _build_brands(self, rng: np.random.Generator) -> None:
        cfg, n_cat = self.cfg, len(_LEAVES)
        two, three = _brand_candidates()  # short names first, longer ones only when needed
        pick = np.concatenate([rng.permutation(len(two)), len(two) + rng.permutation(len(three))])
        self.brand_names = [(two + three)[i] for i in pick[: cfg.brands]]
        self.brand_tier = _choice(rng, _TIER_SHARE, cfg.brands)
        self.brand_size = rng.lognormal(0.0, 1.0, cfg.brands)  # some brands carry far more products
        # Each brand sells 1-4 categories, mostly within one group; every category gets a brand.
        pairs: list[tuple[int, int]] = []
        for b in range(cfg.brands):
            group = rng.integers(len(_GROUPS))
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
        self.color_weight = rng.dirichlet(np.full(len(_COLORS), 4.0))
        self.style_weight = rng.dirichlet(np.full(cfg.styles, 8.0))

    def _build_vectors(self, rng: np.random.Generator) -> None:
        d = self.cfg.image_dim

        def basis(n: int) -> np.ndarray:
            return _unit(rng.standard_normal((n, d)).astype(np.float32))

        self.style_vectors = basis(self.cfg.styles)
        self.category_vectors = basis(len(_LEAVES))
        self.color_vectors = basis(len(_COLORS))
        self.pattern_vectors = basis(len(_PATTERNS))
        # Pre-mixed pairs, so a product's visible part is two gathers: [S*C, D] and [colours*P, D].
        self._style_category = (_W_STYLE * self.style_vectors[:, None, :]
                                + _W_CATEGORY * self.category_vectors[None, :, :]).reshape(-1, d)
        self._color_pattern = (_W_COLOR * self.color_vectors[:, None, :]
                               + _W_PATTERN * self.pattern_vectors[None, :, :]).reshape(-1, d)
        self.main_images: np.ndarray | None = None  # [N, D], filled while the catalog is rendered

    # -- products -----------------------------------------------------------------------------

    def _build_products(self) -> ProductLatents:
        cfg = self.cfg
        brand_by_category = _GroupSampler(self.pair_category, self.brand_size[self.pair_brand])
        chunks = []
        for chunk, start in enumerate(range(0, cfg.products, cfg.catalog_chunk)):
            n = min(cfg.catalog_chunk, cfg.products - start)
            rng = _rng(cfg.seed, _PRODUCTS, chunk)
            cat = _choice(rng, self.category_weight, n)
            group = self.category_group[cat]
            sub = self.category_sub_start[cat] + (rng.random(n) * self.category_sub_count[cat]).astype(np.int64)
            brand = self.pair_brand[brand_by_category.sample(rng, cat)]
            color = _choice(rng, self.color_weight, n)
            color2 = np.where(rng.random(n) < 0.2, _choice(rng, self.color_weight, n), -1)
            color2[color2 == color] = -1
            # Materials and sizes come from the category's group.
            mat_pick = rng.random((n, 2))
            sizes_pick, types_pick = rng.random(n), rng.random(n)
            material, material2 = np.empty(n, np.int64), np.empty(n, np.int64)
            size, size_type = np.empty(n, np.int64), np.empty(n, np.int64)
            for g in range(len(_GROUPS)):
                rows = np.flatnonzero(group == g)
                mats = self.group_materials[g]
                material[rows] = mats[(mat_pick[rows, 0] * len(mats)).astype(np.int64)]
                material2[rows] = mats[(mat_pick[rows, 1] * len(mats)).astype(np.int64)]
                size[rows] = self.group_sizes[g][(sizes_pick[rows] * len(self.group_sizes[g])).astype(np.int64)]
                types = self.group_size_types[g]
                size_type[rows] = types[(types_pick[rows] * len(types)).astype(np.int64)]
            material2[(rng.random(n) >= 0.2) | (material2 == material)] = -1
            price = (self.category_price[cat] * _TIER_PRICE[self.brand_tier[brand]]
                     * rng.lognormal(0.0, 0.3, n))
            late = rng.random(n) < cfg.late_fraction
            launch = np.where(late, rng.integers(1, cfg.days, n), 0)
            if start == 0:
                launch[0] = 0  # at least one product is on sale from day 0
            chunks.append(dict(
                category=cat, subtype=sub, style=_choice(rng, self.style_weight, n), brand=brand,
                color=color, color2=color2, pattern=_choice(rng, np.array(_PATTERN_WEIGHTS), n),
                material=material, material2=material2, size=size, size_type=size_type,
                price=np.round(price, 2),
                n_images=_choice(rng, 0.7 ** np.arange(cfg.max_images), n) + 1,  # main image first
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
        n_cat, n_mat = len(_LEAVES), len(self.materials)
        cat, brand = p.category.astype(np.int64), p.brand.astype(np.int64)

        def sampler(keys: np.ndarray) -> _GroupSampler:
            return _GroupSampler(keys, p.popularity, p.launch_day, cfg.days)

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
            lambda a: (p.color[a].astype(np.int64) * len(_PATTERNS) + p.pattern[a]) * n_cat + cat[a],
            lambda a: p.material[a].astype(np.int64) * n_cat + cat[a],
        )
        all_rows = np.arange(cfg.products)
        self.by_query = [self.by_brand_category if t == 3 else sampler(key(all_rows))
                         for t, key in enumerate(self.query_keys)]

    # -- users --------------------------------------------------------------------------------

    def _build_users(self) -> UserLatents:
        cfg, n_cat, K = self.cfg, len(_LEAVES), _USER_CLUSTERS
        brand_for = _GroupSampler(self.pair_category * 4 + self.brand_tier[self.pair_brand],
                                  self.brand_size[self.pair_brand])
        brand_any = _GroupSampler(self.pair_category, self.brand_size[self.pair_brand])
        chunks = []
        for chunk, start in enumerate(range(0, cfg.n_users, 50_000)):
            n = min(50_000, cfg.n_users - start)
            rng = _rng(cfg.seed, _USERS, chunk)
            tier = _choice(rng, _TIER_SHARE, n)
            styles = np.stack([_choice(rng, self.style_weight, n) for _ in range(_USER_STYLES)], 1)
            # First interest anywhere; the others mostly in the same group (a home person, ...).
            cats = np.empty((n, K), np.int64)
            cats[:, 0] = _choice(rng, self.category_weight, n)
            group = self.category_group[cats[:, 0]]
            for k in range(1, K):
                # A uniform leaf of the first interest's group, via per-group offsets.
                in_group = self._group_leaves[self._group_start[group]
                                              + (rng.random(n) * self._group_count[group]).astype(np.int64)]
                cats[:, k] = np.where(rng.random(n) < 0.6, in_group, _choice(rng, self.category_weight, n))
            cstyle = styles[np.arange(n)[:, None], rng.integers(0, _USER_STYLES, (n, K))]
            # A brand per cluster that sells its category, preferably in the user's price tier.
            pair = _draw(rng, [(brand_for, (cats * 4 + tier[:, None]).ravel()), (brand_any, cats.ravel())])
            weights = rng.dirichlet(np.ones(K), n)
            chunks.append(dict(tier=tier, styles=styles, cluster_category=cats, cluster_style=cstyle,
                               cluster_brand=self.pair_brand[pair].reshape(n, K),
                               cluster_cum=np.cumsum(weights, 1), activity=rng.lognormal(0.0, 1.0, n)))
        users = UserLatents(**{k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})
        users.cluster_cum[:, -1] = 1.0
        self._user_sampler = _GroupSampler(np.zeros(cfg.n_users, np.int64), users.activity)
        return users

    # -- image vectors ------------------------------------------------------------------------

    def _visible(self, products: np.ndarray) -> np.ndarray:
        """[n] products -> [n, D] style + category + colour + pattern (not normalised).

        Brand, material and size do not enter: they are text-only signal."""
        p = self.products
        v = self._style_category[p.style[products].astype(np.int64) * len(_LEAVES) + p.category[products]]
        v += self._color_pattern[p.color[products].astype(np.int64) * len(_PATTERNS) + p.pattern[products]]
        c2 = p.color2[products]
        two = np.flatnonzero(c2 >= 0)  # a second colour shares the colour weight with the first
        v[two] += (_W_COLOR * (math.sqrt(0.5) - 1.0)) * self.color_vectors[p.color[products[two]]]
        v[two] += (_W_COLOR * math.sqrt(0.5)) * self.color_vectors[c2[two]]
        return v

    def image_vectors(self, start: int, counts: np.ndarray) -> np.ndarray:
        """All image vectors of products [start, start + len(counts)), main image first:
        [sum(counts), D] float32 unit rows = visible part + product noise + per-image noise."""
        cfg = self.cfg
        n, d = len(counts), cfg.image_dim
        rng = _rng(cfg.seed, _IMAGES, start)
        scale = np.float32(1.0 / math.sqrt(d))  # unit expected norm of a noise vector
        product = self._visible(np.arange(start, start + n))
        product += rng.standard_normal((n, d), dtype=np.float32) * (scale * _W_PRODUCT_NOISE)
        owner = np.repeat(np.arange(n), counts)
        first = np.cumsum(counts) - counts
        w_image = np.full(len(owner), _W_OTHER_IMAGE_NOISE * scale, np.float32)
        w_image[first] = _W_MAIN_IMAGE_NOISE * scale
        v = rng.standard_normal((len(owner), d), dtype=np.float32)
        v *= w_image[:, None]
        v += product[owner]
        return _unit(v)

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
        rng = _rng(self.cfg.seed, _TEXT, start)
        brand = p.brand[idx]

        def names(vocab: list[str] | tuple[str, ...], ids: np.ndarray) -> pa.Array:
            return _strings(vocab).take(pa.array(ids.astype(np.int64)))

        color, color2 = p.color[idx].astype(np.int64), p.color2[idx].astype(np.int64)
        mat, mat2 = p.material[idx].astype(np.int64), p.material2[idx].astype(np.int64)
        color_names, mat_names = _strings(_COLORS), _strings(self.materials)
        fields = {
            "brand": names(self.brand_names, brand),
            "color": names(_COLORS, color),
            "colors": _joined_list(names(_COLORS, color), names(_COLORS, np.maximum(color2, 0)), color2 >= 0, " and "),
            "material": names(self.materials, mat),
            "materials": _joined_list(names(self.materials, mat), names(self.materials, np.maximum(mat2, 0)),
                                      mat2 >= 0, " and "),
            "pattern": names(_PATTERNS, p.pattern[idx]),
            "subtype": names(self.subtypes, p.subtype[idx]),
            "size": names(self.sizes, p.size[idx]),
            "size_type": names(self.size_types, p.size_type[idx]),
            "noise": names(("",) + _TITLE_NOISE,  # half the titles carry a noise word
                           np.where(rng.random(n) < 0.5, rng.integers(1, len(_TITLE_NOISE) + 1, n), 0)),
            "sentence": names(_SENTENCES, rng.integers(0, len(_SENTENCES), n)),
        }
        title = _render(_TITLE_TEMPLATES, rng.integers(0, len(_TITLE_TEMPLATES), n), fields)
        description = _render(_DESCRIPTION_TEMPLATES, rng.integers(0, len(_DESCRIPTION_TEMPLATES), n), fields)
        # A brand's own shop or a marketplace; the link names the product.
        brand_domains = [f"{b.lower()}.example" for b in self.brand_names]
        marketplace = rng.random(n) < 0.4
        domain = pc.if_else(pa.array(marketplace), names(_MARKETPLACES, rng.integers(0, len(_MARKETPLACES), n)),
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
            "colors": _list_column(color, color2, color_names),
            "materials": _list_column(mat, mat2, mat_names),
            "patterns": fields["pattern"],
            "size": fields["size"],
            "size_type": fields["size_type"],
            "product_type": names(self.product_types, p.subtype[idx]),
            "category": names(self.category_paths, p.category[idx]),
            "domain": domain,
            "links": links,
            "price": pa.array(p.price[idx]),
            # When the product went on sale (the day it can first be engaged), as a shop's catalog records it.
            schema.LISTED_AT: pa.array(self.t0 + p.launch_day[idx].astype(np.int64) * _DAY_MS).cast(
                pa.timestamp("ms", tz="UTC")),
            schema.IMAGE_EMBEDDINGS: images,
        })

    # -- users' home queries ------------------------------------------------------------------

    def compute_medoids(self, chunk: int = 20_000, advance=lambda n: None) -> None:
        """PinnerSage-like home queries: for each user cluster, the medoid of the main image
        vectors of H history products drawn from that cluster (before the log window)."""
        u, cfg, K = self.users, self.cfg, _USER_CLUSTERS
        medoid = np.empty((cfg.n_users, K), np.int64)
        for c, start in enumerate(range(0, cfg.n_users, chunk)):
            stop = min(start + chunk, cfg.n_users)
            rng = _rng(cfg.seed, _MEDOIDS, c)
            cat = np.repeat(u.cluster_category[start:stop].ravel(), _HISTORY)
            style = np.repeat(u.cluster_style[start:stop].ravel(), _HISTORY)
            history = _draw(rng, [(self.by_category_style, cat * cfg.styles + style),
                                  (self.by_category, cat), (self.by_any, np.zeros_like(cat))], day=0)
            vec = self.main_image(history).reshape(-1, _HISTORY, cfg.image_dim)  # [U*K, H, D]
            sim = vec @ vec.transpose(0, 2, 1)  # [U*K, H, H] cosine
            best = sim.sum(-1).argmax(-1)  # the history product closest to all others
            medoid[start:stop] = history.reshape(-1, _HISTORY)[np.arange(len(best)), best].reshape(-1, K)
            advance(stop - start)
        u.medoid = medoid

    # -- engagement logs ----------------------------------------------------------------------

    def _preferred(self, rng: np.random.Generator, cat: np.ndarray, style: np.ndarray,
                   brand: np.ndarray, day: int) -> np.ndarray:
        """Products a user's interest cluster leads to: half by (category, style), a third by
        (brand, category), the rest by category; popular products more often."""
        n, s = len(cat), self.cfg.styles
        mode = _choice(rng, np.array([0.5, 0.3, 0.2]), n)
        out = np.full(n, -1, np.int64)
        first = [self.by_category_style, self.by_brand_category, self.by_category]
        keys = [cat * s + style, brand * len(_LEAVES) + cat, cat]
        for m in range(3):
            rows = np.flatnonzero(mode == m)
            out[rows] = _draw(rng, [(first[m], keys[m][rows]), (self.by_category, cat[rows]),
                                    (self.by_any, np.zeros(len(rows), np.int64))], day)
        return out

    def plan(self) -> list[tuple[int, int, int, int]]:
        """Chunks of the log: (day, start_ms, stop_ms, queries), in time order.

        Query volume grows a little over the window and is higher at weekends; a day splits into
        equal time slices of about `chunk_rows` rows each."""
        cfg = self.cfg
        total = cfg.engagements_per_product * cfg.products / _ROWS_PER_QUERY
        start = dt.datetime.fromisoformat(cfg.start_date).replace(tzinfo=dt.timezone.utc)
        t0 = self.t0
        days = np.arange(cfg.days)
        weekend = ((start.weekday() + days) % 7) >= 5
        weight = (1.0 + 0.5 * days / cfg.days) * np.where(weekend, 1.15, 1.0)
        per_day = np.floor(total * weight / weight.sum() + 0.5).astype(np.int64)
        per_chunk = max(1, int(cfg.chunk_rows / _ROWS_PER_QUERY))
        out = []
        for d, q in enumerate(per_day):
            pieces = max(1, math.ceil(q / per_chunk))
            for j in range(pieces):
                lo = t0 + d * _DAY_MS + j * _DAY_MS // pieces
                hi = t0 + d * _DAY_MS + (j + 1) * _DAY_MS // pieces
                out.append((d, lo, hi, int(q * (j + 1) // pieces - q * j // pieces)))
        return out

    def engagement_chunk(self, day: int, t0: int, t1: int, n: int, index: int) -> tuple[pa.Table, np.ndarray]:
        """The log rows of `n` queries in [t0, t1) ms, in session order, and counts [surface, engagement]."""
        cfg, p, u = self.cfg, self.products, self.users
        rng = _rng(cfg.seed, _EVENTS, index)
        # -- queries [n]
        user = self._user_sampler.sample(rng, np.zeros(n, np.int64))
        surface = _choice(rng, np.array(cfg.surface_mix, dtype=np.float64), n)  # 0 search, 1 closeup, 2 home
        q_time = rng.integers(t0, t1, n)
        cluster = (rng.random(n)[:, None] > u.cluster_cum[user]).sum(1)
        cat = u.cluster_category[user, cluster]
        style = u.cluster_style[user, cluster]
        brand = u.cluster_brand[user, cluster].astype(np.int64)
        # The search target or the product being viewed in closeup.
        anchor = self._preferred(rng, cat, style, brand, day)
        template = _choice(rng, _QUERY_TEMPLATE_WEIGHTS, n)

        # -- engaged products: one interaction per (query, product) [m]
        n_eng = np.minimum(rng.geometric(0.5, n), _MAX_ENGAGED_PER_QUERY)
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
            rows = np.flatnonzero((srf == 0) & (pos > 0) & (template[q] == t) & (r >= 0.1) & (a >= 0))
            product[rows] = self.by_query[t].sample(rng, key(a[rows]), day)
        rows = np.flatnonzero((srf == 0) & (pos > 0) & (r < 0.1) & (a >= 0))
        product[rows] = self.by_category.sample(rng, ac[rows], day)
        # closeup: the viewed product's category and style (15%: category only, 5%: anything).
        rows = np.flatnonzero((srf == 1) & (a >= 0))
        a_style = p.style[a[rows]].astype(np.int64)
        rr = r[rows]
        cs_key = np.where(rr < 0.8, ac[rows] * cfg.styles + a_style, -1)
        attempts = [(self.by_category_style, cs_key), (self.by_category, np.where(rr < 0.95, ac[rows], -1)),
                    (self.by_any, np.zeros(len(rows), np.int64))]
        product[rows] = _draw(rng, attempts, day)
        # Drawing the viewed product itself (popular, or alone in a small group): draw again, then
        # fall back to its category.
        again = np.flatnonzero(product[rows] == a[rows])
        product[rows[again]] = _draw(rng, [(sampler, keys[again]) for sampler, keys in attempts], day)
        again = rows[product[rows] == a[rows]]
        product[again] = self.by_category.sample(rng, ac[again], day)
        # home: the query's interest cluster (8%: another of the user's clusters, 4%: anything).
        rows = np.flatnonzero(srf == 2)
        uq, kq = user[q[rows]], cluster[q[rows]]
        other = r[rows] < 0.08
        kq = np.where(other, rng.integers(0, _USER_CLUSTERS, len(rows)), kq)
        product[rows] = self._preferred(rng, u.cluster_category[uq, kq], u.cluster_style[uq, kq],
                                        u.cluster_brand[uq, kq].astype(np.int64), day)
        anything = rows[r[rows] > 0.96]
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
        save = rng.random(len(q)) < _SAVE_RATE * np.where(style_match, 1.5, 0.5)
        cart = rng.random(len(q)) < _CART_RATE * _TIER_GAP_FACTOR[gap] * np.where(brand_match, 2.0, 1.0)
        checkout = cart & (rng.random(len(q)) < _CHECKOUT_GIVEN_CART * np.where(gap == 0, 1.3, 0.6))
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
                "prefix": _strings(_QUERY_PREFIXES).take(pa.array(_choice(rng, _QUERY_PREFIX_WEIGHTS, len(a)))),
                "brand": pc.utf8_lower(_strings(self.brand_names).take(pa.array(p.brand[a].astype(np.int64)))),
                "material": _strings(self.materials).take(pa.array(p.material[a].astype(np.int64))),
                "noun": _strings(self.category_noun).take(pa.array(p.category[a].astype(np.int64))),
                "color": _strings(_COLORS).take(pa.array(p.color[a].astype(np.int64))),
                "pattern": _strings(_PATTERNS).take(pa.array(p.pattern[a].astype(np.int64))),
                "subtype": _strings(self.subtypes).take(pa.array(p.subtype[a].astype(np.int64))),
                "size": pc.utf8_lower(_strings(self.sizes).take(pa.array(p.size[a].astype(np.int64)))),
            }
            rendered = _render(_QUERY_TEMPLATES, template[searches], fields)
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
        pool *= np.float32(_W_CLOSEUP_QUERY_NOISE / math.sqrt(cfg.image_dim))
        qvec[closeups] += pool[rng.integers(0, len(pool), len(closeups))]
        qvec[closeups] = _unit(qvec[closeups])
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
            schema.SURFACE: _strings(schema.SURFACES).take(pa.array(row_surface)),
            schema.ENGAGEMENT: _strings(schema.ENGAGEMENTS).take(pa.array(row_eng)),
            schema.PRODUCT_ID: self.product_ids.take(pa.array(product[row_inter])),
            schema.TIMESTAMP: pa.array(row_time, type=pa.timestamp("ms", tz="UTC")),
            schema.USER_ID: self.user_ids.take(pa.array(user[row_q])),
            schema.QUERY_TEXT: text.take(pa.array(row_q)),
            schema.QUERY_EMBEDDING: embedding,
            schema.QUERY_PRODUCT_ID: self.product_ids.take(pa.array(np.maximum(row_query_product, 0),
                                                                    mask=row_query_product < 0)),
        })
        counts = np.bincount(row_surface * 4 + row_eng, minlength=12).reshape(3, 4)
        return table, counts


# ------------------------------------------------------------------------------------------------
# Writing a demo-data directory
# ------------------------------------------------------------------------------------------------


def _prepare_out_dir(out: Path) -> None:
    """Refuse a directory holding anything but (part of) an earlier demo-data output; clear that.

    A run killed half-way leaves at most our own files (and hidden temp files), without a manifest:
    those are recognised by name, so the re-run simply starts over."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`--out` ({out}) is a file; pass a directory path (it is created if missing).")
    if not out.exists():
        return
    ours = {CATALOG_FILE, ENGAGEMENTS_FILE, artifacts.MANIFEST}
    foreign = sorted(e.name for e in out.iterdir() if e.name not in ours and not e.name.startswith("."))
    kind = None
    if (out / artifacts.MANIFEST).is_file():
        with contextlib.suppress(ValueError, OSError):
            kind = json.loads((out / artifacts.MANIFEST).read_text()).get("kind")
        if kind != MANIFEST_KIND:
            foreign.append(f"{artifacts.MANIFEST} of a '{kind}' artifact")
    if foreign:
        raise ConfigError(
            f"`--out` ({out}) holds other files ({', '.join(foreign[:5])}); demo-data will not write over "
            "them. Pass a new or empty directory."
        )
    # The manifest goes first, so a run killed half-way never looks finished.
    (out / artifacts.MANIFEST).unlink(missing_ok=True)
    for name in (CATALOG_FILE, ENGAGEMENTS_FILE):
        (out / name).unlink(missing_ok=True)
    for pattern in (f".{CATALOG_FILE}.*.tmp", f".{ENGAGEMENTS_FILE}.*.tmp", ".main_images.*.tmp"):
        for leftover in out.glob(pattern):
            leftover.unlink()


@contextlib.contextmanager
def _parquet_writer(target: Path) -> Iterator[Any]:
    """Yield write(table): one row group per call, into a temp file renamed over `target` at the end.

    Encoding runs on a background thread (pyarrow releases the GIL), so the next chunk is generated
    while the previous one is written; at most one chunk waits. Dictionary encoding and statistics
    only for the scalar columns: on float vectors they cost time and save nothing."""
    with artifacts.atomic_path(target) as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        writer: pq.ParquetWriter | None = None
        pending: Future | None = None

        def write(table: pa.Table) -> None:
            nonlocal writer, pending
            if writer is None:
                scalar = [f.name for f in table.schema if not pa.types.is_list(f.type)]
                strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
                # zstd(1): as fast as snappy here, and about halves the log, whose query vectors
                # repeat across the rows of one query.
                writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=strings, write_statistics=scalar,
                                          compression="zstd", compression_level=1)
            if pending is not None:
                pending.result()  # row groups stay in order; an error surfaces here
            pending = pool.submit(writer.write_table, table, row_group_size=len(table))

        try:
            yield write
            if pending is not None:
                pending.result()
        finally:
            if pending is not None:
                pending.exception()  # wait, so the writer is not closed under a running write
            if writer is not None:
                writer.close()


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Any]:
    from itemsage.progress import progress_bar

    with progress_bar(enabled, unit="rows") as bar:
        yield bar


def generate_demo_data(out_dir: str | Path, cfg: DemoConfig | None = None, *,
                       progress: bool = True) -> dict[str, Any]:
    """Write `catalog.parquet`, `engagements.parquet` and `manifest.json` under `out_dir`.

    Memory stays bounded: the catalog is written `catalog_chunk` products per row group and the log
    about `chunk_rows` rows per row group. Returns the manifest."""
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    _prepare_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("demo-data: %d products, %d users, %d days, seed %d", cfg.products, cfg.n_users, cfg.days, cfg.seed)
    shop = DemoShop(cfg)
    plan = shop.plan()
    counts = np.zeros((3, 4), np.int64)
    n_images = 0
    # The main image of every product is kept for the closeup and home queries, in a scratch file
    # the OS can page out, so memory stays bounded at any catalog size.
    scratch = out / f".main_images.{os.getpid()}.tmp"
    try:
        shop.main_images = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32,
                                                     shape=(cfg.products, cfg.image_dim))
        with _progress_bar(progress) as bar:
            task = bar.add_task("catalog", total=cfg.products)
            with _parquet_writer(out / CATALOG_FILE) as write:
                for table in shop.catalog_chunks():
                    write(table)
                    n_images += pc.sum(pc.list_value_length(table[schema.IMAGE_EMBEDDINGS])).as_py()
                    bar.advance(task, len(table))
            task = bar.add_task("home queries", total=cfg.n_users)
            shop.compute_medoids(advance=lambda k: bar.advance(task, k))
            task = bar.add_task("engagements", total=sum(c[3] for c in plan))
            with _parquet_writer(out / ENGAGEMENTS_FILE) as write:
                for i, (day, t0, t1, n) in enumerate(plan):
                    table, c = shop.engagement_chunk(day, t0, t1, n, i)
                    write(table)
                    counts += c
                    bar.advance(task, n)
    finally:
        shop.main_images = None
        scratch.unlink(missing_ok=True)
    tasks = {schema.task_name(s, e): int(counts[i, j])
             for i, s in enumerate(schema.SURFACES) for j, e in enumerate(schema.ENGAGEMENTS)}
    manifest_counts = {
        "products": cfg.products,
        "images": int(n_images),
        "late_products": int((shop.products.launch_day > 0).sum()),
        "users": cfg.n_users,
        "rows": int(counts.sum()),
        "rows_per_task": tasks,
    }
    manifest = artifacts.write_manifest(out, MANIFEST_KIND, config=cfg.to_dict(), counts=manifest_counts,
                                        files=[CATALOG_FILE, ENGAGEMENTS_FILE])
    log.info("demo-data: wrote %d products and %d log rows to %s", cfg.products, counts.sum(), out)
    return manifest
