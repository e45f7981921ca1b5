"""Products as queries (by_product.py): home by history by hand, recency weighting, evaluate's served
figures against the service itself on the same rows, and the user-level Recall/NDCG on a hand-made case.

The model is a tiny random-init one whose closeup and home adapters are learned linear maps (8-d
frozen vectors -> 16-d), so every reference applies the adapter by hand in numpy from its weights.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from itemsage import schema
from itemsage.data.text import Vocabulary
from itemsage.evaluate.inputs import CatalogIds
from itemsage.evaluate.served import served_paths
from itemsage.index import by_product
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.versions import publish, version_path
from itemsage.model.config import model_config
from itemsage.model.model import load_model, save_model
from itemsage.model.tower import ItemSage, QueryAdapters
from itemsage.serve import app as serve
from itemsage.serve.bodies import CloseupRequest, HomeRequest
from itemsage.serve.service import Service
from itemsage.train.pairs import Pairs

FROZEN_DIM = 8
OUT_DIM = 16
QUERY_DIMS = {"closeup": FROZEN_DIM, "home": FROZEN_DIM}
DAY = 86_400.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model; 4 groups of 10 products whose frozen vectors sit around 4 orthogonal directions;
    product vectors random (the adapter, not the frozen space, decides the neighbours)."""
    base = tmp_path_factory.mktemp("by-product")
    torch.manual_seed(0)
    cfg = model_config("tiny", dropout=0.0)
    vocab = Vocabulary.build([["chair"]])
    save_model(base / "model", ItemSage(cfg, len(vocab), FROZEN_DIM), QueryAdapters(QUERY_DIMS, cfg.out_dim, cfg.adapter),
               cfg, vocab, image_dim=FROZEN_DIM, query_dims=QUERY_DIMS)
    model = load_model(base / "model")
    rng = np.random.default_rng(4)
    ids, frozen = [], []
    for g in range(4):
        for i in range(10):
            v = np.eye(FROZEN_DIM)[g] + 0.1 * rng.standard_normal(FROZEN_DIM)
            ids.append(f"g{g}-{i}")
            frozen.append(v * rng.uniform(0.5, 3.0))  # not unit: the served path normalises
    frozen = np.asarray(frozen, np.float32)
    vectors = rng.standard_normal((len(ids), OUT_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ProductIndex.build(np.asarray(ids, dtype=object), vectors, kind="flat", query_vectors=frozen,
                               product_query={"source": "image"})
    directory = version_path(base / "index", "v1")
    index.save(directory, inputs={"model": model.fingerprint})
    publish(base / "index", directory)
    weights = {s: model.adapters.maps[s].weight.detach().numpy().astype(np.float64) for s in QUERY_DIMS}
    return {"base": base, "model": model, "ids": np.asarray(ids), "frozen": frozen, "vectors": vectors,
            "index": index, "weights": weights,
            "service": Service(base / "model", base / "index")}


def adapter(world, surface: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64) / np.linalg.norm(x)
    q = world["weights"][surface] @ x
    return q / np.linalg.norm(q)


def unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) / np.linalg.norm(x, axis=-1, keepdims=True)


def medoid(x: np.ndarray) -> int:
    return int(np.argmin([sum(np.linalg.norm(a - b) for b in x) for a in x]))


def ranked(world, q: np.ndarray, exclude=()) -> list[tuple[str, float]]:
    scores = world["vectors"].astype(np.float64) @ q
    return [(world["ids"][i], float(scores[i])) for i in np.argsort(-scores, kind="stable")
            if world["ids"][i] not in set(exclude)]


def test_home_by_history_equals_clusters_medoids_adapter_merge_by_hand(world):
    history = ["g0-0", "g0-1", "g0-2", "g2-0", "g2-1"]  # two interests, sizes 3 and 2
    with TestClient(serve.create_app(world["base"] / "model", world["base"] / "index")) as c:
        body = c.post("/v1/home", json={"history": history, "k": 5}).json()
    row = {p: i for i, p in enumerate(world["ids"])}
    x = unit(world["frozen"][[row[p] for p in history]])  # [5, 8]
    groups = [[0, 1, 2], [3, 4]]
    assert [cl["members"] for cl in body["clusters"]] == groups
    assert [cl["importance"] for cl in body["clusters"]] == pytest.approx([3 / 5, 2 / 5])
    # k = 5 split 3 + 2; each medoid's frozen vector through the home adapter, its top k + |history| = 10
    # searched, the history dropped; a product keeps its best score among the lists that hold it.
    taken, best = [], {}
    for members, quota in zip(groups, [3, 2]):
        m = members[medoid(x[members])]
        assert m in [cl["medoid"] for cl in body["clusters"]]
        lst = [(p, s) for p, s in ranked(world, adapter(world, "home", x[m]))[:10] if p not in history]
        taken += [p for p, _ in lst if p not in taken][:quota]
        for p, s in lst:
            best[p] = max(best.get(p, -9.0), s)
    want = sorted(taken, key=lambda p: -best[p])
    assert body["ids"] == want
    np.testing.assert_allclose(body["scores"], [best[p] for p in want], rtol=1e-5, atol=1e-5)


def test_home_keep_history_and_exclude(world):
    svc = world["service"]
    history = ["g1-0", "g1-1", "g1-2"]
    x = unit(world["frozen"][[10, 11, 12]])
    q = adapter(world, "home", x[medoid(x)])
    got = svc.home(HomeRequest(history=history, k=6, keep_history=True))
    assert got.ids == [p for p, _ in ranked(world, q)][:6]
    masked = got.ids[:3]
    got = svc.home(HomeRequest(history=history, k=6, exclude=masked))
    assert got.ids == [p for p, _ in ranked(world, q, exclude=history + masked)][:6]


def test_recency_weighting_changes_the_ranking_as_by_hand(world):
    """Three old items of one interest and one recent item of another, k = 2: by counts the big
    cluster takes both slots (1.5 / 0.5, tie to the first); with times and a 30-day half-life the recent
    one weighs 1 against 3 x 0.5 ** 4, so it takes both."""
    svc = world["service"]
    history = ["g0-0", "g0-1", "g0-2", "g3-0"]
    x = unit(world["frozen"][[0, 1, 2, 30]])
    old_q = adapter(world, "home", x[:3][medoid(x[:3])])
    new_q = adapter(world, "home", x[3])
    def merged(q_first, q_other):  # both slots from q_first's list, ordered by the best score of the searched
        first = dict(ranked(world, q_first, exclude=history))  # lists (k + |history| = 6 deep each)
        other = {p: s for p, s in ranked(world, q_other)[:6] if p not in history}
        top = list(first)[:2]
        return sorted(top, key=lambda p: -max(first[p], other.get(p, -9.0)))

    counts = svc.home(HomeRequest(history=history, k=2))
    assert counts.ids == merged(old_q, new_q)
    now = 1_800_000_000.0
    times = [now - 120 * DAY] * 3 + [now]
    recent = svc.home(HomeRequest(history=history, k=2, times=times))
    assert recent.ids == merged(new_q, old_q)
    assert recent.ids != counts.ids
    w_old, w_new = 3 * 0.5 ** 4, 1.0
    assert [c.importance for c in recent.clusters] == pytest.approx([w_new / (w_old + w_new), w_old / (w_old + w_new)])
    assert recent.clusters[0].members == [3]
    # Equal times: every item weighs 1, as without times.
    assert svc.home(HomeRequest(history=history, k=2, times=[now] * 4)).ids == counts.ids


def test_bad_times_are_refused(world):
    with TestClient(serve.create_app(world["base"] / "model", world["base"] / "index")) as c:
        r = c.post("/v1/home", json={"history": ["g0-0", "g0-1"], "times": [1.0]})
        assert r.status_code == 422 and "one per item" in r.json()["detail"]
        r = c.post("/v1/home", json={"history": ["g0-0"], "half_life_days": 0})
        assert r.status_code == 422 and "half_life_days" in r.json()["detail"]
        r = c.post("/v1/home", json={"history": ["g0-0"], "now": 5.0})
        assert r.status_code == 422 and "times" in r.json()["detail"]


def test_evaluate_served_figures_equal_the_service_on_the_same_rows(world, tmp_path):
    """served_paths (what `itemsage evaluate` reports) against Service.closeup / Service.home called
    per test row: the same hits, so the same Recall@k per engagement."""
    rng = np.random.default_rng(9)
    ids = world["ids"].tolist()
    # Train window: 5 users, each with products from two groups at increasing times.
    train_rows = []
    for u in range(5):
        for j, pid in enumerate(rng.choice(ids, 6, replace=False)):
            train_rows.append({"user_id": f"u{u}", "product_id": str(pid), "timestamp": 1_000_000 * (u * 10 + j)})
    train = pa.table({"user_id": [r["user_id"] for r in train_rows], "product_id": [r["product_id"] for r in train_rows],
                      "timestamp": pa.array([r["timestamp"] for r in train_rows], pa.timestamp("ms", tz="UTC"))})
    # Test window: closeup rows naming a query product, home rows of those users (and one without history).
    n = 30
    surface = np.array(["closeup", "home"] * (n // 2), dtype=object)
    engagement = np.array(rng.choice(["click", "save"], n), dtype=object)
    users = [f"u{rng.integers(0, 6)}" for _ in range(n)]  # u5 has no history
    qpid = [str(rng.choice(ids)) if s == "closeup" else None for s in surface]
    positives = [str(rng.choice(ids)) for _ in range(n)]
    pq.write_table(pa.table({"user_id": users, "query_product_id": pa.array(qpid, pa.string())}),
                   tmp_path / schema.TEST_FILE)
    catalog = CatalogIds(np.asarray(ids, dtype=object))
    pairs = Pairs(queries={}, surface=surface, query_row=np.zeros(n, np.int64), query_key=np.zeros(n, np.int64),
                  product_row=catalog.index_of(positives), task=np.char.add(np.char.add(surface.astype(str), "."),
                                                                            engagement.astype(str)).astype(object),
                  engagement=engagement, weight=np.ones(n, np.float32), source_row=np.arange(n))
    zeros = np.zeros(n, np.int64)
    out = served_paths(world["model"], tmp_path, {"exact": world["index"]}, catalog, pairs, zeros, zeros, train,
                       ks=(1, 10), history=4)

    svc = world["service"]
    hist: dict[str, list[str]] = {}
    for r in sorted(train_rows, key=lambda r: r["timestamp"]):
        hist.setdefault(r["user_id"], []).append(r["product_id"])
    want: dict[str, dict[str, list[bool]]] = {"closeup": {}, "home": {}}
    for i in range(n):
        task = f"{surface[i]}.{engagement[i]}"
        if surface[i] == "closeup":
            got = svc.closeup(CloseupRequest(product_id=qpid[i], k=10)).ids
        elif users[i] in hist:
            got = svc.home(HomeRequest(history=hist[users[i]][-4:], k=10)).ids
        else:
            continue
        want[surface[i]].setdefault(task, []).append(positives[i] in got)
    for block, s in (("closeup_by_product", "closeup"), ("home_by_history", "home")):
        figures = out[block]["exact"]
        for task, hits in want[s].items():
            assert figures[task]["n"] == len(hits) and figures[task]["recall@10"] == pytest.approx(np.mean(hits)), task
    assert out["data"]["home_pairs_without_history"] == sum(1 for i in range(n) if surface[i] == "home"
                                                           and users[i] not in hist)
    assert out["user_level"]["users"] > 0


def test_user_level_recall_and_ndcg_by_hand():
    ranked_lists = [["a", "b", "c", "d"], ["x", "y", "z", "w"]]
    relevant = [{"b", "d", "q"}, {"x"}]
    # user 0: hits at ranks 2 and 4 of k = 4; recall 2/3; DCG = 1/log2(3) + 1/log2(5); IDCG = 3 hits at the top
    dcg0 = 1 / np.log2(3) + 1 / np.log2(5)
    idcg0 = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    # user 1: hit at rank 1; recall 1; NDCG 1
    recall, ndcg = by_product.user_recall_ndcg(ranked_lists, relevant, 4)
    assert recall == pytest.approx((2 / 3 + 1) / 2)
    assert ndcg == pytest.approx((dcg0 / idcg0 + 1) / 2)
    # k = 1: user 0 misses, user 1 hits; IDCG over min(|relevant|, k) = 1 item
    assert by_product.user_recall_ndcg(ranked_lists, relevant, 1) == pytest.approx((0.5 * (0 + 1), 0.5 * (0 + 1)))
