"""The graph stage's maths (graph/): edges from a hand-made log with known engagements, the degree cap
and the walk sampler against references, the walks' visit counts against the exact expectation,
masks, determinism. Tiny datasets: the whole file runs in a few seconds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from itemsage import artifacts, schema
from itemsage.config import ConfigError
from itemsage.graph import GraphConfig, build_graph_features, read_graph_features
from itemsage.graph.edges import build_graph, cap_degree, read_train
from itemsage.graph.walks import Sampler, neighbourhoods, uniforms

MINUTE = 60_000
DIM = 8
ALL_TOKENS = ("walk", "session", "closeup", "home", "search")
FLAT = {"session": 1.0, "closeup": 1.0, "home": 1.0, "search": 1.0}


def _log(rows: list[tuple]) -> pa.Table:
    """(surface, engagement, product, minute, user, text, query product) rows -> a dataset log table."""
    col = list(zip(*rows)) if rows else [[]] * 7
    return pa.table({
        schema.SURFACE: pa.array(col[0], pa.string()), schema.ENGAGEMENT: pa.array(col[1], pa.string()),
        schema.PRODUCT_ID: pa.array(col[2], pa.string()),
        schema.TIMESTAMP: pa.array([m * MINUTE for m in col[3]], pa.timestamp("ms", tz="UTC")),
        schema.USER_ID: pa.array(col[4], pa.string()), schema.WEIGHT: pa.array([1.0] * len(col[0]), pa.float32()),
        schema.QUERY_TEXT: pa.array(col[5], pa.string()),
        schema.QUERY_EMBEDDING: pa.array([None] * len(col[0]), pa.list_(pa.float32())),
        schema.QUERY_PRODUCT_ID: pa.array(col[6], pa.string())})


def write_dataset(root: Path, n: int, train: list[tuple], validation: list[tuple] = (), test: list[tuple] = (),
                  seed: int = 0) -> Path:
    """A dataset directory as ingest lays it out (products, three windows, a manifest): products p0..p{n-1}
    with random unit query vectors of width DIM."""
    root.mkdir(parents=True, exist_ok=True)
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pq.write_table(pa.table({schema.PRODUCT_ID: [f"p{i}" for i in range(n)],
                             schema.IMAGE_EMBEDDINGS: pa.array([[list(v)] for v in vectors], pa.list_(pa.list_(pa.float32()))),
                             schema.QUERY_VECTOR: pa.array(list(vectors), pa.list_(pa.float32()))}),
                   root / schema.PRODUCTS_FILE)
    for name, rows in ((schema.TRAIN_FILE, train), (schema.VALIDATION_FILE, validation), (schema.TEST_FILE, test)):
        pq.write_table(_log(list(rows)), root / name)
    artifacts.write_manifest(root, "dataset", counts={"products": n})
    return root


# The hand-made log. Times in minutes; weights: click 1, save 2, add_to_cart 3, checkout 4.
HAND_TRAIN = [
    ("home", "click", "p0", 0, "u1", None, None),
    ("home", "click", "p1", 1, "u1", None, None),
    ("home", "save", "p1", 2, "u1", None, None),        # merged with the row above: p1 weighs 1 + 2
    ("home", "click", "p2", 200, "u1", None, None),     # over an hour after p1: no session edge
    ("closeup", "click", "p4", 300, "u2", None, "p3"),  # viewed p3, engaged p4
    ("home", "add_to_cart", "p5", 310, "u3", None, "p6"),
    ("search", "click", "p0", 5, None, "Red Mug", None),
    ("search", "checkout", "p5", 6, None, "red  mug", None),  # the same text once normalised
    ("search", "click", "p6", 7, None, "blue cup", None),
][::-1]  # not in time order: the reader sorts
HAND_VALIDATION = [("closeup", "click", "p2", 1000, "u1", None, "p7"),  # would link p2 and p7
                   ("home", "click", "p7", 1001, "u1", None, None)]
HAND_TEST = [("search", "click", "p7", 2000, None, "red mug", None)]
HAND_EDGES = {"session": {(0, 1): math.sqrt(1 * 3)}, "closeup": {(3, 4): 1.0}, "home": {(5, 6): 3.0},
              "search": {(0, 5): math.sqrt(1 * 4)}}


def hand_made(root: Path) -> Path:
    return write_dataset(root, 9, HAND_TRAIN, HAND_VALIDATION, HAND_TEST)


def random_dataset(root: Path, n: int = 60, rows: int = 1500, seed: int = 1) -> Path:
    """A random shop log over n products, every surface, a few users and texts (products >= n - 5 never engaged)."""
    rng = np.random.default_rng(seed)
    surfaces = rng.choice(schema.SURFACES, rows)
    product = rng.integers(0, n - 5, rows)
    query = rng.integers(0, n - 5, rows)
    train = [(s, str(rng.choice(schema.ENGAGEMENTS)), f"p{p}", int(m), f"u{rng.integers(0, 12)}",
              f"text {rng.integers(0, 15)}" if s == "search" else None, f"p{q}" if s != "search" else None)
             for s, p, q, m in zip(surfaces, product, query, np.sort(rng.integers(0, 30 * 24 * 60, rows)))]
    return write_dataset(root, n, train, seed=seed)


def graph_of(dataset: Path, cfg: GraphConfig):
    ids = pq.read_table(dataset / schema.PRODUCTS_FILE)[schema.PRODUCT_ID].combine_chunks()
    return build_graph(read_train(dataset, ids, cfg), len(ids), cfg)


def as_dict(m: sp.csr_matrix) -> dict[tuple[int, int], float]:
    coo = m.tocoo()
    return {(int(i), int(j)): float(v) for i, j, v in zip(coo.row, coo.col, coo.data)}


def both_ways(edges: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    return {**edges, **{(j, i): w for (i, j), w in edges.items()}}


# ---- edges ----------------------------------------------------------------------------------------


def test_edges_of_a_hand_made_log_are_the_known_engagements_and_only_the_train_windows(tmp_path):
    cfg = GraphConfig(recency_half_life_days=0, edge_type_weights=FLAT, tokens=ALL_TOKENS)
    graph = graph_of(hand_made(tmp_path / "ds"), cfg)
    for name, edges in HAND_EDGES.items():
        got = as_dict(graph.by_type[name])
        assert got.keys() == both_ways(edges).keys(), name
        assert all(got[k] == pytest.approx(w, rel=1e-6) for k, w in both_ways(edges).items()), name
    total = {}
    for edges in HAND_EDGES.values():
        for k, w in both_ways(edges).items():
            total[k] = total.get(k, 0.0) + w
    assert as_dict(graph.adjacency) == pytest.approx(total, rel=1e-6)
    # p7 is engaged only in the validation and test windows: no edge, not engaged; p2 is engaged, unlinked
    assert graph.adjacency[7].nnz == 0 and graph.adjacency[:, 7].nnz == 0 and graph.adjacency[2].nnz == 0
    assert graph.engaged.tolist() == [True] * 7 + [False, False]
    assert graph.stats["pairs_by_type"] == {"session": 1, "search": 1, "closeup": 1, "home": 1}
    assert graph.last_ms == 310 * MINUTE


def test_edge_weights_follow_engagement_type_weights_and_recency(tmp_path):
    cfg = GraphConfig(recency_half_life_days=1.0, edge_type_weights={**FLAT, "session": 0.5})
    graph = graph_of(hand_made(tmp_path / "ds"), cfg)
    decay = {m: 0.5 ** ((310 - m) / (24 * 60)) for m in (0, 1, 2, 5, 6, 300, 310)}
    session = 0.5 * math.sqrt(decay[0] * (decay[1] + 2 * decay[2]))
    assert graph.by_type["session"][0, 1] == pytest.approx(session, rel=1e-6)
    assert graph.by_type["closeup"][4, 3] == pytest.approx(decay[300], rel=1e-6)
    assert graph.by_type["search"][5, 0] == pytest.approx(math.sqrt(decay[5] * 4 * decay[6]), rel=1e-6)


def test_session_and_search_windows_and_the_session_gap(tmp_path):
    train = [("home", "click", f"p{i}", m, "u1", None, None) for i, m in enumerate((0, 10, 20, 30))]
    train += [("search", "click", f"p{i}", 40 + i, None, "lamp", None) for i in (4, 5, 6)]
    ds = write_dataset(tmp_path / "ds", 8, train)
    for window, expected in ((1, {(0, 1), (1, 2), (2, 3)}), (2, {(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)})):
        cfg = GraphConfig(session_window=window, search_window=window, recency_half_life_days=0)
        graph = graph_of(ds, cfg)
        assert set(as_dict(graph.by_type["session"])) == set(both_ways(dict.fromkeys(expected, 1)))
        search = {(i + 4, j + 4) for i, j in expected if j <= 2}
        assert set(as_dict(graph.by_type["search"])) == set(both_ways(dict.fromkeys(search, 1)))
    tight = graph_of(ds, GraphConfig(session_window=3, session_gap_hours=15 / 60))  # 10 min apart: only neighbours
    assert set(as_dict(tight.by_type["session"])) == set(both_ways({(0, 1): 1, (1, 2): 1, (2, 3): 1}))
    off = graph_of(ds, GraphConfig(session_window=0))
    assert "session" not in off.by_type


def test_cap_degree_keeps_each_rows_largest_entries_like_a_sort_by_reference():
    def reference(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
        m = m.tocsr()
        m.sum_duplicates()
        nnz = np.diff(m.indptr)
        row = np.repeat(np.arange(m.shape[0]), nnz)
        order = np.lexsort((m.indices, -m.data, row))  # per row: largest first, ties to the lower column
        rank = np.arange(m.nnz) - np.repeat(m.indptr[:-1], nnz)
        keep = np.zeros(m.nnz, bool)
        keep[order[rank < k]] = True
        return sp.csr_matrix((m.data[keep], m.indices[keep], np.concatenate([[0], np.cumsum(np.minimum(nnz, k))])),
                             shape=m.shape)

    for dtype in (np.float32, np.float64):
        m = sp.random(400, 400, density=0.08, random_state=2, format="csr").astype(dtype)
        m.data = np.round(m.data * 4).astype(dtype)  # many ties
        m.eliminate_zeros()
        for k in (1, 5, 40):
            want = reference(m, k)
            for block in (1 << 22, 97, 7):  # one block; blocks of ~97 entries; of one row each (rows never split)
                got = cap_degree(m, k, block=block)
                assert np.array_equal(got.indptr, want.indptr) and (got != want).nnz == 0, (dtype, k, block)
                assert np.array_equal(got.indices, want.indices)
            assert np.diff(want.indptr).max() == k


def test_the_degree_cap_and_hub_weighting_in_the_graph(tmp_path):
    star = [("closeup", "click", f"p{i}", i, None, None, "p0") for i in range(1, 9)]  # p0 viewed, 8 products engaged
    ds = write_dataset(tmp_path / "ds", 10, star)
    graph = graph_of(ds, GraphConfig(max_degree=3, recency_half_life_days=0))
    assert np.diff(graph.adjacency.indptr).tolist() == [3] + [1] * 8 + [0]
    assert sorted(graph.adjacency[0].indices.tolist()) == [1, 2, 3]  # equal weights: the lower rows
    assert graph.stats["in_degree_p50_p99_max"][2] == 8  # the cap is on out-edges; p0 keeps all its in-edges
    hub = graph_of(ds, GraphConfig(max_degree=3, recency_half_life_days=0, hub_exponent=1.0))
    # every edge touches p0 (summed weight 8) and a leaf (1): 1 / sqrt(8 x 1)
    assert hub.adjacency.data == pytest.approx(np.full(11, 1 / math.sqrt(8)), rel=1e-6)


# ---- walks -------------------------------------------------------------------------------------------


def test_the_sampler_draws_neighbours_with_the_exact_transition_weights():
    m = sp.random(60, 60, density=0.3, random_state=1, format="csr", dtype=np.float32)
    m.data += 0.01
    sampler = Sampler(m)
    draws = 200_000
    u = uniforms(7, np.arange(draws, dtype=np.uint64))
    for row in (0, 17, 59):
        got = np.bincount(sampler.step(np.full(draws, row), u), minlength=60) / draws
        want = m[row].toarray().ravel() / m[row].sum()
        sigma = np.sqrt(want * (1 - want) / draws)
        assert np.all(np.abs(got - want) <= 5 * sigma + 1e-12), row
        assert set(np.flatnonzero(got)) <= set(m[row].indices)
    # u at the edges of the CDF: the first and last entry of a row, never outside it
    a, b = m.indptr[17], m.indptr[18]
    ends = sampler.step(np.array([17, 17]), np.array([0.0, np.nextafter(1.0, 0)]))
    assert ends.tolist() == [m.indices[a], m.indices[b - 1]]


def test_uniforms_are_uniform_and_independent_of_the_counter_order():
    u = uniforms(0, np.arange(100_000, dtype=np.uint64))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 9_500
    assert np.array_equal(uniforms(0, np.array([5, 3], np.uint64)), u[[5, 3]])
    assert not np.array_equal(uniforms(1, np.arange(10, dtype=np.uint64)), u[:10])


def test_walk_visit_counts_match_the_exact_expectation_of_a_walk_with_restart():
    """E[visits to j from s] = walks x sum over steps of x_t[j], x_t = restart e_s + (1 - restart) x_t-1 P."""
    rng = np.random.default_rng(3)
    n = 12
    dense = np.triu(rng.random((n, n)) * (rng.random((n, n)) < 0.4), 1)
    dense += dense.T
    dense[np.arange(n - 1), np.arange(1, n)] = dense[np.arange(1, n), np.arange(n - 1)] = 0.5  # connected
    adjacency = sp.csr_matrix(dense.astype(np.float32))
    cfg = GraphConfig(walks_per_node=4000, walk_length=5, restart=0.3, top_t=n)
    visits = neighbourhoods(adjacency, cfg).matrix.toarray()
    p = dense / dense.sum(axis=1, keepdims=True)
    for start in range(n):
        x, expected = np.eye(n)[start], np.zeros(n)
        for _ in range(cfg.walk_length):
            x = cfg.restart * np.eye(n)[start] + (1 - cfg.restart) * x @ p
            expected += cfg.walks_per_node * x
        expected[start] = 0.0  # the start itself is never its own neighbour
        # within 5 x sqrt(expected) (measured: at most 3.3; a sampler blind to the weights: 12)
        assert np.all(np.abs(visits[start] - expected) < 5 * np.sqrt(np.maximum(expected, 1))), (start, visits[start])
        assert visits[start, start] == 0


def test_first_hops_are_counted_exactly_and_top_t_keeps_the_most_visited():
    # a star: from the centre, every step is a first hop (or a restart), so the counts are exact
    star = sp.csr_matrix((np.array([1, 2, 3, 4, 1, 2, 3, 4], np.float32),
                          (np.array([0, 0, 0, 0, 1, 2, 3, 4]), np.array([1, 2, 3, 4, 0, 0, 0, 0]))), shape=(5, 5))
    cfg = GraphConfig(walks_per_node=10, walk_length=1, restart=0.5, top_t=3)
    rows, counts = neighbourhoods(star, cfg).of(0)
    assert rows.tolist() == [4, 3, 2]  # the top 3 of 4, most visited first
    assert counts == pytest.approx([10 * 0.5 * w / 10 for w in (4, 3, 2)])


def test_walks_depend_on_the_seed_only_not_on_the_chunking(tmp_path):
    graph = graph_of(random_dataset(tmp_path / "ds"), GraphConfig())
    base = neighbourhoods(graph.adjacency, GraphConfig()).matrix
    chunked = neighbourhoods(graph.adjacency, GraphConfig(walk_chunk=7)).matrix
    other = neighbourhoods(graph.adjacency, GraphConfig(seed=1)).matrix
    assert (base != chunked).nnz == 0 and np.array_equal(base.indptr, chunked.indptr)
    assert (base != other).nnz > 0


# ---- the stage ---------------------------------------------------------------------------------------


def test_masks_tokens_and_hashes_of_the_hand_made_dataset(tmp_path):
    ds = hand_made(tmp_path / "ds")
    cfg = GraphConfig(recency_half_life_days=0, edge_type_weights=FLAT, tokens=ALL_TOKENS)
    feats = read_graph_features(build_graph_features(ds, config=cfg), artifacts.fingerprint(ds))
    assert feats.ids.tolist() == [f"p{i}" for i in range(9)] and feats.names == ALL_TOKENS and feats.dim == DIM
    assert feats.tokens.dtype == np.float16 and feats.tokens.shape == (9, 5, DIM)
    expected = {0: "TT..T", 1: "TT...", 2: ".....", 3: "T.T..", 4: "T.T..", 5: "T..TT", 6: "T..T.", 7: ".....",
                8: "....."}
    assert {i: "".join("T" if m else "." for m in row) for i, row in enumerate(feats.mask)} == expected
    assert not feats.tokens[~feats.mask].any()  # zeros where masked
    norms = np.linalg.norm(feats.float32()[feats.mask], axis=-1)
    assert norms == pytest.approx(np.ones(len(norms)), abs=2e-3)
    vectors = np.stack(pq.read_table(ds / schema.PRODUCTS_FILE)[schema.QUERY_VECTOR].to_numpy(zero_copy_only=False))
    # 1-hop tokens with one neighbour are that neighbour's vector: p3's closeup token is p4's vector
    assert feats.float32([3])[0, 2] == pytest.approx(vectors[4], abs=1e-3)
    # p0's search token: p5; p5's home token: p6 (the 1-hop types see only their own edges)
    assert feats.float32([0])[0, 4] == pytest.approx(vectors[5], abs=1e-3)
    assert feats.float32([5])[0, 3] == pytest.approx(vectors[6], abs=1e-3)
    assert [h == "" for h in feats.hashes] == [not m.any() for m in feats.mask]
    assert len({h for h in feats.hashes if h}) == 6
    # each product's one image is its query vector: pooling the mean image gives the same tokens
    images = read_graph_features(build_graph_features(ds, tmp_path / "img", GraphConfig(**{**cfg.to_dict(),
                                                                                          "content": "mean_image"})))
    assert np.array_equal(images.tokens, feats.tokens) and np.array_equal(images.hashes, feats.hashes)


def test_the_stage_is_deterministic_for_a_seed(tmp_path):
    ds = random_dataset(tmp_path / "ds")
    first = build_graph_features(ds, tmp_path / "a")
    second = build_graph_features(ds, tmp_path / "b", GraphConfig(walk_chunk=5))
    third = build_graph_features(ds, tmp_path / "c", GraphConfig(seed=9))
    sha = {d: artifacts.read_manifest(d)["files"] for d in (first, second, third)}
    assert sha[first] == sha[second]
    assert sha[first]["features.parquet"] != sha[third]["features.parquet"]
    a, c = read_graph_features(first), read_graph_features(third)
    assert np.array_equal(a.mask, c.mask)  # the seed moves the walk token, not which products have one
    changed = a.hashes != c.hashes
    assert changed.any() and np.array_equal(changed, np.any(a.tokens != c.tokens, axis=(1, 2)))


def test_the_config_refuses_bad_options_by_name():
    for kwargs, pieces in [({"max_degree": 0}, "graph.max_degree (0)"), ({"restart": 1.0}, "graph.restart"),
                           ({"tokens": ("walk", "likes")}, "graph.tokens"),
                           ({"edge_type_weights": {"session": -1}}, "graph.edge_type_weights.session"),
                           ({"engagement_weights": {"view": 1}}, "unknown key 'view'"),
                           ({"tokens": ("home",), "edge_type_weights": {"session": 1}}, "weight"),
                           ({"content": "pixels"}, "graph.content"), ({"walk_length": 0}, "graph.walk_length")]:
        with pytest.raises(ConfigError, match=pieces.replace("(", r"\(").replace(")", r"\)")):
            GraphConfig(**kwargs)
    assert GraphConfig(tokens="walk, search").tokens == ("walk", "search")


def test_an_empty_train_window_gives_every_product_a_mask_and_no_token(tmp_path):
    ds = write_dataset(tmp_path / "ds", 4, [], validation=[("home", "click", "p1", 5, "u1", None, None)])
    feats = read_graph_features(build_graph_features(ds))
    assert feats.tokens.shape == (4, 3, DIM) and not feats.mask.any() and not feats.tokens.any()
    assert feats.hashes.tolist() == [""] * 4
    manifest = feats.manifest
    assert manifest["counts"]["edges"] == 0 and manifest["train_last_timestamp"] is None
