"""A catalog product as a query: its frozen query vector (docs/ARCHITECTURE.md, "Products as queries").

Closeup queries are the frozen vectors of the viewed product and home queries medoids of the frozen
vectors of a user's engaged products, so a product needs a vector in the frozen query space. Per
dataset it is one of two sources:

- "image": the product's main image vector (the first of `image_embeddings`), as given or as the
  built-in image encoder made it at ingest. It is the paper's closeup query, and the space closeup
  query vectors of the logs are in.
- "text": the built-in text encoder's (all-MiniLM-L6-v2, 384-d) vector of the product's title. The
  title alone (its strings joined by spaces): it is what a shopper reads on a closeup page and
  what search queries look like (a few words naming the product), and on most catalogs it already
  names the brand; appending brand, description or attributes would move the vector away from those
  short texts (and repeat the brand where the title has it). A product without a title gets the
  encoder's vector of the empty text.

`choose_source` picks the source at ingest (`--product-query auto|image|text`); `product_query_vectors`
computes the vectors, for ingest and for live upserts alike, so both give the same vector for the
same product. This module imports no other pipeline stage (the encoders load lazily), so ingest,
embed, index, live and serve may all import it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from itemsage import schema

SOURCES: tuple[str, ...] = ("image", "text")
CHOICES: tuple[str, ...] = ("auto", *SOURCES)
TEXT_FIELDS: tuple[str, ...] = ("title",)  # the text source's fields (why: the module doc)


def choose_source(requested: str, *, products: int, without_image: int) -> str:
    """The source for a catalog of `products` kept products, `without_image` of them with no image.

    auto: "image" when every product has an image (and there is at least one), else "text": one
    space for every product, since a catalog that mixes the two would give products of one catalog
    query vectors of two widths. "image" with products lacking images raises ValueError.
    """
    if requested not in CHOICES:
        raise ValueError(f"product query source {requested!r} is not one of {', '.join(CHOICES)}")
    if requested == "auto":
        return "image" if products and not without_image else "text"
    if requested == "image" and without_image:
        raise ValueError(f"--product-query image: {without_image:,} of the {products:,} products have no image, "
                         "so they have no main image vector. Give them images, or use --product-query text "
                         "(the title's text-encoder vector) or auto.")
    return requested


def fields(source: str) -> list[str]:
    """The product fields a source reads (recorded in the dataset manifest)."""
    return [schema.IMAGE_EMBEDDINGS] if source == "image" else list(TEXT_FIELDS)


def query_texts(products: Any) -> list[str]:
    """The text-source text of each product: its TEXT_FIELDS strings joined by spaces.

    `products`: a pyarrow Table (list<string> or string columns) or a list of dicts (a string or a
    list of strings per field); a missing field is empty."""
    if isinstance(products, list):
        columns = {f: [r.get(f) for r in products] for f in TEXT_FIELDS}
    else:
        columns = {f: products.column(f).to_pylist() if f in products.column_names else [None] * products.num_rows
                   for f in TEXT_FIELDS}
    n = len(next(iter(columns.values())))
    texts = []
    for i in range(n):
        parts: list[str] = []
        for f in TEXT_FIELDS:
            value = columns[f][i]
            parts += [value] if isinstance(value, str) else [str(v) for v in (value or []) if v is not None]
        texts.append(" ".join(p.strip() for p in parts if p.strip()))
    return texts


def main_images(products: Any) -> list[np.ndarray | None]:
    """Each product's main image vector (float32 [D]), None where it has no image."""
    values = (products.column(schema.IMAGE_EMBEDDINGS).to_pylist() if not isinstance(products, list)
              else [r.get(schema.IMAGE_EMBEDDINGS) for r in products])
    return [np.asarray(v[0], np.float32) if v else None for v in values]


def _main_image_block(table: Any) -> np.ndarray:
    """[n, D] main image vectors of a products table, without Python objects per value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    images = table.column(schema.IMAGE_EMBEDDINGS).combine_chunks()  # list<list<float32>>
    counts = pc.list_value_length(images).fill_null(0).to_numpy(zero_copy_only=False)
    if (counts == 0).any():
        pid = table.column(schema.PRODUCT_ID)[int(np.flatnonzero(counts == 0)[0])].as_py()
        raise ValueError(f"product {pid!r} has no image, but this dataset's product query vectors are main "
                         "image vectors (product_query source 'image'); give it an image_embeddings vector")
    if len(images) == 0:
        return np.zeros((0, 0), np.float32)
    main = pc.list_element(images, 0)  # [n] list<float32>
    widths = pc.list_value_length(main).to_numpy(zero_copy_only=False)
    if (widths != widths[0]).any():
        raise ValueError(f"main image vectors of several widths: {sorted(set(widths.tolist()))}")
    values = pc.list_flatten(main).cast(pa.float32()).to_numpy(zero_copy_only=False)
    return values.reshape(len(main), int(widths[0])).astype(np.float32, copy=False)


def product_query_vectors(products: Any, source: str, *, text_encoder: Any = None,
                          batch_size: int = 256) -> np.ndarray:
    """The frozen query vectors [n, Dq] float32 of `products` (a pyarrow Table with the columns of
    products.parquet, or a list of product dicts), in their order.

    source "image": each main image vector as it is (Dq = the image width); a product without an
    image raises ValueError naming it. source "text": `text_encoder` (anything with `dim` and
    `encode(texts)`, default the built-in TextQueryEncoder) of `query_texts` (Dq = 384), unit rows.
    """
    if source == "image" and not isinstance(products, list):
        return _main_image_block(products)
    if source == "image":
        images = main_images(products)
        missing = [i for i, v in enumerate(images) if v is None]
        if missing:
            ids = (products.column(schema.PRODUCT_ID)[missing[0]].as_py() if not isinstance(products, list)
                   else products[missing[0]].get(schema.PRODUCT_ID))
            raise ValueError(f"product {ids!r} has no image, but this dataset's product query vectors are main "
                             "image vectors (product_query source 'image'); give it an image_embeddings vector")
        if not images:
            return np.zeros((0, 0), np.float32)
        widths = {v.shape for v in images}
        if len(widths) > 1:
            raise ValueError(f"main image vectors of several widths: {sorted(w[0] for w in widths)}")
        return np.stack(images).astype(np.float32, copy=False)
    if source == "text":
        if text_encoder is None:
            from itemsage.encoders.text import TextQueryEncoder

            text_encoder = TextQueryEncoder()
        texts = query_texts(products)
        if not texts:
            return np.zeros((0, int(text_encoder.dim)), np.float32)
        distinct = list(dict.fromkeys(texts))  # each distinct title encoded once
        vectors = np.asarray(text_encoder.encode(distinct, batch_size=batch_size), dtype=np.float32)  # [U, 384]
        if vectors.shape != (len(distinct), int(text_encoder.dim)) or not np.isfinite(vectors).all():
            raise ValueError(f"the text encoder returned {vectors.shape}, expected ({len(distinct)}, "
                             f"{text_encoder.dim}) finite values")
        position = {t: j for j, t in enumerate(distinct)}
        return vectors[[position[t] for t in texts]]  # [n, 384]
    raise ValueError(f"product query source {source!r} is not one of {', '.join(SOURCES)}")


def manifest_entry(source: str, dim: int) -> dict[str, Any]:
    """The dataset manifest's `product_query` value."""
    return {"source": source, "fields": fields(source), "dim": int(dim)}

