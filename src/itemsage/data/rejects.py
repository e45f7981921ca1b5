"""The rejects of an ingest run: rejects.jsonl (one JSON object per rejected row: file, row, reason,
detail, record), the counts by reason, and the refusal or warning a run ends with when all or most
rows of an input were rejected (data/ingest.py).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

from itemsage import schema
from itemsage.data.readers import Source


class RejectsFile:
    """rejects.jsonl of one run, written as the batches are checked; fsynced at `close`."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "w", encoding="utf-8")
        self.counts: collections.Counter[str] = collections.Counter()
        # role -> reason -> rows, and the first detail of each (role, reason): the summary's warnings
        self.by_role: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.first_details: dict[tuple[str, str], str] = {}

    def write(self, src: Source, entries: list[dict[str, Any]]) -> int:
        """Write one batch's reject entries (`validate.reject_entries`); returns how many."""
        for entry in entries:
            reason = entry["reason"]
            self.counts[reason] += 1
            self.by_role[src.role][reason] += 1
            self.first_details.setdefault((src.role, reason), f"{src.path} row {entry['row']}: {entry['detail']}")
            self.file.write(json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n")
        return len(entries)

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def refusal(self, role: str, read: int, rejected: int) -> str | None:
        """The error when every `role` row was rejected (None otherwise): nothing is written then."""
        if not read or rejected < read:
            return None
        what = {"catalog": "catalog", "logs": "log"}[role]
        reasons = "; ".join(f"{reason} ({count:,}), first: {self.first_details[(role, reason)]}"
                            for reason, count in self.by_role[role].most_common(3))
        return (f"every one of the {read:,} {what} rows was rejected; nothing was written. Reasons: {reasons}. "
                "Fix the rows (the reasons say how) and run again.")

    def warning(self, role: str, read: int, rejected: int, out: Path) -> str | None:
        """A warning when more than half of the `role` rows were rejected (None otherwise): how many,
        the top reason with its first detail, and where every row's reason is."""
        if not read or 2 * rejected <= read:
            return None
        reason, count = self.by_role[role].most_common(1)[0]
        what = {"catalog": "catalog", "logs": "log"}[role]
        share = (f"ALL {read:,} {what} rows were" if rejected == read else
                 f"{rejected:,} of {read:,} {what} rows ({100 * rejected // read}%) were")
        text = (f"{share} rejected, most as {reason} ({count:,}). "
                f"First: {self.first_details[(role, reason)]}. Every rejected row and its reason: "
                f"{out / schema.REJECTS_FILE}")
        if role == "catalog" and rejected == read:
            text += ". No product was kept, so every log row is rejected too"
        return text + "."
