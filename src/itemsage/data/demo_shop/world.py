"""The demo shop's fixed world: a Google-product-category-like taxonomy and its attributes, the words,
title, description and query templates, and the weights of the generative model (image mixing,
funnel rates, user interests). The random streams: one seeded Generator per (seed, stream, chunk).
"""

from __future__ import annotations

import numpy as np

# group: (materials, sizes, size types). Materials and sizes only ever reach the text.
GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
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
HG, AA = "Home & Garden", "Apparel & Accessories"
LEAVES: tuple[tuple[str, str, str, tuple[str, ...], float], ...] = (
    (f"{HG} > Furniture > Chairs", "furniture", "chair", ("accent", "dining", "office"), 180),
    (f"{HG} > Furniture > Sofas", "furniture", "sofa", ("sectional", "loveseat", "sleeper"), 900),
    (f"{HG} > Furniture > Tables", "furniture", "table", ("coffee", "dining", "side"), 350),
    (f"{HG} > Furniture > Beds", "furniture", "bed", ("platform", "canopy", "storage"), 700),
    (f"{HG} > Furniture > Shelving > Bookcases", "furniture", "bookcase", ("ladder", "corner", "cube"), 250),
    (f"{HG} > Furniture > Benches", "furniture", "bench", ("entryway", "storage", "garden"), 200),
    (f"{HG} > Decor > Vases", "decor", "vase", ("bud", "floor", "table"), 45),
    (f"{HG} > Decor > Artwork", "decor", "print", ("framed", "poster", "botanical"), 80),
    (f"{HG} > Decor > Mirrors", "decor", "mirror", ("wall", "floor", "vanity"), 150),
    (f"{HG} > Decor > Candles", "decor", "candle", ("pillar", "taper", "jar"), 25),
    (f"{HG} > Decor > Clocks", "decor", "clock", ("wall", "mantel", "alarm"), 60),
    (f"{HG} > Lighting > Lamps", "decor", "lamp", ("table", "floor", "desk"), 120),
    (f"{HG} > Lighting > Light Fixtures", "decor", "light", ("pendant", "ceiling", "sconce"), 200),
    (f"{HG} > Linens & Bedding > Bedding", "textiles", "set", ("sheet", "duvet", "quilt"), 120),
    (f"{HG} > Decor > Throw Pillows", "textiles", "pillow", ("throw", "lumbar", "floor"), 40),
    (f"{HG} > Linens & Bedding > Blankets", "textiles", "blanket", ("throw", "weighted", "knit"), 70),
    (f"{HG} > Decor > Window Treatments > Curtains", "textiles", "curtain", ("blackout", "sheer", "cafe"), 60),
    (f"{HG} > Decor > Rugs", "textiles", "rug", ("area", "runner", "round"), 220),
    (f"{HG} > Kitchen & Dining > Cookware", "kitchen", "pan", ("frying", "saute", "grill"), 70),
    (f"{HG} > Kitchen & Dining > Tableware > Dinnerware", "kitchen", "plate", ("dinner", "salad", "dessert"), 50),
    (f"{HG} > Kitchen & Dining > Tableware > Drinkware", "kitchen", "mug", ("coffee", "travel", "tea"), 25),
    (f"{HG} > Kitchen & Dining > Tableware > Serveware", "kitchen", "bowl", ("serving", "salad", "fruit"), 40),
    (f"{HG} > Kitchen & Dining > Food Storage", "kitchen", "jar", ("storage", "spice", "cookie"), 20),
    (f"{AA} > Clothing > Dresses", "apparel", "dress", ("midi", "maxi", "wrap"), 90),
    (f"{AA} > Clothing > Shirts & Tops", "apparel", "top", ("tank", "crop", "tunic"), 40),
    (f"{AA} > Clothing > Pants", "apparel", "pants", ("cargo", "chino", "jogger"), 70),
    (f"{AA} > Clothing > Skirts", "apparel", "skirt", ("pleated", "pencil", "tiered"), 55),
    (f"{AA} > Clothing > Outerwear > Coats & Jackets", "apparel", "jacket", ("bomber", "puffer", "rain"), 140),
    (f"{AA} > Clothing > Sweaters", "apparel", "sweater", ("crewneck", "cardigan", "turtleneck"), 80),
    (f"{AA} > Shoes > Sneakers", "shoes", "sneaker", ("running", "skate", "court"), 95),
    (f"{AA} > Shoes > Boots", "shoes", "boot", ("ankle", "chelsea", "hiking"), 150),
    (f"{AA} > Shoes > Sandals", "shoes", "sandal", ("slide", "strappy", "wedge"), 60),
    (f"{AA} > Shoes > Heels", "shoes", "heel", ("block", "stiletto", "kitten"), 110),
    (f"{AA} > Handbags, Wallets & Cases > Handbags", "bags", "bag", ("tote", "crossbody", "shoulder"), 120),
    (f"{AA} > Handbags, Wallets & Cases > Backpacks", "bags", "backpack", ("laptop", "hiking", "travel"), 85),
    (f"{AA} > Handbags, Wallets & Cases > Wallets", "bags", "wallet", ("bifold", "zip", "card"), 45),
    (f"{AA} > Jewelry > Necklaces", "jewelry", "necklace", ("choker", "chain", "locket"), 75),
    (f"{AA} > Jewelry > Earrings", "jewelry", "earrings", ("hoop", "stud", "drop"), 50),
    (f"{AA} > Jewelry > Rings", "jewelry", "ring", ("stacking", "signet", "cocktail"), 65),
    (f"{AA} > Jewelry > Bracelets", "jewelry", "bracelet", ("bangle", "cuff", "charm"), 55),
    (f"{AA} > Jewelry > Watches", "jewelry", "watch", ("dress", "sport", "analog"), 180),
)

COLORS = ("black", "white", "grey", "beige", "brown", "navy", "blue", "green", "olive", "red",
           "burgundy", "pink", "yellow", "orange", "purple", "teal")
PATTERNS = ("solid", "striped", "floral", "plaid", "polka dot", "geometric", "paisley",
             "animal print", "abstract", "checkered")
PATTERN_WEIGHTS = (0.4,) + (0.6 / 9,) * 9

# Price tiers of brands and users: budget, mid, premium, luxury.
TIER_PRICE = np.array([0.5, 1.0, 2.0, 4.0])
TIER_SHARE = np.array([0.35, 0.35, 0.2, 0.1])
MARKETPLACES = ("shopmart.example", "bazaar.example", "dealhub.example", "homeandstyle.example")

# Noise in the text: independent of every latent attribute (so it says nothing about style).
TITLE_NOISE = ("new", "classic", "everyday", "essential", "signature", "limited edition",
                "best seller", "gift idea", "free shipping", "2024 collection", "sale", "exclusive")
SENTENCES = ("Ships in 2-3 business days.", "Easy returns within 30 days.", "Customer favourite.",
              "Care instructions on the label.", "Limited stock available.", "Designed for everyday use.",
              "Imported.", "", "")

TITLE_TEMPLATES = (
    "{brand} {color} {material} {subtype}",
    "{subtype} - {color} {pattern} {material} | {brand}",
    "{noise} {brand} {material} {subtype}, {color}",
    "{color} {pattern} {subtype} by {brand}",
    "{brand} {subtype} in {color} (size {size})",
)
# Every description names every attribute, so the text carries all of them.
DESCRIPTION_TEMPLATES = (
    "{brand}'s {subtype} in {materials}; {colors}, {pattern} pattern. "
    "Size {size} ({size_type}). {sentence}",
    "Made from {materials}, this {colors} {subtype} from {brand} comes in {pattern}. "
    "Available in size {size}, {size_type} fit. {sentence}",
    "{sentence} A {pattern} {colors} {subtype} by {brand}. Material: {materials}. "
    "Size: {size} ({size_type}).",
    "Shop the {brand} {subtype}: {colors}, {pattern}, {materials}. Size {size}, {size_type}. {sentence}",
)

# Search queries, built from a target product; each names the attributes its matching set shares.
QUERY_TEMPLATES = (
    "{prefix}{brand} {material} {noun}",  # (brand, category, material)
    "{prefix}{color} {noun}",  # (colour, category)
    "{prefix}{material} {subtype} size {size}",  # (material, product type, size)
    "{prefix}{brand} {noun}",  # (brand, category)
    "{prefix}{color} {pattern} {noun}",  # (colour, pattern, category)
    "{prefix}{material} {noun}",  # (material, category)
)
QUERY_TEMPLATE_WEIGHTS = np.array([0.2, 0.2, 0.1, 0.2, 0.15, 0.15])
QUERY_PREFIXES = ("", "best ", "cheap ", "buy ", "new ")
QUERY_PREFIX_WEIGHTS = np.array([0.85, 0.04, 0.04, 0.04, 0.03])


def brand_candidates() -> tuple[list[str], list[str]]:
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
W_STYLE, W_CATEGORY, W_COLOR, W_PATTERN = 0.9, 1.0, 0.6, 0.4
W_PRODUCT_NOISE, W_MAIN_IMAGE_NOISE, W_OTHER_IMAGE_NOISE = 0.6, 0.3, 0.6
W_CLOSEUP_QUERY_NOISE = 0.25

# Funnel: every engaged product is a click; saves favour the user's styles, carts and checkouts
# the user's price tier and brands (so the four tasks rank products differently).
SAVE_RATE, CART_RATE, CHECKOUT_GIVEN_CART = 0.25, 0.022, 0.3
SAVE_STYLE_FACTOR = (0.5, 1.5)  # the product's style is not / is one of the user's
CART_BRAND_FACTOR = (1.0, 2.0)  # the product's brand is not / is one of the user's clusters' brands
CHECKOUT_TIER_FACTOR = (0.6, 1.3)  # the product's price tier is not / is the user's
TIER_GAP_FACTOR = np.array([2.5, 0.8, 0.25, 0.1])  # by |product tier - user tier|
MAX_ENGAGED_PER_QUERY = 6
ENGAGED_GEOMETRIC_P = 0.5  # products a query engages: min(Geometric(0.5), MAX_ENGAGED_PER_QUERY) draws

# Where a query's engaged products come from (logs.py draws with these; the evaluation's ceiling,
# evaluate/ceiling_model.py, computes the same draws' probabilities from them).
PREFERRED_MIX = (0.5, 0.3, 0.2)  # an interest cluster leads by (category, style), (brand, category), category
SEARCH_CATEGORY_SHARE = 0.1  # a search's later products: its text's group, or (this share) its category
CLOSEUP_SAME_STYLE_BELOW, CLOSEUP_SAME_CATEGORY_BELOW = 0.8, 0.95  # closeup: u < 0.8 category and style,
#   u < 0.95 category, else anything
HOME_OTHER_CLUSTER_BELOW, HOME_ANYTHING_ABOVE = 0.08, 0.96  # home: u < 0.08 a uniformly drawn cluster of the
#   user's, u > 0.96 anything, else the query's cluster
ROWS_PER_QUERY = 2.35  # measured: 2.25 at 20k products, 2.47 at 1M (fewer duplicate engagements)
USER_CLUSTERS, USER_STYLES, HISTORY = 3, 2, 5

# Independent random streams: (seed, stream, chunk) seeds one Generator.
WORLD, PRODUCTS, TEXT, IMAGES, USERS, MEDOIDS, EVENTS = range(7)
DAY_MS = 86_400_000


def stream_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))
