"""The demo shop: a seeded generator of a catalog and engagement logs (`itemsage demo-data`).

No real shop's data ships offline, so `itemsage demo-data` invents one, in the INPUT format of
The data contract of docs/ARCHITECTURE.md (what a user would bring to `itemsage ingest`):

    DIR/catalog.parquet       one row per product: text fields, price, image_embeddings
    DIR/engagements.parquet   one row per (query, product, engagement); queries in time order,
                              each query's rows together (a session-ordered log)
    DIR/latents.parquet       row-aligned with the log: each row's query and that query's draws
    DIR/medoids.parquet       each user cluster's home query product
    DIR/manifest.json         kind `demo-data`: config, counts per surface x engagement, sha256s

The world behind it is latent; only the evaluation's ceiling reads the two latents files
(demo_shop/latents.py), never ingest or training:
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

from itemsage.data.demo_shop.config import DemoConfig
from itemsage.data.demo_shop.generate import CATALOG_FILE, ENGAGEMENTS_FILE, MANIFEST_KIND, generate_demo_data
from itemsage.data.demo_shop.latents import LATENTS_FILE, MEDOIDS_FILE, ShopLatents, read_latents
from itemsage.data.demo_shop.shop import DemoShop, ProductLatents, UserLatents

__all__ = ["CATALOG_FILE", "ENGAGEMENTS_FILE", "LATENTS_FILE", "MANIFEST_KIND", "MEDOIDS_FILE", "DemoConfig",
           "DemoShop", "ProductLatents", "ShopLatents", "UserLatents", "generate_demo_data", "read_latents"]
