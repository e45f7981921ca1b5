"""Row checks for `itemsage ingest`: every row kept or given exactly one reject reason
(docs/ARCHITECTURE.md), on columns data/normalise.py has already brought to one Arrow type each.
Internal to data/ingest.py, which reads the files (data/readers.py), writes the rejects and the
dataset, and documents the rules a user sees; `check_products` runs the catalog checks alone (for
`itemsage embed --catalog`, the Python API and `/v1/embed`).

Everything here works on one batch at a time and is vectorised with pyarrow and numpy: a log batch
costs no Python loop over its rows except where a row is rejected (its detail message) or its values
came as JSON (Python objects already). The state a check carries across batches (ids seen, widths
fixed so far, the image encoder) lives in `RowChecks`; it is O(products), never O(log rows).
"""

from __future__ import annotations

import bisect
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from itemsage import schema
from itemsage.data.normalise import (
    LOG_SCHEMA,
    Errors,
    canonical,
    catalog_kinds,
    products_schema,
    raw_records,
    unicode_problem,
)
from itemsage.data.readers import Source, catalog_sources, check_schema
from itemsage.data.row_arrays import (
    Rejector,
    codes,
    content_hash,
    filled,
    member,
    nested,
    present,
    take_column,
    take_rows,
    vector_stats,
)

log = logging.getLogger(__name__)

TEXT_QUERY_DIM = 384  # all-MiniLM-L6-v2; used when itemsage.encoders.text cannot be imported


def _resolve(base: Path, path: str) -> Path:
    """Relative image paths are relative to the directory of the file that names them."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _image_error(path: str, error: str) -> str:
    return error if path in error else f"could not read image {path}: {error}"


def _text_query_dim() -> int:
    try:
        from itemsage.encoders.text import TextQueryEncoder

        return int(TextQueryEncoder.dim)
    except ImportError:
        return TEXT_QUERY_DIM


def _query_width_detail(surface: str, got: int, expected: int, text_only: bool, image_only: bool,
                        origin: str, product_only: bool = False) -> str:
    what = ("query_text stands for a {g}-d text-encoder vector" if text_only else
            "query_product_id stands for the product's {g}-d frozen query vector" if product_only else
            "query_image_path encodes to a {g}-d image vector" if image_only else
            "query_embedding has width {g}").format(g=got)
    return (f"{what}, but {surface} query vectors in this dataset are {expected}-d, fixed by the first "
            f"valid {surface} row ({origin}); give all {surface} rows query vectors of one width "
            f"(if that first row is the odd one, fix or remove it)")


# ------------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------------


class RowChecks:
    """Checks catalog and log batches. Holds what a check needs from earlier batches: the product ids
    seen and kept, the image and query widths fixed so far, and the image encoder (loaded on first use)."""

    def __init__(self, *, text_columns: Sequence[str], max_images: int, image_dim: int | None,
                 image_batch_size: int, image_encoder: Any = None, model_image_dim: bool = False):
        self.text_columns = tuple(text_columns)
        self.max_images = max_images
        self.image_dim = image_dim
        self.image_dim_given = image_dim is not None
        self.model_image_dim = model_image_dim  # image_dim is a trained model's (not ingest's --image-dim)
        self.image_batch_size = image_batch_size
        self._image_encoder = image_encoder
        # product id -> catalog row number counted over all catalog files (see `_catalog_row`)
        self.seen_ids: dict[str, int] = {}
        self.kept_ids: set[str] = set()
        self.first_rejected: dict[str, str] = {}  # id -> reject reason of its first row (rejected ones only)
        self._file_starts: list[int] = []  # catalog row number of each catalog file's first row
        self._file_names: list[str] = []
        self._catalog_rows = 0
        self.image_dim_origin: str | None = None  # "<file> row <r>" of the vector that fixed image_dim
        self.query_dims: dict[str, int] = {}
        self.query_dim_origins: dict[str, str] = {}  # surface -> "<file> row <r>" that fixed its width
        self.images_truncated = 0
        # The kept products' frozen query vectors (set by ingest after the catalog pass): a log row's
        # query_product_id -> its row in `product_query_vectors` [P, Dq].
        self.product_query_rows: dict[str, int] = {}
        self.product_query_vectors = np.zeros((0, 0), np.float32)

    def _catalog_row(self, number: int) -> str:
        """ "<file> row <r>" of a catalog row number (one int per id is all `seen_ids` holds)."""
        k = bisect.bisect_right(self._file_starts, number) - 1
        return f"{self._file_names[k]} row {number - self._file_starts[k]}"

    # -- the image encoder

    def image_encoder(self) -> Any:
        if self._image_encoder is None:
            from itemsage.encoders.image import ImageEncoder

            self._image_encoder = ImageEncoder()
        return self._image_encoder

    def image_encoder_dim(self) -> int:
        if self._image_encoder is not None:
            return int(self._image_encoder.dim)
        from itemsage.encoders.image import ImageEncoder

        return int(ImageEncoder.dim)

    def encode_images(self, paths: list[str]) -> tuple[np.ndarray, list[str | None]]:
        vectors, errors = self.image_encoder().encode_paths(paths, batch_size=self.image_batch_size, progress=False)
        return np.asarray(vectors, dtype=np.float32), list(errors)

    # -- catalog

    def catalog_batch(self, base: Path, n: int, cols: dict[str, pa.Array], errors: dict[str, Errors],
                      rej: Rejector, *, source: Path | str | None = None, start: int = 0,
                      unreadable_extras: Errors | None = None) -> pa.Table:
        """Check one catalog batch (rejections land in `rej`) and return its kept products in
        `products_schema` order. `base`: the directory relative image paths are resolved against;
        `source` and `start`: the file and the batch's first row in it, named in reject details;
        `unreadable_extras`: rows whose extra columns hold text UTF-8 cannot store."""
        max_images = self.max_images
        name = str(source) if source is not None else str(base)
        if not self._file_names or self._file_names[-1] != name:
            self._file_starts.append(self._catalog_rows - start)
            self._file_names.append(name)
        first_number = self._file_starts[-1] + start  # catalog row number of this batch's row 0
        self._catalog_rows = first_number + n
        ids = cols[schema.PRODUCT_ID].to_pylist()
        rej.reject_errors(errors[schema.PRODUCT_ID], "missing_product_id")
        rej.reject(~present(cols[schema.PRODUCT_ID]), "missing_product_id", "product_id is missing or empty")
        duplicate = np.zeros(n, bool)
        for r in np.flatnonzero(rej.alive):  # the first row with an id claims it, kept or not
            if ids[r] in self.seen_ids:
                duplicate[r] = True
            else:
                self.seen_ids[ids[r]] = first_number + int(r)
        rej.reject(duplicate, "duplicate_product_id", "")  # the detail is written below, once the first rows' fate is known
        for f in self.text_columns:  # text UTF-8 cannot hold (a lone surrogate, invalid bytes)
            rej.reject_errors(errors.get(f, {}), "bad_text_encoding")
        if unreadable_extras:
            rej.reject_errors(unreadable_extras, "bad_text_encoding")
        if schema.LISTED_AT in errors:  # optional; absent from callers that pass their own kinds
            rej.reject_errors({r: (None, f"listed_at: {d}") for r, (_, d) in errors[schema.LISTED_AT].items()},
                              "bad_timestamp")

        # Given image vectors: cut to max_images, then NaN/inf. [I] below = all image vectors of the batch.
        rej.reject_errors(errors[schema.IMAGE_EMBEDDINGS], "non_finite_vector")
        given = cols[schema.IMAGE_EMBEDDINGS]
        given_counts = filled(pc.list_value_length(given), 0)  # [n] before the cut
        if given_counts.max(initial=0) > max_images:
            given = pc.list_slice(given, 0, max_images)
        given_kept = np.minimum(given_counts, max_images)  # [n]
        inner = pc.list_flatten(given)  # [I] list<float32>
        inner_row = pc.list_parent_indices(given).to_numpy()  # [I] row of each vector
        widths, vec_bad, values = vector_stats(inner)  # [I], [I], flat values
        row_nonfinite = np.bincount(inner_row[vec_bad], minlength=n) > 0
        rej.reject(row_nonfinite, "non_finite_vector",
                   lambda r: f"image vector {int(np.flatnonzero(vec_bad[inner_row == r])[0])} contains NaN or inf")

        # Image files, for products without given vectors.
        rej.reject_errors(errors[schema.IMAGE_PATHS], "unreadable_image")
        paths_col = cols[schema.IMAGE_PATHS]
        path_counts = filled(pc.list_value_length(paths_col), 0)
        use_paths = rej.alive & (given_counts == 0) & (path_counts > 0)
        encoded: dict[int, np.ndarray] = {}  # row -> [m, D] vectors of its image files
        if use_paths.any():
            rows = np.flatnonzero(use_paths)
            row_paths = [[str(_resolve(base, p)) for p in paths_col[int(r)].as_py()[:max_images]] for r in rows]
            vectors, errs = self.encode_images([p for ps in row_paths for p in ps])
            failed: dict[int, str] = {}
            at = 0
            for r, ps in zip(rows, row_paths):
                bad = [_image_error(p, e) for p, e in zip(ps, errs[at:at + len(ps)]) if e is not None]
                if bad:
                    failed[int(r)] = bad[0]
                else:
                    encoded[int(r)] = vectors[at:at + len(ps)]
                at += len(ps)
            rej.reject(np.isin(np.arange(n), list(failed)), "unreadable_image", lambda r: failed[r])
        image_counts = np.where(use_paths, path_counts, given_counts)  # [n] before the cut

        # Image width: the first valid vector (in row order) fixes it, unless configured.
        alive = rej.alive
        if self.image_dim is None:
            firsts = []
            candidates = np.flatnonzero(~vec_bad & (widths > 0) & alive[inner_row])
            if len(candidates):
                firsts.append((int(inner_row[candidates[0]]), int(widths[candidates[0]])))
            firsts += [(r, v.shape[1]) for r, v in encoded.items() if alive[r]][:1]
            if firsts:
                row, self.image_dim = min(firsts)
                self.image_dim_origin = f"{name} row {start + row}"
                log.info("image width %d, fixed by the first valid image vector (%s)", self.image_dim,
                         self.image_dim_origin)
        dim = self.image_dim
        # With no width yet, every vector an alive row has is empty (width 0): wrong too.
        wrong = np.bincount(inner_row[(widths != dim) if dim is not None else (widths == 0)], minlength=n) > 0
        for r, v in encoded.items():
            wrong[r] |= v.shape[1] != dim
        rej.reject(wrong, "bad_vector_width", lambda r: self._image_width_detail(r, encoded, widths, inner_row))

        # Kept products: text lists, images [m, D], content hash.
        keep = rej.alive
        keep_rows = np.flatnonzero(keep)
        self.kept_ids.update(ids[r] for r in keep_rows)
        for r in np.flatnonzero(~keep & (rej.code >= 0)):  # first rows that were rejected: duplicates say so
            if ids[r] is not None and self.seen_ids.get(ids[r]) == first_number + int(r):
                self.first_rejected[ids[r]] = schema.REJECT_REASONS[rej.code[r]]
        for r in np.flatnonzero(duplicate & (rej.code == schema.REJECT_REASONS.index("duplicate_product_id"))):
            rej.details[int(r)] = self._duplicate_detail(ids[r])
        self.images_truncated += int((image_counts[keep] > max_images).sum())
        mask = pa.array(keep)
        texts = {f: cols[f].filter(mask) for f in self.text_columns}
        text_lists = [texts[f].to_pylist() for f in self.text_columns]
        starts = np.concatenate([[0], np.cumsum(given_kept)])  # first vector of each row in [I]
        vec_starts = np.concatenate([[0], np.cumsum(widths)])  # first value of each vector
        blocks, hashes = [], []
        for j, r in enumerate(keep_rows):
            if r in encoded:
                block = encoded[r]
            elif given_kept[r]:
                a, b = vec_starts[starts[r]], vec_starts[starts[r + 1]]
                block = values[a:b].reshape(given_kept[r], dim)
            else:
                block = np.zeros((0, dim or 0), np.float32)
            blocks.append(block)
            hashes.append(content_hash([t[j] for t in text_lists], block))
        columns = {schema.PRODUCT_ID: cols[schema.PRODUCT_ID].filter(mask), **texts,
                   schema.IMAGE_EMBEDDINGS: nested(blocks, dim or 0),
                   schema.CONTENT_HASH: pa.array(hashes, pa.string())}
        return pa.table(columns).cast(products_schema(self.text_columns))

    def _duplicate_detail(self, pid: str) -> str:
        first = self._catalog_row(self.seen_ids[pid])
        if pid in self.first_rejected:
            return (f"product_id {pid!r} appeared first at {first}, which was itself rejected "
                    f"({self.first_rejected[pid]}); the first row with an id claims it, so no row with this id "
                    f"is kept. Fix or remove that first row")
        return f"product_id {pid!r} appeared first at {first}, which is the one kept"

    def _image_width_detail(self, r: int, encoded: dict[int, np.ndarray], widths: np.ndarray,
                            inner_row: np.ndarray) -> str:
        if self.model_image_dim:  # a model's width: no flag changes it (embed --catalog, the API, /v1/embed)
            width = f"this model's image width is {self.image_dim} (the width of the image vectors it was trained on)"
        elif self.image_dim_given:
            width = f"the dataset's image width is {self.image_dim}, set by --image-dim (ingest.image_dim)"
        else:
            width = (f"the dataset's image width is {self.image_dim}, fixed by the first valid image vector, at "
                     f"{self.image_dim_origin}. If that row is the odd one, fix or remove it, or choose the width "
                     "with --image-dim N (ingest.image_dim)")
        if r in encoded:
            return f"image files encode to {encoded[r].shape[1]}-d vectors, but {width}"
        row_widths = widths[inner_row == r]
        if self.image_dim is None:
            return f"image vector {int(np.flatnonzero(row_widths == 0)[0])} is empty"
        j = int(np.flatnonzero(row_widths != self.image_dim)[0])
        return f"image vector {j} has width {int(row_widths[j])}, but {width}"

    # -- logs

    def log_batch(self, where: Path, n: int, cols: dict[str, pa.Array], errors: dict[str, Errors],
                  rej: Rejector, *, start: int = 0) -> pa.Table:
        """Check one batch of log rows (rejections land in `rej`) and return its kept rows in
        LOG_SCHEMA. `where`: the file, whose directory relative image paths are resolved against;
        `start`: the batch's first row in it."""
        surface_col, engagement_col = cols[schema.SURFACE], cols[schema.ENGAGEMENT]
        surf = codes(surface_col, schema.SURFACES)  # [n] index into SURFACES, -1 = unknown
        eng = codes(engagement_col, schema.ENGAGEMENTS)  # [n]

        rej.reject_errors(errors[schema.PRODUCT_ID], "missing_product_id")
        rej.reject(~present(cols[schema.PRODUCT_ID]), "missing_product_id", "product_id is missing or empty")
        rej.reject_errors(errors[schema.SURFACE], "unknown_surface")
        rej.reject(surf < 0, "unknown_surface", lambda r: (
            f"surface {surface_col[r].as_py()!r} is not one of {', '.join(schema.SURFACES)}"))
        rej.reject_errors(errors[schema.ENGAGEMENT], "unknown_engagement")
        rej.reject(eng < 0, "unknown_engagement", lambda r: (
            f"engagement {engagement_col[r].as_py()!r} is not one of {', '.join(schema.ENGAGEMENTS)}"))
        rej.reject_errors(errors[schema.TIMESTAMP], "bad_timestamp")
        rej.reject(~filled(pc.is_valid(cols[schema.TIMESTAMP]), False), "bad_timestamp", "timestamp is missing")
        rej.reject_errors(errors[schema.WEIGHT], "bad_weight")
        rej.reject_errors(errors[schema.USER_ID], "bad_text_encoding")  # the only errors a user id can have
        weight = filled(cols[schema.WEIGHT], 1.0)
        rej.reject(~(np.isfinite(weight) & (weight >= 0)), "bad_weight",
                   lambda r: f"weight {weight[r]} must be a finite number >= 0")

        # The query: search needs text or a vector, closeup a vector, an image or a product, home a
        # vector or a product.
        rej.reject_errors(errors[schema.QUERY_TEXT], "missing_query")
        rej.reject_errors(errors[schema.QUERY_IMAGE_PATH], "unreadable_image")
        rej.reject_errors(errors[schema.QUERY_PRODUCT_ID], "unknown_query_product")
        rej.reject_errors(errors[schema.QUERY_EMBEDDING], "non_finite_vector")
        emb = cols[schema.QUERY_EMBEDDING]
        emb_len, emb_nonfinite, _ = vector_stats(emb)  # [n], [n]
        has_emb = emb_len > 0
        has_text = present(cols[schema.QUERY_TEXT])
        has_img = present(cols[schema.QUERY_IMAGE_PATH])
        query_pid = cols[schema.QUERY_PRODUCT_ID]
        has_pid = present(query_pid)
        is_search, is_closeup, is_home = (surf == schema.SURFACES.index(s) for s in ("search", "closeup", "home"))
        ok_query = ((is_search & (has_text | has_emb)) | (is_closeup & (has_emb | has_img | has_pid))
                    | (is_home & (has_emb | has_pid)))
        needs = {"search": "query_text or query_embedding",
                 "closeup": "query_embedding, query_image_path or query_product_id",
                 "home": "query_embedding or query_product_id"}
        rej.reject(~ok_query, "missing_query",
                   lambda r: f"a {schema.SURFACES[surf[r]]} row needs {needs[schema.SURFACES[surf[r]]]}")

        ids = cols[schema.PRODUCT_ID].to_pylist()
        rej.reject(~member(ids, self.kept_ids), "unknown_product",
                   lambda r: f"product_id {ids[r]!r} is not in the catalog (or its catalog row was rejected)")
        qids = query_pid.to_pylist()
        rej.reject(has_pid & ~member(qids, self.product_query_rows.keys()), "unknown_query_product",
                   lambda r: f"query_product_id {qids[r]!r} is not in the catalog (or its catalog row was rejected)")
        rej.reject(has_emb & emb_nonfinite, "non_finite_vector", "query_embedding contains NaN or inf")

        # Query width: the vector's length, or the width its encoder will give; one per surface. A
        # row with a query_embedding keeps it; else a query product stands for its frozen vector.
        implied = emb_len.copy()
        text_only = is_search & has_text & ~has_emb
        product_only = (is_closeup | is_home) & has_pid & ~has_emb
        image_only = is_closeup & has_img & ~has_emb & ~product_only
        implied[product_only] = self.product_query_vectors.shape[1]
        if (text_only & rej.alive).any():
            implied[text_only] = _text_query_dim()
        if (image_only & rej.alive).any():
            implied[image_only] = self.image_encoder_dim()
        alive = rej.alive
        for k, s in enumerate(schema.SURFACES):
            rows = np.flatnonzero(alive & (surf == k))
            if s not in self.query_dims and len(rows):
                self.query_dims[s] = int(implied[rows[0]])
                self.query_dim_origins[s] = f"{where} row {start + int(rows[0])}"
                log.info("%s query width %d, fixed by %s", s, self.query_dims[s], self.query_dim_origins[s])
        # [n] the surface's width; the extra last entry (-1) is read by surf == -1
        expected = np.array([self.query_dims.get(s, -1) for s in schema.SURFACES] + [-1], np.int64)[surf]
        rej.reject(implied != expected, "bad_vector_width", lambda r: _query_width_detail(
            schema.SURFACES[surf[r]], int(implied[r]), int(expected[r]), bool(text_only[r]), bool(image_only[r]),
            self.query_dim_origins[schema.SURFACES[surf[r]]], bool(product_only[r])))

        # Query products: their frozen vectors become the rows' query_embedding.
        named = product_only & rej.alive
        if named.any():
            rows = np.flatnonzero(named)
            at = np.fromiter((self.product_query_rows[qids[r]] for r in rows), np.int64, count=len(rows))
            take = np.arange(n)
            take[rows] = n + np.arange(len(rows))
            new = pa.array(list(self.product_query_vectors[at]), pa.list_(pa.float32()))
            emb = take_column(pa.concat_arrays([emb, new]), pa.array(take))

        # Closeup image queries: encode now, store as query_embedding.
        encode = image_only & rej.alive
        if encode.any():
            rows = np.flatnonzero(encode)
            paths_col = cols[schema.QUERY_IMAGE_PATH]
            paths = [str(_resolve(where.parent, paths_col[int(r)].as_py())) for r in rows]
            vectors, errs = self.encode_images(paths)
            failed = {int(r): _image_error(p, e) for r, p, e in zip(rows, paths, errs) if e is not None}
            rej.reject(np.isin(np.arange(n), list(failed)), "unreadable_image", lambda r: failed[r])
            # Splice the vectors in: take from [given rows ; encoded rows].
            take = np.arange(n)
            take[rows] = n + np.arange(len(rows))
            new = pa.array(list(vectors), pa.list_(pa.float32())) if len(rows) else pa.nulls(0, emb.type)
            emb = take_column(pa.concat_arrays([emb, new]), pa.array(take))

        table = pa.Table.from_pydict({
            schema.SURFACE: surface_col, schema.ENGAGEMENT: engagement_col,
            schema.PRODUCT_ID: cols[schema.PRODUCT_ID],
            schema.TIMESTAMP: cols[schema.TIMESTAMP].cast(pa.timestamp("ms", tz="UTC")),
            schema.USER_ID: cols[schema.USER_ID],
            schema.WEIGHT: pa.array(weight.astype(np.float32)),
            schema.QUERY_TEXT: cols[schema.QUERY_TEXT],
            schema.QUERY_EMBEDDING: emb,
            schema.QUERY_PRODUCT_ID: query_pid,
        }).cast(LOG_SCHEMA)
        keep = rej.alive
        return table if keep.all() else take_rows(table, np.flatnonzero(keep))


# ------------------------------------------------------------------------------------------------
# A catalog checked alone (ingest's catalog pass, `itemsage embed --catalog`, the Python API)
# ------------------------------------------------------------------------------------------------


def reject_entries(src: Source, batch: Any, start: int, rej: Rejector,
                   room: Callable[[str], int] | None = None) -> list[dict[str, Any]]:
    """The rejects.jsonl entries of one checked batch: file, row, reason, detail and the input record.
    `room` (reason -> rows still wanted in full, data/rejects.py): the rows past it get no `record`
    (they are counted, not written), so a batch of mostly rejected rows does not copy them all."""
    rows = np.flatnonzero(~rej.alive).tolist()
    reasons = [schema.REJECT_REASONS[rej.code[r]] for r in rows]
    if room is None:
        full = rows
    else:
        left = {reason: room(reason) for reason in set(reasons)}
        full = []
        for r, reason in zip(rows, reasons):
            if left[reason] > 0:
                full.append(r)
                left[reason] -= 1
    records = dict(zip(full, raw_records(src.fmt, batch, np.array(full, np.int64))))
    return [{"file": str(src.path), "row": start + r, "reason": reason, "detail": rej.details[r],
             **({"record": records[r]} if r in records else {})} for r, reason in zip(rows, reasons)]


def check_catalog_batch(checks: RowChecks, src: Source, start: int, batch: Any,
                         kinds: dict[str, str]) -> tuple[int, pa.Table, Rejector, pa.Array | None]:
    """(rows read, kept products in `products_schema` order, the rejections, the kept rows' `listed_at`
    as UTC timestamps or None when the batch gives none) of one catalog batch."""
    n, cols, errors = canonical(src.fmt, batch, kinds)
    rej = Rejector(n)
    extras: Errors = {}
    if src.fmt != "parquet":  # extra JSON fields are kept as they came: they must be storable text too
        for r, record in enumerate(batch):
            why = next(((k, w) for k, v in record.items() if k not in kinds and (w := unicode_problem([k, v]))), None)
            if why:
                extras[r] = (None, f"{why[0]}: {why[1]}")
    table = checks.catalog_batch(src.path.parent, n, cols, errors, rej, source=src.path, start=start,
                                 unreadable_extras=extras)
    listed = cols.get(schema.LISTED_AT)
    if listed is None or listed.null_count == len(listed):
        return n, table, rej, None
    return n, table, rej, listed.filter(pa.array(rej.alive)).cast(pa.timestamp("ms", tz="UTC"))


def check_products(
    catalog: Any, *, text_fields: Sequence[str] = schema.TEXT_FIELDS, image_dim: int | None = None,
    max_images: int = schema.MAX_IMAGES, batch_rows: int = 65_536, image_batch_size: int = 32,
    image_encoder: Any = None, option: str | None = None, room: Callable[[str], int] | None = None,
) -> Iterator[tuple[pa.Table, list[dict[str, Any]]]]:
    """Validate a catalog alone, with ingest's own checks: yields, per batch, (kept products in
    products.parquet's schema with their content_hash, rejects.jsonl entries of the batch).

    `catalog` is anything `catalog_sources` reads (`option`: the flag that named a path, default
    --catalog; "" for the Python API). `image_dim` given (a model's image width) rejects image vectors
    of another width, as `--image-dim` does in ingest. Raises DataError for a catalog
    that cannot be used at all (missing product_id, a column of the wrong type, no rows). Relative
    `image_paths` resolve against the file's directory, or the working directory for data in memory.
    `room`: as `reject_entries`'s (the rows past it come without their record).
    """
    text_columns = schema.TEXT_FIELDS + tuple(f for f in text_fields if f not in schema.TEXT_FIELDS)
    kinds = catalog_kinds(text_columns)
    sources = catalog_sources(catalog, option)
    for src in sources:
        check_schema(src, kinds, [schema.PRODUCT_ID])
    checks = RowChecks(text_columns=text_columns, max_images=max_images, image_dim=image_dim,
                       image_batch_size=image_batch_size, image_encoder=image_encoder,
                       model_image_dim=image_dim is not None)
    for src in sources:
        for start, batch in src.batches(batch_rows):
            _, table, rej, _ = check_catalog_batch(checks, src, start, batch, kinds)
            yield table, reject_entries(src, batch, start, rej, room)
