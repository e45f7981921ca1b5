"""Ingest: validate, normalise and time-split a catalog and engagement logs into a dataset (docs/ARCHITECTURE.md).

`ingest(catalog, logs, out, config)` reads Parquet and JSON Lines files (or directories of them, in
sorted name order) in streaming batches and writes the dataset directory described in
docs/ARCHITECTURE.md: products.parquet, train.parquet, validation.parquet, test.parquet, rejects.jsonl,
vocab.json and manifest.json. The module is the orchestration (the passes, the manifest); the
parts are, in data-flow order, beside it in data/: readers.py (input files -> batches, file
refusals), normalise.py (each column to one Arrow type), validate.py (the row checks), rejects.py
(rejects.jsonl and its counts), timesplit.py (the three windows) and publish.py (the output
directory). Options and the run's summary are in ingest_config.py.

Two kinds of bad input:
- a bad ROW goes to rejects.jsonl with exactly one reason from `schema.REJECT_REASONS`, and the run
  goes on. `row` there is the 0-based index of the record in its file (for JSON Lines: blank lines
  are not counted, so it is the line number minus one when the file has none). Checks run in a fixed
  order and the first failing one names the reason.
- a bad FILE (unknown format, unreadable, a required column missing or of the wrong type, no rows)
  raises `DataError` before anything is written: every input's schema is checked first (Parquet
  metadata; the first 1,000 records of a JSON Lines file). A JSON line that does not parse, found
  later, also raises `DataError`, and the half-written output is removed.

Rules a user may need to know:
- Timestamps: Arrow timestamps and dates (naive ones are read as UTC), ISO-8601 strings (Python's
  `datetime.fromisoformat`; no zone = UTC), or numbers since the Unix epoch: a value whose magnitude
  is below 1e11 is seconds, otherwise milliseconds (1e11 s is the year 5138, 1e11 ms is March 1973,
  so only millisecond times before 1973 are misread). Stored as timestamp[ms, UTC].
- product_id: strings, or integers (written as their decimal text). Ids are otherwise kept as given;
  an empty or blank id is missing.
- Duplicate product ids: the first row with an id claims it; every later row with that id is
  rejected, even when the first one was itself rejected (its log rows then become unknown_product).
- Images: a product keeps its first `max_images` (20) image vectors; longer lists are cut and the
  cut is counted in the summary, not rejected. The checks (width, NaN/inf) apply to the kept vectors.
  `image_paths` are used only for products without `image_embeddings`; relative paths are resolved
  against the directory of the file that names them; any unreadable file rejects the row. The first
  valid image vector (or `image_dim`, `--image-dim`) fixes the dataset's image width; a
  bad_vector_width detail names the width and the file and row that fixed it.
- Every catalog (or log) row rejected: DataError naming the top reasons, nothing written; so too when
  one reason rejected more than `max_reject_share` (0.9) of them and at least 1,000 rows (a catalog
  and logs that do not belong together; itemsage.data.rejects). More than half rejected otherwise:
  the run still writes the dataset, with a warning shown first in the summary (and kept in the
  manifest) naming the top reason. rejects.jsonl holds the first 100 rows of each reason in full;
  the manifest's counts (`rejects`, by reason) cover every row.
- Numeric timestamps that all fall before 1990 (e.g. 1, 2, 3: read as seconds after 1970) give a
  warning in the summary: they are probably counters, not epoch times.
- Query vectors: one width per surface, fixed by its first valid row; a search row with only
  `query_text` stands for a 384-d text-encoder vector and a closeup row with only `query_image_path`
  for an image-encoder vector (the path is encoded here and stored as `query_embedding`). A
  `query_embedding` of length 0 counts as absent.
- Products as queries: each kept product gets its frozen query vector (`query_vector` in
  products.parquet; `product_query`, `--product-query auto|image|text`: the main image vector, or the
  text encoder's vector of the title; see itemsage.data.product_query), computed after the catalog pass and
  held in memory (4 x Dq bytes per product) for the log pass. A closeup or home row may name
  `query_product_id` instead of a query vector: an id that is not a kept product is rejected
  (unknown_query_product); else the product's vector becomes the row's `query_embedding` (a row with
  both keeps its own vector). `query_product_id` is kept in the windows as given.
- content_hash: sha256 of the product's features (see `content_hash`), so `embed --incremental`
  re-embeds exactly the products whose text or images changed.
- Input fingerprints in the manifest: `sha256:<hex>` of the file's bytes, or `size-mtime:<bytes>:<ns>`
  for files larger than `sha256_max_bytes` (1 GiB by default), where hashing would be a long extra pass.

Split: three windows in time order, global or per user, with an optional gap before validation
(see itemsage.data.timesplit for the rules).

Passes and memory. Nothing here holds the logs, or the catalog's vectors, all at once:
1. catalog: each batch is checked and its kept products appended to a scratch Arrow IPC file; held
   in memory are the product ids seen (a Python set) and any extra input columns.
2. time pass: the logs' timestamp column only (a JSON Lines file is parsed in full for it), counted
   per minute (one counter per minute of the logs' time span).
3. logs: each batch is checked, and its kept rows appended to the scratch file of their time slab. A
   slab is a run of whole minutes holding about `sort_rows` rows, cut from the minute counts of
   pass 2 (more rows when a single minute holds more, or when the logs hold more than 256 slabs'
   worth: at most 257 scratch files are open at once); the split time is always a slab edge.
4. output: products.parquet is copied from its scratch file in batches, the vocabulary is counted
   from it in batches, and each slab in turn is read, sorted by time (ties keep input order) and
   appended to train.parquet, validation.parquet or test.parquet (or dropped, in the gap).
So peak memory is about one batch while reading (`batch_rows` rows, fewer where rows are wide: a
Parquet batch holds about 64 MiB of decoded data), one slab (twice: read and sorted) while writing,
plus the O(products) state: the id sets, the vocabulary counts and the extra catalog columns.

The output directory is written atomically, and what a killed run left is recovered or removed
by the next run into the same `<out>` (itemsage.data.publish).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from itemsage import artifacts, schema
from itemsage.config import ConfigError, to_dict
from itemsage.data import product_query
from itemsage.data.ingest_config import IngestConfig, IngestSummary, InputStats, summary_table
from itemsage.data.normalise import (
    LOG_KINDS,
    LOG_REQUIRED,
    LOG_SCHEMA,
    ExtraColumns,
    canonical,
    catalog_kinds,
    parse_iso_ms,
)
from itemsage.data.publish import check_out, publish, recover_leftovers
from itemsage.data.readers import (
    DataError,
    Source,
    catalog_sources,
    check_schema,
    fingerprint,
    input_files,
    numeric_times,
    total_rows,
)
from itemsage.data.rejects import RejectsFile
from itemsage.data.row_arrays import Rejector, content_hash
from itemsage.data.text import known_text
from itemsage.data.timesplit import (
    COMPRESSION,
    SCRATCH,
    GlobalSplit,
    MinuteCounts,
    PerUserSplit,
    TimeSlabs,
    iso,
    scratch_batches,
)
from itemsage.data.validate import RowChecks, check_catalog_batch, check_products, products_schema, reject_entries

# Re-exported: callers import these from itemsage.ingest, where they lived before the split.
__all__ = ["DataError", "IngestConfig", "IngestSummary", "InputStats", "LOG_SCHEMA", "catalog_sources",
           "check_products", "content_hash", "ingest", "recover_leftovers", "summary_table"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


class _Ingest:
    """State of one ingest run: the row checks, the counts, the rejects file, the scratch files."""

    def __init__(self, config: IngestConfig, tmp: Path, progress: Any, image_encoder: Any):
        self.config = config
        self.progress = progress
        self.scratch = tmp / ".scratch"
        self.text_columns = schema.TEXT_FIELDS + tuple(f for f in config.text_fields if f not in schema.TEXT_FIELDS)
        self.checks = RowChecks(text_columns=self.text_columns, max_images=config.max_images,
                                image_dim=config.image_dim, image_batch_size=config.image_batch_size,
                                image_encoder=image_encoder)
        self.rejects = RejectsFile(tmp / schema.REJECTS_FILE)
        self.stats: list[InputStats] = []
        self.products = 0
        self.extras = ExtraColumns()
        self.lo_ms: int | None = None  # earliest and latest readable log timestamp
        self.hi_ms: int | None = None
        self.numeric_times = False  # some log timestamps were given as numbers (epoch seconds or ms)

    # -- catalog

    def read_catalog(self, sources: list[Source]) -> None:
        """Check every catalog row; kept products go to the products scratch file, extras to memory."""
        kinds = catalog_kinds(self.text_columns)
        task = self.progress.add_task("catalog", total=total_rows(sources))
        with pa.OSFile(str(self.scratch / "products.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, products_schema(self.text_columns), options=SCRATCH) as scratch:
            for src in sources:
                stats = InputStats(str(src.path), "catalog")
                self.stats.append(stats)
                for start, batch in src.batches(self.config.batch_rows):
                    n, table, rej, listed = check_catalog_batch(self.checks, src, start, batch, kinds)
                    keep = rej.alive
                    if src.fmt == "parquet":
                        mask = pa.array(keep)
                        extra = {c: batch.column(c).filter(mask) for c in batch.schema.names if c not in kinds}
                    else:
                        names = dict.fromkeys(k for r in batch for k in r if k not in kinds)
                        extra = {c: [r.get(c) for r, k in zip(batch, keep) if k] for c in names}
                    for computed in (schema.CONTENT_HASH, schema.QUERY_VECTOR):
                        if computed in extra:
                            log.warning("%s: ignoring the input column '%s'; ingest computes it", src.path, computed)
                            del extra[computed]
                    if listed is not None:  # kept beside the extras: train reads it (itemsage.train.pairs)
                        extra[schema.LISTED_AT] = listed
                    if table.num_rows:
                        scratch.write_table(table)
                    self.extras.add(extra, table.num_rows)
                    self.products += table.num_rows
                    stats.rows_read += n
                    stats.rows_rejected += self.rejects.write(
                        src.role, reject_entries(src, batch, start, rej, self.rejects.room(src.role)))
                    stats.rows_kept += table.num_rows
                    self.progress.advance(task, n)

    def product_queries(self, text_encoder: Any) -> dict[str, Any]:
        """Each kept product's frozen query vector (itemsage.data.product_query), in scratch order, held in
        `checks` for the log pass; returns the manifest's `product_query` entry."""
        without_image = 0
        for batch in scratch_batches(self.scratch / "products.arrow"):
            lengths = pc.list_value_length(batch.column(schema.IMAGE_EMBEDDINGS)).fill_null(0)
            without_image += int((lengths.to_numpy(zero_copy_only=False) == 0).sum())
        try:
            source = product_query.choose_source(self.config.product_query, products=self.products,
                                                 without_image=without_image)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if source == "text" and text_encoder is None:  # loaded once here, not once per batch below
            from itemsage.encoders.text import TextQueryEncoder

            text_encoder = TextQueryEncoder()
        task = self.progress.add_task(f"product query vectors ({source})", total=self.products)
        ids: list[str] = []
        blocks: list[np.ndarray] = []
        for batch in scratch_batches(self.scratch / "products.arrow"):
            table = pa.Table.from_batches([batch])
            blocks.append(product_query.product_query_vectors(table, source, text_encoder=text_encoder))
            ids += table.column(schema.PRODUCT_ID).to_pylist()
            self.progress.advance(task, table.num_rows)
        dim = blocks[0].shape[1] if blocks else 0  # no product kept: ingest refuses the catalog before this
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)  # [P, Dq]
        self.checks.product_query_rows = {pid: i for i, pid in enumerate(ids)}
        self.checks.product_query_vectors = vectors
        log.info("product query vectors: %s, %d-d, %d products", source, dim, len(ids))
        return product_query.manifest_entry(source, dim)

    def write_products(self, target: Path) -> None:
        """products.parquet: the scratch batches with their frozen query vectors and slices of the extra
        columns appended."""
        extras = self.extras.columns()
        core = products_schema(self.text_columns, query_vector=True)
        vectors = self.checks.product_query_vectors  # [P, Dq] in scratch order
        no_dictionary = {schema.PRODUCT_ID, schema.IMAGE_EMBEDDINGS, schema.CONTENT_HASH, schema.QUERY_VECTOR}
        dictionary = [f"{f}.list.element" for f in core.names if f not in no_dictionary]
        with artifacts.atomic_path(target) as tmp:
            writer = None
            start = 0
            try:
                for batch in scratch_batches(self.scratch / "products.arrow"):
                    table = pa.Table.from_batches([batch])
                    block = vectors[start:start + batch.num_rows]  # [b, Dq]
                    offsets = pa.array(np.arange(len(block) + 1, dtype=np.int32) * block.shape[1])
                    table = table.append_column(pa.field(schema.QUERY_VECTOR, pa.list_(pa.float32())),
                                                pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1))))
                    for name, column in extras.items():
                        table = table.append_column(name, column.slice(start, batch.num_rows))
                    start += batch.num_rows
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=dictionary,
                                                  compression=COMPRESSION)
                    writer.write_table(table)
                if writer is None:  # no product kept
                    table = core.empty_table()
                    for name, column in extras.items():
                        table = table.append_column(name, column.slice(0, 0))
                    pq.write_table(table, tmp, compression=COMPRESSION)
            finally:
                if writer is not None:
                    writer.close()

    def build_vocabulary(self) -> Any:
        from itemsage.data.text import Vocabulary

        task = self.progress.add_task("vocabulary", total=self.products)

        def fields() -> Iterator[list[str]]:
            # One item = all strings of one field in one batch: the counts are per string, so this
            # counts the same as one item per product, with far fewer Python calls.
            for batch in scratch_batches(self.scratch / "products.arrow"):
                for f in self.config.text_fields:
                    yield pc.list_flatten(batch.column(f)).to_pylist()
                self.progress.advance(task, batch.num_rows)

        c = self.config
        return Vocabulary.build(fields(), max_unigrams=c.max_unigrams, max_bigrams=c.max_bigrams,
                                max_trigrams=c.max_trigrams)

    def unreadable(self, vocab: Any) -> int:
        """Kept products with no image and no token of `vocab`: the tower reads nothing of them."""
        count = 0
        for batch in scratch_batches(self.scratch / "products.arrow"):
            table = pa.Table.from_batches([batch])
            no_image = pc.list_value_length(table.column(schema.IMAGE_EMBEDDINGS)).fill_null(0).to_numpy() == 0
            count += int((no_image & ~known_text(table, vocab, self.config.text_fields)).sum())
        return count

    # -- logs

    def time_pass(self, sources: list[Source]) -> MinuteCounts:
        """Rows per minute over every readable timestamp (and the exact min and max): a pass over the
        timestamp column only."""
        minutes = MinuteCounts()
        task = self.progress.add_task("time span", total=total_rows(sources))
        for src in sources:
            rows = 0
            for _, batch in src.batches(self.config.batch_rows, [schema.TIMESTAMP]):
                n, cols, _ = canonical(src.fmt, batch, {schema.TIMESTAMP: "time"})
                self.numeric_times = self.numeric_times or numeric_times(src.fmt, batch)
                ts = cols[schema.TIMESTAMP]
                if ts.null_count < n:
                    ms = ts.drop_null().to_numpy()
                    lo, hi = int(ms.min()), int(ms.max())
                    self.lo_ms = lo if self.lo_ms is None else min(self.lo_ms, lo)
                    self.hi_ms = hi if self.hi_ms is None else max(self.hi_ms, hi)
                    minutes.add(ms)
                rows += n
                self.progress.advance(task, n)
            src.num_rows = rows
        return minutes

    def read_logs(self, sources: list[Source], slabs: TimeSlabs) -> None:
        task = self.progress.add_task("logs", total=total_rows(sources))
        for src in sources:
            stats = InputStats(str(src.path), "logs")
            self.stats.append(stats)
            for start, batch in src.batches(self.config.batch_rows, list(LOG_KINDS)):
                n, cols, errors = canonical(src.fmt, batch, LOG_KINDS)
                rej = Rejector(n)
                table = self.checks.log_batch(src.path, n, cols, errors, rej, start=start)
                slabs.add(table)
                stats.rows_read += n
                stats.rows_rejected += self.rejects.write(
                    src.role, reject_entries(src, batch, start, rej, self.rejects.room(src.role)))
                stats.rows_kept += table.num_rows
                self.progress.advance(task, n)

    def time_warning(self) -> str | None:
        """A warning when numeric timestamps all read as times before 1990: small numbers such as
        1, 2, 3 (a step counter, days) are seconds after 1970-01-01 here, not what was meant."""
        if not self.numeric_times or self.hi_ms is None or self.hi_ms >= _PLAUSIBLE_EPOCH_MS:
            return None
        return (f"the log timestamps are numbers and all read as times before 1990 (from {iso(self.lo_ms)} to "
                f"{iso(self.hi_ms)}): numbers are seconds since 1970-01-01 UTC (milliseconds from 1e11 on). "
                "If they count steps or days, write epoch seconds or ISO-8601 times instead; the time split "
                "only needs their order, so it is still made.")

    def counts(self, role: str) -> tuple[int, int]:
        """(rows read, rows rejected) of every `role` input file."""
        return (sum(s.rows_read for s in self.stats if s.role == role),
                sum(s.rows_rejected for s in self.stats if s.role == role))


_PLAUSIBLE_EPOCH_MS = 631_152_000_000  # 1990-01-01 UTC: engagement logs from before it are unlikely


class _Laps:
    """Logs how long each pass took, and its rows per second."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, name: str, rows: int | None) -> None:
        now = time.perf_counter()
        seconds = now - self.last
        speed = f" ({rows / seconds:,.0f} rows/s)" if rows and seconds > 0 else ""
        log.info("%s: %s in %.1f s%s", name, f"{rows:,} rows" if rows is not None else "done", seconds, speed)
        self.last = now


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def ingest(catalog: str | Path, logs: str | Path, out: str | Path, config: IngestConfig | None = None, *,
           image_encoder: Any = None, text_encoder: Any = None) -> IngestSummary:
    """Validate, normalise and time-split `catalog` and `logs` into the dataset directory `out`.

    `catalog` and `logs` are a .parquet/.jsonl/.json file or a directory of them. `image_encoder`
    (anything with `dim` and `encode_paths`) replaces the built-in ImageEncoder, which is otherwise
    loaded only when an image path needs encoding; `text_encoder` (anything with `dim` and `encode`)
    replaces the built-in TextQueryEncoder for the products' frozen query vectors when those are
    text vectors (`config.product_query`). Raises DataError for an unusable input file
    (before anything is written) and ConfigError for a bad option.
    """
    from rich.progress import MofNCompleteColumn, Progress

    config = config or IngestConfig()
    out = Path(out)
    recover_leftovers(out)
    catalog_sources = input_files(catalog, "catalog")
    log_sources = input_files(logs, "logs")
    text_columns = schema.TEXT_FIELDS + tuple(f for f in config.text_fields if f not in schema.TEXT_FIELDS)
    for src in catalog_sources:
        check_schema(src, catalog_kinds(text_columns), [schema.PRODUCT_ID])
    for src in log_sources:
        check_schema(src, LOG_KINDS, LOG_REQUIRED)
    check_out(out)

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ".scratch").mkdir(parents=True)
    run: _Ingest | None = None
    slabs: TimeSlabs | None = None
    try:
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), disable=not config.progress) as progress:
            run = _Ingest(config, tmp, progress, image_encoder)
            lap = _Laps()
            run.read_catalog(catalog_sources)
            lap("catalog", sum(s.rows_read for s in run.stats))
            # Every row rejected: refused, nothing written (the error names the reasons). More than
            # half: the dataset is written, with a warning first in the summary.
            if refusal := (run.rejects.refusal("catalog", *run.counts("catalog"))
                           or run.rejects.mismatch("catalog", run.counts("catalog")[0], config.max_reject_share)):
                raise DataError(refusal)
            warnings = [run.rejects.warning("catalog", *run.counts("catalog"), out)]
            # Before the logs: a row's query_product_id stands for its product's frozen vector.
            product_query_entry = run.product_queries(text_encoder)
            lap("product query vectors", run.products)

            minutes = run.time_pass(log_sources)
            lap("time pass", total_rows(log_sources))
            gap_ms = int(round(config.gap_hours * 3_600_000))
            split: GlobalSplit | PerUserSplit
            if config.split == "per-user":
                split_ms: list[int] = []
                split = PerUserSplit(config.validation_fraction, config.test_fraction, gap_ms)
                log.info("per-user split: each user's last %g of engagements is test, the %g before it validation",
                         config.test_fraction, config.validation_fraction)
            else:
                if config.validation_from is not None:
                    split_ms = [parse_iso_ms(config.validation_from), parse_iso_ms(config.test_from)]
                else:
                    lo, hi = (run.lo_ms, run.hi_ms) if run.lo_ms is not None else (0, 0)
                    test_ms = hi - int(config.test_fraction * (hi - lo))
                    split_ms = [test_ms - int(config.validation_fraction * (hi - lo)), test_ms]
                split = GlobalSplit(split_ms[0], split_ms[1], gap_ms)
                log.info("validation from %s, test from %s", iso(split_ms[0]), iso(split_ms[1]))
            edges = [split_ms[0] - gap_ms, *split_ms] if split_ms else []
            slabs = TimeSlabs(tmp / ".scratch", minutes.slab_edges(edges, config.sort_rows), split)
            del minutes
            run.read_logs(log_sources, slabs)
            if refusal := (run.rejects.refusal("logs", *run.counts("logs"))
                           or run.rejects.mismatch("logs", run.counts("logs")[0], config.max_reject_share)):
                raise DataError(refusal)
            # Not logged here: the summary shows them first (the CLI prints it), and the manifest keeps them.
            warnings += [run.rejects.warning("logs", *run.counts("logs"), out), run.time_warning()]
            warnings = [w for w in warnings if w]
            run.rejects.close()
            run.checks.seen_ids.clear()  # O(products) strings no later pass needs
            run.checks.kept_ids.clear()
            run.checks.product_query_rows = {}
            lap("logs", total_rows(log_sources))

            run.write_products(tmp / schema.PRODUCTS_FILE)
            vocab = run.build_vocabulary()
            vocab.save(tmp / schema.VOCAB_FILE)
            if unreadable := run.unreadable(vocab):
                warnings.append(f"{unreadable:,} of {run.products:,} products ({100 * unreadable / run.products:.1f}%) "
                                "have no image and no text token in the vocabulary: the tower reads nothing of them.")
            lap("products and vocabulary", run.products)
            task = progress.add_task("sorting into windows", total=slabs.rows)
            slabs.finish({w: tmp / schema.WINDOW_FILES[w] for w in schema.WINDOWS}, lambda k: progress.advance(task, k))
            shutil.rmtree(tmp / ".scratch")
            lap("train/validation/test in time order", slabs.rows)

        checks = run.checks
        rejects = {reason: run.rejects.counts.get(reason, 0) for reason in schema.REJECT_REASONS}
        rows = {w: slabs.window_rows(w) for w in schema.WINDOWS}  # window -> task -> rows
        for w in ("validation", "test"):  # logged, not a summary warning: those are about rejected rows
            if slabs.rows and not sum(rows[w].values()):
                log.warning("the %s window is empty: %s; change --%s-fraction%s.", w,
                            "no user has enough engagements (or no row has a user_id) for the per-user split"
                            if config.split == "per-user" else "no log row falls in it", w,
                            f" or --{w}-from" if config.split == "global" else "")
        image_dim = checks.image_dim or 0
        counts = {
            "products": run.products, "catalog_rows": sum(s.rows_read for s in run.stats if s.role == "catalog"),
            "log_rows": sum(s.rows_read for s in run.stats if s.role == "logs"),
            "rejects": rejects, "rejected": sum(rejects.values()), "rejects_written": run.rejects.written,
            **{f"{w}_rows": rows[w] for w in schema.WINDOWS}, **{w: sum(rows[w].values()) for w in schema.WINDOWS},
            "gap_rows": slabs.gap_rows, "no_user_train_rows": slabs.no_user_train_rows,
            "image_dim": image_dim, "query_dims": dict(checks.query_dims), "images_truncated": checks.images_truncated,
            "vocab_size": len(vocab), "unreadable_products": unreadable,
        }
        windows_from = {"validation_from": iso(split_ms[0]), "test_from": iso(split_ms[1])} if split_ms else \
            {"validation_from": None, "test_from": None}
        manifest_config = {**to_dict(config), **windows_from,
                           "split_rule": ("per-user" if config.split == "per-user" else
                                          "given" if config.validation_from is not None else "fractions"),
                           "text_columns": list(text_columns), "catalog": str(catalog), "logs": str(logs)}
        inputs = {str(s.path): fingerprint(s.path, config.sha256_max_bytes) for s in catalog_sources + log_sources}
        artifacts.write_manifest(tmp, "dataset", config=manifest_config, inputs=inputs, counts=counts,
                                 extra={"input_files": {"catalog": [str(s.path) for s in catalog_sources],
                                                        "logs": [str(s.path) for s in log_sources]},
                                        "warnings": warnings, schema.PRODUCT_QUERY: product_query_entry})
        lap("manifest", None)
        publish(tmp, out)
    except BaseException:  # nothing half-written survives, not even on Ctrl-C
        if slabs is not None:
            slabs.close()
        if run is not None:
            run.rejects.file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    files = [out / name for name in (schema.PRODUCTS_FILE, schema.TRAIN_FILE, schema.VALIDATION_FILE,
                                     schema.TEST_FILE, schema.REJECTS_FILE, schema.VOCAB_FILE, artifacts.MANIFEST)]
    summary = IngestSummary(out=out, inputs=run.stats, rejects=rejects, products=run.products,
                            train_rows=rows["train"], validation_rows=rows["validation"], test_rows=rows["test"],
                            split=config.split, validation_from=windows_from["validation_from"],
                            test_from=windows_from["test_from"], gap_rows=slabs.gap_rows,
                            image_dim=image_dim, query_dims=dict(checks.query_dims),
                            images_truncated=checks.images_truncated, files=files, warnings=warnings,
                            rejects_written=run.rejects.written, unreadable=unreadable,
                            product_query=product_query_entry)
    log.info("ingest: %d products, %d train, %d validation and %d test rows (%d dropped in the gap), "
             "%d rejected rows -> %s", summary.products, counts["train"], counts["validation"], counts["test"],
             slabs.gap_rows, summary.rejected, out)
    return summary
