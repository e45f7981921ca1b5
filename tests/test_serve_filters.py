"""Filters through the service: /v1/search, /v1/closeup, /v1/home and the live upserts, against the
row-by-row reference of the language (test_filters.passes) and brute-force inner products.

Every answer must hold exactly the products that pass, best first, min(k, passing) of them; a filter
that does not fit the index gets a 422 naming the column and listing the filterable ones, the same
through the fast path and the route; an attribute changed by an upsert is honoured on the next
request and after a restart.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_filters import catalog, passes, table_of

from itemsage.data.text import Vocabulary
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.versions import publish, version_path
from itemsage.model.config import model_config
from itemsage.model.model import save_model
from itemsage.model.tower import ItemSage, QueryAdapters
from itemsage.serve import app as serve

IMAGE_DIM = 8
QUERY_DIMS = {"search": 8, "closeup": IMAGE_DIM, "home": IMAGE_DIM}  # no 384-d search: MiniLM stays unloaded
TOKEN = "filter-token"
N = 400


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-filters")
    torch.manual_seed(0)
    cfg = model_config("tiny", dropout=0.0)
    vocab = Vocabulary.build([["red oak chair"], ["blue linen sofa"]])
    fp = save_model(base / "model", ItemSage(cfg, len(vocab), IMAGE_DIM),
                    QueryAdapters(QUERY_DIMS, cfg.out_dim, cfg.adapter), cfg, vocab, image_dim=IMAGE_DIM,
                    query_dims=QUERY_DIMS)
    ids, x, rows = catalog(N, seed=21)
    frozen = np.random.default_rng(22).standard_normal((N, IMAGE_DIM)).astype(np.float32)
    index = ProductIndex.build(ids, x, "flat", attributes=table_of(rows), query_vectors=frozen,
                               product_query={"source": "image"})
    publish(base / "index", index.save(version_path(base / "index", "v1"), inputs={"model": fp}))
    bare = ProductIndex.build(ids, x, "flat", query_vectors=frozen, product_query={"source": "image"})
    publish(base / "bare", bare.save(version_path(base / "bare", "v1"), inputs={"model": fp}))
    return {"base": base, "model_dir": base / "model", "ids": ids, "x": x, "rows": rows, "frozen": frozen}


def make_client(world, root="index"):
    return TestClient(serve.create_app(world["model_dir"], world["base"] / root, reload_token=TOKEN))


@pytest.fixture(scope="module")
def client(world):
    with make_client(world) as c:
        yield c


def expected(world, q: np.ndarray, k: int, spec, exclude=(), rows=None, x=None) -> tuple[list[str], np.ndarray]:
    rows = world["rows"] if rows is None else rows
    x = world["x"] if x is None else x
    ok = np.array([passes(r, spec) and world["ids"][i] not in set(exclude) for i, r in enumerate(rows)])
    scores = np.where(ok, x @ q, -np.inf)
    order = np.argsort(-scores, kind="stable")[: min(k, int(ok.sum()))]
    return world["ids"][order].tolist(), scores[order]


SPECS = [
    {"category": ["c1", "c2"]},
    {"brand": {"not": "acme"}, "in_stock": True},
    {"tags": "red", "price": {"gte": 20, "lt": 80}},
    {"listed_at": {"gte": "2026-01-01T00:00:00Z"}, "stock": {"lte": 2}},
    {"price": {"gt": 99.9}},  # a handful pass: fewer than k
    {"category": "nope"},  # nothing passes: 200 and an empty list
]


def test_search_and_closeup_with_a_filter_equal_brute_force(client, world):
    service = client.app.state.service
    rng = np.random.default_rng(1)
    for spec in SPECS:
        vector = rng.standard_normal(QUERY_DIMS["search"]).tolist()
        r = client.post("/v1/search", json={"vector": vector, "k": 10, "filter": spec})
        assert r.status_code == 200, r.text
        q = service._adapt("search", np.asarray([vector], np.float32) / np.linalg.norm(vector))[0]
        want, want_scores = expected(world, q, 10, spec)
        assert r.json()["ids"] == want, spec
        np.testing.assert_allclose(r.json()["scores"], want_scores, atol=1e-5)
        # closeup by product id: the product itself and `exclude` left out inside the same mask
        pid = world["ids"][7]
        exclude = want[:3]
        r = client.post("/v1/closeup", json={"product_id": pid, "k": 10, "filter": spec, "exclude": exclude})
        assert r.status_code == 200, r.text
        f = world["frozen"][7] / np.linalg.norm(world["frozen"][7])
        q = service._adapt("closeup", f[None].astype(np.float32))[0]
        want, _ = expected(world, q, 10, spec, exclude=[pid, *exclude])
        assert r.json()["ids"] == want, spec


def test_home_with_a_filter_returns_only_passing_products(client, world):
    history = list(world["ids"][[3, 50, 51, 200]])
    for spec in SPECS:
        r = client.post("/v1/home", json={"history": history, "k": 12, "filter": spec})
        assert r.status_code == 200, r.text
        got = r.json()["ids"]
        passing = [p for p, row in zip(world["ids"], world["rows"]) if passes(row, spec) and p not in history]
        assert len(got) == min(12, len(passing)) and set(got) <= set(passing), spec


@pytest.mark.parametrize("spec, column, problem", [
    ({"colour": "red"}, "colour", "not a filterable column"),
    ({"price": "cheap"}, "price", "expects finite numbers"),
    ({"category": {"gte": "c1"}}, "category", "ranges (gte) apply to numbers"),
    ({"in_stock": "yes"}, "in_stock", "expects true or false"),
])
def test_a_bad_filter_is_a_422_naming_the_column_on_every_endpoint(client, world, spec, column, problem):
    bodies = {"/v1/search": {"vector": [0.5] * QUERY_DIMS["search"]},
              "/v1/closeup": {"product_id": world["ids"][0]},
              "/v1/home": {"history": list(world["ids"][:3])}}
    for path, body in bodies.items():
        data = json.dumps({**body, "filter": spec})
        fast = client.post(path, content=data, headers={"content-type": "application/json"})
        route = client.post(path, content=data, headers={"content-type": "application/json; charset=utf-8"})
        for r in (fast, route):
            assert r.status_code == 422, (path, r.text)
            detail = r.json()["detail"]
            assert f"filter column '{column}'" in detail and problem in detail, detail
            assert "Filterable columns: brand (string), category (string), in_stock (boolean)" in detail
        assert fast.json() == route.json()
    r = client.post("/v1/search", json={"vector": [0.5] * 8, "filter": {f"c{i}": 1 for i in range(65)}})
    assert r.status_code == 422 and "at most 64 columns" in r.text


def test_an_index_without_attributes_refuses_filters_and_lists_what_to_do(world):
    with make_client(world, "bare") as c:
        r = c.post("/v1/search", json={"vector": [0.5] * 8, "filter": {"price": {"lt": 5}}})
        assert r.status_code == 422 and "stores no filterable columns" in r.json()["detail"]
        assert c.post("/v1/search", json={"vector": [0.5] * 8, "filter": {}}).status_code == 200
        assert c.get("/v1/filters").json()["columns"] == []


def test_filters_endpoint_lists_the_columns_and_their_values(client):
    columns = {c["name"]: c for c in client.get("/v1/filters").json()["columns"]}
    assert columns["category"]["kind"] == "string" and "c1" in columns["category"]["values"]
    assert columns["tags"]["kind"] == "strings" and set(columns["tags"]["values"]) <= {"red", "wool", "blue", "oak", "linen"}
    assert columns["price"]["kind"] == "number" and 1 <= columns["price"]["min"] <= columns["price"]["max"] <= 100
    assert columns["listed_at"]["min"].endswith("Z") and columns["in_stock"] == {"name": "in_stock", "kind": "bool"}


def test_an_upserted_attribute_is_honoured_at_once_and_after_a_restart(world, tmp_path):
    import shutil

    shutil.copytree(world["base"] / "index", tmp_path / "index")
    world = dict(world, base=tmp_path)
    shutil.copytree(world["model_dir"], tmp_path / "model")
    world["model_dir"] = tmp_path / "model"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    spec = {"in_stock": True}
    vector = [0.3, -0.2, 0.9, 0.1, 0.0, 0.4, -0.5, 0.2]
    with make_client(world) as c:
        before = c.post("/v1/search", json={"vector": vector, "k": 5, "filter": spec}).json()["ids"]
        first = before[0]
        row = world["rows"][int(first[1:])]
        product = {"product_id": first, "title": "red oak chair", "category": row["category"], "in_stock": False,
                   "price": 12.5, "listed_at": "2026-03-01T12:00:00Z", "tags": ["red"],
                   "image_embeddings": [[0.1, 0.2, -0.3, 0.4, 0.5, -0.6, 0.7, 0.8]]}
        r = c.post("/admin/products", json={"products": [product]}, headers=auth)
        assert r.status_code == 200, r.text
        after = c.post("/v1/search", json={"vector": vector, "k": 5, "filter": spec}).json()["ids"]
        assert first not in after and after[:4] == before[1:] and len(after) == 5  # out of stock: gone at once
        got = c.post("/v1/search", json={"vector": vector, "k": 400, "filter": {"in_stock": False, "price": 12.5}})
        assert got.json()["ids"] == [first]  # its new values, and only its
        for bad, field in [({"in_stock": "no"}, "in_stock"), ({"price": "cheap"}, "price"),
                           ({"listed_at": "yesterday"}, "listed_at"), ({"colour": "red"}, "colour")]:
            r = c.post("/admin/products", json={"products": [{**product, **bad}]}, headers=auth)
            assert r.status_code == 422 and field in r.json()["detail"], r.text
    with make_client(world) as c:  # a restart replays the logged attributes
        again = c.post("/v1/search", json={"vector": vector, "k": 5, "filter": spec}).json()["ids"]
        assert again == after
