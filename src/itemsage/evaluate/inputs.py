"""What evaluation reads besides the model: the embedded catalog and the index of the evaluated model
(another model's are refused, as `serve` does), the pairs' queries in the product space, and which
test pairs were already seen in the train window.

*Seen* test pairs: the same surface, query and product already occur together in the train window
(a model can score them by memorising); *unseen*: the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq
import torch

from itemsage.train.validation import embed_pair_queries

log = logging.getLogger(__name__)


class CatalogIds:
    """The ranked catalog's product ids (an embeddings directory's, in its order): what `load_pairs`
    needs of a catalog (`ids`, `index_of`) without featurising any product."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = np.asarray(ids, dtype=object)
        self._row_of = {pid: i for i, pid in enumerate(self.ids.tolist())}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, product_id: str) -> bool:
        return product_id in self._row_of

    def index_of(self, product_ids: Iterable[str]) -> np.ndarray:
        """Rows [K] int64 of `product_ids`; KeyError naming the ids the embeddings do not hold."""
        product_ids = list(product_ids)
        rows = [self._row_of.get(pid, -1) for pid in product_ids]
        if -1 in rows:
            unknown = [pid for pid, r in zip(product_ids, rows) if r < 0]
            raise KeyError(f"{len(unknown)} product id(s) not in the embeddings, e.g. {unknown[:5]}")
        return np.asarray(rows, dtype=np.int64)


def read_catalog_embeddings(embeddings_dir: str | Path, model_fingerprint: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(ids [N], vectors [N, D] float32, manifest) of a verified embeddings directory written by
    `itemsage embed` with the model `model_fingerprint`; ArtifactError for another model's."""
    from itemsage.artifacts import ArtifactError
    from itemsage.index.build import read_embeddings

    ids, vectors, manifest = read_embeddings(embeddings_dir)  # verifies every shard against the manifest
    made_by = manifest.get("inputs", {}).get("model")
    if made_by != model_fingerprint:
        raise ArtifactError(f"{embeddings_dir} holds embeddings of model {made_by}, but the model evaluated is "
                            f"{model_fingerprint}; embed the catalog with this model (`itemsage embed MODEL DATASET "
                            "--out DIR`) and pass that directory")
    return ids, vectors, manifest


def check_index(index: Any, model_fingerprint: str, dim: int) -> None:
    """Refuse an index of another width or built from another model's embeddings (as serve does)."""
    from itemsage.artifacts import ArtifactError

    if index.dim != dim:
        raise ArtifactError(f"index version {index.version} holds {index.dim}-d vectors but the model embeds into "
                            f"{dim}-d; index embeddings of this model")
    built_from = index.manifest.get("inputs", {}).get("model")
    if built_from != model_fingerprint:
        raise ArtifactError(f"index version {index.version} was built from embeddings of model {built_from}, but the "
                            f"model evaluated is {model_fingerprint}; re-embed the catalog with this model and index it")


def encode_queries(loaded: Any, pairs: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each pair's query in the product space -> [Q, D] unit rows. The one place evaluation encodes
    queries (the model's adapters over the frozen query vectors)."""
    return embed_pair_queries(loaded.model, pairs, device)


def _vector_digests(column: Any) -> list[bytes | None]:
    """A list<float32> column -> per row a 16-byte digest of its float32 bytes (None where null)."""
    import hashlib

    import pyarrow as pa

    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if len(column) == 0:
        return []
    column = column.cast(pa.list_(pa.float32()))
    values = column.flatten().to_numpy(zero_copy_only=False)  # every row's floats, back to back
    offsets = column.offsets.to_numpy(zero_copy_only=False) - column.offsets[0].as_py()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [hashlib.blake2b(values[offsets[i]:offsets[i + 1]].tobytes(), digest_size=16).digest() if valid[i] else None
            for i in range(len(column))]


def pair_keys(table: Any) -> list[bytes]:
    """One key per log row: (surface, query, product), for telling a test pair seen in training.

    A query is told apart as `train.load_pairs` does: a search row's text unless the row gives a
    vector, otherwise its vector (float32 bytes). `table`: pyarrow, with surface, product_id and
    any of query_text / query_embedding.
    """
    from itemsage import schema

    n = table.num_rows
    names = table.column_names
    texts = table[schema.QUERY_TEXT].to_pylist() if schema.QUERY_TEXT in names else [None] * n
    vectors = _vector_digests(table[schema.QUERY_EMBEDDING]) if schema.QUERY_EMBEDDING in names else [None] * n
    keys = []
    for s, t, v, p in zip(table[schema.SURFACE].to_pylist(), texts, vectors, table[schema.PRODUCT_ID].to_pylist()):
        query = b"v" + v if v is not None else (b"t" + t.encode() if s == "search" and t is not None else b"-")
        keys.append(b"\0".join((s.encode(), query, p.encode())))
    return keys


def seen_in_train(train_table: Any, test_table: Any) -> np.ndarray:
    """[N_test] bool: the test row's (surface, query, product) also occurs in the train window.
    Engagement type and time are ignored: a repeat of the same query leading to the same product
    is memorisable whatever the engagement."""
    seen = set(pair_keys(train_table))
    return np.fromiter((k in seen for k in pair_keys(test_table)), dtype=bool, count=test_table.num_rows)


def _log_columns(path: Path) -> list[str]:
    from itemsage import schema

    names = pq.ParquetFile(path).schema_arrow.names
    return [c for c in (schema.SURFACE, schema.PRODUCT_ID, schema.QUERY_TEXT, schema.QUERY_EMBEDDING) if c in names]
