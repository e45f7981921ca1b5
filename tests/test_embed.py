"""embed: every product exactly once, equal to encoding it alone; resume after a kill; incremental."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from itemsage import artifacts, schema
from itemsage.artifacts import ArtifactError
from itemsage.data.text import Vocabulary
from itemsage.embed import shards as embed_mod
from itemsage.embed.shards import embed, embed_batch
from itemsage.index.build import read_embeddings
from itemsage.model.batch import featurize
from itemsage.model.config import model_config
from itemsage.model.model import load_model, save_model
from itemsage.model.tower import ItemSage, QueryAdapters

IMAGE_DIM = 8
WORDS = "oak pine wood chair table lamp red blue green soft linen wool cotton small large modern rustic".split()


def make_products(n: int, seed: int = 0) -> list[dict]:
    """Products in the dataset format (list<string> text fields, image vectors, content_hash)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {schema.PRODUCT_ID: f"p{i:04d}"}
        for field in schema.TEXT_FIELDS:
            k = int(rng.integers(0, 4))  # some fields empty
            row[field] = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(min(k, 2))]
        m = int(rng.integers(0, 4))  # 0..3 images: batches mix image counts
        row[schema.IMAGE_EMBEDDINGS] = rng.standard_normal((m, IMAGE_DIM)).astype(np.float32).tolist()
        rows.append(with_hash(row))
    return rows


def with_hash(row: dict) -> dict:
    row = {k: v for k, v in row.items() if k != schema.CONTENT_HASH}
    blob = json.dumps(row, sort_keys=True).encode()
    return {**row, schema.CONTENT_HASH: hashlib.sha256(blob).hexdigest()}


def write_dataset(directory: Path, rows: list[dict]) -> Path:
    fields = [pa.field(schema.PRODUCT_ID, pa.string())]
    fields += [pa.field(f, pa.list_(pa.string())) for f in schema.TEXT_FIELDS]
    fields += [pa.field(schema.IMAGE_EMBEDDINGS, pa.list_(pa.list_(pa.float32()))),
               pa.field(schema.CONTENT_HASH, pa.string())]
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    directory.mkdir(parents=True, exist_ok=True)
    for name in list(directory.iterdir()):
        name.unlink()
    # Small row groups, so a resumed run really seeks past complete shards.
    artifacts.atomic_write_parquet(directory / schema.PRODUCTS_FILE, table, row_group_size=7)
    artifacts.write_manifest(directory, "dataset", counts={"products": len(rows)})
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = model_config("tiny")
    vocab = Vocabulary.build(v for row in make_products(60) for f in schema.TEXT_FIELDS for v in [row[f]])
    tower = ItemSage(cfg, len(vocab), IMAGE_DIM)
    adapters = QueryAdapters({"search": 384}, cfg.out_dim)
    directory = tmp_path_factory.mktemp("model")
    save_model(directory, tower, adapters, cfg, vocab, image_dim=IMAGE_DIM, query_dims={"search": 384})
    return directory


def read_out(out_dir: Path) -> tuple[list[str], np.ndarray]:
    ids, vectors, _ = read_embeddings(out_dir)
    return list(ids), vectors


def one_at_a_time(model_dir: Path, rows: list[dict]) -> np.ndarray:
    """Reference: each product featurised and encoded alone, straight through the tower."""
    model = load_model(model_dir)
    table = pa.Table.from_pylist(rows)
    out = []
    for i in range(len(rows)):
        batch = featurize(table.slice(i, 1), model.vocab, model.config.text_fields, model.config.max_images,
                          model.image_dim)
        with torch.no_grad():
            out.append(model.tower(batch).numpy()[0])
    return np.stack(out)


def test_every_product_once_equal_to_encoding_it_alone(tmp_path, model_dir):
    rows = make_products(23)
    data = write_dataset(tmp_path / "data", rows)
    summary = embed(model_dir, data, tmp_path / "emb", batch_size=4, shard_rows=10, progress=False)
    assert (summary.count, summary.dim, summary.shards, summary.embedded) == (23, 16, 3, 23)
    ids, vectors = read_out(tmp_path / "emb")
    assert ids == [r[schema.PRODUCT_ID] for r in rows]  # catalog order, each id once
    np.testing.assert_allclose(vectors, one_at_a_time(model_dir, rows), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    manifest = artifacts.verify_manifest(tmp_path / "emb", kind="embeddings")
    assert manifest["inputs"] == {"model": artifacts.fingerprint(model_dir), "dataset": artifacts.fingerprint(data)}
    assert manifest["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.ParquetFile(tmp_path / "emb" / s).metadata.num_rows for s in manifest["shards"]] == [10, 10, 3]
    shard = pq.read_table(tmp_path / "emb" / "part-00001.parquet")
    assert shard.schema.field("vector").type == pa.list_(pa.float32(), 16)
    assert shard.column(schema.CONTENT_HASH).to_pylist() == [r[schema.CONTENT_HASH] for r in rows[10:20]]
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["manifest.json", *manifest["shards"]]
    # A second run over the finished directory has nothing to do.
    again = embed(model_dir, data, tmp_path / "emb", batch_size=4, shard_rows=10, progress=False)
    assert again.embedded == 0 and again.count == 23


def test_embed_batch_is_pure_and_engine_agnostic(model_dir):
    rows = make_products(9, seed=3)
    model = load_model(model_dir)
    table = pa.Table.from_pylist(rows)
    whole = embed_batch(model, table)
    as_record_batch = embed_batch(model, table.to_batches()[0])
    parts = pa.concat_tables([embed_batch(model, table.slice(0, 4)), embed_batch(model, table.slice(4))])
    for other in (as_record_batch, parts):
        assert other.column("product_id").to_pylist() == whole.column("product_id").to_pylist()
        np.testing.assert_allclose(np.stack(other.column("vector").to_pylist()),
                                   np.stack(whole.column("vector").to_pylist()), atol=1e-5)
    assert embed_batch(model, table.slice(0, 0)).num_rows == 0


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("kill", ["after_shard_1", "after_shard_2", "mid_shard"])
def test_resume_after_kill(tmp_path, model_dir, monkeypatch, kill):
    rows = make_products(37, seed=1)
    data = write_dataset(tmp_path / "data", rows)
    reference = embed(model_dir, data, tmp_path / "ref", batch_size=4, shard_rows=8, progress=False)
    ref_ids, ref_vectors = read_out(tmp_path / "ref")

    calls = []
    if kill.startswith("after_shard"):
        limit = int(kill[-1])

        def hook(shard):
            calls.append(shard)
            if len(calls) == limit:
                raise Killed

        monkeypatch.setattr(embed_mod, "_after_shard", hook)
    else:
        real = embed_mod.embed_batch

        def flaky(model, batch, *graph):
            calls.append(batch.num_rows)
            if len(calls) == 5:  # inside shard 2 (rows 16..23): batches 0-1, 2-3, then 4
                raise Killed
            return real(model, batch, *graph)

        monkeypatch.setattr(embed_mod, "embed_batch", flaky)
    with pytest.raises(Killed):
        embed(model_dir, data, tmp_path / "emb", batch_size=4, shard_rows=8, progress=False)
    assert not (tmp_path / "emb" / "manifest.json").exists()
    monkeypatch.undo()

    counted = []
    real = embed_mod.embed_batch
    monkeypatch.setattr(embed_mod, "embed_batch", lambda m, b, *g: counted.append(b.num_rows) or real(m, b, *g))
    summary = embed(model_dir, data, tmp_path / "emb", batch_size=4, shard_rows=8, progress=False)
    complete = {"after_shard_1": 1, "after_shard_2": 2, "mid_shard": 2}[kill]
    assert summary.skipped_shards == complete
    assert sum(counted) == summary.embedded == 37 - 8 * complete  # complete shards are not redone
    ids, vectors = read_out(tmp_path / "emb")
    assert len(ids) == len(set(ids)) == 37 and ids == ref_ids
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-6)
    assert reference.embedded == 37
    assert not any(p.name.endswith(".tmp") or p.name == "progress.json" for p in (tmp_path / "emb").iterdir())


@pytest.mark.slow
def test_resume_after_real_sigkill_at_random_points(tmp_path, model_dir):
    # Enough shards that a quiet machine cannot finish between kills: at 600 products (15 shards) and
    # kills up to 0.3 s after a shard, a fast run ended after 2 kills and the test failed its own bar.
    rows = make_products(1500, seed=5)
    data = write_dataset(tmp_path / "data", rows)
    embed(model_dir, data, tmp_path / "ref", batch_size=16, shard_rows=40, progress=False)
    code = ("import sys; from itemsage.embed.shards import embed; "
            "embed(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=16, shard_rows=40, progress=False)")
    out = tmp_path / "emb"
    argv = [sys.executable, "-c", code, str(model_dir), str(data), str(out)]
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(30):
        shards_before = len(list(out.glob("part-*.parquet")))
        proc = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"})
        # Wait until this run completes a shard (or ends), then kill it at a random moment after.
        while proc.poll() is None and len(list(out.glob("part-*.parquet"))) <= shards_before:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.1)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0
        break
    else:
        subprocess.run(argv, check=True)
    ids, vectors = read_out(out)
    ref_ids, ref_vectors = read_out(tmp_path / "ref")
    assert kills >= 3
    assert len(ids) == len(set(ids)) == 1500 and ids == ref_ids
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-6)


def test_incremental_reembeds_only_changed_and_new(tmp_path, model_dir, monkeypatch):
    rows = make_products(30, seed=2)
    data = write_dataset(tmp_path / "data", rows)
    embed(model_dir, data, tmp_path / "emb", batch_size=4, shard_rows=8, progress=False)

    changed = [dict(r) for r in rows]
    changed[11]["title"] = ["brand new title"]
    changed[11] = with_hash(changed[11])
    del changed[20]  # removed from the catalog
    changed.append(make_products(31, seed=9)[-1] | {schema.PRODUCT_ID: "p-new"})
    changed[-1] = with_hash(changed[-1])
    write_dataset(data, changed)

    embedded_ids = []
    real = embed_mod.embed_batch
    monkeypatch.setattr(embed_mod, "embed_batch",
                        lambda m, b, *g: embedded_ids.extend(b.column("product_id").to_pylist()) or real(m, b, *g))
    summary = embed(model_dir, data, tmp_path / "emb", batch_size=4, shard_rows=8, incremental=True, progress=False)
    assert sorted(embedded_ids) == sorted(["p0011", "p-new"])
    assert (summary.embedded, summary.reused, summary.removed, summary.count) == (2, 28, 1, 30)
    monkeypatch.undo()

    embed(model_dir, data, tmp_path / "full", batch_size=4, shard_rows=8, progress=False)
    ids, vectors = read_out(tmp_path / "emb")
    full_ids, full_vectors = read_out(tmp_path / "full")
    assert ids == full_ids == [r[schema.PRODUCT_ID] for r in changed]
    np.testing.assert_allclose(vectors, full_vectors, atol=1e-5)
    manifest = artifacts.verify_manifest(tmp_path / "emb", kind="embeddings")
    assert manifest["generation"] == 1 and manifest["shards"][0] == "part-00000-g1.parquet"
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == sorted(manifest["shards"] + ["manifest.json"])


def test_refuses_to_mix_models_or_catalog_versions(tmp_path, model_dir):
    rows = make_products(12)
    data = write_dataset(tmp_path / "data", rows)
    embed(model_dir, data, tmp_path / "emb", batch_size=4, shard_rows=5, progress=False)

    torch.manual_seed(1)  # another model: same shape, other weights
    other = load_model(model_dir)
    for p in other.tower.parameters():
        torch.nn.init.normal_(p)
    save_model(tmp_path / "other", other.tower, other.adapters, other.config, other.vocab,
               image_dim=IMAGE_DIM, query_dims=other.query_dims)
    with pytest.raises(ArtifactError, match="never be mixed"):
        embed(tmp_path / "other", data, tmp_path / "emb", progress=False)

    # A partial run of the other model in a fresh directory, then the first model: refused too.
    class Stop(Exception):
        pass

    def stop(shard):
        raise Stop

    original = embed_mod._after_shard
    embed_mod._after_shard = stop
    try:
        with pytest.raises(Stop):
            embed(tmp_path / "other", data, tmp_path / "partial", batch_size=4, shard_rows=5, progress=False)
    finally:
        embed_mod._after_shard = original
    with pytest.raises(ArtifactError, match="partial run"):
        embed(model_dir, data, tmp_path / "partial", batch_size=4, shard_rows=5, progress=False)

    write_dataset(data, rows[:-1])  # the catalog changed: a plain run must not pretend it is current
    with pytest.raises(ArtifactError, match="--incremental"):
        embed(model_dir, data, tmp_path / "emb", progress=False)

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "part-00000.parquet").write_bytes(b"not ours")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        embed(model_dir, data, tmp_path / "foreign", progress=False)


def test_cli_embed_then_index(tmp_path, model_dir):
    from typer.testing import CliRunner

    from itemsage.cli import app
    from itemsage.index.versions import load_current

    rows = make_products(40, seed=4)
    data = write_dataset(tmp_path / "data", rows)
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(model_dir), str(data), "--out", str(tmp_path / "emb"),
                                 "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "40 products x 16 dims" in result.output
    result = runner.invoke(app, ["index", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--kind", "flat"])
    assert result.exit_code == 0, result.output
    index = load_current(tmp_path / "idx")
    ids, vectors = read_out(tmp_path / "emb")
    found, scores = index.search(vectors[:5], k=1)
    assert list(found[:, 0]) == ids[:5] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert index.manifest["inputs"]["model"] == artifacts.fingerprint(model_dir)
    result = runner.invoke(app, ["embed", str(model_dir), str(data), "--out", str(tmp_path / "x"), "--engine", "spark"])
    assert result.exit_code == 2 and "--engine" in result.output


@pytest.mark.slow
def test_embed_with_ray_matches_local(tmp_path, model_dir):
    pytest.importorskip("ray")
    from itemsage.embed.ray_engine import embed_with_ray

    rows = make_products(50, seed=6)
    data = write_dataset(tmp_path / "data", rows)
    summary = embed_with_ray(model_dir, data, tmp_path / "ray", batch_size=8, concurrency=1)
    embed(model_dir, data, tmp_path / "local", batch_size=8, progress=False)
    ids, vectors = read_out(tmp_path / "ray")
    local_ids, local_vectors = read_out(tmp_path / "local")
    assert summary.count == 50 and sorted(ids) == sorted(local_ids) and len(set(ids)) == 50
    order = np.argsort(ids)
    np.testing.assert_allclose(vectors[order], local_vectors[np.argsort(local_ids)], atol=1e-5)


def test_embed_with_ray_without_ray_says_how_to_install(tmp_path, model_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from itemsage.embed.ray_engine import embed_with_ray

    with pytest.raises(ImportError, match=r"itemsage\[ray\]"):
        embed_with_ray(model_dir, tmp_path, tmp_path / "out")


# ---- products' frozen query vectors: carried through embed into the index ------------------------


def write_dataset_with_queries(directory: Path, rows: list[dict], query: np.ndarray) -> Path:
    write_dataset(directory, rows)
    table = pq.read_table(directory / schema.PRODUCTS_FILE)
    table = table.append_column(pa.field(schema.QUERY_VECTOR, pa.list_(pa.float32())),
                                pa.array(query.tolist(), pa.list_(pa.float32())))
    artifacts.atomic_write_parquet(directory / schema.PRODUCTS_FILE, table, row_group_size=7)
    entry = {"source": "text", "fields": ["title"], "dim": query.shape[1]}
    artifacts.write_manifest(directory, "dataset", counts={"products": len(rows)}, extra={schema.PRODUCT_QUERY: entry})
    return directory


def test_query_vectors_round_trip_through_embed_and_index(tmp_path, model_dir):
    from itemsage.index.build import build_from_embeddings
    from itemsage.index.faiss_index import QUERY_VECTORS_FILE, ProductIndex
    from itemsage.index.query_vectors import NoProductQueries

    rows = make_products(23)
    query = np.random.default_rng(5).standard_normal((23, 6)).astype(np.float32)  # not unit: kept as given
    data = write_dataset_with_queries(tmp_path / "data", rows, query)
    embed(model_dir, data, tmp_path / "emb", batch_size=4, shard_rows=10, progress=False)
    shard = pq.read_table(tmp_path / "emb" / "part-00000.parquet")
    assert shard.schema.field(schema.QUERY_VECTOR).type == pa.list_(pa.float32(), 6)
    assert artifacts.read_manifest(tmp_path / "emb")[schema.PRODUCT_QUERY]["dim"] == 6

    index, version_dir = build_from_embeddings(tmp_path / "emb", tmp_path / "index", version="v1")
    assert QUERY_VECTORS_FILE in artifacts.read_manifest(version_dir)["files"]
    loaded = ProductIndex.load(version_dir)
    order = [5, 0, 22, 13]
    ids = [rows[i][schema.PRODUCT_ID] for i in order]
    for idx in (index, loaded):
        np.testing.assert_array_equal(idx.query_vector(ids), query[order])
        assert idx.query_vector([]).shape == (0, 6)
        with pytest.raises(KeyError, match="'nope'"):
            idx.query_vector(["nope"])
    assert loaded.product_query == {"source": "text", "fields": ["title"], "dim": 6}

    # A corrupted query-vector file is refused at load, like every other file of the version.
    path = version_dir / QUERY_VECTORS_FILE
    data_bytes = bytearray(path.read_bytes())
    data_bytes[-1] ^= 0xFF
    path.write_bytes(bytes(data_bytes))
    with pytest.raises(ArtifactError):
        ProductIndex.load(version_dir)

    # Embeddings made before query vectors: the index still builds and serves, query_vector says what to do.
    old = write_dataset(tmp_path / "old", rows)
    embed(model_dir, old, tmp_path / "emb-old", batch_size=4, shard_rows=10, progress=False)
    assert schema.QUERY_VECTOR not in pq.read_schema(tmp_path / "emb-old" / "part-00000.parquet").names
    old_index, old_dir = build_from_embeddings(tmp_path / "emb-old", tmp_path / "index", version="v0")
    with pytest.raises(NoProductQueries, match="re-run `itemsage ingest`, `itemsage embed` and `itemsage index`"):
        ProductIndex.load(old_dir).query_vector(ids)
    assert ProductIndex.load(old_dir).vector(ids).shape == (4, old_index.dim)
