"""The tower's configuration: `ModelConfig` (validated at construction; errors name the option), the
presets (`paper`, `cpu`, `tiny`), and the forward FLOPs a configuration costs per product.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from itemsage import schema
from itemsage.config import from_dict, require

log = logging.getLogger(__name__)

AGGREGATORS: tuple[str, ...] = ("transformer", "sum", "concat")
MODALITIES: tuple[str, ...] = ("both", "image", "text")
ADAPTER_MODES: tuple[str, ...] = ("auto", "linear", "mlp")
TEXT_NORMS: tuple[str, ...] = ("layernorm", "l2", "none")
PROJECTIONS: tuple[str, ...] = ("linear", "mlp")
TEXT_PROJECTIONS: tuple[str, ...] = ("shared", "per_field")
POOLINGS: tuple[str, ...] = ("cls", "attention", "cls_sum")
POPULARITIES: tuple[str, ...] = ("none", "content", "id")
_MAX_SIZE = {"layers": 256, "hash_buckets": 2**31 - 1}  # else 65,536 (widths, heads)


@dataclass
class ModelConfig:
    """The product tower's shape. Defaults are the paper's configuration (preset `paper`)."""

    d_model: int = 512  # D: token width inside the transformer
    heads: int = 8
    layers: int = 1
    ff_dim: int = 2048  # feed-forward width of each encoder layer
    dropout: float = 0.1
    hash_buckets: int = 100_000  # rows of the hash embedding table E
    hash_dim: int = 256  # Dh: width of E
    out_dim: int = 256  # width of the product embedding
    head_hidden: int = 1024  # H: the head's widening layer
    max_images: int = schema.MAX_IMAGES  # M slots
    text_fields: tuple[str, ...] = schema.TEXT_FIELDS  # F slots, in sequence order
    aggregator: str = "transformer"  # transformer | sum | concat
    modalities: str = "both"  # both | image | text
    type_embedding: bool = False  # ablation: a learned per-slot embedding added to each token
    adapter: str = "auto"  # auto: identity where a query space already has out_dim, else a Linear; linear:
    # always a Linear; mlp: as auto, with a two-layer MLP added to each learned Linear (model/tower.py)
    # The defaults below are the earlier behaviour, so an artifact saved before an option existed
    # loads as it was trained; the presets choose (docs/METHOD.md, "The tower").
    text_norm: str = "layernorm"  # a text field's hash bag before its projection: layernorm | l2 | none
    projection: str = "linear"  # per feature group: linear (Linear -> D) | mlp (Linear -> GELU -> Linear, hidden ff_dim)
    pooling: str = "cls"  # transformer output: cls ([CLS] position) | attention (learned-query softmax over all positions)
    # | cls_sum ([CLS] output plus the sum of the input tokens: the sum-pooling baseline's direct path beside attention)
    norm_first: bool = True  # transformer layers: pre-LN (True) or post-LN (False)
    # shared: one text projection for every field (told apart by type embeddings only); per_field: each
    # text field its own Linear (Dh -> D), as the concat MLP's head weighs each slot with its own weights
    text_projection: str = "shared"
    # training only: each step leaves this share of the batch's distinct text tokens (n-grams) out of
    # every bag, so no product's embedding rests on a few of its own n-grams (0 = off)
    token_dropout: float = 0.0
    # a per-product score added to the logit (model/popularity.py): none | content (a prior from the
    # product's embedding) | id (the prior + a learned offset per product engaged in the train window)
    popularity: str = "none"
    # graph token slots: G tokens a product takes from the graph stage (itemsage/graph: the pooled
    # content of the products people engaged with alongside it); 0 = the model reads no graph. Set by
    # training from the graph artifact's token names; a product without engagements has none (masked)
    graph_tokens: int = 0
    # training only: the share of products whose graph tokens are left out in a step, so the tower
    # also learns to embed a product from its content alone (new products have no graph tokens). At 0
    # every positive has graph tokens and only never-engaged products lack them, so "no token" marks a
    # product no query wants, and the tower buries every cold product (docs/METHOD.md, "Graph tokens in
    # the tower"). Training only: an artifact embeds as it was trained whatever this is.
    graph_dropout: float = 0.5

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "layers", "ff_dim", "hash_buckets", "hash_dim", "out_dim",
                     "head_hidden"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"model.{name} must be a positive integer, got {value!r}")
            # Bounds past any trained configuration (the paper: d 512, 1 layer, 100k buckets): a larger
            # value is a slip that would allocate the tensors (and fail) after the data has been read.
            high = _MAX_SIZE.get(name, 65_536)
            require(value <= high, f"model.{name} must be at most {high:,}, got {value!r}")
        require(self.hash_buckets * self.hash_dim <= 2**32, f"model.hash_buckets x model.hash_dim "
                f"({self.hash_buckets:,} x {self.hash_dim:,}) must be at most 2^32 weights (16 GiB of float32)")
        require(self.d_model % self.heads == 0,
                f"model.d_model ({self.d_model}) must be divisible by model.heads ({self.heads})")
        require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                f"model.dropout must be in [0, 1), got {self.dropout!r}")
        require(isinstance(self.token_dropout, (int, float)) and 0.0 <= self.token_dropout < 1.0,
                f"model.token_dropout must be in [0, 1), got {self.token_dropout!r}")
        require(isinstance(self.graph_dropout, (int, float)) and 0.0 <= self.graph_dropout <= 1.0,
                f"model.graph_dropout must be in [0, 1], got {self.graph_dropout!r}")
        require(isinstance(self.graph_tokens, int) and not isinstance(self.graph_tokens, bool)
                and 0 <= self.graph_tokens <= 16, f"model.graph_tokens must be an integer in 0..16, got "
                f"{self.graph_tokens!r}")
        require(isinstance(self.max_images, int) and 1 <= self.max_images <= schema.MAX_IMAGES,
                f"model.max_images must be an integer in 1..{schema.MAX_IMAGES}, got {self.max_images!r}")
        if isinstance(self.text_fields, str):  # one field given as a bare string
            self.text_fields = (self.text_fields,)
        self.text_fields = tuple(self.text_fields)
        require(all(isinstance(f, str) and f for f in self.text_fields),
                f"model.text_fields must be non-empty field names, got {list(self.text_fields)}")
        duplicates = sorted({f for f in self.text_fields if self.text_fields.count(f) > 1})
        require(not duplicates, f"model.text_fields lists {duplicates} more than once")
        for name, choices in (("aggregator", AGGREGATORS), ("modalities", MODALITIES), ("adapter", ADAPTER_MODES),
                              ("text_norm", TEXT_NORMS), ("projection", PROJECTIONS), ("pooling", POOLINGS),
                              ("text_projection", TEXT_PROJECTIONS), ("popularity", POPULARITIES)):
            value = getattr(self, name)
            require(value in choices, f"model.{name} must be one of {', '.join(choices)}, got {value!r}")
        require(isinstance(self.type_embedding, bool),
                f"model.type_embedding must be true or false, got {self.type_embedding!r}")
        require(self.pooling == "cls" or self.aggregator == "transformer",
                f"model.pooling={self.pooling!r} applies to aggregator transformer only (sum and concat "
                "do not attend); set model.pooling='cls'")
        require(self.text_projection == "shared" or self.projection == "linear",
                f"model.text_projection='per_field' is a Linear per field; it does not combine with "
                f"model.projection={self.projection!r} (set model.projection='linear')")
        require(isinstance(self.norm_first, bool),
                f"model.norm_first must be true or false, got {self.norm_first!r}")
        require(not (self.type_embedding and self.aggregator == "concat"),
                "model.type_embedding applies to aggregator transformer or sum; concat slots are "
                "already positional (set model.type_embedding=false)")
        require(self.modalities == "image" or len(self.text_fields) > 0,
                f"model.text_fields is empty but model.modalities is {self.modalities!r}; list the "
                "text fields or set model.modalities='image'")

    @property
    def uses_images(self) -> bool:
        return self.modalities in ("both", "image")

    @property
    def uses_text(self) -> bool:
        return self.modalities in ("both", "text")


# The ablations' winners (docs/METHOD.md, "The tower: ablations"), in the presets, not the ModelConfig
# defaults, so an artifact saved before an option existed loads as it was trained.
# cls_sum (2026-12-07): [CLS] plus the input tokens' sum, +0.015 all and +0.033 search on the 5k
# compare shop, 3 seeds (docs/METHOD.md, "Graph tokens, and the levers tried against the ceiling").
ADOPTED: dict[str, Any] = dict(type_embedding=True, dropout=0.0, text_norm="l2", pooling="cls_sum")

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's configuration: 1 layer, 8 heads, d = 512, head 512 -> 1024 -> 256, with the ablations'
    # winners; the two-layer MLP projection per feature group also won per step, and costs 2.6x a step
    # at cpu size on one core, so only this preset (meant for an accelerator) takes it.
    "paper": dict(**ADOPTED, projection="mlp"),
    # The paper's shape at CPU size, so the demo (20k products) trains in minutes on two cores.
    # Forward+backward of 1,024 products (~400 n-grams and ~3 images each, 256-d image vectors) on
    # 2 cores, best of 10: d_model 128 ~0.25 s (3.7M parameters), d_model 256 / 8 heads / ff 1024 /
    # hash 100k x 128 ~0.65 s (14M). A training step runs the tower over the batch plus 4x random
    # negatives, so d_model 128 is what fits hundreds of steps into five minutes.
    "cpu": dict(d_model=128, heads=4, layers=1, ff_dim=512, hash_buckets=50_000,
                hash_dim=64, head_hidden=256, out_dim=256, **ADOPTED),
    # Tests: seconds on a CPU.
    "tiny": dict(d_model=32, heads=2, layers=1, ff_dim=64, dropout=0.1, hash_buckets=1000,
                 hash_dim=16, head_hidden=64, out_dim=16),
}


def model_config(preset: str = "cpu", **overrides: Any) -> ModelConfig:
    """A preset's ModelConfig with `overrides` applied (validated like any config).

    A preset's transformer-only choices give way to an overriding aggregator they do not apply to
    (the preset's type embeddings under `aggregator="concat"`, its pooling under sum or concat); the
    same option given as an override is still checked and refused.
    """
    require(preset in PRESETS, f"model preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    merged = {**PRESETS[preset], **overrides}
    aggregator = merged.get("aggregator", "transformer")
    if aggregator == "concat" and "type_embedding" not in overrides:
        merged.pop("type_embedding", None)
    if aggregator != "transformer" and "pooling" not in overrides:
        merged.pop("pooling", None)
    return from_dict(ModelConfig, merged, section="model")


def flops_per_product(cfg: ModelConfig, image_count: int, token_count: int, *, image_dim: int = 256) -> int:
    """Forward matmul FLOPs (2 per multiply-add) of one product with `image_count` present images
    and `token_count` non-empty text fields (text tokens of the sequence, not hashed n-grams).

    Counts what `ItemSage.forward` computes for the product: the image and text projections, per
    encoder layer the Q/K/V projections, attention scores and weighted sum, output projection and
    feed-forward (the last layer for the [CLS] query only, keys and values folded into the query,
    as `_cls_only_layer` implements it; every layer in full for attention pooling or post-LN, plus
    the pooling's scores and sum), and the head. Not
    counted: the hash-bag gather-and-sum, LayerNorms, GELU, softmax and the L2 normalisation (not
    matmuls). To count what a padded batch executes, pass image_count = the batch's image slots and
    token_count = F. Image-only / text-only models ignore the other count.
    """
    D, H = cfg.d_model, cfg.head_hidden
    m = image_count if cfg.uses_images else 0
    t = token_count if cfg.uses_text else 0
    if cfg.projection == "linear":
        flops = 2 * m * image_dim * D + 2 * t * cfg.hash_dim * D  # projections
    else:  # Linear(in -> ff) -> GELU -> Linear(ff -> D) per token
        flops = 2 * m * (image_dim + D) * cfg.ff_dim + 2 * t * (cfg.hash_dim + D) * cfg.ff_dim
    if cfg.aggregator == "concat":
        slots = (cfg.max_images if cfg.uses_images else 0) + (len(cfg.text_fields) if cfg.uses_text else 0)
        return flops + 2 * slots * D * H + 2 * H * cfg.out_dim
    if cfg.aggregator == "transformer":
        S = 1 + m + t
        full_layer = (2 * S * D * 3 * D  # Q, K, V projections
                      + 2 * S * S * D * 2  # scores Q·K^T and weights·V
                      + 2 * S * D * D  # output projection
                      + 2 * S * D * cfg.ff_dim * 2)  # feed-forward
        heads = cfg.heads
        cls_layer = (2 * D * D * 2  # Q for [CLS], and the query folded through W_k
                     + 2 * S * D * heads * 2  # scores and weighted inputs, per head over the D inputs
                     + 2 * D * D * 2  # W_v on the pooled inputs, output projection
                     + 2 * D * cfg.ff_dim * 2)  # feed-forward
        if cfg.pooling in ("cls", "cls_sum") and cfg.norm_first:
            flops += (cfg.layers - 1) * full_layer + cls_layer
        else:  # every layer in full; attention pooling scores and sums the S outputs
            flops += cfg.layers * full_layer + (2 * S * D * 2 if cfg.pooling == "attention" else 0)
    return flops + 2 * D * H + 2 * H * cfg.out_dim  # head
