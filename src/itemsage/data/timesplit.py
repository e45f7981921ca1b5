"""Ingest's time split: kept log rows -> train, validation and test windows, in time order.

Split: three windows in time order. train.parquet trains the model, validation.parquet chooses it
(early stopping and the best checkpoint), test.parquet gives every reported figure. Two protocols:
- `split="global"` (default): one pair of split times for every row. Rows at or after `test_from` are
  test, rows at or after `validation_from` (and before `test_from`) are validation, the rest train.
  Without given times: test_from = max - test_fraction * span and validation_from = test_from -
  validation_fraction * span, over every readable timestamp in the logs (span = max - min).
- `split="per-user"`: each user's own engagements in time order (ties in input order); the user's
  last `test_fraction` of them are test, the `validation_fraction` before those validation, the rest
  train. Counts are floor(fraction * n), and a window whose share is between 0 and 1 row gets one
  row while the user keeps at least 2 for train, test first (RecBole's ratio split; Microsoft
  Recommenders' python_chrono_split is the same idea). A user with one engagement is train only.
  Rows without a user_id cannot be held out per user: they all go to train (counted in the
  manifest as `no_user_train_rows`). This mode holds 12 bytes per kept log row (user code and time)
  until the logs are read, plus O(users).
`gap_hours` drops the train rows in the hours before the validation window (global: before
validation_from; per-user: before that user's first validation row), since engagement right before
the split leaks into the later windows; they are counted as `gap_rows`. An empty validation or test
window is not an error, but is named in the summary's warnings.

How: ingest's time pass counts the logs' rows per minute (`MinuteCounts`); its log pass appends each
kept row to the scratch file of its time slab (`TimeSlabs`); at the end each slab in turn is sorted
by time and labelled by the split (`GlobalSplit` or `PerUserSplit`) into the window files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itemsage import artifacts, schema
from itemsage.data.normalise import EPOCH, LOG_SCHEMA
from itemsage.data.row_arrays import codes, take_rows

_ROW_GROUP_ROWS = 65_536  # rows per Parquet row group of train/eval: readers can stream them
# zstd: the demo's vectors shrink 2.4x (snappy: 1.0x) for ~30% more write time, and less disk to wait on.
COMPRESSION = "zstd"
# Scratch files: lz4 halves them and is faster than writing them uncompressed.
SCRATCH = pa.ipc.IpcWriteOptions(compression="lz4")
# Dictionary encoding only where values repeat; a float vector column would only pay for the attempt.
_LOG_DICTIONARY = [schema.SURFACE, schema.ENGAGEMENT, schema.PRODUCT_ID, schema.USER_ID, schema.QUERY_TEXT]
_MAX_SLABS = 256  # time slabs (scratch files open at once while reading the logs), plus one per split time
TRAIN, GAP, VALIDATION, TEST = 0, 1, 2, 3  # window code of a kept log row (GAP rows are dropped)
_WINDOW_CODES = {"train": TRAIN, "validation": VALIDATION, "test": TEST}


def scratch_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of a scratch Arrow IPC file, one at a time (read, not memory-mapped, so
    pages already used do not stay in this process's resident memory)."""
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def iso(ms: int) -> str:
    when = EPOCH + dt.timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


class MinuteCounts:
    """Rows per minute of the logs' timestamps, as sorted numpy arrays: O(minutes spanned) memory."""

    def __init__(self) -> None:
        self.minutes = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_len = 0

    def add(self, ms: np.ndarray) -> None:
        minutes, counts = np.unique(ms // 60_000, return_counts=True)
        self._pending.append((minutes, counts))
        self._pending_len += len(minutes)
        if self._pending_len > max(len(self.minutes), 4096):  # merges cost O(pending), amortised
            self._merge()

    def _merge(self) -> None:
        if self._pending:
            minutes = np.concatenate([self.minutes] + [m for m, _ in self._pending])
            counts = np.concatenate([self.counts] + [c for _, c in self._pending])
            self.minutes, where = np.unique(minutes, return_inverse=True)
            self.counts = np.bincount(where, weights=counts, minlength=len(self.minutes)).astype(np.int64)
            self._pending, self._pending_len = [], 0

    def slab_edges(self, split_ms: Sequence[int], sort_rows: int) -> np.ndarray:
        """Sorted inner edges (ms) of the time slabs: runs of whole minutes with about `sort_rows`
        rows each (more when one minute holds more, or when more than _MAX_SLABS slabs would be
        needed), plus the global split times, so no slab straddles one."""
        self._merge()
        target = max(sort_rows, -(-int(self.counts.sum()) // _MAX_SLABS))
        slab = (np.cumsum(self.counts) - self.counts) // target  # [minutes] slab of each minute's first row
        starts = np.flatnonzero(np.diff(slab) > 0) + 1  # minutes that open a new slab
        return np.union1d(self.minutes[starts] * 60_000, np.array(split_ms, np.int64))


class GlobalSplit:
    """Windows by time alone: train before validation_ms - gap_ms, then the gap, then validation from
    validation_ms, then test from test_ms."""

    def __init__(self, validation_ms: int, test_ms: int, gap_ms: int):
        self.bounds = np.array([validation_ms - gap_ms, validation_ms, test_ms], np.int64)

    def add(self, table: pa.Table) -> None:
        """Nothing to learn from the rows."""

    def fit(self) -> None:
        """Nothing to learn from the rows."""

    def label(self, table: pa.Table) -> np.ndarray:
        ts = table.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()  # [n]
        return np.searchsorted(self.bounds, ts, side="right")  # [n] TRAIN, GAP, VALIDATION or TEST

    def first_open(self, ms: int) -> int:
        """The first window code that rows at or after `ms` can still have."""
        return int(np.searchsorted(self.bounds, ms, side="right"))


class PerUserSplit:
    """Each user's last engagements to validation and test (module doc). `add` sees every kept row in
    read order, `fit` fixes each user's cut ranks, then `label` must see the rows in time order (ties
    in read order), as `TimeSlabs.finish` writes them: a row's rank in its user's history is the
    count of that user's rows labelled before it."""

    def __init__(self, validation_fraction: float, test_fraction: float, gap_ms: int):
        self.fractions = (validation_fraction, test_fraction)
        self.gap_ms = gap_ms
        self.codes: dict[str, int] = {}  # user_id -> user number
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []  # per batch: user numbers (-1: none), times

    def _users(self, column: Any, grow: bool) -> np.ndarray:
        """[n] user numbers of a user_id column, -1 where it is null."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()  # one array, so one dictionary
        encoded = pc.dictionary_encode(column)
        names = encoded.dictionary.to_pylist()
        number = np.array([self.codes.setdefault(u, len(self.codes)) if grow else self.codes[u] for u in names]
                          + [-1], np.int64)  # the last entry stands for null
        index = encoded.indices.fill_null(len(names)).to_numpy()
        return number[index]

    def add(self, table: pa.Table) -> None:
        ts = table.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()
        self.parts.append((self._users(table.column(schema.USER_ID), grow=True).astype(np.int32), ts))

    def fit(self) -> None:
        users = np.concatenate([u for u, _ in self.parts]) if self.parts else np.zeros(0, np.int32)
        ts = np.concatenate([t for _, t in self.parts]) if self.parts else np.zeros(0, np.int64)
        self.parts = []
        has = users >= 0
        users, ts = users[has], ts[has]
        order = np.argsort(ts, kind="stable")  # time order, ties in read order ...
        order = order[np.argsort(users[order], kind="stable")]  # ... within each user
        n = np.bincount(users, minlength=len(self.codes))  # [U] rows per user
        fv, ft = self.fractions
        n_val, n_test = np.floor(fv * n + 1e-9).astype(np.int64), np.floor(ft * n + 1e-9).astype(np.int64)
        n_train = n - n_val - n_test
        for share, counts in ((ft * n, n_test), (fv * n, n_val)):  # RecBole: test first, then validation
            bump = (n_train > 1) & (share > 0) & (share < 1)
            counts += bump
            n_train -= bump
        self.cut_validation, self.cut_test = n_train, n_train + n_val  # [U] ranks where the windows start
        first = np.cumsum(n) - n  # [U] each user's first row in `order`
        later = n_val + n_test > 0
        self.validation_ms = np.full(len(n), np.iinfo(np.int64).max, np.int64)  # [U] time of the first later row
        self.validation_ms[later] = ts[order[first[later] + n_train[later]]]
        self.seen = np.zeros(len(n), np.int64)  # [U] rows labelled so far

    def label(self, table: pa.Table) -> np.ndarray:
        users = self._users(table.column(schema.USER_ID), grow=False)  # [n]
        ts = table.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()  # [n]
        label = np.full(len(users), TRAIN, np.int64)
        has = np.flatnonzero(users >= 0)
        u = users[has]
        by_user = np.argsort(u, kind="stable")  # rows grouped by user, time order within each
        sorted_u = u[by_user]
        group_start = np.flatnonzero(np.r_[True, sorted_u[1:] != sorted_u[:-1]])
        sizes = np.diff(np.r_[group_start, len(sorted_u)])
        within = np.arange(len(sorted_u)) - np.repeat(group_start, sizes)  # [m] rank within this table
        rank = np.empty(len(u), np.int64)
        rank[by_user] = self.seen[sorted_u] + within
        self.seen += np.bincount(u, minlength=len(self.seen))
        window = np.where(rank >= self.cut_test[u], TEST, np.where(rank >= self.cut_validation[u], VALIDATION, TRAIN))
        if self.gap_ms:
            window[(window == TRAIN) & (ts[has] >= self.validation_ms[u] - self.gap_ms)] = GAP
        label[has] = window
        return label

    def first_open(self, ms: int) -> int:
        """Every window stays open: any user's next row may be train, validation or test."""
        return TRAIN


class TimeSlabs:
    """Kept log rows, bucketed by time into one scratch Arrow IPC file per slab, in input order; at
    the end each slab in turn is read, sorted by time and its rows appended to train.parquet,
    validation.parquet or test.parquet (or dropped, in the gap), as `split` labels them."""

    def __init__(self, scratch: Path, edges: np.ndarray, split: GlobalSplit | PerUserSplit):
        self.scratch = scratch
        self.edges = edges  # [E] sorted; slab k holds edges[k-1] <= t < edges[k]
        self.split = split
        self.files: dict[int, tuple[Any, Any]] = {}  # slab -> (file, IPC writer)
        self.rows = 0  # kept rows added
        # rows per task (ALL_TASKS order), per window code TRAIN, GAP, VALIDATION, TEST
        self.tasks = np.zeros((4, len(schema.ALL_TASKS)), np.int64)
        self.no_user_train_rows = 0  # per-user split: rows without a user_id, all train

    def add(self, table: pa.Table) -> None:
        n = table.num_rows
        if n == 0:
            return
        self.rows += n
        self.split.add(table)
        ts = table.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()  # [n] never null in kept rows
        slab = np.searchsorted(self.edges, ts, side="right")  # [n]
        if (slab == slab[0]).all():  # time-ordered input: the common case, no reordering
            self._write(int(slab[0]), table)
            return
        order = np.argsort(slab, kind="stable")  # group rows by slab, input order within each
        table, slab = take_rows(table, order), slab[order]
        bounds = [0, *(np.flatnonzero(np.diff(slab)) + 1).tolist(), n]
        for a, b in zip(bounds[:-1], bounds[1:]):
            self._write(int(slab[a]), table.slice(a, b - a))

    def _write(self, slab: int, table: pa.Table) -> None:
        if slab not in self.files:
            sink = pa.OSFile(str(self.scratch / f"slab-{slab:05d}.arrow"), "wb")
            self.files[slab] = (sink, pa.ipc.new_file(sink, LOG_SCHEMA, options=SCRATCH))
        self.files[slab][1].write_table(table)

    def close(self) -> None:
        for sink, writer in self.files.values():
            if not sink.closed:
                writer.close()
                sink.close()

    def finish(self, targets: dict[str, Path], on_rows: Callable[[int], None]) -> None:
        """Write the windows (`targets`: window name -> file) in time order: one slab in memory at a
        time, one Parquet writer per window."""
        self.close()
        self.split.fit()
        with contextlib.ExitStack() as stack:
            writers = {}
            for window, target in targets.items():
                tmp = stack.enter_context(artifacts.atomic_path(target))
                writers[_WINDOW_CODES[window]] = stack.enter_context(contextlib.closing(pq.ParquetWriter(
                    tmp, LOG_SCHEMA, use_dictionary=_LOG_DICTIONARY, compression=COMPRESSION)))
            for k in sorted(self.files):
                path = self.scratch / f"slab-{k:05d}.arrow"
                # one chunk per column: the scratch's record batches are freed as soon as they are copied
                slab = pa.Table.from_batches(list(scratch_batches(path)), LOG_SCHEMA).combine_chunks()
                path.unlink()
                ts = slab.column(schema.TIMESTAMP).cast(pa.int64()).to_numpy()
                order = np.argsort(ts, kind="stable")  # ties keep input order
                if (np.diff(order) < 0).any():
                    slab = take_rows(slab, order)
                window = self.split.label(slab)  # [n]
                task = codes(slab.column(schema.SURFACE), schema.SURFACES) * len(schema.ENGAGEMENTS) + codes(
                    slab.column(schema.ENGAGEMENT), schema.ENGAGEMENTS)  # [n] index into ALL_TASKS
                np.add.at(self.tasks, (window, task), 1)
                if isinstance(self.split, PerUserSplit):
                    self.no_user_train_rows += int(slab.column(schema.USER_ID).null_count)
                for code, writer in writers.items():
                    rows = np.flatnonzero(window == code)
                    if len(rows):
                        writer.write_table(slab if len(rows) == slab.num_rows else take_rows(slab, rows),
                                           row_group_size=_ROW_GROUP_ROWS)
                on_rows(slab.num_rows)
                # A Parquet writer holds buffers about a slab's size: close each one as soon as its
                # window is over (global split: every later row is at least this late).
                for code in [c for c in writers if c < self.split.first_open(int(ts.max()) if len(ts) else 0)]:
                    writers.pop(code).close()
                del slab

    def window_rows(self, window: str) -> dict[str, int]:
        """Rows per task (every task listed) of a window: train, validation or test."""
        return dict(zip(schema.ALL_TASKS, self.tasks[_WINDOW_CODES[window]].tolist()))

    @property
    def gap_rows(self) -> int:
        return int(self.tasks[GAP].sum())
