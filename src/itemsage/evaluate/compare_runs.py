"""The rows of `itemsage compare` (evaluate/compare.py): each (run, seed) trained, embedded and
evaluated the same way (`run_one`), the finished results on disk, and the numbers over seeds.

Rows are configurations of the same `train()`, never copies of the model:
- architecture and modalities: transformer (image + text) against image only, text only,
  sum pooling and the concat MLP;
- multi-task against one single-task model per engagement type (all surfaces of that engagement);
- negatives: in-batch only and random only against mixed;
- graph tokens: the transformer and the concat MLP each without them (content alone), against the
  same model reading the dataset's graph (itemsage/graph; built first when the dataset has none).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from itemsage import artifacts, schema
from itemsage.config import from_dict, require, require_int

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
    "no_graph": ("graph", {"graph": False}, {}),
    "concat_mlp_no_graph": ("graph", {"graph": False}, {"aggregator": "concat"}),
}
MAX_SEEDS = 100  # seeds per row: each is a whole training run
RESULT_FILE = "result.json"
# Optional, written by people or scripts next to the report and copied into it: a reading of the
# numbers (opens "What this says") and an ablation table (benchmarks/ablate.py writes one).
NOTES_FILE = "notes.md"
ABLATIONS_FILE = "ablations.md"
SUMMARY_FILE = "summary.json"
SUMMARY_KEYS: tuple[str, ...] = (*schema.SURFACES, "all", "cold_start")  # the keys of summary.json
CONVERSIONS: tuple[str, ...] = ("add_to_cart", "checkout")
# Products as queries as served, and the user-level protocol (evaluate's "served" block), Recall@10 or
# NDCG@10 on the exact index: report key -> (the served block's name, its path to the figure).
CEILING_KINDS = ("oracle", "observable", "features", "train_counts")  # evaluate/ceiling_ranks.py's KINDS
SERVED_KEYS: dict[str, tuple[str, ...]] = {
    "closeup_by_product": ("closeup_by_product", "exact", "all", "recall"),
    "home_by_history": ("home_by_history", "exact", "all", "recall"),
    "user_closeup_recall": ("user_level", "closeup", "exact", "recall"),
    "user_closeup_ndcg": ("user_level", "closeup", "exact", "ndcg"),
    "user_home_recall": ("user_level", "home", "exact", "recall"),
    "user_home_ndcg": ("user_level", "home", "exact", "ndcg"),
}
# One colour per run in every figure (matplotlib's tab10, then black); the popularity baseline is grey.
COLOURS: dict[str, str] = dict(zip(RUNS, ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                                          "#e377c2", "#bcbd22", "#17becf", "#000000", "#7f7f7f", "#aec7e8",
                                          "#ff9896"]))


@dataclass
class CompareConfig:
    """The shared budget and stopping rule of every run. Validated at construction; errors name the option."""

    preset: str = "cpu"
    steps: int = 3000  # step cap per run; early stopping on the validation window usually ends a run first
    batch_size: int = 1024
    runs: tuple[str, ...] = tuple(RUNS)
    seeds: int = 3  # runs per row (seeds seed, seed + 1, ...): mean and sd over them
    eval_every: int = 100  # steps between validation evaluations (they choose the model and stop the run)
    patience: int = 3  # evaluations without a better validation Recall@10 before a run stops; the same for all
    eval_sample: int | None = None  # test pairs per run; None = the whole test window
    # Validation pairs per evaluation (a smaller window is used whole). Its noise decides when runs stop:
    # at 2,000 pairs (sd ~0.01 of Recall@10) patience 3 stopped 2 of 3 transformer seeds at 60% of the
    # schedule (BENCHMARKS.md, "Random negatives from the products on sale").
    validation_sample: int = 10_000
    seed: int = 0  # the first seed
    # Build the dataset's graph (`itemsage graph`) when it has none, and let the runs read it; False:
    # every run reads content alone (the graph rows are then the same as their references).
    graph: bool = True
    train_overrides: dict[str, Any] = field(default_factory=dict)  # any other TrainConfig option

    def __post_init__(self) -> None:
        from itemsage.train.config import MAX_BATCH, MAX_SEED, MAX_STEPS

        self.runs = tuple(self.runs.split(",")) if isinstance(self.runs, str) else tuple(self.runs)
        unknown = [r for r in self.runs if r not in RUNS]
        require(not unknown, f"compare.runs has unknown run(s) {unknown}; known: {', '.join(RUNS)}")
        require("itemsage" in self.runs, "compare.runs must include 'itemsage', the reference row of every table")
        require_int(self.steps, "compare.steps", 1, MAX_STEPS)
        require_int(self.batch_size, "compare.batch_size", 2, MAX_BATCH)
        require_int(self.seeds, "compare.seeds", 1, MAX_SEEDS)
        require_int(self.eval_every, "compare.eval_every", 1, MAX_STEPS)
        require_int(self.patience, "compare.patience", 0, 1_000_000)
        require_int(self.validation_sample, "compare.validation_sample", 1, 100_000_000)
        if self.eval_sample is not None:
            require_int(self.eval_sample, "compare.eval_sample", 1, 100_000_000)
        require_int(self.seed, "compare.seed", 0, MAX_SEED - self.seeds + 1)
        require(isinstance(self.graph, bool), f"compare.graph ({self.graph!r}) must be true or false")
        require(isinstance(self.train_overrides, dict),
                f"compare.train_overrides ({self.train_overrides!r}) must be a table of train options")
        for name in self.runs:  # every run's TrainConfig, checked now: a bad override stops nothing half-way
            train_config(name, self)

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def stopping(self) -> str:
        """The stopping rule of every run, in words (the report and summary.json state it)."""
        # The cap is also where the cosine learning rate reaches 0: a run stopped by it finished its schedule.
        stop = (f"early stopping after {self.patience} evaluations without a gain, capped at {self.steps} steps "
                "(where the cosine learning-rate schedule reaches 0)"
                if self.patience else f"no early stop: {self.steps} steps (the cosine learning-rate schedule's length)")
        return (f"validation-window Recall@10 (up to {self.validation_sample} sampled pairs) every {self.eval_every} steps; "
                f"{stop}; each run keeps its best evaluation's model")


def train_config(name: str, cfg: CompareConfig, seed: int | None = None):
    """The TrainConfig of run `name` (with `seed`, default cfg.seed) under the shared budget."""
    from itemsage.train.config import TrainConfig

    _, train_over, model_over = RUNS[name]
    options = {
        "preset": cfg.preset, "max_steps": cfg.steps, "batch_size": cfg.batch_size,
        "seed": cfg.seed if seed is None else seed, "eval_every": cfg.eval_every,
        "eval_sample": cfg.validation_sample, "patience": cfg.patience, "checkpoint_every": 0,
        **cfg.train_overrides, **train_over,
    }
    if not cfg.graph:
        options["graph"] = False
    model = cfg.train_overrides.get("model", {})
    require(isinstance(model, dict), f"compare.train_overrides.model ({model!r}) must be a table of model options")
    options["model"] = {**model, **model_over}
    return from_dict(TrainConfig, options, section="train")  # an unknown override is refused by name


def run_one(name: str, seed: int, dataset_dir: Path, out_dir: Path, cfg: CompareConfig,
            progress: bool) -> dict[str, Any]:
    """Train, embed and evaluate one row with one seed; its result.json is written last, so a
    finished (run, seed) is skipped."""
    from itemsage.embed.shards import embed
    from itemsage.evaluate.evaluation import evaluate
    from itemsage.model.model import load_model
    from itemsage.train.loop import train

    run_dir = out_dir / "runs" / name / f"seed-{seed}"
    done = run_dir / RESULT_FILE
    if done.is_file():
        log.info("compare: %s seed %d already done, skipping", name, seed)
        return artifacts.read_json(done)
    tcfg = train_config(name, cfg, seed)
    if run_dir.exists():  # an unfinished earlier attempt: start the run again from scratch
        import shutil

        shutil.rmtree(run_dir)
    start = time.perf_counter()
    trained = train(dataset_dir, run_dir, tcfg, progress=progress)
    train_s = time.perf_counter() - start
    embedded = embed(trained.model_dir, dataset_dir, run_dir / "embeddings", progress=progress)
    # The test sample (if any) is drawn with the first seed, so every row and seed ranks the same pairs.
    # On a demo shop, every ceiling kind (computed once, then read from the dataset's cache by every run).
    result = evaluate(trained.model_dir, dataset_dir, run_dir / "embeddings", sample=cfg.eval_sample, seed=cfg.seed,
                      ceiling=CEILING_KINDS)
    loaded = load_model(trained.model_dir)
    result["run"] = {
        "name": name,
        "group": RUNS[name][0],
        "seed": seed,
        "train_config": dataclasses.asdict(tcfg),
        "model_config": dataclasses.asdict(loaded.config),
        "parameters": sum(p.numel() for p in loaded.tower.parameters())
                      + sum(p.numel() for p in loaded.adapters.parameters()),
        "steps": trained.steps,
        "best_step": trained.best_step,
        "stopped_early": trained.stopped_early,
        # patience: stopped before the cap; step cap: still improving (or patience ran out at the cap itself)
        "stopped_by": "patience" if trained.stopped_early and trained.steps < cfg.steps else "step cap",
        "stopping": cfg.stopping(),
        "validation_recall_at_10": (trained.final_recall.get("all") or {}).get("recall@10"),
        "train_seconds": round(train_s, 1),
        "embed_seconds": round(embedded.seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "pairs_per_s": round(trained.pairs_per_s, 1),
        "final_loss": trained.final_loss,
    }
    artifacts.atomic_write_json(done, result)
    return result


def finished_results(out_dir: str | Path, runs: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """{run: [result of each finished seed, in seed order]} of `runs` under out_dir/runs (an
    unfinished run, without its result.json, is left out; a run with none is absent)."""
    results: dict[str, list[dict[str, Any]]] = {}
    for name in runs:
        done = [(int(d.name.removeprefix("seed-")), d / RESULT_FILE)
                for d in (Path(out_dir) / "runs" / name).glob("seed-*")
                if d.name.removeprefix("seed-").isdigit() and (d / RESULT_FILE).is_file()]
        if done:
            results[name] = [artifacts.read_json(path) for _, path in sorted(done)]
    return results


# ---- the numbers: per seed, then mean and sd over seeds -----------------------------------------


def _recall(result: dict[str, Any], task: str, k: int = 10, block: str = "exact") -> float | None:
    row = result[block].get(task)
    return None if not row or row["n"] == 0 else row[f"recall@{k}"]


def _pooled(block: dict[str, Any], tasks: list[str], k: int = 10) -> float | None:
    """Recall@k over the pairs of `tasks` (the pair-weighted mean of their figures)."""
    rows = [block[t] for t in tasks if t in block and block[t]["n"]]
    n = sum(r["n"] for r in rows)
    return None if n == 0 else sum(r[f"recall@{k}"] * r["n"] for r in rows) / n


def _surface_recall(result: dict[str, Any], surface: str, k: int = 10) -> float | None:
    """Recall@k over all of a surface's pairs (pair-weighted mean of its tasks)."""
    return _pooled(result["exact"], [schema.task_name(surface, e) for e in schema.ENGAGEMENTS], k)


def seed_scores(result: dict[str, Any], k: int = 10) -> dict[str, float | None]:
    """One seed's Recall@k (exact, test window) under every key the report uses: each surface, `all`,
    `cold_start`, `seen`, `unseen`, each engagement (pooled over surfaces), each task, and per
    train-window count bucket `count B` with its `count B median rank`."""
    scores: dict[str, float | None] = {s: _surface_recall(result, s, k) for s in schema.SURFACES}
    scores["all"] = _recall(result, "all", k)
    for block in ("cold_start", "seen", "unseen"):
        scores[block] = _recall(result[block], "all", k) if result.get(block, {}).get("exact") else None
    for e in schema.ENGAGEMENTS:
        scores[e] = _pooled(result["exact"], [schema.task_name(s, e) for s in schema.SURFACES], k)
    for task in result["exact"]:
        if task != "all":
            scores[task] = _recall(result, task, k)
    for bucket, row in ((result.get("buckets") or {}).get("exact") or {}).items():  # train-window count buckets
        scores[f"count {bucket}"] = row.get(f"recall@{k}")
        scores[f"count {bucket} median rank"] = row.get("median_rank")
    scores.update(served_scores(result, k))
    return scores


def served_scores(result: dict[str, Any], k: int = 10) -> dict[str, float]:
    """One seed's products-as-queries and user-level figures at k (SERVED_KEYS), where evaluate gave them."""
    out: dict[str, float] = {}
    for key, (*path, metric) in SERVED_KEYS.items():
        row: Any = result.get("served") or {}
        for step in path:
            row = row.get(step) if isinstance(row, dict) else None
        if isinstance(row, dict) and row.get("n", 1) and f"{metric}@{k}" in row:
            out[key] = row[f"{metric}@{k}"]
    return out


def mean_sd(values: list[float | None]) -> dict[str, Any]:
    """{"mean", "sd", "seeds"} over the seeds that have a value; sd is the sample standard deviation
    (n - 1), 0.0 for a single seed; mean and sd are None when no seed has a value."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return {"mean": None, "sd": None, "seeds": 0}
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "sd": sd, "seeds": len(xs)}


def aggregate(results: dict[str, list[dict[str, Any]]], k: int = 10) -> dict[str, dict[str, dict[str, Any]]]:
    """{run: {key: mean_sd over its seeds}} for every key of `seed_scores`."""
    out = {}
    for name, seeds in results.items():
        per_seed = [seed_scores(r, k) for r in seeds]
        keys = list(dict.fromkeys(key for s in per_seed for key in s))
        out[name] = {key: mean_sd([s.get(key) for s in per_seed]) for key in keys}
    return out


def summary(agg: dict[str, dict[str, dict[str, Any]]], products: int, stopping: str) -> dict[str, Any]:
    """summary.json: {run: {key: {"mean", "sd", "seeds"}}} for SUMMARY_KEYS, plus "products" and "stopping"."""
    out: dict[str, Any] = {name: {key: by_key.get(key, mean_sd([])) for key in SUMMARY_KEYS}
                           for name, by_key in agg.items()}
    out["products"] = int(products)
    out["stopping"] = stopping
    return out
