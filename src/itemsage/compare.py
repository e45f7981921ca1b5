"""The paper's comparisons on one split (SPEC §9): every row trained and evaluated the same way.

Rows are configurations of the same `train()`, never copies of the model:
- architecture and modalities: transformer (image + text) against image only, text only,
  sum pooling and the concat MLP;
- multi-task against one single-task model per engagement type (all surfaces of that engagement);
- negatives: in-batch only and random only against mixed.
Every run gets the same data, batch size, step budget and seed, and is ranked against the whole
catalog by exact search, so the differences are the configuration's. Each run's model is its best
evaluation on the validation window (`evals` evaluations spread over the steps, no early stop, so the
budget stays equal); every reported figure is on the test window. A re-run skips runs whose result
is already on disk.

The report shows, besides the tables: every run's training loss and validation Recall@10 against
steps (training_curves.png), every run's Recall@K curve per surface (recall_at_k.png), and the
reference model's nearest neighbours for a few test queries per surface.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itemsage import artifacts, schema
from itemsage.config import require

log = logging.getLogger(__name__)

# name -> (group, TrainConfig overrides, model overrides). "itemsage" is the paper's model and the
# reference row of every group.
RUNS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "itemsage": ("reference", {}, {}),
    "image_only": ("architecture", {}, {"modalities": "image"}),
    "text_only": ("architecture", {}, {"modalities": "text"}),
    "sum_pooling": ("architecture", {}, {"aggregator": "sum"}),
    "concat_mlp": ("architecture", {}, {"aggregator": "concat"}),
    **{
        f"single_task_{e}": ("tasks", {"tasks": tuple(schema.task_name(s, e) for s in schema.SURFACES)}, {})
        for e in schema.ENGAGEMENTS
    },
    "in_batch_negatives": ("negatives", {"negatives": "in_batch"}, {}),
    "random_negatives": ("negatives", {"negatives": "random"}, {}),
}
RESULT_FILE = "result.json"


@dataclass
class CompareConfig:
    """The shared budget of every run. Validated at construction; errors name the option."""

    preset: str = "cpu"
    steps: int = 800  # per run, the same for every row
    batch_size: int = 1024
    runs: tuple[str, ...] = tuple(RUNS)
    eval_sample: int | None = None  # test pairs per run; None = the whole test window
    evals: int = 4  # validation evaluations per run (they choose its model); 0 = none, the last step's model
    validation_sample: int = 2000  # validation pairs per evaluation
    seed: int = 0
    train_overrides: dict[str, Any] = field(default_factory=dict)  # any other TrainConfig option

    def __post_init__(self) -> None:
        self.runs = tuple(self.runs.split(",")) if isinstance(self.runs, str) else tuple(self.runs)
        unknown = [r for r in self.runs if r not in RUNS]
        require(not unknown, f"compare.runs has unknown run(s) {unknown}; known: {', '.join(RUNS)}")
        require("itemsage" in self.runs, "compare.runs must include 'itemsage', the reference row of every table")
        require(isinstance(self.steps, int) and self.steps >= 1, f"compare.steps ({self.steps!r}) must be >= 1")
        require(isinstance(self.batch_size, int) and self.batch_size >= 2,
                f"compare.batch_size ({self.batch_size!r}) must be >= 2")
        require(isinstance(self.evals, int) and self.evals >= 0, f"compare.evals ({self.evals!r}) must be >= 0")
        require(isinstance(self.validation_sample, int) and self.validation_sample >= 1,
                f"compare.validation_sample ({self.validation_sample!r}) must be >= 1")


def train_config(name: str, cfg: CompareConfig):
    """The TrainConfig of run `name` under the shared budget."""
    from itemsage.train import TrainConfig

    _, train_over, model_over = RUNS[name]
    options = {
        "preset": cfg.preset, "max_steps": cfg.steps, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "eval_every": -(-cfg.steps // cfg.evals) if cfg.evals else 0,
        "eval_sample": cfg.validation_sample if cfg.evals else 0, "patience": 0, "checkpoint_every": 0,
        **cfg.train_overrides, **train_over,
    }
    options["model"] = {**cfg.train_overrides.get("model", {}), **model_over}
    return TrainConfig(**options)


def run_one(name: str, dataset_dir: Path, out_dir: Path, cfg: CompareConfig, progress: bool) -> dict[str, Any]:
    """Train and evaluate one row; its result.json is written last, so a finished run is skipped."""
    from itemsage.evaluate import evaluate
    from itemsage.model import load_model
    from itemsage.train import train

    run_dir = out_dir / "runs" / name
    done = run_dir / RESULT_FILE
    if done.is_file():
        log.info("compare: %s already done, skipping", name)
        return json.loads(done.read_text())
    tcfg = train_config(name, cfg)
    if run_dir.exists():  # an unfinished earlier attempt: start the run again from scratch
        import shutil

        shutil.rmtree(run_dir)
    start = time.perf_counter()
    trained = train(dataset_dir, run_dir, tcfg, progress=progress)
    train_s = time.perf_counter() - start
    result = evaluate(trained.model_dir, dataset_dir, sample=cfg.eval_sample, seed=cfg.seed)
    loaded = load_model(trained.model_dir)
    result["run"] = {
        "name": name,
        "group": RUNS[name][0],
        "train_config": dataclasses.asdict(tcfg),
        "model_config": dataclasses.asdict(loaded.config),
        "parameters": sum(p.numel() for p in loaded.tower.parameters()),
        "steps": trained.steps,
        "best_step": trained.best_step,
        "train_seconds": round(train_s, 1),
        "pairs_per_s": round(trained.pairs_per_s, 1),
        "final_loss": trained.final_loss,
    }
    artifacts.atomic_write_json(done, result)
    return result


def compare(dataset_dir: str | Path, out_dir: str | Path, cfg: CompareConfig, progress: bool = True) -> Path:
    """Train and evaluate every configured run, then write report.md, plots and results.json."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    artifacts.read_manifest(dataset_dir, kind="dataset")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for i, name in enumerate(cfg.runs, 1):
        log.info("compare: run %d/%d: %s", i, len(cfg.runs), name)
        results[name] = run_one(name, dataset_dir, out_dir, cfg, progress)
    return write_report(results, out_dir, cfg, dataset_dir)


# ---- the report ---------------------------------------------------------------------------------


def _recall(result: dict[str, Any], task: str, k: int = 10) -> float | None:
    row = result["exact"].get(task)
    return None if not row or row["n"] == 0 else row[f"recall@{k}"]


def _surface_recall(result: dict[str, Any], surface: str, k: int = 10) -> float | None:
    """Recall@k over all of a surface's pairs (pair-weighted mean of its tasks)."""
    rows = [v for t, v in result["exact"].items() if t.startswith(surface + ".") and v["n"]]
    n = sum(r["n"] for r in rows)
    return None if n == 0 else sum(r[f"recall@{k}"] * r["n"] for r in rows) / n


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _surface_table(names: list[str], results: dict[str, Any]) -> list[str]:
    lines = ["| run | params | " + " | ".join(schema.SURFACES) + " | all |", "|---|---:|" + "---:|" * (len(schema.SURFACES) + 1)]
    for n in names:
        r = results[n]
        cells = [_fmt(_surface_recall(r, s)) for s in schema.SURFACES] + [_fmt(_recall(r, "all"))]
        lines.append(f"| {n} | {r['run']['parameters']:,} | " + " | ".join(cells) + " |")
    return lines


def _task_rows(results: dict[str, Any]) -> list[str]:
    """Multi-task against each engagement's single-task model, on that engagement's tasks."""
    lines = ["| task | pairs | single-task | multi-task |", "|---|---:|---:|---:|"]
    ref = results["itemsage"]
    for e in schema.ENGAGEMENTS:
        single = results.get(f"single_task_{e}")
        if single is None:
            continue
        for s in schema.SURFACES:
            t = schema.task_name(s, e)
            n = ref["exact"].get(t, {}).get("n", 0)
            lines.append(f"| {t} | {n} | {_fmt(_recall(single, t))} | {_fmt(_recall(ref, t))} |")
    return lines


def _pictures(results: dict[str, Any], out_dir: Path) -> list[str]:
    """training_curves.png and recall_at_k.png over every run, and the reference run's gallery."""
    from itemsage.evaluate import gallery_markdown, plot_recall_curves, plot_training_curves

    lines = []
    curves = {n: r["training_curves"] for n, r in results.items() if r.get("training_curves")}
    if curves:
        plot_training_curves(out_dir / "training_curves.png", curves, "Training loss and validation Recall@10",
                             chosen={n: results[n]["run"].get("best_step") for n in curves})
        lines += ["", "## Training curves", "", "Loss per step, and the validation Recall@10 that chose each "
                  "run's model (its best point).", "", "![Training curves](training_curves.png)"]
    recall = {n: r["recall_curve"] for n, r in results.items() if r.get("recall_curve")}
    if recall:
        plot_recall_curves(out_dir / "recall_at_k.png", recall, "Recall@K per surface, test window")
        lines += ["", "## Recall@K, K = 1..100", "", "![Recall@K per surface](recall_at_k.png)"]
    gallery = results["itemsage"].get("gallery")
    if gallery:
        lines += ["", "## Nearest neighbours (itemsage)", "",
                  "A few test-window queries per surface, their top 10 by exact search; the engaged product "
                  "in bold with ✔ (if it is in the top 10).", "", *gallery_markdown(gallery)]
    return lines


def _plot(path: Path, names: list[str], results: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(schema.SURFACES) + ["all"]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, n in enumerate(names):
        vals = [(_surface_recall(results[n], g) if g != "all" else _recall(results[n], "all")) or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, vals, width, label=n)
    ax.set_xticks(np.arange(len(groups)) + width * (len(names) - 1) / 2, groups)
    ax.set_ylabel("Recall@10 (exact)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: Path, cfg: CompareConfig, dataset_dir: Path) -> Path:
    ref = results["itemsage"]
    data = ref["data"]
    dataset = artifacts.read_manifest(dataset_dir, kind="dataset")
    by_group: dict[str, list[str]] = {}
    for name, r in results.items():
        by_group.setdefault(r["run"]["group"], []).append(name)
    train_rows = dataset.get("counts", {}).get("train_rows", {})
    train_pairs = sum(train_rows.values()) if isinstance(train_rows, dict) else train_rows
    ratio = cfg.train_overrides.get("random_negatives_ratio", 4.0)
    sampled = "" if cfg.eval_sample is None else f" (a stratified sample of about {cfg.eval_sample:,}: an equal share per task, all pairs of smaller tasks)"
    lines = [
        "# ItemSage comparisons",
        "",
        f"Data: {data['products']:,} products, {train_pairs:,} train-window pairs, {data['eval_pairs']:,} "
        f"test-window pairs{sampled}, {data['cold_start_pairs']:,} of them on cold-start products.",
        f"Budget, the same for every row: preset `{cfg.preset}`, {cfg.steps} steps of {cfg.batch_size} positives "
        f"(+ {ratio:g}× random negatives where used), seed {cfg.seed}. Recall@10, exact search over the whole catalog, "
        "per surface (pair-weighted over its engagement types), on the test window.",
        (f"Each run's model is its best validation-window evaluation (one every {-(-cfg.steps // cfg.evals)} steps "
         "and one at the end; `best step`); the validation window chose the models, so no figure here comes from it."
         if cfg.evals else
         "No validation evaluations: each run's model is its last step's."),
        "",
        "| run | group | params | steps | best step | train s | pairs/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        run = r["run"]
        best = run.get("best_step")
        lines.append(f"| {name} | {run['group']} | {run['parameters']:,} | {run['steps']} | "
                     f"{'–' if best is None else best} | {run['train_seconds']} | {run['pairs_per_s']} |")
    pop = {"run": {"parameters": 0}, "exact": ref["popularity"]}
    sections = [
        ("architecture", "Architecture and modalities", ["itemsage"] + by_group.get("architecture", [])),
        ("negatives", "Negatives", by_group.get("negatives", []) + ["itemsage"]),
    ]
    for key, title, names in sections:
        if len(names) < 2:
            continue
        lines += ["", f"## {title}", "", *_surface_table(names, results)]
        if key == "architecture":
            lines.append(f"| popularity baseline | 0 | " + " | ".join(
                _fmt(_surface_recall(pop, s)) for s in schema.SURFACES) + f" | {_fmt(_recall(pop, 'all'))} |")
        _plot(out_dir / f"{key}.png", names, results, f"{title}: Recall@10")
        lines += ["", f"![{title}]({key}.png)"]
    arch = ["itemsage"] + by_group.get("architecture", [])
    lines += ["", "## Recall@10 per task", "", "| task | pairs | " + " | ".join(arch) + " | popularity |",
              "|---|---:|" + "---:|" * (len(arch) + 1)]
    for t in [t for t in ref["exact"] if t != "all"]:
        cells = [_fmt(_recall(results[n], t)) for n in arch] + [_fmt(_recall(pop, t))]
        lines.append(f"| {t} | {ref['exact'][t]['n']} | " + " | ".join(cells) + " |")
    if by_group.get("tasks"):
        lines += ["", "## Multi-task against single-task", "",
                  "Each single-task model is trained on one engagement type (all three surfaces).", "",
                  *_task_rows(results)]
        _plot(out_dir / "tasks.png", ["itemsage"] + by_group["tasks"], results, "Multi-task vs single-task: Recall@10")
        lines += ["", "![Multi-task vs single-task](tasks.png)"]
    lines += ["", "## Cold start", "", "Recall@10 on test pairs whose product was never engaged in the train window.", "",
              "| run | pairs | Recall@10 |", "|---|---:|---:|"]
    for name, r in results.items():
        cold = r["cold_start"]["exact"]["all"]
        lines.append(f"| {name} | {cold['n']} | {_fmt(cold['recall@10'] if cold['n'] else None)} |")
    lines += _pictures(results, out_dir)
    report = out_dir / "report.md"
    artifacts.atomic_write_json(out_dir / "results.json", results)
    artifacts.atomic_write_text(report, "\n".join(lines) + "\n")
    artifacts.write_manifest(out_dir, "comparison", config=dataclasses.asdict(cfg),
                             inputs={"dataset": artifacts.fingerprint(dataset_dir)},
                             counts={"runs": len(results)},
                             files=["report.md", "results.json"] + sorted(p.name for p in out_dir.glob("*.png")))
    return report
