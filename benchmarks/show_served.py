"""Products as queries, as served: the issue's Show table from an `itemsage evaluate` result.

    itemsage evaluate RUN/train/model RUN/dataset --embeddings RUN/embeddings --index RUN/index --out EVAL
    python benchmarks/show_served.py EVAL/evaluation.json

Prints Recall@10 (all engagements) of home by history as served against the home query-vector
figure and popularity over the same pairs, and closeup by product as served against closeup with
the log's query vector over the same pairs, each with the target and whether it is met; then the
user-level protocol. Exact search (a flat index of the embeddings) unless `--index ann`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation", type=Path, help="evaluation.json written by `itemsage evaluate`")
    parser.add_argument("--index", default="exact", choices=("exact", "ann"))
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    served = json.loads(args.evaluation.read_text())["served"]
    if "skipped" in served:
        raise SystemExit(f"not evaluated: {served['skipped']}")
    key, at = f"recall@{args.k}", args.index

    def fig(block: str, index: str | None = at) -> float:
        return (served[block][index] if index else served[block])["all"][key]

    home, recency = fig("home_by_history"), fig("home_by_history_recency")
    home_q, pop = fig("home_query_vector", "exact"), fig("home_popularity", None)
    home_qm = fig("home_query_vector_masked", "exact") if "home_query_vector_masked" in served else float("nan")
    close, close_q = fig("closeup_by_product"), fig("closeup_query_vector", "exact")
    d = served["data"]
    print(f"Recall@{args.k} ({at}); home pairs {d['home_pairs']} (without history: {d['home_pairs_without_history']}), "
          f"closeup pairs {d['closeup_pairs']}, history = last {d['history']} products, home via the "
          f"{d['home_surface']} adapter; served paths took {d.get('seconds')} s")
    rows = [
        ("home by history (served)", home, f">= 3 x popularity ({3 * pop:.3f}): {'met' if home >= 3 * pop else 'MISSED'}; "
         f">= 0.9 x query vector ({0.9 * home_q:.3f}): {'met' if home >= 0.9 * home_q else 'MISSED'}"),
        ("home by history with times (served)", recency, ""),
        ("home, the log's query vector (medoid)", home_q, ""),
        ("home, the log's query vector, history masked (like for like)", home_qm,
         f"home by history >= 0.9 x this ({0.9 * home_qm:.3f}): {'met' if home >= 0.9 * home_qm else 'MISSED'}"),
        ("home, popularity", pop, ""),
        ("closeup by product (served)", close, f">= closeup query vector ({close_q:.3f}): "
         f"{'met' if close >= close_q else 'MISSED'}"),
        ("closeup, the log's query vector", close_q, ""),
    ]
    for label, value, target in rows:
        print(f"| {label} | {value:.3f} | {target} |")
    for block in ("home_by_history", "closeup_by_product"):
        per = served[block][at]
        print(block, "per engagement:", ", ".join(f"{t} {v[key]:.3f} (n {v['n']})" for t, v in per.items() if t != "all"))
    user = served.get("user_level") or {}
    if user.get("users"):
        print(f"user level ({user['users']} users):")
        for name in ("closeup", "home"):
            row = user[name][at]
            print(f"  {name}: " + ", ".join(f"{m} {v:.3f}" for m, v in row.items()))
        print("  popularity: " + ", ".join(f"{m} {v:.3f}" for m, v in user["popularity"].items()))


if __name__ == "__main__":
    main()
