"""The service's text query path around the encoder: concurrent search texts encoded together
(`BatchingEncoder`) and the product-space vectors of recent texts kept (`QueryVectorCache`, an LRU).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Sequence

import numpy as np

from itemsage.encoders.text import TextEncoder

log = logging.getLogger(__name__)


class BatchingEncoder:
    """Encodes concurrent one-text calls together (opportunistic batching, no added wait).

    A call that finds the encoder idle encodes what is queued (up to `max_batch`, its own text
    included); calls arriving meanwhile queue, and the next idle moment encodes them in one batch.
    A lone request is never delayed. Calls with several texts go straight to `inner`.
    """

    def __init__(self, inner: TextEncoder, max_batch: int = 8) -> None:
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
