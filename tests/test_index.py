"""ProductIndex: exact search against numpy, HNSW recall against exact, storage that refuses damage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.config import ConfigError
from itemsage.index.build import build_from_embeddings
from itemsage.index.config import IndexConfig
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.recall import neighbour_recall
from itemsage.index.versions import current_version, load_current, publish, version_path


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ids_for(n: int) -> np.ndarray:
    return np.array([f"p{i:05d}" for i in range(n)], dtype=object)


def test_flat_search_equals_numpy_brute_force():
    base, queries = unit_vectors(300, 16, seed=1), unit_vectors(20, 16, seed=2)
    ids = ids_for(300)
    index = ProductIndex.build(ids, base, kind="flat")
    found_ids, scores = index.search(queries, k=7)

    sims = queries.astype(np.float64) @ base.T.astype(np.float64)  # [Q, N] reference
    order = np.argsort(-sims, axis=1)[:, :7]
    assert found_ids.shape == (20, 7) and scores.shape == (20, 7) and scores.dtype == np.float32
    np.testing.assert_array_equal(found_ids, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, order, axis=1), rtol=0, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_hnsw_recall_at_10_against_exact():
    base = unit_vectors(5000, 32, seed=3)
    # Queries near stored points (as real queries are), but not equal to them.
    rng = np.random.default_rng(4)
    queries = base[rng.choice(5000, 200, replace=False)] + 0.05 * unit_vectors(200, 32, seed=5)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ids = ids_for(5000)
    hnsw = ProductIndex.build(ids, base, kind="hnsw", m=16, ef_construction=100, ef_search=64)
    exact = ProductIndex.build(ids, base, kind="flat")
    ann_ids, ann_scores = hnsw.search(queries, 10)
    exact_ids, _ = exact.search(queries, 10)
    assert neighbour_recall(ann_ids, exact_ids) >= 0.95
    # Scores are true inner products of the returned products, whatever the search path.
    ref = np.einsum("qd,qkd->qk", queries, base[[[int(i[1:]) for i in row] for row in ann_ids]])
    np.testing.assert_allclose(ann_scores, ref, atol=1e-5)
    # Build measured its own recall against exact search and it agrees with the bar.
    assert hnsw.stats["neighbour_recall_at_10"] >= 0.95 and hnsw.stats["recall_queries"] == 1000


def test_neighbour_recall_by_hand():
    """neighbour_recall: the share of the exact top-k ids the index found (padding '' never counts)."""
    found = np.array([["a", "b", "c"], ["x", "y", ""]], dtype=object)
    exact = np.array([["a", "c", "d"], ["y", "z", "w"]], dtype=object)
    assert neighbour_recall(found, exact) == pytest.approx(3 / 6)


def test_pads_when_fewer_than_k_and_vector_lookup():
    base = unit_vectors(3, 8)
    for kind in ("flat", "hnsw"):
        index = ProductIndex.build(["a", "b", "c"], base, kind=kind)
        found, scores = index.search(base[:1], k=5)
        assert sorted(found[0, :3]) == ["a", "b", "c"] and list(found[0, 3:]) == ["", ""]
        assert np.all(np.isneginf(scores[0, 3:])) and np.all(np.isfinite(scores[0, :3]))
        assert found[0, 0] == "a"
        np.testing.assert_allclose(index.vector(["c", "a"]), base[[2, 0]], atol=1e-6)
        with pytest.raises(KeyError, match="'zzz'"):
            index.vector(["a", "zzz"])
    empty = ProductIndex(dim=8)
    found, scores = empty.search(base, k=2)
    assert found.shape == (3, 2) and np.all(found == "") and np.all(np.isneginf(scores))


def test_add_normalises_and_refuses_duplicates_and_zero_rows():
    index = ProductIndex(dim=4, config=IndexConfig(kind="flat"))
    index.add(["a"], np.array([[3.0, 4.0, 0.0, 0.0]]))
    np.testing.assert_allclose(index.vector(["a"]), [[0.6, 0.8, 0.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="duplicate product id 'a'"):
        index.add(["b", "a"], unit_vectors(2, 4))
    assert len(index) == 1 and "b" not in index  # a refused add leaves the index unchanged
    with pytest.raises(ValueError, match="all zeros"):
        index.add(["z"], np.zeros((1, 4)))


@pytest.mark.parametrize(
    "queries, k, match",
    [
        (np.full((1, 8), np.nan, dtype=np.float32), 3, "NaN or inf"),
        (np.array([[np.inf] + [0.0] * 7]), 3, "NaN or inf"),
        (np.ones((2, 7), dtype=np.float32), 3, r"shape \[N, 8\], got \[2, 7\]"),
        (np.ones(8, dtype=np.float32), 3, r"shape \[N, 8\]"),
        (np.ones((1, 8), dtype=np.float32), 0, "k must be a positive integer"),
        (np.ones((1, 8), dtype=np.float32), -2, "k must be a positive integer"),
        (np.ones((1, 8), dtype=np.float32), 2.5, "k must be a positive integer"),
    ],
)
def test_bad_queries_raise_value_error(queries, k, match):
    index = ProductIndex.build(ids_for(10), unit_vectors(10, 8), kind="flat")
    with pytest.raises(ValueError, match=match):
        index.search(queries, k)


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="index.kind"):
        IndexConfig(kind="ivf")
    with pytest.raises(ConfigError, match="index.m "):
        IndexConfig(m=1)
    with pytest.raises(ConfigError, match="index.ef_typo"):
        ProductIndex.build(["a"], unit_vectors(1, 4), kind="flat", ef_typo=3)


def test_save_load_round_trip(tmp_path):
    base, queries = unit_vectors(500, 16, seed=6), unit_vectors(10, 16, seed=7)
    index = ProductIndex.build(ids_for(500), base, kind="hnsw", m=8, ef_search=40)
    index.save(tmp_path / "v1", inputs={"embeddings": "abc"})
    loaded = ProductIndex.load(tmp_path / "v1")
    assert len(loaded) == 500 and loaded.dim == 16 and loaded.version == "v1"
    assert loaded.config == index.config and loaded.ef_search == 40
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded.vector(["p00042"]), base[[42]], atol=1e-6)
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert manifest["kind"] == "index" and manifest["count"] == 500 and manifest["dim"] == 16
    assert manifest["inputs"] == {"embeddings": "abc"} and 0.0 <= manifest["neighbour_recall_at_10"] <= 1.0
    assert ProductIndex.load(tmp_path / "v1", ef_search=7).ef_search == 7
    with pytest.raises(ArtifactError, match="never overwritten"):
        index.save(tmp_path / "v1")


def test_current_pointer_switches_versions(tmp_path):
    root = tmp_path / "idx"
    a = ProductIndex.build(["a1", "a2"], unit_vectors(2, 4, seed=1), kind="flat")
    b = ProductIndex.build(["b1", "b2", "b3"], unit_vectors(3, 4, seed=2), kind="flat")
    with pytest.raises(ArtifactError, match="no CURRENT"):
        load_current(root)
    va = a.save(version_path(root, "va"))
    vb = b.save(version_path(root, "vb"))
    publish(root, va)
    assert load_current(root).version == "va" and sorted(load_current(root).ids) == ["a1", "a2"]
    publish(root, vb)
    assert (root / "CURRENT").read_text().strip() == "vb" and current_version(root) == vb
    assert sorted(load_current(root).ids) == ["b1", "b2", "b3"]
    with pytest.raises(ValueError, match="no slashes"):
        version_path(root, "../escape")
    with pytest.raises(ValueError, match="not under"):
        publish(root, tmp_path / "elsewhere")


def test_corrupted_index_file_is_refused(tmp_path):
    index = ProductIndex.build(ids_for(50), unit_vectors(50, 8), kind="hnsw", m=4)
    vdir = index.save(version_path(tmp_path, "v"))
    path = vdir / "index.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit in the middle of the file
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        ProductIndex.load(vdir)
    with pytest.raises(ArtifactError, match="checksum"):
        publish(tmp_path, vdir)  # never published either
    assert not (tmp_path / "CURRENT").exists()


@pytest.mark.parametrize("field, value, match", [("count", 51, "holds 50 vectors"),
                                                 ("dim", 9, "dimension 8")])
def test_wrong_count_or_dim_is_refused(tmp_path, field, value, match):
    index = ProductIndex.build(ids_for(50), unit_vectors(50, 8), kind="flat")
    index.save(tmp_path / "v")
    manifest_path = tmp_path / "v" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest[field] = value
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=match):
        ProductIndex.load(tmp_path / "v")


def test_ids_file_swapped_with_consistent_checksum_is_refused(tmp_path):
    # Even a re-checksummed manifest cannot hide an ids file that disagrees with index.faiss.
    index = ProductIndex.build(ids_for(5), unit_vectors(5, 8), kind="flat")
    index.save(tmp_path / "v")
    artifacts.atomic_write_parquet(tmp_path / "v" / "ids.parquet", pa.table({"product_id": ["a", "b"]}))
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    artifacts.write_manifest(tmp_path / "v", "index", config=manifest["config"],
                             files=["index.faiss", "ids.parquet"], extra={"count": 5, "dim": 8})
    with pytest.raises(ArtifactError, match="ids.parquet holds 2 ids"):
        ProductIndex.load(tmp_path / "v")


def write_embeddings(directory, ids, vectors, model_fp="m123"):
    """A finished embeddings directory as embed.py writes it (two shards + manifest)."""
    d = vectors.shape[1]
    half = len(ids) // 2
    for n, (lo, hi) in enumerate([(0, half), (half, len(ids))]):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors[lo:hi].ravel(), pa.float32()), d)
        artifacts.atomic_write_parquet(directory / f"part-{n:05d}.parquet",
                                       pa.table({"product_id": list(ids[lo:hi]), "vector": vec}))
    artifacts.write_manifest(directory, "embeddings", inputs={"model": model_fp},
                             extra={"count": len(ids), "dim": d})


def test_build_from_embeddings_directory(tmp_path):
    base = unit_vectors(40, 8, seed=9)
    write_embeddings(tmp_path / "emb", ids_for(40), base)
    index, vdir = build_from_embeddings(tmp_path / "emb", tmp_path / "idx",
                                        IndexConfig(kind="flat"), version="first")
    assert vdir == tmp_path / "idx" / "versions" / "first"
    loaded = load_current(tmp_path / "idx")
    assert loaded.version == "first" and len(loaded) == 40
    assert loaded.manifest["inputs"]["model"] == "m123"
    assert loaded.manifest["inputs"]["embeddings"] == artifacts.fingerprint(tmp_path / "emb")
    found, _ = loaded.search(base[[17]], 1)
    assert found[0, 0] == "p00017"
    with pytest.raises(ArtifactError, match="already exists"):
        build_from_embeddings(tmp_path / "emb", tmp_path / "idx", version="first")


def test_cli_index_command(tmp_path):
    from typer.testing import CliRunner

    from itemsage.cli import app

    write_embeddings(tmp_path / "emb", ids_for(300), unit_vectors(300, 8, seed=10))
    result = CliRunner().invoke(app, ["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"),
                                      "--m", "8", "--version", "v1"])
    assert result.exit_code == 0, result.output
    assert "recall@10 vs exact search" in result.output and "300 vectors x 8 dims" in result.output
    assert load_current(tmp_path / "idx").version == "v1"
    result = CliRunner().invoke(app, ["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"),
                                      "--kind", "ivf"])
    assert result.exit_code == 2 and "--kind" in result.output  # a choice of the option, refused by click


# ---- IVF-PQ -------------------------------------------------------------------------------------


def clustered_vectors(n: int, d: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` random unit centres (learned embeddings cluster like this)."""
    rng = np.random.default_rng(seed)
    centres = unit_vectors(clusters, d, seed=seed + 1)
    x = centres[rng.integers(0, clusters, n)] + spread * unit_vectors(n, d, seed=seed + 2)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivfpq_parameters_follow_the_documented_rule():
    from itemsage.index.config import ivfpq_parameters

    cfg = IndexConfig(kind="ivfpq")
    big = ivfpq_parameters(1_000_000, 256, cfg)  # 4 * sqrt(1M) = 4,000 -> 4,096 lists
    assert (big.nlist, big.pq_m, big.pq_nbits, big.nprobe) == (4096, 128, 4, 0)  # nprobe 0: tuned at build
    assert ivfpq_parameters(20_000, 256, cfg).nlist == 512  # 4 * sqrt(20k) = 566 -> 512 = 20,000 // 39
    small = ivfpq_parameters(5_000, 32, cfg)  # 4 * sqrt(5k) = 283 -> 256, capped at 5,000 // 39 = 128
    assert (small.nlist, small.pq_m, small.nprobe) == (128, 16, 0)
    assert ivfpq_parameters(5_000, 10, cfg).pq_m == 5  # largest divisor of 10 up to 10 / 2
    given = ivfpq_parameters(5_000, 32, IndexConfig(kind="ivfpq", nlist=64, pq_m=8, nprobe=100))
    assert (given.nlist, given.pq_m, given.nprobe) == (64, 8, 64)  # explicit values kept; nprobe <= nlist
    with pytest.raises(ConfigError, match="pq_m"):
        ivfpq_parameters(5_000, 32, IndexConfig(kind="ivfpq", pq_m=5))
    with pytest.raises(ConfigError, match="index.pq_nbits"):
        IndexConfig(kind="ivfpq", pq_nbits=6)


def test_ivfpq_recall_against_exact_and_reranking_helps():
    base = clustered_vectors(5000, 32, clusters=40, spread=0.6, seed=11)
    rng = np.random.default_rng(12)
    queries = base[rng.choice(5000, 200, replace=False)] + 0.1 * unit_vectors(200, 32, seed=13)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    ids = ids_for(5000)
    exact_ids, _ = ProductIndex.build(ids, base, kind="flat").search(queries, 10)
    ivf = ProductIndex.build(ids, base, kind="ivfpq", threads=1, nprobe=32)
    assert (ivf.config.nlist, ivf.config.pq_m) == (128, 16)  # chosen from N and D
    found, scores = ivf.search(queries, 10)
    recall = neighbour_recall(found, exact_ids)
    assert recall >= 0.95
    # Re-ranked scores are the exact inner products of the returned products, best first.
    ref = np.einsum("qd,qkd->qk", queries, base[[[int(i[1:]) for i in row] for row in found]])
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Without a shortlist (refine x1) the 4-bit codes alone rank clearly worse.
    ivf._index.k_factor = 1.0
    assert neighbour_recall(ivf.search(queries, 10)[0], exact_ids) < recall - 0.05
    # The build measured its own recall against exact search, with the re-ranking.
    assert ivf.stats["neighbour_recall_at_10"] >= 0.95 and ivf.stats["recall_queries"] == 1000
    # Product vectors come back exactly (from the full vectors, not the lossy codes).
    np.testing.assert_allclose(ivf.vector(["p00042", "p00007"]), base[[42, 7]], atol=1e-6)


def test_ivfpq_save_load_round_trip_and_memory(tmp_path):
    base = clustered_vectors(4000, 32, clusters=30, spread=0.6, seed=21)
    queries = unit_vectors(20, 32, seed=22)
    index = ProductIndex.build(ids_for(4000), base, kind="ivfpq", threads=1, recall_sample=200)
    vdir = index.save(version_path(tmp_path, "v1"))
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"index.faiss", "ids.parquet", "vectors.faiss"}
    # Resolved values are saved: 4 * sqrt(4,000) = 253 -> 256, capped at 4,000 // 39 = 102 lists.
    assert manifest["config"]["nlist"] == 102 and manifest["config"]["pq_m"] == 16
    # Codes (16 x 4 bits = 8 B) + 8 B id per vector, plus 102 centroids: under 0.2x of float32.
    assert manifest["index_bytes"] <= 0.2 * base.nbytes
    assert manifest["rerank_vectors_bytes"] >= base.nbytes  # the full vectors, kept on disk
    loaded = ProductIndex.load(vdir)
    # The unfiltered nprobe is the tuned one (nprobe 0 in the config), saved in the manifest.
    assert loaded.config == index.config and loaded.nprobe == index.nprobe == manifest["search_tuning"]["values"][0]
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loaded.vector(["p00003"]), base[[3]], atol=1e-6)
    assert ProductIndex.load(vdir, nprobe=16).nprobe == 16
    with pytest.raises(ValueError, match="read-only"):  # faiss itself would abort on the memory map
        loaded.add(["new"], unit_vectors(1, 32))
    assert len(loaded) == 4000 and "new" not in loaded
    # A damaged re-rank vectors file is refused like any other file of the version.
    data = bytearray((vdir / "vectors.faiss").read_bytes())
    data[-5] ^= 0x01
    (vdir / "vectors.faiss").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        ProductIndex.load(vdir)


def test_ivfpq_refuses_a_tiny_catalog():
    with pytest.raises(ValueError, match="use kind 'flat' or 'hnsw'"):
        ProductIndex.build(ids_for(500), unit_vectors(500, 8), kind="ivfpq")


def test_old_manifests_recall_key_is_read_under_its_new_name():
    from itemsage.index.config import NEIGHBOUR_RECALL, stats_from_manifest

    old = {"build_seconds": 1.5, "recall_at_10": 0.97, "recall_queries": 1000, "count": 3}
    assert stats_from_manifest(old, ("build_seconds", "recall_queries")) == {
        "build_seconds": 1.5, "recall_queries": 1000, NEIGHBOUR_RECALL: 0.97}
    assert stats_from_manifest({NEIGHBOUR_RECALL: 0.9}, ())[NEIGHBOUR_RECALL] == 0.9
    assert NEIGHBOUR_RECALL not in stats_from_manifest({"count": 3}, ())


def test_builds_in_the_same_second_get_distinct_versions(tmp_path, monkeypatch):
    """Without --version the name is the UTC second; two builds in one second (here: the clock
    stopped) get two versions, each holding its own embeddings, and neither build is refused."""
    import threading

    from itemsage.index import versions

    monkeypatch.setattr(versions, "new_version_name", lambda: "v20250101-120000")
    a, b = unit_vectors(30, 8, seed=1), unit_vectors(30, 8, seed=2)
    write_embeddings(tmp_path / "a", ids_for(30), a)
    write_embeddings(tmp_path / "b", ids_for(30), b)
    root = tmp_path / "idx"
    _, first = build_from_embeddings(tmp_path / "a", root, IndexConfig(kind="flat"))
    _, again = build_from_embeddings(tmp_path / "a", root, IndexConfig(kind="flat"))  # the same embeddings
    _, other = build_from_embeddings(tmp_path / "b", root, IndexConfig(kind="flat"))
    assert [p.name for p in (first, again, other)] == ["v20250101-120000", "v20250101-120000-2",
                                                        "v20250101-120000-3"]
    assert load_current(root).version == "v20250101-120000-3"
    for version_dir, vectors in ((first, a), (again, a), (other, b)):
        found, _ = ProductIndex.load(version_dir).search(vectors[[7]], 1)
        assert found[0, 0] == "p00007"
    # concurrent builds (threads of one process, as two processes would race): one version each
    done: list = []
    builds = [threading.Thread(target=lambda e=e: done.append(build_from_embeddings(e, tmp_path / "idx2",
                                                                                    IndexConfig(kind="flat"))[1]))
              for e in (tmp_path / "a", tmp_path / "b")]
    for t in builds:
        t.start()
    for t in builds:
        t.join()
    assert sorted(p.name for p in done) == ["v20250101-120000", "v20250101-120000-2"]
