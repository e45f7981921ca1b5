"""`itemsage demo-data` and `itemsage ingest`: a demo shop, and a catalog plus logs into a dataset (data/).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from itemsage import schema
from itemsage.cli.common import ProductQuery, _progress, app, console, fail, flag_names


@app.command("demo-data")
def demo_data_cmd(
    products: int = typer.Option(20_000, "--products", help="Number of products in the catalog."),
    out: Path = typer.Option(..., "--out", help="Directory to write (new, empty, or an earlier demo-data output)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed writes byte-identical files."),
    days: int = typer.Option(28, "--days", help="Days of engagement logs."),
    users: Optional[int] = typer.Option(None, "--users", help="Number of users (default: products / 5, at least 50)."),
    image_dim: int = typer.Option(256, "--image-dim", help="Width of the image vectors (PinSage: 256)."),
    engagements_per_product: float = typer.Option(
        25.0, "--engagements-per-product", help="Log rows per product, all surfaces and engagement types."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Generate a seeded demo shop: DIR/catalog.parquet and DIR/engagements.parquet.

    Example:

        itemsage demo-data --products 2000 --out runs/shop
    """
    from rich.table import Table

    from itemsage.config import ConfigError
    from itemsage.data.demo_shop import CATALOG_FILE, ENGAGEMENTS_FILE, DemoConfig, generate_demo_data

    try:
        cfg = DemoConfig(products=products, seed=seed, days=days, users=users, image_dim=image_dim,
                         engagements_per_product=engagements_per_product)
        manifest = generate_demo_data(out, cfg, progress=_progress(progress))
    except ConfigError as err:
        # The config names its fields (`image_dim`); the user typed options (`--image-dim`).
        fail(re.sub(r"`(\w+)`", lambda m: f"`--{m.group(1).replace('_', '-')}`", str(err)))
    counts = manifest["counts"]
    table = Table(title=f"{counts['products']:,} products, {counts['users']:,} users, {days} days: "
                        f"{counts['rows']:,} log rows")
    table.add_column("surface")
    for engagement in schema.ENGAGEMENTS:
        table.add_column(engagement, justify="right")
    for surface in schema.SURFACES:
        table.add_row(surface, *(f"{counts['rows_per_task'][schema.task_name(surface, e)]:,}"
                                 for e in schema.ENGAGEMENTS))
    console.print(table)
    console.print(f"wrote {out / CATALOG_FILE} and {out / ENGAGEMENTS_FILE}")

# ---- ingest (ingest.py) ----


@app.command("ingest")
def ingest_cmd(
    catalog: Path = typer.Option(..., "--catalog", help="Catalog: a .parquet / .jsonl file or a directory of them."),
    logs: Path = typer.Option(..., "--logs", help="Engagement logs: a .parquet / .jsonl file or a directory of them."),
    out: Path = typer.Option(..., "--out", help="Dataset directory to write (an existing dataset there is replaced)."),
    split: str = typer.Option(
        "global", "--split", help="global (one pair of split times for every row) or per-user (each user's last "
                                  "engagements are validation and test; rows without user_id go to train)."),
    validation_fraction: Optional[float] = typer.Option(
        None, "--validation-fraction", show_default=False,
        help="Fraction before the test window that is validation, of the logs' time span (global) or of each "
             "user's engagements (per-user) (default: 0.1)."),
    test_fraction: Optional[float] = typer.Option(
        None, "--test-fraction", show_default=False,
        help="The last fraction that is test, as for --validation-fraction (default: 0.1)."),
    validation_from: Optional[str] = typer.Option(
        None, "--validation-from", show_default=False,
        help="ISO time; rows at or after it (and before --test-from) are validation."),
    test_from: Optional[str] = typer.Option(None, "--test-from", show_default=False,
                                            help="ISO time; rows at or after it are test."),
    gap_hours: float = typer.Option(
        0.0, "--gap-hours", help="Drop the train rows this many hours before the validation window (leakage)."),
    text_fields: Optional[str] = typer.Option(
        None, "--text-fields", show_default=False,
        help=f"Comma-separated text fields for the vocabulary (default: {','.join(schema.TEXT_FIELDS)})."),
    max_unigrams: int = typer.Option(200_000, "--max-unigrams", help="Vocabulary cap on word unigrams."),
    max_bigrams: int = typer.Option(1_000_000, "--max-bigrams", help="Vocabulary cap on word bigrams."),
    max_trigrams: int = typer.Option(64_000, "--max-trigrams", help="Vocabulary cap on character trigrams."),
    batch_rows: int = typer.Option(65_536, "--batch-rows", help="Rows per streamed batch."),
    image_dim: Optional[int] = typer.Option(
        None, "--image-dim", show_default=False,
        help="Image vector width (default: fixed by the first valid image vector)."),
    product_query: ProductQuery = typer.Option(
        ProductQuery.auto, "--product-query",
        help="A product's frozen query vector (closeup/home logs may name a query_product_id): image = its main "
             "image vector, text = the text encoder's vector of its title, auto = image when every product has "
             "an image, else text."),
    max_reject_share: float = typer.Option(
        0.9, "--max-reject-share", help="Stop, writing nothing, when one reason rejects more than this share of "
                                        "the catalog's or the logs' rows (and at least 1,000 rows); 1: never."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Validate, normalise and time-split a catalog and engagement logs into a dataset directory.

    Bad rows are counted by reason, and the first 100 of each reason go to DIR/rejects.jsonl; a file
    that cannot be used at all, one whose every row is rejected, or one where a single reason rejects
    most rows (--max-reject-share) stops the run before anything is written.

    Example:

        itemsage ingest --catalog runs/shop/catalog.parquet --logs runs/shop/engagements.parquet --out runs/data
    """
    from itemsage.config import ConfigError
    from itemsage.data.ingest import DataError, IngestConfig, ingest, summary_table

    if (validation_from or test_from) and (validation_fraction is not None or test_fraction is not None):
        fail("give either split times (--validation-from, --test-from) or fractions (--validation-fraction, "
             "--test-fraction), not both")
    try:
        options = dict(split=split, validation_from=validation_from, test_from=test_from, gap_hours=gap_hours,
                       max_unigrams=max_unigrams, max_bigrams=max_bigrams,
                       max_trigrams=max_trigrams, batch_rows=batch_rows, image_dim=image_dim,
                       product_query=product_query.value, max_reject_share=max_reject_share,
                       progress=_progress(progress))
        options.update({k: v for k, v in (("validation_fraction", validation_fraction),
                                          ("test_fraction", test_fraction)) if v is not None})
        if text_fields is not None:
            options["text_fields"] = tuple(f.strip() for f in text_fields.split(",") if f.strip())
        summary = ingest(catalog, logs, out, IngestConfig(**options))
    except (ConfigError, DataError) as err:
        fail(flag_names(str(err)))
    console.print(summary_table(summary))
