"""Live updates (live.py and the admin routes): checked against brute force over a dict of products.

The reference is plain Python: a dict product id -> unit vector to which every upsert and delete is
applied; exact inner products over it give the expected top-k. The index must return the same ids
and scores (a flat version) or only live products with k results (HNSW), before and after a
restart, a reload and a compaction, and after a real server process is killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from itemsage.artifacts import ArtifactError, read_manifest
from itemsage.data.text import Vocabulary
from itemsage.index import live
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.live_log import LiveLog, delete_record, upsert_record
from itemsage.index.versions import current_version, load_current, publish, version_path
from itemsage.model.config import model_config
from itemsage.model.model import load_model, save_model
from itemsage.model.tower import ItemSage, QueryAdapters
from itemsage.serve import app as serve

DIM = 16
IMAGE_DIM = 8
QUERY_DIMS = {"search": 8, "closeup": IMAGE_DIM, "home": DIM}  # no 384-d search: MiniLM stays unloaded
TOKEN = "live-token"


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_root(root: Path, n: int, kind: str = "flat", seed: int = 0, model_fp: str | None = None, **build) -> dict:
    rng = np.random.default_rng(seed)
    ids = [f"p{i:03d}" for i in range(n)]
    vectors = unit(rng, n)
    index = ProductIndex.build(np.asarray(ids, dtype=object), vectors, kind=kind, **build)
    directory = version_path(root, "v1")
    index.save(directory, inputs={"model": model_fp} if model_fp else {})
    publish(root, directory)
    return dict(zip(ids, vectors))


def brute_force(products: dict, q: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    ids = list(products)
    scores = np.stack([products[p] for p in ids]) @ q  # [N]
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def upsert(pid: str, vector: np.ndarray) -> dict:
    return upsert_record(pid, vector, "m", {"product_id": pid})


# ---- the LiveIndex against brute force ---------------------------------------------------------------


def test_updates_match_brute_force_and_deletes_are_filtered_inside_the_search(tmp_path):
    products = make_root(tmp_path, 60)
    log = LiveLog(tmp_path)
    index = live.replay(load_current(tmp_path), log)
    rng = np.random.default_rng(1)
    q = unit(rng, 5)  # [5, D]
    # Delete the 10 nearest products of query 0: k=10 must still give 10, the next 10 by brute force.
    nearest, _ = brute_force(products, q[0], 10)
    index.apply(log.append([delete_record(p) for p in nearest]))
    for p in nearest:
        del products[p]
    ids, scores = index.search(q[:1], 10)
    want, want_scores = brute_force(products, q[0], 10)
    assert ids[0].tolist() == want
    np.testing.assert_allclose(scores[0], want_scores, atol=1e-5)
    # Upserts: new products, replacements of indexed ones, a replacement of an upsert, a delete of an upsert.
    new = unit(rng, 8)
    updates = [upsert(f"n{i}", new[i]) for i in range(4)]
    updates += [upsert("p020", new[4]), upsert("p021", new[5]), upsert("n0", new[6])]
    updates += [delete_record("n1")]
    index.apply(log.append(updates))
    for i in range(4):
        products[f"n{i}"] = new[i]
    products["p020"], products["p021"], products["n0"] = new[4], new[5], new[6]
    del products["n1"]
    for k in (1, 7, 30):
        ids, scores = index.search(q, k)
        for row in range(len(q)):
            want, want_scores = brute_force(products, q[row], k)
            assert ids[row].tolist() == want
            np.testing.assert_allclose(scores[row], want_scores, atol=1e-5)
    assert len(index) == len(products)
    assert "n1" not in index and nearest[0] not in index and "n0" in index and "p020" in index
    np.testing.assert_allclose(index.vector(["n0", "p020", "p030"]),
                               np.stack([products["n0"], products["p020"], products["p030"]]), atol=1e-6)
    with pytest.raises(KeyError, match="n1"):
        index.vector(["n1"])
    # A restart replays the log to the same state.
    again = live.replay(load_current(tmp_path), LiveLog(tmp_path))
    for a, b in zip(again.search(q, 30), index.search(q, 30)):
        np.testing.assert_array_equal(a, b)
    # A query of the updated product itself finds it first (the side vectors are searched).
    ids, scores = index.search(products["n0"][None], 3)
    assert ids[0, 0] == "n0" and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_hnsw_version_skips_hidden_rows_and_still_returns_k(tmp_path):
    products = make_root(tmp_path, 400, kind="hnsw")
    log = LiveLog(tmp_path)
    index = live.replay(load_current(tmp_path), log)
    rng = np.random.default_rng(2)
    q = unit(rng, 20)
    hidden = {p for row in range(len(q)) for p in brute_force(products, q[row], 5)[0]}  # the top 5 of each
    index.apply(log.append([delete_record(p) for p in sorted(hidden)]))
    ids, _ = index.search(q, 10)
    assert (ids != "").all(), "k results come back although the nearest rows are deleted"
    assert not hidden & set(ids.ravel().tolist())
    for p in hidden:
        del products[p]
    truth = [set(brute_force(products, q[row], 10)[0]) for row in range(len(q))]
    recall = np.mean([len(truth[r] & set(ids[r].tolist())) / 10 for r in range(len(q))])
    assert recall >= 0.9, recall


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_one_query_search_is_the_batch_search_without_padding(tmp_path, kind):
    """`search_one` (the service's path for one request) returns what `search` returns for the same
    query, less the '' / -inf padding: on the version alone, with deleted rows, with live upserts
    (a replaced one and a deleted one among them), and for k past the catalog's size; and one
    closeup query through `top_k_excluding` gets the same results as in a batch with another."""
    from itemsage.index import by_product

    products = make_root(tmp_path, 40, kind=kind)
    log = LiveLog(tmp_path)
    base = load_current(tmp_path)
    index = live.replay(base, log)
    rng = np.random.default_rng(4)
    q = unit(rng, 6)

    def same(idx):
        for row in q:
            for k in (1, 7, 40, 60):
                ids, scores = idx.search(row[None], k)
                found = ids[0] != ""
                one_ids, one_scores = idx.search_one(row, k)
                assert one_ids == ids[0][found].tolist() and one_scores == scores[0][found].tolist(), (k,)
                assert all(type(s) is float for s in one_scores) and len(one_ids) == min(k, len(idx))

    same(base)
    same(index)
    nearest = brute_force(products, q[0], 8)[0]
    index.apply(log.append([delete_record(p) for p in nearest]))  # hidden rows: a faiss selector
    same(index)
    new = unit(rng, 3)
    index.apply(log.append([upsert("n0", new[0]), upsert("n1", new[1]), upsert("p010", new[2]),
                            upsert("n0", q[1]), delete_record("n1")]))  # dead side rows too
    assert len(index) == 40 - len(set(nearest) - {"p010"}) + 1  # n0 added, p010 replaced (or back)
    same(index)
    one = by_product.top_k(index, q[:1], [3, 10], [{"n0", "p011"}])
    batch = by_product.top_k(index, q[:2], [3, 10], [{"n0", "p011"}, set()])
    assert one == batch[:1] and len(one[0][1][0]) == 10 and "n0" not in one[0][1][0]
    # the excluded ids are left out inside the search: the same as the search's own exclude
    ids, _ = index.search(q[:1], 10, exclude=["n0", "p011"])
    assert one[0][1][0] == ids[0].tolist()


def test_log_survives_a_torn_tail_and_refuses_damage(tmp_path):
    make_root(tmp_path, 10)
    log = LiveLog(tmp_path)
    records = log.append([delete_record("p001"), delete_record("p002")])
    assert [r["seq"] for r in records] == [1, 2]
    with open(log.path, "ab") as f:  # a kill in the middle of an append: no newline, never acknowledged
        f.write(b'{"seq": 3, "op": "delete", "id": "p0')
    log.close()  # the killed process's lock goes with it
    fresh = LiveLog(tmp_path)  # a restarted process
    assert [r["id"] for r in fresh.read()[0]] == ["p001", "p002"]
    records = fresh.append([delete_record("p003")])
    assert records[0]["seq"] == 3
    assert [r["id"] for r in fresh.read()[0]] == ["p001", "p002", "p003"]
    assert log.path.read_bytes().endswith(b"\n")
    lines = log.path.read_bytes().splitlines()
    log.path.write_bytes(b"\n".join([lines[0], b"garbage", lines[2]]) + b"\n")
    with pytest.raises(ArtifactError, match="line 2"):
        LiveLog(tmp_path).read()


def test_one_writer_per_index_root(tmp_path):
    make_root(tmp_path, 10)
    first, second = LiveLog(tmp_path), LiveLog(tmp_path)
    first.append([delete_record("p001")])
    with pytest.raises(ArtifactError, match="another server process"):
        second.append([delete_record("p002")])


def test_compaction_folds_the_log_and_keeps_later_updates(tmp_path):
    products = make_root(tmp_path, 50)
    log = LiveLog(tmp_path)
    rng = np.random.default_rng(3)
    new = unit(rng, 3)
    log.append([upsert("n0", new[0]), upsert("p005", new[1]), delete_record("p006")])
    products.update({"n0": new[0], "p005": new[1]})
    del products["p006"]
    q = unit(rng, 4)
    before = live.replay(load_current(tmp_path), log)
    before_ids, before_scores = before.search(q, 10)

    index, version_dir, folded = live.compact(tmp_path, version="v2")
    assert folded == 3 and len(index) == len(products) == 50
    assert current_version(tmp_path) == version_dir
    assert read_manifest(version_dir, "index")["live_seq"] == 3
    assert live.compact(tmp_path, version="v3") is None  # nothing new to fold
    after = live.replay(load_current(tmp_path), LiveLog(tmp_path))
    assert after.info()["upserted"] == 0 and after.info()["hidden"] == 0  # all inside the version now
    ids, scores = after.search(q, 10)
    np.testing.assert_array_equal(ids, before_ids)
    np.testing.assert_allclose(scores, before_scores, atol=1e-5)
    # Updates after the compaction are replayed on top of it; the old version cannot be served any more.
    log.append([delete_record("n0")], floor=3)
    after = live.replay(load_current(tmp_path), LiveLog(tmp_path))
    assert "n0" not in after and after.applied_seq == 4
    from itemsage.index.faiss_index import ProductIndex as PI

    with pytest.raises(ArtifactError, match="compacted through update 3"):
        live.replay(PI.load(version_path(tmp_path, "v1")), LiveLog(tmp_path))


# ---- through HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("live-model")
    torch.manual_seed(0)
    cfg = model_config("tiny", dropout=0.0)
    assert cfg.out_dim == DIM
    vocab = Vocabulary.build([["red oak chair"], ["blue linen sofa"], ["brass lamp"]])
    save_model(base / "model", ItemSage(cfg, len(vocab), IMAGE_DIM), QueryAdapters(QUERY_DIMS, cfg.out_dim, cfg.adapter),
               cfg, vocab, image_dim=IMAGE_DIM, query_dims=QUERY_DIMS)
    return base / "model"


def product(pid: str, title: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"product_id": pid, "title": title, "image_embeddings": rng.standard_normal((1, IMAGE_DIM)).tolist()}


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_upsert_and_delete_through_the_api(model_dir, tmp_path):
    fp = load_model(model_dir).fingerprint
    products = make_root(tmp_path, 40, model_fp=fp)
    app = serve.create_app(model_dir, tmp_path, reload_token=TOKEN)
    with TestClient(app) as c:
        body = {"products": [product("new-1", "red oak chair", 1), product("p007", "brass lamp", 2)]}
        assert c.post("/admin/products", json=body).status_code == 401
        assert c.post("/admin/products", json=body, headers=auth("nope")).status_code == 403
        assert c.post("/admin/products", json={"products": [{"title": "x"}]}, headers=auth()).status_code == 422
        assert c.post("/admin/products", json={"products": [product("a", "x", 1)] * 2},
                      headers=auth()).status_code == 422
        r = c.post("/admin/products", json=body, headers=auth())
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == ["new-1", "p007"] and r.json()["products"] == 41
        # The served vector is the embed endpoint's vector of the same features.
        for p in body["products"]:
            products[p["product_id"]] = np.asarray(c.post("/v1/embed", json={"product": p}).json()["vector"],
                                                   dtype=np.float32)
        r = c.post("/v1/closeup", json={"product_id": "new-1", "k": 5, "exclude_self": False, "product_to_product": True})
        assert r.status_code == 200, r.text
        want, want_scores = brute_force(products, products["new-1"], 5)
        assert r.json()["ids"] == want and r.json()["ids"][0] == "new-1"
        np.testing.assert_allclose(r.json()["scores"], want_scores, atol=1e-5)
        # Delete: never returned again, and k results still come back.
        r = c.post("/admin/products/delete", json={"ids": ["new-1", "p003", "never-was"]}, headers=auth())
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == ["new-1", "p003"] and r.json()["unknown"] == ["never-was"]
        del products["new-1"], products["p003"]
        assert c.post("/v1/closeup", json={"product_id": "new-1"}).status_code == 404
        for pid in ("p007", "p010", "p020"):
            r = c.post("/v1/closeup", json={"product_id": pid, "k": 39, "exclude_self": False, "product_to_product": True})
            want, _ = brute_force(products, products[pid], 39)
            assert r.json()["ids"] == want
        r = c.post("/v1/home", json={"vectors": [products["p001"].tolist(), products["p002"].tolist()], "k": 5})
        assert r.status_code == 200 and not {"new-1", "p003"} & set(r.json()["ids"])
        assert c.post("/v1/home", json={"history": ["p003"]}).status_code == 404
        # A reload (same version) keeps the updates: they are replayed from the log.
        assert c.post("/admin/reload", headers=auth()).status_code == 200
        r = c.post("/v1/closeup", json={"product_id": "p007", "k": 39, "exclude_self": False, "product_to_product": True})
        assert r.json()["ids"] == brute_force(products, products["p007"], 39)[0]
        info = c.get("/readyz").json()
        assert info["products"] == len(products) == 39 and info["live_updates"]["applied_seq"] == 4


def test_updates_are_refused_without_a_token(model_dir, tmp_path):
    make_root(tmp_path, 10, model_fp=load_model(model_dir).fingerprint)
    with TestClient(serve.create_app(model_dir, tmp_path)) as c:
        r = c.post("/admin/products/delete", json={"ids": ["p001"]}, headers=auth())
        assert r.status_code == 403 and "disabled" in r.json()["detail"]


# ---- a real server process, killed with SIGKILL ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, root: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "ITEMSAGE_RELOAD_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join([str(Path(serve.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "itemsage.cli", "serve", "--model", str(model_dir), "--index",
                               str(root), "--port", str(port)], stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                              env=env)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        assert server.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise AssertionError("the server did not become ready:\n" + log_path.read_text())


@pytest.mark.slow  # two real server starts: ~10 s on a quiet machine, 30 s on a busy one
def test_updates_survive_kill_9(model_dir, tmp_path):
    make_root(tmp_path / "index", 30, model_fp=load_model(model_dir).fingerprint)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model_dir, tmp_path / "index", port, tmp_path / "server.log")
    try:
        r = httpx.post(f"{url}/admin/products", json={"products": [product("fresh", "blue linen sofa", 5)]},
                       headers=auth(), timeout=30)
        assert r.status_code == 200, r.text
        # Retrievable by the very next request, and p004 is deleted.
        hit = httpx.post(f"{url}/v1/closeup", json={"product_id": "fresh", "k": 3, "exclude_self": False, "product_to_product": True}).json()
        assert hit["ids"][0] == "fresh"
        assert httpx.post(f"{url}/admin/products/delete", json={"ids": ["p004"]}, headers=auth()).status_code == 200
        before = httpx.post(f"{url}/v1/closeup", json={"product_id": "p010", "k": 30, "exclude_self": False, "product_to_product": True}).json()
        assert "p004" not in before["ids"] and "fresh" in before["ids"] and len(before["ids"]) == 30
        server.send_signal(signal.SIGKILL)  # no shutdown handler runs
        server.wait(timeout=30)
        server = start_server(model_dir, tmp_path / "index", port, tmp_path / "server.log")
        after = httpx.post(f"{url}/v1/closeup", json={"product_id": "p010", "k": 30, "exclude_self": False, "product_to_product": True}).json()
        assert after["ids"] == before["ids"]
        np.testing.assert_allclose(after["scores"], before["scores"], atol=1e-6)
        assert httpx.post(f"{url}/v1/closeup", json={"product_id": "p004"}).status_code == 404
    finally:
        server.kill()
        server.wait(timeout=30)


# ---- the search path's query-vector cache ------------------------------------------------------------


class CountingTextEncoder:
    dim = QUERY_DIMS["search"]

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts, batch_size=64, progress=False):
        self.calls.append(list(texts))
        return unit(np.random.default_rng(len(texts[0])), len(texts), self.dim)


@pytest.mark.parametrize("query_batch", [1, 4])
def test_search_text_is_encoded_once_and_answers_as_the_vector_does(model_dir, tmp_path, query_batch):
    make_root(tmp_path, 30, model_fp=load_model(model_dir).fingerprint)
    encoder = CountingTextEncoder()
    app = serve.create_app(model_dir, tmp_path, text_encoder=encoder, query_cache=2, query_batch=query_batch)
    with TestClient(app) as c:
        first = c.post("/v1/search", json={"text": "red oak chair", "k": 5}).json()
        again = c.post("/v1/search", json={"text": "red oak chair", "k": 5}).json()
        by_vector = c.post("/v1/search", json={"vector": encoder.encode(["red oak chair"])[0].tolist(), "k": 5}).json()
    assert encoder.calls == [["red oak chair"], ["red oak chair"]]  # the search itself encoded it once
    assert first == again and first["ids"] == by_vector["ids"]
    np.testing.assert_allclose(first["scores"], by_vector["scores"], atol=1e-6)


def test_updates_of_another_model_are_refused(tmp_path):
    make_root(tmp_path, 10, model_fp="model-a")
    log = LiveLog(tmp_path)
    log.append([upsert_record("n0", np.ones(DIM, np.float32), "model-b", {"product_id": "n0"})])
    with pytest.raises(ArtifactError, match="model-b"):
        live.replay(load_current(tmp_path), log, "model-a")


def test_deletes_are_filtered_inside_an_ivfpq_search(tmp_path):
    # IVF-PQ re-ranks through faiss IndexRefine, which takes its own search parameters: a delete must
    # not break the search (it raised RuntimeError, a 500 in the service, before the fix).
    # Every list probed (nprobe is capped at nlist): the codes and their re-ranking are the only approximation.
    products = make_root(tmp_path, 1200, kind="ivfpq", nprobe=10_000)
    log = LiveLog(tmp_path)
    index = live.replay(load_current(tmp_path), log)
    q = unit(np.random.default_rng(2), 3)  # [3, D]
    nearest, _ = brute_force(products, q[0], 10)
    index.apply(log.append([delete_record(p) for p in nearest]))
    for p in nearest:
        del products[p]
    ids, scores = index.search(q, 10)
    assert not set(nearest) & set(ids.ravel().tolist())  # filtered inside the search
    assert np.all(ids != "") and np.all(np.isfinite(scores))  # still k results each
    for row in range(len(q)):  # approximate, re-ranked exactly: nearly the brute-force top 10
        want, _ = brute_force(products, q[row], 10)
        assert len(set(ids[row].tolist()) & set(want)) >= 8


# ---- products' frozen query vectors -------------------------------------------------------------------


def test_upserted_products_get_their_frozen_query_vector(model_dir, tmp_path):
    """An index with image-source query vectors: an upsert through the API logs the product's main image
    vector as its query vector; a replayed LiveIndex and a compaction serve it; a delete hides it."""
    fp = load_model(model_dir).fingerprint
    rng = np.random.default_rng(3)
    ids = [f"p{i:03d}" for i in range(30)]
    query = rng.standard_normal((30, IMAGE_DIM)).astype(np.float32)
    index = ProductIndex.build(np.asarray(ids, dtype=object), unit(rng, 30), kind="flat", query_vectors=query,
                               product_query={"source": "image", "fields": ["image_embeddings"], "dim": IMAGE_DIM})
    directory = version_path(tmp_path, "v1")
    index.save(directory, inputs={"model": fp})
    publish(tmp_path, directory)
    body = {"products": [product("new-1", "red oak chair", 1), product("p007", "brass lamp", 2)]}
    main = {p["product_id"]: np.asarray(p["image_embeddings"][0], np.float32) for p in body["products"]}
    app = serve.create_app(model_dir, tmp_path, reload_token=TOKEN)
    with TestClient(app) as c:
        assert c.post("/admin/products", json=body, headers=auth()).status_code == 200
        r = c.post("/admin/products", json={"products": [{"product_id": "bare", "title": "no image"}]}, headers=auth())
        assert r.status_code == 422 and "has no image" in r.json()["detail"]
        served = live.replay(load_current(tmp_path), LiveLog(tmp_path))  # what the log holds
        np.testing.assert_allclose(served.query_vector(["new-1", "p007", "p001"]),
                                   np.stack([main["new-1"], main["p007"], query[1]]), atol=1e-7)
        with pytest.raises(KeyError, match="'nope'"):
            served.query_vector(["nope"])
        assert c.post("/admin/products/delete", json={"ids": ["p001"]}, headers=auth()).status_code == 200
        served = live.replay(load_current(tmp_path), LiveLog(tmp_path))
        with pytest.raises(KeyError, match="'p001'"):
            served.query_vector(["p001"])

    new, _, _ = live.compact(tmp_path)
    compacted = load_current(tmp_path)
    np.testing.assert_allclose(compacted.query_vector(["new-1", "p007", "p002"]),
                               np.stack([main["new-1"], main["p007"], query[2]]), atol=1e-7)
    assert "p001" not in compacted and compacted.product_query["source"] == "image"


def test_a_live_index_without_query_vectors_says_to_rebuild(tmp_path):
    from itemsage.index.query_vectors import NoProductQueries

    make_root(tmp_path, 10)
    live_log = LiveLog(tmp_path)
    served = live.replay(load_current(tmp_path), live_log)
    served.apply(live_log.append([upsert("x", unit(np.random.default_rng(0), 1)[0])]))
    live_log.close()
    with pytest.raises(NoProductQueries, match="re-run `itemsage ingest`"):
        served.query_vector(["x"])


def test_logged_query_vectors_of_another_width_do_not_stop_the_replay(tmp_path):
    """The live log outlives index versions: upserts logged with 8-d query vectors (an image source),
    replayed onto a version whose query vectors are 4-d, still apply (the server starts, the products
    are searchable); only those products' query vectors are missing, with an error that says to upsert
    them again."""
    from itemsage.index.query_vectors import NoProductQueries

    rng = np.random.default_rng(0)
    make_root(tmp_path, 10, query_vectors=rng.standard_normal((10, 4)).astype(np.float32),
              product_query={"source": "image", "fields": ["image_embeddings"], "dim": 4})
    live_log = LiveLog(tmp_path)
    vector = unit(rng, 1)[0]
    live_log.append([upsert_record("x", vector, "m", {"product_id": "x"},
                                        rng.standard_normal(8).astype(np.float32))])
    live_log.close()
    served = live.replay(load_current(tmp_path), LiveLog(tmp_path))
    assert "x" in served and served.search(vector[None, :], 1)[0][0, 0] == "x"
    with pytest.raises(NoProductQueries, match="upsert it again"):
        served.query_vector(["x"])
    assert served.query_vector(["p001"]).shape == (1, 4)


def test_query_vectors_without_a_recorded_source_refuse_upserts_clearly(model_dir, tmp_path):
    """An index built through the Python API with query_vectors but no product_query has no source to
    compute an upserted product's query vector from: the upsert is refused as the index's problem
    (409, saying what to rebuild), not blamed on the request, and nothing is logged."""
    fp = load_model(model_dir).fingerprint
    rng = np.random.default_rng(4)
    ids = [f"p{i:03d}" for i in range(12)]
    index = ProductIndex.build(np.asarray(ids, dtype=object), unit(rng, 12), kind="flat",
                               query_vectors=rng.standard_normal((12, IMAGE_DIM)).astype(np.float32))
    directory = version_path(tmp_path, "v1")
    index.save(directory, inputs={"model": fp})
    publish(tmp_path, directory)
    app = serve.create_app(model_dir, tmp_path, reload_token=TOKEN)
    with TestClient(app) as c:
        r = c.post("/admin/products", json={"products": [product("new-1", "red oak chair", 1)]}, headers=auth())
        assert r.status_code == 409, r.text
        assert "no recorded source" in r.json()["detail"] and "product_query" in r.json()["detail"]
        assert c.post("/v1/closeup", json={"product_id": "new-1"}).status_code == 404


# ---- two servers on one index root: one writes the live log, the others follow it --------------------


def test_a_second_server_follows_the_live_log_and_takes_it_over(model_dir, tmp_path):
    """The first server started with a token writes the live log (/readyz says so); a second one
    follows it: it refuses updates with a 409 naming the writer, serves the writer's updates from its
    next request on, and once the writer has stopped, takes the log over on its next update."""
    make_root(tmp_path, 40, model_fp=load_model(model_dir).fingerprint)
    writer_app = serve.create_app(model_dir, tmp_path, reload_token=TOKEN)
    follower_app = serve.create_app(model_dir, tmp_path, reload_token=TOKEN)
    reader_app = serve.create_app(model_dir, tmp_path)  # no token: takes no updates, still follows

    def closeup(client, pid: str) -> httpx.Response:
        return client.post("/v1/closeup", json={"product_id": pid, "k": 39, "exclude_self": False,
                                                "product_to_product": True})

    with TestClient(follower_app) as b, TestClient(reader_app) as c:
        with TestClient(writer_app) as a:
            assert a.get("/readyz").json()["live_log"]["role"] == "writer"
            for client in (b, c):
                info = client.get("/readyz").json()["live_log"]
                assert info["role"] == "follower" and info["writer"]["pid"] == os.getpid()
            body = {"products": [product("new-1", "red oak chair", 1)]}
            refused = b.post("/admin/products", json=body, headers=auth())
            assert refused.status_code == 409, refused.text
            assert "follows the live log" in refused.json()["detail"] and f"pid {os.getpid()}" in refused.json()["detail"]
            assert a.post("/admin/products", json=body, headers=auth()).status_code == 200
            assert a.post("/admin/products/delete", json={"ids": ["p003"]}, headers=auth()).status_code == 200
            for client in (b, c):  # the very next request sees both updates, as the writer does
                assert closeup(client, "new-1").json()["ids"] == closeup(a, "new-1").json()["ids"]
                assert closeup(client, "new-1").json()["ids"][0] == "new-1"
                assert closeup(client, "p003").status_code == 404
                assert client.get("/readyz").json()["products"] == 40
        # the writer stopped: the follower with a token takes the log over on its next update
        r = b.post("/admin/products", json={"products": [product("new-2", "brass lamp", 2)]}, headers=auth())
        assert r.status_code == 200, r.text
        assert r.json()["seq"] == 3 and r.json()["products"] == 41
        assert b.get("/readyz").json()["live_log"]["role"] == "writer"
        assert closeup(c, "new-2").json()["ids"][0] == "new-2"  # the reader follows the new writer
    seqs = [int(line.split(b'"seq":')[1].split(b",")[0]) for line in (tmp_path / "live" / "log.jsonl").read_bytes().splitlines()]
    assert seqs == [1, 2, 3]


def test_a_follower_reads_only_what_was_appended(tmp_path):
    """read_new: the lines after the last position, none twice; a torn tail waits for its newline;
    a compaction's rewrite is read from the start, with its floor."""
    make_root(tmp_path, 10)
    writer, follower = LiveLog(tmp_path), LiveLog(tmp_path)
    assert follower.read_new(None) == ([], 0, None)
    writer.append([delete_record("p001"), delete_record("p002")])
    records, floor, position = follower.read_new(None)
    assert [r["seq"] for r in records] == [1, 2] and floor == 0
    assert follower.read_new(position)[0] == []
    with open(writer.path, "ab") as f:
        f.write(b'{"seq": 3, "op": "delete", "id": "p0')  # an append in progress
    records, _, later = follower.read_new(position)
    assert records == [] and later == position
    with open(writer.path, "ab") as f:
        f.write(b'03"}\n')
    records, _, position = follower.read_new(position)
    assert [(r["seq"], r["id"]) for r in records] == [(3, "p003")]
    writer.drop_through(2, "v2")  # a compaction: the file is replaced
    records, floor, _ = follower.read_new(position)
    assert [r["seq"] for r in records] == [3] and floor == 2


@pytest.mark.slow  # two real server starts
def test_two_server_processes_share_one_live_log(model_dir, tmp_path):
    make_root(tmp_path / "index", 30, model_fp=load_model(model_dir).fingerprint)
    ports = free_port(), free_port()
    first = start_server(model_dir, tmp_path / "index", ports[0], tmp_path / "first.log")
    second = start_server(model_dir, tmp_path / "index", ports[1], tmp_path / "second.log")
    a, b = (f"http://127.0.0.1:{p}" for p in ports)
    try:
        assert httpx.get(f"{a}/readyz").json()["live_log"]["role"] == "writer"
        info = httpx.get(f"{b}/readyz").json()["live_log"]
        assert info["role"] == "follower" and info["writer"]["pid"] == first.pid
        body = {"products": [product("fresh", "blue linen sofa", 5)]}
        assert httpx.post(f"{b}/admin/products", json=body, headers=auth(), timeout=30).status_code == 409
        assert httpx.post(f"{a}/admin/products", json=body, headers=auth(), timeout=30).status_code == 200
        hit = httpx.post(f"{b}/v1/closeup", json={"product_id": "fresh", "k": 3, "exclude_self": False,
                                                   "product_to_product": True}).json()
        assert hit["ids"][0] == "fresh"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        r = httpx.post(f"{b}/admin/products/delete", json={"ids": ["p004"]}, headers=auth(), timeout=30)
        assert r.status_code == 200 and r.json()["seq"] == 2
        assert httpx.get(f"{b}/readyz").json()["live_log"]["role"] == "writer"
    finally:
        for server in (first, second):
            server.kill()
            server.wait(timeout=30)


def test_the_upsert_answer_names_the_products_the_model_reads_nothing_of(model_dir, tmp_path):
    make_root(tmp_path, 10, model_fp=load_model(model_dir).fingerprint)
    with TestClient(serve.create_app(model_dir, tmp_path, reload_token=TOKEN)) as c:
        body = {"products": [product("a", "red oak chair", 1), {"product_id": "b", "title": "木製の椅子"},
                             {"product_id": "c", "title": "zzqxv qqvvw"}]}
        r = c.post("/admin/products", json=body, headers=auth())
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == ["a", "b", "c"] and r.json()["unreadable"] == ["b", "c"]


@pytest.mark.slow  # a real server start with the torch text encoder: ~15 s quiet, 40 s busy
def test_serve_quiet_prints_no_info_lines_and_no_bars(model_dir, tmp_path):
    """serve -q: no uvicorn INFO lines, no "Loading weights" bar when MiniLM loads; a warning still shows."""
    make_root(tmp_path / "index", 10, model_fp=load_model(model_dir).fingerprint)
    port, log_path = free_port(), tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(serve.__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None), env.pop("TQDM_DISABLE", None)
    server = subprocess.Popen([sys.executable, "-m", "itemsage.cli", "-q", "serve", "--model", str(model_dir),
                               "--index", str(tmp_path / "index"), "--port", str(port), "--query-encoder", "torch"],
                              stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env)
    try:
        end = time.monotonic() + 180
        while time.monotonic() < end:
            assert server.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embed", json={"product": {"title": "zzqxv"}}, timeout=30)
        assert r.status_code == 200 and r.json()["unreadable"] is True
    finally:
        server.terminate()
        server.wait(timeout=30)
    shown = log_path.read_text()
    assert "INFO" not in shown and "Loading weights" not in shown, shown
    assert "WARNING" in shown and "reads nothing of this product" in shown  # -q keeps the warnings
