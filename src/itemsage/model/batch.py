"""What the tower eats: `ProductBatch` (a batch's image vectors and text bags) built from catalog rows
(`featurize`), and `ProductStore`, the whole catalog featurised once as flat (CSR) arrays, so training
can gather a batch of a few thousand products with a handful of numpy index operations per step.

Images. A product carries up to `max_images` image vectors, main image first; a batch pads them to
the largest count present and marks the real ones in `image_mask`. Text. Each text field of a
product becomes one bag of vocabulary ids (data/text.py); a batch also carries its tokens
deduplicated (`TokenBags`, model/hash_embedding.py), the layout the tower's hash bag computes on.

Axes: B products, M images per product, F text fields, T tokens, Di image width.
"""

from __future__ import annotations

import array
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from itemsage import schema
from itemsage.config import require
from itemsage.data.text import Vocabulary, field_strings, known_text
from itemsage.model.hash_embedding import TokenBags, token_bags

log = logging.getLogger(__name__)


@dataclass
class ProductBatch:
    """What the product tower eats. Bag (b, f) = text field f of product b is
    token_ids[token_offsets[b*F + f] : token_offsets[b*F + f + 1]] (the last bag runs to the end),
    the layout `nn.EmbeddingBag(input, offsets)` takes. `bags` is the same text deduplicated
    (`TokenBags`), built with the batch by `ProductStore.batch`; the tower builds it when absent."""

    images: torch.Tensor  # [B, M, Di] float32, zeros where absent
    image_mask: torch.Tensor  # [B, M] bool, True = image present
    token_ids: torch.Tensor  # [T] int64 vocabulary ids of all bags, concatenated
    token_offsets: torch.Tensor  # [B*F] int64 start of each bag in token_ids
    bags: TokenBags | None = None
    graph: torch.Tensor | None = None  # [B, G, Dg] float32 graph tokens (zeros where absent), or None
    graph_mask: torch.Tensor | None = None  # [B, G] bool, True = the product has that graph token

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_fields(self) -> int:
        """F, the number of text fields (bags) per product."""
        return self.token_offsets.numel() // len(self) if len(self) else 0

    @property
    def field_mask(self) -> torch.Tensor:
        """[B, F] bool, True = the field has at least one in-vocabulary token."""
        ends = torch.cat([self.token_offsets[1:], self.token_offsets.new_tensor([self.token_ids.numel()])])
        return (ends > self.token_offsets).view(len(self), self.num_fields)

    def pin_memory(self) -> ProductBatch:
        """A copy in page-locked memory, so `.to(cuda, non_blocking=True)` overlaps with compute."""
        return ProductBatch(*(t.pin_memory() for t in (self.images, self.image_mask, self.token_ids, self.token_offsets)),
                            bags=None if self.bags is None else TokenBags(*(t if t is None else t.pin_memory()
                                                                           for t in self.bags)),
                            graph=None if self.graph is None else self.graph.pin_memory(),
                            graph_mask=None if self.graph_mask is None else self.graph_mask.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ProductBatch:
        return ProductBatch(*(t.to(device, non_blocking=non_blocking) for t in
                              (self.images, self.image_mask, self.token_ids, self.token_offsets)),
                            bags=None if self.bags is None else self.bags.to(device, non_blocking),
                            graph=None if self.graph is None else self.graph.to(device, non_blocking=non_blocking),
                            graph_mask=None if self.graph_mask is None else self.graph_mask.to(
                                device, non_blocking=non_blocking))


class GraphInputs:
    """Graph tokens by product id (the graph stage's features, itemsage/graph): tokens [N, G, Dg]
    (float16 keeps a million products' tokens in 1.5 GB), mask [N, G]. A product absent from them
    has no graph token, like one without engagements."""

    def __init__(self, ids: np.ndarray, tokens: np.ndarray, mask: np.ndarray, hashes: np.ndarray | None = None) -> None:
        require(tokens.ndim == 3 and mask.shape == tokens.shape[:2] and len(ids) == len(tokens),
                f"graph tokens must be [N, G, D] with a mask [N, G] and N ids; got {tokens.shape}, "
                f"{mask.shape}, {len(ids)}")
        self.ids, self.tokens, self.mask = np.asarray(ids, dtype=object), tokens, mask.astype(bool)
        self.hashes = hashes  # [N] each product's graph_hash ("" without tokens), or None
        self._row_of = {pid: i for i, pid in enumerate(self.ids.tolist())}

    @classmethod
    def of(cls, features: Any) -> GraphInputs:
        """From the graph stage's reader (itemsage.graph.GraphFeatures)."""
        return cls(features.ids, features.tokens, features.mask, features.hashes)

    def hashes_of(self, product_ids: Sequence[str]) -> list[str]:
        """Each product's graph_hash; "" for a product without graph tokens (or one not in the graph)."""
        rows = self.rows(product_ids)
        return ["" if r < 0 or self.hashes is None else str(self.hashes[r]) for r in rows.tolist()]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    def rows(self, product_ids: Sequence[str]) -> np.ndarray:
        """[B] int64 rows of `product_ids` in the features; -1 for a product they do not hold."""
        row_of = self._row_of
        return np.fromiter((row_of.get(pid, -1) for pid in product_ids), np.int64, len(product_ids))

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature rows [B] (-1: none) -> (tokens [B, G, Dg] float32, zeros where absent; mask [B, G])."""
        known = rows >= 0
        tokens = np.zeros((len(rows), self.num_tokens, self.dim), np.float32)
        mask = np.zeros((len(rows), self.num_tokens), bool)
        tokens[known] = self.tokens[rows[known]]
        mask[known] = self.mask[rows[known]]
        tokens[~mask] = 0.0
        return torch.from_numpy(tokens), torch.from_numpy(mask)


def _exclusive_cumsum(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised: the CSR gather index."""
    offsets = _exclusive_cumsum(lengths)
    return np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)


def _list_lengths(column: pa.Array) -> np.ndarray:
    """Per-row list length, 0 for a null list."""
    return pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _text_csr(table: pa.Table, vocab: Vocabulary, text_fields: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every (product, field) bag: (ids [T] int32, bag_starts [N*F + 1] int64)."""
    n, n_fields = table.num_rows, len(text_fields)
    per_field: list[tuple[np.ndarray, list[Any]] | list[Any]] = []
    for name in text_fields:
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            # Flatten the list column once; a product's strings are a slice of `values`.
            per_field.append((_exclusive_cumsum(_list_lengths(column)), column.flatten().to_pylist()))
        else:
            per_field.append(column.to_pylist())  # a plain string (or other scalar) column
    ids = array.array("i")
    bag_starts = np.zeros(n * n_fields + 1, dtype=np.int64)
    lookup = vocab.string_ids
    bag = 0
    for row in range(n):
        for source in per_field:
            if isinstance(source, tuple):
                starts, values = source
                strings = values[starts[row] : starts[row + 1]]
            else:
                strings = field_strings(source[row])
            for s in strings:
                if s:  # None items of a list column are skipped; blank strings give no tokens
                    ids.extend(lookup(s))
            bag += 1
            bag_starts[bag] = len(ids)
    return np.frombuffer(ids, dtype=np.int32).copy() if len(ids) else np.zeros(0, np.int32), bag_starts


def _image_csr(table: pa.Table, max_images: int, image_dim: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """The first `max_images` image vectors of each product, stacked.

    Returns (vectors [I, Di] float32, image_starts [N + 1] int64, Di). `image_dim` None = take the
    width of the first vector found (0 when there is none).
    """
    n = table.num_rows
    if schema.IMAGE_EMBEDDINGS not in table.column_names:
        return np.zeros((0, image_dim or 0), np.float32), np.zeros(n + 1, np.int64), image_dim or 0
    column = table.column(schema.IMAGE_EMBEDDINGS).combine_chunks()
    counts = _list_lengths(column)  # [N] images per product
    vectors = column.flatten()  # one entry per image vector, across all products
    widths = _list_lengths(vectors)  # [I_all]
    if image_dim is None:
        image_dim = int(widths[0]) if len(widths) else 0
    if len(widths) and not np.all(widths == image_dim):
        bad = int(np.flatnonzero(widths != image_dim)[0])
        product = int(np.searchsorted(np.cumsum(counts), bad, side="right"))
        raise ValueError(
            f"image vectors must all have width {image_dim}; product row {product} has one of width "
            f"{int(widths[bad])}. Re-run `itemsage ingest`, which rejects vectors of the wrong width.")
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    flat = flat.reshape(len(widths), image_dim)  # [I_all, Di]
    if not np.isfinite(flat).all():
        raise ValueError("image vectors contain NaN or inf; re-run `itemsage ingest`, which rejects them.")
    # Keep only each product's first max_images vectors.
    kept = np.minimum(counts, max_images)
    all_starts = _exclusive_cumsum(counts)
    flat = flat[_ragged_arange(all_starts[:-1], kept)]
    return np.ascontiguousarray(flat), _exclusive_cumsum(kept), image_dim


def unreadable(table: pa.Table, vocab: Vocabulary, text_fields: Sequence[str], modalities: str = "both") -> np.ndarray:
    """[B] bool: products the tower reads nothing of: no image (or a text-only tower) and no text token
    in `vocab` (or an image-only tower). Each gets exactly the vector of an empty product, so callers
    say so (embed's count, /v1/embed's flag) instead of serving it as if it were read."""
    read = np.zeros(table.num_rows, bool)
    if modalities != "image":
        read |= known_text(table, vocab, text_fields)
    if modalities != "text" and schema.IMAGE_EMBEDDINGS in table.column_names:
        read |= _list_lengths(table.column(schema.IMAGE_EMBEDDINGS).combine_chunks()) > 0
    return ~read


class ProductStore:
    """The catalog featurised once, in memory, as flat arrays (train and evaluate gather from it).

    Text: token ids of all bags concatenated (int32) plus bag starts; images: the kept vectors
    stacked [I, Di] plus per-product starts. No padding is stored; `batch` pads per batch.
    """

    def __init__(self, ids: np.ndarray, text_fields: Sequence[str], max_images: int, image_dim: int,
                 token_ids: np.ndarray, bag_starts: np.ndarray, images: np.ndarray, image_starts: np.ndarray):
        require(max_images >= 1, f"max_images must be >= 1, got {max_images}")
        self.ids = ids  # [N] product ids (object array of str)
        self.text_fields = tuple(text_fields)
        self.max_images = max_images
        self.image_dim = image_dim
        self._token_ids = token_ids  # [T_all] int32
        self._bag_starts = bag_starts  # [N*F + 1] int64
        self._images = images  # [I_all, Di] float32 or float16
        self._image_starts = image_starts  # [N + 1] int64
        self._row_of: dict[str, int] | None = None
        self.graph: GraphInputs | None = None  # set by attach_graph
        self._graph_rows: np.ndarray | None = None  # [N] each product's row in `graph` (-1: none)

    def attach_graph(self, graph: GraphInputs | None) -> None:
        """Give the products their graph tokens (matched by id); None removes them."""
        self.graph = graph
        self._graph_rows = None if graph is None else graph.rows(self.ids.tolist())

    @classmethod
    def from_table(cls, table: pa.Table, vocab: Vocabulary, text_fields: Sequence[str], max_images: int,
                   image_dim: int | None = None, *, image_dtype: str = "float32") -> ProductStore:
        _check_columns(table.column_names, text_fields, "the products table")
        ids = np.asarray(table.column(schema.PRODUCT_ID).to_pylist(), dtype=object)
        token_ids, bag_starts = _text_csr(table, vocab, text_fields)
        images, image_starts, image_dim = _image_csr(table, max_images, image_dim)
        return cls(ids, text_fields, max_images, image_dim, token_ids, bag_starts,
                   images.astype(image_dtype, copy=False), image_starts)

    @classmethod
    def from_dataset(cls, dataset_dir: str | Path, vocab: Vocabulary, text_fields: Sequence[str],
                     max_images: int = schema.MAX_IMAGES, *, image_dtype: str = "float32",
                     batch_rows: int = 50_000, progress: bool = True) -> ProductStore:
        """Featurise `<dataset_dir>/products.parquet`, streaming it in record batches.

        `image_dtype` "float16" halves the memory of the image vectors (batches are float32 anyway).
        """
        from rich.progress import Progress

        path = Path(dataset_dir) / schema.PRODUCTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run `itemsage ingest` to write the dataset.")
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        _check_columns(names, text_fields, str(path))
        columns = [schema.PRODUCT_ID, *text_fields] + ([schema.IMAGE_EMBEDDINGS] if schema.IMAGE_EMBEDDINGS in names else [])
        parts: list[ProductStore] = []
        image_dim: int | None = None
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("featurising products", total=parquet.metadata.num_rows)
            for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                part = cls.from_table(pa.Table.from_batches([record_batch]), vocab, text_fields, max_images,
                                      image_dim, image_dtype=image_dtype)
                if part._images.shape[0]:
                    image_dim = part.image_dim  # the first batch with images fixes the width
                parts.append(part)
                bar.advance(task, record_batch.num_rows)
        if not parts:
            parts.append(cls.from_table(parquet.schema_arrow.empty_table(), vocab, text_fields, max_images))
        image_dim = image_dim or 0
        store = cls(
            ids=np.concatenate([p.ids for p in parts]),
            text_fields=text_fields, max_images=max_images, image_dim=image_dim,
            token_ids=np.concatenate([p._token_ids for p in parts]),
            bag_starts=_concat_starts([p._bag_starts for p in parts]),
            # parts read before the first image fix no width: their (empty) arrays are [0, 0]
            images=np.concatenate([p._images.reshape(len(p._images), image_dim) for p in parts]),
            image_starts=_concat_starts([p._image_starts for p in parts]),
        )
        log.info("featurised %d products: %d tokens, %d image vectors of width %d",
                 len(store), len(store._token_ids), len(store._images), image_dim)
        return store

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_fields(self) -> int:
        return len(self.text_fields)

    def index_of(self, product_ids: Iterable[str]) -> np.ndarray:
        """Rows [K] int64 of `product_ids`; KeyError naming unknown ids."""
        if self._row_of is None:
            self._row_of = {pid: i for i, pid in enumerate(self.ids)}
        row_of = self._row_of
        product_ids = list(product_ids)
        rows = [row_of.get(pid, -1) for pid in product_ids]
        if -1 in rows:
            unknown = [pid for pid, r in zip(product_ids, rows) if r < 0]
            raise KeyError(f"{len(unknown)} product id(s) not in the catalog, e.g. {unknown[:5]}")
        return np.asarray(rows, dtype=np.int64)

    def batch(self, rows: np.ndarray | Sequence[int], *, backward: bool = False) -> ProductBatch:
        """Gather products `rows` [B] into a ProductBatch (M = most images among them, at least 1).

        The text comes deduplicated too (`ProductBatch.bags`); `backward` also builds its transposed
        layout, which the hash bag's backward pass reads (training asks for it).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # [B]
        b, n_fields, n = len(rows), self.num_fields, len(self)
        if b and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"rows must lie in [0, {n}), got min {rows.min()}, max {rows.max()}")
        # Text: bag (b, f) is the store's bag rows[b]*F + f.
        bags = (rows[:, None] * n_fields + np.arange(n_fields)).reshape(-1)  # [B*F]
        lengths = self._bag_starts[bags + 1] - self._bag_starts[bags]  # [B*F]
        offsets = _exclusive_cumsum(lengths)
        token_ids = self._token_ids[_ragged_arange(self._bag_starts[bags], lengths)].astype(np.int64)  # [T]
        # Images: pad to the batch's largest count.
        starts = self._image_starts[rows]  # [B]
        counts = self._image_starts[rows + 1] - starts  # [B], already <= max_images
        m = max(1, int(counts.max()) if b else 0)
        mask = np.arange(m) < counts[:, None]  # [B, M]
        images = np.zeros((b, m, self.image_dim), dtype=np.float32)  # [B, M, Di]
        images[mask] = self._images[(starts[:, None] + np.arange(m))[mask]]
        graph, graph_mask = (None, None) if self.graph is None else self.graph.gather(self._graph_rows[rows])
        return ProductBatch(
            images=torch.from_numpy(images),
            image_mask=torch.from_numpy(mask),
            token_ids=torch.from_numpy(token_ids),
            token_offsets=torch.from_numpy(offsets[:-1].copy()),
            bags=token_bags(token_ids, offsets[:-1], transpose=backward),
            graph=graph,
            graph_mask=graph_mask,
        )


def _concat_starts(parts: list[np.ndarray]) -> np.ndarray:
    """Join CSR start arrays of consecutive parts (each starts at 0 and ends at its total)."""
    out, shift = [np.zeros(1, np.int64)], 0
    for starts in parts:
        out.append(starts[1:] + shift)
        shift += int(starts[-1])
    return np.concatenate(out)


def _check_columns(names: Sequence[str], text_fields: Sequence[str], where: str) -> None:
    missing = [c for c in (schema.PRODUCT_ID, *text_fields) if c not in names]
    if missing:
        raise ValueError(f"{where} has no column(s) {missing}; it has {list(names)}. Configure text fields "
                         "that the dataset holds, or re-run `itemsage ingest`.")


def featurize(table: pa.Table, vocab: Vocabulary, text_fields: Sequence[str], max_images: int,
              image_dim: int, graph: GraphInputs | None = None) -> ProductBatch:
    """Featurise every row of a products table (dataset format) into one ProductBatch.

    M = the most images any row has (at least 1), capped at `max_images`; image vectors must have
    width `image_dim`. `graph`: the products' graph tokens, by id (None: the batch carries none).
    """
    store = ProductStore.from_table(table, vocab, text_fields, max_images, image_dim)
    store.attach_graph(graph)
    return store.batch(np.arange(len(store)))
