"""The paper's comparisons on one split (`itemsage compare`): every row trained, embedded and evaluated
the same way (the rows: evaluate/compare_runs.py), then one report (evaluate/compare_report.py).

Every row is trained to convergence the same way: validation-window Recall@10 every `eval_every`
steps, early stopping after `patience` evaluations without a gain (the same patience for all), a
step cap `steps`, and the best evaluation's model kept. Each row runs `seeds` times (seeds `seed`,
`seed + 1`, ...); the tables and plots give the mean and the sample standard deviation over seeds.
Each run's catalog is embedded with `embed.embed` (as `itemsage embed` does) and `evaluate` ranks
against those vectors by exact search, on the test window. A re-run skips the (run, seed) pairs
whose result is already on disk.

Written next to the report: results.json (every seed's evaluation), summary.json (what the
figures are drawn from: `{run: {key: {"mean", "sd", "seeds"}}}` for search, closeup, home, all and
cold_start, Recall@10 exact on the test window, plus "products" and "stopping"), and the plots:
Recall@10 per surface with error bars per group (architecture.png, negatives.png), each single-task
model on its own engagement against the multi-task model (tasks.png), training loss and validation
Recall@10 against steps and against wall time for every run and seed (training_curves.png),
Recall@K curves (recall_at_k.png). One colour per run across every figure. The report opens with a
"what this says" paragraph written by `what_this_says` from the numbers, after the reading in
`notes.md` if the output directory has one; an `ablations.md` there becomes the "Ablations" section.

`compare(..., report_only=True)` trains nothing and reports every finished (run, seed) on disk
(rows run by separate processes, or given fewer seeds), each row with the seeds it has.

Beside the per-pair figures, each row's products as queries (closeup by product, home by history, as
the service computes them) and the user-level protocol (per-user Recall@10 and NDCG@10, as
recommender libraries report it), from `evaluate`'s served block of every seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from itemsage import artifacts
from itemsage.config import ConfigError
from itemsage.evaluate.compare_report import write_report
from itemsage.evaluate.compare_runs import CompareConfig, finished_results, run_one

log = logging.getLogger(__name__)


def compare(dataset_dir: str | Path, out_dir: str | Path, cfg: CompareConfig, progress: bool = True,
            report_only: bool = False) -> Path:
    """Train, embed and evaluate every configured run with every seed, then write report.md,
    summary.json, results.json and the plots. `report_only`: train nothing; report every finished
    (run, seed) already in `out_dir` for the configured runs, each row with the seeds it has (e.g.
    runs finished by separate processes, or rows given fewer seeds)."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    artifacts.read_manifest(dataset_dir, kind="dataset")
    if report_only:
        results = finished_results(out_dir, cfg.runs)
        if "itemsage" not in results:
            raise ConfigError(f"{out_dir / 'runs' / 'itemsage'} has no finished seed: nothing to report against; "
                              "run `itemsage compare` without --report-only first")
        return write_report(results, out_dir, cfg, dataset_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.graph:
        from itemsage.graph import build_graph_features, graph_dir_of

        if not (graph_dir_of(dataset_dir) / artifacts.MANIFEST).is_file():
            log.info("compare: building the dataset's graph first (itemsage graph %s)", dataset_dir)
            build_graph_features(dataset_dir, progress=progress)
    results = {}
    total, i = len(cfg.runs) * cfg.seeds, 0
    for name in cfg.runs:
        for seed in cfg.seed_list:
            i += 1
            log.info("compare: run %d/%d: %s, seed %d", i, total, name, seed)
            results.setdefault(name, []).append(run_one(name, seed, dataset_dir, out_dir, cfg, progress))
    return write_report(results, out_dir, cfg, dataset_dir)
