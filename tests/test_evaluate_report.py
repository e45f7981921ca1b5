"""evaluate on the test window, and its report's pictures: the numbers in the PNGs' data and the
gallery agree with evaluate's own JSON and with references computed here."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_train import make_dataset

from itemsage import artifacts, schema
from itemsage.evaluate.evaluation import evaluate
from itemsage.evaluate.report import LOSS_TAG, VALIDATION_TAG, write_report
from itemsage.train.config import TrainConfig
from itemsage.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dataset = make_dataset(root / "data")
    cfg = TrainConfig(preset="tiny", batch_size=16, random_negatives_ratio=2, max_steps=12, warmup_steps=2, lr=3e-3,
                      checkpoint_every=0, eval_every=4, eval_sample=5000, patience=0, device="cpu", seed=3)
    trained = train(dataset, root / "run", cfg, progress=False)
    from itemsage.embed.shards import embed

    embed(trained.model_dir, dataset, root / "embeddings", progress=False)
    result = evaluate(trained.model_dir, dataset, root / "embeddings")
    report = write_report(result, root / "report")
    return dataset, trained, result, report


def test_evaluate_reports_the_test_window_only(run):
    dataset, _, result, _ = run
    n_test = pq.read_metadata(dataset / schema.TEST_FILE).num_rows
    n_validation = pq.read_metadata(dataset / schema.VALIDATION_FILE).num_rows
    assert n_test != n_validation
    assert result["data"]["window"] == "test"
    assert result["exact"]["all"]["n"] == result["data"]["eval_pairs"] == n_test


def test_a_dataset_not_from_the_demo_shop_has_no_ceiling(run):
    _, _, result, report = run
    assert result["ceiling"]["available"] is False and "demo-data" in result["ceiling"]["reason"]
    assert "No ceiling for this dataset" in report.read_text()
    # the figures by train-window count are there all the same
    buckets = result["buckets"]["exact"]
    assert list(buckets) == ["0", "1-4", "5-19", ">=20"]
    assert sum(b["n"] for b in buckets.values()) == result["data"]["eval_pairs"]


def test_recall_curve_agrees_with_the_recall_table(run):
    _, _, result, report = run
    curve = result["recall_curve"]
    assert curve["k"] == list(range(1, 101))
    for k in (1, 10, 100):
        assert curve["exact"]["all"][k - 1] == pytest.approx(result["exact"]["all"][f"recall@{k}"])
    for surface in schema.SURFACES:  # a surface's curve = the pair-weighted mean of its tasks
        tasks = [v for t, v in result["exact"].items() if t.startswith(surface + ".") and v["n"]]
        expected = sum(v["recall@10"] * v["n"] for v in tasks) / sum(v["n"] for v in tasks)
        assert curve["exact"][surface][9] == pytest.approx(expected)
        assert np.all(np.diff(curve["exact"][surface]) >= 0)  # a recall curve never falls
    saved = json.loads((report.parent / "evaluation.json").read_text())
    assert saved["recall_curve"] == curve


def test_report_files_exist_and_are_listed(run):
    _, _, _, report = run
    out = report.parent
    for png in ("recall_at_k.png", "training_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    manifest = artifacts.verify_manifest(out, kind="evaluation")
    assert {"recall_at_k.png", "training_curves.png", "report.md", "evaluation.json"} <= set(manifest["files"])
    text = report.read_text()
    assert "![Recall@K per surface](recall_at_k.png)" in text and "training_curves.png" in text
    assert "## Nearest neighbours" in text


def test_training_curves_come_from_the_run(run):
    _, trained, result, _ = run
    curves = result["training_curves"]
    assert [p[0] for p in curves[LOSS_TAG]] == list(range(1, 13))  # one loss point per step
    assert curves[LOSS_TAG][-1][1] == pytest.approx(trained.final_loss, rel=1e-5)
    assert [p[0] for p in curves[VALIDATION_TAG]] == [4, 8, 12]  # every --eval-every steps
    # wall time since the first step: starts at 0, never goes back, within the run's elapsed time
    seconds = [p[2] for p in curves[LOSS_TAG]]
    assert seconds[0] == 0.0 and np.all(np.diff(seconds) >= 0) and seconds[-1] <= trained.elapsed_s + 1
    assert [p[2] for p in curves[VALIDATION_TAG]] == sorted(p[2] for p in curves[VALIDATION_TAG])
    # the chosen model's validation score is the best point of the curve
    best = max(curves[VALIDATION_TAG], key=lambda p: p[1])
    assert trained.best_step == best[0] == result["data"]["best_step"]
    assert trained.final_recall["all"]["recall@10"] == pytest.approx(best[1], rel=1e-6)


def test_gallery_marks_the_engaged_product_among_exact_neighbours(run):
    dataset, trained, result, report = run
    gallery = result["gallery"]
    assert sorted({g["surface"] for g in gallery}) == sorted(schema.SURFACES)
    assert all(sum(g["surface"] == s for g in gallery) == 3 for s in schema.SURFACES)
    from itemsage.model.batch import ProductStore
    from itemsage.model.model import load_model

    loaded = load_model(trained.model_dir)
    store = ProductStore.from_dataset(dataset, loaded.vocab, loaded.config.text_fields, loaded.config.max_images)
    titles = dict(zip(pq.read_table(dataset / schema.PRODUCTS_FILE)[schema.PRODUCT_ID].to_pylist(),
                      [" ".join(t) for t in pq.read_table(dataset / schema.PRODUCTS_FILE)["title"].to_pylist()]))
    import torch

    from itemsage.train.validation import embed_catalog

    catalog = embed_catalog(loaded.model, store).numpy()  # [N, D]
    test = pq.read_table(dataset / schema.TEST_FILE)
    for g in gallery:
        top = g["top"]
        assert len(top) == 10 and all(t["title"] == titles[t["product_id"]] for t in top)
        # the top 10 of an exact search written out here: the pair's query vector through its adapter
        vector = torch.tensor([test[schema.QUERY_EMBEDDING][g["test_row"]].as_py()], dtype=torch.float32)
        assert test[schema.SURFACE][g["test_row"]].as_py() == g["surface"]
        with torch.no_grad():
            q = loaded.adapters(g["surface"], vector).numpy()[0]  # [D]
        scores = catalog @ q  # [N]
        order = np.argsort(-scores, kind="stable")[:10]
        assert [t["product_id"] for t in top] == store.ids[order].tolist()
        np.testing.assert_allclose([t["score"] for t in top], scores[order], atol=1e-4)
        engaged = test[schema.PRODUCT_ID][g["test_row"]].as_py()
        assert g["engaged"]["product_id"] == engaged
        marked = [t["product_id"] for t in top if t["engaged"]]
        assert marked == ([engaged] if engaged in store.ids[order] else [])
        assert g["engaged_rank"] == 1 + int((scores >= scores[store.index_of([engaged])[0]]).sum()) - 1
        assert f"*{g['engaged']['title']}*" in report.read_text()


def test_gallery_markdown_keeps_a_title_with_a_pipe_in_its_cell():
    import re

    from itemsage.evaluate.report import gallery_markdown

    title = "sconce light - purple | Garwyn *new*"
    g = {"surface": "search", "task": "search.click", "query": '"lamp | light"', "user_id": "u1",
         "engaged": {"product_id": "p1", "title": title}, "engaged_rank": 1,
         "top": [{"product_id": "p1", "title": title, "score": 0.5, "engaged": True},
                 {"product_id": "p2", "title": "plain", "score": 0.25, "engaged": False}]}
    rows = [line for line in gallery_markdown([g]) if line.startswith("| ") and "score" not in line]
    assert len(rows) == 2
    for row in rows:  # 4 cell borders that are not escaped: 3 cells
        assert len(re.findall(r"(?<!\\)\|", row)) == 4, row
    assert "purple \\| Garwyn \\*new\\*" in rows[0]


def test_a_killed_report_leaves_no_part_of_one_and_a_rerun_cleans_up(run, tmp_path):
    """kill -9 in the middle of write_report (right after its first PNG): --out holds the earlier
    report, whole, or nothing; the next run removes the dead run's temporary directory, and its --out
    holds exactly its manifest's files."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import itemsage

    _, _, result, report = run
    out = tmp_path / "eval"
    script = ("import json, os, signal, sys\n"
              "from itemsage.evaluate import report\n"
              "real = report._save_png\n"
              "def save_then_die(fig, path):\n"
              "    real(fig, path)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "report._save_png = save_then_die\n"
              "report.write_report(json.loads(open(sys.argv[1]).read()), sys.argv[2])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(itemsage.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}

    def killed_run() -> None:
        proc = subprocess.run([sys.executable, "-c", script, str(report.parent / "evaluation.json"), str(out)],
                              env=env, capture_output=True, text=True, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr

    def files(directory: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}

    killed_run()
    assert not out.exists()  # not a part of a report
    write_report(result, out)
    before = files(out)
    killed_run()
    assert files(out) == before  # the earlier report, whole
    assert [p.name for p in tmp_path.iterdir() if p.name != "eval"] == [p.name for p in tmp_path.glob("eval.tmp-*")] != []
    write_report(result, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # the dead run's temporaries are gone
    manifest = artifacts.verify_manifest(out, kind="evaluation")
    assert sorted(files(out)) == sorted([*manifest["files"], artifacts.MANIFEST])


def test_report_replaces_a_torn_report_but_not_another_directory(run, tmp_path):
    _, _, result, _ = run
    torn = tmp_path / "torn"  # what a kill left before reports were written whole
    torn.mkdir()
    (torn / "evaluation.json").write_text("{}")
    (torn / ".recall_at_k.png.x1y2.tmp").write_bytes(b"\x89PN")
    write_report(result, torn)
    manifest = artifacts.verify_manifest(torn, kind="evaluation")
    assert sorted(p.name for p in torn.iterdir()) == sorted([*manifest["files"], artifacts.MANIFEST])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(artifacts.ArtifactError, match="not an evaluation report"):
        write_report(result, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
