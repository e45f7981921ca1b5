"""The demo shop: determinism, the input schema of docs/ARCHITECTURE.md, and that its signals are really there.

Every signal check compares against an independent baseline computed here (shuffled labels,
random pairings, exact nearest-neighbour search in numpy), never against numbers the generator
reports about itself.
"""

from __future__ import annotations

import datetime as dt
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from itemsage import artifacts, schema
from itemsage.cli import app
from itemsage.config import ConfigError
from itemsage.data.demo_shop import (
    CATALOG_FILE,
    ENGAGEMENTS_FILE,
    LATENTS_FILE,
    MANIFEST_KIND,
    MEDOIDS_FILE,
    DemoConfig,
    DemoShop,
    generate_demo_data,
)

# Enough brands that a category holds several (so a brand probe has something to find), small
# vectors and a short window so the whole module runs in seconds.
TINY = DemoConfig(products=3000, days=7, users=300, image_dim=32, brands=100, styles=8, seed=3,
                  engagements_per_product=10)


@pytest.fixture(scope="module")
def shop_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shop")
    generate_demo_data(out, TINY, progress=False)
    return out


@pytest.fixture(scope="module")
def catalog(shop_dir) -> pa.Table:
    return pq.read_table(shop_dir / CATALOG_FILE)


@pytest.fixture(scope="module")
def logs(shop_dir) -> pa.Table:
    return pq.read_table(shop_dir / ENGAGEMENTS_FILE)


@pytest.fixture(scope="module")
def latent() -> DemoShop:
    """The hidden truth (styles, brands, tiers), rebuilt from the same config; never in the files."""
    return DemoShop(TINY)


@pytest.fixture(scope="module")
def main_images(catalog) -> np.ndarray:
    return np.array([images[0] for images in catalog[schema.IMAGE_EMBEDDINGS].to_pylist()], np.float32)


def index_of(ids: pa.Array) -> np.ndarray:
    """'p000123' -> 123 (the generator numbers products and users in order)."""
    return np.array([int(x[1:]) for x in ids.to_pylist()])


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.casefold()))


def product_words(catalog: pa.Table) -> list[set[str]]:
    return [words(t + " " + d) for t, d in zip(catalog["title"].to_pylist(), catalog["description"].to_pylist())]


def centroid_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> float:
    """Nearest-centroid probe of label y from features x, trained and tested within each group
    (half / half), so what the group (category) already tells is the same for every label."""
    rng = np.random.default_rng(seed)
    hits = total = 0
    for g in np.unique(groups):
        rows = rng.permutation(np.flatnonzero(groups == g))
        train, test = rows[: len(rows) // 2], rows[len(rows) // 2 :]
        if len(test) == 0:
            continue
        labels = np.unique(y[train])
        centroids = np.stack([x[train][y[train] == label].mean(0) for label in labels])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
        hits += int((labels[np.argmax(x[test] @ centroids.T, 1)] == y[test]).sum())
        total += len(test)
    return hits / total


def shuffled_within(y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """y with labels permuted inside each group: keeps the group -> label link, breaks the rest."""
    rng, out = np.random.default_rng(seed), y.copy()
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        out[rows] = y[rng.permutation(rows)]
    return out


def probe_and_chance(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    chance = np.mean([centroid_accuracy(x, shuffled_within(y, groups, s), groups) for s in range(5)])
    return centroid_accuracy(x, y, groups), float(chance)


def bag_of_words(docs: list[set[str]]) -> np.ndarray:
    vocab = {w: i for i, w in enumerate(sorted(set().union(*docs)))}
    x = np.zeros((len(docs), len(vocab)), np.float32)
    for i, doc in enumerate(docs):
        x[i, [vocab[w] for w in doc]] = 1.0
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="products"):
        DemoConfig(products=3)
    with pytest.raises(ConfigError, match="image_dim"):
        DemoConfig(image_dim=4)
    with pytest.raises(ConfigError, match="days"):
        DemoConfig(days=1)
    with pytest.raises(ConfigError, match="surface_mix"):
        DemoConfig(surface_mix=(1.0, -1.0, 0.0))


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path):
    small = DemoConfig(products=400, days=3, users=60, image_dim=16, seed=11)
    a = generate_demo_data(tmp_path / "a", small, progress=False)
    b = generate_demo_data(tmp_path / "b", small, progress=False)
    for name in (CATALOG_FILE, ENGAGEMENTS_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert a["files"][name]["sha256"] == b["files"][name]["sha256"]
    generate_demo_data(tmp_path / "c", DemoConfig(products=400, days=3, users=60, image_dim=16, seed=12),
                       progress=False)
    for name in (CATALOG_FILE, ENGAGEMENTS_FILE):
        assert not pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "c" / name))


def test_catalog_schema_matches_the_input_contract(catalog):
    expected = {
        schema.PRODUCT_ID: pa.string(), "title": pa.string(), "description": pa.string(),
        "brand": pa.string(), "colors": pa.list_(pa.string()), "materials": pa.list_(pa.string()),
        "patterns": pa.string(), "size": pa.string(), "size_type": pa.string(),
        "product_type": pa.string(), "category": pa.string(), "domain": pa.string(),
        "links": pa.string(), "price": pa.float64(), schema.LISTED_AT: pa.timestamp("ms", tz="UTC"),
        schema.IMAGE_EMBEDDINGS: pa.list_(pa.list_(pa.float32())),
    }
    assert {f.name: f.type for f in catalog.schema} == expected
    assert set(schema.TEXT_FIELDS) <= set(catalog.column_names)
    ids = catalog[schema.PRODUCT_ID].to_pylist()
    assert len(ids) == TINY.products == len(set(ids))
    for field in schema.TEXT_FIELDS:
        assert catalog[field].null_count == 0, field
    assert all(" > " in c for c in catalog["category"].to_pylist())
    assert 1 < len(set(catalog["category"].to_pylist())) <= 60
    assert pc.min(catalog["price"]).as_py() > 0


def test_log_schema_and_query_columns(logs, catalog):
    expected = {
        schema.SURFACE: pa.string(), schema.ENGAGEMENT: pa.string(), schema.PRODUCT_ID: pa.string(),
        schema.TIMESTAMP: pa.timestamp("ms", tz="UTC"), schema.USER_ID: pa.string(),
        schema.QUERY_TEXT: pa.string(), schema.QUERY_EMBEDDING: pa.list_(pa.float32()),
        schema.QUERY_PRODUCT_ID: pa.string(),
    }
    assert {f.name: f.type for f in logs.schema} == expected
    assert set(logs[schema.SURFACE].to_pylist()) == set(schema.SURFACES)
    assert set(logs[schema.ENGAGEMENT].to_pylist()) == set(schema.ENGAGEMENTS)
    assert set(logs[schema.PRODUCT_ID].to_pylist()) <= set(catalog[schema.PRODUCT_ID].to_pylist())
    assert logs[schema.USER_ID].null_count == 0
    surface = np.array(logs[schema.SURFACE].to_pylist())
    has_text = ~np.array(logs[schema.QUERY_TEXT].is_null().to_pylist())
    has_vector = ~np.array(logs[schema.QUERY_EMBEDDING].is_null().to_pylist())
    np.testing.assert_array_equal(has_text, surface == "search")
    np.testing.assert_array_equal(has_vector, surface != "search")
    np.testing.assert_array_equal(~np.array(logs[schema.QUERY_PRODUCT_ID].is_null().to_pylist()), surface != "search")
    widths = pc.list_value_length(logs[schema.QUERY_EMBEDDING].drop_null()).to_numpy()
    assert (widths == TINY.image_dim).all()
    assert all(t.strip() for t in logs[schema.QUERY_TEXT].drop_null().to_pylist())


def test_image_vectors_are_unit_with_the_requested_width(catalog):
    counts = pc.list_value_length(catalog[schema.IMAGE_EMBEDDINGS]).to_numpy()
    assert counts.min() >= 1 and counts.max() <= TINY.max_images
    assert len(np.unique(counts)) == TINY.max_images  # every count 1..4 occurs
    flat = np.array(pc.list_flatten(catalog[schema.IMAGE_EMBEDDINGS]).to_pylist(), np.float32)
    assert flat.shape == (counts.sum(), TINY.image_dim)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1.0, atol=1e-5)


def test_all_tasks_present_conversions_sparse_and_manifest_counts(logs, shop_dir):
    surface = np.array(logs[schema.SURFACE].to_pylist())
    engagement = np.array(logs[schema.ENGAGEMENT].to_pylist())
    manifest = artifacts.verify_manifest(shop_dir, MANIFEST_KIND)
    for s in schema.SURFACES:
        n = {e: int(((surface == s) & (engagement == e)).sum()) for e in schema.ENGAGEMENTS}
        assert n["click"] > n["save"] > n["add_to_cart"] > n["checkout"] > 0, (s, n)
        assert 0.003 <= n["checkout"] / n["click"] <= 0.05, (s, n)
        assert 0.01 <= n["add_to_cart"] / n["click"] <= 0.10, (s, n)
        for e in schema.ENGAGEMENTS:
            assert manifest["counts"]["rows_per_task"][schema.task_name(s, e)] == n[e]
    assert manifest["counts"]["rows"] == logs.num_rows
    # Roughly the asked number of rows (tiny shops lose some to duplicate engagements).
    asked = TINY.engagements_per_product * TINY.products
    assert 0.5 * asked <= logs.num_rows <= 1.3 * asked


def test_same_style_images_are_closer_at_fixed_category(main_images, latent):
    style, category = latent.products.style, latent.products.category
    gaps = []
    for c in np.unique(category):
        rows = np.flatnonzero(category == c)
        sim = main_images[rows] @ main_images[rows].T
        same = (style[rows][:, None] == style[rows][None, :]) & ~np.eye(len(rows), dtype=bool)
        different = style[rows][:, None] != style[rows][None, :]
        if same.any() and different.any():
            gaps.append(sim[same].mean() - sim[different].mean())
    assert np.mean(gaps) > 0.15 and np.mean(np.array(gaps) > 0) > 0.9


def test_style_is_only_in_the_images_and_brand_only_in_the_text(main_images, catalog, latent):
    p = latent.products
    text = bag_of_words(product_words(catalog))
    # Images: style is plainly decodable, brand and material no better than shuffled labels.
    acc, chance = probe_and_chance(main_images, p.style, p.category)
    assert acc > chance + 0.5, (acc, chance)
    for label in (p.brand, p.material, p.size):
        acc, chance = probe_and_chance(main_images, label, p.category)
        assert acc < chance + 0.06, (acc, chance)
    # Text: the reverse.
    acc, chance = probe_and_chance(text, p.brand, p.category)
    assert acc > chance + 0.2, (acc, chance)
    acc, chance = probe_and_chance(text, p.style, p.category)
    assert acc < chance + 0.05, (acc, chance)
    brands = catalog["brand"].to_pylist()
    assert all(b.casefold() in t.casefold() for b, t in zip(brands, catalog["title"].to_pylist()))


def test_closeup_engagements_share_the_viewed_products_style(logs, main_images, latent):
    closeup = logs.filter(pc.equal(logs[schema.SURFACE], "closeup"))
    queries = np.array(closeup[schema.QUERY_EMBEDDING].to_pylist(), np.float32)
    viewed = np.argmax(queries @ main_images.T, axis=1)  # exact nearest main image = the viewed product
    engaged = index_of(closeup[schema.PRODUCT_ID])
    style, category = latent.products.style, latent.products.category
    same_style = (style[viewed] == style[engaged]).mean()
    chance = ((np.bincount(style) / len(style)) ** 2).sum()
    assert same_style > 0.6 and same_style > 4 * chance, (same_style, chance)
    assert (category[viewed] == category[engaged]).mean() > 0.85
    assert (viewed != engaged).all()  # a closeup never engages the product being viewed
    # query_product_id names the viewed product: its main image is the query's (noise cos ~0.97).
    named = index_of(closeup[schema.QUERY_PRODUCT_ID])
    cosine = (queries * main_images[named]).sum(1)
    assert cosine.min() > 0.9 and (named == viewed).mean() > 0.99 and (named != engaged).all()


def test_home_queries_are_a_users_cluster_medoid_image(logs, main_images, latent):
    home = logs.filter(pc.equal(logs[schema.SURFACE], "home"))
    queries = np.array(home[schema.QUERY_EMBEDDING].to_pylist(), np.float32)
    best = np.argmax(queries @ main_images.T, axis=1)
    # The medoid is an actual history product's image.
    np.testing.assert_allclose(queries, main_images[best], atol=1e-6)
    # query_product_id names that medoid product: the query is exactly its main image.
    np.testing.assert_allclose(queries, main_images[index_of(home[schema.QUERY_PRODUCT_ID])], atol=1e-6)
    users = index_of(home[schema.USER_ID])
    engaged = index_of(home[schema.PRODUCT_ID])
    category = latent.products.category
    # Engaged products follow the user's interests: mostly the medoid's category.
    assert (category[best] == category[engaged]).mean() > 0.6
    interest = (category[engaged][:, None] == latent.users.cluster_category[users]).any(1)
    assert interest.mean() > 0.85


def test_the_recorded_latents_reproduce_the_log(shop_dir, logs, latent):
    """latents.parquet is row-aligned with the log and names each row's query and its draws: the log's
    query products, days, search targets and texts, and engaged counts follow from it."""
    from itemsage.data.demo_shop import read_latents
    from itemsage.data.demo_shop.world import COLORS, PATTERNS, QUERY_TEMPLATES

    lat = read_latents(shop_dir)
    assert len(lat.query) == logs.num_rows and lat.medoid.shape == (TINY.n_users, 3)
    surface = np.array([schema.SURFACES.index(x) for x in logs[schema.SURFACE].to_pylist()])
    user, product = index_of(logs[schema.USER_ID]), index_of(logs[schema.PRODUCT_ID])
    engagement = np.array([schema.ENGAGEMENTS.index(x) for x in logs[schema.ENGAGEMENT].to_pylist()])
    qpid = np.array([-1 if x is None else int(x[1:]) for x in logs[schema.QUERY_PRODUCT_ID].to_pylist()])
    # one query's rows: one user, one surface, one cluster and anchor
    first = np.unique(lat.query, return_index=True)[1]
    at = np.searchsorted(lat.query[first], lat.query)
    for column in (user, surface, lat.cluster, lat.anchor, lat.template, lat.engaged, lat.day):
        assert np.array_equal(column, column[first][at])
    # the query product the log names: the viewed product (closeup), the user cluster's medoid (home)
    closeup, home, search = surface == 1, surface == 2, surface == 0
    assert np.array_equal(qpid[closeup], lat.anchor[closeup]) and (product[closeup] != lat.anchor[closeup]).all()
    assert np.array_equal(qpid[home], lat.medoid[user[home], lat.cluster[home]]) and (qpid[search] == -1).all()
    # every search engages its target first: a click on the anchor
    clicked_target = np.zeros(lat.query.max() + 1, bool)
    hit = search & (engagement == 0) & (product == lat.anchor)
    clicked_target[lat.query[hit]] = True
    assert clicked_target[lat.query[search]].all()
    # the text names the target's attributes its template names
    p = latent.products
    texts = logs[schema.QUERY_TEXT].to_pylist()
    for i in np.flatnonzero(search)[:300]:
        a, template, text = lat.anchor[i], QUERY_TEMPLATES[lat.template[i]], texts[i]
        if "{color}" in template:
            assert COLORS[p.color[a]] in text
        if "{pattern}" in template:
            assert PATTERNS[p.pattern[a]] in text
        if "{material}" in template:
            assert latent.materials[p.material[a]] in text
        if "{brand}" in template:
            assert latent.brand_names[p.brand[a]].lower() in text
    # the day, and at most `engaged` distinct products per query
    start = dt.datetime.fromisoformat(TINY.start_date).replace(tzinfo=dt.timezone.utc).timestamp() * 1000
    ms = logs[schema.TIMESTAMP].cast(pa.int64()).to_numpy()
    assert np.array_equal((ms - int(start)) // 86_400_000, lat.day)
    distinct = np.unique(np.stack([lat.query, product]), axis=1)[0]
    assert (np.bincount(distinct) <= np.bincount(lat.query, lat.engaged) / np.maximum(np.bincount(lat.query), 1)).all()
    # users' clusters drawn around their category: the medoid is mostly a product of it
    assert (p.category[lat.medoid] == latent.users.cluster_category).mean() > 0.9


def test_search_query_words_appear_in_the_engaged_products_text(logs, catalog):
    search = logs.filter(pc.equal(logs[schema.SURFACE], "search"))
    text = product_words(catalog)
    queries = [words(q) - {"best", "cheap", "buy", "new"} for q in search[schema.QUERY_TEXT].to_pylist()]
    engaged = index_of(search[schema.PRODUCT_ID])
    covered = np.mean([len(q & text[i]) / len(q) for q, i in zip(queries, engaged)])
    shuffled = np.random.default_rng(0).permutation(engaged)
    baseline = np.mean([len(q & text[i]) / len(q) for q, i in zip(queries, shuffled)])
    assert covered > 0.9 and baseline < 0.3, (covered, baseline)


def test_listed_at_is_the_launch_day_and_no_engagement_comes_before_it(logs, catalog, latent):
    start = dt.datetime.fromisoformat(TINY.start_date).replace(tzinfo=dt.timezone.utc)
    listed = catalog[schema.LISTED_AT].cast(pa.int64()).to_numpy()  # [P] in catalog order
    rows = index_of(catalog[schema.PRODUCT_ID])
    day = (listed - int(start.timestamp() * 1000)) / 86_400_000
    np.testing.assert_array_equal(day, latent.products.launch_day[rows])
    assert (day > 0).sum() > 0 and (day == 0).sum() > len(day) // 2  # some launch during the window
    first = np.full(TINY.products, np.iinfo(np.int64).max)
    np.minimum.at(first, index_of(logs[schema.PRODUCT_ID]), logs[schema.TIMESTAMP].cast(pa.int64()).to_numpy())
    assert (first[rows] >= listed).all()


def test_timestamps_cover_the_window_and_late_products_appear_late(logs, latent):
    start = dt.datetime.fromisoformat(TINY.start_date).replace(tzinfo=dt.timezone.utc)
    ms = logs[schema.TIMESTAMP].cast(pa.int64()).to_numpy()
    t0 = int(start.timestamp() * 1000)
    day = (ms - t0) // 86_400_000
    assert day.min() == 0 and day.max() == TINY.days - 1
    assert len(np.unique(day)) == TINY.days
    # Session order: queries by start time, so a row is never more than a session (< 1 h) older
    # than the rows before it.
    lag = np.maximum.accumulate(ms) - ms
    assert lag.max() < 3_600_000
    # No product is engaged before it launches; some only appear in the last days (cold start).
    product = index_of(logs[schema.PRODUCT_ID])
    launch = latent.products.launch_day[product]
    assert (day >= launch).all()
    first_day = np.full(TINY.products, TINY.days)
    np.minimum.at(first_day, product, day)
    assert ((first_day >= TINY.days - 2) & (first_day < TINY.days)).sum() >= 5


def test_conversions_favour_the_users_price_tier_and_saves_their_styles(logs, latent):
    p, u = latent.products, latent.users
    product, user = index_of(logs[schema.PRODUCT_ID]), index_of(logs[schema.USER_ID])
    engagement = np.array(logs[schema.ENGAGEMENT].to_pylist())
    tier_match = latent.brand_tier[p.brand[product]] == u.tier[user]
    style_match = (p.style[product][:, None] == u.styles[user]).any(1)
    clicks = engagement == "click"
    assert tier_match[engagement == "checkout"].mean() > tier_match[clicks].mean() + 0.2
    assert tier_match[engagement == "add_to_cart"].mean() > tier_match[clicks].mean() + 0.2
    assert style_match[engagement == "save"].mean() > style_match[clicks].mean() + 0.1


def test_popularity_is_skewed_but_not_degenerate(logs):
    counts = np.sort(np.bincount(index_of(logs[schema.PRODUCT_ID]), minlength=TINY.products))[::-1]
    top_tenth = counts[: TINY.products // 10].sum() / counts.sum()
    assert 0.3 < top_tenth < 0.8, top_tenth
    assert counts[0] / counts.sum() < 0.05


def test_refuses_a_foreign_directory_and_replaces_its_own(tmp_path):
    small = DemoConfig(products=200, days=2, users=50, image_dim=8)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        generate_demo_data(foreign, small, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    # A killed run leaves our own files without a manifest (and a hidden temp file): start over.
    out = tmp_path / "shop"
    out.mkdir()
    (out / CATALOG_FILE).write_bytes(b"torn")
    (out / f".{ENGAGEMENTS_FILE}.x1y2.tmp").write_bytes(b"torn")
    generate_demo_data(out, small, progress=False)
    assert pq.read_metadata(out / CATALOG_FILE).num_rows == 200
    manifest = generate_demo_data(out, DemoConfig(products=300, days=2, users=50, image_dim=8), progress=False)
    assert manifest["counts"]["products"] == 300
    assert pq.read_metadata(out / CATALOG_FILE).num_rows == 300
    assert sorted(p.name for p in out.iterdir()) == sorted([CATALOG_FILE, ENGAGEMENTS_FILE, LATENTS_FILE, MEDOIDS_FILE,
                                                            "manifest.json"])
    # Another stage's artifact is never overwritten.
    artifacts.write_manifest(tmp_path / "other", "dataset", files=[])
    with pytest.raises(ConfigError, match="dataset"):
        generate_demo_data(tmp_path / "other", small, progress=False)


def test_cli_writes_a_shop_and_reports_option_names(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["demo-data", "--products", "300", "--out", str(out), "--seed", "5",
                                 "--days", "3", "--image-dim", "16", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "demo-data" and manifest["config"]["image_dim"] == 16
    assert "checkout" in result.output
    bad = runner.invoke(app, ["demo-data", "--products", "300", "--out", str(tmp_path / "x"), "--image-dim", "4"])
    assert bad.exit_code == 2 and "--image-dim" in bad.output
