"""The model's two inputs beyond content: the popularity term (model/popularity.py) and the graph
tokens (the graph stage's features in the tower), against hand-computed references."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from itemsage import schema
from itemsage.data.text import Vocabulary
from itemsage.model.batch import GraphInputs, ProductStore
from itemsage.model.config import model_config
from itemsage.model.model import ItemSageModel, load_model, save_model
from itemsage.model.popularity import Popularity, retrieval_vectors

DI, DG = 8, 6


def test_popularity_is_the_prior_plus_the_offset_of_an_engaged_product_only():
    pop = Popularity(4, "id", warm_ids=["a", "b"])
    with torch.no_grad():
        pop.prior.weight.copy_(torch.tensor([[1.0, 0.0, -2.0, 0.5]]))
        pop.prior.bias.fill_(0.25)
        pop.offset.weight[:2, 0] = torch.tensor([3.0, -1.0])
    p = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    rows = torch.from_numpy(pop.warm_rows(["b", "zzz", "a"]))  # "zzz": never engaged, no offset
    assert rows.tolist() == [1, 2, 0]
    torch.testing.assert_close(pop(p, rows), torch.tensor([1.0 + 0.25 - 1.0, -2.0 + 0.25, 0.5 + 0.25 + 3.0]))
    # the padding row stays 0 and learns nothing, however often a cold product is drawn
    pop(p, torch.tensor([2, 2, 2])).sum().backward()
    assert pop.offset.weight.grad[2].abs().sum() == 0 and pop.offset.weight[2, 0] == 0
    content = Popularity(4, "content")  # the prior alone: no offsets
    assert content.warm_ids == [] and content(p, rows).shape == (3,)


def test_retrieval_vectors_rank_by_cosine_plus_popularity_over_scale():
    products = torch.nn.functional.normalize(torch.randn(5, 3), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    b = torch.tensor([0.1, -0.3, 0.0, 0.7, -1.0])
    p2, q2 = retrieval_vectors(products, queries, b)
    torch.testing.assert_close(q2 @ p2.T, queries @ products.T + b)
    assert retrieval_vectors(products, queries, None) == (products, queries)


def tiny_products(n: int = 6) -> pa.Table:
    rng = np.random.default_rng(0)
    fields = {f: [[f"word{i % 3} thing{i}"] if f == "title" else [] for i in range(n)] for f in schema.TEXT_FIELDS}
    images = [[rng.standard_normal(DI).tolist()] if i % 2 == 0 else [] for i in range(n)]
    return pa.table({schema.PRODUCT_ID: [f"p{i}" for i in range(n)], **fields, schema.IMAGE_EMBEDDINGS: images})


def tiny_model(graph_tokens: int = 0, popularity: str = "none", warm=("p0", "p1")) -> tuple[ItemSageModel, Vocabulary]:
    torch.manual_seed(0)
    vocab = Vocabulary.build([[f"word{i % 3} thing{i}"] for i in range(6)])
    cfg = model_config("tiny", graph_tokens=graph_tokens, graph_dropout=0.5, popularity=popularity)
    model = ItemSageModel.build(cfg, len(vocab), DI, {"search": 384}, warm_ids=list(warm), graph_dim=DG if graph_tokens else 0)
    return model.eval(), vocab


def graph_inputs(ids=("p0", "p2", "p5")) -> GraphInputs:
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((len(ids), 2, DG)).astype(np.float16)
    mask = np.array([[True, True], [True, False], [False, False]])[: len(ids)]
    return GraphInputs(np.array(ids, dtype=object), tokens, mask, np.array([f"h{i}" for i in range(len(ids))], object))


def store_for(model: ItemSageModel, vocab: Vocabulary, graph: GraphInputs | None) -> ProductStore:
    cfg = model.tower.cfg
    store = ProductStore.from_table(tiny_products(), vocab, cfg.text_fields, cfg.max_images, DI)
    store.attach_graph(graph)
    return store


def test_a_product_without_graph_tokens_embeds_as_if_the_model_read_no_graph_for_it():
    """Masked = absent: p1 (not in the graph), p5 (in it, every token masked) and every product of a
    batch without graph inputs get one vector; p0 and p2 move with their tokens."""
    model, vocab = tiny_model(graph_tokens=2)
    with_graph = model.encode_products(store_for(model, vocab, graph_inputs()).batch(np.arange(6)))
    without = model.encode_products(store_for(model, vocab, None).batch(np.arange(6)))
    same = torch.isclose(with_graph, without, atol=1e-6).all(1)
    assert same.tolist() == [False, True, False, True, True, True]
    # graph tokens change the vector; one token's value reaches it only where it is present
    g = graph_inputs()
    g.tokens[1, 1] += 5.0  # p2's second token is masked: no effect
    assert torch.allclose(model.encode_products(store_for(model, vocab, g).batch(np.arange(6))), with_graph, atol=1e-6)
    g.tokens[0, 0] += 5.0  # p0's first token is present
    moved = model.encode_products(store_for(model, vocab, g).batch(np.arange(6)))
    assert not torch.allclose(moved[0], with_graph[0]) and torch.allclose(moved[1:], with_graph[1:], atol=1e-6)


def test_graph_dropout_drops_whole_products_tokens_in_training_only():
    model, vocab = tiny_model(graph_tokens=2)
    batch = store_for(model, vocab, graph_inputs()).batch(np.arange(6))
    model.train()
    torch.manual_seed(3)
    kept = torch.stack([model.tower._graph_tokens(batch)[1][0].all() for _ in range(400)]).float().mean()
    assert 0.4 < kept < 0.6  # graph_dropout 0.5: p0's two tokens go together
    model.eval()
    assert model.tower._graph_tokens(batch)[1].tolist() == [[True, True], [False, False], [True, False],
                                                           [False, False], [False, False], [False, False]]


@pytest.mark.parametrize("aggregator", ["sum", "concat"])
def test_the_pooling_baselines_read_the_same_graph_tokens(aggregator):
    torch.manual_seed(0)
    vocab = Vocabulary.build([[f"word{i % 3} thing{i}"] for i in range(6)])
    cfg = model_config("tiny", graph_tokens=2, aggregator=aggregator)
    model = ItemSageModel.build(cfg, len(vocab), DI, {"search": 384}, graph_dim=DG).eval()
    with_graph = model.encode_products(store_for(model, vocab, graph_inputs()).batch(np.arange(6)))
    without = model.encode_products(store_for(model, vocab, None).batch(np.arange(6)))
    assert torch.isclose(with_graph, without, atol=1e-6).all(1).tolist() == [False, True, False, True, True, True]


def test_the_artifact_keeps_the_popularity_offsets_and_the_graph_width(tmp_path):
    model, vocab = tiny_model(graph_tokens=2, popularity="id", warm=("p3", "p0"))
    with torch.no_grad():
        model.popularity.offset.weight[:2, 0] = torch.tensor([1.5, -0.5])
        model.popularity.prior.bias.fill_(0.2)
    save_model(tmp_path / "m", model.tower, model.adapters, model.tower.cfg, vocab, image_dim=DI,
               query_dims={"search": 384}, logit_scale=model.logit_scale, popularity=model.popularity)
    loaded = load_model(tmp_path / "m")
    assert loaded.graph_dim == DG and loaded.reads_graph and loaded.model.popularity.warm_ids == ["p3", "p0"]
    table = tiny_products()
    vectors = loaded.embed_table(table)
    got = loaded.popularity(vectors, table[schema.PRODUCT_ID].to_pylist())
    prior = vectors @ loaded.model.popularity.prior.weight.detach().numpy()[0] + 0.2
    offsets = np.array([-0.5, 0, 0, 1.5, 0, 0])
    scale = float(loaded.model.logit_scale().detach())
    np.testing.assert_allclose(got, (prior + offsets) / scale, rtol=1e-5, atol=1e-6)


def test_category_matched_negatives_are_drawn_as_often_as_log_q_says():
    """Sampler.log_q against counted draws: 8 products in 3 categories (one product without any),
    a pool without product 7, positives mostly of category 0, half the negatives category-matched."""
    from itemsage.train.pairs import NegativeGroups, Sampler

    group_of = np.array([0, 0, 0, 1, 1, 2, -1, 2])
    pool = np.arange(7)  # product 7 is never a negative: its category 2 holds product 5 only
    groups = NegativeGroups(group_of, pool)
    sampler = Sampler(np.ones(4), 8, seed=3, pool=pool, groups=groups, share=0.5)
    positives = np.array([0, 1, 3, 6])  # categories 0, 0, 1 and none
    r, trials = 10, 40_000
    counts = np.zeros(8)
    for _ in range(trials):
        np.add.at(counts, sampler.negatives(r, positives), 1)
    # by hand: 5 uniform draws over 7 pool rows, plus 5 category draws: a positive of category 0
    # (1/2) picks one of 3, of category 1 (1/4) one of 2, the positive without one (1/4) a uniform row
    uniform = (5 + 5 * 0.25) / 7
    expected = np.array([uniform + 5 * 0.5 / 3] * 3 + [uniform + 5 * 0.25 / 2] * 2 + [uniform, uniform, 0])
    np.testing.assert_allclose(counts / trials, expected, rtol=0.03, atol=1e-9)
    np.testing.assert_allclose(np.exp(sampler.log_q(np.arange(7), positives, r)), expected[:7], rtol=1e-12)
    assert np.isclose(np.exp(sampler.log_q(np.arange(7), positives, r)).sum(), r)  # every draw counted once
