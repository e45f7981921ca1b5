"""Loss tests against independent references: full softmax, hand-built logits, collections.Counter."""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from itemsage.config import ConfigError
from itemsage.train.losses import LOGIT_SCALE_MAX, CountMinSketch, LogQ, in_batch_hits, mixed_negative_loss, random_hits

D = 8


def unit(n: int, seed: int, d: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def loss(query, positive, random_neg=None, *, pos_ids, query_keys, neg_ids=None, log_q_pos=None,
         log_q_neg=None, scale=10.0, **kw):
    b = query.shape[0]
    if log_q_pos is None:
        log_q_pos = torch.zeros(b, dtype=query.dtype)
    if random_neg is not None and log_q_neg is None:
        log_q_neg = torch.zeros(random_neg.shape[0], dtype=query.dtype)
    return mixed_negative_loss(
        query, positive, random_neg, pos_ids=pos_ids, neg_ids=neg_ids, query_keys=query_keys,
        log_q_pos=log_q_pos, log_q_neg=log_q_neg, logit_scale=torch.tensor(scale), **kw,
    )


# ---- (1) random term over the whole catalog == full softmax ----

@pytest.mark.parametrize("repeats", [1, 2])
def test_random_term_over_whole_catalog_is_full_softmax(repeats):
    catalog = unit(30, seed=0)  # C = 30 products
    query = unit(6, seed=1)
    pos_idx = torch.tensor([3, 7, 7, 0, 29, 12])  # product 7 engaged by two different queries
    scale = 7.5
    reference = F.cross_entropy(scale * query @ catalog.T, pos_idx)

    # every product drawn `repeats` times: expected draws per product = repeats, log q = log(repeats)
    neg_ids = torch.arange(30).repeat(repeats)
    parts = loss(query, catalog[pos_idx], catalog[neg_ids], pos_ids=pos_idx, query_keys=torch.arange(6),
                 neg_ids=neg_ids, log_q_neg=torch.full((30 * repeats,), math.log(repeats), dtype=torch.float64),
                 scale=scale, negatives="random")
    torch.testing.assert_close(parts.random, reference.float())
    assert parts.in_batch == 0 and parts.total == parts.random


# ---- (2) in-batch term == cross-entropy on the batch's logit matrix ----

def test_in_batch_term_is_cross_entropy_over_batch():
    query, positive = unit(7, seed=2), unit(7, seed=3)
    scale = 12.0
    reference = F.cross_entropy(scale * query @ positive.T, torch.arange(7))
    parts = loss(query, positive, pos_ids=torch.arange(100, 107), query_keys=torch.arange(7),
                 scale=scale, negatives="in_batch")
    torch.testing.assert_close(parts.in_batch, reference.float())
    assert parts.random == 0


# ---- (3) logQ correction: negatives shifted by -log q, the positive column untouched ----

def test_log_q_correction_matches_hand_built_logits():
    query, positive = unit(6, seed=4), unit(6, seed=5)
    log_q = torch.log(torch.tensor([0.5, 0.01, 1.0, 0.2, 0.05, 0.9], dtype=torch.float64))
    scale = 9.0
    logits = scale * query @ positive.T - log_q.unsqueeze(0)  # broadcast over columns
    logits.diagonal().copy_(scale * (query * positive).sum(-1))  # the true column keeps its logit
    reference = F.cross_entropy(logits, torch.arange(6))
    parts = loss(query, positive, pos_ids=torch.arange(6), query_keys=torch.arange(6), log_q_pos=log_q,
                 scale=scale, negatives="in_batch")
    torch.testing.assert_close(parts.in_batch, reference.float())
    uncorrected = loss(query, positive, pos_ids=torch.arange(6), query_keys=torch.arange(6), scale=scale,
                       negatives="in_batch")
    assert not torch.isclose(parts.in_batch, uncorrected.in_batch)  # the correction does something


def test_log_q_estimator_counts_before_estimating():
    lq = LogQ(depth=4, width=2**16, seed=3)  # width >> distinct ids: counts exact
    first = lq.step(torch.tensor([5, 6, 6, 7]))  # total 4, batch 4: Q = 4 * count / 4, no cap
    torch.testing.assert_close(first, torch.log(torch.tensor([1.0, 2.0, 2.0, 1.0])))
    lq.update(torch.tensor([8] * 12))  # total 16
    got = lq.log_q(torch.tensor([5, 6, 8, 999]), batch_size=4)
    # 5: 4*1/16 ; 6: 4*2/16 ; 8: 4*12/16 = 3 copies expected per batch (not capped at 1) ; 999: the floor
    expected = torch.log(torch.tensor([0.25, 0.5, 3.0, lq.floor], dtype=torch.float64)).float()
    torch.testing.assert_close(got, expected)
    assert torch.isfinite(got).all()

    fresh = LogQ(depth=4, width=2**16, seed=3)
    fresh.load_state_dict(lq.state_dict())
    torch.testing.assert_close(fresh.log_q(torch.tensor([5, 6, 8]), 4), got[:3])


@pytest.mark.parametrize("rep", [1, 3])
def test_log_q_corrected_in_batch_loss_is_full_softmax_when_every_product_repeats(rep):
    # Every catalog product is the positive of `rep` rows (distinct queries), no random negatives.
    # With Q = B * count / total = rep from the sketch, the rep copies of each other product, each
    # corrected by -log rep, sum to that product's one term of the full-catalog partition function.
    catalog = unit(12, seed=30)  # C = 12 products
    target = torch.arange(12).repeat(rep)  # [B = 12 * rep] each product rep times
    query = unit(len(target), seed=31)
    scale = 6.0
    reference = F.cross_entropy(scale * query @ catalog.T, target)  # full softmax, computed independently

    log_q = LogQ(depth=4, width=2**16, seed=0).step(target)  # counts the batch, then estimates
    parts = loss(query, catalog[target], pos_ids=target, query_keys=torch.arange(len(target)),
                 log_q_pos=log_q.double(), scale=scale, negatives="in_batch")
    torch.testing.assert_close(parts.in_batch, reference.float())


# ---- (4) accidental hits ----

POS = torch.tensor([10, 11, 10, 12, 13, 14])  # rows 0 and 2: same product
KEYS = torch.tensor([0, 1, 2, 3, 1, 5])  # rows 1 and 4: same query
NEG = torch.tensor([10, 11, 13, 99, 12])


def test_masks_mark_exactly_the_accidental_hits():
    hits = in_batch_hits(POS, KEYS, POS, KEYS)
    expected = torch.eye(6, dtype=torch.bool)  # the row's own copy (its logit is the positive column)
    for i, j in [(0, 2), (2, 0), (1, 4), (4, 1)]:
        expected[i, j] = True
    assert torch.equal(hits, expected)

    hits = random_hits(POS, KEYS, NEG, POS, KEYS)
    expected = torch.zeros(6, 5, dtype=torch.bool)
    for i, n in [(0, 0), (2, 0), (1, 1), (1, 2), (4, 2), (4, 1), (3, 4)]:
        expected[i, n] = True
    assert torch.equal(hits, expected)
    # the row's own product is masked even when the candidate set does not hold the row itself
    none = torch.empty(0, dtype=torch.long)
    assert torch.equal(random_hits(POS, KEYS, NEG, none, none), POS.unsqueeze(1) == NEG.unsqueeze(0))


def test_masked_loss_equals_reference_without_those_columns():
    query, positive, negs = unit(6, seed=6), unit(6, seed=7), unit(5, seed=8)
    log_q_pos = torch.linspace(-3.0, -0.5, 6, dtype=torch.float64)
    log_q_neg = torch.full((5,), -1.2, dtype=torch.float64)
    scale = 5.0
    drop_in_batch = {0: {2}, 2: {0}, 1: {4}, 4: {1}}
    drop_random = {0: {0}, 2: {0}, 1: {1, 2}, 4: {1, 2}, 3: {4}}
    in_batch_rows, random_rows = [], []
    for i in range(6):  # one row at a time, columns removed by hand
        pos_logit = scale * query[i] @ positive[i]
        kept = [j for j in range(6) if j != i and j not in drop_in_batch.get(i, set())]
        row = torch.stack([pos_logit] + [scale * query[i] @ positive[j] - log_q_pos[j] for j in kept])
        in_batch_rows.append(-torch.log_softmax(row, 0)[0])
        kept = [n for n in range(5) if n not in drop_random.get(i, set())]
        row = torch.stack([pos_logit] + [scale * query[i] @ negs[n] - log_q_neg[n] for n in kept])
        random_rows.append(-torch.log_softmax(row, 0)[0])
    parts = loss(query, positive, negs, pos_ids=POS, query_keys=KEYS, neg_ids=NEG, log_q_pos=log_q_pos,
                 log_q_neg=log_q_neg, scale=scale)
    torch.testing.assert_close(parts.in_batch, torch.stack(in_batch_rows).mean().float())
    torch.testing.assert_close(parts.random, torch.stack(random_rows).mean().float())
    torch.testing.assert_close(parts.total, parts.in_batch + parts.random)


# ---- (5) weights ----

def test_weighted_mean_and_zero_weight_row_has_no_gradient():
    query = unit(5, seed=9).requires_grad_()
    positive = unit(5, seed=10)
    scale = 6.0
    per_row = F.cross_entropy(scale * query.detach() @ positive.T, torch.arange(5), reduction="none")
    w = torch.tensor([2.0, 0.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    parts = loss(query, positive, pos_ids=torch.arange(5), query_keys=torch.arange(5), scale=scale,
                 negatives="in_batch", weights=w)
    torch.testing.assert_close(parts.in_batch, ((w * per_row).sum() / w.sum()).float())
    parts.total.backward()
    assert torch.all(query.grad[1] == 0)
    assert torch.all(query.grad[[0, 2, 3, 4]].abs().sum(-1) > 0)


# ---- DDP: ranks with the global candidate set == one process with the global batch ----

def test_two_ranks_with_global_candidates_match_one_process():
    b, r = 8, 6
    query, positive, negs = unit(b, seed=11), unit(b, seed=12), unit(r, seed=13)
    pos_ids = torch.tensor([1, 2, 3, 4, 5, 2, 7, 8])
    keys = torch.tensor([0, 1, 2, 3, 4, 5, 0, 7])  # query 0 on both ranks: rows 0 and 6
    neg_ids = torch.tensor([7, 1, 30, 31, 2, 32])
    log_q_pos = torch.linspace(-2.0, -0.1, b, dtype=torch.float64)
    log_q_neg = torch.full((r,), -0.7, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 2.0, 0.2], dtype=torch.float64)
    common = dict(log_q_neg=log_q_neg, neg_ids=neg_ids, scale=4.0)
    whole = loss(query, positive, negs, pos_ids=pos_ids, query_keys=keys, log_q_pos=log_q_pos, weights=w,
                 **common)
    ranks = []
    for rows in (slice(0, 4), slice(4, 8)):
        ranks.append(loss(query[rows], positive[rows], negs, pos_ids=pos_ids[rows], query_keys=keys[rows],
                          log_q_pos=log_q_pos[rows], weights=w[rows], candidates=positive, candidate_ids=pos_ids,
                          candidate_keys=keys, candidate_log_q=log_q_pos, weight_sum=w.sum() / 2, **common))
    for name in ("total", "in_batch", "random"):  # DDP averages over the two ranks
        torch.testing.assert_close((getattr(ranks[0], name) + getattr(ranks[1], name)) / 2, getattr(whole, name))


# ---- (6) count-min sketch ----

def test_sketch_never_undercounts_and_overestimate_within_bound():
    depth, width, n = 3, 64, 3000
    sketch_eps, delta = math.e / width, math.exp(-depth)
    within, queries = 0, 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        # Zipf-like stream over 400 ids, some negative and some huge, to exercise every digit of the hash
        universe = torch.cat([torch.arange(300), -torch.arange(1, 51), torch.arange(50) + 2**40])
        weights = 1.0 / torch.arange(1, 401, dtype=torch.float64)
        stream = universe[torch.multinomial(weights, n, replacement=True, generator=g)]
        sketch = CountMinSketch(depth, width, seed=seed)
        for chunk in stream.split(256):  # batches, with duplicates inside each
            sketch.update(chunk)
        assert int(sketch.total) == n
        truth = collections.Counter(stream.tolist())
        est = sketch.estimate(universe)
        true = torch.tensor([truth[x] for x in universe.tolist()])
        assert torch.all(est >= true), f"seed {seed} under-counts"
        within += int(((est - true) <= sketch_eps * n).sum())
        queries += len(universe)
        assert sketch.eps == pytest.approx(sketch_eps) and sketch.delta == pytest.approx(delta)
    assert within / queries >= 1 - delta


def test_sketch_exact_when_wide_and_batch_update_equals_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 40, (500,), generator=g)
    batched, single = CountMinSketch(4, 2**16, seed=5), CountMinSketch(4, 2**16, seed=5)
    batched.update(stream)
    for x in stream.tolist():
        single.update(torch.tensor([x]))
    assert torch.equal(batched.counts, single.counts) and int(batched.total) == int(single.total) == 500
    truth = collections.Counter(stream.tolist())
    ids = torch.arange(40)
    assert batched.estimate(ids).tolist() == [truth[i] for i in range(40)]


def test_sketch_state_round_trips_through_safetensors(tmp_path):
    sketch = CountMinSketch(3, 128, seed=9)
    sketch.update(torch.tensor([1, 2, 2, 3, 3, 3]))
    save_file(sketch.state_dict(), str(tmp_path / "sketch.safetensors"))
    other = CountMinSketch(3, 128, seed=123)  # different hashes, replaced by the checkpoint's
    other.load_state_dict(load_file(str(tmp_path / "sketch.safetensors")))
    assert other.estimate(torch.tensor([1, 2, 3])).tolist() == [1, 2, 3] and int(other.total) == 6
    other.update(torch.tensor([4]))
    sketch.update(torch.tensor([4]))
    assert torch.equal(other.counts, sketch.counts)
    with pytest.raises(ConfigError, match="depth, width"):
        CountMinSketch(2, 128).load_state_dict(sketch.state_dict())


def test_sketch_hashes_are_fixed_by_seed():
    a, b, c = CountMinSketch(4, 1000, seed=1), CountMinSketch(4, 1000, seed=1), CountMinSketch(4, 1000, seed=2)
    ids = torch.arange(-500, 500)
    assert torch.equal(a._flat_index(ids), b._flat_index(ids))
    assert not torch.equal(a._flat_index(ids), c._flat_index(ids))
    with pytest.raises(ConfigError, match="width"):
        CountMinSketch(2, 0)


# ---- (7) gradients, temperature cap, modes ----

def test_gradients_reach_query_positive_and_negatives():
    query, positive, negs = (unit(5, seed=s).requires_grad_() for s in (14, 15, 16))
    parts = loss(query, positive, negs, pos_ids=torch.arange(5), query_keys=torch.arange(5),
                 neg_ids=torch.arange(10, 15))
    parts.total.backward()
    for t in (query, positive, negs):
        assert t.grad is not None and torch.all(t.grad.abs().sum(-1) > 0)


def test_logit_scale_is_used_as_given_with_a_gradient():
    # The cap lives in model.LogitScale (a clamp of the stored parameter after each step); the loss
    # itself must not clamp, or the gradient would be zero above the cap and the scale could stick.
    query, positive = unit(5, seed=17), unit(5, seed=18)
    kw = dict(pos_ids=torch.arange(5), query_keys=torch.arange(5), negatives="in_batch")
    for value in (20.0, 2 * LOGIT_SCALE_MAX):
        reference = F.cross_entropy(value * query @ positive.T, torch.arange(5))
        s = torch.tensor(value, requires_grad=True)
        parts = mixed_negative_loss(query, positive, None, neg_ids=None, log_q_pos=torch.zeros(5), log_q_neg=None,
                                    logit_scale=s, **kw)
        torch.testing.assert_close(parts.total, reference.float())
        parts.total.backward()
        assert s.grad != 0


def test_modes_and_bad_arguments():
    query, positive, negs = unit(4, seed=19), unit(4, seed=20), unit(3, seed=21)
    kw = dict(pos_ids=torch.arange(4), query_keys=torch.arange(4), neg_ids=torch.arange(10, 13))
    mixed = loss(query, positive, negs, **kw)
    only_batch = loss(query, positive, negs, negatives="in_batch", **kw)
    only_random = loss(query, positive, negs, negatives="random", **kw)
    torch.testing.assert_close(mixed.in_batch, only_batch.total)
    torch.testing.assert_close(mixed.random, only_random.total)
    with pytest.raises(ConfigError, match="negatives"):
        loss(query, positive, negs, negatives="both", **kw)
    with pytest.raises(ValueError, match="random_neg"):
        loss(query, positive, None, **kw)
    with pytest.raises(ValueError, match="pos_ids"):
        loss(query, positive, negs, pos_ids=torch.arange(3), query_keys=torch.arange(4), neg_ids=kw["neg_ids"])


# ---- (7) the popularity term: every logit is scale * q.p + b_p ----

def test_popularity_is_added_to_every_logit_as_the_full_softmax_reference_has_it():
    """MixedNegativeLoss with popularity b [b + r] equals cross-entropy over hand-built logits
    scale * q.p_j + b_j (- log q_j for a negative column), the positive column uncorrected."""
    from itemsage.train.losses import MixedNegativeLoss

    b, r, scale = 5, 7, 6.0
    query, positive, negs = unit(b, seed=21), unit(b, seed=22), unit(r, seed=23)
    pop = torch.linspace(-1.5, 2.0, b + r, dtype=torch.float64)  # b_p of the positives, then the negatives
    ids, neg_ids = torch.arange(b), torch.arange(100, 100 + r)
    log_q = torch.linspace(-1.0, 0.5, b, dtype=torch.float64)
    log_q_neg = torch.full((r,), math.log(r / 50), dtype=torch.float64)
    parts = MixedNegativeLoss("mixed")(query, torch.cat([positive, negs]), ids=ids, keys=torch.arange(b),
                                       log_q=log_q, weights=torch.ones(b, dtype=torch.float64),
                                       logit_scale=torch.tensor(scale, dtype=torch.float64), neg_ids=neg_ids,
                                       log_q_neg=log_q_neg, popularity=pop)
    in_batch = scale * query @ positive.T + pop[:b] - log_q
    in_batch.diagonal().copy_(scale * (query * positive).sum(-1) + pop[:b])  # the true column: not corrected
    pos = scale * (query * positive).sum(-1, keepdim=True) + pop[:b].unsqueeze(1)  # [b, 1]
    random = torch.cat([pos, scale * query @ negs.T + pop[b:] - log_q_neg], 1)  # positive first
    torch.testing.assert_close(parts.in_batch, F.cross_entropy(in_batch, torch.arange(b)).to(parts.in_batch.dtype))
    torch.testing.assert_close(parts.random, F.cross_entropy(random, torch.zeros(b, dtype=torch.long)).to(parts.random.dtype))
    without = MixedNegativeLoss("mixed")(query, torch.cat([positive, negs]), ids=ids, keys=torch.arange(b),
                                         log_q=log_q, weights=torch.ones(b, dtype=torch.float64),
                                         logit_scale=torch.tensor(scale, dtype=torch.float64), neg_ids=neg_ids,
                                         log_q_neg=log_q_neg)
    assert not torch.isclose(parts.total, without.total)  # the term does something
