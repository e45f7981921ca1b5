"""`itemsage graph`: the train window's engagement graph as G tokens per product (graph/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itemsage.cli.common import _CONFIG_HELP, _PROGRESS_HELP, _progress, app, console, fail, flag_names


@app.command("graph")
def graph_cmd(
    dataset_dir: Optional[Path] = typer.Argument(
        None, show_default=False, help="A dataset directory (itemsage ingest); or `dataset` in --config."),
    out: Optional[Path] = typer.Option(
        None, "--out", show_default=False,
        help="Directory to write (default: DATASET/graph, where the model looks; an earlier graph there is "
             "replaced once the new one is complete)."),
    config: Optional[Path] = typer.Option(
        None, "--config", show_default=False,
        help=_CONFIG_HELP.format("graph") + " The [graph] keys are GraphConfig's fields (seed, tokens, "
                                            "max_degree, walks_per_node, ...)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=_PROGRESS_HELP),
) -> None:
    """Build each product's graph tokens from the train window's logs (optional; the model reads them).

    A co-engagement graph over the train window only (session, closeup, home and search edges,
    weighted by engagement and recency), PinSage-style random walks for each product's neighbourhood,
    and the neighbours' frozen content vectors pooled into G tokens per product with a mask
    (docs/METHOD.md). Writes features.parquet (and neighbours.parquet) with a manifest.

    Examples:

        itemsage graph runs/data

        itemsage graph runs/data --out runs/graph --config run.toml
    """
    from rich.table import Table

    from itemsage.artifacts import ArtifactError, read_manifest
    from itemsage.cli import run_files
    from itemsage.config import ConfigError
    from itemsage.data.readers import DataError

    try:
        run = run_files.read(config, "graph")  # every key and type checked before anything runs
    except ConfigError as err:
        fail(str(err))
    dataset_from_file = dataset_dir is None and "dataset" in run.values
    dataset_dir, out = run.path_value("dataset", dataset_dir), run.path_value("out", out)
    if dataset_dir is None:
        fail("give the DATASET_DIR argument (or `dataset` in the --config file)")
    from itemsage.graph.build import build_graph_features
    from itemsage.graph.config import GraphConfig

    try:
        cfg = GraphConfig(**run.values)
    except ConfigError as err:
        fail(flag_names(str(err), config, run.names))
    if not dataset_dir.exists():
        fail(f"the dataset directory {dataset_dir} does not exist"
             + (f" (`dataset` in --config {config})" if dataset_from_file else ""))
    try:
        written = build_graph_features(dataset_dir, out, cfg, progress=_progress(progress))
    except ConfigError as err:
        fail(flag_names(str(err), config, run.names))
    except (ArtifactError, DataError, OSError, ValueError) as err:  # OSError: e.g. a read-only dataset directory
        fail(str(err))
    manifest = read_manifest(written)
    counts = manifest["counts"]
    seconds = sum(step["wall_s"] for step in manifest["timings"].values())
    degree = counts["degree_p50_p99_max"]
    console.print(f"{counts['engaged_products']:,} of {counts['products']:,} products engaged in the train window; "
                  f"{counts['edges']:,} edges (degree median {degree[0]}, max {degree[2]})", highlight=False)
    table = Table()
    table.add_column("token")
    table.add_column("products with it", justify="right")
    table.add_column("share", justify="right")
    for name in manifest["tokens"]:
        count = counts["with_token"][name]
        table.add_row(name, f"{count:,}", f"{count / max(counts['products'], 1):.1%}")
    console.print(table)
    console.print(f"graph features, {len(manifest['tokens'])} tokens x {manifest['dim']} per product, in {seconds:.1f} s: "
                  f"{written}", highlight=False)
