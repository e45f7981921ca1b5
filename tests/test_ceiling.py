"""The demo shop's ceiling (evaluate/ceiling*.py): hand-computed cases, the counting against brute
force, the probabilities against the shop's own log, the dataset checks and the cache.

References are computed here: fractions by hand, every product scored and counted one by one, the
log's own engagement counts; never numbers the ceiling code printed before."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from itemsage import artifacts, schema
from itemsage.data.demo_shop import LATENTS_FILE, DemoConfig, DemoShop, generate_demo_data, read_latents
from itemsage.data.ingest import IngestConfig, ingest
from itemsage.evaluate import ceiling as C
from itemsage.evaluate import ceiling_model as M
from itemsage.evaluate import ceiling_ranks as R
from itemsage.evaluate.ceiling_data import NoCeiling, demo_config, find_shop, window_rows
from itemsage.metrics import expected_recall

TINY = DemoConfig(products=600, days=7, users=120, image_dim=16, brands=60, styles=8, seed=5,
                  engagements_per_product=30)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceiling")
    generate_demo_data(root / "shop", TINY, progress=False)
    ingest(root / "shop" / "catalog.parquet", root / "shop" / "engagements.parquet", root / "data",
           IngestConfig(progress=False))
    shop_dir, manifest = find_shop(root / "data")
    latents = read_latents(shop_dir)
    shop = DemoShop(demo_config(manifest))
    return SimpleNamespace(root=root, data=root / "data", shop_dir=shop_dir, latents=latents, shop=shop,
                           P=M.Products(shop), pop=M.Population(shop, latents.medoid))


# ---- by hand ------------------------------------------------------------------------------------

P_N = [Fraction(1, 2 ** k) for k in range(1, 6)] + [Fraction(1, 32)]


def g_hand(q: Fraction, first_known: bool) -> Fraction:
    """E_n[1 - (1 - q)^(n - first_known)], n = min(Geometric(1/2), 6), exactly."""
    return sum(p * (1 - (1 - q) ** (k - first_known)) for k, p in enumerate(P_N, start=1))


def test_inclusion_and_its_inverse_by_hand():
    assert g_hand(Fraction(1, 4), True) == Fraction(6505, 32768)
    for q in (Fraction(1, 4), Fraction(3, 4), Fraction(63, 64), Fraction(1, 10 ** 8)):
        for first in (False, True):
            assert M.inclusion(np.array([float(q)]), first)[0] == pytest.approx(float(g_hand(q, first)), rel=1e-14)
    y = np.array([1e-9, 3e-5, 0.2, 0.9, 0.999])
    assert M.inclusion(M.inclusion_inverse(y)) == pytest.approx(y, rel=1e-14)
    assert M.inclusion_inverse(np.array([1.0, 2.0])).tolist() == [np.inf, np.inf]


def two_products():
    """Two products, A (popularity 1) and B (popularity 3): one category, style and brand; one user,
    whose three interest clusters all point at them; B is A's closeup medoid and vice versa."""
    products = SimpleNamespace(category=np.array([0, 0]), style=np.array([0, 0]), brand=np.array([0, 0]),
                               launch_day=np.array([0, 0]), popularity=np.array([1.0, 3.0]))
    users = SimpleNamespace(tier=np.array([0]), styles=np.array([[0, 0]]), cluster_category=np.zeros((1, 3), np.int64),
                            cluster_style=np.zeros((1, 3), np.int64), cluster_brand=np.zeros((1, 3), np.int64),
                            cluster_cum=np.array([[1 / 3, 2 / 3, 1.0]]), activity=np.array([1.0]))
    shop = SimpleNamespace(products=products, users=users, brand_tier=np.array([0]),
                           cfg=SimpleNamespace(products=2, styles=1, brands=1),
                           query_keys=(lambda a: np.zeros(len(np.atleast_1d(a)), np.int64),) * 6)
    P = M.Products(shop)
    pop = M.Population(shop, np.ones((1, 3), np.int64))
    return P, pop


def test_two_products_search_by_hand():
    """The text names both products; the target is A or B by popularity (1/4, 3/4), and so is every later
    draw. Observable: P(A in S) = 1/4 + 3/4 g(1/4) = 52283/131072, P(B in S) = 3/4 + 1/4 g(3/4) = 112347/131072.
    Oracle, the target A known: A 1, B g(3/4) = 14043/32768. Ranked, B first: Recall@1 over a query's rows
    is E[1(B in S)] / E|S| = 112347/164630 (observable)."""
    P, pop = two_products()
    day = M.Day(P, P.popularity, 0)
    post = M.AnchorPosterior(day, pop)
    one = np.array([0])
    obs = M.search_batch(day, pop, post, 0, one, one, one, one)
    assert obs.local(M.CLICK)[0] == pytest.approx([52283 / 131072, 112347 / 131072], rel=1e-14)
    orc = M.search_batch(day, pop, None, 0, one, one, one, one)
    assert orc.local(M.CLICK)[0] == pytest.approx([1.0, 14043 / 32768], rel=1e-14)
    # the engine's ranks of the two possible pairs, weighted by how often each pair occurs
    g, t, rest = R.count_local(obs, M.CLICK, np.array([0, 0]), np.array([0, 1]), np.array([-1, -1]), day)
    assert rest is None and g.tolist() == [1, 0] and t.tolist() == [0, 0]
    p_in = np.array([52283, 112347]) / 131072
    recall_at_1 = float((p_in * expected_recall(g, t, 1)).sum() / p_in.sum())
    assert recall_at_1 == pytest.approx(112347 / 164630, rel=1e-12)


def test_two_products_search_simulated():
    """The generator's search process in the two-product shop, simulated: the observable Recall@1 above."""
    rng = np.random.default_rng(0)
    n_q = 400_000
    target = (rng.random(n_q) < 0.75).astype(int)  # 1 = B
    n = np.minimum(rng.geometric(0.5, n_q), 6)
    has = np.zeros((n_q, 2), bool)
    has[np.arange(n_q), target] = True
    for pos in range(1, 6):
        draw = (rng.random(n_q) < 0.75).astype(int)
        live = n > pos
        has[np.arange(n_q)[live], draw[live]] = True
    assert has[:, 1].sum() / has.sum() == pytest.approx(112347 / 164630, abs=3e-3)


def test_two_products_closeup_by_hand():
    """Viewing A: each part draws B w.p. 3/4 and A w.p. 1/4 (then again from the same part, then from the
    category): B's per-position probability 3/4 (1 + 1/4) + (1/4)^2 3/4 = 63/64; A, left out, 0.
    Outside A's category only "anything" remains: beta = 0.05 (1 + 1/4) / 4."""
    P, pop = two_products()
    day = M.Day(P, P.popularity, 0)
    batch = M.closeup_batch(day, pop, None, 0, np.array([0]), np.array([0]))
    assert batch.local(M.CLICK)[0] == pytest.approx([0.0, float(g_hand(Fraction(63, 64), False))], rel=1e-14)
    assert batch.beta[0] == pytest.approx(0.05 * (1 + 1 / 4) / 4, rel=1e-12)


# ---- the counting against brute force, the probabilities against the log ------------------------


def _full_scores(batch: M.Batch, e: int, slots: np.ndarray, day: M.Day) -> np.ndarray:
    """Every product's score [P, N]: the batch's exact scores on idx, the dense formula elsewhere."""
    P = day.products
    out = np.zeros((len(slots), P.n))
    if batch.tables is not None:
        F = np.broadcast_to(M.group_factors(e, {n: v[slots] for n, v in batch.tables.items()}, len(slots)),
                            (len(slots), P.n_groups[e]))
        out[:] = M.inclusion(batch.beta[slots][:, None] * day.w[None, :]) * F[:, P.group[e]]
    out[:, batch.idx] = batch.local(e)[slots]
    return out


def _each_batch(kind: str, P, pop, rows):
    """(day, pairs, slots, batch) as kind_ranks builds them."""
    w = R.kind_weights(kind, P, rows)
    for d in np.unique(rows.day).tolist():
        day = M.Day(P, w, d)
        post = None if kind == "oracle" else M.AnchorPosterior(day, pop)
        for surface in (M.SEARCH, M.CLOSEUP, M.HOME):
            sel = np.flatnonzero((rows.day == d) & (rows.surface == surface))
            if len(sel):
                batch_of, key_of, build = R._plan(surface, kind == "oracle", rows, sel, P, pop, day, post)
                for at, slots, first in R._batches(batch_of, key_of):
                    yield day, sel[at], slots, build(first)


@pytest.mark.parametrize("kind", R.KINDS)
def test_counts_equal_every_product_scored_and_counted(tiny, kind):
    rows = window_rows(tiny.data, tiny.shop_dir, tiny.latents, TINY.products)
    greater, tied = R.kind_ranks(kind, tiny.P, tiny.pop, rows)
    checked = 0
    for day, pairs, slots, batch in _each_batch(kind, tiny.P, tiny.pop, rows):
        for e in np.unique(rows.engagement[pairs]).tolist():
            m = rows.engagement[pairs] == e
            scores = _full_scores(batch, e, slots[m], day)
            p, x = rows.product[pairs[m]], np.where(rows.surface[pairs[m]] == 1, rows.query_product[pairs[m]], -1)
            s = scores[np.arange(len(p)), p][:, None]
            if (x >= 0).any():  # left out of the ranking: the viewed product
                scores[np.flatnonzero(x >= 0), x[x >= 0]] = np.nan
            above = (scores > s + np.abs(s) * R.RTOL).sum(1)
            same = (np.abs(scores - s) <= np.abs(s) * R.RTOL).sum(1) - 1
            assert greater[pairs[m]].tolist() == above.tolist()
            assert tied[pairs[m]].tolist() == same.tolist()
            checked += int(m.sum())
    assert checked == len(rows) > 500
    if kind == "features":  # every product equally popular: many ties, which the engine must count
        assert tied.mean() > 1


def _closeup_nothing(day: M.Day, viewed: np.ndarray) -> np.ndarray:
    """P(a closeup of `viewed` engages nothing), from the generator's rules: a position yields nothing
    when its part draws the viewed product twice and the category then draws it too (z), so
    P = E_n[z^n], n = min(Geometric(1/2), 6)."""
    P = day.products
    w = day.w[viewed]
    parts = [(0.8, w / day.cs[P.cs[viewed]]), (0.15, w / day.c[P.cat[viewed]]), (0.05, w / day.any)]
    z = sum(weight * d ** 2 for weight, d in parts) * (w / day.c[P.cat[viewed]])
    return sum(float(p) * z ** k for k, p in enumerate(P_N, start=1))


@pytest.mark.parametrize("kind", ["oracle", "observable"])
def test_probabilities_add_up_to_the_logs_engagements(tiny, kind):
    """Summed over products, P(j in S_e) is the expected number of products a query engaged by e: over the
    train window's queries it must match the log's own count of (query, product, e) rows."""
    rows = window_rows(tiny.data, tiny.shop_dir, tiny.latents, TINY.products, window="train")
    for surface in (M.SEARCH, M.CLOSEUP, M.HOME):
        for e in (M.CLICK, M.SAVE):
            expected = observed = 0.0
            for day, pairs, slots, batch in _each_batch(kind, tiny.P, tiny.pop, rows):
                if rows.surface[pairs[0]] != surface:
                    continue
                everyone = np.arange(len(batch.local(e)))
                per_key = _full_scores(batch, e, everyone, day).sum(1)  # [B] expected products engaged by e
                if surface == M.CLOSEUP:  # the log holds only queries that engaged something: condition on it
                    per_key /= 1.0 - _closeup_nothing(day, rows.anchor[pairs[np.unique(slots, return_index=True)[1]]])
                queries = np.unique(np.stack([slots, rows.query[pairs]]), axis=1)  # distinct (key, query)
                expected += per_key[queries[0]].sum()
                observed += int((rows.engagement[pairs] == e).sum())
            assert observed > 150
            # |S_e| of a query has a variance of about twice its mean (n is geometric)
            assert abs(expected - observed) < 4 * np.sqrt(3 * observed), (surface, e, expected, observed)
            assert expected == pytest.approx(observed, rel=0.12)


# ---- the dataset's checks, the cache --------------------------------------------------------------


def test_a_dataset_whose_shop_moved_or_predates_the_latents_has_no_ceiling(tiny, tmp_path):
    rows = np.arange(3)
    ok = C.ceiling_figures(tiny.data, rows, np.array(["search.click"] * 3), np.zeros(3))
    assert ok["available"] and set(ok["kinds"]) == {"oracle", "observable"}
    moved = tmp_path / "moved"
    shutil.copytree(tiny.root, moved)
    shutil.rmtree(moved / "data" / C.CEILING_DIR, ignore_errors=True)
    manifest = json.loads((moved / "data" / artifacts.MANIFEST).read_text())
    manifest["inputs"] = {str(tmp_path / "gone" / name): fp for name, fp in
                          ((p.split("/")[-1], fp) for p, fp in manifest["inputs"].items())}
    (moved / "data" / artifacts.MANIFEST).write_text(json.dumps(manifest))
    out = C.ceiling_figures(moved / "data", rows, np.array(["search.click"] * 3), np.zeros(3))
    assert out == {"available": False, "reason": out["reason"]} and "not there any more" in out["reason"]
    # the shop found, but written before demo-data recorded its latents
    manifest["inputs"] = {str(moved / "shop" / p.split("/")[-1]): fp for p, fp in manifest["inputs"].items()}
    (moved / "data" / artifacts.MANIFEST).write_text(json.dumps(manifest))
    shop_manifest = json.loads((moved / "shop" / artifacts.MANIFEST).read_text())
    del shop_manifest["files"][LATENTS_FILE]
    (moved / "shop" / artifacts.MANIFEST).write_text(json.dumps(shop_manifest))
    with pytest.raises(NoCeiling, match="before demo-data recorded its latents"):
        find_shop(moved / "data")
    # another file at the recorded path
    manifest["inputs"] = {p: "sha256:" + "0" * 64 for p in manifest["inputs"]}
    (moved / "data" / artifacts.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(NoCeiling, match="not the file it was ingested from"):
        find_shop(moved / "data")


def test_the_counts_are_cached_beside_the_dataset_and_recomputed_when_stale(tiny, monkeypatch):
    shutil.rmtree(tiny.data / C.CEILING_DIR, ignore_errors=True)
    first, info = C.ceiling_counts(tiny.data, ("oracle",))
    assert info["seconds"]["oracle"] is not None
    again, info = C.ceiling_counts(tiny.data, ("oracle",))
    assert info["seconds"] == {"oracle": None}  # read, not computed
    assert all(np.array_equal(a, b) for a, b in zip(first["oracle"], again["oracle"]))
    monkeypatch.setattr(C, "VERSION", C.VERSION + 1)
    _, info = C.ceiling_counts(tiny.data, ("oracle",))
    assert info["seconds"]["oracle"] is not None
    monkeypatch.setattr(C, "MAX_PRODUCTS", 100)
    with pytest.raises(NoCeiling, match="600 products"):
        C.ceiling_counts(tiny.data, ("oracle",))


def test_figures_read_ties_at_random_per_group_and_bucket():
    """Three pairs: rank 0 for sure; 1 ahead and 2 tied (Recall@2: 1/3); 12 ahead (Recall@10: 0)."""
    greater, tied = np.array([0, 1, 12]), np.array([0, 2, 0])
    out = C.figures(greater, tied, np.array(["search.click", "search.save", "home.click"], dtype=object),
                    counts=np.array([0, 3, 25]), ks=(1, 2, 10))
    assert out["recall"]["search"]["recall@2"] == pytest.approx((1 + 1 / 3) / 2)
    assert out["recall"]["all"]["recall@10"] == pytest.approx(2 / 3)
    assert out["recall"]["home.click"] == {"recall@1": 0.0, "recall@2": 0.0, "recall@10": 0.0, "n": 1}
    assert out["buckets"]["1-4"] == {"recall@10": 1.0, "median_rank": 3.0, "n": 1}  # 1 + 2 / 2 ahead: 3rd
    assert out["buckets"][">=20"] == {"recall@10": 0.0, "median_rank": 13.0, "n": 1}
    assert out["buckets"]["5-19"]["n"] == 0 and out["buckets"]["5-19"]["recall@10"] is None


def test_load_pairs_names_each_pairs_query_product(tiny):
    from itemsage.evaluate.inputs import CatalogIds
    from itemsage.metrics import closeup_exclusions
    from itemsage.train.pairs import load_pairs

    ids = pq.read_table(tiny.data / schema.PRODUCTS_FILE, columns=[schema.PRODUCT_ID])[schema.PRODUCT_ID]
    store = CatalogIds(np.array(ids.to_pylist(), dtype=object))
    test = pq.read_table(tiny.data / schema.TEST_FILE, columns=[schema.SURFACE, schema.QUERY_PRODUCT_ID])
    vector_tasks = tuple(schema.task_name(s, e) for s in ("closeup", "home") for e in schema.ENGAGEMENTS)
    pairs = load_pairs(tiny.data, schema.TEST_FILE, store, tasks=vector_tasks)  # no text encoder needed
    given = test[schema.QUERY_PRODUCT_ID].take(pairs.source_row).to_pylist()
    assert None not in given and len(given) > 100
    assert [store.ids[r] if r >= 0 else None for r in pairs.query_product_row] == given
    left_out = closeup_exclusions(pairs.surface, pairs.query_product_row)
    closeup = pairs.surface == "closeup"
    assert (left_out[closeup] >= 0).all() and (left_out[~closeup] == -1).all()
