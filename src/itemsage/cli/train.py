"""`itemsage train`: the product tower and adapters on a dataset (train/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itemsage import schema
from itemsage.cli.common import (
    _CONFIG_HELP,
    Aggregator,
    Device,
    Modalities,
    Negatives,
    Optimizer,
    Preset,
    _given,
    _progress,
    app,
    console,
    fail,
    flag_names,
)


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
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in --out "
                                "(with another --steps: an unfinished run continues to that count)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed, data and options give the same "
                                               "weights on the same machine."),
    graph: bool = typer.Option(True, "--graph/--no-graph",
                               help="Give the tower the dataset's graph tokens when it has them (`itemsage graph`); "
                                    "--no-graph: content alone."),
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
    from itemsage.cli import run_files
    from itemsage.config import ConfigError

    try:
        run = run_files.read(config, "train")  # every key and type checked before anything runs
    except ConfigError as err:
        fail(str(err))
    dataset_from_file = dataset_dir is None and "dataset" in run.values
    dataset_dir, out = run.path_value("dataset", dataset_dir), run.path_value("out", out)
    if dataset_dir is None or out is None:
        fail("give the DATASET_DIR argument and --out (or `dataset` and `out` in the --config file)")

    from itemsage.train.config import TrainConfig, checkpoint_config
    from itemsage.train.loop import train

    given = _given(ctx, {"preset": preset, "steps": steps, "minutes": minutes, "batch_size": batch_size, "lr": lr,
                         "negatives": negatives, "random_negatives_ratio": random_negatives_ratio,
                         "optimizer": optimizer, "upweight_conversions": upweight_conversions,
                         "checkpoint_every": checkpoint_every, "eval_every": eval_every, "eval_sample": eval_sample,
                         "patience": patience,
                         "device": device, "seed": seed, "tasks": tasks, "graph": graph})
    for flag, field in (("steps", "max_steps"), ("minutes", "max_minutes")):
        if flag in given:
            given[field] = given.pop(flag)
    if "tasks" in given:
        given["tasks"] = tuple(t.strip() for t in given["tasks"].split(",") if t.strip())
    model = _given(ctx, {"aggregator": aggregator, "modalities": modalities})
    table = run.values
    names = run.file_names([f"train.{k}" for k in given] + [f"model.{k}" for k in model])
    try:
        if "max_minutes" in {**table, **given} and "max_steps" not in {**table, **given}:
            given["max_steps"] = None  # the budget alone fixes the step count
        # A resumed run starts from its checkpoint's options; the file's, then the flags', override them.
        saved = checkpoint_config(out) if resume else None
        base = dataclasses.asdict(saved) if saved is not None else {}
        merged = {**base, **table, **given}
        model = {**base.get("model", {}), **dict(table.get("model") or {}), **model}
        if model:
            merged["model"] = model
        cfg = TrainConfig(**merged)
    except ConfigError as err:
        fail(flag_names(str(err), config, names))
    if not dataset_dir.exists():
        fail(f"the dataset directory {dataset_dir} does not exist"
             + (f" (`dataset` in --config {config})" if dataset_from_file else ""))
    try:
        result = train(dataset_dir, out, cfg, progress=_progress(progress), resume=resume)
    except ConfigError as err:
        fail(flag_names(str(err), config, names))
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
