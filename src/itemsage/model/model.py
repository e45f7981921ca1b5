"""One model object, `ItemSageModel`, and the model artifact (save/load) with its Python API.

`ItemSageModel` is the two-tower contract in one `nn.Module`, as CLIP's model is: the product tower,
the per-surface query adapters and the learned temperature, with

    encode_products(batch: ProductBatch) -> [B, D] unit rows
    encode_queries(surface, q [B, Dq])   -> [B, D] unit rows
    forward(products, queries, b, warm_rows) -> (queries [b, D], products [b + r, D], logit scale,
                                                 popularity [b + r] or None)

Training, embed, evaluate and serve call these; nothing else calls the tower or an adapter. Its
state-dict keys (`tower.*`, `adapters.*`, `logit_scale.*`, `popularity.*`) are the artifact's
safetensors keys. With a popularity term (model/popularity.py) a product's score for a query is
`scale * cos(q, p) + b_p`; the artifact keeps the ids of the products that have an offset.

`load_model(directory)` (also `itemsage.load`) gives a `LoadedModel`: the module, its config and
vocabulary, and the numpy API of sentence-transformers' `encode`:

    model.encode_products(products)                  # list of dicts, Table, DataFrame or path -> [N, D]
    model.encode_queries("search", ["red linen chair"])  # texts, vectors, or closeup image paths -> [N, D]

Products go through ingest's own row checks (`ingest.check_products`), so a bad row gets the same
reason and message as in `itemsage ingest`. The network itself (tower, adapters, presets) is in
tower.py; its names are re-exported here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from itemsage import artifacts
from itemsage.config import ConfigError, from_dict, to_dict
from itemsage.data.text import Vocabulary
from itemsage.model.batch import ProductBatch
from itemsage.model.config import (
    ADAPTER_MODES,
    AGGREGATORS,
    MODALITIES,
    PRESETS,
    ModelConfig,
    flops_per_product,
    model_config,
)
from itemsage.model.hash_embedding import HashEmbedding
from itemsage.model.popularity import Popularity
from itemsage.model.tower import Head, ItemSage, LogitScale, QueryAdapters

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
POPULARITY_FILE = "popularity.parquet"  # product_id of each popularity offset row (mode "id")


# --------------------------------------------------------------------------------------------------
# The model: tower, adapters and temperature in one module
# --------------------------------------------------------------------------------------------------


class ItemSageModel(nn.Module):
    """The product tower, the query adapters, the logit scale and the popularity term (when the config
    has one); one module, so DDP syncs them together."""

    def __init__(self, tower: ItemSage, adapters: QueryAdapters, logit_scale: LogitScale | None = None,
                 popularity: Popularity | None = None) -> None:
        super().__init__()
        self.tower, self.adapters = tower, adapters
        self.logit_scale = logit_scale if logit_scale is not None else LogitScale()
        self.popularity = popularity

    @classmethod
    def build(cls, cfg: ModelConfig, vocab_size: int, image_dim: int, query_dims: dict[str, int],
              warm_ids: Sequence[str] = (), graph_dim: int = 0) -> ItemSageModel:
        """A freshly initialised model for this config, vocabulary size, image width and query widths;
        `warm_ids`: the products that get a popularity offset (popularity "id"); `graph_dim`: the width
        of the graph tokens (model.graph_tokens > 0)."""
        popularity = Popularity(cfg.out_dim, cfg.popularity, warm_ids) if cfg.popularity != "none" else None
        return cls(ItemSage(cfg, vocab_size, image_dim, graph_dim),
                   QueryAdapters(query_dims, cfg.out_dim, cfg.adapter), popularity=popularity)

    @property
    def query_dims(self) -> dict[str, int]:
        return self.adapters.query_dims

    @property
    def out_dim(self) -> int:
        return self.adapters.out_dim

    def encode_products(self, batch: ProductBatch) -> Tensor:
        """Featurised products -> [B, D] unit rows (in the module's current train/eval mode)."""
        return self.tower(batch)

    def encode_queries(self, surface: str, q: Tensor) -> Tensor:
        """Frozen query vectors of `surface` [B, Dq] -> [B, D] unit rows via the surface's adapter."""
        return self.adapters(surface, q)

    def product_popularity(self, p: Tensor, warm_rows: Tensor | None = None) -> Tensor | None:
        """b_p [B] of products with embeddings p [B, D] (None without a popularity term)."""
        return None if self.popularity is None else self.popularity(p, warm_rows)

    def forward(self, products: ProductBatch, queries: list[tuple[str, Tensor, Tensor]], b: int,
                warm_rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One training step's embeddings. products: b positives then r negatives; queries: (surface,
        positions [b_s], vectors [b_s, Dq]); warm_rows [b + r]: the products' popularity offset rows ->
        query embeddings [b, D], product embeddings [b + r, D], logit scale [], popularity [b + r] or None."""
        p = self.encode_products(products)  # [b + r, D]
        q = p.new_zeros(b, p.shape[1])  # [b, D]
        given = {surface: (pos, vec) for surface, pos, vec in queries}
        for surface, dim in self.query_dims.items():
            # A surface missing from this batch still runs (on 0 rows), so every adapter weight gets a
            # (zero) gradient and DDP needs no unused-parameter search.
            pos, vec = given.get(surface, (p.new_zeros(0, dtype=torch.long), p.new_zeros(0, dim)))
            q = q.index_copy(0, pos, self.encode_queries(surface, vec).to(q.dtype))
        return q, p, self.logit_scale(), self.product_popularity(p, warm_rows)


# --------------------------------------------------------------------------------------------------
# The model artifact
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model directory loaded for inference (module in eval mode), with the numpy encode API."""

    model: ItemSageModel
    config: ModelConfig
    vocab: Vocabulary
    image_dim: int
    query_dims: dict[str, int]
    fingerprint: str
    extra: dict[str, Any]
    graph_dim: int = 0  # the width of the graph tokens the tower reads (0: it reads none)

    @property
    def reads_graph(self) -> bool:
        return self.graph_dim > 0

    @property
    def tower(self) -> ItemSage:
        return self.model.tower

    @property
    def adapters(self) -> QueryAdapters:
        return self.model.adapters

    @property
    def logit_scale(self) -> LogitScale:
        return self.model.logit_scale

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def featurize(self, table: Any, graph: Any = None) -> ProductBatch:
        """Products in the dataset format (pa.Table) -> the model's ProductBatch on the model's device;
        `graph`: their graph tokens by id (model.batch.GraphInputs; None: none, as for a new product)."""
        from itemsage.model.batch import featurize

        cfg = self.config
        return featurize(table, self.vocab, cfg.text_fields, cfg.max_images, self.image_dim,
                         graph if self.reads_graph else None).to(self.device)

    @property
    def has_popularity(self) -> bool:
        return self.model.popularity is not None

    def unreadable(self, table: Any) -> np.ndarray:
        """[B] bool: products (dataset format) this model reads nothing of (no image it reads, no text
        token in its vocabulary): each gets exactly the vector of an empty product (model/batch.py)."""
        from itemsage.model.batch import unreadable

        return unreadable(table, self.vocab, self.config.text_fields, self.config.modalities)

    @torch.inference_mode()
    def popularity(self, vectors: np.ndarray, product_ids: Sequence[str]) -> np.ndarray | None:
        """Products' popularity in retrieval units, b_p / logit scale -> [B] float32 (None without a
        popularity term): the extra dimension of a product's retrieval vector [p, b_p / scale], whose
        query side is [q, 1]. `vectors` [B, D]: the products' embeddings (embed_table's)."""
        module = self.model
        if module.popularity is None:
            return None
        rows = torch.from_numpy(module.popularity.warm_rows(list(product_ids))).to(self.device)
        b = module.popularity(torch.from_numpy(np.asarray(vectors, np.float32)).to(self.device), rows)
        return (b / module.logit_scale()).float().cpu().numpy()

    @torch.inference_mode()
    def embed_table(self, table: Any, graph: Any = None) -> np.ndarray:
        """Products already in the dataset format (pa.Table, checked) -> [B, D] float32 unit rows;
        `graph`: their graph tokens by id (model.batch.GraphInputs), for a model that reads them."""
        if table.num_rows == 0:
            return np.zeros((0, self.config.out_dim), np.float32)
        return self.model.encode_products(self.featurize(table, graph)).float().cpu().numpy()

    def encode_products(self, products: Any, *, batch_size: int = 256, show_progress_bar: bool = False,
                        image_encoder: Any = None) -> np.ndarray:
        """Products -> float32 [N, D] unit rows, one per product in input order.

        `products`: a list of dicts (one per product), a pyarrow Table, a pandas DataFrame, or a path
        to a .parquet/.jsonl file or directory; the columns of ingest's catalog (`product_id`, text
        fields, `image_embeddings` or `image_paths`). Rows go through ingest's checks
        (`ingest.check_products`) with this model's text fields and image width; a rejected row
        raises DataError with ingest's reason and message. Run in eval mode, without gradients.
        """
        from itemsage.data.ingest import DataError, check_products
        from itemsage.progress import progress_bar

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model.eval()
        out: list[np.ndarray] = []
        unreadable = 0
        with progress_bar(show_progress_bar, unit="products") as bar:
            task = bar.add_task("encoding products", total=None)
            for table, rejects in check_products(products, text_fields=self.config.text_fields,
                                                 image_dim=self.image_dim or None, max_images=self.config.max_images,
                                                 batch_rows=max(batch_size, 4096), image_encoder=image_encoder,
                                                 option=""):
                if rejects:
                    first = rejects[0]
                    raise DataError(f"{len(rejects)} product(s) rejected by ingest's checks; first: {first['file']} "
                                    f"row {first['row']}: {first['reason']}: {first['detail']}")
                unreadable += int(self.unreadable(table).sum())
                for start in range(0, table.num_rows, batch_size):
                    piece = table.slice(start, batch_size)
                    out.append(self.embed_table(piece))
                    bar.advance(task, piece.num_rows)
        if unreadable:
            log.warning("the model reads nothing of %d of the %d products (no image, and no word of their text in "
                        "its vocabulary): each has exactly the vector of an empty product", unreadable,
                        sum(len(o) for o in out))
        return np.concatenate(out) if out else np.zeros((0, self.config.out_dim), np.float32)

    def encode_queries(self, surface: str, queries: Any, *, batch_size: int = 256,
                       show_progress_bar: bool = False) -> np.ndarray:
        """Queries of one surface -> float32 [N, D] unit rows.

        `queries`: vectors of the surface's query width (an array [N, Dq] or a list of lists, any
        surface); for `search`, texts (encoded by the built-in text encoder the model was trained
        with); for `closeup`, image file paths (encoded by the built-in image encoder, 1280-d: only for a
        model trained on that encoder's vectors, i.e. on a catalog with `image_paths`).
        """
        from itemsage.progress import progress_bar

        if surface not in self.query_dims:
            raise ConfigError(f"this model has no {surface!r} query adapter (it was trained on "
                              f"{', '.join(sorted(self.query_dims)) or 'no'} queries)")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(queries, (str, Path)):
            queries = [queries]
        elif isinstance(queries, np.ndarray) and queries.ndim == 1:
            queries = queries[None]  # one vector
        items = list(queries) if not isinstance(queries, np.ndarray) else queries
        if len(items) and isinstance(items[0], (str, Path)):
            vectors = self._query_inputs(surface, [str(x) for x in items])
        else:
            vectors = np.asarray(items, dtype=np.float32).reshape(len(items), -1)  # [N, Dq]
        width = self.query_dims[surface]
        if vectors.shape[1] != width and len(vectors):
            raise ConfigError(f"{surface} query vectors must be {width}-d for this model, got {vectors.shape[1]}-d")
        self.model.eval()
        out = []
        with progress_bar(show_progress_bar, unit="queries") as bar, torch.inference_mode():
            task = bar.add_task(f"encoding {surface} queries", total=len(vectors))
            for start in range(0, len(vectors), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(vectors[start:start + batch_size])).to(self.device)
                out.append(self.model.encode_queries(surface, x).float().cpu().numpy())
                bar.advance(task, len(x))
        return np.concatenate(out) if out else np.zeros((0, self.config.out_dim), np.float32)

    def _query_inputs(self, surface: str, items: list[str]) -> np.ndarray:
        """Texts (search) or image paths (closeup) -> the frozen encoder's vectors [N, Dq]."""
        if surface == "search":
            from itemsage.encoders.text import TextQueryEncoder

            return TextQueryEncoder().encode(items)
        if surface == "closeup":
            from itemsage.encoders.image import FEATURE_DIM, ImageEncoder

            if self.query_dims["closeup"] != FEATURE_DIM:
                raise ConfigError(
                    f"closeup image paths go through the built-in image encoder (EfficientNet-Lite0, {FEATURE_DIM}-d "
                    f"vectors), but this model's closeup queries are {self.query_dims['closeup']}-d: it was trained "
                    "on another encoder's image vectors (its catalog's image_embeddings). Image queries need a model "
                    "trained on the built-in encoder's vectors (a catalog with image_paths); for this one, encode the "
                    "images with its catalog's encoder and pass the vectors")
            vectors, errors = ImageEncoder().encode_paths(items, progress=False)
            bad = [(p, e) for p, e in zip(items, errors) if e]
            if bad:
                raise ConfigError(f"{len(bad)} closeup image(s) could not be read; first: {bad[0][0]}: {bad[0][1]}")
            return vectors
        raise ConfigError(f"{surface} queries are vectors ([N, {self.query_dims[surface]}]); only search takes "
                          "texts and only closeup takes image paths")


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def save_model(
    directory: str | Path,
    tower: nn.Module,
    adapters: nn.Module,
    cfg: ModelConfig,
    vocab: Vocabulary,
    *,
    image_dim: int,
    query_dims: dict[str, int],
    extra: dict[str, Any] | None = None,
    logit_scale: LogitScale | None = None,
    popularity: Popularity | None = None,
    timings: dict[str, Any] | None = None,
) -> str:
    """Write the model artifact to `directory` and return its fingerprint.

    Files: model.safetensors (keys `tower.*`, `adapters.*`, `logit_scale.*`), config.json
    (ModelConfig under "model", image_dim, query_dims, vocab_size, `extra` e.g. a training summary and
    the dataset's `product_query` entry, which `embed --catalog` reads),
    vocab.json, and manifest.json written last. Each file is written atomically; an old manifest is
    removed first, so a save killed half-way leaves a directory that load_model refuses. Without
    `logit_scale` the initial scale is saved.

    The fingerprint (`artifacts.fingerprint`, which embeddings and indexes record) hashes the three
    files, so they hold only what the weights are a function of: the same weights, config and vocabulary
    give the same bytes. `timings` (e.g. pairs/s: they differ between identical runs) go to the
    manifest's `timings`, which the fingerprint does not cover.
    """
    directory = Path(directory)
    tower, adapters = _unwrap(tower), _unwrap(adapters)
    if not isinstance(tower, ItemSage) or not isinstance(adapters, QueryAdapters):
        raise TypeError("save_model takes an ItemSage tower and QueryAdapters")
    if tower.cfg != cfg or tower.image_dim != image_dim or tower.vocab_size != len(vocab):
        raise ConfigError("save_model: the tower was built with another config, image_dim or vocabulary "
                          "than the ones passed; pass the tower's own (tower.cfg, tower.image_dim)")
    if adapters.query_dims != dict(query_dims) or adapters.out_dim != cfg.out_dim or adapters.mode != cfg.adapter:
        raise ConfigError("save_model: the adapters were built with other query_dims, out_dim or mode "
                          "than the ones passed")
    logit_scale = logit_scale if logit_scale is not None else LogitScale()

    directory.mkdir(parents=True, exist_ok=True)
    (directory / artifacts.MANIFEST).unlink(missing_ok=True)
    tensors: dict[str, Tensor] = {}
    if (popularity is None) != (cfg.popularity == "none"):
        raise ConfigError(f"save_model: model.popularity is {cfg.popularity!r} but a popularity module was "
                          f"{'not ' if popularity is None else ''}passed")
    parts = [("tower", tower), ("adapters", adapters), ("logit_scale", _unwrap(logit_scale))]
    parts += [("popularity", _unwrap(popularity))] if popularity is not None else []
    for prefix, module in parts:
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous()
    files = [WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE]
    if popularity is not None and popularity.mode == "id":
        import pyarrow as pa

        artifacts.atomic_write_parquet(directory / POPULARITY_FILE, pa.table({"product_id": popularity.warm_ids}))
        files.append(POPULARITY_FILE)
    with artifacts.atomic_path(directory / WEIGHTS_FILE) as tmp:
        # One metadata key: safetensors writes its metadata map in a random order (two keys made
        # two runs' files differ in about half of the saves), and the fingerprint hashes these bytes.
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {
        "model": to_dict(cfg),
        "image_dim": image_dim,
        **({"graph_dim": tower.graph_dim} if tower.graph_dim else {}),
        "query_dims": dict(sorted(query_dims.items())),
        "vocab_size": len(vocab),
        "extra": extra or {},
    }
    artifacts.atomic_write_json(directory / CONFIG_FILE, config)
    vocab.save(directory / VOCAB_FILE)  # atomic (features.Vocabulary.save)
    n_params = sum(t.numel() for t in tensors.values())
    artifacts.write_manifest(
        directory,
        "model",
        config=config,
        inputs={"vocab": vocab.fingerprint()},
        counts={"parameters": n_params, "vocab_size": len(vocab),
                **({"popularity_offsets": len(popularity.warm_ids)} if popularity is not None else {})},
        files=files,
        extra={"timings": timings} if timings else None,
    )
    fp = artifacts.fingerprint(directory)
    log.info("saved model %s (%d parameters, fingerprint %s)", directory, n_params, fp)
    return fp


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model directory after checking every file against its manifest; modules in eval mode."""
    directory = Path(directory)
    artifacts.verify_manifest(directory, kind="model")
    config = artifacts.read_json(directory / CONFIG_FILE)  # an error names the file
    cfg = from_dict(ModelConfig, config["model"], section="model")
    vocab = Vocabulary.load(directory / VOCAB_FILE)
    if len(vocab) != config["vocab_size"]:
        raise artifacts.ArtifactError(f"{directory / VOCAB_FILE} holds {len(vocab)} tokens, the model "
                                      f"was trained with {config['vocab_size']}; rebuild the model")
    image_dim = int(config["image_dim"])
    query_dims = {str(k): int(v) for k, v in config["query_dims"].items()}
    warm_ids: list[str] = []
    if cfg.popularity == "id":
        import pyarrow.parquet as pq

        warm_ids = pq.read_table(directory / POPULARITY_FILE, columns=["product_id"])["product_id"].to_pylist()
    graph_dim = int(config.get("graph_dim", 0))
    model = ItemSageModel.build(cfg, len(vocab), image_dim, query_dims, warm_ids=warm_ids, graph_dim=graph_dim)

    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    parts: dict[str, dict[str, Tensor]] = {"tower": {}, "adapters": {}, "logit_scale": {}}
    if model.popularity is not None:
        parts["popularity"] = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise artifacts.ArtifactError(f"{directory / WEIGHTS_FILE} has an unexpected tensor {key!r}")
        parts[prefix][rest] = value
    for prefix, module in (("tower", model.tower), ("adapters", model.adapters), ("logit_scale", model.logit_scale),
                           ("popularity", model.popularity)):
        if module is None:
            continue
        try:
            module.load_state_dict(parts[prefix], strict=True)
        except RuntimeError as err:
            raise artifacts.ArtifactError(
                f"{directory / WEIGHTS_FILE} does not fit the model its config.json describes ({prefix}): {err}"
            ) from err
    model.to(device).eval()
    return LoadedModel(
        model=model,
        config=cfg,
        vocab=vocab,
        image_dim=image_dim,
        query_dims=query_dims,
        fingerprint=artifacts.fingerprint(directory),
        extra=config.get("extra", {}),
        graph_dim=graph_dim,
    )




@torch.no_grad()
def encode_products(model: LoadedModel | ItemSageModel | ItemSage, batch: ProductBatch) -> Tensor:
    """Embed a batch in eval mode without gradients: -> [B, out_dim] unit rows on the model's device."""
    module = model.model if isinstance(model, LoadedModel) else model
    was_training = module.training
    module.eval()
    try:
        device = next(module.parameters()).device
        batch = batch.to(device)
        return module.encode_products(batch) if isinstance(module, ItemSageModel) else module(batch)
    finally:
        module.train(was_training)


def load(directory: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """`itemsage.load`: a trained model directory -> LoadedModel (see the module docstring)."""
    return load_model(directory, device)


__all__ = [
    "ADAPTER_MODES", "AGGREGATORS", "MODALITIES", "PRESETS", "HashEmbedding", "Head", "ItemSage",
    "ItemSageModel", "LoadedModel", "LogitScale", "ModelConfig", "QueryAdapters", "encode_products",
    "flops_per_product", "load", "load_model", "model_config", "save_model",
]
