"""Ingest's options (`IngestConfig`, validated at construction) and the result of a run (`IngestSummary`,
`summary_table`). The rules behind each option are in itemsage.ingest's module doc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itemsage import schema
from itemsage.config import require
from itemsage.data import product_query
from itemsage.data.normalise import parse_iso_ms

_RESERVED = {schema.PRODUCT_ID, schema.IMAGE_EMBEDDINGS, schema.IMAGE_PATHS, schema.CONTENT_HASH, schema.QUERY_VECTOR}
SPLITS = ("global", "per-user")


@dataclass
class IngestConfig:
    split: str = "global"  # global | per-user (see the module doc)
    validation_fraction: float = 0.1  # global: of the logs' time span; per-user: of each user's engagements
    test_fraction: float = 0.1  # the last fraction; validation is the one before it
    validation_from: str | None = None  # global only: ISO times that start validation and test (both or
    test_from: str | None = None  # neither); they win over the fractions
    gap_hours: float = 0.0  # train rows this close before the validation window are dropped
    text_fields: tuple[str, ...] = schema.TEXT_FIELDS  # fields the vocabulary is built from
    max_unigrams: int = 200_000
    max_bigrams: int = 1_000_000
    max_trigrams: int = 64_000
    batch_rows: int = 65_536  # rows per streamed batch (at most; Parquet batches also stop near 64 MiB)
    image_dim: int | None = None  # None: the first valid image vector fixes it
    max_images: int = schema.MAX_IMAGES
    image_batch_size: int = 32  # images per image-encoder call
    sort_rows: int = 250_000  # log rows per time slab, held in memory while writing train/eval in time order
    sha256_max_bytes: int = 1 << 30  # larger inputs are fingerprinted by size and mtime
    product_query: str = "auto"  # a product's frozen query vector: auto | image | text (itemsage.data.product_query)
    # refuse the run when one reason rejects more than this share of the catalog's or the logs' rows (and
    # at least 1,000 rows): inputs that do not belong together (itemsage.data.rejects); 1 = never
    max_reject_share: float = 0.9
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.text_fields, str):
            self.text_fields = tuple(f.strip() for f in self.text_fields.split(",") if f.strip())
        self.text_fields = tuple(self.text_fields)
        require(self.split in SPLITS, f"`ingest.split` ({self.split!r}) must be one of {', '.join(SPLITS)}.")
        for name in ("validation_from", "test_from"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, str) and parse_iso_ms(value) is not None),
                    f"`ingest.{name}` ({value!r}) is not an ISO-8601 time; "
                    "write it like 2024-03-01T00:00:00Z (no zone = UTC).")
        require((self.validation_from is None) == (self.test_from is None),
                "`ingest.validation_from` and `ingest.test_from` go together: give both split times, or neither "
                "(then the fractions place them).")
        if self.validation_from is not None:
            require(self.split == "global", "`ingest.validation_from`/`ingest.test_from` are split times of the "
                                            "global split; the per-user split takes fractions only.")
            require(parse_iso_ms(self.validation_from) <= parse_iso_ms(self.test_from),
                    f"`ingest.validation_from` ({self.validation_from}) is after `ingest.test_from` "
                    f"({self.test_from}); validation comes before test.")
        require(isinstance(self.test_fraction, (int, float)) and 0.0 < self.test_fraction < 1.0,
                f"`ingest.test_fraction` ({self.test_fraction}) must be between 0 and 1 (exclusive), "
                "e.g. 0.1 for the last tenth.")
        require(isinstance(self.validation_fraction, (int, float))
                and 0.0 <= self.validation_fraction < 1.0 - self.test_fraction,
                f"`ingest.validation_fraction` ({self.validation_fraction}) must be >= 0 and leave room for train "
                f"(validation + test fractions < 1; test is {self.test_fraction}).")
        require(isinstance(self.gap_hours, (int, float)) and math.isfinite(self.gap_hours) and self.gap_hours >= 0,
                f"`ingest.gap_hours` ({self.gap_hours}) must be a number of hours >= 0.")
        require(len(self.text_fields) > 0, "`ingest.text_fields` is empty; name at least one text field.")
        require(len(set(self.text_fields)) == len(self.text_fields),
                f"`ingest.text_fields` lists a field twice: {list(self.text_fields)}")
        for name in self.text_fields:
            require(isinstance(name, str) and name.strip() == name and name != "" and name not in _RESERVED,
                    f"`ingest.text_fields` has {name!r}, which is not a usable text column name.")
        for name in ("max_unigrams", "max_bigrams", "max_trigrams"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 0, f"`ingest.{name}` ({value}) must be an integer >= 0.")
        for name in ("batch_rows", "max_images", "image_batch_size", "sort_rows"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"`ingest.{name}` ({value}) must be an integer >= 1.")
        require(self.image_dim is None or (isinstance(self.image_dim, int) and self.image_dim >= 1),
                f"`ingest.image_dim` ({self.image_dim}) must be a positive integer or unset.")
        require(self.product_query in product_query.CHOICES,
                f"`ingest.product_query` ({self.product_query!r}) must be one of {', '.join(product_query.CHOICES)}.")
        require(isinstance(self.max_reject_share, (int, float)) and 0 < self.max_reject_share <= 1,
                f"`ingest.max_reject_share` ({self.max_reject_share}) must be in (0, 1]; 1 never refuses.")
        require(isinstance(self.sha256_max_bytes, int) and self.sha256_max_bytes >= 0,
                f"`ingest.sha256_max_bytes` ({self.sha256_max_bytes}) must be an integer >= 0.")


@dataclass
class InputStats:
    path: str
    role: str  # "catalog" | "logs"
    rows_read: int = 0
    rows_kept: int = 0
    rows_rejected: int = 0


@dataclass
class IngestSummary:
    out: Path
    inputs: list[InputStats]
    rejects: dict[str, int]  # reason -> rows, every reason listed
    products: int
    train_rows: dict[str, int]  # task "surface.engagement" -> rows, every task listed
    validation_rows: dict[str, int]
    test_rows: dict[str, int]
    split: str  # global | per-user
    validation_from: str | None  # ISO times, UTC (global split; None for per-user)
    test_from: str | None
    gap_rows: int  # train rows dropped in the gap before validation
    image_dim: int  # 0 = the catalog has no images
    query_dims: dict[str, int]  # surface -> query vector width, for surfaces with rows
    images_truncated: int
    files: list[Path]
    warnings: list[str] = field(default_factory=list)  # shown first in the summary: most rows rejected
    rejects_written: int = 0  # rows written in full to rejects.jsonl (the first 100 of each reason)
    unreadable: int = 0  # products with no image and no vocabulary token: the tower reads nothing of them
    product_query: dict[str, Any] = field(default_factory=dict)  # the manifest's product_query entry

    @property
    def rejected(self) -> int:
        return sum(self.rejects.values())


def summary_table(summary: IngestSummary) -> Any:
    """A Rich renderable of the summary (the CLI and the demo print it)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    inputs = Table(title="inputs", title_justify="left")
    for col in ("input", "role", "read", "kept", "rejected"):
        inputs.add_column(col, justify="left" if col in ("input", "role") else "right")
    for s in summary.inputs:
        inputs.add_row(s.path, s.role, f"{s.rows_read:,}", f"{s.rows_kept:,}", f"{s.rows_rejected:,}")
    rejects = Table(title=f"rejected rows: {summary.rejected:,}", title_justify="left")
    rejects.add_column("reason")
    rejects.add_column("rows", justify="right")
    for reason, n in summary.rejects.items():
        if n:
            rejects.add_row(reason, f"{n:,}")
    tasks = Table(title="pairs per task", title_justify="left")
    for col in ("task",) + schema.WINDOWS:
        tasks.add_column(col, justify="left" if col == "task" else "right")
    windows = (summary.train_rows, summary.validation_rows, summary.test_rows)
    for task in schema.ALL_TASKS:
        tasks.add_row(task, *(f"{w[task]:,}" for w in windows))
    tasks.add_row("total", *(f"{sum(w.values()):,}" for w in windows))
    files = Table(title=f"written to {summary.out}", title_justify="left")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    for path in summary.files:
        files.add_row(path.name, f"{path.stat().st_size:,}" if path.exists() else "")
    split = (f"validation from {summary.validation_from}, test from {summary.test_from}" if summary.split == "global"
             else "per-user split (each user's last engagements are validation and test)")
    gap = f", {summary.gap_rows:,} train rows dropped in the gap before validation" if summary.gap_rows else ""
    facts = (f"products kept: {summary.products:,}; {split}{gap}; "
             f"image width: {summary.image_dim}; query widths: {summary.query_dims}; "
             f"product query vectors: {summary.product_query.get('source')}, {summary.product_query.get('dim')}-d; "
             f"products the tower reads nothing of (no image, no vocabulary token): {summary.unreadable:,} "
             f"({100 * summary.unreadable / max(1, summary.products):.1f}%); "
             f"products with image lists cut to the maximum: {summary.images_truncated:,}")
    # Text, not markup: a detail may hold [brackets].
    warnings = [Text(f"WARNING: {w}", style="bold red") for w in summary.warnings]
    sampled = ([Text(f"rejects.jsonl holds the first 100 rows of each reason: {summary.rejects_written:,} of "
                     f"{summary.rejected:,} rejected rows (the counts above cover them all)")]
               if summary.rejects_written < summary.rejected else [])
    return Group(*warnings, inputs, *([rejects] if summary.rejected else []), *sampled, tasks, facts, files)
