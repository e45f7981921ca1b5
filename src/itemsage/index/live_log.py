"""The live-update log of an index root: every upsert and delete the server acknowledges, appended and
fsynced before the reply, so it survives a kill -9 (index/live.py replays it onto the served version).

On disk, beside the versions:

    INDEX_ROOT/live/log.jsonl   one JSON object per line:
        {"seq": 7, "op": "upsert", "id": "p1", "vector": "<base64 float32 LE>", "model": "<fp>", "product": {...},
         "query_vector": "<base64 float32 LE>"}   (the product's frozen query vector, when the index has them)
        {"seq": 8, "op": "delete", "id": "p2"}
        {"seq": 6, "op": "compacted", "version": "v..."}   (first line after a compaction)
    INDEX_ROOT/live/LOCK        flock'd around every append and every rewrite of the log
    INDEX_ROOT/live/WRITER      flock'd by the one server process that appends (the first server started
                                with a token claims it, `claim`); holds {"pid", "host", "since"} of it

Every other server on the index root follows the log read-only (`read_new`: the lines appended since
it last looked), so it serves the writer's updates too (serve/service.py).

A line torn by a kill mid-write was never acknowledged (the reply waits for the fsync), so it is
ignored at replay and cut off before the next append.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from itemsage import artifacts
from itemsage.artifacts import ArtifactError

log = logging.getLogger(__name__)


LIVE_DIR = "live"
LOG_FILE = "log.jsonl"
LOCK_FILE = "LOCK"
WRITER_FILE = "WRITER"
UPSERT, DELETE, COMPACTED = "upsert", "delete", "compacted"


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str, dim: int) -> np.ndarray:
    vector = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if vector.shape != (dim,) or not np.all(np.isfinite(vector)):
        raise ValueError(f"a logged vector has {vector.size} values (or non-finite ones), expected {dim}")
    return vector.astype(np.float32)





class LiveLog:
    """The append-only log of one index root. One server process appends; `compact` rewrites."""

    def __init__(self, index_root: str | Path) -> None:
        self.dir = Path(index_root) / LIVE_DIR
        self.path = self.dir / LOG_FILE
        self._last_seq: int | None = None  # the writer's counter, read from the log on first append
        self._writer_fd: int | None = None
        self._lock = threading.RLock()  # threads of this process (append -> claim re-enters); LOCK orders processes

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _read_lines(self) -> tuple[list[dict[str, Any]], int]:
        """(records, length of the complete part in bytes). A torn last line is left out."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        complete = data.rfind(b"\n") + 1  # a kill mid-append leaves a tail without its newline
        if complete < len(data):
            log.warning("%s ends with a torn line of %d bytes (an update killed before its reply); ignoring it",
                        self.path, len(data) - complete)
        return self._parse(data[:complete]), complete

    def _parse(self, data: bytes, start: int = 0) -> list[dict[str, Any]]:
        """The records of complete lines `data`, read from byte `start` of the log."""
        records = []
        for number, line in enumerate(data.splitlines(), start=1):
            try:
                record = json.loads(line)
                int(record["seq"]), record["op"]
            except (ValueError, KeyError, TypeError):
                where = f"line {number}" if start == 0 else f"line {number} after byte {start:,}"
                raise ArtifactError(f"{self.path} {where} is not a valid update record; the live log is "
                                    "damaged. Restore it from a backup, or move it away to serve the index "
                                    "version alone (its updates are then lost).") from None
            records.append(record)
        return records

    def stamp(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime ns) of the log file, None without one: a follower's cheap "anything new?"."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read_new(self, position: tuple[int, int] | None) -> tuple[list[dict[str, Any]], int, tuple[int, int] | None]:
        """A follower's read: (the updates after `position`, in order; the seq through which the log was
        compacted, when read from the start; the new position). `position` (inode, byte offset) comes
        from the previous call (None: from the start). A rewritten log (a compaction renames a new file
        in place) is read from the start; a line still being appended is left for the next call."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                start = position[1] if position and position[0] == st.st_ino and position[1] <= st.st_size else 0
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return [], 0, None
        complete = data.rfind(b"\n") + 1
        records = self._parse(data[:complete], start)
        floor = max((int(r["seq"]) for r in records if r["op"] == COMPACTED), default=0)
        return [r for r in records if r["op"] != COMPACTED], floor, (st.st_ino, start + complete)

    def read(self, after: int = 0) -> tuple[list[dict[str, Any]], int]:
        """(the updates with seq > `after`, in order; the seq through which the log was compacted).

        No lock (an index root may be read-only): a rewrite is an atomic rename, and a line being
        appended is an unacknowledged torn tail.
        """
        records, _ = self._read_lines()
        floor = max((int(r["seq"]) for r in records if r["op"] == COMPACTED), default=0)
        return [r for r in records if r["op"] != COMPACTED and int(r["seq"]) > after], floor

    def append(self, updates: list[dict[str, Any]], *, floor: int = 0) -> list[dict[str, Any]]:
        """Number `updates` (seq), append them, fsync; return them numbered. `floor`: seq already used.

        Raises ArtifactError when another process holds the writer lock of this index root.
        """
        if not updates:
            return []
        with self._lock, self._locked():
            self._take_writer()
            if self._last_seq is None:
                records, complete = self._read_lines()
                if self.path.exists() and complete < self.path.stat().st_size:
                    os.truncate(self.path, complete)  # cut off the torn line before appending after it
                self._last_seq = max((int(r["seq"]) for r in records), default=0)
            first = max(self._last_seq, floor) + 1
            numbered = [{"seq": first + i, **u} for i, u in enumerate(updates)]
            payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in numbered).encode()
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)  # durable before the reply
            finally:
                os.close(fd)
            if created:
                artifacts._fsync_dir(self.dir)
            self._last_seq = numbered[-1]["seq"]
            return numbered

    def _take_writer(self) -> None:
        if not self.claim():
            raise ArtifactError(f"another server process ({describe(self.writer())}) is writing live updates to "
                                f"{self.dir}; send updates to that one (one writer per index root)")

    @property
    def is_writer(self) -> bool:
        """Whether this object holds the writer lock (this process appends)."""
        return self._writer_fd is not None

    def claim(self) -> bool:
        """Take the writer lock if no process holds it (and keep it for the life of the process, or
        until `close`); record this process in WRITER. True when this object holds it."""
        with self._lock:  # two threads of this process must not race for it (flock: one open file each)
            if self._writer_fd is not None:
                return True
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / WRITER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            with contextlib.suppress(OSError):  # who writes is information, not a condition of writing
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            self._writer_fd = fd
            return True

    def writer(self) -> dict[str, Any] | None:
        """{"pid", "host", "since"} of the process that last claimed the writer lock (None: none has).
        It holds the lock for as long as it runs."""
        try:
            value = json.loads((self.dir / WRITER_FILE).read_bytes() or b"null")
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def close(self) -> None:
        """Give up the writer lock (another process may append after this)."""
        with self._lock:
            if self._writer_fd is not None:
                os.close(self._writer_fd)
                self._writer_fd = None
                self._last_seq = None

    def drop_through(self, seq: int, version: str) -> None:
        """After a compaction into `version`: keep only updates after `seq`, behind a COMPACTED mark."""
        with self._lock, self._locked():
            records, _ = self._read_lines()
            kept = [{"seq": seq, "op": COMPACTED, "version": version}]
            kept += [r for r in records if r["op"] != COMPACTED and int(r["seq"]) > seq]
            artifacts.atomic_write_text(self.path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))


def describe(writer: dict[str, Any] | None) -> str:
    """"pid 123 on host h, since <time>" for messages."""
    if not writer:
        return "pid unknown"
    return f"pid {writer.get('pid')} on host {writer.get('host')}, since {writer.get('since')}"


def upsert_record(product_id: str, vector: np.ndarray, model: str, product: dict[str, Any],
                  query_vector: np.ndarray | None = None) -> dict[str, Any]:
    """An upsert line; `query_vector` [Dq]: the product's frozen query vector (product_query.product_query_vectors)."""
    record = {"op": UPSERT, "id": product_id, "vector": encode_vector(vector), "model": model, "product": product,
              "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")}
    if query_vector is not None:
        record["query_vector"] = encode_vector(query_vector)
    return record


def delete_record(product_id: str) -> dict[str, Any]:
    return {"op": DELETE, "id": product_id, "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")}
