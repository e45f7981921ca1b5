"""`itemsage demo`: every stage on a generated shop (itemsage/demo.py), and `--serve` on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itemsage import schema
from itemsage.cli.common import (
    _CONFIG_HELP,
    _PROGRESS_HELP,
    _STATE,
    Preset,
    _given,
    _progress,
    app,
    console,
    fail,
    flag_names,
)
from itemsage.cli.evaluate import _print_ceiling, _recall_table


@app.command("demo")
def demo_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for every artifact of the demo."),
    config: Optional[Path] = typer.Option(None, "--config", show_default=False, help=_CONFIG_HELP.format("demo")),
    products: int = typer.Option(20_000, "--products", help="Products in the generated shop."),
    train_minutes: float = typer.Option(6.0, "--minutes", "--train-minutes", help="Training budget in minutes."),
    steps: Optional[int] = typer.Option(None, "--steps", show_default=False,
                                        help="A step cap on top of the minute budget (default: none)."),
    preset: Preset = typer.Option(Preset.cpu, "--preset", help="Model preset."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the shop and the training run."),
    graph: bool = typer.Option(True, "--graph/--no-graph",
                               help="Build the engagement graph and train the tower on its graph tokens (`itemsage "
                                    "graph`); --no-graph: the tower reads content alone."),
    serve: bool = typer.Option(False, "--serve", help="Then start the service on the demo's model and index."),
    port: int = typer.Option(8000, "--port", help="Port for --serve (bound to 127.0.0.1)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=_PROGRESS_HELP),
) -> None:
    """Generate a demo shop, ingest, build its engagement graph, train, embed, index and evaluate it, in one command.

    A killed demo resumes: a re-run skips every stage whose artifact is complete.

    Examples:

        itemsage demo

        itemsage demo --products 2000 --minutes 1 --out runs/small-demo --serve
    """
    import time

    from itemsage.cli import run_files
    from itemsage.config import ConfigError
    from itemsage.demo import DemoSettings, run_demo

    start = time.perf_counter()
    try:
        run = run_files.read(config, "demo")  # every key and type checked before anything runs
    except ConfigError as err:
        fail(str(err))
    given = _given(ctx, {"out": out, "products": products, "train_minutes": train_minutes, "steps": steps,
                         "preset": preset, "seed": seed, "graph": graph})
    if "steps" in given:
        given["train_steps"] = given.pop("steps")
    try:
        settings = DemoSettings(**{**run.values, **given})
    except ConfigError as err:
        fail(flag_names(str(err), config, run.file_names(f"demo.{k}" for k in given)))
    try:
        result = run_demo(settings, progress=_progress(progress),
                          say=lambda m: console.print(m, highlight=False, markup=False))
    except ConfigError as err:
        fail(flag_names(str(err)))
    console.print(_recall_table(result.evaluation, "ItemSage demo: Recall@10 on the test window"))
    _print_ceiling(result.evaluation)
    console.print(f"stage seconds: {result.seconds}; total {time.perf_counter() - start:.0f} s")
    console.print(f"report: {result.report}")
    if serve:
        _serve_demo(result, port)
    else:
        console.print(f"serve it: itemsage serve --model {result.model} --index {result.index} "
                      f"--products {result.dataset}")


def _serve_demo(result, port: int) -> None:
    """Print example requests built from the demo's own data, then serve until interrupted."""
    import json

    import pyarrow.parquet as pq

    from itemsage.serve.app import run

    product = pq.read_table(result.dataset / schema.PRODUCTS_FILE, columns=[schema.PRODUCT_ID]).slice(0, 3)
    ids = product[schema.PRODUCT_ID].to_pylist()
    evals = pq.read_table(result.dataset / schema.TEST_FILE, columns=[schema.SURFACE, schema.QUERY_TEXT])
    texts = [t for s, t in zip(evals[schema.SURFACE].to_pylist(), evals[schema.QUERY_TEXT].to_pylist())
             if s == "search" and t][:1] or ["oak chair"]
    base = f"http://127.0.0.1:{port}"
    examples = [
        ("search", {"text": texts[0], "k": 10}),
        ("closeup", {"product_id": ids[0], "k": 10}),
        ("home", {"history": ids, "k": 10}),
    ]
    console.print("example requests:")
    for endpoint, body in examples:
        console.print(f"  curl -s {base}/v1/{endpoint} -H 'content-type: application/json' -d '{json.dumps(body)}'",
                      highlight=False, soft_wrap=True, markup=False)
    console.print(f"  the page: {base}/   API docs: {base}/docs", highlight=False)
    run(result.model, result.index, host="127.0.0.1", port=port, reload_token=None, products=result.dataset,
        log_level="warning" if _STATE["quiet"] else "info")


if __name__ == "__main__":
    app()
