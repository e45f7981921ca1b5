"""Filtered candidate generation (index/attributes.py, filters.py, planner.py, tuning.py): every answer
checked against a reference written apart from the code under test.

The reference is plain Python: `passes(row, spec)` evaluates the filter language row by row over
dicts, and exact top-k by numpy inner products over the rows that pass is the expected answer. Each
index kind must return those products (flat and the planner's exact path: the same ids; HNSW and
IVF-PQ: recall@10 >= 0.95 and the same count), always min(k, passing) of them, with live upserts
and deletes, after a save and load, and after a replay of the live log.
"""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from itemsage import artifacts
from itemsage.artifacts import ArtifactError
from itemsage.index import live
from itemsage.index.attributes import AttributeStore
from itemsage.index.build import build_from_embeddings
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.filters import FilterError, compile_filter
from itemsage.index.live_log import LiveLog, delete_record, upsert_record
from itemsage.index.planner import RowMask, plan
from itemsage.index.tuning import TuningError
from itemsage.index.versions import load_current, publish, version_path

DIM = 16
N = 2400
UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 1, tzinfo=UTC)


# ---- the catalog and the reference -------------------------------------------------------------------


def catalog(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(ids [n], unit vectors [n, DIM] in 24 clusters, one attribute dict per product). The category is
    the cluster's (correlated with the vectors); the other columns are random, some values missing."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((24, DIM))
    cluster = rng.integers(0, 24, n)
    x = centres[cluster] + 0.8 * rng.standard_normal((n, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    tags = ["red", "wool", "blue", "oak", "linen"]
    rows = []
    for i in range(n):
        rows.append({
            "category": f"c{cluster[i] % 12}",
            "brand": None if i % 17 == 0 else ["acme", "bolt", "corax", "dune"][i % 4],
            "tags": None if i % 13 == 0 else [tags[j] for j in range(5) if rng.random() < 0.3],
            "price": None if i % 11 == 0 else float(np.round(rng.uniform(1, 100), 2)),
            "stock": None if i % 7 == 0 else int(rng.integers(0, 6)),
            "in_stock": None if i % 19 == 0 else bool(rng.random() < 0.7),
            "listed_at": None if i % 23 == 0 else T0 + dt.timedelta(days=int(rng.integers(-60, 60))),
        })
    return np.array([f"p{i:05d}" for i in range(n)], dtype=object), x, rows


def table_of(rows: list[dict]) -> pa.Table:
    return pa.table({
        "category": pa.array([r["category"] for r in rows], pa.string()),
        "brand": pa.array([r["brand"] for r in rows], pa.string()),
        "tags": pa.array([r["tags"] for r in rows], pa.list_(pa.string())),
        "price": pa.array([r["price"] for r in rows], pa.float64()),
        "stock": pa.array([r["stock"] for r in rows], pa.int32()),
        "in_stock": pa.array([r["in_stock"] for r in rows], pa.bool_()),
        "listed_at": pa.array([r["listed_at"] for r in rows], pa.timestamp("ms", tz="UTC")),
    })


def _values(row: dict, column: str) -> list:
    v = row.get(column)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    return list(v) if isinstance(v, list) else [v]


def _as(v, example):
    return dt.datetime.fromisoformat(v.replace("Z", "+00:00")) if isinstance(example, dt.datetime) else v


def passes(row: dict, spec: dict | None) -> bool:
    """The filter language, row by row (the module doc of index/filters.py, written again)."""
    for column, cond in (spec or {}).items():
        have = _values(row, column)
        if isinstance(cond, dict) and "not" in cond:
            banned = cond["not"] if isinstance(cond["not"], list) else [cond["not"]]
            if any(h == _as(b, h) for h in have for b in banned):
                return False
        elif isinstance(cond, dict):
            if not have:
                return False
            for op, bound in cond.items():
                x, b = have[0], _as(bound, have[0])
                if not {"gte": x >= b, "gt": x > b, "lte": x <= b, "lt": x < b}[op]:
                    return False
        else:
            wanted = cond if isinstance(cond, list) else [cond]
            if not any(h == _as(w, h) for h in have for w in wanted):
                return False
    return True


SPECS = [
    {"category": "c3"},
    {"category": ["c1", "c2", "c7"]},
    {"category": {"not": ["c0", "c1", "c2"]}},
    {"brand": {"not": "acme"}},
    {"tags": "red"},
    {"tags": ["wool", "oak"]},
    {"tags": {"not": ["red", "blue"]}},
    {"price": {"gte": 10, "lt": 50}},
    {"price": {"gt": 97.5}},
    {"price": 50.5},
    {"stock": {"lte": 1}},
    {"stock": [0, 5]},
    {"in_stock": True},
    {"in_stock": False},
    {"listed_at": {"gte": "2026-01-01T00:00:00Z"}},
    {"listed_at": {"lt": "2025-11-15T00:00:00+01:00"}},
    {"category": ["c4", "c5"], "in_stock": True, "price": {"lt": 60}, "tags": {"not": "linen"}},
    {"brand": "acme", "stock": {"gte": 5}, "price": {"gte": 95}},
    {"category": "nope"},
    {"category": []},
]


def exact(x: np.ndarray, rows: list[dict], q: np.ndarray, k: int, spec: dict | None, exclude=()) -> list[int]:
    ok = np.array([passes(r, spec) for r in rows]) & ~np.isin(np.arange(len(rows)), list(exclude))
    scores = np.where(ok, x @ q, -np.inf)
    order = np.argsort(-scores, kind="stable")[: min(k, int(ok.sum()))]
    return order.tolist()


@pytest.fixture(scope="module")
def data():
    return catalog()


@pytest.fixture(scope="module", params=["flat", "hnsw", "ivfpq"])
def built(request, data, tmp_path_factory):
    """Each kind built with the attributes, saved and loaded back (attributes.arrow memory-mapped)."""
    ids, x, rows = data
    index = ProductIndex.build(ids, x, request.param, attributes=table_of(rows), threads=1, recall_sample=400)
    directory = version_path(tmp_path_factory.mktemp(request.param), "v1")
    index.save(directory)
    return request.param, ProductIndex.load(directory)


def queries(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), n, replace=False)] + 0.3 * rng.standard_normal((n, x.shape[1])).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


# ---- the language ------------------------------------------------------------------------------------


def test_compiled_filters_equal_the_row_by_row_reference(data, tmp_path):
    _, _, rows = data
    store_path = tmp_path / "a.arrow"
    from itemsage.index.attributes import write_attributes

    kinds = write_attributes(store_path, table_of(rows))
    assert kinds == {"brand": "string", "category": "string", "in_stock": "bool", "listed_at": "time",
                     "price": "number", "stock": "integer", "tags": "strings"}
    store = AttributeStore.open(store_path)
    for spec in SPECS:
        want = [passes(r, spec) for r in rows]
        np.testing.assert_array_equal(compile_filter(store, spec), want, err_msg=json.dumps(spec))
    assert compile_filter(store, {}) is None and compile_filter(store, None) is None
    # the same store round-trips to plain Arrow columns (what a compaction writes again)
    again = AttributeStore.from_table(store.table())
    for spec in SPECS[:8]:
        np.testing.assert_array_equal(compile_filter(again, spec), compile_filter(store, spec))


@pytest.mark.parametrize("spec, column, problem", [
    ({"colour": "red"}, "colour", "not a filterable column"),
    ({"price": "cheap"}, "price", "expects finite numbers"),
    ({"price": True}, "price", "expects finite numbers"),
    ({"in_stock": "yes"}, "in_stock", "expects true or false"),
    ({"category": {"gte": "c1"}}, "category", "ranges (gte) apply to numbers"),
    ({"in_stock": {"lt": 1}}, "in_stock", "ranges (lt) apply to numbers"),
    ({"listed_at": {"gte": "2026-01-01"}}, "listed_at", "ISO-8601 times with a zone"),
    ({"price": {"between": [1, 2]}}, "price", "'between' not understood"),
    ({"price": {"not": 1, "lt": 3}}, "price", "'not' cannot be combined"),
    ({"tags": [1, 2]}, "tags", "expects strings"),
    ({"stock": {"gte": [1]}}, "stock", "'gte' takes one value"),
    ({"price": float("nan")}, "price", "expects finite numbers"),
])
def test_a_filter_that_does_not_fit_names_the_column_and_lists_the_filterable_ones(data, spec, column, problem):
    store = AttributeStore.from_table(table_of(data[2][:50]))
    with pytest.raises(FilterError) as err:
        compile_filter(store, spec)
    text = str(err.value)
    assert f"filter column '{column}'" in text and problem in text, text
    assert err.value.filterable == sorted(store.kinds)
    assert "Filterable columns: brand (string), category (string), in_stock (boolean), listed_at (time), " \
           "price (number), stock (integer), tags (list of strings)" in text
    with pytest.raises(FilterError, match="must be a JSON object"):
        compile_filter(store, ["category"])


# ---- every index kind against exact filtered search --------------------------------------------------


def check_against_exact(index, x, rows, q, exact_path, label, check_scores=True) -> list[float]:
    """Every filter of SPECS through `index.search` against the row-by-row reference: min(k, passing)
    results, each passing, scores the inner products (`check_scores`), the exact answer wherever
    `exact_path(passing)` says the plan searched the passing rows exactly; -> each query's recall."""
    recalls = []
    for spec in SPECS:
        passing = sum(passes(r, spec) for r in rows)
        found, scores = index.search(q, 10, filter=spec)
        for i in range(len(q)):
            want = exact(x, rows, q[i], 10, spec)
            got = [int(p[1:]) for p in found[i] if p]
            assert len(got) == min(10, passing), (spec, label)  # min(k, passing), always
            assert all(passes(rows[r], spec) for r in got), (spec, label)
            if check_scores:
                np.testing.assert_allclose(scores[i][: len(got)], x[got] @ q[i], atol=1e-5)
            if exact_path(passing):
                assert got == want, (spec, label)  # the exact path: the same products in the same order
            recalls.append(len(set(got) & set(want)) / len(want) if want else 1.0)
    return recalls


def test_filtered_search_equals_exact_filtered_search(built, data):
    kind, index = built
    ids, x, rows = data
    recalls = check_against_exact(index, x, rows, queries(x, 12, seed=1),
                                  lambda passing: kind == "flat" or passing <= index.tuning.exact_max_rows, kind)
    assert np.mean(recalls) >= 0.95, kind


def test_min_k_or_passing_results_for_every_count_and_k(built, data):
    kind, index = built
    ids, x, rows = data
    q = queries(x, 4, seed=2)
    rng = np.random.default_rng(3)
    for count in (0, 1, 5, 9, 10, 11, 300, 1500, N):
        chosen = set(rng.choice(N, count, replace=False).tolist())
        mask = RowMask.from_bool(np.isin(np.arange(N), list(chosen)))
        for k in (1, 10, 50):
            scores, found = index.search_rows(q, k, mask)
            for row in found:
                got = [r for r in row if r >= 0]
                assert len(got) == min(k, count) and set(got) <= chosen, (kind, count, k)


def test_the_planner_goes_exact_below_the_cutoff_and_survives_anti_correlated_filters(data):
    ids, x, rows = data
    index = ProductIndex.build(ids, x, "hnsw", attributes=table_of(rows), threads=1)
    tuning, search = index.tuning, index._search()
    assert tuning.selectivities[0] == 1.0 and tuning.exact_max_rows >= 1000
    assert list(tuning.values) == sorted(tuning.values) and min(tuning.recall) >= 0.95
    q = queries(x, 8, seed=4)
    rng = np.random.default_rng(5)
    for i in range(len(q)):
        few = RowMask.from_bool(rng.random(N) < 0.2)  # ~480 rows <= exact_max_rows
        _, found, path = plan(search, tuning, q[i : i + 1], 10, few)
        assert path == "exact" and set(found.tolist()) <= set(few.rows().tolist())
        many = RowMask.from_bool(rng.random(N) < 0.9)
        assert plan(search, tuning, q[i : i + 1], 10, many)[2] in ("probe", "ann")
    # Anti-correlated: the categories of the query's own neighbourhood left out, most rows still passing.
    cats = np.array([r["category"] for r in rows])
    for i in range(len(q)):
        near = set(cats[np.argsort(-(x @ q[i]))[:30]])
        spec = {"category": {"not": sorted(near)}}
        want = exact(x, rows, q[i], 10, spec)
        got = [int(p[1:]) for p in index.search(q[i : i + 1], 10, filter=spec)[0][0] if p]
        assert len(want) == 10 and len(set(got) & set(want)) >= 9, spec


def test_exclude_is_a_cleared_bit_of_the_same_mask(built, data):
    kind, index = built
    ids, x, rows = data
    q = queries(x, 5, seed=6)
    for i in range(len(q)):
        nearest = exact(x, rows, q[i], 30, None)
        for spec in (None, {"in_stock": True}):
            got = [int(p[1:]) for p in index.search(q[i : i + 1], 10, filter=spec, exclude=ids[nearest])[0][0] if p]
            want = exact(x, rows, q[i], 10, spec, exclude=nearest)
            assert len(got) == 10 and not set(got) & set(nearest)
            assert len(set(got) & set(want)) >= (10 if kind == "flat" else 9)
        one, _ = index.search_one(q[i], 10, exclude=[ids[nearest[0]]])
        assert ids[nearest[0]] not in one and len(one) == 10


def test_the_attributes_are_saved_listed_and_verified(built, tmp_path):
    kind, index = built
    manifest = index.manifest
    assert "attributes.arrow" in manifest["files"]
    assert manifest["attributes"]["tags"] == "strings" and manifest["attributes"]["listed_at"] == "time"
    tuning = manifest["search_tuning"]
    if kind == "flat":
        assert tuning["param"] == "" and tuning["exact_max_rows"] == N
    else:
        assert tuning["param"] == ("ef_search" if kind == "hnsw" else "nprobe")
        assert tuning["recall"][0] >= 0.95 and manifest["neighbour_recall_at_10"] == tuning["recall"][0]
        assert tuning["queries"] == {"tuning": 500, "evaluation": 400}
        served = index.ef_search if kind == "hnsw" else index.nprobe
        assert served == tuning["values"][0]  # the unfiltered search runs at the tuned value


def test_a_damaged_attributes_file_is_refused(data, tmp_path):
    ids, x, rows = data
    index = ProductIndex.build(ids[:300], x[:300], "flat", attributes=table_of(rows[:300]))
    directory = index.save(version_path(tmp_path, "v1"))
    raw = bytearray((directory / "attributes.arrow").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (directory / "attributes.arrow").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        ProductIndex.load(directory)


# ---- tuning: the IVF-PQ of a small catalog (issue 26, item 6) -----------------------------------------


def test_ivfpq_on_a_small_catalog_is_tuned_to_the_target_or_refused():
    rng = np.random.default_rng(9)
    centres = rng.standard_normal((30, 32))
    x = centres[rng.integers(0, 30, 1500)] + 0.6 * rng.standard_normal((1500, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.array([f"p{i}" for i in range(1500)], dtype=object)
    index = ProductIndex.build(ids, x, "ivfpq", threads=1)
    assert index.config.nlist == 38  # 1,500 // 39
    assert index.stats["neighbour_recall_at_10"] >= 0.95 and index.nprobe > 1  # before tuning: nprobe 1, 0.45
    # on other queries of the kind it was tuned on (perturbed catalog vectors, other rows, other noise)
    from itemsage.index.recall import perturbed_queries

    probe = perturbed_queries(x, 500, np.random.default_rng(10))
    truth = np.argsort(-(probe @ x.T), axis=1)[:, :10]
    found = index.search(probe, 10)[0]
    assert np.mean([len({f"p{t}" for t in tr} & set(fo)) / 10 for tr, fo in zip(truth, found)]) >= 0.95
    # Codes alone (no re-ranking) cannot reach 0.95 even probing every list: refused, saying what to do.
    with pytest.raises(TuningError, match=r"reaches recall@10 0\.\d+ at most .*--refine-factor"):
        ProductIndex.build(ids, x, "ivfpq", threads=1, refine_factor=1)
    # A fixed nprobe is the user's choice: built, its recall measured (and logged when under the target).
    fixed = ProductIndex.build(ids, x, "ivfpq", threads=1, nprobe=1)
    assert fixed.nprobe == 1 and fixed.stats["neighbour_recall_at_10"] < 0.95


# ---- live upserts and deletes ------------------------------------------------------------------------


def product_record(pid: str, attrs: dict) -> dict:
    out = {"product_id": pid}
    for k, v in attrs.items():
        out[k] = v.isoformat().replace("+00:00", "Z") if isinstance(v, dt.datetime) else v
    return out


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_live_upserts_and_deletes_are_filtered_at_once_and_after_a_replay(data, tmp_path, kind):
    ids, x, rows = data
    n = 1200
    base = ProductIndex.build(ids[:n], x[:n], kind, attributes=table_of(rows[:n]), threads=1)
    publish(tmp_path, base.save(version_path(tmp_path, "v1")))
    log = LiveLog(tmp_path)
    index = live.replay(load_current(tmp_path), log)
    current = {i: rows[i] for i in range(n)}  # the reference: row -> attributes of the live products
    vectors = {i: x[i] for i in range(n)}
    rng = np.random.default_rng(12)
    q = queries(x[:n], 6, seed=13)
    # Upsert: 10 new products near the first query (in stock), and the 10 nearest old ones go out of stock.
    nearest = exact(x[:n], rows[:n], q[0], 10, None)
    updates = []
    for j in range(10):
        v = q[0] + 0.05 * rng.standard_normal(DIM).astype(np.float32)
        new = dict(rows[j], in_stock=True, category="c-new", price=9.5)
        vectors[N + j], current[N + j] = v / np.linalg.norm(v), new
        updates.append(upsert_record(f"p{N + j:05d}", v, "m", product_record(f"p{N + j:05d}", new)))
    for r in nearest:
        current[r] = dict(rows[r], in_stock=False)
        updates.append(upsert_record(ids[r], x[r], "m", product_record(ids[r], current[r])))
    deleted = exact(x[:n], rows[:n], q[1], 5, {"in_stock": True})
    for r in deleted:
        del current[r], vectors[r]
        updates.append(delete_record(ids[r]))
    index.apply(log.append(updates))

    def check(idx) -> None:
        keys = sorted(current)
        mat = np.stack([vectors[r] for r in keys])
        live_rows = [current[r] for r in keys]
        for spec in ({"in_stock": True}, {"category": "c-new"}, {"price": {"lt": 10}}, None,
                     {"in_stock": False, "category": {"not": "c3"}}):
            passing = sum(passes(r, spec) for r in live_rows)
            for i in range(len(q)):
                want = [f"p{keys[j]:05d}" for j in exact(mat, live_rows, q[i], 10, spec)]
                got = [p for p in idx.search(q[i : i + 1], 10, filter=spec)[0][0] if p]
                assert len(got) == min(10, passing), spec
                assert all(passes(current[int(p[1:])], spec) for p in got), spec
                assert (got == want) if kind == "flat" else len(set(got) & set(want)) >= 9, spec

    check(index)
    assert not {ids[r] for r in nearest} & set(index.search(q[:1], 10, filter={"in_stock": True})[0][0])
    check(live.replay(load_current(tmp_path), LiveLog(tmp_path)))  # a restart replays the attributes
    # Compaction writes them into the new version.
    new_index, directory, folded = live.compact(tmp_path)
    assert folded == len(updates) and "attributes.arrow" in artifacts.read_manifest(directory)["files"]
    check(live.replay(load_current(tmp_path), LiveLog(tmp_path)))


# ---- where `itemsage index` reads the attributes -----------------------------------------------------


def embeddings_dir(path, ids, x, dataset=None):
    import pyarrow.parquet as pq

    path.mkdir(parents=True)
    pq.write_table(pa.table({"product_id": pa.array(list(ids), pa.string()),
                             "vector": pa.array(x.tolist(), pa.list_(pa.float32()))}), path / "part-00000.parquet")
    extra = {"count": len(ids), "dim": x.shape[1], "shards": ["part-00000.parquet"]}
    inputs = {"model": "m"}
    if dataset is not None:
        extra["dataset_dir"] = str(dataset.resolve())
        inputs["dataset"] = artifacts.fingerprint(dataset)
    artifacts.write_manifest(path, "embeddings", inputs=inputs, files=["part-00000.parquet"], extra=extra)
    return path


def test_index_reads_the_attributes_of_the_dataset_embed_recorded(data, tmp_path):
    import pyarrow.parquet as pq

    ids, x, rows = data
    n = 300
    dataset = tmp_path / "ds"
    dataset.mkdir()
    products = table_of(rows[:n]).add_column(0, "product_id", pa.array(list(ids[:n]), pa.string()))
    products = products.append_column("title", pa.array([["a title"]] * n, pa.list_(pa.string())))
    pq.write_table(products.take(np.arange(n)[::-1]), dataset / "products.parquet")  # another row order
    artifacts.write_manifest(dataset, "dataset", files=["products.parquet"])
    emb = embeddings_dir(tmp_path / "emb", ids[:n], x[:n], dataset)
    index, _ = build_from_embeddings(emb, tmp_path / "idx", version="v1")
    assert sorted(index.attributes.kinds) == ["brand", "category", "in_stock", "listed_at", "price", "stock", "tags"]
    assert "title" not in index.attributes.kinds  # free text is not stored by default
    for spec in SPECS[:6]:  # joined by product id: the filter sees each product's own values
        np.testing.assert_array_equal(compile_filter(index.attributes, spec), [passes(r, spec) for r in rows[:n]])
    picked, _ = build_from_embeddings(emb, tmp_path / "idx", version="v2", filterable=["price", "title"])
    assert picked.attributes.kinds == {"price": "number", "title": "strings"}
    with pytest.raises(ValueError, match="'colour', which the attribute source does not have"):
        build_from_embeddings(emb, tmp_path / "idx", version="v3", filterable=["colour"])
    # A dataset changed since embed read it is refused; --attributes reads it as it is now.
    pq.write_table(products.slice(0, n - 1), dataset / "products.parquet")
    artifacts.write_manifest(dataset, "dataset", files=["products.parquet"])
    with pytest.raises(ArtifactError, match="changed since"):
        build_from_embeddings(emb, tmp_path / "idx", version="v4")
    given, _ = build_from_embeddings(emb, tmp_path / "idx", version="v5", attributes=dataset)
    assert compile_filter(given.attributes, {"price": {"gte": 0}}).sum() == \
        sum(passes(r, {"price": {"gte": 0}}) for r in rows[: n - 1])  # the product it lacks has no values
    # Embeddings that name no dataset: an index without filterable columns, whose filters are refused.
    bare, _ = build_from_embeddings(embeddings_dir(tmp_path / "emb2", ids[:n], x[:n]), tmp_path / "idx2", version="v1")
    assert bare.attributes is None
    with pytest.raises(FilterError, match="stores no filterable columns"):
        bare.search(x[:1], 5, filter={"price": {"lt": 3}})
    assert len(bare.search(x[:1], 5, filter={})[0][0]) == 5
