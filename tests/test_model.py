"""Product tower, adapters, presets and the model artifact (docs/METHOD.md), on the tiny preset."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from itemsage import artifacts, schema
from itemsage.config import ConfigError
from itemsage.data.text import Vocabulary
from itemsage.model.batch import ProductBatch, featurize
from itemsage.model.config import ModelConfig, flops_per_product, model_config
from itemsage.model.hash_embedding import HashEmbedding, hash_token_ids
from itemsage.model.model import LoadedModel, encode_products, load_model, save_model
from itemsage.model.tower import ItemSage, LogitScale, QueryAdapters

VOCAB = 40
DI = 8  # image width in these tests
F = len(schema.TEXT_FIELDS)


def make_batch(images: list[list[list[float]] | torch.Tensor], fields: list[list[list[int]]],
               num_slots: int | None = None) -> ProductBatch:
    """A ProductBatch from per-product image lists [m_b, Di] and per-product field token lists.

    M = num_slots or the most images any product has (at least 1); padding slots hold zeros.
    """
    imgs = [torch.as_tensor(x, dtype=torch.float32).reshape(-1, DI) for x in images]
    B = len(imgs)
    M = num_slots or max(1, max(len(x) for x in imgs))
    padded = torch.zeros(B, M, DI)
    mask = torch.zeros(B, M, dtype=torch.bool)
    for b, x in enumerate(imgs):
        padded[b, : len(x)] = x
        mask[b, : len(x)] = True
    bags = [bag for product in fields for bag in product]
    assert all(len(product) == F for product in fields)
    lengths = torch.tensor([len(bag) for bag in bags])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    ids = torch.tensor([i for bag in bags for i in bag], dtype=torch.long)
    return ProductBatch(padded, mask, ids, offsets)


def random_product(g: torch.Generator, n_images: int, present_fields: list[int]) -> tuple[torch.Tensor, list[list[int]]]:
    images = torch.randn(n_images, DI, generator=g)
    fields = [[] for _ in range(F)]
    for f in present_fields:
        n = int(torch.randint(1, 6, (1,), generator=g))
        fields[f] = torch.randint(0, VOCAB, (n,), generator=g).tolist()
    return images, fields


def tower(seed: int = 0, **overrides) -> ItemSage:
    torch.manual_seed(seed)
    return ItemSage(model_config("tiny", **overrides), VOCAB, DI).eval()


@pytest.fixture
def batch() -> ProductBatch:
    g = torch.Generator().manual_seed(1)
    products = [random_product(g, 3, [0, 1, 4]), random_product(g, 1, [2]), random_product(g, 0, [0, 11]),
                random_product(g, 5, [])]
    return make_batch([p[0] for p in products], [p[1] for p in products])


# --------------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------------


def test_output_shape_and_unit_norm(batch):
    out = tower()(batch)
    assert out.shape == (4, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def reference_forward(model: ItemSage, images: torch.Tensor, fields: list[list[int]]) -> torch.Tensor:
    """One product through a stock nn.TransformerEncoder on its present tokens only (no padding,
    no mask, full sequence) -> [out_dim]. Independent of the padding, masking and [CLS]-only code."""
    D = model.cfg.d_model
    tokens = [model.cls.view(1, D)]
    if len(images):
        tokens.append(model.image_proj(images))
    for f, bag in enumerate(fields):
        if bag:
            ids = torch.tensor(bag)
            h1, h2 = hash_token_ids(ids, model.cfg.hash_buckets)
            E, W = model.text_embed.table.weight, model.text_embed.importance.weight
            field_vec = (W[ids, 0:1] * E[h1] + W[ids, 1:2] * E[h2]).sum(0)
            tokens.append(model.text_proj(field_vec.view(1, -1)))
    x = torch.cat(tokens).unsqueeze(0)  # [1, S_present, D]
    for layer in model.encoder.layers:  # the stock layer, full sequence, no mask
        x = layer(x)
    if model.cfg.pooling == "attention":  # softmax of the learned query against every normalised output
        weights = (model.pool_norm(x[0]) @ model.pool_query).softmax(0)  # [S_present]
        return model.head((weights[:, None] * x[0]).sum(0, keepdim=True))[0]
    return model.head(x[:, 0])[0]


@pytest.mark.parametrize("options", [dict(layers=1), dict(layers=2), dict(layers=1, pooling="attention"),
                                     dict(layers=2, norm_first=False), dict(projection="mlp", text_norm="l2")])
def test_matches_unpadded_reference(options):
    """Padding slots and empty fields are really masked, and the [CLS]-only last layer equals the
    stock encoder's output at [CLS] (attention pooling and post-LN layers: the stock layers' outputs)."""
    model = tower(**options)
    g = torch.Generator().manual_seed(2)
    products = [random_product(g, 4, [0, 3]), random_product(g, 1, [1, 2, 5, 11]), random_product(g, 0, [7]),
                random_product(g, 2, [])]
    batch = make_batch([p[0] for p in products], [p[1] for p in products], num_slots=6)
    with torch.no_grad():
        out = model(batch)
        for b, (images, fields) in enumerate(products):
            torch.testing.assert_close(out[b], reference_forward(model, images, fields), atol=1e-5, rtol=1e-5)


def test_padded_image_values_do_not_matter_present_ones_do(batch):
    model = tower()
    base = model(batch)
    changed = ProductBatch(batch.images.clone(), batch.image_mask, batch.token_ids, batch.token_offsets)
    changed.images[~batch.image_mask] = 1e3 * torch.randn(int((~batch.image_mask).sum()))[:, None]
    torch.testing.assert_close(model(changed), base, atol=0, rtol=0)
    changed.images[0, 0] += 1.0  # a present image
    out = model(changed)
    assert not torch.allclose(out[0], base[0], atol=1e-4)
    torch.testing.assert_close(out[1:], base[1:], atol=0, rtol=0)


def test_empty_field_is_absent_and_present_field_tokens_matter():
    model = tower()
    g = torch.Generator().manual_seed(3)
    images, fields = random_product(g, 2, [0, 1])
    base = model(make_batch([images], [fields]))
    # An empty field that gains a token becomes present: the output moves.
    fields2 = [list(f) for f in fields]
    fields2[5] = [7]
    assert not torch.allclose(model(make_batch([images], [fields2])), base, atol=1e-4)
    # Changing a present field's tokens moves it too.
    fields3 = [list(f) for f in fields]
    fields3[0] = [(i + 1) % VOCAB for i in fields3[0]]
    assert not torch.allclose(model(make_batch([images], [fields3])), base, atol=1e-4)
    # Without type embeddings the tower cannot tell which field slot a bag sits in: moving a bag
    # from one (otherwise empty) slot to another leaves the output unchanged, so empty slots add nothing.
    fields4 = [list(f) for f in fields]
    fields4[9], fields4[1] = fields4[1], []
    torch.testing.assert_close(model(make_batch([images], [fields4])), base, atol=1e-6, rtol=1e-5)


def test_product_with_nothing_but_cls():
    model = tower()
    empty = make_batch([torch.zeros(0, DI), torch.zeros(0, DI)], [[[]] * F, [[]] * F], num_slots=3)
    out = model(empty)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out[0], reference_forward(model, torch.zeros(0, DI), [[]] * F), atol=1e-5, rtol=1e-5)
    for aggregator in ("sum", "concat"):  # the baselines handle an empty product too
        assert torch.isfinite(tower(aggregator=aggregator)(empty)).all()


def test_image_order_does_not_matter_without_type_embeddings():
    g = torch.Generator().manual_seed(4)
    images, fields = random_product(g, 4, [0, 2])
    perm = torch.tensor([2, 0, 3, 1])
    # The permuted images also sit in other slots: present slots 0..3 of 6 vs interleaved with padding.
    padded = torch.zeros(1, 6, DI)
    padded[0, [5, 1, 3, 0]] = images[perm]
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, [5, 1, 3, 0]] = True
    base_batch = make_batch([images], [fields], num_slots=6)
    moved = ProductBatch(padded, mask, base_batch.token_ids, base_batch.token_offsets)
    model = tower()
    torch.testing.assert_close(model(moved), model(base_batch), atol=1e-6, rtol=1e-5)
    # With the per-slot type embedding (ablation) the order is visible: the test can fail.
    typed = tower(type_embedding=True)
    assert not torch.allclose(typed(moved), typed(base_batch), atol=1e-4)


def test_hash_embedding_matches_hand_computation():
    torch.manual_seed(0)
    emb = HashEmbedding(vocab_size=VOCAB, num_buckets=11, dim=5)
    ids = torch.tensor([3, 17, 3, 39, 0])
    offsets = torch.tensor([0, 0, 2, 5])  # bags: [], [3, 17], [3, 39, 0], []
    out = emb(ids, offsets)
    E, W = emb.table.weight, emb.importance.weight
    h1, h2 = hash_token_ids(ids, 11)
    expected = torch.zeros(4, 5)
    for bag, (lo, hi) in enumerate([(0, 0), (0, 2), (2, 5), (5, 5)]):
        for t in range(lo, hi):
            i = int(ids[t])
            expected[bag] += W[i, 0] * E[int(h1[t])] + W[i, 1] * E[int(h2[t])]
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[0], torch.zeros(5)) and torch.equal(out[3], torch.zeros(5))


def test_token_dropout_leaves_whole_tokens_out_in_training_only():
    """A dropped token is absent from every bag of the step and the kept ones are scaled by 1/(1-p),
    so a bag's expectation is its full sum; evaluation sees every token."""
    torch.manual_seed(0)
    full = HashEmbedding(vocab_size=VOCAB, num_buckets=11, dim=5)
    emb = HashEmbedding(vocab_size=VOCAB, num_buckets=11, dim=5, token_dropout=0.5)
    emb.load_state_dict(full.state_dict())
    ids, offsets = torch.tensor([3, 17, 3, 39]), torch.tensor([0, 2])  # bags: [3, 17], [3, 39]
    v = {i: full(torch.tensor([i]), torch.tensor([0]))[0] for i in (3, 17, 39)}  # each token's vector
    with torch.no_grad():
        torch.testing.assert_close(emb.eval()(ids, offsets), full(ids, offsets))
        emb.train()
        draws = torch.stack([emb(ids, offsets) for _ in range(2000)])  # [2000, 2 bags, 5]
    # token 3 is kept or dropped in both bags at once; each kept token counts twice (1 / (1 - 0.5))
    allowed = [torch.stack([2 * (a * v[3] + b * v[17]), 2 * (a * v[3] + c * v[39])])
               for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    for out in draws[:200]:
        assert any(torch.allclose(out, x, atol=1e-6) for x in allowed), out
    torch.testing.assert_close(draws.mean(0), full(ids, offsets), atol=0.1, rtol=0)


def reference_hash_bag(emb: HashEmbedding, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The earlier formulation, kept as the reference: both hashes of every occurrence through one
    EmbeddingBag over E, W supplying the per-sample weights (2T lookups forward and backward)."""
    h1, h2 = hash_token_ids(ids, emb.num_buckets)
    hashed = torch.stack([h1, h2], dim=1).reshape(-1)  # [2T]
    weights = emb.importance(ids).reshape(-1)  # [2T]
    return nn.functional.embedding_bag(hashed, emb.table.weight, offsets * 2, mode="sum", per_sample_weights=weights)


@pytest.mark.parametrize("source", ["store", "torch"])
def test_hash_bag_matches_earlier_formulation_forward_and_gradients(source):
    from itemsage.model.hash_embedding import token_bags

    g = torch.Generator().manual_seed(5)
    vocab, n_bags = 300, 64
    lengths = torch.randint(0, 40, (n_bags,), generator=g)
    lengths[[0, 7, 63]] = 0  # empty bags, the last one included
    ids = torch.randint(0, vocab, (int(lengths.sum()),), generator=g)
    ids[:30] = 17  # a token repeated within and across bags
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    torch.manual_seed(0)
    emb = HashEmbedding(vocab_size=vocab, num_buckets=97, dim=6)
    grad_out = torch.randn(n_bags, 6, generator=g)

    bags = token_bags(ids.numpy(), offsets.numpy(), transpose=True) if source == "store" else None
    out = emb(ids, offsets, bags)
    (out * grad_out).sum().backward()
    got = out.detach(), emb.table.weight.grad.clone(), emb.importance.weight.grad.clone()
    emb.zero_grad()
    expected = reference_hash_bag(emb, ids, offsets)
    (expected * grad_out).sum().backward()
    torch.testing.assert_close(got[0], expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], emb.table.weight.grad, atol=1e-5, rtol=1e-5)  # dL/dE
    torch.testing.assert_close(got[2], emb.importance.weight.grad, atol=1e-5, rtol=1e-5)  # dL/dW
    assert got[2][17].abs().sum() > 0 and got[1].abs().sum() > 0  # the gradients are not trivially zero
    with torch.no_grad():  # the inference path (no transposed layout) gives the same forward
        torch.testing.assert_close(emb(ids, offsets), expected.detach(), atol=1e-5, rtol=1e-5)


def test_store_batch_carries_deduplicated_tokens():
    from itemsage.model.hash_embedding import token_bags

    ids = torch.tensor([5, 9, 5, 2, 9, 9, 7])
    offsets = torch.tensor([0, 3, 3, 6])  # bags: [5 9 5], [], [2 9 9], [7]
    bags = token_bags(ids.numpy(), offsets.numpy(), transpose=True)
    assert bags.unique.tolist() == [2, 5, 7, 9]
    assert bags.unique[bags.index].tolist() == ids.tolist()
    # transposed: token 2 in bag 2; 5 twice in bag 0; 7 in bag 3; 9 in bags 0, 2, 2
    assert bags.by_token.tolist() == [2, 0, 0, 3, 0, 2, 2] and bags.starts.tolist() == [0, 1, 3, 4]
    assert token_bags(ids.numpy(), offsets.numpy(), transpose=False).by_token is None


@pytest.mark.parametrize("aggregator", ["transformer", "sum", "concat"])
@pytest.mark.parametrize("modalities", ["both", "image", "text"])
def test_aggregators_and_modalities(batch, aggregator, modalities):
    model = tower(aggregator=aggregator, modalities=modalities).train()
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("text_embed") for n in names) == (modalities != "image")
    assert any(n.startswith("image_proj") for n in names) == (modalities != "text")
    assert any(n.startswith("encoder") for n in names) == (aggregator == "transformer")
    out = model(batch)
    assert out.shape == (len(batch), 16)
    out.pow(3).sum().backward()
    for name, p in model.named_parameters():  # every constructed part is used
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    model.eval()
    base = model(batch)
    other_text = ProductBatch(batch.images, batch.image_mask, (batch.token_ids + 1) % VOCAB, batch.token_offsets)
    other_images = ProductBatch(batch.images + 1.0, batch.image_mask, batch.token_ids, batch.token_offsets)
    text_moved = not torch.allclose(model(other_text), base, atol=1e-5)
    images_moved = not torch.allclose(model(other_images), base, atol=1e-5)
    assert text_moved == (modalities != "image")
    assert images_moved == (modalities != "text")


def test_concat_pads_image_slots_to_max_images(batch):
    model = tower(aggregator="concat")
    wide = ProductBatch(torch.cat([batch.images, torch.zeros(len(batch), 7, DI)], dim=1),
                        torch.cat([batch.image_mask, torch.zeros(len(batch), 7, dtype=torch.bool)], dim=1),
                        batch.token_ids, batch.token_offsets)
    torch.testing.assert_close(model(wide), model(batch), atol=0, rtol=0)


def test_batch_equals_one_at_a_time():
    """Real featurisation: a batch pads images to its largest count; one product alone does not."""
    rng = torch.Generator().manual_seed(5)
    rows = {
        "product_id": ["a", "b", "c", "d"],
        "title": [["wood chair"], ["red wool rug"], [], ["oak table", "solid wood"]],
        "brand": [["Acme"], [], ["Oakly"], ["Acme"]],
        "image_embeddings": [torch.randn(n, DI, generator=rng).tolist() for n in (2, 0, 5, 1)],
    }
    for field in schema.TEXT_FIELDS:
        rows.setdefault(field, [[] for _ in range(4)])
    table = pa.table(rows)
    vocab = Vocabulary.build([v for f in schema.TEXT_FIELDS for v in rows[f]])
    torch.manual_seed(0)
    model = ItemSage(model_config("tiny"), len(vocab), DI)
    model.train()  # encode_products must switch to eval itself
    together = encode_products(model, featurize(table, vocab, schema.TEXT_FIELDS, 20, DI))
    assert model.training  # and restore the mode
    alone = torch.cat([encode_products(model, featurize(table.slice(i, 1), vocab, schema.TEXT_FIELDS, 20, DI))
                       for i in range(4)])
    assert not together.requires_grad
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_wrong_image_width_is_refused(batch):
    model = ItemSage(model_config("tiny"), VOCAB, DI + 1)
    with pytest.raises(ValueError, match="9-d image vectors, the batch has 8-d"):
        model(batch)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=500, heads=8), r"model.d_model \(500\) must be divisible by model.heads \(8\)"),
    (dict(aggregator="mean"), "model.aggregator must be one of transformer, sum, concat"),
    (dict(modalities="audio"), "model.modalities must be one of both, image, text"),
    (dict(adapter="attention"), "model.adapter"),
    (dict(max_images=0), "model.max_images"),
    (dict(max_images=21), "model.max_images"),
    (dict(hash_buckets=0), "model.hash_buckets"),
    (dict(out_dim=-3), "model.out_dim"),
    (dict(layers=1.5), "model.layers"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(text_fields=("title", "title")), "model.text_fields"),
    (dict(text_fields=()), "model.text_fields is empty"),
    (dict(aggregator="concat", type_embedding=True), "model.type_embedding"),
    (dict(text_norm="batchnorm"), "model.text_norm"),
    (dict(projection="conv"), "model.projection"),
    (dict(pooling="mean"), "model.pooling"),
    (dict(aggregator="sum", pooling="attention"), "model.pooling='attention' applies"),
    (dict(norm_first=1), "model.norm_first"),
    (dict(text_projection="per_token"), "model.text_projection must be one of shared, per_field"),
    (dict(token_dropout=1.0), "model.token_dropout must be in"),
    (dict(text_projection="per_field", projection="mlp"), "does not combine with model.projection='mlp'"),
    (dict(colour="red"), "model.colour"),
])
def test_config_errors_name_the_option(overrides, message):
    with pytest.raises(ConfigError, match=message):
        model_config("paper", **overrides)


def test_presets():
    paper = model_config("paper")
    assert (paper.d_model, paper.heads, paper.layers, paper.ff_dim, paper.hash_buckets, paper.hash_dim,
            paper.head_hidden, paper.out_dim, paper.max_images) == (512, 8, 1, 2048, 100_000, 256, 1024, 256, 20)
    assert paper.text_fields == schema.TEXT_FIELDS
    # The ablations' winners (docs/METHOD.md): the presets differ from the earlier defaults only there.
    earlier = ModelConfig()
    assert paper == ModelConfig(type_embedding=True, dropout=0.0, text_norm="l2", projection="mlp", pooling="cls_sum")
    cpu = model_config("cpu")
    assert cpu.out_dim == 256 and (cpu.type_embedding, cpu.dropout, cpu.text_norm, cpu.projection, cpu.pooling) == (
        True, 0.0, "l2", "linear", "cls_sum")
    assert earlier.pooling == "cls" and model_config("cpu", aggregator="sum").pooling == "cls"
    assert (earlier.type_embedding, earlier.dropout, earlier.text_norm, earlier.projection) == (
        False, 0.1, "layernorm", "linear")
    # The preset's transformer-only choices give way to a baseline aggregator; given explicitly, they are refused.
    assert not model_config("cpu", aggregator="concat").type_embedding
    assert model_config("cpu", aggregator="sum").type_embedding
    with pytest.raises(ConfigError, match="model.type_embedding"):
        model_config("cpu", aggregator="concat", type_embedding=True)
    with pytest.raises(ConfigError, match="model.pooling"):
        model_config("cpu", aggregator="sum", pooling="attention")
    assert model_config("tiny", text_fields=["title"]).text_fields == ("title",)
    with pytest.raises(ConfigError, match="model preset must be one of paper, cpu, tiny"):
        model_config("huge")
    with pytest.raises(ConfigError, match="model.modalities='text'"):
        ItemSage(model_config("tiny"), VOCAB, image_dim=0)  # a catalog without images


# --------------------------------------------------------------------------------------------------
# Query adapters, logit scale, FLOPs
# --------------------------------------------------------------------------------------------------


def test_adapters_identity_vs_linear():
    adapters = QueryAdapters({"closeup": 16, "search": 24}, out_dim=16, mode="auto")
    assert adapters.is_identity("closeup") and not adapters.is_identity("search")
    assert adapters.maps["search"].bias is None
    q = torch.randn(5, 16)
    torch.testing.assert_close(adapters("closeup", q), q / q.norm(dim=1, keepdim=True))
    s = torch.randn(5, 24)
    out = adapters("search", s)
    torch.testing.assert_close(out, nn.functional.normalize(s @ adapters.maps["search"].weight.T, dim=1))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    linear = QueryAdapters({"closeup": 16}, out_dim=16, mode="linear")
    assert not linear.is_identity("closeup") and len(list(linear.parameters())) == 1
    with pytest.raises(ConfigError, match="no query adapter for surface 'home'"):
        adapters("home", q)
    with pytest.raises(ValueError, match="search queries must be 24-d vectors, got 16-d"):
        adapters("search", q)


def test_logit_scale():
    scale = LogitScale()
    assert math.isclose(scale().item(), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    scale.clamp_()
    assert scale().item() == pytest.approx(100.0)


def test_logit_scale_cannot_get_stuck_at_the_cap():
    # Push the temperature up with AdamW far past the cap, then down: clamped after every step, the
    # stored log-scale never exceeds log 100, and the gradient brings it back down at once.
    scale = LogitScale()
    opt = torch.optim.AdamW(scale.parameters(), lr=0.2, weight_decay=0.0)
    cap = math.log(100.0)
    for direction, steps in ((-1.0, 60), (1.0, 15)):  # minimise -scale (up), then +scale (down)
        for _ in range(steps):
            opt.zero_grad()
            (direction * scale()).backward()
            assert scale.log_scale.grad != 0  # never a dead gradient, even at the cap
            opt.step()
            scale.clamp_()
            assert scale.log_scale.item() <= cap + 1e-6
        if direction < 0:
            assert scale.log_scale.item() == pytest.approx(cap)  # it did reach the cap
    assert scale.log_scale.item() < cap - 0.5, scale.log_scale.item()  # and came back down


@pytest.mark.parametrize("aggregator", ["transformer", "sum", "concat"])
@pytest.mark.parametrize("options", [{}, dict(projection="mlp"), dict(pooling="attention"), dict(norm_first=False),
                                     dict(text_projection="per_field"), dict(pooling="cls_sum")])
def test_flops_per_product_matches_flop_counter(aggregator, options):
    """Against torch's FlopCounterMode on one unpadded product (every image and field present).
    Attention runs on torch's math kernel here (plain matmuls the counter sees; the fused CPU kernel
    is invisible to it), so every term is counted by torch, none by a formula of this code."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if aggregator != "transformer" and options.get("pooling"):
        pytest.skip("pooling applies to the transformer only")
    cfg = model_config("tiny", layers=2, dropout=0.0, aggregator=aggregator, max_images=3, **options)
    model = ItemSage(cfg, VOCAB, DI)  # train mode: the stock layers run unfused, visible to the counter
    g = torch.Generator().manual_seed(6)
    images, fields = random_product(g, 3, list(range(F)))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(make_batch([images], [fields]))
    assert flops_per_product(cfg, 3, F, image_dim=DI) == counter.get_total_flops()


# --------------------------------------------------------------------------------------------------
# Tower options (the ablations of docs/METHOD.md)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [True, False])
def test_cls_sum_is_the_cls_output_plus_the_present_tokens_sum(batch, norm_first):
    """cls_sum against its definition: the same weights read with pooling cls, plus the sum of the
    encoder's input tokens over the present positions only (an absent image slot adds nothing)."""
    torch.manual_seed(3)
    with_sum = ItemSage(model_config("tiny", pooling="cls_sum", norm_first=norm_first, dropout=0.0), VOCAB, DI).eval()
    cls = ItemSage(model_config("tiny", pooling="cls", norm_first=norm_first, dropout=0.0), VOCAB, DI).eval()
    cls.load_state_dict(with_sum.state_dict())  # cls_sum adds no parameter
    with torch.no_grad():
        x, present = cls.tokens(batch)  # [B, S, D], [B, S]
        assert not present.all()  # the fixture has absent positions: the mask matters
        expected = cls.forward_features(batch) + (x * present.unsqueeze(-1)).sum(dim=1)
        torch.testing.assert_close(with_sum.forward_features(batch), expected, rtol=1e-5, atol=1e-5)

# The tiny transformer's parameters before the options existed: an artifact saved then holds these.
EARLIER_KEYS = {"image_proj.weight", "image_proj.bias", "text_embed.table.weight", "text_embed.importance.weight",
                "text_proj.0.weight", "text_proj.0.bias", "text_proj.1.weight", "text_proj.1.bias", "cls"}


def test_an_earlier_config_without_the_options_builds_the_earlier_tower():
    from itemsage.config import from_dict

    earlier = {k: v for k, v in model_config("tiny").__dict__.items()
               if k not in ("text_norm", "projection", "pooling", "norm_first", "text_projection", "token_dropout")}
    cfg = from_dict(ModelConfig, earlier, section="model")
    assert (cfg.text_norm, cfg.projection, cfg.pooling, cfg.norm_first) == ("layernorm", "linear", "cls", True)
    model = ItemSage(cfg, VOCAB, DI)
    keys = {k for k in model.state_dict() if not k.startswith(("encoder.", "head."))}
    assert keys == EARLIER_KEYS
    assert isinstance(model.text_proj[0], nn.LayerNorm) and model.encoder.layers[0].norm_first


def test_option_parameter_counts_by_hand():
    """Each option adds or removes exactly the parameters it should (tiny: D 32, ff 64, Dh 16, Di 8)."""
    def count(**options):
        return sum(p.numel() for p in tower(**options).parameters())

    D, ff, Dh = 32, 64, 16
    base = count()
    # mlp: Linear(Di -> D) becomes Linear(Di -> ff) + Linear(ff -> D); the same for the text group.
    assert count(projection="mlp") - base == ((DI * ff + ff) + (ff * D + D) - (DI * D + D)) + (
        (Dh * ff + ff) + (ff * D + D) - (Dh * D + D))
    assert count(text_norm="l2") - base == -2 * Dh  # no LayerNorm weight and bias
    assert count(text_norm="none") == count(text_norm="l2")
    assert count(pooling="attention") - base == 3 * D  # a LayerNorm (2D) and the query (D)
    assert count(norm_first=False) == base
    assert count(text_projection="per_field") - base == (F - 1) * (Dh * D + D)  # F Linears instead of one


def test_per_field_text_projection_reads_each_field_with_its_own_linear(batch):
    """Against one nn.Linear per field, by hand: field f's bag goes through field f's weight alone."""
    model = tower(text_projection="per_field")
    proj = model.text_proj[1]
    g = torch.Generator().manual_seed(3)
    bags = torch.randn(2 * F, 16, generator=g)  # 2 products x F fields, field-major within a product
    normed = model.text_proj[0](bags)
    expected = torch.stack([normed[i] @ proj.weight[i % F] + proj.bias[i % F] for i in range(2 * F)])
    torch.testing.assert_close(model.text_proj(bags), expected)
    # the same bag in two different fields gives two different tokens (a shared Linear gives one)
    twice = make_batch([torch.zeros(0, DI)], [[[1, 2, 3], [1, 2, 3]] + [[]] * (F - 2)])
    tokens, _ = model._text_tokens(twice)
    assert not torch.allclose(tokens[0, 0], tokens[0, 1])
    shared_tokens, _ = tower()._text_tokens(twice)
    torch.testing.assert_close(shared_tokens[0, 0], shared_tokens[0, 1])
    # With every field's weight set to the shared Linear's, the tower is the shared tower; one field's
    # own weight then changes the product vectors.
    base = tower()
    state = base.state_dict()
    linear_w, linear_b = state.pop("text_proj.1.weight"), state.pop("text_proj.1.bias")  # [D, Dh], [D]
    state["text_proj.1.weight"] = linear_w.T.expand(F, -1, -1).clone()  # [F, Dh, D]
    state["text_proj.1.bias"] = linear_b.expand(F, -1).clone()  # [F, D]
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base(batch))
        model.text_proj[1].weight[0] += 0.5 * torch.randn(16, 32, generator=g)  # not a constant: LayerNorm rows sum to 0
        assert not torch.allclose(model(batch), base(batch), atol=1e-4)


def test_l2_text_norm_projects_the_unit_bag_by_hand():
    model = tower(text_norm="l2")
    v = torch.tensor([[3.0, 4.0] + [0.0] * 14, [0.0] * 16])  # a bag, and an empty field
    linear = model.text_proj[1]
    torch.testing.assert_close(model.text_proj(v)[0], linear.weight @ torch.tensor([0.6, 0.8] + [0.0] * 14) + linear.bias)
    torch.testing.assert_close(model.text_proj(v)[1], linear.bias)  # an empty bag stays zero before the Linear
    # A field repeated twice (a bag twice the sum) gives the same token under l2, a different one without a norm.
    doubled = make_batch([torch.zeros(0, DI)], [[[1, 2, 3] * 2] + [[]] * (F - 1)])
    once = make_batch([torch.zeros(0, DI)], [[[1, 2, 3]] + [[]] * (F - 1)])
    with torch.no_grad():
        torch.testing.assert_close(model(doubled), model(once), atol=1e-6, rtol=1e-5)
        plain = tower(text_norm="none")
        assert not torch.allclose(plain(doubled), plain(once), atol=1e-3)


@pytest.mark.parametrize("options", [dict(projection="mlp"), dict(text_norm="l2"), dict(pooling="attention"),
                                     dict(norm_first=False)])
def test_each_option_changes_the_output(batch, options):
    """The default's weights wherever the shapes agree, same batch: an option that did nothing would
    give the default's vectors."""
    base, other = tower(), tower(**options)
    shared = {k: v for k, v in base.state_dict().items() if k in other.state_dict() and other.state_dict()[k].shape == v.shape}
    other.load_state_dict(shared, strict=False)
    with torch.no_grad():
        assert not torch.allclose(other(batch), base(batch), atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_corruption(tmp_path, batch):
    vocab = Vocabulary([f"w{i}" for i in range(VOCAB)], [], [])
    cfg = model_config("tiny", type_embedding=True)
    torch.manual_seed(0)
    model = ItemSage(cfg, len(vocab), DI)
    adapters = QueryAdapters({"search": 24, "closeup": 16}, cfg.out_dim, cfg.adapter)
    scale = LogitScale()
    with torch.no_grad():
        scale.log_scale.fill_(2.5)
    fp = save_model(tmp_path / "m", model, adapters, cfg, vocab, image_dim=DI,
                    query_dims={"search": 24, "closeup": 16}, extra={"steps": 3}, logit_scale=scale)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "vocab.json"]

    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, LoadedModel)
    assert loaded.config == cfg and loaded.vocab == vocab and loaded.image_dim == DI
    assert loaded.query_dims == {"search": 24, "closeup": 16} and loaded.extra == {"steps": 3}
    assert loaded.fingerprint == fp == artifacts.fingerprint(tmp_path / "m")
    assert not loaded.tower.training
    model.eval()
    torch.testing.assert_close(encode_products(loaded, batch), model(batch), atol=0, rtol=0)
    q = torch.randn(3, 24)
    torch.testing.assert_close(loaded.adapters("search", q), adapters("search", q), atol=0, rtol=0)
    assert loaded.logit_scale().item() == scale().item()

    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(artifacts.ArtifactError, match="does not match its manifest"):
        load_model(tmp_path / "m")


def test_save_refuses_mismatched_config(tmp_path):
    vocab = Vocabulary([f"w{i}" for i in range(VOCAB)], [], [])
    model = ItemSage(model_config("tiny"), VOCAB, DI)
    adapters = QueryAdapters({"search": 24}, 16)
    with pytest.raises(ConfigError, match="another config"):
        save_model(tmp_path, model, adapters, model_config("tiny", heads=4), vocab, image_dim=DI,
                   query_dims={"search": 24})
