"""The ItemSage product tower, the query adapters, the logit scale and the presets (the network).

`model.py` joins them into one `ItemSageModel` and owns the model artifact (save/load).

A product becomes one sequence of width-D tokens and one unit vector:

    [CLS]  +  M image vectors  --shared Linear(Di -> D)-->  +  F text fields --hash bag -> LN -> Linear(Dh -> D)-->
      -> transformer encoder (no positional embeddings) -> output at [CLS]
      -> LayerNorm -> Linear(D -> H) -> GELU -> Linear(H -> out) -> L2 normalise

Baselines are configurations of the same class: `aggregator="sum"` pools the tokens instead of
attending, `aggregator="concat"` concatenates fixed slots into an MLP, `modalities="image"|"text"`
leaves the other feature group out of the model entirely.

Choices the paper leaves open, made here:
- the [CLS] input is a learned D-vector (a Linear applied to a learned constant input is the same
  function class, so the extra projection would only add parameters);
- the encoder is pre-LN (`norm_first=True`); the head's LayerNorm is then its final norm. Pre-LN
  trains stably when token scales differ (image vectors vs summed hash embeddings);
- a text field's hash-bag sum goes through a LayerNorm before the shared projection: the sum's scale
  grows with the field's length (a title has tens of n-grams, a description hundreds), and the
  normalisation keeps every field on one scale (Pinterest's production hash bag does the same);
- only the [CLS] output is read, so the last encoder layer computes its attention query, output
  projection and feed-forward for the [CLS] position alone, and folds the key and value projections
  into that one query (`_cls_only_layer`: scores and pooling read the normalised tokens directly, so
  no key or value is projected for any token). This is exactly the stock layer's [CLS] output
  (`test_matches_unpadded_reference` checks it against the stock layer) at a fraction of the cost:
  with 1 layer, S = 17, D = 512 and ff 2048 the layer's matmul FLOPs fall 3.5x (its attention part
  8x). Earlier stock layers (layers > 1) run `scaled_dot_product_attention` through
  MultiheadAttention;
- `aggregator="sum"` includes the [CLS] token in the pooled sum, so it acts as a learned bias and a
  product with no images and no text still gets a learned vector.

Options tried in the ablations (docs/METHOD.md has the table; the ModelConfig defaults are the
earlier behaviour, so older artifacts load unchanged, and the presets choose): `text_norm` (LayerNorm,
L2 or nothing on the hash bag), `projection` (one Linear per feature group, or OmniSage's two-layer
MLP), `text_projection` (one text projection shared by every field, or one per field),
`token_dropout` (n-grams left out of the bags in training), `pooling` ([CLS], or a learned query's
softmax over every output) and `norm_first` (pre- or post-LN). Attention pooling and post-LN run
every layer in full (the [CLS]-only shortcut is exact only for a pre-LN layer read at [CLS]).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as fn
from torch import Tensor, nn

from itemsage.config import ConfigError, require
from itemsage.model.batch import ProductBatch
from itemsage.model.config import ADAPTER_MODES, ModelConfig
from itemsage.model.hash_embedding import HashEmbedding

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Product tower
# --------------------------------------------------------------------------------------------------


class _L2Norm(nn.Module):
    """Rows to unit length; an all-zero row (an empty field) stays zero."""

    def forward(self, x: Tensor) -> Tensor:
        return fn.normalize(x, dim=-1)


def _projection(cfg: ModelConfig, in_dim: int) -> nn.Module:
    """A feature group's map into the token width: Linear, or Linear -> GELU -> Linear (hidden ff_dim)."""
    if cfg.projection == "linear":
        return nn.Linear(in_dim, cfg.d_model)
    return nn.Sequential(nn.Linear(in_dim, cfg.ff_dim), nn.GELU(), nn.Linear(cfg.ff_dim, cfg.d_model))


class FieldLinear(nn.Module):
    """One Linear(in -> out) per text field: [B·F, in] rows (field-major within a product) -> [B·F, out].

    Row b·F + f goes through field f's own weight, so the brand field and the title are read by
    different maps (the shared projection tells them apart only by the added type embedding).
    """

    def __init__(self, fields: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fields = fields
        self.weight = nn.Parameter(torch.empty(fields, in_dim, out_dim))  # [F, in, out]
        self.bias = nn.Parameter(torch.empty(fields, out_dim))  # [F, out]
        bound = in_dim**-0.5  # nn.Linear's default initialisation, per field
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.view(-1, self.fields, x.shape[-1])  # [B, F, in]
        out = torch.einsum("bfi,fio->bfo", rows, self.weight) + self.bias  # [B, F, out]
        return out.reshape(-1, out.shape[-1])  # [B·F, out]


class Head(nn.Module):
    """LayerNorm -> Linear(in -> H) -> GELU -> Linear(H -> out) -> L2 normalise."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, in] -> [B, out] unit rows
        # Unit vectors in float32 even under autocast: the logits are scaled by up to 100.
        return fn.normalize(self.fc2(self.act(self.fc1(self.norm(x)))).float(), dim=-1)


def _cls_only_layer(layer: nn.TransformerEncoderLayer, x: Tensor, pad: Tensor) -> Tensor:
    """The [CLS] output of a pre-LN `layer` on x [B, S, D]: the query is position 0 alone -> [B, D].

    Same parameters and maths as `layer(x, src_key_padding_mask=pad)[:, 0]`, with the key and value
    projections folded into the single query (exact algebra, no approximation). For head h with
    query q_h (scaled by dh^-1/2) and normalised inputs x_s:
        score_hs = q_h · (W_k^h x_s + b_k^h) = (W_k^h^T q_h) · x_s + const_h   (const cancels in softmax)
        out_h    = sum_s a_hs (W_v^h x_s + b_v^h) = W_v^h (sum_s a_hs x_s) + b_v^h sum_s a_hs
    so no [S, D] key or value is ever projected: per product the layer costs O(S·D·heads) for the
    scores and the pooling instead of O(S·D²) for K and V, and the feed-forward runs once.
    """
    attn = layer.self_attn
    B, S, D = x.shape
    H = attn.num_heads
    dh = D // H
    h = layer.norm1(x)  # [B, S, D]
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)  # [D, D] each, rows = output features (head-major)
    b_q, _, b_v = attn.in_proj_bias.chunk(3)  # the key bias only shifts every score of a head: it cancels
    q = fn.linear(h[:, 0], w_q, b_q).view(B, H, dh) * dh**-0.5  # [B, H, dh] the [CLS] query per head
    qk = torch.einsum("bhe,hed->bhd", q, w_k.view(H, dh, D))  # [B, H, D] the query read in input space
    scores = torch.bmm(h, qk.transpose(1, 2))  # [B, S, H]
    scores = scores.masked_fill(pad.unsqueeze(-1), float("-inf"))  # padding: weight exactly 0
    weights = fn.dropout(scores.softmax(dim=1), attn.dropout, layer.training)  # [B, S, H]
    pooled = torch.bmm(weights.transpose(1, 2), h)  # [B, H, D] attention-weighted inputs per head
    values = torch.einsum("bhd,hed->bhe", pooled, w_v.view(H, dh, D))  # [B, H, dh]
    values = values + weights.sum(1).unsqueeze(-1) * b_v.view(H, dh)  # the value bias, times the weights' sum
    c = x[:, 0] + layer.dropout1(attn.out_proj(values.reshape(B, D)))  # [B, D]
    return c + layer._ff_block(layer.norm2(c))  # [B, D]


class ItemSage(nn.Module):
    """The product tower: ProductBatch -> [B, out_dim] unit vectors (docs/METHOD.md).

    A switched-off part (text for an image-only model, the encoder for `sum`) is `nn.Identity()`,
    so it holds no weights and takes no input.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, image_dim: int, graph_dim: int = 0) -> None:
        super().__init__()
        require(isinstance(image_dim, int) and image_dim >= 0,
                f"image_dim must be an integer >= 0, got {image_dim!r}")
        require(isinstance(graph_dim, int) and graph_dim >= 0 and (graph_dim > 0) == (cfg.graph_tokens > 0),
                f"graph_dim ({graph_dim!r}) must be > 0 exactly when model.graph_tokens ({cfg.graph_tokens}) is")
        require(not cfg.uses_images or image_dim > 0,
                f"the products have no image vectors (image_dim {image_dim}) but model.modalities is "
                f"{cfg.modalities!r}; give the products images or set model.modalities='text'")
        require(not cfg.uses_text or (isinstance(vocab_size, int) and vocab_size > 0),
                f"the text vocabulary is empty (size {vocab_size!r}) but model.modalities is "
                f"{cfg.modalities!r}; give the products text or set model.modalities='image'")
        self.cfg = cfg
        self.image_dim = image_dim
        self.graph_dim = graph_dim
        self.vocab_size = vocab_size
        D = cfg.d_model
        self.num_image_slots = cfg.max_images if cfg.uses_images else 0
        self.num_text_slots = len(cfg.text_fields) if cfg.uses_text else 0
        self.num_graph_slots = cfg.graph_tokens

        # One projection per feature group (docs/METHOD.md).
        self.image_proj = _projection(cfg, image_dim) if cfg.uses_images else nn.Identity()
        if cfg.uses_text:
            self.text_embed: nn.Module = HashEmbedding(vocab_size, cfg.hash_buckets, cfg.hash_dim,
                                                              cfg.token_dropout)
            norm = {"layernorm": nn.LayerNorm(cfg.hash_dim), "l2": _L2Norm(), "none": nn.Identity()}[cfg.text_norm]
            per_field = cfg.text_projection == "per_field"
            proj = FieldLinear(len(cfg.text_fields), cfg.hash_dim, D) if per_field else _projection(cfg, cfg.hash_dim)
            self.text_proj: nn.Module = nn.Sequential(norm, proj)
        else:
            self.text_embed = nn.Identity()
            self.text_proj = nn.Identity()
        # Graph tokens (pooled content of engaged-alongside products): a feature group of their own.
        self.graph_proj = _projection(cfg, graph_dim) if graph_dim else nn.Identity()

        if cfg.aggregator == "concat":  # fixed slots, no [CLS]
            self.cls = None
            self.type_embed = None
            self.encoder: nn.Module = nn.Identity()
            self.head = Head((self.num_image_slots + self.num_text_slots + self.num_graph_slots) * D,
                             cfg.head_hidden, cfg.out_dim)
            return

        self.cls = nn.Parameter(torch.randn(D) * 0.02)  # the learned global [CLS] token
        num_slots = 1 + self.num_image_slots + self.num_text_slots + self.num_graph_slots
        self.type_embed = nn.Parameter(torch.randn(num_slots, D) * 0.02) if cfg.type_embedding else None
        if cfg.aggregator == "transformer":
            layer = nn.TransformerEncoderLayer(
                D, cfg.heads, cfg.ff_dim, cfg.dropout, activation="gelu", batch_first=True,
                norm_first=cfg.norm_first,
            )
            # Nested tensors are a post-LN-only inference path; the layers below use SDPA either way.
            self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        else:
            self.encoder = nn.Identity()
        if cfg.pooling == "attention":  # a learned query scores every position's normalised output
            self.pool_norm: nn.Module | None = nn.LayerNorm(D)
            self.pool_query: nn.Parameter | None = nn.Parameter(torch.randn(D) * D**-0.5)
        else:
            self.pool_norm, self.pool_query = None, None
        self.head = Head(D, cfg.head_hidden, cfg.out_dim)

    # -- the sequence ------------------------------------------------------------------------------

    def _image_tokens(self, batch: ProductBatch) -> tuple[Tensor, Tensor]:
        """-> tokens [B, M, D], present [B, M]."""
        images, present = batch.images, batch.image_mask.bool()  # [B, M, Di], [B, M]
        if images.shape[-1] != self.image_dim:
            raise ValueError(f"this model takes {self.image_dim}-d image vectors, the batch has "
                             f"{images.shape[-1]}-d ones; featurise with the model's image_dim")
        if images.shape[1] > self.num_image_slots:
            raise ValueError(f"the batch has {images.shape[1]} image slots, the model at most "
                             f"{self.num_image_slots} (model.max_images); featurise with that max_images")
        dtype = next(self.image_proj.parameters()).dtype
        return self.image_proj(images.to(dtype)), present

    def _text_tokens(self, batch: ProductBatch) -> tuple[Tensor, Tensor]:
        """-> tokens [B, F, D], present [B, F] (a field with no in-vocabulary token is absent)."""
        B, Fn = len(batch), self.num_text_slots
        offsets, ids = batch.token_offsets, batch.token_ids  # [B*F], [T]
        if offsets.numel() != B * Fn:
            raise ValueError(f"the batch has {offsets.numel()} text bags for {B} products, expected "
                             f"{B * Fn} ({Fn} fields: {', '.join(self.cfg.text_fields)})")
        ends = torch.cat([offsets[1:], offsets.new_full((1,), ids.numel())])  # [B*F]
        present = (ends > offsets).view(B, Fn)  # [B, F]
        bags = self.text_embed(ids, offsets, batch.bags)  # [B*F, Dh]
        return self.text_proj(bags).view(B, Fn, -1), present  # [B, F, D]

    def _graph_tokens(self, batch: ProductBatch) -> tuple[Tensor, Tensor]:
        """-> tokens [B, G, D], present [B, G]. A batch without graph inputs (a product not in the graph
        artifact, an upsert) has every graph token absent; in training a `graph_dropout` share of the
        products loses its graph tokens."""
        B, G = len(batch), self.num_graph_slots
        device = batch.image_mask.device
        dtype = next(self.graph_proj.parameters()).dtype
        if batch.graph is None:
            return torch.zeros(B, G, self.cfg.d_model, device=device, dtype=dtype), torch.zeros(
                B, G, dtype=torch.bool, device=device)
        if batch.graph.shape[1:] != (G, self.graph_dim):
            raise ValueError(f"this model takes {G} graph tokens of width {self.graph_dim}, the batch has "
                             f"{tuple(batch.graph.shape[1:])}; build the graph with the same config")
        present = batch.graph_mask.bool()  # [B, G]
        if self.training and self.cfg.graph_dropout > 0:
            keep = torch.rand(B, 1, device=device) >= self.cfg.graph_dropout  # [B, 1] per product
            present = present & keep
        return self.graph_proj(batch.graph.to(dtype)), present

    def tokens(self, batch: ProductBatch) -> tuple[Tensor, Tensor]:
        """The input sequence: x [B, S, D] (zero where absent) and present [B, S] (True = attend).

        S = 1 + M + F + G ([CLS] first) for transformer/sum; M_max + F + G fixed slots for concat.
        """
        B, D = len(batch), self.cfg.d_model
        device = batch.image_mask.device
        parts: list[Tensor] = []
        masks: list[Tensor] = []
        slots: list[Tensor] = []  # index of each position into type_embed [S]
        if self.cls is not None:
            parts.append(self.cls.expand(B, 1, D))
            masks.append(torch.ones(B, 1, dtype=torch.bool, device=device))  # [CLS] is never masked
            slots.append(torch.zeros(1, dtype=torch.long, device=device))
        if self.cfg.uses_images:
            img, img_present = self._image_tokens(batch)  # [B, M, D], [B, M]
            if self.cfg.aggregator == "concat" and img.shape[1] < self.num_image_slots:
                pad = self.num_image_slots - img.shape[1]  # fixed slots: pad M up to max_images
                img = fn.pad(img, (0, 0, 0, pad))
                img_present = fn.pad(img_present, (0, pad), value=False)
            parts.append(img)
            masks.append(img_present)
            slots.append(1 + torch.arange(img.shape[1], device=device))
        if self.cfg.uses_text:
            txt, txt_present = self._text_tokens(batch)  # [B, F, D], [B, F]
            parts.append(txt)
            masks.append(txt_present)
            slots.append(1 + self.num_image_slots + torch.arange(txt.shape[1], device=device))
        if self.num_graph_slots:
            graph, graph_present = self._graph_tokens(batch)  # [B, G, D], [B, G]
            parts.append(graph)
            masks.append(graph_present)
            slots.append(1 + self.num_image_slots + self.num_text_slots + torch.arange(graph.shape[1], device=device))
        x = torch.cat(parts, dim=1)  # [B, S, D]
        present = torch.cat(masks, dim=1)  # [B, S]
        if self.type_embed is not None:
            x = x + self.type_embed[torch.cat(slots)]  # [B, S, D] + [S, D]
        # Absent positions hold exact zeros for pooling and concat. Attention masks them as keys (a
        # weight of exactly 0), so the transformer skips this pass over [B, S, D] (and its backward).
        if self.cfg.aggregator != "transformer":
            x = x.masked_fill(~present.unsqueeze(-1), 0.0)
        return x, present

    # -- aggregation -------------------------------------------------------------------------------

    def forward_features(self, batch: ProductBatch) -> Tensor:
        """The aggregated product before the head: [B, D] ([B, (M+F)·D] for concat)."""
        x, present = self.tokens(batch)  # [B, S, D], [B, S]
        if self.cfg.aggregator == "concat":
            return x.flatten(1)  # [B, S·D]
        if self.cfg.aggregator == "sum":
            return x.sum(dim=1)  # [B, D]; absent positions are zero
        pad = ~present  # [B, S] True = ignore (nn.Transformer's convention)
        layers = self.encoder.layers
        # cls_sum: the tokens' sum beside the attention (absent positions zeroed), as sum pooling reads them
        direct = x.masked_fill(pad.unsqueeze(-1), 0.0).sum(dim=1) if self.cfg.pooling == "cls_sum" else None  # [B, D]
        # The [CLS]-only shortcut is exact for a pre-LN last layer read at [CLS] only.
        cls_only = self.cfg.pooling in ("cls", "cls_sum") and self.cfg.norm_first
        for layer in (layers[:-1] if cls_only else layers):
            x = layer(x, src_key_padding_mask=pad)  # [B, S, D]
        if cls_only:
            out = _cls_only_layer(layers[-1], x, pad)  # [B, D]
            return out if direct is None else out + direct
        if self.pool_query is None:
            return x[:, 0] if direct is None else x[:, 0] + direct  # [B, D]
        scores = (self.pool_norm(x) @ self.pool_query.unsqueeze(1)).squeeze(-1).masked_fill(pad, float("-inf"))  # [B, S]
        return torch.bmm(scores.softmax(dim=1).unsqueeze(1), x).squeeze(1)  # [B, D]

    def forward(self, batch: ProductBatch) -> Tensor:
        """ProductBatch of B products -> [B, out_dim] unit rows."""
        if len(batch) == 0:
            return torch.zeros(0, self.cfg.out_dim, device=batch.image_mask.device)
        return self.head(self.forward_features(batch))


# --------------------------------------------------------------------------------------------------
# Query side
# --------------------------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """x -> linear(x) + Linear(GELU(Linear(x))): a learned Linear map plus a two-layer MLP whose last
    layer starts at zero, so the map starts as the Linear alone. [B, Dq] -> [B, out]."""

    def __init__(self, linear: nn.Linear, hidden: int) -> None:
        super().__init__()
        self.linear = linear
        self.mlp = nn.Sequential(nn.Linear(linear.in_features, hidden), nn.GELU(),
                                 nn.Linear(hidden, linear.out_features))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.mlp(x)


class QueryAdapters(nn.Module):
    """One map per surface from its frozen query space into the product space (docs/METHOD.md).

    mode `auto`: identity where the query width already equals out_dim (the paper's case: the query
    space is the product space), else a learned Linear without bias; mode `linear`: always learned;
    mode `mlp`: as `auto`, each learned map a Linear plus a two-layer MLP (`ResidualMLP`), so it can
    read what a linear map of a frozen text encoder cannot (an invented brand name's identity).
    Linear maps start orthogonal, so the query neighbourhoods survive the first steps.
    """

    def __init__(self, query_dims: dict[str, int], out_dim: int, mode: str = "auto") -> None:
        super().__init__()
        require(mode in ADAPTER_MODES, f"model.adapter must be one of {', '.join(ADAPTER_MODES)}, got {mode!r}")
        require(isinstance(out_dim, int) and out_dim > 0, f"model.out_dim must be a positive integer, got {out_dim!r}")
        for surface, dim in query_dims.items():
            require(isinstance(surface, str) and surface.isidentifier(),
                    f"query surface names must be identifiers, got {surface!r}")
            require(isinstance(dim, int) and not isinstance(dim, bool) and dim > 0,
                    f"query_dims[{surface!r}] must be a positive integer, got {dim!r}")
        self.query_dims = dict(query_dims)
        self.out_dim = out_dim
        self.mode = mode
        maps: dict[str, nn.Module] = {}
        for surface, dim in sorted(self.query_dims.items()):
            if mode in ("auto", "mlp") and dim == out_dim:
                maps[surface] = nn.Identity()
            else:
                linear = nn.Linear(dim, out_dim, bias=False)  # weight [out, Dq]
                nn.init.orthogonal_(linear.weight)
                maps[surface] = ResidualMLP(linear, 2 * out_dim) if mode == "mlp" else linear
        self.maps = nn.ModuleDict(maps)

    def is_identity(self, surface: str) -> bool:
        return isinstance(self.maps[surface], nn.Identity)

    def forward(self, surface: str, q: Tensor) -> Tensor:
        """q [B, Dq] frozen query vectors of `surface` -> [B, out_dim] unit rows."""
        if surface not in self.maps:
            raise ConfigError(f"no query adapter for surface {surface!r}; this model was trained for "
                              f"{', '.join(sorted(self.maps)) or 'no surface'}")
        if q.shape[-1] != self.query_dims[surface]:
            raise ValueError(f"{surface} queries must be {self.query_dims[surface]}-d vectors, got "
                             f"{q.shape[-1]}-d; encode them with the encoder the model was trained on")
        return fn.normalize(self.maps[surface](q).float(), dim=-1)


class LogitScale(nn.Module):
    """The learned temperature of the sampled softmax (docs/METHOD.md): logits = scale · cosine.

    Stored as log(scale), initialised to log(1/0.07). The scale is capped at `max_scale` (100) by
    `clamp_`, which the training loop calls after every optimiser step: the stored parameter itself
    is kept at or below log(max_scale). Clamping inside forward instead would zero the gradient
    above the cap, and Adam's momentum could push the parameter there and leave it stuck. It lives
    here so the model artifact carries it; the losses only receive its value.
    """

    def __init__(self, init: float = 1 / 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))  # scalar

    def forward(self) -> Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the stored log-scale at or below log(max_scale) (call after each optimiser step)."""
        self.log_scale.clamp_(max=math.log(self.max_scale))


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
