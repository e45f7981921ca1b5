"""The reports' sections on the data's ceiling and on the tail: every model's Recall@10 beside the
demo shop's oracle and observable ceilings per surface and per task, with its fraction of the
observable ceiling, and Recall@10 with the median rank by the engaged product's train-window
engagement count (0, 1-4, 5-19, >= 20). `evaluate`'s report (report.py), `compare`'s
(compare_report.py) and the CLI's tables (cli/evaluate.py, cli/demo.py) read these rows.
"""

from __future__ import annotations

from typing import Any

from itemsage import schema
from itemsage.metrics import COUNT_BUCKETS

KIND_LABELS = {"oracle": "oracle ceiling", "observable": "observable ceiling",
               "features": "features only (no popularity)", "train_counts": "train counts as popularity"}
TIE_NOTE = ("Ceilings are expected Recall@K with the products their ranking ties ordered at random (their "
            "knowledge cannot tell them apart); models rank ties pessimistically, as everywhere in these reports.")
CEILING_NOTE = (
    "The data's own ceiling (demo shop only): each product ranked by its probability of being among the query's "
    "engaged products for the row's engagement, from the generator's own draws. *Oracle*: knowing every latent of "
    "the row (user, interest cluster, search target). *Observable*: knowing only what the query shows (the search "
    "text, the viewed product, the home medoid), the generator's structure and the products' popularity, the user "
    "a posterior over the shop's users. Same pairs and protocol as the models: the whole catalog, closeup pairs "
    "without their query product. Each is the best ranking in expectation given its knowledge; on a few thousand "
    "pairs the observable one can land a hair above the oracle by chance. " + TIE_NOTE)


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def pooled(block: dict[str, Any] | None, group: str, k: int = 10) -> float | None:
    """Recall@k of a group (a task, a surface or `all`) from a {task: {"recall@k", "n"}} block, a
    surface pooled over its tasks (pair-weighted)."""
    if not block:
        return None
    if group in block:
        row = block[group]
        return None if not row.get("n") else row[f"recall@{k}"]
    rows = [block[t] for t in block if t.split(".")[0] == group and t != "all" and block[t].get("n")]
    n = sum(r["n"] for r in rows)
    return None if n == 0 else sum(r[f"recall@{k}"] * r["n"] for r in rows) / n


def groups(result: dict[str, Any]) -> list[str]:
    """The surfaces, then the tasks, then `all`, of an evaluation's pairs."""
    tasks = [t for t in result["exact"] if t != "all"]
    surfaces = [s for s in schema.SURFACES if any(t.split(".")[0] == s for t in tasks)]
    return [*surfaces, *tasks, "all"]


def ceiling_rows(result: dict[str, Any], k: int = 10) -> list[tuple[str, ...]]:
    """Rows (group, pairs, exact, ANN, popularity, oracle, observable, exact / observable) of Recall@k;
    [] without a ceiling."""
    ceiling = result.get("ceiling") or {}
    if not ceiling.get("available"):
        return []
    kinds = ceiling["kinds"]
    rows = []
    for g in groups(result):
        n = kinds["observable"]["recall"].get(g, {}).get("n", 0)
        exact, observable = pooled(result["exact"], g, k), kinds["observable"]["recall"].get(g, {}).get(f"recall@{k}")
        fraction = None if exact is None or not observable else exact / observable
        rows.append((g, str(n), _f(exact), _f(pooled(result.get("ann"), g, k)), _f(pooled(result["popularity"], g, k)),
                     _f(kinds["oracle"]["recall"].get(g, {}).get(f"recall@{k}")), _f(observable),
                     "–" if fraction is None else f"{fraction:.0%}"))
    return rows


def _bucket_cell(row: dict[str, Any] | None, k: int = 10) -> str:
    if not row or not row.get("n"):
        return "–"
    median = row.get("median_rank")
    return f"{_f(row.get(f'recall@{k}'))} ({'> 100' if median is None else f'{median:g}'})"


def ceiling_markdown(result: dict[str, Any]) -> list[str]:
    """evaluate's report section: the ceilings beside the model, or why there is none."""
    ceiling = result.get("ceiling")
    if ceiling is None:
        return []
    lines = ["## Against the data's ceiling", ""]
    if not ceiling.get("available"):
        return lines + [f"No ceiling for this dataset: {ceiling['reason']}. (The ceiling exists for datasets "
                        "ingested from an `itemsage demo-data` shop, whose generator is known.)", ""]
    lines += [CEILING_NOTE, "",
              "| Recall@10 | pairs | exact | ANN | popularity | oracle | observable | exact / observable |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in ceiling_rows(result)]
    return lines + ["", f"Shop: `{ceiling['shop']}`.", ""]


def bucket_rows(result: dict[str, Any], k: int = 10) -> list[tuple[str, ...]]:
    """Rows (what, its cell per COUNT_BUCKETS bucket: "Recall@k (median rank)") for the report."""
    buckets = result.get("buckets") or {}
    labels = [("exact", "model, exact"), ("ann", "model, ANN"), ("popularity", "popularity")]
    rows = [(label, *(_bucket_cell(buckets[key].get(b), k) for b, _, _ in COUNT_BUCKETS))
            for key, label in labels if key in buckets]
    ceiling = result.get("ceiling") or {}
    for kind, block in (ceiling.get("kinds") or {}).items() if ceiling.get("available") else ():
        rows.append((KIND_LABELS[kind], *(_bucket_cell(block["buckets"].get(b), k) for b, _, _ in COUNT_BUCKETS)))
    return rows


def bucket_markdown(result: dict[str, Any]) -> list[str]:
    """evaluate's report section: Recall@10 and the median rank by the engaged product's train-window count."""
    buckets = result.get("buckets")
    if not buckets:
        return []
    n = {b: buckets["exact"][b]["n"] for b, _, _ in COUNT_BUCKETS}
    lines = ["## By the engaged product's train-window engagements", "",
             "Test pairs by how often their engaged product was engaged in the train window (the tail must not be "
             "buried): Recall@10 and, in brackets, the median rank of the engaged product (1 = first; ANN: "
             "'> 100' when it is mostly outside the index's top 100)." + (" " + TIE_NOTE if (
                 result.get("ceiling") or {}).get("available") else ""), "",
             "| | " + " | ".join(f"{b} ({n[b]:,} pairs)" for b, _, _ in COUNT_BUCKETS) + " |",
             "|---|" + "---:|" * len(COUNT_BUCKETS)]
    lines += ["| " + " | ".join(row) + " |" for row in bucket_rows(result)]
    return lines + [""]


# ---- compare: every run beside the ceilings ---------------------------------------------------


def _pm(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("mean") is None:
        return "–"
    return f"{cell['mean']:.3f}" + (f" ± {cell['sd']:.3f}" if cell.get("seeds", 0) > 1 else "")


def compare_markdown(names: list[str], agg: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """compare's section: each run's Recall@10 (mean ± sd over seeds) per surface, per task and per
    count bucket, beside popularity and, on a demo shop, features only, train counts and the two ceilings."""
    ceiling = ref.get("ceiling") or {}
    lines = ["", "## Against the data's ceiling", ""]
    if not ceiling.get("available"):
        reason = ceiling.get("reason", "the evaluations hold none")
        lines += [f"No ceiling for this dataset: {reason}.", ""]
    else:
        lines += [CEILING_NOTE + " *Features only* ranks with the observable knowledge but every product equally "
                  "popular (what content alone can tell), *train counts* with popularity estimated from train-window "
                  "engagements + 1: between them and the observable ceiling lies what true popularity adds.", ""]
    kinds = (ceiling.get("kinds") or {}) if ceiling.get("available") else {}
    observable = kinds.get("observable", {}).get("recall", {})
    keys = [*[s for s in schema.SURFACES if s in observable], "all"]
    lines += ["| Recall@10 | " + " | ".join(keys) + " | all / observable |", "|---|" + "---:|" * (len(keys) + 1)]
    for n in names:
        mean = (agg[n].get("all") or {}).get("mean")
        frac = f"{mean / observable['all']['recall@10']:.0%}" if mean is not None and observable else "–"
        lines.append(f"| {n} | " + " | ".join(_pm(agg[n].get(k)) for k in keys) + f" | {frac} |")
    lines.append("| popularity | " + " | ".join(_f(pooled(ref["popularity"], k)) for k in keys) + " | – |")
    for kind in ("features", "train_counts", "observable", "oracle"):
        if kind in kinds:
            lines.append(f"| {KIND_LABELS[kind]} | " + " | ".join(
                _f(kinds[kind]["recall"].get(k, {}).get("recall@10")) for k in keys) + " | – |")
    if kinds:
        tasks = [t for t in ref["exact"] if t != "all"]
        shown = [k for k in ("features", "train_counts", "observable", "oracle") if k in kinds]
        lines += ["", "Per task (itemsage, mean over seeds):", "",
                  "| task | pairs | itemsage | " + " | ".join(KIND_LABELS[k] for k in shown) + " | itemsage / observable |",
                  "|---|---:|---:|" + "---:|" * (len(shown) + 1)]
        for t in tasks:
            mine = (agg["itemsage"].get(t) or {}).get("mean")
            obs = observable.get(t, {}).get("recall@10")
            lines.append(f"| {t} | {observable.get(t, {}).get('n', 0)} | {_f(mine)} | " + " | ".join(
                _f(kinds[k]["recall"].get(t, {}).get("recall@10")) for k in shown)
                + f" | {f'{mine / obs:.0%}' if mine is not None and obs else '–'} |")
    n = {b: row.get("n", 0) for b, row in ((ref.get("buckets") or {}).get("exact") or {}).items()}
    lines += ["", "By the engaged product's train-window engagements: Recall@10 (median rank), exact:", "",
              "| | " + " | ".join(f"{b} ({n.get(b, 0):,} pairs)" for b, _, _ in COUNT_BUCKETS) + " |",
              "|---|" + "---:|" * len(COUNT_BUCKETS)]
    for n in names:
        cells = []
        for b, _, _ in COUNT_BUCKETS:
            r, m = agg[n].get(f"count {b}"), agg[n].get(f"count {b} median rank")
            median = "–" if not m or m.get("mean") is None else f"{m['mean']:g}"
            cells.append("–" if not r or r.get("mean") is None else f"{_pm(r)} ({median})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    pop = (ref.get("buckets") or {}).get("popularity") or {}
    if pop:
        lines.append("| popularity | " + " | ".join(_bucket_cell(pop.get(b)) for b, _, _ in COUNT_BUCKETS) + " |")
    for kind, block in kinds.items():
        lines.append(f"| {KIND_LABELS[kind]} | " + " | ".join(_bucket_cell(block["buckets"].get(b))
                                                            for b, _, _ in COUNT_BUCKETS) + " |")
    return lines
