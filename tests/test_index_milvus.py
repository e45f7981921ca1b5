"""The Milvus backend end to end against Milvus Lite: the same answers as the faiss flat index.

Skipped when pymilvus / milvus-lite are not installed (`pip install itemsage[milvus]`); .ci/run
installs the extra, so CI runs these. Milvus Lite is a local file (`./x.db` URI): the same code
talks to a Milvus server or cluster when the URI is `http://host:19530`.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fastapi.testclient import TestClient  # noqa: E402
from test_index import clustered_vectors, ids_for, unit_vectors, write_embeddings  # noqa: E402
from test_serve import TOKEN, FakeImageEncoder, FakeTextEncoder, auth, brute_force, world  # noqa: E402,F401

from itemsage.artifacts import ArtifactError  # noqa: E402
from itemsage.index.faiss_index import ProductIndex  # noqa: E402
from itemsage.index.milvus import MilvusConfig, MilvusVersions, build_milvus, collection_name  # noqa: E402
from itemsage.index.recall import neighbour_recall
from itemsage.index.versions import VersionNotFound
from itemsage.serve import app as serve


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "catalog.db")


@pytest.fixture(scope="module")
def versions(milvus_uri):
    return MilvusVersions(milvus_uri, "shop")


def test_milvus_flat_equals_faiss_flat_and_hnsw_recall(tmp_path, versions):
    base = clustered_vectors(3000, 32, clusters=30, spread=0.6, seed=31)
    ids = ids_for(3000)
    write_embeddings(tmp_path / "emb", ids, base)
    rng = np.random.default_rng(32)
    queries = base[rng.choice(3000, 100, replace=False)] + 0.1 * unit_vectors(100, 32, seed=33)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    faiss_ids, faiss_scores = ProductIndex.build(ids, base, kind="flat").search(queries, 10)

    flat = build_milvus(tmp_path / "emb", versions.uri, "shop", MilvusConfig(index_type="FLAT", recall_sample=200),
                        version="flat", publish_it=False, client=versions._client)
    found, scores = flat.search(queries, 10)
    assert found.shape == (100, 10) and scores.dtype == np.float32
    assert neighbour_recall(found, faiss_ids) == 1.0  # the same recall as the faiss flat index: exact
    np.testing.assert_allclose(scores, faiss_scores, atol=1e-5)
    assert flat.stats["neighbour_recall_at_10"] == 1.0 and flat.manifest["count"] == 3000

    hnsw = build_milvus(tmp_path / "emb", versions.uri, "shop", MilvusConfig(recall_sample=200), version="hnsw",
                        publish_it=False, client=versions._client)
    assert neighbour_recall(hnsw.search(queries, 10)[0], faiss_ids) >= 0.95
    assert hnsw.stats["neighbour_recall_at_10"] >= 0.95  # measured against exact at build, kept in the manifest
    loaded = versions.load(versions.resolve("hnsw"))
    assert loaded.stats == hnsw.stats and loaded.config.index_type == "HNSW" and len(loaded) == 3000
    # Lookups and padding behave like ProductIndex.
    np.testing.assert_allclose(loaded.vector(["p00007", "p00002"]), base[[7, 2]], atol=1e-6)
    assert "p00007" in loaded and "nope" not in loaded
    with pytest.raises(KeyError, match="'nope'"):
        loaded.vector(["p00001", "nope"])
    with pytest.raises(ArtifactError, match="never overwritten"):
        build_milvus(tmp_path / "emb", versions.uri, "shop", version="hnsw", client=versions._client)


def test_padding_names_and_missing_versions(tmp_path, versions):
    write_embeddings(tmp_path / "emb", ids_for(4), unit_vectors(4, 8, seed=41))
    small = build_milvus(tmp_path / "emb", versions.uri, "tiny", MilvusConfig(index_type="FLAT"), version="v-1.0",
                         client=versions._client)
    assert small.collection == "tiny_v_1_0"
    found, scores = small.search(unit_vectors(2, 8, seed=42), 6)
    assert list(found[0, 4:]) == ["", ""] and np.all(np.isneginf(scores[:, 4:]))
    assert sorted(found[0, :4]) == ["p00000", "p00001", "p00002", "p00003"]
    tiny = MilvusVersions(versions.uri, "tiny", client=versions._client)
    assert tiny.resolve(None) == "tiny_v_1_0"  # published: the alias names it
    with pytest.raises(VersionNotFound, match="known versions: tiny_v_1_0"):
        tiny.resolve("v9")
    with pytest.raises(VersionNotFound, match="no alias 'nothing'"):
        MilvusVersions(versions.uri, "nothing", client=versions._client).resolve(None)
    with pytest.raises(ValueError, match="letters, digits"):
        collection_name("bad-name", "v1")


def test_serve_from_milvus_and_hot_swap_by_alias(world, versions, tmp_path):  # noqa: F811
    """The service over Milvus answers like brute force; swapping the alias + reload serves v2."""
    for version in ("v1", "v2"):
        write_embeddings(tmp_path / version, world["ids"].astype(object), world["vectors"][version], world["fp"])
    build_milvus(tmp_path / "v1", versions.uri, "svc", MilvusConfig(index_type="FLAT"), version="v1",
                 client=versions._client)
    source = MilvusVersions(versions.uri, "svc", client=versions._client)
    app = serve.create_app(world["model_dir"], source, reload_token=TOKEN, max_k=50,
                           text_encoder=FakeTextEncoder(), image_encoder=FakeImageEncoder())
    ids = world["ids"]
    with TestClient(app) as c:
        for version in ("v1", "v2"):
            vectors = world["vectors"][version]
            want, want_scores = brute_force(vectors, ids, vectors[list(ids).index("p05")], 6, exclude={"p05"})
            r = c.post("/v1/closeup", json={"product_id": "p05", "k": 6, "product_to_product": True})
            assert r.status_code == 200, r.text
            assert r.json()["ids"] == want and r.json()["index_version"] == version
            np.testing.assert_allclose(r.json()["scores"], want_scores, atol=1e-5)
            if version == "v1":  # `itemsage index --backend milvus` of v2 swaps the alias ...
                build_milvus(tmp_path / "v2", versions.uri, "svc", MilvusConfig(index_type="FLAT"), version="v2",
                             client=versions._client)
                assert c.post("/v1/closeup", json={"product_id": "p05", "product_to_product": True}).json()["index_version"] == "v1"
                r = c.post("/admin/reload", headers=auth())  # ... and reload follows it
                assert r.status_code == 200 and r.json()["index_version"] == "v2", r.text
        r = c.post("/admin/reload", json={"version": "v7"}, headers=auth())
        assert r.status_code == 404 and "v7" in r.json()["detail"]
        ready = c.get("/readyz").json()
        assert ready["index_kind"] == "milvus" and ready["index_version"] == "v2" and ready["products"] == len(ids)


def test_cli_index_backend_milvus(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from itemsage.cli import app

    write_embeddings(tmp_path / "emb", ids_for(300), unit_vectors(300, 8, seed=51))
    uri = str(tmp_path / "cli.db")
    result = CliRunner().invoke(app, ["index", str(tmp_path / "emb"), "--backend", "milvus", "--uri", uri,
                                      "--collection", "cli", "--version", "v1", "--milvus-index", "FLAT"])
    assert result.exit_code == 0, result.output
    assert "recall@10 vs exact search: 1.0000" in result.output and "cli_v1" in result.output
    result = CliRunner().invoke(app, ["index", str(tmp_path / "emb"), "--backend", "milvus"])
    assert result.exit_code == 2 and "--uri" in result.output
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--backend", "milvus"])
    assert result.exit_code == 2 and "--uri" in result.output
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "--index is required" in result.output
    # `serve --backend milvus` hands the service a MilvusVersions on the alias (uvicorn itself is not started).
    calls = []
    monkeypatch.setattr(serve, "run", lambda model, source, **kw: calls.append((model, source)))
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--backend", "milvus", "--uri", uri,
                                      "--collection", "cli"])
    assert result.exit_code == 0, result.output
    (model, source), = calls
    assert isinstance(source, MilvusVersions) and source.resolve(None) == "cli_v1"


def test_milvus_keeps_the_products_query_vectors(tmp_path, versions):
    import pyarrow as pa

    from itemsage import artifacts
    from itemsage.index.query_vectors import NoProductQueries

    ids = ids_for(50)
    base = unit_vectors(50, 16, seed=41)
    query = np.random.default_rng(42).standard_normal((50, 6)).astype(np.float32)
    shards = []
    for n, (lo, hi) in enumerate([(0, 20), (20, 50)]):
        fixed = [pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].ravel(), pa.float32()), x.shape[1])
                 for x in (base, query)]
        shards.append(f"part-{n:05d}.parquet")
        artifacts.atomic_write_parquet(tmp_path / "emb" / shards[-1], pa.table(
            {"product_id": list(ids[lo:hi]), "vector": fixed[0], "query_vector": fixed[1]}))
    entry = {"source": "image", "fields": ["image_embeddings"], "dim": 6}
    artifacts.write_manifest(tmp_path / "emb", "embeddings", inputs={"model": "m1"}, files=shards,
                             extra={"count": 50, "dim": 16, "shards": shards, "product_query": entry})
    built = build_milvus(tmp_path / "emb", versions.uri, "shop", MilvusConfig(index_type="FLAT", recall_sample=20),
                         version="queries", publish_it=False, client=versions._client)
    loaded = versions.load(versions.resolve("queries"))
    for index in (built, loaded):
        np.testing.assert_allclose(index.query_vector(["p00031", "p00004", "p00031"]), query[[31, 4, 31]], atol=1e-6)
        assert index.query_vector([]).shape == (0, 6) and index.product_query == entry
        with pytest.raises(KeyError, match="'nope'"):
            index.query_vector(["nope"])
    # A version built from embeddings without query vectors says what to re-run.
    write_embeddings(tmp_path / "old", ids, base)
    old = build_milvus(tmp_path / "old", versions.uri, "shop", MilvusConfig(index_type="FLAT", recall_sample=20),
                       version="noqueries", publish_it=False, client=versions._client)
    with pytest.raises(NoProductQueries, match="re-run `itemsage ingest`"):
        old.query_vector(["p00001"])


# ---- filters in Milvus: the same language, its own plan ----------------------------------------------


def test_milvus_build_measures_the_hnsw_search_not_an_exact_one(tmp_path, versions):
    """Milvus Lite searches exactly in the process that inserted until the collection is loaded again:
    the recall the build records must be the HNSW index's (a sparse graph at ef 4 misses neighbours)."""
    from itemsage.index.milvus import measure_recall

    base = clustered_vectors(3000, 32, clusters=30, spread=0.6, seed=61)
    write_embeddings(tmp_path / "emb", ids_for(3000), base)
    config = MilvusConfig(recall_sample=300, ef_search=4, m=4, ef_construction=8)
    built = build_milvus(tmp_path / "emb", versions.uri, "sparse", config, version="v1", client=versions._client)
    assert built.stats["neighbour_recall_at_10"] < 0.97
    reopened = MilvusVersions(versions.uri, "sparse", client=versions._client)
    index = reopened.load(reopened.resolve(None))
    versions._client.release_collection(index.collection)
    versions._client.load_collection(index.collection)
    again = measure_recall(index, ids_for(3000), base / np.linalg.norm(base, axis=1, keepdims=True), config)
    assert again["neighbour_recall_at_10"] == pytest.approx(built.stats["neighbour_recall_at_10"], abs=0.02)


@pytest.mark.parametrize("index_type, exact_max_rows", [("FLAT", 10_000), ("HNSW", 10_000), ("HNSW", 150)])
def test_milvus_filters_equal_exact_filtered_search(tmp_path, versions, index_type, exact_max_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_filters import catalog, check_against_exact, exact, queries, table_of

    from itemsage import artifacts
    from itemsage.index.filters import FilterError

    ids, x, rows = catalog(1200, seed=3)
    dataset = tmp_path / "ds"
    dataset.mkdir()
    table = table_of(rows).add_column(0, "product_id", pa.array(list(ids), pa.string()))
    pq.write_table(table, dataset / "products.parquet")
    artifacts.write_manifest(dataset, "dataset", files=["products.parquet"])
    write_embeddings(tmp_path / "emb", ids, x)
    name = f"f{index_type.lower()}{exact_max_rows}"
    index = build_milvus(tmp_path / "emb", versions.uri, name,
                         MilvusConfig(index_type=index_type, recall_sample=100, exact_max_rows=exact_max_rows),
                         version="v1", client=versions._client, attributes=dataset)
    assert index.kinds["tags"] == "strings" and index.manifest["attributes"] == index.kinds
    q = queries(x, 6, seed=4)
    # Milvus's filter meaning is ours: every result passes; its scores are Milvus's own metric
    recalls = check_against_exact(index, x, rows, q, lambda passing: index_type == "FLAT" or passing <= exact_max_rows,
                                  index_type, check_scores=False)
    assert np.mean(recalls) >= 0.95
    nearest = exact(x, rows, q[0], 20, None)
    got = index.search(q[:1], 10, filter={"in_stock": True}, exclude=ids[nearest])[0][0]
    assert not set(got) & set(ids[nearest]) and len(got) == 10
    with pytest.raises(FilterError, match="filter column 'colour'.*Filterable columns: brand"):
        index.search(q[:1], 10, filter={"colour": "red"})
