"""The rejects of an ingest run (and of `itemsage embed --catalog`'s check): rejects.jsonl, the exact
counts by reason, and the refusal or warning a run ends with when all, most, or most for one reason,
of an input's rows were rejected (data/ingest.py, embed/catalog.py).

rejects.jsonl holds one JSON object per rejected row written (file, row, reason, detail, and the
input record), for the first `SAMPLE` (100) rows of each reason of each input role (catalog, logs);
the counts cover every row. The bound keeps the file small when an input does not fit at all (a
5-row catalog against a shop's logs rejected 41,814 log rows, each written with its record: 164 MB);
100 rows of one reason show its pattern, and the reason's detail names the fix.

`mismatch` refuses a run where one reason rejected more than `max_share` (0.9 by default, ingest's
`--max-reject-share`) of a role's rows, when that is at least `MISMATCH_ROWS` (1,000) rows: such a
run would publish a dataset of the few rows that fit, which is a catalog and logs from different
shops (unknown_product), or options that do not fit the data, far more often than what was meant.
Below 1,000 rows the rejects file shows every row (at most 100 per reason) and the run goes on, with
the warning of `warning` when more than half of a role's rows were rejected.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

from itemsage import schema

SAMPLE = 100  # rows written in full per (role, reason); every row is counted
MAX_REJECT_SHARE = 0.9  # one reason over this share of a role's rows ...
MISMATCH_ROWS = 1_000  # ... and at least this many rows: refused (`mismatch`)
_WHAT = {"catalog": "catalog", "logs": "log"}


class RejectsFile:
    """rejects.jsonl of one run, written as the batches are checked; fsynced at `close`."""

    def __init__(self, path: Path, sample: int = SAMPLE) -> None:
        self.path = path
        self.sample = sample
        self.file = open(path, "w", encoding="utf-8")
        self.counts: collections.Counter[str] = collections.Counter()
        # role -> reason -> rows, and the first detail of each (role, reason): the summary's warnings
        self.by_role: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.first_details: dict[tuple[str, str], str] = {}
        self.written = 0

    def room(self, role: str) -> Any:
        """For `validate.reject_entries`: reason -> how many more rows of it are written in full."""
        return lambda reason: max(0, self.sample - self.by_role[role][reason])

    def write(self, role: str, entries: list[dict[str, Any]]) -> int:
        """Count one batch's reject entries (`validate.reject_entries`) and write those that carry their
        input record (the rows within the sample); returns how many were counted."""
        for entry in entries:
            reason = entry["reason"]
            self.counts[reason] += 1
            self.by_role[role][reason] += 1
            self.first_details.setdefault((role, reason), f"{entry['file']} row {entry['row']}: {entry['detail']}")
            if "record" not in entry:
                continue
            line = json.dumps(entry, ensure_ascii=False, allow_nan=False)
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (bad_text_encoding) stays the JSON escape it came as
                line = json.dumps(entry, allow_nan=False)
            self.file.write(line + "\n")
            self.written += 1
        return len(entries)

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    @property
    def sampled(self) -> bool:
        """Whether some rejected rows are counted but not written (a reason passed the sample)."""
        return self.written < sum(self.counts.values())

    def note(self) -> str:
        """Where the rejected rows are, in words, for messages."""
        if not self.sampled:
            return f"every rejected row and its reason: {self.path.name}"
        return (f"{self.path.name} holds the first {self.sample} rows of each reason ({self.written:,} of "
                f"{sum(self.counts.values()):,} rejected rows); the counts cover them all")

    def refusal(self, role: str, read: int, rejected: int) -> str | None:
        """The error when every `role` row was rejected (None otherwise): nothing is written then."""
        if not read or rejected < read:
            return None
        reasons = "; ".join(f"{reason} ({count:,}), first: {self.first_details[(role, reason)]}"
                            for reason, count in self.by_role[role].most_common(3))
        return (f"every one of the {read:,} {_WHAT[role]} rows was rejected; nothing was written. Reasons: {reasons}. "
                "Fix the rows (the reasons say how) and run again.")

    def mismatch(self, role: str, read: int, max_share: float = MAX_REJECT_SHARE) -> str | None:
        """The error when one reason rejected more than `max_share` of the `role` rows, and at least
        MISMATCH_ROWS of them (None otherwise): nothing is written then."""
        if not read or not self.by_role[role]:
            return None
        reason, count = self.by_role[role].most_common(1)[0]
        if count < MISMATCH_ROWS or count <= max_share * read:
            return None
        why = {"unknown_product": "the catalog and the logs do not seem to belong together (are they from the "
                                  "same shop, and is the whole catalog given?)",
               "unknown_query_product": "the logs name query products the catalog does not have (are the catalog "
                                        "and the logs from the same shop?)"}.get(
            reason, "the input and the options do not fit each other")
        return (f"{count:,} of {read:,} {_WHAT[role]} rows ({100 * count / read:.1f}%) were rejected as {reason}: "
                f"{why}. Nothing was written. First: {self.first_details[(role, reason)]}. If the rows are meant to "
                f"be left out, run again with --max-reject-share 1 (IngestConfig.max_reject_share, now {max_share:g}).")

    def warning(self, role: str, read: int, rejected: int, out: Path) -> str | None:
        """A warning when more than half of the `role` rows were rejected (None otherwise): how many,
        the top reason with its first detail, and where the rejected rows are."""
        if not read or 2 * rejected <= read:
            return None
        reason, count = self.by_role[role].most_common(1)[0]
        share = (f"ALL {read:,} {_WHAT[role]} rows were" if rejected == read else
                 f"{rejected:,} of {read:,} {_WHAT[role]} rows ({100 * rejected // read}%) were")
        text = (f"{share} rejected, most as {reason} ({count:,}). "
                f"First: {self.first_details[(role, reason)]}. In {out / schema.REJECTS_FILE}: "
                + ("every rejected row and its reason" if not self.sampled else
                   f"the first {self.sample} rows of each reason"))
        if role == "catalog" and rejected == read:
            text += ". No product was kept, so every log row is rejected too"
        return text + "."
