"""`itemsage evaluate` and `itemsage compare`: Recall@K on the test window, and the paper's comparisons (evaluate/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itemsage.cli.common import (
    _CONFIG_HELP,
    _PROGRESS_HELP,
    RUNS,
    EvalDevice,
    Preset,
    _given,
    _progress,
    app,
    console,
    fail,
    flag_names,
)


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


def _print_ceiling(result: dict) -> None:
    """The ceiling's table (evaluate/ceiling_report.py), or why the dataset has none."""
    from rich.table import Table

    from itemsage.evaluate.ceiling_report import ceiling_rows

    ceiling = result.get("ceiling")
    if not ceiling:
        return
    if not ceiling.get("available"):
        console.print(f"no ceiling: {ceiling['reason']}", highlight=False, markup=False)
        return
    table = Table(title="Recall@10 against the data's ceiling (ceilings: random tie-breaking)")
    for name in ("group", "pairs", "exact", "ANN", "popularity", "oracle", "observable", "exact / observable"):
        table.add_column(name, justify="left" if name == "group" else "right")
    for row in ceiling_rows(result, 10):
        table.add_row(*row)
    console.print(table)


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
    progress: bool = typer.Option(True, "--progress/--no-progress", help=_PROGRESS_HELP),
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
    from itemsage.evaluate.report import check_report_out, write_report

    _progress(progress)  # no bar of its own; the flag (and -q) still silence the libraries' (MiniLM loading)
    try:
        check_report_out(out)  # before the work: the report replaces --out whole
        result = evaluate(model, dataset, embeddings, index_root=index, sample=sample, device=device.value,
                          history=history, window=window)
    except (ArtifactError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    report = write_report(result, out)
    console.print(_recall_table(result, f"Recall@10 on the {window} window"))
    _print_ceiling(result)
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
    graph: bool = typer.Option(True, "--graph/--no-graph",
                               help="Build the dataset's engagement graph when it has none (`itemsage graph`) and "
                                    "let the runs read its tokens; --no-graph: every run reads content alone."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Train nothing: report every finished (run, seed) already in --out for "
                                     "--runs, each row with the seeds it has (--seeds is not used)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=_PROGRESS_HELP),
) -> None:
    """Train the paper's comparisons to convergence (early stopping on the validation window), with
    seeds, and report them on the test window: mean ± sd, plots, summary.json.

    Prints a summary table (Recall@10 per surface, mean ± sd over seeds); the full report is
    OUT/report.md. A re-run skips the (run, seed) pairs whose result is already on disk. Rows may run
    in separate processes (different --runs, the same --out; each includes itemsage); --report-only
    then writes the one report over all of them.

    Examples:

        itemsage compare runs/data --out runs/compare --runs itemsage,text_only,sum_pooling --seeds 2

        itemsage compare --config run.toml
    """
    from itemsage.artifacts import ArtifactError
    from itemsage.cli import run_files
    from itemsage.config import ConfigError

    try:
        run = run_files.read(config, "compare")  # every key and type checked before anything runs
    except ConfigError as err:
        fail(str(err))
    dataset_from_file = dataset is None and "dataset" in run.values
    dataset, out = run.path_value("dataset", dataset), run.path_value("out", out)
    if dataset is None or out is None:
        fail("give the DATASET argument and --out (or `dataset` and `out` in the --config file)")
    from itemsage.evaluate.compare import compare
    from itemsage.evaluate.compare_runs import CompareConfig

    given = _given(ctx, {"preset": preset, "steps": steps, "batch_size": batch_size, "runs": runs,
                         "eval_sample": eval_sample, "seed": seed, "seeds": seeds, "eval_every": eval_every,
                         "patience": patience, "graph": graph})
    table = run.values
    overrides = dict(table.pop("train_overrides", None) or {})
    ratio_given = bool(_given(ctx, {"random_negatives_ratio": random_negatives_ratio}))
    if "random_negatives_ratio" in table and not ratio_given:  # the flag's key in [compare]
        overrides["random_negatives_ratio"] = table.pop("random_negatives_ratio")
        run.names["train.random_negatives_ratio"] = run.names.pop("compare.random_negatives_ratio")
    table.pop("random_negatives_ratio", None)
    if ratio_given or "random_negatives_ratio" not in overrides:
        overrides["random_negatives_ratio"] = random_negatives_ratio
    names = run.file_names([f"compare.{k}" for k in given] + ["train.random_negatives_ratio"] * ratio_given)
    try:
        cfg = CompareConfig(**{**table, **given, "train_overrides": overrides})
    except ConfigError as err:
        fail(flag_names(str(err), config, names))
    if not dataset.exists():
        fail(f"the dataset directory {dataset} does not exist"
             + (f" (`dataset` in --config {config})" if dataset_from_file else ""))
    try:
        report = compare(dataset, out, cfg, progress=_progress(progress), report_only=report_only)
    except ConfigError as err:
        fail(flag_names(str(err), config, names))
    except ArtifactError as err:
        fail(str(err))
    console.print(_summary_table(out, cfg))
    console.print(f"report: {report}")


def _summary_table(out: Path, cfg):
    """Recall@10 on the test window per run and surface, mean ± sd over seeds (summary.json)."""
    import json

    from rich.table import Table

    from itemsage.evaluate.compare_runs import SUMMARY_FILE, SUMMARY_KEYS

    summary = json.loads((out / SUMMARY_FILE).read_text())
    table = Table(title=f"Recall@10 on the test window, mean ± sd over seeds ({summary['products']:,} products)")
    table.add_column("run")
    for key in SUMMARY_KEYS:
        table.add_column(key.replace("_", " "), justify="right")
    table.add_column("seeds", justify="right")
    for name in cfg.runs:
        row = summary.get(name)
        if row is None:
            continue
        cells = [("–" if v["mean"] is None else f"{v['mean']:.3f} ± {v['sd']:.3f}" if v["seeds"] > 1 else
                  f"{v['mean']:.3f}") for v in (row[key] for key in SUMMARY_KEYS)]
        table.add_row(name, *cells, str(max(v["seeds"] for v in row.values())))
    return table
