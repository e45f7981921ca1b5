"""The evaluation report: report.md (Recall@1/10/100 tables, the data's ceiling and the figures by
train-window engagement count (ceiling_report.py), the served paths, a gallery of nearest neighbours), evaluation.json (every number), recall_at_k.png (a Recall@K curve per surface, K =
1..100) and training_curves.png (loss and validation Recall@10 against steps, read from the run's
TensorBoard logs beside the model: RUN/tensorboard for RUN/model), with a manifest. The directory is
written whole as `<out>.tmp-<pid>` and renamed into place at the end (artifacts.temp_dir, publish_dir):
a killed evaluate leaves the earlier report, or none, never a part of one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from itemsage.evaluate.ceiling_report import bucket_markdown, ceiling_markdown
from itemsage.metrics import DEFAULT_KS

log = logging.getLogger(__name__)


LOSS_TAG, VALIDATION_TAG = "loss/total", "validation/recall@10/all"  # train.py's TensorBoard scalars


def training_curves(model_dir: str | Path) -> dict[str, list[list[float]]]:
    """{tag: [[step, value, seconds], ...]} of the training loss and validation Recall@10, read from the
    run's TensorBoard logs beside the model (RUN/tensorboard for RUN/model); {} when there are none.
    `seconds`: wall time since the run's first logged point (its first step), so curves of runs of
    different speeds can be set against time. A resumed run's logs repeat steps after its checkpoint;
    TensorBoard's reader drops the orphaned ones (its seconds then include the pause)."""
    from itemsage.schema import TENSORBOARD_DIR

    logs = Path(model_dir).resolve().parent / TENSORBOARD_DIR
    if not logs.is_dir():
        return {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs), size_guidance={"scalars": 0}).Reload()  # 0: keep every point
    tags = set(events.Tags().get("scalars", []))
    scalars = {tag: events.Scalars(tag) for tag in (LOSS_TAG, VALIDATION_TAG) if tag in tags}
    start = min((e.wall_time for points in scalars.values() for e in points), default=0.0)
    return {tag: [[e.step, e.value, round(e.wall_time - start, 3)] for e in points] for tag, points in scalars.items()}


def recall_table(result: dict[str, Any], k: int = 10) -> list[tuple[str, ...]]:
    """Rows (task, n, exact, ann, popularity, cold exact, seen exact, unseen exact) of Recall@k, for
    the CLI and the report (seen: the pair's (surface, query, product) occurs in the train window)."""
    rows = []
    tasks = [t for t in result["exact"] if t != "all"] + ["all"]
    key = f"recall@{k}"

    def cell(block: dict[str, Any] | None, task: str) -> str:
        if not block or task not in block or block[task]["n"] == 0:
            return "–"
        return f"{block[task][key]:.3f}"

    for task in tasks:
        rows.append((
            task,
            str(result["exact"][task]["n"]),
            cell(result["exact"], task),
            cell(result.get("ann"), task),
            cell(result["popularity"], task),
            cell(result["cold_start"]["exact"], task),
            cell(result.get("seen", {}).get("exact"), task),
            cell(result.get("unseen", {}).get("exact"), task),
        ))
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path) -> None:
    from itemsage import artifacts

    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)


def plot_recall_curves(path: str | Path, curves: dict[str, dict[str, Any]], title: str,
                       colours: dict[str, str] | None = None) -> Path:
    """Recall@K against K (log axis), one panel per surface plus all, one line per run.
    `curves`: run name -> evaluate()'s "recall_curve"; `colours`: run name -> its colour (optional)."""
    plt = _pyplot()
    panels = sorted({s for c in curves.values() for s in c["exact"] if s != "all"}) + ["all"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, c in curves.items():
            if panel in c["exact"]:
                ax.plot(c["k"], c["exact"][panel], label=name, linewidth=1.4, color=(colours or {}).get(name))
        ax.set_xscale("log")
        ax.set_xlim(1, max(max(c["k"]) for c in curves.values()))
        ax.set_ylim(0, 1)
        ax.axvline(10, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(panel)
        ax.set_xlabel("K")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Recall@K (exact, test window)")
    if len(curves) > 1:
        axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    _save_png(fig, Path(path))
    return Path(path)


def plot_training_curves(path: str | Path, runs: dict[str, dict[str, list[list[float]]]], title: str,
                         chosen: dict[str, int | None] | None = None) -> Path:
    """Training loss and validation Recall@10 against steps, one line per run, the chosen model's
    evaluation circled. `runs`: run name -> training_curves(); `chosen`: run name -> its best step."""
    plt = _pyplot()
    fig, (loss_ax, recall_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curves in runs.items():
        if curves.get(LOSS_TAG):
            steps, values = zip(*((p[0], p[1]) for p in curves[LOSS_TAG]))
            loss_ax.plot(steps, values, label=name, linewidth=1.0)
        if curves.get(VALIDATION_TAG):
            steps, values = zip(*((p[0], p[1]) for p in curves[VALIDATION_TAG]))
            line, = recall_ax.plot(steps, values, marker="o", markersize=3, label=name, linewidth=1.2)
            best = (chosen or {}).get(name)
            if best in steps:
                recall_ax.plot([best], [values[steps.index(best)]], marker="o", markersize=10, fillstyle="none",
                               color=line.get_color(), label="the chosen model" if len(runs) == 1 else None)
    top = max((p[1] for c in runs.values() for p in c.get(VALIDATION_TAG, [])), default=1.0)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss (mixed-negative softmax)")
    recall_ax.set(title="validation Recall@10 (chooses the model)", xlabel="step", ylabel="Recall@10",
                  ylim=(0, min(1.0, 1.2 * top + 0.02)))
    for ax in (loss_ax, recall_ax):
        ax.grid(alpha=0.3)
    if recall_ax.get_legend_handles_labels()[0]:
        recall_ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    _save_png(fig, Path(path))
    return Path(path)


def gallery_markdown(gallery: list[dict[str, Any]]) -> list[str]:
    """The gallery as Markdown: per query, its top-10 titles with the engaged product in bold."""
    def md(text: str) -> str:  # a title may hold characters that Markdown tables and emphasis read
        return "".join("\\" + c if c in "|*_`[]<>\\" else c for c in text)

    lines = []
    for g in gallery:
        user = f", user `{g['user_id']}`" if g.get("user_id") else ""
        lines += [f"**{g['surface']}** ({g['task']}{user}): {md(g['query'])}; engaged: *{md(g['engaged']['title'])}* "
                  f"(`{g['engaged']['product_id']}`), rank {g['engaged_rank']} in the catalog", "",
                  "| # | product | score |", "|---:|---|---:|"]
        for i, t in enumerate(g["top"], 1):
            name = f"{md(t['title']) or '(no title)'} (`{t['product_id']}`)"
            lines.append(f"| {i} | {'**✔ ' + name + '**' if t['engaged'] else name} | {t['score']:.3f} |")
        lines.append("")
    return lines


REPORT_FILES = ("report.md", "evaluation.json", "recall_at_k.png", "training_curves.png")


def check_report_out(out_dir: str | Path) -> None:
    """Refuse an `out_dir` that holds something other than an evaluation report: write_report
    replaces the directory whole. A report of an older version that a kill left without its
    manifest (its files and `.*.tmp` temporaries only) may be replaced."""
    from itemsage import artifacts

    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise artifacts.ArtifactError(f"--out {out_dir} is a file; evaluate writes a directory. Choose another --out.")
    names = [p.name for p in out_dir.iterdir()]
    try:
        kind = artifacts.read_json(out_dir / artifacts.MANIFEST).get("kind") if artifacts.MANIFEST in names else None
    except (artifacts.ArtifactError, AttributeError):
        kind = None
    torn = all(n in REPORT_FILES or (n.startswith(".") and n.endswith(".tmp")) for n in names)
    if kind != "evaluation" and not torn:
        raise artifacts.ArtifactError(f"--out {out_dir} exists and is not an evaluation report; evaluate replaces "
                                      "its --out directory whole. Choose another --out or remove the directory.")


def write_report(result: dict[str, Any], out_dir: str | Path, *, title: str = "Evaluation") -> Path:
    """evaluation.json (every number) + report.md (Recall@1/10/100 tables, the gallery) +
    recall_at_k.png + training_curves.png (when the run's logs were found) + manifest, written into a
    temporary directory that replaces `out_dir` at the end (see the module doc)."""
    import shutil

    from itemsage import artifacts

    final = Path(out_dir)
    check_report_out(final)
    out_dir = artifacts.temp_dir(final)
    try:
        _write_report_files(result, out_dir, title)
        artifacts.publish_dir(out_dir, final)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # gone once published
    return final / "report.md"


def _write_report_files(result: dict[str, Any], out_dir: Path, title: str) -> None:
    from itemsage import artifacts

    artifacts.atomic_write_json(out_dir / "evaluation.json", result)
    lines = [f"# {title}", ""]
    data = result["data"]
    lines += [
        f"{data['eval_pairs']} test-window pairs ranked against {data['products']} products "
        f"({data['cold_start_pairs']} pairs on cold-start products, never engaged in the train window; "
        f"{data.get('seen_pairs', 0)} *seen* pairs whose surface, query and product already occur together in the "
        f"train window, {data.get('unseen_pairs', 0)} *unseen*). The catalog is ranked by its embeddings as "
        "`itemsage embed` wrote them (exact: flat search over them). "
        f"Closeup pairs that name their query product ({data.get('closeup_query_product_excluded', 0)}) rank the "
        "catalog without it, as `/v1/closeup` does; home pairs keep theirs. "
        "The validation window chose the model; no figure here comes from it.",
        "",
    ]
    if "index_version" in data:
        lines += [f"ANN: index version `{data['index_version']}`, its recall@10 against exact search "
                  f"{data.get('neighbour_recall_at_10')}.", ""]
    for k in DEFAULT_KS:
        lines += [f"## Recall@{k}", "", "| task | pairs | exact | ANN | popularity | cold-start (exact) | seen (exact) "
                  "| unseen (exact) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(row) + " |" for row in recall_table(result, k)]
        lines.append("")
    lines += ceiling_markdown(result) + bucket_markdown(result)
    lines += served_markdown(result)
    files = ["report.md", "evaluation.json"]
    if result.get("recall_curve"):
        plot_recall_curves(out_dir / "recall_at_k.png", {"model": result["recall_curve"]}, "Recall@K per surface")
        lines += ["## Recall@K, K = 1..100", "", "![Recall@K per surface](recall_at_k.png)", ""]
        files.append("recall_at_k.png")
    lines += ["## Training curves", ""]
    if result.get("training_curves"):
        plot_training_curves(out_dir / "training_curves.png", {"model": result["training_curves"]}, "Training",
                             chosen={"model": data.get("best_step")})
        lines += ["![Training loss and validation Recall@10](training_curves.png)", ""]
        files.append("training_curves.png")
    else:
        lines += ["No TensorBoard logs beside the model (RUN/tensorboard for RUN/model).", ""]
    if result.get("gallery"):
        lines += ["## Nearest neighbours", "",
                  "A few test-window queries per surface, their top 10 by exact search; the engaged product "
                  "in bold with ✔ (if it is in the top 10).", "", *gallery_markdown(result["gallery"])]
    artifacts.atomic_write_text(out_dir / "report.md", "\n".join(lines))
    artifacts.write_manifest(out_dir, "evaluation", counts={"eval_pairs": data["eval_pairs"]},
                             inputs={"model": data["model_fingerprint"], "embeddings": data.get("embeddings_fingerprint")},
                             files=files)


def served_rows(result: dict[str, Any], k: int = 10) -> list[tuple[str, ...]]:
    """Rows (what, index, pairs, all, per-engagement Recall@k) of the served paths' figures, for the report."""
    served = result.get("served") or {}
    key = f"recall@{k}"
    rows = []
    labels = [("closeup_query_vector", "closeup, the log's query vector"),
              ("closeup_by_product", "closeup by product, as served"),
              ("home_query_vector", "home, the log's query vector (medoid)"),
              ("home_query_vector_masked", "home, the log's query vector, history masked"),
              ("home_by_history", "home by history, as served"),
              ("home_by_history_recency", f"home by history with times (half-life {_half_life()} days)"),
              ("home_popularity", "home, popularity")]
    for name, label in labels:
        block = served.get(name)
        if not block:
            continue
        per_index = {"": block} if "all" in block else block
        for index_name, figures in per_index.items():
            engagements = [t for t in figures if t != "all"]
            cells = "; ".join(f"{t.split('.')[-1]} {figures[t][key]:.3f}" for t in engagements)
            rows.append((label, index_name or "–", str(figures["all"]["n"]), f"{figures['all'][key]:.3f}", cells))
    return rows


def _half_life() -> float:
    from itemsage.index.by_product import DEFAULT_HALF_LIFE_DAYS

    return DEFAULT_HALF_LIFE_DAYS


def served_markdown(result: dict[str, Any]) -> list[str]:
    """The report's section on products as queries as served, and the user-level protocol."""
    served = result.get("served")
    if not served:
        return []
    if "skipped" in served:
        return ["## Products as queries, as served", "", f"Not evaluated: {served['skipped']}.", ""]
    data = served["data"]
    lines = ["## Products as queries, as served", "",
             "Closeup by product and home by history computed by the service's own code (by_product.py) over "
             "the test pairs that name their query product (closeup) and the home pairs of users with a "
             f"train-window history (their last {data['history']} distinct products; {data['home_pairs_without_history']} "
             f"home pairs without one are left out), history products excluded; home through the "
             f"{data['home_surface']} adapter. `exact`: a flat index of the embeddings; `ann`: the served index. "
             "Beside them, the query-vector and popularity figures of the same pairs.", "",
             "| Recall@10 | index | pairs | all | per engagement |", "|---|---|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in served_rows(result, 10)]
    user = served.get("user_level") or {}
    if user.get("users"):
        ks = sorted(int(key.split("@")[1]) for key in user["popularity"] if key.startswith("recall@"))
        lines += ["", f"### User-level protocol ({user['users']} users)", "",
                  "As RecBole and Microsoft Recommenders report: per user with test engagements, the whole catalog "
                  "ranked from the user's query (closeup: their most recent train-window product; home: their "
                  "history), every train-window product of theirs masked; relevant: their other test-window "
                  "products; Recall@K and NDCG@K averaged over users.", "",
                  "| query | index | " + " | ".join(f"Recall@{k} | NDCG@{k}" for k in ks) + " |",
                  "|---|---|" + "---:|---:|" * len(ks)]
        for name in ("closeup", "home"):
            for index_name, row in (user.get(name) or {}).items():
                lines.append(f"| {name} | {index_name} | " + " | ".join(
                    f"{row[f'recall@{k}']:.3f} | {row[f'ndcg@{k}']:.3f}" for k in ks) + " |")
        row = user["popularity"]
        lines.append("| popularity | – | " + " | ".join(f"{row[f'recall@{k}']:.3f} | {row[f'ndcg@{k}']:.3f}"
                                                      for k in ks) + " |")
    return lines + [""]
