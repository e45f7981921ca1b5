"""compare's numbers over seeds: mean and sd on fake run results (hand-computed), summary.json's
schema, and the "what this says" paragraph written from them."""

from __future__ import annotations

import json
import math

import pytest

from itemsage import artifacts, schema
from itemsage.evaluate.compare_report import what_this_says
from itemsage.evaluate.compare_runs import SUMMARY_KEYS, aggregate, mean_sd, seed_scores, summary


def fake_result(search: float, closeup: float, home: float, cold: float, n: int = 10) -> dict:
    """An evaluate() result with one click task per surface, `n` pairs each, and the given Recall@10."""
    exact = {schema.task_name(s, "click"): {"recall@10": r, "n": n}
             for s, r in zip(schema.SURFACES, (search, closeup, home))}
    exact["all"] = {"recall@10": (search + closeup + home) / 3, "n": 3 * n}
    block = lambda r: {"exact": {"all": {"recall@10": r, "n": 4}}}  # noqa: E731
    return {"exact": exact, "cold_start": block(cold), "seen": block(0.9), "unseen": block(0.1)}


def test_mean_sd_hand_computed():
    assert mean_sd([0.2, 0.4, 0.6]) == {"mean": pytest.approx(0.4), "sd": pytest.approx(0.2), "seeds": 3}
    assert mean_sd([0.5]) == {"mean": 0.5, "sd": 0.0, "seeds": 1}
    assert mean_sd([None, 0.3, float("nan"), 0.5]) == {"mean": pytest.approx(0.4), "sd": pytest.approx(math.sqrt(0.02)),
                                                       "seeds": 2}
    assert mean_sd([None]) == {"mean": None, "sd": None, "seeds": 0}


def test_aggregate_over_fake_seeds():
    results = {"itemsage": [fake_result(0.5, 0.6, 0.3, 0.1), fake_result(0.7, 0.6, 0.5, 0.3)],
               "text_only": [fake_result(0.8, 0.2, 0.2, 0.0)]}
    agg = aggregate(results)
    assert agg["itemsage"]["search"] == {"mean": pytest.approx(0.6), "sd": pytest.approx(math.sqrt(0.02)), "seeds": 2}
    assert agg["itemsage"]["closeup"]["sd"] == pytest.approx(0.0)
    assert agg["itemsage"]["all"]["mean"] == pytest.approx((1.4 / 3 + 1.8 / 3) / 2)
    assert agg["itemsage"]["cold_start"]["mean"] == pytest.approx(0.2)
    assert agg["itemsage"]["click"]["mean"] == pytest.approx(agg["itemsage"]["all"]["mean"])  # click is every pair
    assert agg["text_only"]["home"] == {"mean": pytest.approx(0.2), "sd": 0.0, "seeds": 1}
    # a surface's figure pools its tasks by pairs: two tasks of 10 and 30 pairs
    r = fake_result(0.5, 0.5, 0.5, 0.0)
    r["exact"]["search.save"] = {"recall@10": 0.1, "n": 30}
    assert seed_scores(r)["search"] == pytest.approx((0.5 * 10 + 0.1 * 30) / 40)


def test_summary_schema():
    results = {"itemsage": [fake_result(0.5, 0.6, 0.3, 0.1), fake_result(0.7, 0.6, 0.5, 0.3)],
               "image_only": [fake_result(0.4, 0.7, 0.4, 0.4), fake_result(0.4, 0.7, 0.4, 0.4)]}
    out = summary(aggregate(results), products=2000, stopping="the rule")
    assert set(out) == {"itemsage", "image_only", "products", "stopping"}
    assert out["products"] == 2000 and out["stopping"] == "the rule"
    for run in ("itemsage", "image_only"):
        assert tuple(out[run]) == SUMMARY_KEYS == ("search", "closeup", "home", "all", "cold_start")
        for cell in out[run].values():
            assert set(cell) == {"mean", "sd", "seeds"} and cell["seeds"] == 2
            assert isinstance(cell["mean"], float) and isinstance(cell["sd"], float)
    import json

    assert json.loads(json.dumps(out, allow_nan=False)) == out  # strict JSON


def test_what_this_says_is_written_from_the_numbers():
    results = {"itemsage": [fake_result(0.5, 0.6, 0.3, 0.1), fake_result(0.7, 0.6, 0.5, 0.3)],
               "text_only": [fake_result(0.9, 0.2, 0.2, 0.0), fake_result(0.9, 0.2, 0.2, 0.0)],
               "in_batch_negatives": [fake_result(0.1, 0.1, 0.1, 0.0), fake_result(0.1, 0.1, 0.1, 0.0)]}
    text = what_this_says(aggregate(results))
    assert "search text_only (0.900, 2 seeds)" in text and "closeup itemsage (0.600, 2 seeds)" in text
    # the transformer trails text-only on search by 0.3, beyond the spread (sd 0.141 + 0)
    assert "trails on search against text_only (-0.300, beyond the seeds' spread)" in text
    assert "Mixed negatives >= each single source: holds here" in text
    assert "not tested" in text  # no single-task conversion rows
    # turn the numbers round and the paragraph changes with them
    results["text_only"] = [fake_result(0.1, 0.1, 0.1, 0.0)] * 2
    assert "at least as good as every baseline: holds here" in what_this_says(aggregate(results))


def test_the_winners_sentence_names_each_rows_own_seeds():
    results = {"itemsage": [fake_result(0.5, 0.6, 0.3, 0.1), fake_result(0.7, 0.6, 0.5, 0.3)],
               "in_batch_negatives": [fake_result(0.9, 0.1, 0.1, 0.0)]}
    text = what_this_says(aggregate(results))
    assert "search in_batch_negatives (0.900, 1 seed)" in text and "closeup itemsage (0.600, 2 seeds)" in text


def test_finished_results_gathers_each_runs_finished_seeds_in_order(tmp_path):
    from itemsage.evaluate.compare_runs import RESULT_FILE, finished_results

    for name, seed, finished in [("itemsage", 2, True), ("itemsage", 0, True), ("itemsage", 1, False),
                                 ("text_only", 0, True), ("concat_mlp", 0, False)]:
        run_dir = tmp_path / "runs" / name / f"seed-{seed}"
        run_dir.mkdir(parents=True)
        if finished:
            (run_dir / RESULT_FILE).write_text(json.dumps({"seed": seed}))
    (tmp_path / "runs" / "itemsage" / "seed-x").mkdir()  # not a seed directory
    got = finished_results(tmp_path, ["itemsage", "text_only", "concat_mlp", "image_only"])
    assert got == {"itemsage": [{"seed": 0}, {"seed": 2}], "text_only": [{"seed": 0}]}


def test_report_only_refuses_without_a_finished_reference_run(tmp_path):
    from itemsage.config import ConfigError
    from itemsage.evaluate.compare import compare
    from itemsage.evaluate.compare_runs import CompareConfig

    (tmp_path / "data").mkdir()
    artifacts.write_manifest(tmp_path / "data", "dataset")
    with pytest.raises(ConfigError, match="no finished seed"):
        compare(tmp_path / "data", tmp_path / "out", CompareConfig(), report_only=True)
    assert not (tmp_path / "out").exists()


def test_written_sections_come_from_the_files(tmp_path):
    from itemsage.evaluate.compare_report import _written_section

    assert _written_section(tmp_path / "notes.md", None) == []  # absent: nothing
    (tmp_path / "notes.md").write_text("The transformer trails.\n\n", encoding="utf-8")
    assert _written_section(tmp_path / "notes.md", None) == ["The transformer trails.", ""]
    (tmp_path / "ablations.md").write_text("| a | b |\n|---|---|\n", encoding="utf-8")
    assert _written_section(tmp_path / "ablations.md", "Ablations") == ["", "## Ablations", "", "| a | b |", "|---|---|"]


def _with_served(result: dict, closeup: float, home: float, user: float) -> dict:
    """`result` with evaluate's served block: closeup by product, home by history and the user level."""
    result["served"] = {
        "data": {"closeup_pairs": 7, "home_pairs": 5, "history": 10},
        "closeup_by_product": {"exact": {"all": {"n": 7, "recall@10": closeup}}},
        "home_by_history": {"exact": {"all": {"n": 5, "recall@10": home}}},
        "home_popularity": {"all": {"n": 5, "recall@10": 0.04}},
        "user_level": {"users": 3, "closeup": {"exact": {"recall@10": user, "ndcg@10": user / 2}},
                       "home": {"exact": {"recall@10": user + 0.1, "ndcg@10": user / 4}},
                       "popularity": {"recall@10": 0.02, "ndcg@10": 0.01}},
    }
    return result


def test_served_and_user_level_figures_are_aggregated_and_reported():
    from itemsage.evaluate.compare_report import _served_section

    results = {"itemsage": [_with_served(fake_result(0.5, 0.6, 0.3, 0.1), 0.6, 0.1, 0.2),
                            _with_served(fake_result(0.7, 0.6, 0.5, 0.3), 0.8, 0.3, 0.4)],
               "text_only": [fake_result(0.8, 0.2, 0.2, 0.0)]}  # a result without a served block
    agg = aggregate(results)
    assert agg["itemsage"]["closeup_by_product"] == {"mean": pytest.approx(0.7), "sd": pytest.approx(math.sqrt(0.02)),
                                                     "seeds": 2}
    assert agg["itemsage"]["home_by_history"]["mean"] == pytest.approx(0.2)
    assert agg["itemsage"]["user_home_recall"]["mean"] == pytest.approx(0.4)
    assert agg["itemsage"]["user_closeup_ndcg"]["mean"] == pytest.approx(0.15)
    assert "closeup_by_product" not in agg["text_only"]
    lines = _served_section(["itemsage", "text_only"], agg, results["itemsage"][0])
    rows = [line for line in lines if line.startswith("| ")]
    assert rows[1] == "| itemsage | 0.700 ± 0.141 | 0.200 ± 0.141 | 0.300 ± 0.141 | 0.150 ± 0.071 | 0.400 ± 0.141 | 0.075 ± 0.035 |"
    assert rows[2] == "| popularity baseline | – | 0.040 | 0.020 | 0.010 | 0.020 | 0.010 |"
    assert not any(line.startswith("| text_only") for line in lines)  # no served figures, no row
    assert _served_section(["text_only"], agg, results["text_only"][0]) == []
