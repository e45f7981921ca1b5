"""`itemsage embed`: a trained model over a dataset's catalog, or over a catalog file (embed/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itemsage import schema
from itemsage.cli.common import Engine, _progress, app, console, fail, flag_names


@app.command("embed")
def embed_cmd(
    model_dir: Path = typer.Argument(..., help="A model directory (itemsage train)."),
    dataset_dir: Optional[Path] = typer.Argument(
        None, show_default=False, help="A dataset directory (itemsage ingest); or give --catalog instead."),
    out: Path = typer.Option(..., "--out", help="Embeddings directory (resumed if a run was interrupted)."),
    catalog: Optional[Path] = typer.Option(
        None, "--catalog", show_default=False,
        help="A catalog alone, no logs: a .parquet / .jsonl file or a directory of them, validated as "
             "ingest does (bad rows to OUT/catalog/rejects.jsonl)."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Products per forward pass."),
    incremental: bool = typer.Option(False, "--incremental", help="Re-embed only new or changed products."),
    engine: Engine = typer.Option(Engine.local, "--engine", help="local (resumable, incremental) or Ray Data."),
    graph: Optional[Path] = typer.Option(
        None, "--graph", show_default=False,
        help="For a model that reads graph tokens: the graph features (itemsage graph) to read them from; "
             "default DATASET/graph. A --catalog needs it (the graph of the dataset its products' engagements "
             "are in) or --no-graph."),
    no_graph: bool = typer.Option(False, "--no-graph", help="Embed every product from its content alone, without "
                                  "graph tokens (as a new product is)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Embed every product of a dataset, or of a catalog file, with the product tower into Parquet shards.

    Examples:

        itemsage embed runs/train/model runs/data --out runs/embeddings

        itemsage embed runs/train/model --catalog new_products.jsonl --out runs/new-embeddings
    """
    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError
    from itemsage.data.ingest import DataError
    from itemsage.embed.catalog import embed_from_catalog
    from itemsage.embed.ray_engine import embed_with_ray
    from itemsage.embed.shards import embed

    if (dataset_dir is None) == (catalog is None):
        fail("give either a DATASET_DIR argument or --catalog FILE_OR_DIR (not both)")
    if engine == Engine.ray and (incremental or catalog is not None):
        fail("--incremental and --catalog need --engine local (the Ray engine embeds a whole dataset)")
    rejected = None
    try:
        if engine == Engine.ray:
            summary = embed_with_ray(model_dir, dataset_dir, out, batch_size=batch_size, graph_dir=graph,
                                     no_graph=no_graph)
        elif catalog is not None:
            summary, rejected = embed_from_catalog(model_dir, catalog, out, batch_size=batch_size,
                                                   incremental=incremental, progress=_progress(progress),
                                                   graph_dir=graph, no_graph=no_graph)
        else:
            summary = embed(model_dir, dataset_dir, out, batch_size=batch_size, incremental=incremental,
                            progress=_progress(progress), graph_dir=graph, no_graph=no_graph)
    except ConfigError as err:
        fail(flag_names(str(err)))
    except (ArtifactError, DataError, FileNotFoundError, ImportError, ValueError) as err:
        fail(str(err))
    if rejected:
        console.print(f"[yellow]warning:[/] {rejected:,} catalog row(s) rejected; the reasons (the first 100 rows "
                      f"of each): {out / 'catalog' / schema.REJECTS_FILE}", highlight=False)
    if summary.unreadable:
        console.print(f"[yellow]warning:[/] the model reads nothing of {summary.unreadable:,} of the {summary.count:,} "
                      "products (no image, and no word of their text in its vocabulary): each has the vector of an "
                      "empty product", highlight=False)
    console.print(f"{summary.count:,} products x {summary.dim} dims in {summary.shards} shard(s): {summary.out_dir}")
    console.print(f"embedded {summary.embedded:,} in {summary.seconds:.1f} s "
                  f"({summary.products_per_second:,.0f} products/s)"
                  + (f"; {summary.skipped_shards} shard(s) already complete" if summary.skipped_shards else "")
                  + (f"; reused {summary.reused:,}, removed {summary.removed:,}" if summary.generation else ""))
