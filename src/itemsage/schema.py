"""The data contract: names every stage agrees on (docs/ARCHITECTURE.md).

The input side is what a user brings (a catalog and engagement logs); the dataset side is what
`itemsage ingest` writes and every later stage reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pyarrow as pa

SURFACES: tuple[str, ...] = ("search", "closeup", "home")
ENGAGEMENTS: tuple[str, ...] = ("click", "save", "add_to_cart", "checkout")

# The twelve text fields of the paper, in the order they enter the transformer's sequence.
TEXT_FIELDS: tuple[str, ...] = (
    "title",
    "description",
    "brand",
    "colors",
    "materials",
    "patterns",
    "size",
    "size_type",
    "product_type",
    "category",
    "domain",
    "links",
)

MAX_IMAGES = 20

# Catalog input columns.
PRODUCT_ID = "product_id"
IMAGE_EMBEDDINGS = "image_embeddings"  # list of float vectors, main image first
IMAGE_PATHS = "image_paths"  # list of image files, encoded by the built-in image encoder
LISTED_AT = "listed_at"  # optional: when the product went on sale (random negatives: itemsage.train.pairs)

# Engagement-log input columns.
SURFACE = "surface"
ENGAGEMENT = "engagement"
TIMESTAMP = "timestamp"
USER_ID = "user_id"
WEIGHT = "weight"
QUERY_TEXT = "query_text"
QUERY_EMBEDDING = "query_embedding"
QUERY_IMAGE_PATH = "query_image_path"
QUERY_PRODUCT_ID = "query_product_id"  # closeup/home: the query is this catalog product's frozen vector

# Columns ingest adds to products.
CONTENT_HASH = "content_hash"  # sha256 of a product's features, for `embed --incremental`
QUERY_VECTOR = "query_vector"  # the product's frozen query vector (itemsage.data.product_query)
POPULARITY = "popularity"  # a product's popularity in retrieval units (embeddings, index; model/popularity.py)
PRODUCT_QUERY = "product_query"  # dataset manifest key: {"source", "fields", "dim"} of query_vector
# Manifest key (catalog, embeddings, index) when products got no query vectors: why (a sentence), so the
# service's refusal of closeup / home by product names the cause.
PRODUCT_QUERY_MISSING = "product_query_missing"

# Files of a dataset directory (written by `itemsage ingest`).
PRODUCTS_FILE = "products.parquet"
TRAIN_FILE = "train.parquet"  # the three log windows, in time order: train, validation, test
VALIDATION_FILE = "validation.parquet"  # chooses the model (early stopping, best checkpoint)
TEST_FILE = "test.parquet"  # every reported figure
REJECTS_FILE = "rejects.jsonl"
TENSORBOARD_DIR = "tensorboard"  # a training run's TensorBoard logs, beside its model/ (train writes, evaluate reads)
VOCAB_FILE = "vocab.json"
WINDOWS: tuple[str, ...] = ("train", "validation", "test")
WINDOW_FILES: dict[str, str] = {"train": TRAIN_FILE, "validation": VALIDATION_FILE, "test": TEST_FILE}
QUERY_CACHE_DIR = "query_cache"  # frozen query embeddings, computed once (train/evaluate)

# Reasons a row is rejected; each rejected row carries exactly one.
REJECT_REASONS: tuple[str, ...] = (
    "missing_product_id",
    "duplicate_product_id",
    "bad_vector_width",
    "non_finite_vector",
    "unknown_surface",
    "unknown_engagement",
    "unknown_product",
    "bad_timestamp",
    "missing_query",
    "bad_weight",
    "unreadable_image",
    "unknown_query_product",
    "bad_text_encoding",
)


def task_name(surface: str, engagement: str) -> str:
    """A task is one surface × engagement pair, written `closeup.click`."""
    return f"{surface}.{engagement}"


ALL_TASKS: tuple[str, ...] = tuple(task_name(s, e) for s in SURFACES for e in ENGAGEMENTS)


# ---- the dataset's Arrow schemas (pyarrow imported inside: this module stays cheap to import) ----


def log_schema() -> pa.Schema:
    """train.parquet / validation.parquet / test.parquet. Only user_id, query_text, query_embedding and
    query_product_id hold nulls."""
    import pyarrow as pa

    return pa.schema([
        (SURFACE, pa.string()),
        (ENGAGEMENT, pa.string()),
        (PRODUCT_ID, pa.string()),
        (TIMESTAMP, pa.timestamp("ms", tz="UTC")),
        (USER_ID, pa.string()),
        (WEIGHT, pa.float32()),
        (QUERY_TEXT, pa.string()),
        (QUERY_EMBEDDING, pa.list_(pa.float32())),
        (QUERY_PRODUCT_ID, pa.string()),
    ])


def products_schema(text_columns: Sequence[str], *, query_vector: bool = False) -> pa.Schema:
    """products.parquet before the extra input columns are appended (`query_vector=True`: as written,
    with each product's frozen query vector; without it: the checked catalog rows, before ingest
    computes those)."""
    import pyarrow as pa

    return pa.schema([(PRODUCT_ID, pa.string()), *[(f, pa.list_(pa.string())) for f in text_columns],
                      (IMAGE_EMBEDDINGS, pa.list_(pa.list_(pa.float32()))), (CONTENT_HASH, pa.string()),
                      *([(QUERY_VECTOR, pa.list_(pa.float32()))] if query_vector else [])])
