"""evaluate ranks against the embeddings `embed` wrote (not the tower), refuses another model's
embeddings or index, and splits test pairs into seen / unseen in the train window."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train import make_dataset

from itemsage import artifacts, schema
from itemsage.artifacts import ArtifactError
from itemsage.evaluate.evaluation import evaluate
from itemsage.evaluate.inputs import seen_in_train


def write_embeddings(directory, ids, vectors, model_fp: str, dataset_fp: str = "d") -> None:
    """An embeddings directory in embed's format (one shard), written by hand."""
    from itemsage.embed.shards import _vectors_table, shard_name

    directory.mkdir(parents=True, exist_ok=True)
    table = _vectors_table(pa.array(ids, pa.string()), np.asarray(vectors, np.float32),
                           pa.array([None] * len(ids), pa.string()))
    pq.write_table(table, directory / shard_name(0))
    artifacts.write_manifest(directory, "embeddings", inputs={"model": model_fp, "dataset": dataset_fp},
                             counts={"products": len(ids)}, files=[shard_name(0)],
                             extra={"count": len(ids), "dim": int(np.shape(vectors)[1]), "shards": [shard_name(0)],
                                    "generation": 0})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from itemsage.model.model import load_model
    from itemsage.train.config import TrainConfig
    from itemsage.train.loop import train

    root = tmp_path_factory.mktemp("evalemb")
    dataset = make_dataset(root / "data")
    cfg = TrainConfig(preset="tiny", batch_size=16, random_negatives_ratio=2, max_steps=3, warmup_steps=1,
                      checkpoint_every=0, eval_sample=0, device="cpu", seed=1)
    model_dir = train(dataset, root / "run", cfg, progress=False).model_dir
    return root, dataset, model_dir, load_model(model_dir)


def test_evaluate_ranks_the_given_embeddings_exactly(trained, tmp_path):
    root, dataset, model_dir, loaded = trained
    ids = pq.read_table(dataset / schema.PRODUCTS_FILE)[schema.PRODUCT_ID].to_pylist()[::-1]  # another order
    vectors = np.random.default_rng(5).normal(size=(len(ids), loaded.config.out_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[3] = vectors[7]  # a tie: ranked pessimistically
    write_embeddings(tmp_path / "emb", ids, vectors, loaded.fingerprint)
    result = evaluate(model_dir, dataset, tmp_path / "emb", gallery=0)

    # the reference, by hand: every test pair's query through its surface's adapter, scored against
    # the hand-made vectors; rank = products scoring at least the engaged one's score, minus itself
    test = pq.read_table(dataset / schema.TEST_FILE)
    row_of = {pid: i for i, pid in enumerate(ids)}
    hits: dict[str, list[bool]] = {}
    for surface, engagement, pid, q in zip(test[schema.SURFACE].to_pylist(), test[schema.ENGAGEMENT].to_pylist(),
                                           test[schema.PRODUCT_ID].to_pylist(),
                                           test[schema.QUERY_EMBEDDING].to_pylist()):
        with torch.no_grad():
            query = loaded.adapters(surface, torch.tensor([q], dtype=torch.float32)).numpy()[0]
        scores = vectors @ query
        rank = int((scores >= scores[row_of[pid]] - 1e-6).sum()) - 1
        hits.setdefault(f"{surface}.{engagement}", []).append(rank < 10)
    for task, h in hits.items():
        assert result["exact"][task]["n"] == len(h)
        assert result["exact"][task]["recall@10"] == pytest.approx(np.mean(h)), task
    assert result["exact"]["all"]["recall@10"] == pytest.approx(np.mean([x for h in hits.values() for x in h]))

    # the tower's own vectors give other figures: evaluate read the file, it did not re-run the tower
    from itemsage.embed.shards import embed

    embed(model_dir, dataset, tmp_path / "tower", progress=False)
    own = evaluate(model_dir, dataset, tmp_path / "tower", gallery=0)
    assert own["data"]["embeddings_fingerprint"] != result["data"]["embeddings_fingerprint"]
    assert own["exact"]["all"]["recall@10"] != result["exact"]["all"]["recall@10"]


def test_evaluate_refuses_another_models_embeddings_and_index(trained, tmp_path):
    from itemsage.embed.shards import embed
    from itemsage.index.build import build_from_embeddings, read_embeddings
    from itemsage.index.config import IndexConfig

    _, dataset, model_dir, loaded = trained
    embed(model_dir, dataset, tmp_path / "emb", progress=False)
    ids, vectors, _ = read_embeddings(tmp_path / "emb")
    write_embeddings(tmp_path / "other", ids, vectors, "0123456789abcdef")  # same vectors, another model's stamp
    with pytest.raises(ArtifactError, match="embeddings of model 0123456789abcdef"):
        evaluate(model_dir, dataset, tmp_path / "other")
    build_from_embeddings(tmp_path / "other", tmp_path / "index", IndexConfig(kind="flat"))
    with pytest.raises(ArtifactError, match="built from embeddings of model 0123456789abcdef"):
        evaluate(model_dir, dataset, tmp_path / "emb", index_root=tmp_path / "index")
    # this model's own index is accepted, and flat search through it agrees with the exact ranking
    build_from_embeddings(tmp_path / "emb", tmp_path / "own-index", IndexConfig(kind="flat"))
    result = evaluate(model_dir, dataset, tmp_path / "emb", index_root=tmp_path / "own-index", gallery=0)
    assert result["data"]["index_from_these_embeddings"] is True
    assert result["ann"]["all"]["recall@10"] == pytest.approx(result["exact"]["all"]["recall@10"], abs=0.02)


def test_evaluate_refuses_embeddings_missing_a_test_product(trained, tmp_path):
    from itemsage.embed.shards import embed
    from itemsage.index.build import read_embeddings

    _, dataset, model_dir, loaded = trained
    embed(model_dir, dataset, tmp_path / "emb", progress=False)
    ids, vectors, _ = read_embeddings(tmp_path / "emb")
    engaged = set(pq.read_table(dataset / schema.TEST_FILE)[schema.PRODUCT_ID].to_pylist())
    keep = np.array([pid not in engaged for pid in ids])
    keep[np.flatnonzero(~keep)[1:]] = True  # drop one engaged product only
    write_embeddings(tmp_path / "short", ids[keep], vectors[keep], loaded.fingerprint)
    with pytest.raises(ValueError, match="does not hold every product of the test window"):
        evaluate(model_dir, dataset, tmp_path / "short")


def _log(rows):
    """A log table from (surface, query_text, query_embedding, product_id) tuples."""
    s, t, v, p = zip(*rows)
    return pa.table({schema.SURFACE: list(s), schema.PRODUCT_ID: list(p),
                     schema.QUERY_TEXT: pa.array(list(t), pa.string()),
                     schema.QUERY_EMBEDDING: pa.array(list(v), pa.list_(pa.float32()))})


def test_seen_and_unseen_on_a_hand_built_log():
    train = _log([
        ("search", "oak chair", None, "p1"),
        ("search", "lamp", [0.5, 0.25], "p2"),  # a given vector: the query is the vector, not the text
        ("closeup", None, [1.0, 2.0], "p3"),
        ("home", None, [0.0, 1.0], "p4"),
    ])
    test = _log([
        ("search", "oak chair", None, "p1"),  # seen
        ("search", "oak chair", None, "p9"),  # same query, other product: unseen
        ("search", "lamp", None, "p2"),  # the text alone, where train had a vector: another query
        ("search", "other text", [0.5, 0.25], "p2"),  # the same vector: seen
        ("closeup", None, [1.0, 2.0], "p3"),  # seen
        ("closeup", None, [1.0, 2.5], "p3"),  # another vector: unseen
        ("home", None, [1.0, 2.0], "p3"),  # closeup's query and product on another surface: unseen
        ("home", None, [0.0, 1.0], "p4"),  # seen
    ])
    np.testing.assert_array_equal(seen_in_train(train, test), [True, False, False, True, True, False, False, True])


def test_evaluate_counts_seen_pairs_like_a_reference(trained):
    _, dataset, model_dir, _ = trained
    # the reference: (surface, query vector, product) triples of the train window, as plain tuples
    def triples(name):
        t = pq.read_table(dataset / name)
        return [(s, tuple(np.float32(q)), p) for s, q, p in zip(t[schema.SURFACE].to_pylist(),
                                                                t[schema.QUERY_EMBEDDING].to_pylist(),
                                                                t[schema.PRODUCT_ID].to_pylist())]
    train = set(triples(schema.TRAIN_FILE))
    expected = sum(t in train for t in triples(schema.TEST_FILE))
    assert 0 < expected < pq.read_metadata(dataset / schema.TEST_FILE).num_rows  # both kinds occur
    from itemsage.embed.shards import embed

    emb = dataset.parent / "seen-emb"
    embed(model_dir, dataset, emb, progress=False)
    result = evaluate(model_dir, dataset, emb, gallery=0)
    assert result["data"]["seen_pairs"] == expected == result["seen"]["exact"]["all"]["n"]
    assert result["unseen"]["exact"]["all"]["n"] == result["data"]["eval_pairs"] - expected


def test_evaluate_scores_the_validation_window_when_asked(trained, tmp_path):
    """window="validation": the validation window's pairs, ranked exactly as the test window's are
    (the reference by hand, as above); an unknown window is refused."""
    root, dataset, model_dir, loaded = trained
    ids = pq.read_table(dataset / schema.PRODUCTS_FILE)[schema.PRODUCT_ID].to_pylist()
    vectors = np.random.default_rng(6).normal(size=(len(ids), loaded.config.out_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_embeddings(tmp_path / "emb", ids, vectors, loaded.fingerprint)
    result = evaluate(model_dir, dataset, tmp_path / "emb", gallery=0, window="validation")
    valid = pq.read_table(dataset / schema.VALIDATION_FILE)
    assert len(valid) > 0 and result["data"]["window"] == "validation"
    assert result["data"]["eval_pairs"] == len(valid)
    row_of = {pid: i for i, pid in enumerate(ids)}
    hits = []
    for surface, pid, q in zip(valid[schema.SURFACE].to_pylist(), valid[schema.PRODUCT_ID].to_pylist(),
                               valid[schema.QUERY_EMBEDDING].to_pylist()):
        with torch.no_grad():
            query = loaded.adapters(surface, torch.tensor([q], dtype=torch.float32)).numpy()[0]
        scores = vectors @ query
        hits.append(int((scores >= scores[row_of[pid]] - 1e-6).sum()) - 1 < 10)
    assert result["exact"]["all"]["recall@10"] == pytest.approx(np.mean(hits))
    with pytest.raises(ValueError, match="window"):
        evaluate(model_dir, dataset, tmp_path / "emb", window="train")
