"""The `itemsage` command line: thin Typer commands that parse options and call the stage functions.

Heavy imports (torch, faiss, fastapi) happen inside each command so `itemsage --help` stays quick.
The CLI prints results; library code only logs.
"""

from __future__ import annotations

import enum
import logging
import re
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from itemsage import __version__, schema

# compare.RUNS, written out so `--help` does not import pyarrow (tests/test_cli.py checks they agree).
RUNS = ("itemsage", "image_only", "text_only", "sum_pooling", "concat_mlp", "single_task_click", "single_task_save",
        "single_task_add_to_cart", "single_task_checkout", "in_batch_negatives", "random_negatives")

app = typer.Typer(
    name="itemsage",
    help="ItemSage: one product embedding for search, closeup and home, trained from engagement logs.\n\n"
         "Start with `itemsage demo`, or see the pipeline with `itemsage COMMAND --help`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console()
_STATE = {"quiet": False}


# ---- choices (each mirrors a library constant; tests/test_cli.py checks they agree) ----


class Preset(str, enum.Enum):  # model.PRESETS
    cpu = "cpu"
    paper = "paper"
    tiny = "tiny"


class Negatives(str, enum.Enum):  # losses.NEGATIVE_MODES
    mixed = "mixed"
    in_batch = "in_batch"
    random = "random"


class Aggregator(str, enum.Enum):  # model.AGGREGATORS
    transformer = "transformer"
    sum = "sum"
    concat = "concat"


class Modalities(str, enum.Enum):  # model.MODALITIES
    both = "both"
    image = "image"
    text = "text"


class Optimizer(str, enum.Enum):  # train.OPTIMIZERS
    adamw = "adamw"
    lamb = "lamb"


class Device(str, enum.Enum):  # train.TrainConfig.device (cuda:N only in a --config file)
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class EvalDevice(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


class Kind(str, enum.Enum):  # index.KINDS
    hnsw = "hnsw"
    flat = "flat"
    ivfpq = "ivfpq"


class Backend(str, enum.Enum):  # where the index lives: faiss files, or a Milvus collection
    faiss = "faiss"
    milvus = "milvus"


class Engine(str, enum.Enum):
    local = "local"
    ray = "ray"


class ProductQuery(str, enum.Enum):  # product_query.CHOICES
    auto = "auto"
    image = "image"
    text = "text"


def _version(value: bool) -> None:
    if value:
        console.print(f"itemsage {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors; no progress bars."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    # faiss logs "Could not load library with AVX512 support" at INFO on import; it then uses AVX2.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    _STATE["quiet"] = quiet


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit non-zero. The message is plain text: a
    [bracket] in it is shown, not read as markup."""
    console.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)


def _progress(flag: bool) -> bool:
    return flag and not _STATE["quiet"]


# Config fields as the user typed them: `train.max_steps` is `--steps` on the command line.
_FLAGS: dict[str, dict[str, str]] = {
    "train": {"preset": "--preset", "max_steps": "--steps", "max_minutes": "--minutes",
              "batch_size": "--batch-size", "lr": "--lr", "negatives": "--negatives",
              "random_negatives_ratio": "--random-negatives-ratio", "optimizer": "--optimizer",
              "tasks": "--tasks", "upweight_conversions": "--upweight-conversions",
              "checkpoint_every": "--checkpoint-every", "eval_every": "--eval-every",
              "eval_sample": "--eval-sample", "patience": "--patience", "device": "--device", "seed": "--seed"},
    "model": {"aggregator": "--aggregator", "modalities": "--modalities"},
    "compare": {"preset": "--preset", "steps": "--steps", "batch_size": "--batch-size", "runs": "--runs",
                "eval_sample": "--eval-sample", "seed": "--seed", "seeds": "--seeds", "eval_every": "--eval-every",
                "patience": "--patience"},
    "demo": {"products": "--products", "train_minutes": "--train-minutes", "preset": "--preset", "seed": "--seed"},
    "ingest": {"split": "--split", "validation_fraction": "--validation-fraction", "test_fraction": "--test-fraction",
               "validation_from": "--validation-from", "test_from": "--test-from", "gap_hours": "--gap-hours",
               "text_fields": "--text-fields",
               "max_unigrams": "--max-unigrams", "max_bigrams": "--max-bigrams", "max_trigrams": "--max-trigrams",
               "batch_rows": "--batch-rows", "image_dim": "--image-dim", "product_query": "--product-query"},
    "index": {"kind": "--kind", "m": "--m", "ef_construction": "--ef-construction", "ef_search": "--ef-search",
              "nlist": "--nlist", "pq_m": "--pq-m", "pq_nbits": "--pq-nbits", "nprobe": "--nprobe",
              "refine_factor": "--refine-factor"},
    "embed": {"batch_size": "--batch-size"},
}
_FIELD = re.compile(r"`?\b(train|model|compare|demo|ingest|index|embed)\.([a-z_]+)\b(?!\.)`?")
_NOT_FIELDS = {"parquet", "jsonl", "json", "safetensors", "arrow", "py", "toml"}


def flag_names(message: str, config_file: Optional[Path] = None) -> str:
    """A config error as the user sees the options: `train.preset` -> `--preset`; a field with no
    flag is named as its key in the run file ([train] weight_decay)."""
    def name(m: re.Match) -> str:
        section, field = m.groups()
        if field in _NOT_FIELDS:
            return m.group(0)
        flag = _FLAGS.get(section, {}).get(field)
        if flag:
            return flag
        table = "train.model" if section == "model" else section
        return f"`{field}` ([{table}] in the --config file)"
    return _FIELD.sub(name, message) + (f" (values from --config {config_file}, flags override them)"
                                        if config_file is not None else "")


def _given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options typed on the command line (not left at their default), enum values unwrapped."""
    # By name: Typer may carry its own copy of click, whose ParameterSource is another class.
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()
            if getattr(ctx.get_parameter_source(k), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}


_CONFIG_HELP = ("A run file (.toml; the [{0}] table) whose values replace the defaults; flags given here "
                "override it. Keys are the config's field names: see docs/ARCHITECTURE.md, 'Run files'.")


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
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Validate, normalise and time-split a catalog and engagement logs into a dataset directory.

    Bad rows go to DIR/rejects.jsonl with their reason; a file that cannot be used at all, or one
    whose every row is rejected, stops the run before anything is written.

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
                       product_query=product_query.value, progress=_progress(progress))
        options.update({k: v for k, v in (("validation_fraction", validation_fraction),
                                          ("test_fraction", test_fraction)) if v is not None})
        if text_fields is not None:
            options["text_fields"] = tuple(f.strip() for f in text_fields.split(",") if f.strip())
        summary = ingest(catalog, logs, out, IngestConfig(**options))
    except (ConfigError, DataError) as err:
        fail(flag_names(str(err)))
    console.print(summary_table(summary))

# ---- train (train.py) ----


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    dataset_dir: Optional[Path] = typer.Argument(
        None, show_default=False, help="A dataset directory (itemsage ingest); or `dataset` in --config."),
    out: Optional[Path] = typer.Option(
        None, "--out", show_default=False,
        help="Run directory: checkpoints/, tensorboard/ and the final model/; or `out` in --config."),
    config: Optional[Path] = typer.Option(
        None, "--config", show_default=False,
        help=_CONFIG_HELP.format("train") + " A model's config.json re-runs the run that wrote it."),
    preset: Preset = typer.Option(Preset.cpu, "--preset", help="Model preset: the tower's size."),
    steps: Optional[int] = typer.Option(
        2000, "--steps", help="Training steps (with --minutes alone: as many as fit in the budget)."),
    minutes: Optional[float] = typer.Option(
        None, "--minutes", show_default=False, help="Wall-clock budget in minutes; the step count is re-estimated as the run goes."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Positives per step, all processes."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    negatives: Negatives = typer.Option(Negatives.mixed, "--negatives", help="Negatives of the sampled softmax."),
    random_negatives_ratio: float = typer.Option(
        4.0, "--random-negatives-ratio", help="Random catalog negatives per positive."),
    aggregator: Aggregator = typer.Option(
        Aggregator.transformer, "--aggregator", help="How the tower pools image and text tokens."),
    modalities: Optional[Modalities] = typer.Option(
        None, "--modalities", show_default=False,
        help="Features the tower reads (default: both, or text when the catalog has no image vectors)."),
    optimizer: Optimizer = typer.Option(Optimizer.adamw, "--optimizer", help="Optimiser."),
    tasks: Optional[str] = typer.Option(
        None, "--tasks", show_default=False,
        help=f"Comma-separated surface.engagement tasks (default: all): {', '.join(schema.ALL_TASKS)}."),
    upweight_conversions: float = typer.Option(
        1.0, "--upweight-conversions", help="Sampling factor of add_to_cart/checkout pairs."),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints."),
    eval_every: int = typer.Option(500, "--eval-every", help="Steps between validation-window Recall@10 evaluations."),
    eval_sample: int = typer.Option(
        2000, "--eval-sample", help="Validation pairs per evaluation (0: no evaluation, keep the last step)."),
    patience: int = typer.Option(
        5, "--patience", help="Stop after this many evaluations (not steps; one every --eval-every steps) without "
                              "a better validation Recall@10; the best evaluation's model is kept (0: never stop "
                              "early)."),
    device: Device = typer.Option(Device.auto, "--device", help="Where to train (auto: cuda when available)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in --out."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed, data and options give the same "
                                               "weights on the same machine."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train the product tower and query adapters (multi-task sampled softmax); runs under torchrun too.

    The resolved options are saved in OUT/model/config.json; `--config OUT/model/config.json` runs
    the same training again.

    Examples:

        itemsage train runs/data --out runs/train --preset cpu --minutes 6

        itemsage train --config run.toml --steps 500
    """
    import dataclasses
    import os

    from rich.table import Table

    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError, check_keys, read_run_file

    try:
        table = read_run_file(config, "train") if config is not None else {}
    except ConfigError as err:
        fail(str(err))
    dataset_dir = dataset_dir or _path(table.pop("dataset", None))
    out = out or _path(table.pop("out", None))
    table.pop("dataset", None), table.pop("out", None)
    if dataset_dir is None or out is None:
        fail("give the DATASET_DIR argument and --out (or `dataset` and `out` in the --config file)")

    from itemsage.train.config import TrainConfig, checkpoint_config
    from itemsage.train.loop import train

    given = _given(ctx, {"preset": preset, "steps": steps, "minutes": minutes, "batch_size": batch_size, "lr": lr,
                         "negatives": negatives, "random_negatives_ratio": random_negatives_ratio,
                         "optimizer": optimizer, "upweight_conversions": upweight_conversions,
                         "checkpoint_every": checkpoint_every, "eval_every": eval_every, "eval_sample": eval_sample,
                         "patience": patience,
                         "device": device, "seed": seed, "tasks": tasks})
    for flag, field in (("steps", "max_steps"), ("minutes", "max_minutes")):
        if flag in given:
            given[field] = given.pop(flag)
    if "tasks" in given:
        given["tasks"] = tuple(t.strip() for t in given["tasks"].split(",") if t.strip())
    model = _given(ctx, {"aggregator": aggregator, "modalities": modalities})
    try:
        check_keys(table, [f.name for f in dataclasses.fields(TrainConfig)], section="train")
        if "max_minutes" in {**table, **given} and "max_steps" not in {**table, **given}:
            given["max_steps"] = None  # the budget alone fixes the step count
        # A resumed run starts from its checkpoint's options; the file's, then the flags', override them.
        saved = checkpoint_config(out) if resume else None
        base = dataclasses.asdict(saved) if saved is not None else {}
        merged = {**base, **table, **given}
        model = {**base.get("model", {}), **dict(table.get("model") or {}), **model}
        if model:
            merged["model"] = model
        result = train(dataset_dir, out, TrainConfig(**merged), progress=_progress(progress), resume=resume)
    except ConfigError as err:
        fail(flag_names(str(err), config))
    except (ArtifactError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if result.notes:
        for note in result.notes:
            console.print(f"note: {note}", highlight=False, markup=False)
    table = Table(title=f"trained {result.steps} steps in {result.elapsed_s:.0f} s, "
                        f"{result.pairs_per_s:,.0f} pairs/s, final loss {result.final_loss:.4f}")
    if result.best_step is not None:
        console.print(f"model: the step-{result.best_step} evaluation, the best validation Recall@10"
                      + (" (stopped early: no gain for --patience evaluations)" if result.stopped_early else ""))
    for name, justify in (("task", "left"), ("validation pairs", "right"), ("Recall@1", "right"),
                          ("Recall@10", "right"), ("Recall@100", "right")):
        table.add_column(name, justify=justify)
    for task, r in result.final_recall.items():
        table.add_row(task, f"{r['n']:,}", *(f"{r[f'recall@{k}']:.3f}" for k in (1, 10, 100)))
    console.print(table)
    console.print(f"model: {result.model_dir}")


def _path(value: Any) -> Optional[Path]:
    return Path(value) if value is not None else None

# ---- embed (embed.py) ----


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
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Embed every product of a dataset, or of a catalog file, with the product tower into Parquet shards.

    Examples:

        itemsage embed runs/train/model runs/data --out runs/embeddings

        itemsage embed runs/train/model --catalog new_products.jsonl --out runs/new-embeddings
    """
    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError
    from itemsage.embed.shards import embed
    from itemsage.embed.catalog import embed_from_catalog
    from itemsage.embed.ray_engine import embed_with_ray
    from itemsage.data.ingest import DataError

    if (dataset_dir is None) == (catalog is None):
        fail("give either a DATASET_DIR argument or --catalog FILE_OR_DIR (not both)")
    if engine == Engine.ray and (incremental or catalog is not None):
        fail("--incremental and --catalog need --engine local (the Ray engine embeds a whole dataset)")
    rejected = None
    try:
        if engine == Engine.ray:
            summary = embed_with_ray(model_dir, dataset_dir, out, batch_size=batch_size)
        elif catalog is not None:
            summary, rejected = embed_from_catalog(model_dir, catalog, out, batch_size=batch_size,
                                                   incremental=incremental, progress=_progress(progress))
        else:
            summary = embed(model_dir, dataset_dir, out, batch_size=batch_size, incremental=incremental,
                            progress=_progress(progress))
    except ConfigError as err:
        fail(flag_names(str(err)))
    except (ArtifactError, DataError, FileNotFoundError, ImportError, ValueError) as err:
        fail(str(err))
    if rejected:
        console.print(f"[yellow]warning:[/] {rejected:,} catalog row(s) rejected; every one and its reason: "
                      f"{out / 'catalog' / schema.REJECTS_FILE}", highlight=False)
    console.print(f"{summary.count:,} products x {summary.dim} dims in {summary.shards} shard(s): {summary.out_dir}")
    console.print(f"embedded {summary.embedded:,} in {summary.seconds:.1f} s "
                  f"({summary.products_per_second:,.0f} products/s)"
                  + (f"; {summary.skipped_shards} shard(s) already complete" if summary.skipped_shards else "")
                  + (f"; reused {summary.reused:,}, removed {summary.removed:,}" if summary.generation else ""))


# ---- index (index.py) ----


@app.command("index")
def index_cmd(
    embeddings_dir: Optional[Path] = typer.Argument(None, help="A finished embeddings directory (itemsage embed); "
                                                     "not with --compact."),
    out: Optional[Path] = typer.Option(None, "--out", show_default=False,
                                       help="Index root: versions/<version>/ and CURRENT go here (faiss backend)."),
    kind: Kind = typer.Option(Kind.hnsw, "--kind", help="hnsw: approximate, fast; ivfpq: compressed codes with an "
                              "exact re-ranking; flat: exact."),
    m: int = typer.Option(32, "--m", help="HNSW links per node."),
    ef_construction: int = typer.Option(200, "--ef-construction", help="HNSW build candidate list."),
    ef_search: int = typer.Option(128, "--ef-search", help="HNSW search candidate list (recall vs speed)."),
    nlist: int = typer.Option(0, "--nlist", help="IVF-PQ lists (0: from the catalog size)."),
    pq_m: int = typer.Option(0, "--pq-m", help="IVF-PQ sub-quantizers (0: half the vector width)."),
    pq_nbits: int = typer.Option(4, "--pq-nbits", help="IVF-PQ bits per sub-quantizer code: 4 (fast-scan) or 8."),
    nprobe: int = typer.Option(0, "--nprobe", help="IVF-PQ lists probed per query (0: nlist / 32)."),
    refine_factor: int = typer.Option(20, "--refine-factor", help="IVF-PQ re-ranks factor x k candidates exactly."),
    backend: Backend = typer.Option(Backend.faiss, "--backend", help="faiss (a local index root, --out) or milvus (--uri)."),
    uri: Optional[str] = typer.Option(None, "--uri", show_default=False,
                                      help="Milvus URI: ./file.db (Milvus Lite) or http://host:19530."),
    collection: str = typer.Option("itemsage", "--collection", help="Milvus alias; versions are <name>_<version>."),
    milvus_index: str = typer.Option("HNSW", "--milvus-index", help="Milvus index type: HNSW, FLAT, IVF_FLAT, AUTOINDEX."),
    version: Optional[str] = typer.Option(None, "--version", show_default=False,
                                          help="Version name (default: the UTC time)."),
    publish: bool = typer.Option(True, "--publish/--no-publish",
                                 help="Point CURRENT (Milvus: the alias) at the new version."),
    compact: bool = typer.Option(False, "--compact", help="Fold the live updates logged under --out into a new "
                                 "version of CURRENT (same kind and parameters); then POST /admin/reload."),
) -> None:
    """Build an ANN index over product embeddings, report its recall@10 against exact search.

    Example:

        itemsage index runs/embeddings --out runs/index --kind hnsw
    """
    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError

    if backend == Backend.milvus:
        if uri is None:
            fail("--backend milvus needs --uri (./file.db for Milvus Lite, http://host:19530 for a server)")
        if embeddings_dir is None or compact:
            fail("--backend milvus writes an EMBEDDINGS_DIR into a new collection (no --compact: live updates are "
                 "for the faiss backend)")
        from itemsage.index.milvus import MilvusConfig, build_milvus

        try:
            config = MilvusConfig(index_type=milvus_index, m=m, ef_construction=ef_construction, ef_search=ef_search)
            index = build_milvus(embeddings_dir, uri, collection, config, version=version, publish_it=publish)
        except (ConfigError, ArtifactError, ValueError, ImportError) as err:
            fail(str(err))
        stats = index.stats
        console.print(f"wrote Milvus collection {index.collection} ({milvus_index}) in {stats['build_seconds']:.1f} s: "
                      f"{len(index):,} vectors x {index.dim} dims")
        console.print(f"recall@10 vs exact search: {stats['neighbour_recall_at_10']:.4f} ({stats['recall_queries']} queries)")
        console.print(f"version: {index.version}" + (f" (published as alias '{collection}')" if publish else ""))
        return
    if out is None:
        fail("--out is required with --backend faiss (the index root to write)")
    from itemsage.index.config import IndexConfig
    from itemsage.index.build import build_from_embeddings

    if compact:
        from itemsage.index.live import compact as compact_live

        if embeddings_dir is not None:
            fail("--compact rebuilds CURRENT's version with its live updates; give no EMBEDDINGS_DIR")
        try:
            result = compact_live(out, version=version, publish=publish)
        except (ConfigError, ArtifactError, ValueError) as err:
            fail(str(err))
        if result is None:
            console.print("no live updates to compact; CURRENT is unchanged")
            return
        index, version_dir, folded = result
        console.print(f"folded {folded:,} live updates: {len(index):,} vectors x {index.dim} dims in "
                      f"{index.stats['build_seconds']:.1f} s, recall@10 vs exact {index.stats['neighbour_recall_at_10']:.4f}")
        console.print(f"version: {version_dir}" + (" (published as CURRENT; POST /admin/reload to serve it)"
                                                   if publish else ""))
        return
    if embeddings_dir is None:
        fail("give the EMBEDDINGS_DIR to index (or --compact to fold live updates into CURRENT)")
    try:
        config = IndexConfig(kind=kind.value, m=m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist,
                             pq_m=pq_m, pq_nbits=pq_nbits, nprobe=nprobe, refine_factor=refine_factor)
        index, version_dir = build_from_embeddings(
            embeddings_dir, out, config, version=version, publish_it=publish
        )
    except ConfigError as err:
        fail(flag_names(str(err)))
    except (ArtifactError, ValueError) as err:
        fail(str(err))
    stats = index.stats
    console.print(f"built {kind.value} index in {stats['build_seconds']:.1f} s: {len(index):,} vectors x {index.dim} dims")
    if kind == Kind.ivfpq:
        c = index.config
        console.print(f"IVF-PQ: nlist {c.nlist}, pq_m {c.pq_m}, pq_nbits {c.pq_nbits}, nprobe {c.nprobe}, "
                      f"re-rank x{c.refine_factor} from vectors.faiss (memory-mapped)")
    console.print(f"recall@10 vs exact search: {stats['neighbour_recall_at_10']:.4f} ({stats['recall_queries']} queries)")
    console.print(f"version: {version_dir}" + (" (published as CURRENT)" if publish else ""))


# ---- serve (serve.py) ----


@app.command("serve")
def serve_cmd(
    model: Path = typer.Option(..., "--model", help="A model directory (itemsage train)."),
    index: Optional[Path] = typer.Option(None, "--index", help="An index root (itemsage index); serves its CURRENT version."),
    backend: Backend = typer.Option(Backend.faiss, "--backend", help="faiss (--index) or milvus (--uri)."),
    uri: Optional[str] = typer.Option(None, "--uri", show_default=False,
                                      help="Milvus URI: ./file.db (Milvus Lite) or http://host:19530."),
    collection: str = typer.Option("itemsage", "--collection", help="Milvus alias naming the served version."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; loopback by default."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    reload_token_env: str = typer.Option(
        "ITEMSAGE_RELOAD_TOKEN", "--reload-token-env",
        help="Environment variable holding the /admin/reload bearer token (reload is off when it is unset). "
             "A variable, not an option, so the token never shows in `ps`.",
    ),
    threads: int = typer.Option(1, "--threads", help="Torch and faiss threads per request (requests run concurrently)."),
    query_encoder: str = typer.Option("onnx", "--query-encoder",
                                      help="Text query encoder: onnx (MiniLM via ONNX Runtime), onnx-int8, or torch."),
    query_cache: int = typer.Option(10_000, "--query-cache", help="Recent search texts whose vectors are kept (0: off)."),
    query_batch: int = typer.Option(8, "--query-batch", help="Encode up to this many concurrent search texts "
                                    "together (1: one at a time)."),
    products: Optional[Path] = typer.Option(
        None, "--products", show_default=False,
        help="Titles and images for the page at /: a dataset directory (itemsage ingest) or a catalog file "
             "or directory (default: ids only)."),
) -> None:
    """Serve candidate retrieval over HTTP: a page at /, search, closeup, home, embed, metrics and hot reload.

    Example:

        itemsage serve --model runs/train/model --index runs/index --products runs/data
    """
    import os

    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError
    from itemsage.serve.app import run

    token = os.environ.get(reload_token_env) or None
    if token is None:
        console.print(f"reload and live updates disabled: ${reload_token_env} is not set", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] binding {host}: the service has no authentication except on "
                      "/admin/*; put it behind your own gateway", highlight=False)
    console.print(f"page: http://{host}:{port}/   API docs: http://{host}:{port}/docs", highlight=False)
    try:
        if backend == Backend.milvus:
            if uri is None:
                fail("--backend milvus needs --uri (the Milvus the index was written to)")
            from itemsage.index.milvus import MilvusVersions

            source = MilvusVersions(uri, collection)  # reload re-resolves the alias: the hot swap
        else:
            if index is None:
                fail("--index is required with --backend faiss (an index root from `itemsage index`)")
            source = index
        run(model, source, host=host, port=port, reload_token=token, threads=threads, query_encoder=query_encoder,
            query_cache=query_cache, query_batch=query_batch, products=products)
    except (ConfigError, ArtifactError, ValueError, OSError, ImportError) as err:
        fail(str(err))


# ---- evaluate (evaluate.py) ----


def _recall_table(result: dict, title: str):
    from rich.table import Table

    from itemsage.evaluate.report import recall_table

    table = Table(title=title)
    for name, justify in (("task", "left"), ("pairs", "right"), ("exact", "right"), ("ANN", "right"),
                          ("popularity", "right"), ("cold start", "right"), ("seen", "right"), ("unseen", "right")):
        table.add_column(name, justify=justify)
    for row in recall_table(result, 10):
        table.add_row(*row)
    return table


@app.command("evaluate")
def evaluate_cmd(
    model: Path = typer.Argument(..., help="Model directory (RUN_DIR/model from `itemsage train`)."),
    dataset: Path = typer.Argument(..., help="Dataset directory from `itemsage ingest`."),
    out: Path = typer.Option(..., "--out", help="Directory for report.md and evaluation.json."),
    embeddings: Path = typer.Option(
        ..., "--embeddings", help="Embeddings directory that `itemsage embed` wrote with this model: the catalog "
                                  "is ranked by these vectors (exact search over them)."),
    index: Optional[Path] = typer.Option(None, "--index", show_default=False,
                                         help="Index root built from those embeddings: also rank through it (ANN)."),
    sample: Optional[int] = typer.Option(None, "--sample", show_default=False,
                                         help="Evaluate a stratified sample of N test-window pairs (default: all)."),
    device: EvalDevice = typer.Option(EvalDevice.cpu, "--device", help="Where to run the tower."),
    history: int = typer.Option(
        10, "--history", help="Served paths: a user's home history is their last N distinct train-window products."),
    window: str = typer.Option(
        "test", "--window", help="Window to score: test (the reported figures) or validation (to choose options "
                                 "without reading the test window)."),
) -> None:
    """Recall@1/10/100 per surface x engagement on the test window: exact, ANN, popularity, cold start,
    and pairs seen / unseen in the train window; closeup by product and home by history as the service
    computes them, and the user-level protocol (Recall@K, NDCG@K per user).

    The catalog is ranked by the vectors `itemsage embed` wrote (not re-embedded here), so the figures
    are those of what is served. The report adds Recall@K curves, the training curves and a gallery.

    Example:

        itemsage evaluate runs/train/model runs/data --embeddings runs/emb --index runs/index --out runs/eval
    """
    from itemsage.artifacts import ArtifactError
    from itemsage.evaluate.evaluation import evaluate
    from itemsage.evaluate.report import write_report

    try:
        result = evaluate(model, dataset, embeddings, index_root=index, sample=sample, device=device.value,
                          history=history, window=window)
    except (ArtifactError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    report = write_report(result, out)
    console.print(_recall_table(result, f"Recall@10 on the {window} window"))
    from itemsage.evaluate.report import served_rows

    for label, index_name, n, overall, per_engagement in served_rows(result, 10):
        console.print(f"{label} [{index_name}]: Recall@10 {overall} over {n} pairs ({per_engagement})",
                      highlight=False, markup=False)
    console.print(f"report: {report}")


# ---- compare (compare.py) ----


@app.command("compare")
def compare_cmd(
    ctx: typer.Context,
    dataset: Optional[Path] = typer.Argument(
        None, show_default=False, help="Dataset directory from `itemsage ingest`; or `dataset` in --config."),
    out: Optional[Path] = typer.Option(
        None, "--out", show_default=False,
        help="Directory for the runs, report.md, plots and results.json; or `out` in --config."),
    config: Optional[Path] = typer.Option(None, "--config", show_default=False, help=_CONFIG_HELP.format("compare")),
    preset: Preset = typer.Option(Preset.cpu, "--preset", help="Model preset of every run."),
    steps: int = typer.Option(3000, "--steps", help="Step cap of every run; early stopping usually ends a run first."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Positives per step of every run."),
    runs: Optional[str] = typer.Option(
        None, "--runs", show_default=False,
        help=f"Comma-separated subset of runs (default: all): {', '.join(RUNS)}."),
    eval_sample: Optional[int] = typer.Option(None, "--eval-sample", show_default=False,
                                              help="Test-window pairs per run (default: all)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per run (mean and sd over them); fewer for less time."),
    eval_every: int = typer.Option(
        100, "--eval-every", help="Steps between validation-window evaluations; each run keeps its best."),
    patience: int = typer.Option(
        3, "--patience", help="Evaluations without a gain before a run stops, the same for every run "
                              "(0: no early stop, every run goes to --steps)."),
    random_negatives_ratio: float = typer.Option(
        4.0, "--random-negatives-ratio", help="Random negatives per positive in every run (paper: 4)."),
    seed: int = typer.Option(0, "--seed", help="First seed: runs use --seed, --seed + 1, ..."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Train nothing: report every finished (run, seed) already in --out for "
                                     "--runs, each row with the seeds it has (--seeds is not used)."),
) -> None:
    """Train the paper's comparisons to convergence (early stopping on the validation window), with
    seeds, and report them on the test window: mean ± sd, plots, summary.json.

    A re-run skips the (run, seed) pairs whose result is already on disk. Rows may run in separate
    processes (different --runs, the same --out; each includes itemsage); --report-only then writes
    the one report over all of them.

    Examples:

        itemsage compare runs/data --out runs/compare --runs itemsage,text_only,sum_pooling --seeds 2

        itemsage compare --config run.toml
    """
    import dataclasses

    from itemsage.artifacts import ArtifactError
    from itemsage.evaluate.compare import CompareConfig, compare
    from itemsage.config import ConfigError, check_keys, read_run_file

    try:
        table = read_run_file(config, "compare") if config is not None else {}
    except ConfigError as err:
        fail(str(err))
    dataset = dataset or _path(table.pop("dataset", None))
    out = out or _path(table.pop("out", None))
    table.pop("dataset", None), table.pop("out", None)
    if dataset is None or out is None:
        fail("give the DATASET argument and --out (or `dataset` and `out` in the --config file)")
    given = _given(ctx, {"preset": preset, "steps": steps, "batch_size": batch_size, "runs": runs,
                         "eval_sample": eval_sample, "seed": seed, "seeds": seeds, "eval_every": eval_every,
                         "patience": patience})
    overrides = dict(table.pop("train_overrides", None) or {})
    if _given(ctx, {"random_negatives_ratio": random_negatives_ratio}) or "random_negatives_ratio" not in overrides:
        overrides["random_negatives_ratio"] = random_negatives_ratio
    try:
        check_keys(table, [f.name for f in dataclasses.fields(CompareConfig)], section="compare")
        cfg = CompareConfig(**{**table, **given, "train_overrides": overrides})
        report = compare(dataset, out, cfg, progress=_progress(True), report_only=report_only)
    except ConfigError as err:
        fail(flag_names(str(err), config))
    except ArtifactError as err:
        fail(str(err))
    console.print(report.read_text(), markup=False)
    console.print(f"report: {report}")


# ---- demo (demo.py) ----


@app.command("demo")
def demo_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for every artifact of the demo."),
    config: Optional[Path] = typer.Option(None, "--config", show_default=False, help=_CONFIG_HELP.format("demo")),
    products: int = typer.Option(20_000, "--products", help="Products in the generated shop."),
    train_minutes: float = typer.Option(6.0, "--train-minutes", help="Training budget in minutes."),
    preset: Preset = typer.Option(Preset.cpu, "--preset", help="Model preset."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the shop and the training run."),
    serve: bool = typer.Option(False, "--serve", help="Then start the service on the demo's model and index."),
    port: int = typer.Option(8000, "--port", help="Port for --serve (bound to 127.0.0.1)."),
) -> None:
    """Generate a demo shop, ingest, train, embed, index and evaluate it, in one command.

    A killed demo resumes: a re-run skips every stage whose artifact is complete.

    Examples:

        itemsage demo

        itemsage demo --products 2000 --train-minutes 1 --out runs/small-demo --serve
    """
    import dataclasses
    import time

    from itemsage.config import ConfigError, check_keys, read_run_file
    from itemsage.demo import DemoSettings, run_demo

    start = time.perf_counter()
    try:
        table = read_run_file(config, "demo") if config is not None else {}
        given = _given(ctx, {"out": out, "products": products, "train_minutes": train_minutes, "preset": preset,
                             "seed": seed})
        check_keys(table, [f.name for f in dataclasses.fields(DemoSettings)], section="demo")
        settings = DemoSettings(**{**table, **given})
        result = run_demo(settings, progress=_progress(True),
                          say=lambda m: console.print(m, highlight=False, markup=False))
    except ConfigError as err:
        fail(flag_names(str(err), config))
    console.print(_recall_table(result.evaluation, "ItemSage demo: Recall@10 on the test window"))
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
    run(result.model, result.index, host="127.0.0.1", port=port, reload_token=None, products=result.dataset)


if __name__ == "__main__":
    app()
