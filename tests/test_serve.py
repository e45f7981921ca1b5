"""The candidate-generation service (docs/ARCHITECTURE.md): answers checked against numpy brute force.

A tiny random-init model is saved into a temp directory, a small hand-made catalog is embedded
with it, and flat (exact) indexes over those embeddings are published. Every retrieval endpoint must
return the ids and scores that brute-force inner products over the same vectors give; every bad
request must get a 4xx with a message and never a 5xx; reload must swap versions under load without
a failed request and refuse a corrupted version while the old one keeps serving.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from fastapi.testclient import TestClient

from itemsage.artifacts import ArtifactError
from itemsage.data.text import Vocabulary
from itemsage.index import home
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.versions import LocalVersions, publish, version_path
from itemsage.model.batch import featurize
from itemsage.model.config import model_config
from itemsage.model.model import load_model, save_model
from itemsage.model.tower import ItemSage, QueryAdapters
from itemsage.schema import TEXT_FIELDS
from itemsage.serve import app as serve
from itemsage.serve.bodies import MAX_HISTORY
from itemsage.serve.middleware import LATENCY_BUCKETS
from itemsage.serve.service import Service, _plain_adapters

IMAGE_DIM = 8
OUT_DIM = 16  # the tiny preset's embedding width
QUERY_DIMS = {"search": 384, "closeup": IMAGE_DIM, "home": OUT_DIM}
TOKEN = "s3cret-token"


# ---- fixtures: a tiny model, a hand-made catalog, two index versions -----------------------------


def catalog() -> list[dict]:
    """24 products: 4 kinds of furniture x 6 colours, 0-2 image vectors each."""
    rng = np.random.default_rng(7)
    kinds = [("chair", "oak", "woodco", "furniture > chairs"), ("table", "pine", "tablemakers", "furniture > tables"),
             ("lamp", "brass", "lumen", "lighting > lamps"), ("sofa", "linen", "softly", "furniture > sofas")]
    rows = []
    for k, (item, material, brand, category) in enumerate(kinds):
        for c, color in enumerate(["red", "blue", "green", "black", "white", "brown"]):
            i = 6 * k + c
            rows.append({
                "product_id": f"p{i:02d}",
                "title": [f"{color} {material} {item}"],
                "description": [f"a {color} {item} made of {material}"] if i % 2 else [],
                "brand": [brand],
                "colors": [color],
                "materials": [material],
                "category": [category],
                "image_embeddings": [rng.standard_normal(IMAGE_DIM).astype(np.float32).tolist()
                                     for _ in range(i % 3)],
            })
    return rows


def catalog_table(rows: list[dict]) -> pa.Table:
    columns = {"product_id": pa.array([r["product_id"] for r in rows], pa.string())}
    for field in TEXT_FIELDS:
        columns[field] = pa.array([r.get(field, []) for r in rows], pa.list_(pa.string()))
    columns["image_embeddings"] = pa.array([r["image_embeddings"] for r in rows],
                                           pa.list_(pa.list_(pa.float32())))
    return pa.table(columns)


def save_index(root, version: str, ids, vectors, model_fp: str | None, query_vectors=None) -> None:
    index = ProductIndex.build(np.asarray(ids, dtype=object), vectors, kind="flat", query_vectors=query_vectors,
                               product_query=None if query_vectors is None else {"source": "image"})
    directory = version_path(root, version)
    index.save(directory, inputs={"model": model_fp} if model_fp else {})
    publish(root, directory)


class FakeTextEncoder:
    """Deterministic text -> unit vector of width 384 (sha256 of the text seeds the draw)."""

    dim = 384

    def encode(self, texts, batch_size=256):
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


class FakeImageEncoder:
    """Files starting with b'IMG' become a vector seeded by their bytes; anything else is unreadable."""

    def __init__(self, dim: int = IMAGE_DIM) -> None:
        self.dim = dim

    def encode_paths(self, paths, batch_size=32, progress=True):
        vectors, errors = np.zeros((len(paths), self.dim), np.float32), []
        for i, p in enumerate(paths):
            data = open(p, "rb").read()
            if data.startswith(b"IMG"):
                seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
                vectors[i] = np.random.default_rng(seed).standard_normal(self.dim)
                errors.append(None)
            else:
                errors.append("cannot identify image file")
        return vectors, errors


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """model dir, index root with v1 (CURRENT) and v2, the catalog and each version's vectors."""
    base = tmp_path_factory.mktemp("serve")
    rows = catalog()
    table = catalog_table(rows)
    torch.manual_seed(0)
    cfg = model_config("tiny", dropout=0.0)
    vocab = Vocabulary.build(table.column(f).to_pylist()[i] for f in TEXT_FIELDS for i in range(len(rows)))
    tower = ItemSage(cfg, len(vocab), IMAGE_DIM)
    adapters = QueryAdapters(QUERY_DIMS, cfg.out_dim, cfg.adapter)
    model_dir = base / "model"
    fp = save_model(model_dir, tower, adapters, cfg, vocab, image_dim=IMAGE_DIM, query_dims=QUERY_DIMS)
    model = load_model(model_dir)
    with torch.no_grad():
        emb = model.tower(featurize(table, model.vocab, cfg.text_fields, cfg.max_images, IMAGE_DIM)).numpy()
    ids = [r["product_id"] for r in rows]
    root = base / "index"
    v2 = np.roll(emb, 5, axis=0)  # the same products with other vectors: other neighbours
    # Each product's frozen query vector (closeup width): a seeded stand-in for its main image vector.
    frozen = np.random.default_rng(11).standard_normal((len(ids), IMAGE_DIM)).astype(np.float32)
    save_index(root, "v2", ids, v2, fp, frozen)
    save_index(root, "v1", ids, emb, fp, frozen)  # published last: CURRENT = v1
    return {"model_dir": model_dir, "root": root, "rows": rows, "ids": np.array(ids), "model": model,
            "vectors": {"v1": emb, "v2": v2}, "fp": fp, "frozen": frozen}


@pytest.fixture(scope="module")
def client(world):
    app = serve.create_app(world["model_dir"], world["root"], reload_token=TOKEN, max_k=50,
                           text_encoder=FakeTextEncoder(), image_encoder=FakeImageEncoder())
    with TestClient(app) as c:
        yield c


def brute_force(vectors: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, exclude=()) -> tuple[list, list]:
    """Exact top-k by inner product, leaving out `exclude`."""
    scores = vectors @ q  # [N]
    order = [i for i in np.argsort(-scores, kind="stable") if ids[i] not in set(exclude)][:k]
    return ids[order].tolist(), scores[order].tolist()


def adapt(world, surface: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return world["model"].adapters(surface, torch.as_tensor(x, dtype=torch.float32)[None])[0].numpy()


def message(resp) -> str:
    body = resp.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    return body["detail"]


# ---- retrieval against brute force ---------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 24, 50])
def test_search_text_matches_brute_force(client, world, k):
    text = "red oak chair"
    q = adapt(world, "search", FakeTextEncoder().encode([text])[0])
    want_ids, want_scores = brute_force(world["vectors"]["v1"], world["ids"], q, k)
    r = client.post("/v1/search", json={"text": text, "k": k})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ids"] == want_ids  # k > 24 products: all of them, no padding
    np.testing.assert_allclose(body["scores"], want_scores, rtol=1e-5, atol=1e-5)
    assert body["scores"] == sorted(body["scores"], reverse=True)
    assert body["index_version"] == "v1"


def test_search_vector_matches_brute_force(client, world):
    x = np.random.default_rng(1).standard_normal(384)
    want_ids, want_scores = brute_force(world["vectors"]["v1"], world["ids"], adapt(world, "search", x), 7)
    r = client.post("/v1/search", json={"vector": x.tolist(), "k": 7})
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == want_ids
    np.testing.assert_allclose(r.json()["scores"], want_scores, rtol=1e-5, atol=1e-5)


def numpy_adapter(world, surface: str, x: np.ndarray) -> np.ndarray:
    """The surface's adapter by hand in numpy from the model's weights: unit input, W x, unit output."""
    layer = world["model"].adapters.maps[surface]
    w = layer.weight.detach().numpy().astype(np.float64) if hasattr(layer, "weight") else np.eye(len(x))
    x = np.asarray(x, np.float64) / np.linalg.norm(x)
    q = w @ x
    return q / np.linalg.norm(q)


def test_closeup_by_product_id_is_its_frozen_vector_through_the_adapter(client, world):
    """The trained path: the product's frozen query vector -> closeup adapter -> exact search, itself left out."""
    vectors, ids = world["vectors"]["v1"], world["ids"]
    for pid in ["p00", "p13", "p23"]:
        q = numpy_adapter(world, "closeup", world["frozen"][list(ids).index(pid)])
        want_ids, want_scores = brute_force(vectors, ids, q, 6, exclude={pid})
        r = client.post("/v1/closeup", json={"product_id": pid, "k": 6})
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == want_ids and pid not in r.json()["ids"]
        np.testing.assert_allclose(r.json()["scores"], want_scores, rtol=1e-5, atol=1e-5)
    r = client.post("/v1/closeup", json={"product_id": "p13", "k": 6, "exclude_self": False})
    q = numpy_adapter(world, "closeup", world["frozen"][13])
    assert r.json()["ids"] == brute_force(vectors, ids, q, 6)[0]
    r = client.post("/v1/closeup", json={"product_id": "p13", "k": 50})
    assert len(r.json()["ids"]) == 23 and "p13" not in r.json()["ids"]


def test_closeup_product_to_product_is_the_learned_vector_search(client, world):
    vectors, ids = world["vectors"]["v1"], world["ids"]
    for pid in ["p00", "p13", "p23"]:
        q = vectors[list(ids).index(pid)]
        want_ids, want_scores = brute_force(vectors, ids, q, 6, exclude={pid})
        r = client.post("/v1/closeup", json={"product_id": pid, "k": 6, "product_to_product": True})
        assert r.status_code == 200, r.text
        assert r.json()["ids"] == want_ids and pid not in r.json()["ids"]
        np.testing.assert_allclose(r.json()["scores"], want_scores, rtol=1e-5, atol=1e-5)
    # exclude_self=false: the product is its own nearest neighbour (cosine 1).
    r = client.post("/v1/closeup", json={"product_id": "p13", "k": 3, "exclude_self": False, "product_to_product": True})
    assert r.json()["ids"][0] == "p13" and abs(r.json()["scores"][0] - 1.0) < 1e-5
    r = client.post("/v1/closeup", json={"product_id": "p13", "k": 50, "product_to_product": True})
    assert len(r.json()["ids"]) == 23 and "p13" not in r.json()["ids"]
    r = client.post("/v1/closeup", json={"vector": [0.1] * IMAGE_DIM, "product_to_product": True})
    assert r.status_code == 422 and "product_id" in message(r)


def test_closeup_exclude_masks_ids_and_still_returns_k(client, world):
    vectors, ids = world["vectors"]["v1"], world["ids"]
    q = numpy_adapter(world, "closeup", world["frozen"][5])
    first = brute_force(vectors, ids, q, 10, exclude={"p05"})[0]
    seen = first[:7] + ["not-a-product"]  # an unknown id is ignored
    r = client.post("/v1/closeup", json={"product_id": "p05", "k": 10, "exclude": seen})
    assert r.status_code == 200, r.text
    want_ids, want_scores = brute_force(vectors, ids, q, 10, exclude={"p05", *seen})
    assert r.json()["ids"] == want_ids and len(want_ids) == 10 and not set(want_ids) & set(seen)
    np.testing.assert_allclose(r.json()["scores"], want_scores, rtol=1e-5, atol=1e-5)
    # The other closeup queries honour it too (a vector; the learned-vector search).
    x = np.random.default_rng(2).standard_normal(IMAGE_DIM)
    r = client.post("/v1/closeup", json={"vector": x.tolist(), "k": 10, "exclude": seen})
    assert r.json()["ids"] == brute_force(vectors, ids, adapt(world, "closeup", x), 10, exclude=seen)[0]
    r = client.post("/v1/closeup", json={"product_id": "p05", "k": 10, "exclude": seen, "product_to_product": True})
    assert r.json()["ids"] == brute_force(vectors, ids, vectors[5], 10, exclude={"p05", *seen})[0]


def test_product_queries_need_frozen_vectors_in_the_index(world, tmp_path):
    """An index built before products had frozen query vectors: a 409 that says to re-run; the learned-vector
    option still works; an unknown id is a 404."""
    save_index(tmp_path, "old", world["ids"].tolist(), world["vectors"]["v1"], world["fp"])
    with TestClient(serve.create_app(world["model_dir"], tmp_path)) as c:
        r = c.post("/v1/closeup", json={"product_id": "p01"})
        assert r.status_code == 409 and "re-run" in message(r) and "product_to_product" in message(r)
        r = c.post("/v1/home", json={"history": ["p01", "p02"]})
        assert r.status_code == 409 and "re-run" in message(r)
        r = c.post("/v1/closeup", json={"product_id": "p01", "product_to_product": True})
        assert r.status_code == 200
    app = serve.create_app(world["model_dir"], world["root"])
    with TestClient(app) as c:
        r = c.post("/v1/closeup", json={"product_id": "nope"})
        assert r.status_code == 404 and "nope" in message(r)
        # The world's index holds 8-d (closeup) frozen vectors; its home adapter takes 16-d: refused, said why.
        r = c.post("/v1/home", json={"history": ["p01", "p02"]})
        assert r.status_code == 409 and "8-d" in message(r) and "16-d" in message(r)


def test_closeup_by_vector_and_by_image(client, world, tmp_path):
    x = np.random.default_rng(2).standard_normal(IMAGE_DIM)
    want_ids, want_scores = brute_force(world["vectors"]["v1"], world["ids"], adapt(world, "closeup", x), 5)
    r = client.post("/v1/closeup", json={"vector": x.tolist(), "k": 5})
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == want_ids
    np.testing.assert_allclose(r.json()["scores"], want_scores, rtol=1e-5, atol=1e-5)

    data = b"IMG a picture of a red chair"
    (tmp_path / "query.img").write_bytes(data)
    image_vec, _ = FakeImageEncoder().encode_paths([tmp_path / "query.img"])
    want_ids, _ = brute_force(world["vectors"]["v1"], world["ids"], adapt(world, "closeup", image_vec[0]), 5)
    r = client.post("/v1/closeup", json={"image": base64.b64encode(data).decode(), "k": 5})
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == want_ids


def test_numpy_adapters_equal_the_models_torch_adapters(world):
    """The service applies plain adapters (bias-free Linear, identity) in numpy: same unit rows as torch."""
    service = Service(world["model_dir"], world["root"])
    assert set(service._adapter_maps) == {"search", "closeup", "home"}
    assert service._adapter_maps["home"] is None  # 16 -> 16 in auto mode: the identity
    rng = np.random.default_rng(3)
    for surface, width in QUERY_DIMS.items():
        x = rng.standard_normal((5, width)).astype(np.float32)
        np.testing.assert_allclose(service._adapt(surface, x), np.stack([adapt(world, surface, row) for row in x]),
                                   rtol=1e-6, atol=1e-6)
    # Anything else (here a Linear with a bias) is left to torch.
    odd = QueryAdapters({"search": 4}, OUT_DIM, "linear")
    odd.maps["search"] = torch.nn.Linear(4, OUT_DIM)
    assert _plain_adapters(odd) == {}


def _on_loop() -> bool:
    """True in the event loop's thread, False in a thread-pool thread (it has no running loop)."""
    import asyncio

    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _record_where(service, monkeypatch) -> list[bool]:
    """Wrap the service's search and closeup: each call appends whether it ran on the event loop."""
    seen: list[bool] = []
    for name in ("search", "closeup"):
        def recording(req, *args, original=getattr(service, name), **kwargs):
            seen.append(_on_loop())
            return original(req, *args, **kwargs)

        monkeypatch.setattr(service, name, recording)
    return seen


def test_cheap_requests_run_on_the_event_loop_and_slow_ones_in_the_pool(world, monkeypatch):
    """A product id, a vector or a cached text is answered on the event loop (no thread-pool hop); a
    new text (the text encoder) or an image goes to the thread pool, as does every request when the
    index is not local (a Milvus search is a network round trip)."""
    class Remote:  # a versions object without a local root, as index_milvus.MilvusVersions
        def __init__(self, root):
            self.local = LocalVersions(root)

        def resolve(self, version):
            return self.local.resolve(version)

        def load(self, target):
            return self.local.load(target)

    image = base64.b64encode(b"IMG a chair").decode()
    requests = [("/v1/search", {"text": "oak chair"}), ("/v1/search", {"text": "oak chair"}),
                ("/v1/search", {"vector": [1.0] * 384}), ("/v1/closeup", {"product_id": "p03"}),
                ("/v1/closeup", {"vector": [1.0] * IMAGE_DIM}), ("/v1/closeup", {"image": image})]
    for root, want in [(world["root"], [False, True, True, True, True, False]),
                       (Remote(world["root"]), [False] * 6)]:
        app = serve.create_app(world["model_dir"], root, text_encoder=FakeTextEncoder(),
                               image_encoder=FakeImageEncoder())
        seen = _record_where(app.state.service, monkeypatch)
        with TestClient(app) as c:
            for path, body in requests:
                assert c.post(path, json=body).status_code == 200
        assert seen == want


def test_slow_index_searches_stay_off_the_event_loop(world, tmp_path, monkeypatch):
    """A vector search or a closeup by id runs on the event loop only when the served index's search
    is cheap (HNSW in memory, or a small exact scan): an IVF-PQ version (its re-ranking reads the
    memory-mapped full vectors from disk) or an exact scan over many rows goes to the thread pool,
    decided per request, so a reload to such a version moves them there."""
    rng = np.random.default_rng(5)
    ids = np.array([f"p{i:02d}" for i in range(1200)], dtype=object)  # p03 is among them
    vectors = rng.standard_normal((len(ids), OUT_DIM)).astype(np.float32)
    root = tmp_path / "index"
    ivfpq = ProductIndex.build(ids, vectors, kind="ivfpq")
    ivfpq.save(version_path(root, "ivfpq"), inputs={"model": world["fp"]})
    publish(root, version_path(root, "ivfpq"))
    save_index(root, "flat", ids, vectors, world["fp"])  # CURRENT: a flat scan of 1,200 x 16
    app = serve.create_app(world["model_dir"], root, reload_token=TOKEN, text_encoder=FakeTextEncoder(),
                           image_encoder=FakeImageEncoder())
    seen = _record_where(app.state.service, monkeypatch)
    requests = [("/v1/search", {"vector": [1.0] * 384}), ("/v1/closeup", {"product_id": "p03", "product_to_product": True})]
    with TestClient(app) as c:
        for path, body in requests:  # a small exact scan: on the loop
            assert c.post(path, json=body).status_code == 200
        monkeypatch.setattr(serve, "FAST_EXACT_VALUES", 1_000, raising=False)  # now 1,200 x 16 values are too many
        for path, body in requests:
            assert c.post(path, json=body).status_code == 200
        r = c.post("/admin/reload", json={"version": "ivfpq"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        for path, body in requests:
            assert c.post(path, json=body).status_code == 200
    assert seen == [True, True, False, False, False, False]


def test_a_cached_text_evicted_meanwhile_is_encoded_in_the_pool(world, monkeypatch):
    """The search fast path checks the query cache, then reads it: a pool thread may evict the text in
    between. The text encoder must then run in the thread pool, never on the event loop."""
    import asyncio

    class Encoder(FakeTextEncoder):
        def __init__(self):
            self.on_loop = []

        def encode(self, texts, batch_size=256):
            try:
                asyncio.get_running_loop()
                self.on_loop.append(True)
            except RuntimeError:
                self.on_loop.append(False)
            return super().encode(texts, batch_size)

    encoder = Encoder()
    app = serve.create_app(world["model_dir"], world["root"], text_encoder=encoder, query_batch=1)
    cache = app.state.service.query_cache
    monkeypatch.setattr(type(cache), "__contains__", lambda self, text: True)  # "cached" at the check ...
    with TestClient(app) as c:  # ... and gone at the read
        r = c.post("/v1/search", json={"text": "oak chair"})
    assert r.status_code == 200, r.text
    assert encoder.on_loop == [False]


def test_closeup_image_encoder_width_must_match(world):
    app = serve.create_app(world["model_dir"], world["root"], image_encoder=FakeImageEncoder(dim=1280))
    with TestClient(app) as c:
        r = c.post("/v1/closeup", json={"image": base64.b64encode(b"IMG x").decode()})
    assert r.status_code == 400
    assert "1280" in message(r) and str(IMAGE_DIM) in message(r)


def test_embed_matches_the_indexed_vector_one_at_a_time(client, world):
    """The catalog was embedded as one padded batch; /v1/embed embeds one product alone."""
    for i in [0, 1, 2, 17]:  # 0, 1 and 2 images; with and without a description
        product = {k: v for k, v in world["rows"][i].items()}
        r = client.post("/v1/embed", json={"product": product})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["product_id"] == product["product_id"] and body["dim"] == OUT_DIM
        assert body["model_fingerprint"] == world["fp"]
        np.testing.assert_allclose(body["vector"], world["vectors"]["v1"][i], rtol=1e-4, atol=1e-5)
    # A string field is the same as a one-element list.
    product = dict(world["rows"][4], title=world["rows"][4]["title"][0])
    r = client.post("/v1/embed", json={"product": product})
    np.testing.assert_allclose(r.json()["vector"], world["vectors"]["v1"][4], rtol=1e-4, atol=1e-5)


def test_embed_endpoint_equals_the_python_api(client, world):
    """/v1/embed and itemsage.load(...).encode_products share ingest's checks: the same vectors."""
    import itemsage

    rows = [dict(world["rows"][i]) for i in (0, 1, 17)]
    api = itemsage.load(world["model_dir"]).encode_products(rows)  # [3, D]
    for row, want in zip(rows, api):
        r = client.post("/v1/embed", json={"product": row})
        np.testing.assert_allclose(r.json()["vector"], want, rtol=0, atol=1e-6)


# ---- home: PinnerSage clusters -------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped(world, tmp_path_factory):
    """An index of 4 well-separated groups of 8 products (around 4 orthogonal directions)."""
    rng = np.random.default_rng(3)
    ids, vectors = [], []
    for g in range(4):
        center = np.zeros(OUT_DIM)
        center[g] = 1.0
        for i in range(8):
            v = center + 0.05 * rng.standard_normal(OUT_DIM)  # cosine ~0.96 within a group
            ids.append(f"g{g}-{i}")
            vectors.append(v / np.linalg.norm(v))
    vectors = np.asarray(vectors, dtype=np.float32)
    root = tmp_path_factory.mktemp("grouped")
    # Frozen query vectors of the home width (the tiny model's home adapter is the identity): the same
    # directions, so the clusters below are the groups.
    save_index(root, "groups", ids, vectors, None, query_vectors=vectors)
    app = serve.create_app(world["model_dir"], root, text_encoder=FakeTextEncoder())
    with TestClient(app) as c:
        yield c, np.array(ids), vectors


def medoid(x: np.ndarray) -> int:
    """Brute force: the row with the smallest summed distance to the others."""
    return int(np.argmin([sum(np.linalg.norm(a - b) for b in x) for a in x]))


def test_home_two_interests_give_candidates_from_both(grouped):
    c, ids, vectors = grouped
    history = ["g0-0", "g0-1", "g0-2", "g2-0", "g2-1", "g2-2"]
    r = c.post("/v1/home", json={"history": history, "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [cl["size"] for cl in body["clusters"]] == [3, 3]
    assert sorted(cl["members"] for cl in body["clusters"]) == [[0, 1, 2], [3, 4, 5]]
    # Reference: each group's medoid, top-5 each (k split 5/5), history excluded.
    want, best = set(), {}
    for members in ([0, 1, 2], [3, 4, 5]):
        hv = vectors[[list(ids).index(history[m]) for m in members]]
        q = hv[medoid(hv)]
        assert history[members[medoid(hv)]] in {history[cl["medoid"]] for cl in body["clusters"]}
        top, _ = brute_force(vectors, ids, q, 5, exclude=history)
        want |= set(top)
        for pid, s in zip(ids, vectors @ q):
            best[pid] = max(best.get(pid, -9), float(s))
    assert set(body["ids"]) == want
    assert {p[:2] for p in body["ids"]} == {"g0", "g2"}
    assert not set(body["ids"]) & set(history)
    np.testing.assert_allclose(body["scores"], [best[p] for p in body["ids"]], rtol=1e-5, atol=1e-5)
    assert body["scores"] == sorted(body["scores"], reverse=True)


def test_home_importance_splits_k_by_cluster_size(grouped):
    c, ids, vectors = grouped
    history = ["g1-0", "g1-1", "g1-2", "g1-3", "g3-0", "g3-1"]  # sizes 4 + 2 -> k = 6 split 4 + 2
    body = c.post("/v1/home", json={"history": history, "k": 6}).json()
    assert [cl["size"] for cl in body["clusters"]] == [4, 2]
    assert [cl["importance"] for cl in body["clusters"]] == pytest.approx([4 / 6, 2 / 6])
    assert sorted(p[:2] for p in body["ids"]) == ["g1"] * 4 + ["g3"] * 2
    assert body["cluster_of"] == [0 if p.startswith("g1") else 1 for p in body["ids"]]


def test_home_small_history_is_one_cluster_and_vectors_use_the_adapter(grouped, world):
    c, ids, vectors = grouped
    body = c.post("/v1/home", json={"history": ["g0-0", "g3-0"], "k": 4}).json()
    assert len(body["clusters"]) == 1 and body["clusters"][0]["size"] == 2
    # History as vectors: home adapter (identity here, width 16 = out_dim), nothing excluded.
    hv = vectors[[0, 1, 2]]
    body = c.post("/v1/home", json={"vectors": hv.tolist(), "k": 3}).json()
    q = adapt(world, "home", hv[medoid(hv)])
    want_ids, want_scores = brute_force(vectors, ids, q, 3)
    assert body["ids"] == want_ids
    np.testing.assert_allclose(body["scores"], want_scores, rtol=1e-5, atol=1e-5)


def test_allocate_and_merge_by_hand():
    assert home.allocate(10, [3, 3]) == [5, 5]
    assert home.allocate(10, [5, 3, 1]) == [6, 3, 1]  # 5.56, 3.33, 1.11 -> largest remainder
    assert home.allocate(2, [1, 1, 1]) == [1, 1, 0]
    ids = np.array([["a", "b", "c", "x"], ["c", "d", "e", ""]], dtype=object)
    scores = np.array([[0.9, 0.8, 0.5, 0.4], [0.7, 0.6, 0.3, -np.inf]])
    # Cluster 0 takes a, b (quota 2; "x" excluded), cluster 1 takes c (best 0.7 via cluster 1) and d.
    got = home.merge_candidates(ids, scores, [2, 2], {"x"}, 4)
    assert got == (["a", "b", "c", "d"], [0.9, 0.8, 0.7, 0.6], [0, 0, 1, 1])
    # Quotas short of k: the best remaining fill in.
    got = home.merge_candidates(ids, scores, [1, 0], set(), 3)
    assert got[0] == ["a", "b", "c"]


# ---- bad requests: 4xx with a message, never 5xx --------------------------------------------------

V16 = [0.1] * OUT_DIM
BAD = [
    # (path, json body or raw bytes, status, text in the message)
    ("/v1/search", {"text": "chair", "k": 0}, 422, "between 1 and 50"),
    ("/v1/search", {"text": "chair", "k": 51}, 422, "between 1 and 50"),
    ("/v1/search", {"text": "chair", "k": -3}, 422, "between 1 and 50"),
    ("/v1/search", {"text": "chair", "k": "5"}, 422, "k"),
    ("/v1/search", {"text": "chair", "k": 2.5}, 422, "k"),
    ("/v1/search", {"text": "chair", "colour": "red"}, 422, "colour"),
    ("/v1/search", {}, 422, "exactly one"),
    ("/v1/search", {"text": "chair", "vector": [1.0] * 384}, 422, "exactly one"),
    ("/v1/search", {"text": ""}, 422, "text"),
    ("/v1/search", {"text": "   "}, 422, "blank"),
    ("/v1/search", {"vector": [1.0] * 10}, 422, "expects 384"),
    ("/v1/search", {"vector": []}, 422, "vector"),
    ("/v1/search", {"vector": [0.0] * 384}, 422, "all zeros"),
    ("/v1/search", {"vector": [1e39] + [0.0] * 383}, 422, "float32"),
    ("/v1/search", {"vector": [1e-50] * 384}, 422, "all zeros"),  # underflows to 0 in float32
    ("/v1/search", b'{"vector": [NaN' + b", 1.0" * 383 + b"]}", 422, "finite"),
    ("/v1/search", b'{"vector": [Infinity' + b", 1.0" * 383 + b"]}", 422, "finite"),
    ("/v1/search", b'{"vector": [-Infinity' + b", 1.0" * 383 + b"]}", 422, "finite"),
    ("/v1/search", b'{"vector": [1e400' + b", 1.0" * 383 + b"]}", 422, "finite"),
    ("/v1/search", b'{"text": "chair"', 422, "JSON decode error (Expecting"),
    ("/v1/search", b"not json at all", 422, "JSON"),
    ("/v1/search", b'["chair"]', 422, "dictionary"),
    ("/v1/search", b"[" * 100_000, 400, "parsing"),  # nesting deeper than the JSON decoder's recursion limit
    ("/v1/search", b'{"text": "\xff\xfe"}', 400, "parsing"),  # not UTF-8
    ("/v1/closeup", {"product_id": "nope-42"}, 404, "nope-42"),
    ("/v1/closeup", {"product_id": "p01", "vector": [1.0] * IMAGE_DIM}, 422, "exactly one"),
    ("/v1/closeup", {"vector": [1.0] * 5}, 422, f"expects {IMAGE_DIM}"),
    ("/v1/closeup", {"vector": [0.0] * IMAGE_DIM}, 422, "all zeros"),
    ("/v1/closeup", {"image": "***not base64***"}, 422, "base64"),
    ("/v1/closeup", {"image": ""}, 422, "empty"),
    ("/v1/closeup", {"image": base64.b64encode(b"GIF89a...").decode()}, 422, "cannot identify"),
    ("/v1/closeup", {"product_id": "p01", "k": 1001}, 422, "between 1 and 50"),
    ("/v1/closeup", {"product_id": ""}, 422, "product_id"),
    ("/v1/home", {"history": ["p01", "ghost-1", "ghost-2"]}, 404, "ghost-1"),
    ("/v1/home", {"history": []}, 422, "history"),
    ("/v1/home", {"history": ["p01"], "vectors": [V16]}, 422, "exactly one"),
    ("/v1/home", {"vectors": [V16, [0.1] * 3]}, 422, "vectors[1]"),
    ("/v1/home", {"vectors": [V16, [0.0] * OUT_DIM]}, 422, "all zeros"),
    ("/v1/home", {"history": ["p01"], "max_clusters": 0}, 422, "max_clusters"),
    ("/v1/home", {"history": ["p01"] * (MAX_HISTORY + 1)}, 422, "history"),
    ("/v1/embed", {"product": {"title": "chair", "flavour": "mint"}}, 422, "flavour"),
    ("/v1/embed", {"product": {"title": "chair"}, "extra": 1}, 422, "extra"),
    ("/v1/embed", {"product": {"title": 7}}, 422, "title"),
    ("/v1/embed", {"product": {"image_embeddings": [[1.0] * 3]}}, 422, f"expects {IMAGE_DIM}"),
    ("/v1/embed", b'{"product": {"image_embeddings": [[NaN, 1, 1, 1, 1, 1, 1, 1]]}}', 422, "finite"),
    ("/v1/embed", {"product": {"image_embeddings": [[1.0] * IMAGE_DIM] * 21}}, 422, "at most"),
]


@pytest.mark.parametrize("path,body,status,text", BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_requests_get_a_4xx_with_a_message(client, path, body, status, text):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert text in message(r)


def test_other_http_errors_are_4xx(client):
    assert client.get("/v1/search").status_code == 405
    assert client.get("/nowhere").status_code == 404
    r = client.post("/v1/search", content=b"text=chair", headers={"content-type": "application/x-www-form-urlencoded"})
    assert 400 <= r.status_code < 500


def test_oversized_bodies_get_413(world):
    app = serve.create_app(world["model_dir"], world["root"], max_body_bytes=4096, text_encoder=FakeTextEncoder())
    big = json.dumps({"vector": [0.123456789] * 384}).encode()  # ~5 kB
    assert len(big) > 4096
    with TestClient(app) as c:
        r = c.post("/v1/search", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "4096" in message(r)

        def chunks():  # streamed without Content-Length (chunked)
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        r = c.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "4096" in message(r)
        small = json.dumps({"text": "chair", "k": 3}).encode()
        r = c.post("/v1/search", content=iter([small[:5], small[5:]]), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text  # a small streamed body still works
        r = c.post("/v1/search", content=small, headers={"content-type": "application/json", "content-length": "x"})
        assert r.status_code == 400


def test_real_bugs_are_500_and_counted(world, monkeypatch):
    app = serve.create_app(world["model_dir"], world["root"], text_encoder=FakeTextEncoder())

    def broken(req):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.service, "search", broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/search", json={"text": "chair"})
        assert r.status_code == 500 and "internal error" in r.json()["detail"]
        assert 'itemsage_requests_total{endpoint="/v1/search",method="POST",status="500"} 1' in c.get("/metrics").text


# ---- operations: health, readiness, metrics, OpenAPI ---------------------------------------------


def test_health_and_readiness(client, world):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["products"] == 24 and ready["model_fingerprint"] == world["fp"]
    assert ready["index_version"] in ("v1", "v2") and ready["neighbour_recall_at_10"] == 1.0


def test_metrics_count_requests_and_latency(world):
    app = serve.create_app(world["model_dir"], world["root"], text_encoder=FakeTextEncoder(), max_body_bytes=2048)
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post("/v1/search", json={"text": "lamp", "k": 2}).status_code == 200
        c.post("/v1/search", json={"text": "lamp", "k": 0})
        c.post("/v1/closeup", json={"product_id": "nobody"})
        c.post("/v1/search", content=b"x" * 3000, headers={"content-type": "application/json"})
        c.get("/wp-admin/login.php")
        text = c.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    req = 'itemsage_requests_total{endpoint="%s",method="%s",status="%s"}'
    assert samples[req % ("/v1/search", "POST", 200)] == 3
    assert samples[req % ("/v1/search", "POST", 422)] == 1
    assert samples[req % ("/v1/search", "POST", 413)] == 1
    assert samples[req % ("/v1/closeup", "POST", 404)] == 1
    assert samples[req % ("other", "GET", 404)] == 1  # unknown paths share one label
    hist = 'itemsage_request_duration_seconds_%s{endpoint="/v1/search"%s}'
    assert samples[hist % ("count", "")] == 5
    buckets = [samples[hist % ("bucket", f',le="{b}"')] for b in LATENCY_BUCKETS]
    assert buckets == sorted(buckets) and samples[hist % ("bucket", ',le="+Inf"')] == 5
    assert samples[hist % ("sum", "")] > 0
    assert samples['itemsage_index_info{model="%s",version="v1"}' % world["fp"]] == 1  # labels in name order
    assert samples["itemsage_index_products"] == 24
    assert samples["process_resident_memory_bytes"] > 0 and "process_cpu_seconds_total" in samples  # process metrics


def test_fast_path_answers_as_the_routes_do(world, monkeypatch):
    """Search and closeup bodies sent as `application/json` are answered by FastPathMiddleware before
    FastAPI's routing; with any other JSON content type (here with a charset) they go through the
    routes. Both must give the same status, bytes and headers for every body: the successes the fast
    path answers, and each refusal, which it leaves to FastAPI (or answers as the RequestError handler)."""
    import fastapi.routing

    routed = []
    original = fastapi.routing.serialize_response

    async def counting(*args, **kwargs):  # a response model serialised by a route
        routed.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "serialize_response", counting)
    vec = np.random.default_rng(3).standard_normal(384).round(6).tolist()
    fast = [  # (path, body): answered by the fast path
        ("/v1/closeup", {"product_id": "p03"}),
        ("/v1/closeup", {"product_id": "p03", "k": 5, "exclude": ["p01", "p02", "nobody"]}),
        ("/v1/closeup", {"product_id": "p03", "exclude_self": False, "k": 24}),
        ("/v1/closeup", {"product_id": "p03", "product_to_product": True, "k": 1000}),
        ("/v1/closeup", {"vector": [0.5, -1.0, 2.0, 0.0, 1e-30, 3.0, -2.5, 1.0], "exclude": ["p05"]}),
        ("/v1/search", {"vector": vec, "k": 3}),
        ("/v1/search", {"text": "oak chair"}),  # cached by the warm-up below
    ]
    refused = [  # (path, raw body, status)
        ("/v1/closeup", {"product_id": "nobody"}, 404),
        ("/v1/closeup", {"product_id": "p03", "k": 0}, 422),
        ("/v1/closeup", {"product_id": "p03", "k": True}, 422),
        ("/v1/closeup", {"product_id": "p03", "k": 2.0}, 422),
        ("/v1/closeup", {"product_id": "p03", "unknown": 1}, 422),
        ("/v1/closeup", {"product_id": "p03", "vector": [1.0] * IMAGE_DIM}, 422),
        ("/v1/closeup", {"vector": [0.0] * IMAGE_DIM}, 422),
        ("/v1/closeup", {"vector": [1.0] * (IMAGE_DIM - 1)}, 422),
        ("/v1/closeup", {"vector": [1.0] * IMAGE_DIM, "product_to_product": True}, 422),
        ("/v1/closeup", b'{"product_id": "\\ud800"}', 422),  # a lone surrogate
        ("/v1/closeup", b'{"vector": [NaN, 1, 1, 1, 1, 1, 1, 1]}', 422),
        ("/v1/closeup", b'{"product_id": "p03",', 422),
        ("/v1/closeup", b"", 422),
        ("/v1/closeup", b"[1]", 422),
        ("/v1/search", {"text": "  "}, 422),
        ("/v1/search", {"text": "oak chair", "vector": vec}, 422),
        ("/v1/search", {"vector": vec[:10]}, 422),
    ]
    app = serve.create_app(world["model_dir"], world["root"], text_encoder=FakeTextEncoder())
    with TestClient(app) as c:
        assert c.post("/v1/search", json={"text": "oak chair"}).status_code == 200  # into the query cache
        for path, body, *status in [(p, b) for p, b in fast] + refused:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            answers = []
            for content_type in ("application/json", "application/json; charset=utf-8"):
                before = len(routed)
                r = c.post(path, content=content, headers={"content-type": content_type})
                answers.append((r.status_code, r.content, r.headers["content-type"], r.headers["content-length"]))
                if not status:  # a success: the fast path answers, the route serialises
                    assert len(routed) - before == (0 if content_type == "application/json" else 1), (path, body)
            assert answers[0] == answers[1], (path, body)
            assert answers[0][0] == (status[0] if status else 200), (path, body, answers[0])
        text = c.get("/metrics").text
    assert 'itemsage_requests_total{endpoint="/v1/closeup",method="POST",status="200"} 10.0' in text  # both paths counted
    assert 'itemsage_requests_total{endpoint="/v1/closeup",method="POST",status="404"} 2.0' in text


def test_fast_path_middleware_replays_what_it_read():
    """A body the handler leaves (None) reaches the app as the messages that came, in order, chunks
    and all; a disconnect mid-body never reaches the handler; other routes, methods and content
    types pass untouched; an answer from the handler is sent and the app never runs."""
    import asyncio

    from starlette.responses import Response

    from itemsage.serve.middleware import FastPathMiddleware

    def run(messages, answer=None, path="/hot", method="POST", content_type=b"application/json"):
        handled, seen, sent = [], [], []

        def handle(body):
            handled.append(body)
            return answer

        async def app(scope, receive, send):
            for _ in messages:
                seen.append(await receive())

        async def main():
            pending = list(messages)

            async def receive():
                return pending.pop(0)

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "path": path, "method": method, "headers": [(b"content-type", content_type)]}
            await FastPathMiddleware(app, {"/hot": handle})(scope, receive, send)

        asyncio.run(main())
        return handled, seen, sent

    chunks = [{"type": "http.request", "body": b'{"a": ', "more_body": True},
              {"type": "http.request", "body": b"1}", "more_body": False}]
    handled, seen, sent = run(chunks)
    assert handled == [b'{"a": 1}'] and seen == chunks and sent == []
    torn = [{"type": "http.request", "body": b'{"a": ', "more_body": True}, {"type": "http.disconnect"}]
    assert run(torn) == ([], torn, [])
    for other in [dict(path="/cold"), dict(method="PUT"), dict(content_type=b"text/plain")]:
        assert run(chunks, **other) == ([], chunks, [])
    handled, seen, sent = run(chunks, answer=Response(b"{}", media_type="application/json"))
    assert handled == [b'{"a": 1}'] and seen == [] and sent[0]["status"] == 200 and sent[1]["body"] == b"{}"


def test_openapi_lists_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in [("/v1/search", "post"), ("/v1/closeup", "post"), ("/v1/home", "post"), ("/v1/embed", "post"),
                         ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"), ("/admin/reload", "post")]:
        assert method in paths.get(path, {}), path


# ---- reload ---------------------------------------------------------------------------------------


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_reload_needs_the_token(client, world):
    assert client.post("/admin/reload", json={"version": "v2"}).status_code == 401
    assert client.post("/admin/reload", json={"version": "v2"}, headers=auth("wrong")).status_code == 403
    r = client.post("/admin/reload", json={"version": "v2"}, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 403
    assert client.post("/v1/closeup", json={"product_id": "p01"}).json()["index_version"] == "v1"
    app = serve.create_app(world["model_dir"], world["root"])  # no token: reload disabled
    with TestClient(app) as c:
        r = c.post("/admin/reload", json={"version": "v2"}, headers=auth())
        assert r.status_code == 403 and "disabled" in message(r)


def test_reload_swaps_and_refuses_bad_versions(client, world):
    r = client.post("/admin/reload", json={"version": "v2", "persist": False}, headers=auth())  # CURRENT stays v1
    assert r.status_code == 200, r.text
    assert r.json()["index_version"] == "v2" and r.json()["previous_version"] == "v1"
    assert client.post("/v1/closeup", json={"product_id": "p01"}).json()["index_version"] == "v2"
    r = client.post("/admin/reload", json={"version": "v9"}, headers=auth())
    assert r.status_code == 404 and "v9" in message(r)
    r = client.post("/admin/reload", json={"version": "../model"}, headers=auth())
    assert r.status_code == 422
    r = client.post("/admin/reload", headers=auth())  # no body: back to what CURRENT names
    assert r.status_code == 200 and r.json()["index_version"] == "v1"


def test_corrupted_version_is_refused_and_the_old_keeps_serving(client, world):
    root = world["root"]
    bad = version_path(root, "v1-corrupt")
    shutil.copytree(version_path(root, "v1"), bad)
    data = bytearray((bad / "index.faiss").read_bytes())
    data[-7] ^= 0xFF  # one flipped byte in the vectors
    (bad / "index.faiss").write_bytes(bytes(data))
    torn = version_path(root, "v1-torn")
    shutil.copytree(version_path(root, "v1"), torn)
    (torn / "manifest.json").unlink()  # a killed build: no manifest
    before = client.post("/v1/closeup", json={"product_id": "p05"}).json()
    for name in ("v1-corrupt", "v1-torn"):
        r = client.post("/admin/reload", json={"version": name}, headers=auth())
        assert r.status_code == 409 and "keeps serving" in message(r), r.text
    after = client.post("/v1/closeup", json={"product_id": "p05"})
    assert after.status_code == 200 and after.json() == before


def test_index_of_another_model_is_refused(world, tmp_path):
    save_index(tmp_path, "other", world["ids"], world["vectors"]["v1"], "0123456789abcdef")
    with pytest.raises(ArtifactError, match="another|model"):
        serve.create_app(world["model_dir"], tmp_path)
    shutil.copytree(version_path(tmp_path, "other"), version_path(world["root"], "other-model"))
    app = serve.create_app(world["model_dir"], world["root"], reload_token=TOKEN)
    with TestClient(app) as c:
        r = c.post("/admin/reload", json={"version": "other-model"}, headers=auth())
        assert r.status_code == 409 and "0123456789abcdef" in message(r)


def test_hot_swap_under_concurrent_requests(world):
    """Threads hammer /v1/closeup while reload swaps v1 <-> v2: no failure, answers consistent."""
    app = serve.create_app(world["model_dir"], world["root"], reload_token=TOKEN)
    ids = world["ids"]
    pids = ["p02", "p09", "p16", "p21"]
    expected = {}  # (version, pid) -> ids of that version's exact answer
    for version, vectors in world["vectors"].items():
        for pid in pids:
            expected[version, pid] = brute_force(vectors, ids, vectors[list(ids).index(pid)], 5, exclude={pid})[0]
    results, errors, stop = [], [], threading.Event()

    with TestClient(app) as c:
        def hammer(worker: int) -> None:
            i = 0
            while not stop.is_set():
                pid = pids[(worker + i) % len(pids)]
                i += 1
                try:
                    r = c.post("/v1/closeup", json={"product_id": pid, "k": 5, "product_to_product": True})
                    results.append((r.status_code, pid, r.json()))
                except Exception as err:  # noqa: BLE001 - any failure fails the test below
                    errors.append(repr(err))

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        swaps = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline or swaps < 6:
            r = c.post("/admin/reload", json={"version": "v2" if swaps % 2 == 0 else "v1", "persist": False},
                       headers=auth())
            assert r.status_code == 200, r.text
            swaps += 1
        stop.set()
        for t in threads:
            t.join()

    assert not errors
    assert len(results) > 50
    assert all(status == 200 for status, _, _ in results), [s for s, _, _ in results if s != 200][:5]
    versions = {body["index_version"] for _, _, body in results}
    assert versions == {"v1", "v2"}
    for _, pid, body in results:  # every answer is wholly one version's
        assert body["ids"] == expected[body["index_version"], pid]


# ---- the real text encoder ------------------------------------------------------------------------


def test_search_with_the_real_minilm_encoder(world):
    query_encoder = pytest.importorskip("itemsage.encoders.text")
    encoder = query_encoder.TextQueryEncoder()
    app = serve.create_app(world["model_dir"], world["root"], text_encoder=encoder)
    with TestClient(app) as c:
        r = c.post("/v1/search", json={"text": "red oak chair", "k": 5})
    assert r.status_code == 200, r.text
    q = adapt(world, "search", encoder.encode(["red oak chair"])[0])
    want_ids, _ = brute_force(world["vectors"]["v1"], world["ids"], q, 5)
    assert r.json()["ids"] == want_ids


UNREADABLE_TITLES = ["木製の椅子", "Стул из дуба", "zzqxv qqvvw"]  # no token of the catalog's vocabulary


def test_embed_flags_a_product_the_model_reads_nothing_of(client, world, caplog):
    """No image and no vocabulary token: the vector is exactly an empty product's, and the answer says so."""
    empty = client.post("/v1/embed", json={"product": {"product_id": "empty"}}).json()
    assert empty["unreadable"] is True and "empty product" in empty["warning"]
    for title in UNREADABLE_TITLES:
        with caplog.at_level("WARNING", logger="itemsage.serve.products"):
            body = client.post("/v1/embed", json={"product": {"title": title}}).json()
        assert body["vector"] == empty["vector"]  # what the flag is about: bit-identical
        assert body["unreadable"] is True and body["warning"] == empty["warning"]
        assert "reads nothing of this product" in caplog.text
    read = [{"title": "red oak chair"}, {"title": UNREADABLE_TITLES[0], "image_embeddings": [[0.5] * IMAGE_DIM]}]
    for product in read:  # a known word, or an image: read, and not flagged
        body = client.post("/v1/embed", json={"product": product}).json()
        assert body["unreadable"] is False and body["warning"] is None and body["vector"] != empty["vector"]
