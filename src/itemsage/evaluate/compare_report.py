"""The comparison report (`itemsage compare`): report.md with the tables (mean ± sd over seeds), the
plots (one colour per run across every figure), the "what this says" paragraph written from the
numbers, and the served paths' section. evaluate/compare.py runs the rows and aggregates the seeds.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from itemsage import artifacts, schema
from itemsage.evaluate.ceiling_report import compare_markdown
from itemsage.evaluate.compare_runs import (
    ABLATIONS_FILE,
    COLOURS,
    CONVERSIONS,
    NOTES_FILE,
    SERVED_KEYS,
    SUMMARY_FILE,
    SUMMARY_KEYS,
    CompareConfig,
    aggregate,
    seed_scores,
    summary,
)

log = logging.getLogger(__name__)


# ---- "what this says": sentences written from the numbers --------------------------------------


def _gap(agg: dict[str, Any], a: str, b: str, key: str) -> tuple[float, bool] | None:
    """(mean of a - mean of b, whether the gap exceeds the two sds together) on `key`; None if either is missing."""
    x, y = agg.get(a, {}).get(key), agg.get(b, {}).get(key)
    if not x or not y or x["mean"] is None or y["mean"] is None:
        return None
    return x["mean"] - y["mean"], abs(x["mean"] - y["mean"]) > (x["sd"] or 0.0) + (y["sd"] or 0.0)


def _claim(agg: dict[str, Any], ours: str, others: list[str], keys: list[str], claim: str,
           label: dict[str, str] | None = None) -> str:
    """One sentence: does `ours` reach every run of `others` on every key, and where it does not, by how much."""
    label = label or {}
    losses = []
    for key in keys:
        for other in others:
            g = _gap(agg, ours, other, key)
            if g is not None and g[0] < 0:
                losses.append(f"{label.get(key, key)} against {other} ({g[0]:+.3f}, "
                              f"{'beyond' if g[1] else 'within'} the seeds' spread)")
    tested = [o for o in others if o in agg]
    if not tested:
        return f"{claim}: not tested (its rows were not run)."
    if not losses:
        return f"{claim}: holds here ({ours} is at or above {', '.join(tested)} on {', '.join(label.get(k, k) for k in keys)})."
    return f"{claim}: does not hold everywhere; {ours} trails on " + "; ".join(losses) + "."


def what_this_says(agg: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The report's opening paragraph, from the means and sds: who wins each key (with the seeds
    behind that row's mean), and each of the paper's claims tested against these rows."""
    parts = []
    wins = []
    for key in SUMMARY_KEYS:
        scored = [(by[key]["mean"], name, by[key]["seeds"]) for name, by in agg.items()
                  if by.get(key) and by[key]["mean"] is not None]
        if scored:
            best, name, seeds = max(scored)
            wins.append(f"{key} {name} ({best:.3f}, {seeds} seed{'s' if seeds > 1 else ''})")
    parts.append("Highest mean Recall@10 (test window, exact): " + ", ".join(wins) + ".")
    baselines = [b for b in ("image_only", "text_only", "sum_pooling", "concat_mlp") if b in agg]
    parts.append(_claim(agg, "itemsage", baselines, list(SUMMARY_KEYS),
                        "The paper's claim that the transformer is at least as good as every baseline"))
    singles = {e: f"single_task_{e}" for e in CONVERSIONS if f"single_task_{e}" in agg}
    if singles:
        sentences = [_claim(agg, "itemsage", [single], [e], f"Multi-task >= single-task on {e}")
                     for e, single in singles.items()]
        parts += sentences
    else:
        parts.append("Multi-task >= single-task on the conversion tasks: not tested (no single-task conversion row).")
    negatives = [r for r in ("in_batch_negatives", "random_negatives") if r in agg]
    parts.append(_claim(agg, "itemsage", negatives, [*schema.SURFACES, "all"],
                        "Mixed negatives >= each single source"))
    return " ".join(parts)


# ---- the report ---------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _pm(cell: dict[str, Any] | None) -> str:
    if not cell or cell["mean"] is None:
        return "–"
    return f"{cell['mean']:.3f}" + (f" ± {cell['sd']:.3f}" if cell["seeds"] > 1 else "")


def _score_table(names: list[str], agg: dict[str, Any], params: dict[str, int],
                 keys: tuple[str, ...] = (*SUMMARY_KEYS, "seen", "unseen")) -> list[str]:
    lines = ["| run | params | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for n in names:
        lines.append(f"| {n} | {params[n]:,} | " + " | ".join(_pm(agg[n].get(k)) for k in keys) + " |")
    return lines


def _served_section(names: list[str], agg: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Products as queries (as the service computes them) and the user-level protocol, per run."""
    names = [n for n in names if any(key in agg[n] for key in SERVED_KEYS)]
    if not names:
        return []
    served = ref.get("served") or {}
    data, user = served.get("data") or {}, served.get("user_level") or {}
    pop_user = user.get("popularity") or {}
    pop_home = (served.get("home_popularity") or {}).get("all") or {}
    lines = ["", "## Products as queries, and the user-level protocol", "",
             "The same runs, queried as the service queries them (by_product.py), exact index, test window. "
             f"Per pair: closeup by the query product ({data.get('closeup_pairs', 0):,} pairs) and home by the "
             f"user's last {data.get('history', '?')} train-window products ({data.get('home_pairs', 0):,} pairs), "
             "Recall@10. Per user, as RecBole and Microsoft Recommenders report it "
             f"({user.get('users', 0):,} users with test engagements and a train-window history): the whole "
             "catalog ranked from the user's most recent product (closeup) or history (home), their train-window "
             "products masked, Recall@10 and NDCG@10 averaged over users.", "",
             "| run | closeup by product | home by history | user closeup Recall@10 | user closeup NDCG@10 | "
             "user home Recall@10 | user home NDCG@10 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_pm(agg[n].get(key)) for key in SERVED_KEYS) + " |")
    lines.append(f"| popularity baseline | – | {_fmt(pop_home.get('recall@10'))} | "
                 # popularity ranks the same list for every user, so it is one figure for closeup and home
                 + " | ".join(_fmt(pop_user.get(m)) for m in ("recall@10", "ndcg@10") * 2) + " |")
    return lines


def _bar_plot(path: Path, names: list[str], agg: dict[str, Any], title: str,
              keys: tuple[str, ...] = SUMMARY_KEYS) -> None:
    """Mean Recall@10 per key, one bar per run in its colour, the seeds' sd as error bars."""
    import numpy as np

    from itemsage.evaluate.report import _pyplot, _save_png

    plt = _pyplot()
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, n in enumerate(names):
        cells = [agg[n].get(k) or {} for k in keys]
        means = [c.get("mean") or 0.0 for c in cells]
        sds = [c.get("sd") or 0.0 for c in cells]
        ax.bar(np.arange(len(keys)) + i * width, means, width, yerr=sds, capsize=3, label=n, color=COLOURS[n])
    ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2, keys)
    ax.set_ylabel("Recall@10 (exact, test window)")
    ax.set_ylim(0, 1)
    ax.set_title(title + " (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def _tasks_plot(path: Path, agg: dict[str, Any], engagements: list[str]) -> None:
    """Each single-task model on its own engagement only, beside the multi-task model on that engagement."""
    from itemsage.evaluate.report import _pyplot, _save_png

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.2 * len(engagements) + 2, 4))
    labelled = set()
    for i, e in enumerate(engagements):
        for j, name in enumerate(("itemsage", f"single_task_{e}")):
            cell = agg[name].get(e) or {}
            label = None if name in labelled else ("itemsage (multi-task)" if name == "itemsage" else name)
            labelled.add(name)
            ax.bar(i + (j - 0.5) * 0.38, cell.get("mean") or 0.0, 0.36, yerr=cell.get("sd") or 0.0, capsize=3,
                   color=COLOURS[name], label=label)
    ax.set_xticks(range(len(engagements)), engagements)
    ax.set_ylabel("Recall@10 on that engagement (exact, test)")
    ax.set_ylim(0, 1)
    ax.set_title("Multi-task vs each single-task model on its own engagement (mean ± sd)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_png(fig, path)


def _curves_plot(path: Path, results: dict[str, list[dict[str, Any]]]) -> bool:
    """Training loss against steps, validation Recall@10 against steps and against wall time: every
    run and seed, one colour per run. False when no run has logs."""
    from itemsage.evaluate.report import LOSS_TAG, VALIDATION_TAG, _pyplot, _save_png

    if not any(r.get("training_curves") for seeds in results.values() for r in seeds):
        return False
    plt = _pyplot()
    fig, (loss_ax, step_ax, time_ax) = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, seeds in results.items():
        for i, r in enumerate(seeds):
            curves = r.get("training_curves") or {}
            label = name if i == 0 else None
            if curves.get(LOSS_TAG):
                loss_ax.plot([p[0] for p in curves[LOSS_TAG]], [p[1] for p in curves[LOSS_TAG]], color=COLOURS[name],
                             linewidth=0.8, alpha=0.8, label=label)
            points = curves.get(VALIDATION_TAG) or []
            if points:
                step_ax.plot([p[0] for p in points], [p[1] for p in points], color=COLOURS[name], marker="o",
                             markersize=2.5, linewidth=1.0, label=label)
                time_ax.plot([p[2] if len(p) > 2 else float("nan") for p in points], [p[1] for p in points],
                             color=COLOURS[name], marker="o", markersize=2.5, linewidth=1.0, label=label)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    step_ax.set(title="validation Recall@10 against steps", xlabel="step", ylabel="Recall@10 (validation)")
    time_ax.set(title="validation Recall@10 against wall time", xlabel="seconds of training", ylabel="Recall@10 (validation)")
    for ax in (loss_ax, step_ax, time_ax):
        ax.grid(alpha=0.3)
    step_ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Every run and seed (one line per seed)")
    fig.tight_layout()
    _save_png(fig, path)
    return True


def _mean_curve(seeds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Recall@K curves averaged over seeds."""
    curves = [r["recall_curve"] for r in seeds if r.get("recall_curve")]
    if not curves:
        return None
    panels = [p for p in curves[0]["exact"] if all(p in c["exact"] for c in curves)]
    return {"k": curves[0]["k"], "exact": {p: [sum(v) / len(v) for v in zip(*(c["exact"][p] for c in curves))]
                                          for p in panels}}


def _written_section(path: Path, title: str | None) -> list[str]:
    """The lines of an optional markdown file for the report (under `## title` if given); [] if absent."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8").strip()
    return (["", f"## {title}", ""] if title else []) + text.splitlines() + ([] if title else [""])


def write_report(results: dict[str, list[dict[str, Any]]], out_dir: Path, cfg: CompareConfig,
                 dataset_dir: Path) -> Path:
    """report.md, summary.json, results.json and the plots from every run's seeds' results."""
    from itemsage.evaluate.report import gallery_markdown, plot_recall_curves

    ref = results["itemsage"][0]
    data = ref["data"]
    dataset = artifacts.read_manifest(dataset_dir, kind="dataset")
    agg = aggregate(results)
    params = {n: seeds[0]["run"]["parameters"] for n, seeds in results.items()}
    by_group: dict[str, list[str]] = {}
    for name, seeds in results.items():
        by_group.setdefault(seeds[0]["run"]["group"], []).append(name)
    counts = dataset.get("counts", {})
    train_pairs = counts.get("train", sum((counts.get("train_rows") or {}).values()))
    ratio = cfg.train_overrides.get("random_negatives_ratio", 4.0)
    sampled = "" if cfg.eval_sample is None else f" (a stratified sample of about {cfg.eval_sample:,})"
    data_cell = f"{data['products']:,} products, {train_pairs:,} train / {data['eval_pairs']:,} test pairs"
    lines = [
        "# ItemSage comparisons",
        "",
        "## What this says",
        "",
        *_written_section(out_dir / NOTES_FILE, None),
        what_this_says(agg),
        "",
        f"Data (every row): {data['products']:,} products, {train_pairs:,} train-window pairs, {data['eval_pairs']:,} "
        f"test-window pairs{sampled}: {data['cold_start_pairs']:,} on cold-start products, {data.get('seen_pairs', 0):,} "
        f"*seen* (surface, query and product already together in the train window), {data.get('unseen_pairs', 0):,} "
        "*unseen*.",
        f"Training, the same for every row: preset `{cfg.preset}`, batches of {cfg.batch_size} positives "
        f"(+ {ratio:g}× random negatives where used), seeds {', '.join(map(str, cfg.seed_list))}. "
        f"Stopping rule: {cfg.stopping()}.",
        "Each run's catalog is embedded as `itemsage embed` does and ranked by exact search over those vectors; "
        "Recall@10 per surface is pair-weighted over its engagement types, on the test window. Cells: mean ± sample "
        "standard deviation over seeds. The validation window chose the models and stopped the runs; no figure "
        "here comes from it.",
        "",
        "| run | group | data | params | seeds | steps | best step | stopped by | train s (mean) | wall s (mean) |",
        "|---|---|---|---:|---:|---|---|---|---:|---:|",
    ]
    for name, seeds in results.items():
        runs = [r["run"] for r in seeds]
        early = sum(r.get("stopped_by") == "patience" for r in runs)
        if not cfg.patience:
            stopped = "step cap (no early stop)"
        else:
            stopped = ", ".join(f"{what} ({n} of {len(runs)})" for what, n in
                                (("patience", early), ("step cap", len(runs) - early)) if n)
        lines.append(
            f"| {name} | {runs[0]['group']} | {data_cell} | {params[name]:,} | {len(runs)} | "
            f"{', '.join(str(r['steps']) for r in runs)} | "
            f"{', '.join('–' if r.get('best_step') is None else str(r['best_step']) for r in runs)} | {stopped} | "
            f"{sum(r['train_seconds'] for r in runs) / len(runs):.1f} | "
            f"{sum(r.get('wall_seconds', r['train_seconds']) for r in runs) / len(runs):.1f} |")
    pop = seed_scores({"exact": ref["popularity"]})  # deterministic: one figure, no seeds
    sections = [
        ("architecture", "Architecture and modalities", ["itemsage"] + by_group.get("architecture", [])),
        ("negatives", "Negatives", by_group.get("negatives", []) + ["itemsage"]),
        # each model with the dataset's graph tokens beside itself without them (content alone)
        ("graph", "Graph tokens", [n for n in ("itemsage", "no_graph", "concat_mlp", "concat_mlp_no_graph")
                                   if n in results]),
    ]
    for key, title, names in sections:
        if len(names) < 2:
            continue
        lines += ["", f"## {title}", "", *_score_table(names, agg, params)]
        if key == "architecture":
            lines.append("| popularity baseline | 0 | " + " | ".join(
                _fmt(pop.get(k)) for k in SUMMARY_KEYS) + " | – | – |")
        _bar_plot(out_dir / f"{key}.png", names, agg, f"{title}: Recall@10")
        lines += ["", f"![{title}]({key}.png)"]
    arch = ["itemsage"] + by_group.get("architecture", [])
    tasks = [t for t in ref["exact"] if t != "all"]
    lines += ["", "## Recall@10 per task", "", "| task | pairs | " + " | ".join(arch) + " | popularity |",
              "|---|---:|" + "---:|" * (len(arch) + 1)]
    for t in tasks:
        cells = [_pm(agg[n].get(t)) for n in arch] + [_fmt(pop.get(t))]
        lines.append(f"| {t} | {ref['exact'][t]['n']} | " + " | ".join(cells) + " |")
    lines += compare_markdown(arch, agg, ref)
    lines += _served_section(arch + [n for n in by_group.get("graph", []) if n not in arch], agg, ref)
    engagements = [e for e in schema.ENGAGEMENTS if f"single_task_{e}" in results]
    if engagements:
        lines += ["", "## Multi-task against single-task", "",
                  "Each single-task model is trained on one engagement type (all three surfaces) and is compared "
                  "on that engagement only.", "",
                  "| engagement / task | pairs | single-task | multi-task |", "|---|---:|---:|---:|"]
        for e in engagements:
            single = agg[f"single_task_{e}"]
            pairs = sum(ref["exact"].get(schema.task_name(s, e), {}).get("n", 0) for s in schema.SURFACES)
            lines.append(f"| **{e}** (all surfaces) | {pairs} | {_pm(single.get(e))} | {_pm(agg['itemsage'].get(e))} |")
            for s in schema.SURFACES:
                t = schema.task_name(s, e)
                lines.append(f"| {t} | {ref['exact'].get(t, {}).get('n', 0)} | {_pm(single.get(t))} | "
                             f"{_pm(agg['itemsage'].get(t))} |")
        _tasks_plot(out_dir / "tasks.png", agg, engagements)
        lines += ["", "![Multi-task vs single-task](tasks.png)"]
    if _curves_plot(out_dir / "training_curves.png", results):
        lines += ["", "## Convergence", "", "Training loss, and the validation Recall@10 that chose each run's model "
                  "and stopped it, against steps and against wall time; one line per seed.", "",
                  "![Training curves](training_curves.png)"]
    recall = {n: c for n, seeds in results.items() if (c := _mean_curve(seeds))}
    if recall:
        plot_recall_curves(out_dir / "recall_at_k.png", recall, "Recall@K per surface, test window (mean over seeds)",
                           colours=COLOURS)
        lines += ["", "## Recall@K, K = 1..100", "", "![Recall@K per surface](recall_at_k.png)"]
    if ref.get("gallery"):
        lines += ["", f"## Nearest neighbours (itemsage, seed {ref['run']['seed']})", "",
                  "A few test-window queries per surface, their top 10 by exact search; the engaged product "
                  "in bold with ✔ (if it is in the top 10).", "", *gallery_markdown(ref["gallery"])]
    lines += _written_section(out_dir / ABLATIONS_FILE, "Ablations")
    report = out_dir / "report.md"
    artifacts.atomic_write_json(out_dir / "results.json", {n: {"seeds": seeds, "aggregate": agg[n]}
                                                           for n, seeds in results.items()})
    artifacts.atomic_write_json(out_dir / SUMMARY_FILE, summary(agg, data["products"], cfg.stopping()))
    artifacts.atomic_write_text(report, "\n".join(lines) + "\n")
    artifacts.write_manifest(out_dir, "comparison", config=dataclasses.asdict(cfg),
                             inputs={"dataset": artifacts.fingerprint(dataset_dir)},
                             counts={"runs": len(results), "seeds": {n: len(seeds) for n, seeds in results.items()}},
                             files=["report.md", "results.json", SUMMARY_FILE]
                             + [f for f in (NOTES_FILE, ABLATIONS_FILE) if (out_dir / f).is_file()]
                             + sorted(p.name for p in out_dir.glob("*.png")))
    return report
