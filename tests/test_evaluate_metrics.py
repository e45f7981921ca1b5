"""Recall@K on hand-built cases whose answer is known."""

import numpy as np
import pytest
import torch

from itemsage.metrics import exact_ranks, group_recall, recall_at_k, recall_from_ranks


def test_recall_at_k_hand_built():
    retrieved = np.array([["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"], ["x", "y", "z"]])
    positives = np.array(["a", "a", "a", "a"])
    # first hit positions: 0, 1, 2, none
    assert recall_at_k(retrieved, positives, ks=(1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 0.75}


def test_recall_at_k_refuses_k_beyond_list():
    with pytest.raises(ValueError, match="Recall@5"):
        recall_at_k(np.zeros((2, 3)), np.zeros(2), ks=(5,))


def test_exact_ranks_against_argsort():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(50, 8, generator=g)
    p = torch.randn(200, 8, generator=g)
    pos = torch.randint(0, 200, (50,), generator=g)
    ranks = exact_ranks(q, p, pos, chunk=7)
    order = torch.argsort(q @ p.T, dim=1, descending=True).numpy()
    expected = np.array([np.where(order[i] == pos[i].item())[0][0] for i in range(50)])
    np.testing.assert_array_equal(ranks, expected)


def test_exact_ranks_ties_are_pessimistic():
    q = torch.ones(1, 2)
    p = torch.ones(5, 2)  # every product scores the same
    assert exact_ranks(q, p, torch.tensor([2]))[0] == 4


def test_group_recall_counts_and_values():
    ranks = np.array([0, 5, 50, 200])
    groups = ["search.click", "search.click", "home.save", "home.save"]
    r = group_recall(ranks, groups, ks=(1, 10, 100))
    assert r["search.click"] == {"recall@1": 0.5, "recall@10": 1.0, "recall@100": 1.0, "n": 2}
    assert r["home.save"] == {"recall@1": 0.0, "recall@10": 0.0, "recall@100": 0.5, "n": 2}
    assert r["all"]["recall@10"] == 0.5
    assert recall_from_ranks(np.array([]))[10] != recall_from_ranks(np.array([]))[10]  # NaN for no pairs


def test_first_hit_positions_feed_recall():
    from itemsage.metrics import first_hit_positions

    retrieved = np.array([["a", "b"], ["b", "a"], ["c", "d"]])
    pos = first_hit_positions(retrieved, np.array(["a", "a", "a"]))
    np.testing.assert_array_equal(pos, [0, 1, 2])
    assert recall_from_ranks(pos, ks=(1, 2)) == recall_at_k(retrieved, np.array(["a", "a", "a"]), ks=(1, 2))


def test_popularity_ranks_hand_computed():
    from itemsage.metrics import popularity_ranks

    counts = np.array([5, 0, 9, 5, 1])  # order: 2 (9), 0/3 (5, tied), 4 (1), 1 (0)
    ranks = popularity_ranks(counts, np.array([2, 0, 3, 4, 1]))
    np.testing.assert_array_equal(ranks, [0, 2, 2, 3, 4])  # ties pessimistic: both 5s rank 2


def test_masked_ranks_leave_the_users_own_products_out_by_hand():
    """Scores of one query against 5 products: [0.9, 0.8, 0.7, 0.6, 0.5]. Positive row 3 (score 0.6)
    ranks 3 among all; with rows {0, 2} masked only row 1 is ahead: rank 1. A positive inside its own
    mask cannot be retrieved: rank N (5), a miss at every k."""
    from itemsage.metrics import masked_ranks

    products = torch.eye(5)
    queries = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]] * 3)
    positives = np.array([3, 3, 2])
    masks = [np.array([], dtype=np.int64), np.array([0, 2]), np.array([2, 4])]
    assert exact_ranks(queries, products, torch.from_numpy(positives)).tolist() == [3, 3, 2]
    assert masked_ranks(queries, products, positives, masks).tolist() == [3, 1, 5]


def test_closeup_pairs_rank_without_their_query_product_by_hand():
    """Scores [0.9, 0.8, 0.7, 0.6, 0.5] of products 0..4. A closeup pair viewing product 0 with the
    engaged product 3 ranks 2 (products 1 and 2 ahead, 0 left out); viewing product 4 (behind it) 3; a
    home pair keeps its query product: 3; a positive that is its own query product cannot be retrieved:
    rank N. Popularity, counts [5, 9, 1, 5, 0], the same way."""
    from itemsage.metrics import closeup_exclusions, popularity_ranks

    products = torch.eye(5)
    queries = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]] * 4)
    positives = np.array([3, 3, 3, 2])
    left_out = closeup_exclusions(np.array(["closeup", "closeup", "home", "closeup"]), np.array([0, 4, 0, 2]))
    assert left_out.tolist() == [0, 4, -1, 2]
    ranks = exact_ranks(queries, products, torch.from_numpy(positives), chunk=3, exclude_rows=left_out)
    assert ranks.tolist() == [2, 3, 3, 5]
    assert closeup_exclusions(np.array(["home", "search"]), np.array([1, -1])) is None
    counts = np.array([5, 9, 1, 5, 0])  # product 3 (5) behind 1 (9) and, ties pessimistic, 0 (5)
    assert popularity_ranks(counts, positives, left_out).tolist() == [1, 2, 2, 5]


def test_ann_lists_leave_the_query_product_out_and_keep_k():
    from itemsage.evaluate.evaluation import ann_lists
    from itemsage.evaluate.inputs import CatalogIds

    class Index:  # returns the catalog in a fixed order, as deep as asked
        def search(self, q, k):
            ids = np.array([["a", "b", "c", "d"]] * len(q), dtype=object)[:, :k]
            return ids, np.zeros(ids.shape, np.float32)

    store = CatalogIds(np.array(["a", "b", "c", "d"], dtype=object))
    lists = ann_lists(Index(), np.zeros((3, 2)), 2, store, np.array([0, -1, 2]))
    assert lists.tolist() == [["b", "c"], ["a", "b"], ["a", "b"]]  # "a" left out; none; "c" is beyond the top 2
    assert ann_lists(Index(), np.zeros((1, 2)), 2, store, None).tolist() == [["a", "b"]]


def test_bucket_figures_and_random_ties_by_hand():
    """Five pairs, engaged products engaged 0, 3, 4, 7 and 30 times in the train window."""
    from itemsage.metrics import bucket_figures, expected_recall

    ranks = np.array([12, 0, 4, 30, 9])  # 0-based
    out = bucket_figures(ranks < 10, ranks, np.array([0, 3, 4, 7, 30]))
    assert out == {"0": {"recall@10": 0.0, "median_rank": 13.0, "n": 1},
                   "1-4": {"recall@10": 1.0, "median_rank": 3.0, "n": 2},  # ranks 1 and 5: median 3
                   "5-19": {"recall@10": 0.0, "median_rank": 31.0, "n": 1},
                   ">=20": {"recall@10": 1.0, "median_rank": 10.0, "n": 1}}
    ann = bucket_figures(np.array([False, True]), np.array([100, 3]), np.array([0, 0]), known_below=100)
    assert ann["0"] == {"recall@10": 0.5, "median_rank": None, "n": 2}  # the median is past the list: unknown
    # 8 ahead and 3 tied: the engaged product is 9th..12th with equal chance: P(top 10) = 2/4
    assert expected_recall(np.array([8, 0, 12]), np.array([3, 0, 0]), 10).tolist() == [0.5, 1.0, 0.0]
