"""End to end on a tiny shop: the demo's stages chain, and compare writes its report."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from itemsage import artifacts, schema


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from itemsage.demo import DemoSettings, run_demo

    out = tmp_path_factory.mktemp("demo")
    settings = DemoSettings(out=out, products=300, train_minutes=5, train_steps=30, preset="tiny",
                            batch_size=128, random_negatives_ratio=0.5, lr=2e-3, model={"dropout": 0.0})
    return run_demo(settings, progress=False)


def test_demo_trains_with_its_settings(demo):
    """The demo's training options reach the training run (its saved config), the model override too."""
    config = json.loads((demo.model / "config.json").read_text())
    assert config["model"]["dropout"] == 0.0  # the tiny preset's own is 0.1
    train_config = config["extra"]["train_config"]
    assert (train_config["batch_size"], train_config["random_negatives_ratio"], train_config["lr"]) == (128, 0.5, 2e-3)
    # the demo's override, and the graph's token count recorded by training (a re-run reads the same)
    assert train_config["model"] == {"dropout": 0.0, "graph_tokens": 3}


@pytest.mark.parametrize("options, field", [
    (dict(model={"dropout": 1.5}), "model.dropout"),
    (dict(model={"widht": 3}), "widht"),
    (dict(lr=0), "demo.lr"),
    (dict(preset="gpu"), "preset"),
])
def test_demo_settings_refuse_bad_options_before_any_stage(tmp_path, options, field):
    from itemsage.config import ConfigError
    from itemsage.demo import DemoSettings

    with pytest.raises(ConfigError, match=field):
        DemoSettings(out=tmp_path / "demo", **options)
    assert not (tmp_path / "demo").exists()


def test_demo_writes_every_artifact(demo):
    for directory in (demo.shop, demo.dataset, demo.model, demo.embeddings):
        artifacts.verify_manifest(directory)
    assert (demo.index / "CURRENT").is_file()
    assert demo.report.is_file()
    # the graph stage ran before training, and the model and its embeddings read its tokens
    artifacts.verify_manifest(demo.dataset / "graph", kind="graph")
    graph_fp = artifacts.fingerprint(demo.dataset / "graph")
    config = json.loads((demo.model / "config.json").read_text())
    assert config["graph_dim"] > 0 and config["extra"]["graph"]["graph"] == graph_fp
    assert artifacts.read_manifest(demo.embeddings)["inputs"]["graph"] == graph_fp
    products = pq.read_table(demo.dataset / schema.PRODUCTS_FILE, columns=[schema.PRODUCT_ID]).num_rows
    assert demo.evaluation["data"]["products"] == products
    # Every test-window pair was ranked, exact and through the index.
    n_eval = pq.read_metadata(demo.dataset / schema.TEST_FILE).num_rows
    assert demo.evaluation["exact"]["all"]["n"] == n_eval
    assert demo.evaluation["ann"]["all"]["n"] == n_eval


def test_demo_beats_chance_and_ann_tracks_exact(demo):
    result = demo.evaluation
    n_products = result["data"]["products"]
    # Even 30 tiny steps put the engaged product in the top 10 far more often than chance (10/N).
    assert result["exact"]["all"]["recall@10"] > 3 * 10 / n_products
    # The flat-reference and ANN rankings agree closely on a 300-product catalog.
    assert abs(result["ann"]["all"]["recall@10"] - result["exact"]["all"]["recall@10"]) < 0.05


def test_the_ceilings_popularity_ranking_is_the_reports_popularity_row(demo):
    """The ceiling code counts the popularity baseline its own way (its pairs matched to the shop's log, its
    train counts, its counting): the report's popularity row, exactly; the ceilings sit beside it."""
    from itemsage.data.demo_shop import read_latents
    from itemsage.evaluate.ceiling_data import demo_config, find_shop, window_rows
    from itemsage.evaluate.ceiling_ranks import popularity_counts
    from itemsage.metrics import group_recall

    shop, manifest = find_shop(demo.dataset)
    products = demo_config(manifest).products
    rows = window_rows(demo.dataset, shop, read_latents(shop), products)
    greater, tied = popularity_counts(rows, products)
    tasks = [schema.task_name(schema.SURFACES[s], schema.ENGAGEMENTS[e]) for s, e in zip(rows.surface, rows.engagement)]
    assert group_recall(greater + tied, tasks) == demo.evaluation["popularity"]  # ties pessimistic, as evaluate
    ceiling = demo.evaluation["ceiling"]
    assert ceiling["available"] and ceiling["kinds"]["observable"]["recall"]["all"]["n"] == len(rows)
    for kind in ("oracle", "observable"):  # a ceiling above the model and popularity, below 1
        top = ceiling["kinds"][kind]["recall"]["all"]["recall@10"]
        assert demo.evaluation["exact"]["all"]["recall@10"] < top < 1 and demo.evaluation["popularity"]["all"][
            "recall@10"] < top
    buckets = demo.evaluation["buckets"]["exact"]
    assert sum(b["n"] for b in buckets.values()) == len(rows)
    text = demo.report.read_text()
    assert "## Against the data's ceiling" in text and "## By the engaged product's train-window engagements" in text


def test_demo_rerun_skips_finished_stages(demo, tmp_path):
    from itemsage.demo import DemoSettings, run_demo

    def snapshot() -> dict[str, tuple[str, int]]:
        """Every file of the finished stages' artifacts: sha256 and modification time (ns)."""
        files = {}
        for directory in (demo.shop, demo.dataset, demo.model.parent, demo.embeddings, demo.index, demo.report.parent):
            # .verified.json is the dataset's verification record, which a later read may complete
            for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != artifacts.VERIFIED):
                files[str(path)] = (artifacts.sha256_file(path), path.stat().st_mtime_ns)
        return files

    before = snapshot()
    again = run_demo(DemoSettings(out=demo.shop.parent, products=300, train_minutes=5, train_steps=30,
                                  preset="tiny", batch_size=128, random_negatives_ratio=0.5, lr=2e-3,
                                  model={"dropout": 0.0}), progress=False)
    assert snapshot() == before  # no stage wrote anything: not a file added, changed or touched
    assert again.evaluation["exact"] == demo.evaluation["exact"]  # the printed table: the report's figures


def test_compare_report(demo, tmp_path):
    from itemsage.evaluate.compare import compare
    from itemsage.evaluate.compare_runs import COLOURS, SUMMARY_KEYS, CompareConfig

    cfg = CompareConfig(preset="tiny", steps=6, batch_size=64, seeds=2, eval_every=2, patience=1,
                        runs=("itemsage", "text_only", "single_task_click", "in_batch_negatives", "no_graph"))
    report = compare(demo.dataset, tmp_path / "cmp", cfg, progress=False)
    text = report.read_text()
    assert text.startswith("# ItemSage comparisons\n\n## What this says\n")
    for heading in ("Architecture and modalities", "Negatives", "Multi-task against single-task", "## Convergence",
                    "## Against the data's ceiling", "| features only (no popularity) |", "| oracle ceiling |",
                    "## Graph tokens"):
        assert heading in text
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert set(results) == set(cfg.runs)
    # The single-task model trained on clicks only: the text-only model has no image projection.
    seeds = {n: r["seeds"] for n, r in results.items()}
    assert seeds["single_task_click"][0]["run"]["train_config"]["tasks"] == [
        "search.click", "closeup.click", "home.click"]
    assert seeds["text_only"][0]["run"]["parameters"] < seeds["itemsage"][0]["run"]["parameters"]
    # the reference reads the dataset's graph tokens; no_graph is the same model on content alone
    graph_dims = {n: json.loads(next((tmp_path / "cmp" / "runs" / n / "seed-0").rglob("model/config.json"))
                                .read_text()).get("graph_dim", 0) for n in ("itemsage", "no_graph")}
    assert graph_dims["itemsage"] > 0 and graph_dims["no_graph"] == 0
    for png in ("architecture.png", "negatives.png", "tasks.png", "training_curves.png", "recall_at_k.png"):
        assert (tmp_path / "cmp" / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["products"] == demo.evaluation["data"]["products"] and summary["stopping"] == cfg.stopping()
    for name, runs in seeds.items():
        assert [r["run"]["seed"] for r in runs] == [0, 1]
        for r in runs:
            run = r["run"]
            # every run was embedded by embed.py and evaluated against those vectors
            emb = tmp_path / "cmp" / "runs" / name / f"seed-{run['seed']}" / "embeddings"
            assert r["data"]["embeddings_fingerprint"] == artifacts.fingerprint(emb)
            # each run's model: its best validation evaluation; it stopped at patience or the step cap
            points = r["training_curves"]["validation/recall@10/all"]
            assert [p[0] for p in points] == list(range(2, run["steps"] + 1, 2))
            assert run["best_step"] == max(points, key=lambda p: p[1])[0]
            assert run["stopped_by"] == ("patience" if run["steps"] < cfg.steps else "step cap")
            assert run["stopped_early"] or run["steps"] == cfg.steps
            assert r["recall_curve"]["exact"]["all"][9] == pytest.approx(r["exact"]["all"]["recall@10"])
        # summary.json: mean and sd over the two seeds, from each seed's own test figures
        alls = [r["exact"]["all"]["recall@10"] for r in runs]
        assert summary[name]["all"]["mean"] == pytest.approx(np.mean(alls))
        assert summary[name]["all"]["sd"] == pytest.approx(np.std(alls, ddof=1))
        assert set(summary[name]) == set(SUMMARY_KEYS)
    assert len({COLOURS[n] for n in cfg.runs}) == len(cfg.runs)
    artifacts.verify_manifest(tmp_path / "cmp", kind="comparison")
    # a re-run finds every (run, seed) on disk and writes the same summary
    again = compare(demo.dataset, tmp_path / "cmp", cfg, progress=False)
    assert json.loads((again.parent / "summary.json").read_text()) == summary


def test_compare_cli_prints_a_summary_table_not_the_report(demo, tmp_path):
    """The report is in the out directory; the command prints Recall@10 mean ± sd per run and surface
    (from summary.json) and where the report is. It printed the whole report (about 250 lines)."""
    import re

    from typer.testing import CliRunner

    from itemsage.cli import app

    args = ["compare", str(demo.dataset), "--out", str(tmp_path / "cmp"), "--preset", "tiny", "--steps", "4",
            "--batch-size", "64", "--seeds", "2", "--eval-every", "2", "--patience", "1", "--runs",
            "itemsage,text_only", "--no-progress"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) < 15 and "What this says" not in result.output
    assert lines[-1] == f"report: {tmp_path / 'cmp' / 'report.md'}"
    for name in ("itemsage", "text_only"):
        row = next(ln for ln in lines if re.search(rf"\b{name}\b", ln))
        cells = [f"{summary[name][k]['mean']:.3f} ± {summary[name][k]['sd']:.3f}"
                 for k in ("search", "closeup", "home", "all", "cold_start")]
        assert [c for c in cells if c in row] == cells, (row, cells)
