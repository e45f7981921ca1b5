"""The built-in text query encoder and its per-dataset cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from itemsage.encoders.text import TextQueryEncoder, cached_text_embeddings, text_key


@pytest.fixture(scope="module")
def encoder():
    return TextQueryEncoder(device="cpu")


class CountingEncoder:
    """Wraps an encoder and records every batch of texts it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.dim, self.name, self.calls = inner, inner.dim, inner.name, []

    def encode(self, texts, batch_size=256, progress=False):
        self.calls.append(list(texts))
        return self.inner.encode(texts, batch_size=batch_size, progress=progress)


def test_width_unit_norm_and_semantics(encoder):
    texts = ["red leather sofa", "red leather couch", "stainless steel kitchen knife"]
    vectors = encoder.encode(texts)
    assert encoder.dim == 384
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated + 0.2, (similar, unrelated)
    assert encoder.encode([]).shape == (0, 384)


def test_batching_does_not_change_vectors(encoder):
    texts = ["oak dining table", "a", "wireless noise cancelling headphones for travel"]
    together = encoder.encode(texts, batch_size=2)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(together[i], encoder.encode([text])[0], atol=1e-5)


def test_cache_encodes_each_text_once_and_keeps_order(encoder, tmp_path):
    counting = CountingEncoder(encoder)
    first = cached_text_embeddings(tmp_path, ["sofa", "lamp", "sofa"], encoder=counting, progress=False)
    assert counting.calls == [["sofa", "lamp"]]  # duplicates encoded once
    direct = encoder.encode(["sofa", "lamp"])
    np.testing.assert_array_equal(first, direct[[0, 1, 0]])

    # A second call encodes only the new text and returns the cached vectors unchanged.
    second = cached_text_embeddings(tmp_path, ["lamp", "rug", "sofa", "lamp"], encoder=counting, progress=False)
    assert counting.calls == [["sofa", "lamp"], ["rug"]]
    np.testing.assert_array_equal(second[[0, 2, 3]], direct[[1, 0, 1]])
    np.testing.assert_array_equal(second[1], encoder.encode(["rug"])[0])

    # All cached: no encoder call at all; two parts on disk, keyed by sha256.
    third = cached_text_embeddings(tmp_path, ["rug", "sofa"], encoder=counting, progress=False)
    assert len(counting.calls) == 2
    np.testing.assert_array_equal(third, second[[1, 2]])
    assert len(list((tmp_path / "query_cache").glob("part-*.parquet"))) == 2
    assert (tmp_path / "query_cache" / "manifest.json").is_file()
    parts = sorted((tmp_path / "query_cache").glob("part-*.parquet"))
    stored = [k for p in parts for k in pq.read_table(p).column("text_key").to_pylist()]
    assert sorted(stored) == sorted(text_key(t) for t in ("sofa", "lamp", "rug"))


def test_text_key_is_sha256_of_utf8():
    # sha256("abc") is the FIPS 180-2 test vector.
    assert text_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_cache_refuses_non_strings(tmp_path):
    with pytest.raises(TypeError, match="item 1"):
        cached_text_embeddings(tmp_path, ["ok", None], encoder=CountingEncoder(TextQueryEncoder()), progress=False)


# ---- the ONNX Runtime encoder and the query-vector LRU --------------------------------------------

TEXTS = ["red leather sofa", "a", "Ünïcödé café naïve 東京 chair", "wireless noise cancelling headphones " * 80,
         "oak dining table for six", "!!!"]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """A private cache directory: the export happens here, once for the module."""
    from itemsage.encoders import onnx_text as query_encoder

    old = os.environ.get(query_encoder.CACHE_ENV)
    os.environ[query_encoder.CACHE_ENV] = str(tmp_path_factory.mktemp("itemsage-cache"))
    yield Path(os.environ[query_encoder.CACHE_ENV])
    if old is None:
        del os.environ[query_encoder.CACHE_ENV]
    else:
        os.environ[query_encoder.CACHE_ENV] = old


def test_onnx_encoder_equals_pytorch_within_1e5(encoder, onnx_cache):
    from itemsage.encoders.onnx_text import OnnxTextQueryEncoder

    onnx = OnnxTextQueryEncoder()
    assert onnx.path.parent == onnx_cache / "onnx" and onnx.path.is_file()
    reference = encoder.encode(TEXTS)  # [N, 384] unit rows from sentence-transformers on torch
    together = onnx.encode(TEXTS, batch_size=4)  # padding inside a batch must not change a vector
    np.testing.assert_allclose(together, reference, atol=1e-5)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(onnx.encode([text])[0], reference[i], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert onnx.encode([]).shape == (0, 384)
    # Cached: a second encoder reuses the file; a damaged file is exported again.
    mtime = onnx.path.stat().st_mtime_ns
    assert OnnxTextQueryEncoder().path.stat().st_mtime_ns == mtime
    onnx.path.write_bytes(b"not an onnx model")
    again = OnnxTextQueryEncoder()
    np.testing.assert_allclose(again.encode(TEXTS[:2]), reference[:2], atol=1e-5)
    assert not [p for p in onnx.path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


@pytest.mark.slow  # a second export and a quantisation: tens of seconds on a busy machine
def test_int8_encoder_is_close_not_equal(encoder, onnx_cache):
    from itemsage.encoders.onnx_text import OnnxTextQueryEncoder

    int8 = OnnxTextQueryEncoder(quantize=True)
    assert "int8" in int8.path.name and int8.name != encoder.name  # its vectors never mix with fp32 caches
    reference = encoder.encode(TEXTS[:4])
    cosines = (int8.encode(TEXTS[:4]) * reference).sum(axis=1)
    assert cosines.min() > 0.98 and cosines.max() < 1 - 1e-6, cosines


def test_query_vector_cache_is_lru():
    from itemsage.serve.query_cache import QueryVectorCache

    cache = QueryVectorCache(maxsize=2)
    cache.put("a", np.array([1.0]))
    cache.put("b", np.array([2.0]))
    assert cache.get("a")[0] == 1.0  # "a" is now the most recent
    cache.put("c", np.array([3.0]))  # evicts "b", the least recently used
    assert cache.get("b") is None and cache.get("c")[0] == 3.0 and len(cache) == 2
    assert (cache.hits, cache.misses) == (2, 1)
    with pytest.raises(ValueError):
        cache.get("a")[0] = 5.0  # read-only: a caller cannot change what later requests get
    off = QueryVectorCache(maxsize=0)
    off.put("a", np.array([1.0]))
    assert off.get("a") is None


def test_query_vector_cache_membership_neither_counts_nor_refreshes():
    from itemsage.serve.query_cache import QueryVectorCache

    cache = QueryVectorCache(maxsize=2)
    cache.put("a", np.array([1.0]))
    cache.put("b", np.array([2.0]))
    assert "a" in cache and "z" not in cache and (cache.hits, cache.misses) == (0, 0)
    cache.put("c", np.array([3.0]))  # "a" is still the least recent: the check did not refresh it
    assert "a" not in cache and "b" in cache and "c" in cache


class SlowEncoder:
    """A deterministic encoder that takes 20 ms per call and records each call's batch."""

    dim = 4
    name = "slow"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts, batch_size=64, progress=False):
        import time

        self.calls.append(list(texts))
        time.sleep(0.02)
        return np.asarray([[len(t), t.count("a"), 1.0, float(i)] for i, t in enumerate(texts)], dtype=np.float32)


def test_batching_encoder_groups_concurrent_calls_and_keeps_each_answer():
    import threading

    from itemsage.serve.query_cache import BatchingEncoder

    inner = SlowEncoder()
    batching = BatchingEncoder(inner, max_batch=4)
    texts = [f"q{'a' * i}" for i in range(12)]
    results: dict[str, np.ndarray] = {}

    def ask(text: str) -> None:
        results[text] = batching.encode([text])

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for text in texts:  # each caller gets its own text's vector (not a neighbour's in the batch)
        assert results[text].shape == (1, 4)
        assert results[text][0, 0] == len(text) and results[text][0, 1] == text.count("a")
    assert sorted(t for call in inner.calls for t in call) == sorted(texts)
    assert max(len(call) for call in inner.calls) <= 4
    assert len(inner.calls) < len(texts), "12 concurrent calls on a 20 ms encoder must share batches"
    assert batching.encode(["x", "y"]).shape == (2, 4)  # several texts: straight through


def test_batching_encoder_passes_errors_to_every_caller():
    from itemsage.serve.query_cache import BatchingEncoder

    class Broken:
        dim = 4

        def encode(self, texts, batch_size=64, progress=False):
            raise RuntimeError("encoder down")

    with pytest.raises(RuntimeError, match="encoder down"):
        BatchingEncoder(Broken()).encode(["a"])
