"""The graph artifact (graph/artifact.py, graph/build.py) and `itemsage graph`: the files and their
manifest, verification before use (a tampered file, another dataset's graph), kill -9 mid-stage, the
command line and its run-file table."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_graph import hand_made, random_dataset
from typer.testing import CliRunner

import itemsage
from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.cli import app
from itemsage.graph import GraphConfig, build_graph_features, graph_dir_of, read_graph_features, read_neighbours
from itemsage.graph.features import graph_hashes


def test_the_artifact_holds_its_files_its_manifest_and_one_row_per_product_in_order(tmp_path):
    ds = random_dataset(tmp_path / "ds")
    out = build_graph_features(ds)
    assert out == graph_dir_of(ds) == ds / "graph"
    manifest = artifacts.verify_manifest(out, kind="graph")
    assert sorted(p.name for p in out.iterdir()) == ["features.parquet", "manifest.json", "neighbours.parquet"]
    assert manifest["inputs"] == {"dataset": artifacts.fingerprint(ds)}
    assert manifest["config"] == GraphConfig().to_dict() | {"tokens": list(GraphConfig().tokens)}
    assert manifest["tokens"] == ["walk", "closeup", "search"] and manifest["dim"] == 8
    assert manifest["content"] == "query_vector" and manifest["graph_format"] == 1
    assert manifest["train_last_timestamp"].startswith("1970-01-3")  # the hand-made log's last minute, as ISO
    counts = manifest["counts"]
    assert counts["products"] == 60 and set(counts["with_token"]) == {"walk", "closeup", "search"}
    assert counts["edges"] > 0 and len(counts["degree_p50_p99_max"]) == 3 and "in_degree_p50_p99_max" in counts
    assert set(manifest["timings"]) >= {"read train window", "edges and degree caps", "walks", "pool and write features"}

    table = pq.read_table(out / "features.parquet")
    assert str(table.schema) == ("product_id: string\ngraph_tokens: fixed_size_list<element: halffloat>[24]\n"
                                 "  child 0, element: halffloat\ngraph_mask: fixed_size_list<element: bool>[3]\n"
                                 "  child 0, element: bool\ngraph_hash: string")
    products = pq.read_table(ds / "products.parquet")["product_id"].to_pylist()
    feats = read_graph_features(out, artifacts.fingerprint(ds))
    assert table["product_id"].to_pylist() == products == feats.ids.tolist()
    assert feats.mask.sum(axis=0).tolist() == [counts["with_token"][t] for t in manifest["tokens"]]
    assert not feats.mask[-5:].any()  # the products never engaged
    assert np.array_equal(feats.hashes, graph_hashes(feats.tokens, feats.mask, feats.names))  # stable: recomputable
    assert feats.float32(slice(0, 2)).dtype == np.float32 and feats.float32([0, 1]).shape == (2, 3, 8)

    ids, matrix = read_neighbours(out)
    assert ids.tolist() == products and matrix.shape == (60, 60)
    assert np.diff(matrix.indptr).max() <= GraphConfig().top_t and matrix.diagonal().sum() == 0
    rows = pq.read_table(out / "neighbours.parquet")
    first = next(i for i, r in enumerate(rows["visits"].to_pylist()) if r)
    assert rows["visits"][first].as_py() == sorted(rows["visits"][first].as_py(), reverse=True)


def test_verification_refuses_a_tampered_file_another_datasets_graph_and_a_missing_one(tmp_path):
    ds = hand_made(tmp_path / "ds")
    out = build_graph_features(ds)
    read_graph_features(out, artifacts.fingerprint(ds))  # fine
    with pytest.raises(ArtifactError, match=r"another dataset .* Run `itemsage graph DATASET` to build"):
        read_graph_features(out, "0123456789abcdef")
    other = build_graph_features(ds, tmp_path / "elsewhere")
    with pytest.raises(ArtifactError, match=re.escape(f"itemsage graph DATASET --out {other}")):
        read_graph_features(other, "0123456789abcdef")
    with pytest.raises(ArtifactError, match="does not exist.*itemsage graph DATASET"):
        read_graph_features(tmp_path / "nothing")
    path = out / "features.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped, same size
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its manifest checksum"):
        read_graph_features(out)
    (other / "neighbours.parquet").unlink()
    with pytest.raises(ArtifactError, match="neighbours.parquet is listed in the manifest but missing"):
        read_graph_features(other)


def test_a_rebuild_replaces_the_graph_and_another_directory_is_not_overwritten(tmp_path):
    ds = hand_made(tmp_path / "ds")
    out = build_graph_features(ds, config=GraphConfig(neighbours=False))
    assert sorted(p.name for p in out.iterdir()) == ["features.parquet", "manifest.json"]
    with pytest.raises(ArtifactError, match="without neighbour lists"):
        read_neighbours(out)
    build_graph_features(ds)
    assert (out / "neighbours.parquet").is_file() and sorted(p.name for p in tmp_path.joinpath("ds").iterdir() if
                                                             p.name.startswith("graph")) == ["graph"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not a graph artifact"):
        build_graph_features(ds, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_kill_9_mid_stage_leaves_nothing_torn_and_a_rerun_starts_over(tmp_path):
    """SIGKILL right after features.parquet is written (before the neighbours and the manifest): the
    graph directory holds the earlier graph, whole, or nothing; the next run removes the dead run's
    temporary directory and publishes a complete graph."""
    ds = hand_made(tmp_path / "ds")
    out = ds / "graph"
    script = ("import os, signal, sys\n"
              "from itemsage.graph import artifact, build\n"
              "def die(*args, **kwargs):\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "artifact.write_neighbours = die\n"
              "build.build_graph_features(sys.argv[1])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(itemsage.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}

    def killed_run() -> None:
        proc = subprocess.run([sys.executable, "-c", script, str(ds)], env=env, capture_output=True, text=True,
                              check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        left = [p for p in ds.iterdir() if p.name.startswith("graph.tmp-")]
        assert len(left) == 1 and (left[0] / "features.parquet").is_file()  # killed after the features
        assert not (left[0] / "manifest.json").exists()

    def files(directory: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}

    killed_run()
    assert not out.exists()
    with pytest.raises(ArtifactError, match="does not exist"):
        read_graph_features(out)
    build_graph_features(ds)
    assert not [p for p in ds.iterdir() if p.name.startswith("graph.")]  # the dead run's directory is gone
    before = files(out)
    killed_run()
    assert files(out) == before  # the earlier graph, whole
    read_graph_features(out, artifacts.fingerprint(ds))
    build_graph_features(ds)
    assert sorted(p.name for p in ds.iterdir() if p.name.startswith("graph")) == ["graph"]
    assert files(out)["features.parquet"] == before["features.parquet"]  # the same dataset and seed: the same bytes


# ---- the command line --------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "TERM": "dumb"})


def plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─┃┏┓┗┛━┡┩╇┳╋]", " ", text))


def test_itemsage_graph_writes_the_default_location_and_takes_a_run_file(tmp_path):
    ds = hand_made(tmp_path / "ds")
    result = invoke("-q", "graph", str(ds), "--no-progress")
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert "7 of 9 products engaged in the train window" in text and str(ds / "graph") in text
    assert re.search(r"walk 6 66\.7% closeup 2 22\.2% search 2 22\.2%", text), text  # p2 engaged, unlinked
    run = tmp_path / "run.toml"
    run.write_text('[graph]\ndataset = "ds"\nout = "g"\nseed = 4\ntokens = ["walk", "session"]\n'
                   'edge_type_weights = {session = 1.0, closeup = 1.0}\nneighbours = false\n')
    result = invoke("graph", "--config", str(run), "--no-progress")
    assert result.exit_code == 0, result.output
    manifest = artifacts.read_manifest(tmp_path / "g")
    assert manifest["config"]["seed"] == 4 and manifest["tokens"] == ["walk", "session"]
    assert manifest["config"]["edge_type_weights"] == {"session": 1.0, "closeup": 1.0}
    assert "neighbours.parquet" not in manifest["files"]


@pytest.mark.parametrize("text, pieces", [
    ("[graph]\nmax_degre = 3\n", ["`max_degre` in", "Did you mean `max_degree`?"]),
    ("[graph]\nmax_degree = 0\n", ["`max_degree` (0) must be an integer >= 1", "in --config"]),
    ("[graph]\nseed = 1.5\n", ["`seed` in", "must be an integer, got 1.5"]),
    ("[graph]\ntokens = [\"walk\", \"likes\"]\n", ["`tokens` ['walk', 'likes'] must be one or more distinct names"]),
    ("[train]\nsteps = 5\n", ["has no [graph] table (it has [train])"]),
])
def test_a_bad_run_file_is_refused_by_key_before_anything_is_written(tmp_path, text, pieces):
    ds = hand_made(tmp_path / "ds")
    run = tmp_path / "run.toml"
    run.write_text(text)
    result = invoke("graph", str(ds), "--config", str(run))
    out = plain(result.output)
    assert result.exit_code == 2 and out.startswith("error: ") and "Traceback" not in out, out
    for piece in pieces:
        assert piece in out, (piece, out)
    assert not (ds / "graph").exists()


def test_itemsage_graph_refusals_are_one_line(tmp_path):
    missing = tmp_path / "no" / "such"
    result = invoke("graph", str(missing))
    assert result.exit_code == 2 and plain(result.output).startswith(f"error: the dataset directory {missing} does "
                                                                      "not exist"), result.output
    result = invoke("graph")
    assert result.exit_code == 2 and "give the DATASET_DIR argument" in plain(result.output)
    not_a_dataset = tmp_path / "nd"
    not_a_dataset.mkdir()
    result = invoke("graph", str(not_a_dataset))
    assert result.exit_code == 2 and "has no manifest.json" in plain(result.output)
    ds = hand_made(tmp_path / "ds")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    result = invoke("graph", str(ds), "--out", str(tmp_path / "taken"))
    assert result.exit_code == 2 and "is not a graph artifact" in plain(result.output)
    result = invoke("graph", "--help")
    assert result.exit_code == 0 and "itemsage graph runs/data" in result.output
    data = json.loads((ds / "manifest.json").read_text())  # a dataset whose file changed after ingest
    (ds / "train.parquet").write_bytes(b"torn")
    assert data["kind"] == "dataset"
    result = invoke("graph", str(ds))
    assert result.exit_code == 2 and "train.parquet" in plain(result.output)
