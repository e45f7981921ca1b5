"""The `itemsage` command line: thin Typer commands that parse options and call the stage functions.

Heavy imports (torch, faiss, fastapi) happen inside each command so `itemsage --help` stays quick.
The CLI prints results; library code only logs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="itemsage",
    help="ItemSage: one product embedding for search, closeup and home, trained from engagement logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit non-zero."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


# ---- demo-data (demo_data.py) ----


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
    """Generate a seeded demo shop: DIR/catalog.parquet and DIR/engagements.parquet (SPEC §10)."""
    import re

    from rich.table import Table

    from itemsage import schema
    from itemsage.config import ConfigError
    from itemsage.demo_data import CATALOG_FILE, ENGAGEMENTS_FILE, DemoConfig, generate_demo_data

    try:
        cfg = DemoConfig(products=products, seed=seed, days=days, users=users, image_dim=image_dim,
                         engagements_per_product=engagements_per_product)
        manifest = generate_demo_data(out, cfg, progress=progress)
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
    split_at: Optional[str] = typer.Option(None, "--split-at", help="ISO time; log rows at or after it are eval."),
    eval_fraction: Optional[float] = typer.Option(
        None, "--eval-fraction", help="Without --split-at: the last fraction of the logs' time span is eval (default 0.2)."),
    text_fields: Optional[str] = typer.Option(
        None, "--text-fields", help="Comma-separated text fields for the vocabulary (default: the twelve of the paper)."),
    max_unigrams: int = typer.Option(200_000, "--max-unigrams", help="Vocabulary cap on word unigrams."),
    max_bigrams: int = typer.Option(1_000_000, "--max-bigrams", help="Vocabulary cap on word bigrams."),
    max_trigrams: int = typer.Option(64_000, "--max-trigrams", help="Vocabulary cap on character trigrams."),
    batch_rows: int = typer.Option(65_536, "--batch-rows", help="Rows per streamed batch."),
    image_dim: Optional[int] = typer.Option(
        None, "--image-dim", help="Image vector width (default: fixed by the first valid image vector)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Validate, normalise and time-split a catalog and engagement logs into a dataset directory."""
    from itemsage.config import ConfigError
    from itemsage.ingest import DataError, IngestConfig, ingest, summary_table

    if split_at is not None and eval_fraction is not None:
        fail("give either --split-at or --eval-fraction, not both")
    try:
        options = dict(split_at=split_at, max_unigrams=max_unigrams, max_bigrams=max_bigrams,
                       max_trigrams=max_trigrams, batch_rows=batch_rows, image_dim=image_dim, progress=progress)
        if eval_fraction is not None:
            options["eval_fraction"] = eval_fraction
        if text_fields is not None:
            options["text_fields"] = tuple(f.strip() for f in text_fields.split(",") if f.strip())
        summary = ingest(catalog, logs, out, IngestConfig(**options))
    except (ConfigError, DataError) as err:
        fail(str(err))
    console.print(summary_table(summary))

# ---- train (train.py) ----


@app.command("train")
def train_cmd(
    dataset_dir: Path = typer.Argument(..., help="A dataset directory (itemsage ingest)."),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints/, tensorboard/ and the final model/."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Model preset: cpu, paper or tiny (default cpu)."),
    steps: Optional[int] = typer.Option(
        None, "--steps", help="Training steps (default 2000; with --minutes alone: as many as fit)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Wall-clock budget; fixes the step count."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Positives per step, all processes (default 1024)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3)."),
    negatives: Optional[str] = typer.Option(None, "--negatives", help="mixed, in_batch or random (default mixed)."),
    random_negatives_ratio: Optional[float] = typer.Option(
        None, "--random-negatives-ratio", help="Random catalog negatives per positive (default 4)."),
    aggregator: Optional[str] = typer.Option(
        None, "--aggregator", help="transformer, sum or concat (default transformer)."),
    modalities: Optional[str] = typer.Option(None, "--modalities", help="both, image or text (default both)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw or lamb (default adamw)."),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", help="Comma-separated surface.engagement tasks (default all)."),
    upweight_conversions: Optional[float] = typer.Option(
        None, "--upweight-conversions", help="Sampling factor of add_to_cart/checkout pairs (default 1)."),
    checkpoint_every: Optional[int] = typer.Option(
        None, "--checkpoint-every", help="Steps between checkpoints (default 500)."),
    eval_every: Optional[int] = typer.Option(
        None, "--eval-every", help="Steps between held-out Recall@10 (default 500)."),
    eval_sample: Optional[int] = typer.Option(
        None, "--eval-sample", help="Held-out pairs per evaluation (default 2000)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in --out."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train the product tower and query adapters (multi-task sampled softmax); runs under torchrun too."""
    import dataclasses
    import os

    from rich.table import Table

    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError
    from itemsage.train import TrainConfig, checkpoint_config, train

    given = {"preset": preset, "max_steps": steps, "max_minutes": minutes, "batch_size": batch_size, "lr": lr,
             "negatives": negatives, "random_negatives_ratio": random_negatives_ratio, "optimizer": optimizer,
             "upweight_conversions": upweight_conversions,
             "checkpoint_every": checkpoint_every, "eval_every": eval_every, "eval_sample": eval_sample,
             "device": device, "seed": seed,
             "tasks": tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks is not None else None}
    given = {k: v for k, v in given.items() if v is not None}
    if minutes is not None and steps is None:
        given["max_steps"] = None  # the budget alone fixes the step count
    model = {k: v for k, v in (("aggregator", aggregator), ("modalities", modalities)) if v is not None}
    try:
        # A resumed run starts from its checkpoint's options; the options given here override them.
        saved = checkpoint_config(out) if resume else None
        base = dataclasses.asdict(saved) if saved is not None else {}
        if model or "model" in base:
            given["model"] = {**base.get("model", {}), **model}
        result = train(dataset_dir, out, TrainConfig(**{**base, **given}), progress=progress, resume=resume)
    except (ConfigError, ArtifactError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    table = Table(title=f"trained {result.steps} steps in {result.elapsed_s:.0f} s, "
                        f"{result.pairs_per_s:,.0f} pairs/s, final loss {result.final_loss:.4f}")
    for name, justify in (("task", "left"), ("eval pairs", "right"), ("Recall@1", "right"),
                          ("Recall@10", "right"), ("Recall@100", "right")):
        table.add_column(name, justify=justify)
    for task, r in result.final_recall.items():
        table.add_row(task, f"{r['n']:,}", *(f"{r[f'recall@{k}']:.3f}" for k in (1, 10, 100)))
    console.print(table)
    console.print(f"model: {result.model_dir}")

# ---- embed (embed.py) ----


@app.command("embed")
def embed_cmd(
    model_dir: Path = typer.Argument(..., help="A model directory (itemsage train)."),
    dataset_dir: Path = typer.Argument(..., help="A dataset directory (itemsage ingest)."),
    out: Path = typer.Option(..., "--out", help="Embeddings directory (resumed if a run was interrupted)."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Products per forward pass."),
    incremental: bool = typer.Option(False, "--incremental", help="Re-embed only new or changed products."),
    engine: str = typer.Option("local", "--engine", help="local (resumable, incremental) or ray."),
) -> None:
    """Embed every product of the catalog with the product tower into Parquet shards."""
    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError
    from itemsage.embed import embed, embed_with_ray

    if engine not in ("local", "ray"):
        fail(f"--engine must be 'local' or 'ray', got '{engine}'")
    if engine == "ray" and incremental:
        fail("--incremental needs --engine local (the Ray engine always embeds the whole catalog)")
    try:
        if engine == "ray":
            summary = embed_with_ray(model_dir, dataset_dir, out, batch_size=batch_size)
        else:
            summary = embed(model_dir, dataset_dir, out, batch_size=batch_size, incremental=incremental)
    except (ConfigError, ArtifactError, FileNotFoundError, ImportError, ValueError) as err:
        fail(str(err))
    console.print(f"{summary.count:,} products x {summary.dim} dims in {summary.shards} shard(s): {summary.out_dir}")
    console.print(f"embedded {summary.embedded:,} in {summary.seconds:.1f} s "
                  f"({summary.products_per_second:,.0f} products/s)"
                  + (f"; {summary.skipped_shards} shard(s) already complete" if summary.skipped_shards else "")
                  + (f"; reused {summary.reused:,}, removed {summary.removed:,}" if summary.generation else ""))


# ---- index (index.py) ----


@app.command("index")
def index_cmd(
    embeddings_dir: Path = typer.Argument(..., help="A finished embeddings directory (itemsage embed)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Index root: versions/<version>/ and CURRENT go here."),
    kind: str = typer.Option("hnsw", "--kind", help="hnsw (approximate, fast), ivfpq (compressed) or flat (exact)."),
    m: int = typer.Option(32, "--m", help="HNSW links per node."),
    ef_construction: int = typer.Option(200, "--ef-construction", help="HNSW build candidate list."),
    ef_search: int = typer.Option(128, "--ef-search", help="HNSW search candidate list (recall vs speed)."),
    nlist: int = typer.Option(0, "--nlist", help="IVF-PQ lists (0: from the catalog size)."),
    pq_m: int = typer.Option(0, "--pq-m", help="IVF-PQ sub-quantizers (0: half the vector width)."),
    pq_nbits: int = typer.Option(4, "--pq-nbits", help="IVF-PQ bits per sub-quantizer code: 4 (fast-scan) or 8."),
    nprobe: int = typer.Option(0, "--nprobe", help="IVF-PQ lists probed per query (0: nlist / 32)."),
    refine_factor: int = typer.Option(20, "--refine-factor", help="IVF-PQ re-ranks factor x k candidates exactly."),
    backend: str = typer.Option("faiss", "--backend", help="faiss (a local index root) or milvus (--uri)."),
    uri: Optional[str] = typer.Option(None, "--uri", help="Milvus URI: ./file.db (Milvus Lite) or http://host:19530."),
    collection: str = typer.Option("itemsage", "--collection", help="Milvus alias; versions are <name>_<version>."),
    milvus_index: str = typer.Option("HNSW", "--milvus-index", help="Milvus index type: HNSW, FLAT, IVF_FLAT, AUTOINDEX."),
    version: Optional[str] = typer.Option(None, "--version", help="Version name (default: UTC timestamp)."),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Point CURRENT (Milvus: the alias) at the new version."),
) -> None:
    """Build an ANN index over product embeddings, report its recall@10 against exact search."""
    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError

    if backend == "milvus":
        if uri is None:
            fail("--backend milvus needs --uri (./file.db for Milvus Lite, http://host:19530 for a server)")
        from itemsage.index_milvus import MilvusConfig, build_milvus

        try:
            config = MilvusConfig(index_type=milvus_index, m=m, ef_construction=ef_construction, ef_search=ef_search)
            index = build_milvus(embeddings_dir, uri, collection, config, version=version, publish_it=publish)
        except (ConfigError, ArtifactError, ValueError, ImportError) as err:
            fail(str(err))
        stats = index.stats
        console.print(f"wrote Milvus collection {index.collection} ({milvus_index}) in {stats['build_seconds']:.1f} s: "
                      f"{len(index):,} vectors x {index.dim} dims")
        console.print(f"recall@10 vs exact search: {stats['recall_at_10']:.4f} ({stats['recall_queries']} queries)")
        console.print(f"version: {index.version}" + (f" (published as alias '{collection}')" if publish else ""))
        return
    if backend != "faiss":
        fail(f"--backend must be 'faiss' or 'milvus', got '{backend}'")
    if out is None:
        fail("--out is required with --backend faiss (the index root to write)")
    from itemsage.index import IndexConfig, build_from_embeddings

    try:
        config = IndexConfig(kind=kind, m=m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist,
                             pq_m=pq_m, pq_nbits=pq_nbits, nprobe=nprobe, refine_factor=refine_factor)
        index, version_dir = build_from_embeddings(
            embeddings_dir, out, config, version=version, publish_it=publish
        )
    except (ConfigError, ArtifactError, ValueError) as err:
        fail(str(err))
    stats = index.stats
    console.print(f"built {kind} index in {stats['build_seconds']:.1f} s: {len(index):,} vectors x {index.dim} dims")
    if kind == "ivfpq":
        c = index.config
        console.print(f"IVF-PQ: nlist {c.nlist}, pq_m {c.pq_m}, pq_nbits {c.pq_nbits}, nprobe {c.nprobe}, "
                      f"re-rank x{c.refine_factor} from vectors.faiss (memory-mapped)")
    console.print(f"recall@10 vs exact search: {stats['recall_at_10']:.4f} ({stats['recall_queries']} queries)")
    console.print(f"version: {version_dir}" + (" (published as CURRENT)" if publish else ""))


# ---- serve (serve.py) ----


@app.command("serve")
def serve_cmd(
    model: Path = typer.Option(..., "--model", help="A model directory (itemsage train)."),
    index: Optional[Path] = typer.Option(None, "--index", help="An index root (itemsage index); serves its CURRENT version."),
    backend: str = typer.Option("faiss", "--backend", help="faiss (--index) or milvus (--uri)."),
    uri: Optional[str] = typer.Option(None, "--uri", help="Milvus URI: ./file.db (Milvus Lite) or http://host:19530."),
    collection: str = typer.Option("itemsage", "--collection", help="Milvus alias naming the served version."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; loopback by default."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    reload_token_env: str = typer.Option(
        "ITEMSAGE_RELOAD_TOKEN", "--reload-token-env",
        help="Environment variable holding the /admin/reload bearer token (reload is off when it is unset). "
             "A variable, not an option, so the token never shows in `ps`.",
    ),
    threads: int = typer.Option(1, "--threads", help="Torch and faiss threads per request (requests run concurrently)."),
) -> None:
    """Serve candidate retrieval over HTTP: search, closeup, home, embed, metrics and hot reload."""
    import os

    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError
    from itemsage.serve import run

    token = os.environ.get(reload_token_env) or None
    if token is None:
        console.print(f"reload disabled: ${reload_token_env} is not set", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] binding {host}: the service has no authentication except on "
                      "/admin/reload; put it behind your own gateway", highlight=False)
    try:
        if backend == "milvus":
            if uri is None:
                fail("--backend milvus needs --uri (the Milvus the index was written to)")
            from itemsage.index_milvus import MilvusVersions

            source = MilvusVersions(uri, collection)  # reload re-resolves the alias: the hot swap
        elif backend == "faiss":
            if index is None:
                fail("--index is required with --backend faiss (an index root from `itemsage index`)")
            source = index
        else:
            fail(f"--backend must be 'faiss' or 'milvus', got '{backend}'")
        run(model, source, host=host, port=port, reload_token=token, threads=threads)
    except (ConfigError, ArtifactError, ValueError, OSError, ImportError) as err:
        fail(str(err))


# ---- evaluate (evaluate.py) ----


def _recall_table(result: dict, title: str):
    from rich.table import Table

    from itemsage.evaluate import recall_table

    table = Table(title=title)
    for name, justify in (("task", "left"), ("pairs", "right"), ("exact", "right"), ("ANN", "right"),
                          ("popularity", "right"), ("cold start", "right")):
        table.add_column(name, justify=justify)
    for row in recall_table(result, 10):
        table.add_row(*row)
    return table


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Argument(..., help="Model directory (RUN_DIR/model from `itemsage train`)."),
    dataset: Path = typer.Argument(..., help="Dataset directory from `itemsage ingest`."),
    out: Path = typer.Option(..., "--out", help="Directory for report.md and evaluation.json."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index root: also rank through the ANN index."),
    sample: Optional[int] = typer.Option(None, "--sample", help="Evaluate a stratified sample of eval pairs [all]."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Recall@1/10/100 per surface x engagement on the eval window: exact, ANN, popularity, cold start."""
    from itemsage.artifacts import ArtifactError
    from itemsage.evaluate import evaluate, write_report

    try:
        result = evaluate(model, dataset, index_root=index, sample=sample, device=device)
    except (ArtifactError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    report = write_report(result, out)
    console.print(_recall_table(result, "Recall@10 on the eval window"))
    console.print(f"report: {report}")


# ---- compare (compare.py) ----


@app.command("compare")
def compare_cmd(
    dataset: Path = typer.Argument(..., help="Dataset directory from `itemsage ingest`."),
    out: Path = typer.Option(..., "--out", help="Directory for the runs, report.md, plots and results.json."),
    preset: str = typer.Option("cpu", "--preset", help="Model preset of every run: cpu, paper or tiny."),
    steps: int = typer.Option(800, "--steps", help="Training steps of every run (the same budget for all)."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Positives per step of every run."),
    runs: Optional[str] = typer.Option(None, "--runs", help="Comma-separated subset of runs [all]."),
    eval_sample: Optional[int] = typer.Option(None, "--eval-sample", help="Eval pairs per run [all]."),
    random_negatives_ratio: float = typer.Option(
        4.0, "--random-negatives-ratio", help="Random negatives per positive in every run (paper: 4)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train and evaluate the paper's comparisons on one split and write a Markdown report."""
    from itemsage.artifacts import ArtifactError
    from itemsage.compare import RUNS, CompareConfig, compare
    from itemsage.config import ConfigError

    try:
        cfg = CompareConfig(preset=preset, steps=steps, batch_size=batch_size, eval_sample=eval_sample, seed=seed,
                            train_overrides={"random_negatives_ratio": random_negatives_ratio},
                            **({"runs": runs} if runs else {}))
        report = compare(dataset, out, cfg)
    except (ConfigError, ArtifactError) as err:
        fail(str(err))
    console.print(report.read_text())
    console.print(f"report: {report}  (runs available: {', '.join(RUNS)})")


# ---- demo (demo.py) ----


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for every artifact of the demo."),
    products: int = typer.Option(20_000, "--products", help="Products in the generated shop."),
    train_minutes: float = typer.Option(8.0, "--train-minutes", help="Training budget in minutes."),
    preset: str = typer.Option("cpu", "--preset", help="Model preset: cpu, paper or tiny."),
    seed: int = typer.Option(0, "--seed"),
    serve: bool = typer.Option(False, "--serve", help="Then start the service on the demo's model and index."),
    port: int = typer.Option(8000, "--port", help="Port for --serve (bound to 127.0.0.1)."),
) -> None:
    """Generate a demo shop, ingest, train, embed, index and evaluate it, in one command."""
    import time

    from itemsage.config import ConfigError
    from itemsage.demo import DemoSettings, run_demo

    start = time.perf_counter()
    try:
        result = run_demo(DemoSettings(out=out, products=products, train_minutes=train_minutes, preset=preset,
                                       seed=seed), say=lambda m: console.print(m, highlight=False, markup=False))
    except ConfigError as err:
        fail(str(err))
    console.print(_recall_table(result.evaluation, "ItemSage demo: Recall@10 on the eval window"))
    console.print(f"stage seconds: {result.seconds}; total {time.perf_counter() - start:.0f} s")
    console.print(f"report: {result.report}")
    if serve:
        _serve_demo(result, port)
    else:
        console.print(f"serve it: itemsage serve --model {result.model} --index {result.index}")


def _serve_demo(result, port: int) -> None:
    """Print example requests built from the demo's own data, then serve until interrupted."""
    import json

    import pyarrow.parquet as pq

    from itemsage import schema
    from itemsage.serve import run

    product = pq.read_table(result.dataset / schema.PRODUCTS_FILE, columns=[schema.PRODUCT_ID]).slice(0, 3)
    ids = product[schema.PRODUCT_ID].to_pylist()
    evals = pq.read_table(result.dataset / schema.EVAL_FILE, columns=[schema.SURFACE, schema.QUERY_TEXT])
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
                      highlight=False, soft_wrap=True)
    console.print(f"  API docs: {base}/docs")
    run(result.model, result.index, host="127.0.0.1", port=port, reload_token=None)


if __name__ == "__main__":
    app()
