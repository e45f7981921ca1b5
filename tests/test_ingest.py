"""itemsage ingest: row rejections, file refusals, the time split, the dataset files and manifest.

Every case runs on tiny tables written in tmp_path, as Parquet and as JSON Lines. Expected values are
written out by hand (which row, which reason, which split), or recomputed independently (sha256 with
hashlib, a sort with Python's `sorted`, image vectors with one-at-a-time encoding).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from itemsage import schema
from itemsage.config import ConfigError
from itemsage.data.ingest import DataError, IngestConfig, content_hash, ingest

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 1, 1, tzinfo=UTC)
SMALL = dict(max_unigrams=1000, max_bigrams=1000, max_trigrams=1000, progress=False)


def iso(hours: float) -> str:
    return (T0 + dt.timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


def catalog_rows() -> list[dict]:
    return [
        {"product_id": "p1", "title": "Oak chair", "brand": "Acme", "colors": ["brown", "red"],
         "image_embeddings": [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], "price": 10},
        {"product_id": "p2", "title": "Pine table", "brand": None, "colors": [],
         "image_embeddings": [[0.0, 0.0, 1.0, 0.0]], "price": 20},
        {"product_id": "p3", "title": "Linen sofa", "brand": "Sofaco", "colors": ["white"],
         "image_embeddings": [[0.5, 0.5, 0.5, 0.5]], "price": 30},
    ]


def log_rows() -> list[dict]:
    q = [0.1, 0.2, 0.3, 0.4]
    return [
        {"surface": "search", "engagement": "click", "product_id": "p1", "timestamp": iso(0),
         "query_text": "oak chair", "query_embedding": None, "weight": None, "user_id": "u1"},
        {"surface": "closeup", "engagement": "save", "product_id": "p2", "timestamp": iso(5),
         "query_text": None, "query_embedding": q, "weight": 2.0, "user_id": "u2"},
        {"surface": "home", "engagement": "checkout", "product_id": "p3", "timestamp": iso(10),
         "query_text": None, "query_embedding": [0.5, 0.5], "weight": 1.0, "user_id": None},
        {"surface": "search", "engagement": "add_to_cart", "product_id": "p2", "timestamp": iso(8),
         "query_text": "table", "query_embedding": None, "weight": 0.0, "user_id": "u1"},
    ]


def write(rows: list[dict], path: Path, table: pa.Table | None = None) -> Path:
    """rows as JSON Lines (NaN written as NaN) or as Parquet, by the path's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table if table is not None else pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path: Path, fmt: str, catalog: list[dict] | None = None, logs: list[dict] | None = None, **cfg):
    cat = write(catalog if catalog is not None else catalog_rows(), tmp_path / f"in/catalog.{fmt}")
    lg = write(logs if logs is not None else log_rows(), tmp_path / f"in/logs.{fmt}")
    out = tmp_path / "ds"
    summary = ingest(cat, lg, out, IngestConfig(**{**SMALL, **cfg}))
    return summary, out


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / schema.REJECTS_FILE).read_text().splitlines()]


def check_conservation(summary) -> None:
    for s in summary.inputs:
        assert s.rows_kept + s.rows_rejected == s.rows_read, s


FORMATS = ["parquet", "jsonl"]


# ---- happy path -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_happy_path_writes_the_dataset(tmp_path, fmt):
    summary, out = run(tmp_path, fmt, validation_from=iso(6), test_from=iso(9))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["products.parquet", "train.parquet", "validation.parquet", "test.parquet", "rejects.jsonl", "vocab.json",
         "manifest.json"])
    assert rejects(out) == []
    assert summary.rejected == 0 and summary.products == 3
    check_conservation(summary)

    products = pq.read_table(out / schema.PRODUCTS_FILE)
    assert products.column("product_id").to_pylist() == ["p1", "p2", "p3"]
    for field in schema.TEXT_FIELDS:
        assert products.schema.field(field).type == pa.list_(pa.string())
    assert products.column("title").to_pylist() == [["Oak chair"], ["Pine table"], ["Linen sofa"]]
    assert products.column("brand").to_pylist() == [["Acme"], [], ["Sofaco"]]
    assert products.column("description").to_pylist() == [[], [], []]
    assert products.column("image_embeddings").to_pylist()[0] == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert products.column("price").to_pylist() == [10, 20, 30]  # extra column kept

    train = pq.read_table(out / schema.TRAIN_FILE)
    validation = pq.read_table(out / schema.VALIDATION_FILE)
    test = pq.read_table(out / schema.TEST_FILE)
    assert train.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")
    assert train.schema.field("weight").type == pa.float32()
    # timestamps 0, 5, 10, 8 h; validation from 6 h, test from 9 h; each file sorted by time
    assert train.column("product_id").to_pylist() == ["p1", "p2"]
    assert validation.column("product_id").to_pylist() == ["p2"]
    assert test.column("product_id").to_pylist() == ["p3"]
    assert train.column("weight").to_pylist() == [1.0, 2.0]  # missing weight -> 1.0
    assert validation.column("weight").to_pylist() == [0.0] and test.column("weight").to_pylist() == [1.0]
    assert train.column("user_id").to_pylist() == ["u1", "u2"]
    assert summary.train_rows["search.click"] == 1 and summary.train_rows["closeup.save"] == 1
    assert summary.validation_rows["search.add_to_cart"] == 1 and summary.test_rows["home.checkout"] == 1
    assert sum(summary.train_rows.values()) == 2
    assert sum(summary.validation_rows.values()) == 1 and sum(summary.test_rows.values()) == 1
    assert summary.image_dim == 4
    assert summary.query_dims == {"search": 384, "closeup": 4, "home": 2}

    from itemsage.data.text import Vocabulary

    vocab = Vocabulary.load(out / schema.VOCAB_FILE)
    assert "oak" in vocab.unigrams and "linen#sofa" in vocab.bigrams and "acme" in vocab.unigrams


def test_content_hash_follows_the_documented_recipe(tmp_path):
    _, out = run(tmp_path, "jsonl", validation_from=iso(6), test_from=iso(9))
    products = pq.read_table(out / schema.PRODUCTS_FILE).to_pylist()
    p1 = products[0]
    texts = [p1[f] for f in schema.TEXT_FIELDS]
    images = np.array(p1["image_embeddings"], dtype="<f4")
    h = hashlib.sha256(json.dumps(texts, ensure_ascii=False, separators=(",", ":")).encode())
    h.update(b"\nimages:2x4\n" + images.tobytes())
    assert p1["content_hash"] == h.hexdigest() == content_hash(texts, images)
    assert len({p["content_hash"] for p in products}) == 3
    changed = [list(t) for t in texts]
    changed[0] = ["Oak chair!"]
    assert content_hash(changed, images) != p1["content_hash"]


# ---- row-level rejections ---------------------------------------------------------------------


def only_reject(out: Path, reason: str, row: int, file_name: str) -> dict:
    found = rejects(out)
    assert [(r["reason"], r["row"]) for r in found] == [(reason, row)], found
    assert Path(found[0]["file"]).name == file_name and found[0]["detail"]
    return found[0]


CATALOG_CASES = {
    "missing_id_null": ({"product_id": None, "title": "x"}, "missing_product_id"),
    "missing_id_empty": ({"product_id": "  ", "title": "x"}, "missing_product_id"),
    "duplicate": ({"product_id": "p1", "title": "second p1"}, "duplicate_product_id"),
    "wrong_width": ({"product_id": "p9", "image_embeddings": [[1.0, 2.0, 3.0]]}, "bad_vector_width"),
    "nan_vector": ({"product_id": "p9", "image_embeddings": [[1.0, math.nan, 0.0, 0.0]]}, "non_finite_vector"),
    "inf_vector": ({"product_id": "p9", "image_embeddings": [[1.0, 0.0, 0.0, 0.0], [math.inf, 0, 0, 0]]},
                   "non_finite_vector"),
    "bad_listed_at": ({"product_id": "p9", "title": "x", "listed_at": "last spring"}, "bad_timestamp"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(CATALOG_CASES))
def test_catalog_row_rejections(tmp_path, fmt, case):
    bad, reason = CATALOG_CASES[case]
    rows = [{**dict.fromkeys(bad), **r} for r in catalog_rows()]
    rows.insert(2, {**{k: None for k in rows[0]}, **bad})  # every column present, for Parquet
    summary, out = run(tmp_path, fmt, catalog=rows, validation_from=iso(6), test_from=iso(9))
    entry = only_reject(out, reason, 2, f"catalog.{fmt}")
    assert entry["record"]["product_id"] == bad["product_id"]
    assert summary.rejects[reason] == 1 and summary.rejected == 1
    assert summary.inputs[0].rows_read == 4 and summary.inputs[0].rows_kept == 3
    check_conservation(summary)
    products = pq.read_table(out / schema.PRODUCTS_FILE)
    assert products.column("product_id").to_pylist() == ["p1", "p2", "p3"]
    assert products.column("title").to_pylist()[0] == ["Oak chair"]  # the first p1 is the one kept
    assert kept_rows(out) == 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_listed_at_is_kept_as_a_utc_timestamp(tmp_path, fmt):
    rows = catalog_rows()
    epoch_s = 1_704_074_400 if fmt == "jsonl" else iso(2)  # a Parquet column holds one type
    rows[0]["listed_at"], rows[1]["listed_at"], rows[2]["listed_at"] = iso(3), None, epoch_s
    summary, out = run(tmp_path, fmt, catalog=rows, validation_from=iso(6), test_from=iso(9))
    assert summary.rejected == 0
    listed = pq.read_table(out / schema.PRODUCTS_FILE).column(schema.LISTED_AT)
    assert listed.type == pa.timestamp("ms", tz="UTC")
    assert listed.to_pylist() == [T0 + dt.timedelta(hours=3), None, T0 + dt.timedelta(hours=2)]


def test_image_dim_option_fixes_the_width(tmp_path):
    rows = catalog_rows()
    rows[0]["image_embeddings"] = [[1.0, 2.0]]  # p1 has 2-d vectors, p2 and p3 4-d: with --image-dim 2 they go
    summary, out = run(tmp_path, "jsonl", catalog=rows, image_dim=2, validation_from=iso(6), test_from=iso(9))
    assert summary.rejects["bad_vector_width"] == 2 and summary.products == 1
    assert "--image-dim" in rejects(out)[0]["detail"]


def test_an_odd_first_row_fixes_the_width_and_the_run_warns(tmp_path):
    rows = catalog_rows()
    rows[0]["image_embeddings"] = [[1.0, 2.0]]  # p1 (row 0) is the odd one: 2-d, the others 4-d
    summary, out = run(tmp_path, "jsonl", catalog=rows, validation_from=iso(6), test_from=iso(9))
    found = rejects(out)
    widths = [r for r in found if r["reason"] == "bad_vector_width"]
    assert [r["row"] for r in widths] == [1, 2]
    detail = widths[0]["detail"]
    assert "width is 2" in detail and "catalog.jsonl row 0" in detail and "--image-dim" in detail
    # 2 of 3 catalog rows and 3 of 4 log rows (p2, p3 unknown) rejected: one warning each, in the summary
    assert len(summary.warnings) == 2
    assert "2 of 3 catalog rows" in summary.warnings[0] and "bad_vector_width" in summary.warnings[0]
    assert "3 of 4 log rows" in summary.warnings[1] and "unknown_product" in summary.warnings[1]
    assert all(str(out / schema.REJECTS_FILE) in w for w in summary.warnings)
    assert json.loads((out / "manifest.json").read_text())["warnings"] == summary.warnings

    from rich.console import Console

    console = Console(width=1000, record=True)
    from itemsage.data.ingest import summary_table

    console.print(summary_table(summary))
    assert console.export_text().startswith("WARNING: 2 of 3 catalog rows")


def test_no_warning_when_at_most_half_is_rejected(tmp_path):
    rows = catalog_rows() + [{"product_id": "p9", "image_embeddings": [[1.0]]}]  # 1 of 4 rejected
    summary, _ = run(tmp_path, "jsonl", catalog=rows, validation_from=iso(6), test_from=iso(9))
    assert summary.rejected == 1 and summary.warnings == []


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_all_catalog_rows_rejected_is_refused_and_nothing_is_written(tmp_path, fmt):
    # every catalog row has 4-d vectors, the option says 2: nothing could be trained on
    with pytest.raises(DataError) as err:
        run(tmp_path, fmt, image_dim=2, validation_from=iso(6), test_from=iso(9))
    message = str(err.value)
    assert "every one of the 3 catalog rows was rejected" in message and "bad_vector_width (3)" in message
    assert "nothing was written" in message and "--image-dim" in message  # the first detail says how to fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no dataset, no temp directory


def test_all_log_rows_rejected_is_refused_and_nothing_is_written(tmp_path):
    logs = [dict(r, product_id="p9") for r in log_rows()]  # no such product
    with pytest.raises(DataError) as err:
        run(tmp_path, "parquet", logs=logs, validation_from=iso(6), test_from=iso(9))
    assert "every one of the 4 log rows was rejected" in str(err.value)
    assert "unknown_product (4)" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_cli_refuses_an_all_rejected_logs_file_with_one_message(tmp_path):
    from typer.testing import CliRunner

    from itemsage.cli import app

    cat = write(catalog_rows(), tmp_path / "in/catalog.jsonl")
    lg = write([dict(r, product_id="p9") for r in log_rows()], tmp_path / "in/logs.jsonl")
    result = CliRunner().invoke(app, ["ingest", "--catalog", str(cat), "--logs", str(lg), "--out",
                                      str(tmp_path / "ds"), "--no-progress"])
    assert result.exit_code != 0
    assert result.output.count("every one of the 4 log rows was rejected") == 1, result.output
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_small_integer_timestamps_warn(tmp_path, fmt):
    logs = [dict(r, timestamp=i + 1) for i, r in enumerate(log_rows())]  # 1, 2, 3, 4: a counter, not epoch
    summary, _ = run(tmp_path, fmt, logs=logs)
    assert len(summary.warnings) == 1
    assert "numbers and all read as times before 1990" in summary.warnings[0]
    assert "1970-01-01T00:00:01Z" in summary.warnings[0] and "1970-01-01T00:00:04Z" in summary.warnings[0]


def test_epoch_integer_timestamps_do_not_warn(tmp_path):
    base = int(T0.timestamp())  # 2024, as epoch seconds
    logs = [dict(r, timestamp=base + 3600 * i) for i, r in enumerate(log_rows())]
    summary, _ = run(tmp_path, "parquet", logs=logs)
    assert summary.warnings == []


def test_query_width_detail_names_surface_and_origin(tmp_path):
    rows = log_rows()
    rows.insert(3, log_row(query_embedding=[0.1, 0.2, 0.3]))  # closeup width fixed by row 1 (4-d)
    _, out = run(tmp_path, "parquet", logs=rows, validation_from=iso(6), test_from=iso(9))
    detail = only_reject(out, "bad_vector_width", 3, "logs.parquet")["detail"]
    assert "width 3" in detail and "closeup query vectors in this dataset are 4-d" in detail
    assert "logs.parquet row 1" in detail


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_detail_names_the_first_row_and_its_fate(tmp_path, fmt):
    rows = catalog_rows()
    rows[1]["image_embeddings"] = [[1.0, 2.0]]  # p2's first row (row 1) rejected: wrong width
    rows += [{**rows[1], "image_embeddings": [[0.0, 0.0, 0.0, 1.0]]},  # row 3: p2 again, valid
             {**rows[0], "title": "p1 again"}]  # row 4: p1 again; its first row is kept
    summary, out = run(tmp_path, fmt, catalog=rows, validation_from=iso(6), test_from=iso(9), batch_rows=2)  # first rows in earlier batches
    dups = {r["row"]: r["detail"] for r in rejects(out) if r["reason"] == "duplicate_product_id"}
    assert set(dups) == {3, 4}
    assert "'p2' appeared first at" in dups[3] and f"catalog.{fmt} row 1" in dups[3]
    assert "rejected (bad_vector_width)" in dups[3] and "no row with this id is kept" in dups[3]
    assert f"catalog.{fmt} row 0" in dups[4] and "the one kept" in dups[4] and "rejected" not in dups[4]
    # one batch: the first row's fate is only known at the batch's end, and must still be right
    _, out = run(tmp_path / "one", fmt, catalog=rows, validation_from=iso(6), test_from=iso(9))
    dups_one = {r["row"]: r["detail"] for r in rejects(out) if r["reason"] == "duplicate_product_id"}
    assert {k: v.replace(str(tmp_path / "one"), str(tmp_path)) for k, v in dups_one.items()} == dups


def test_more_than_max_images_are_cut_not_rejected(tmp_path):
    rows = catalog_rows()
    rows[1]["image_embeddings"] = [[float(i), 0.0, 0.0, 0.0] for i in range(25)]
    summary, out = run(tmp_path, "parquet", catalog=rows, validation_from=iso(6), test_from=iso(9))
    assert summary.rejected == 0 and summary.images_truncated == 1
    kept = pq.read_table(out / schema.PRODUCTS_FILE).column("image_embeddings").to_pylist()[1]
    assert kept == [[float(i), 0.0, 0.0, 0.0] for i in range(20)]
    assert json.loads((out / "manifest.json").read_text())["counts"]["images_truncated"] == 1


def log_row(**changes) -> dict:
    row = dict(log_rows()[1])  # a valid closeup row at 5 h
    row.update(changes)
    return row


LOG_CASES = {
    "missing_id": (log_row(product_id=None), "missing_product_id"),
    "empty_id": (log_row(product_id=""), "missing_product_id"),
    "unknown_surface": (log_row(surface="pins"), "unknown_surface"),
    "unknown_engagement": (log_row(engagement="like"), "unknown_engagement"),
    "unknown_product": (log_row(product_id="nope"), "unknown_product"),
    "bad_timestamp": (log_row(timestamp="yesterday"), "bad_timestamp"),
    "missing_timestamp": (log_row(timestamp=None), "bad_timestamp"),
    "search_no_query": (log_row(surface="search", query_embedding=None, query_text="  "), "missing_query"),
    "closeup_text_only": (log_row(query_embedding=None, query_text="a chair"), "missing_query"),
    "home_text_only": (log_row(surface="home", query_embedding=None, query_text="a chair"), "missing_query"),
    "query_width": (log_row(query_embedding=[0.1, 0.2, 0.3]), "bad_vector_width"),
    "search_vector_not_384": (log_row(surface="search", query_embedding=[0.1, 0.2]), "bad_vector_width"),
    "query_nan": (log_row(query_embedding=[0.1, math.nan, 0.3, 0.4]), "non_finite_vector"),
    "negative_weight": (log_row(weight=-1.0), "bad_weight"),
    "nan_weight": (log_row(weight=math.nan), "bad_weight"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(LOG_CASES))
def test_log_row_rejections(tmp_path, fmt, case):
    bad, reason = LOG_CASES[case]
    rows = log_rows()
    rows.insert(3, bad)
    summary, out = run(tmp_path, fmt, logs=rows, validation_from=iso(6), test_from=iso(9))
    only_reject(out, reason, 3, f"logs.{fmt}")
    assert summary.rejects[reason] == 1 and summary.rejected == 1
    check_conservation(summary)
    logs_stats = summary.inputs[1]
    assert (logs_stats.rows_read, logs_stats.rows_kept) == (5, 4)
    assert kept_rows(out) == sum(sum(rows.values()) for rows in (
        summary.train_rows, summary.validation_rows, summary.test_rows)) == 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_log_rows_of_a_rejected_product_are_unknown_product(tmp_path, fmt):
    cat = catalog_rows()
    cat[2]["image_embeddings"] = [[1.0, 2.0]]  # p3 rejected: wrong width
    summary, out = run(tmp_path, fmt, catalog=cat, validation_from=iso(6), test_from=iso(9))
    found = rejects(out)
    assert [(Path(r["file"]).name, r["row"], r["reason"]) for r in found] == [
        (f"catalog.{fmt}", 2, "bad_vector_width"), (f"logs.{fmt}", 2, "unknown_product")]
    check_conservation(summary)


def test_json_values_of_the_wrong_type_are_row_rejects(tmp_path):
    rows = log_rows() + [log_row(product_id=1.5), log_row(weight="heavy"), log_row(timestamp=[1]),
                         log_row(query_embedding=["a", "b", "c", "d"]), log_row(query_embedding="0.1,0.2")]
    summary, out = run(tmp_path, "jsonl", logs=rows, validation_from=iso(6), test_from=iso(9))
    assert [(r["row"], r["reason"]) for r in rejects(out)] == [
        (4, "missing_product_id"), (5, "bad_weight"), (6, "bad_timestamp"), (7, "non_finite_vector"),
        (8, "bad_vector_width")]
    check_conservation(summary)


def test_integer_epochs_are_seconds_or_milliseconds(tmp_path):
    seconds = int((T0 + dt.timedelta(hours=2)).timestamp())
    rows = log_rows()
    rows[0]["timestamp"] = seconds  # seconds
    rows[3]["timestamp"] = (seconds + 3600) * 1000  # milliseconds
    for r in rows[1:3]:
        r["timestamp"] = int(dt.datetime.fromisoformat(r["timestamp"]).timestamp())
    summary, out = run(tmp_path, "parquet", logs=rows, validation_from=iso(6), test_from=iso(9))
    train = pq.read_table(out / schema.TRAIN_FILE).column("timestamp").to_pylist()
    assert train == [T0 + dt.timedelta(hours=2), T0 + dt.timedelta(hours=3), T0 + dt.timedelta(hours=5)]


# ---- file-level refusals ----------------------------------------------------------------------


def assert_refused(tmp_path, catalog, logs, *words):
    out = tmp_path / "ds"
    with pytest.raises(DataError) as err:
        ingest(catalog, logs, out, IngestConfig(**SMALL))
    message = str(err.value)
    for word in words:
        assert str(word) in message, message
    assert not out.exists()
    assert not list(tmp_path.glob("ds.tmp-*"))
    return message


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_missing_required_column(tmp_path, fmt):
    cat = write([{k: v for k, v in r.items() if k != "product_id"} for r in catalog_rows()], tmp_path / f"c.{fmt}")
    lg = write(log_rows(), tmp_path / f"l.{fmt}")
    assert_refused(tmp_path, cat, lg, cat, "'product_id'", "missing", "expected")

    cat = write(catalog_rows(), tmp_path / f"c2.{fmt}")
    lg = write([{k: v for k, v in r.items() if k != "timestamp"} for r in log_rows()], tmp_path / f"l2.{fmt}")
    assert_refused(tmp_path, cat, lg, lg, "'timestamp'", "missing")


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_float_product_id_column(tmp_path, fmt):
    rows = catalog_rows()
    for i, r in enumerate(rows):
        r["product_id"] = float(i) + 0.5
    cat = write(rows, tmp_path / f"c.{fmt}")
    lg = write(log_rows(), tmp_path / f"l.{fmt}")
    message = assert_refused(tmp_path, cat, lg, cat, "'product_id'", "expected a string")
    assert "double" in message or "float" in message
    # plain astype(str) would write "1.0", which no log id matches
    assert "astype('Int64').astype(str)" in message and ".astype(str) " not in message


def test_refuses_wrong_type_in_logs(tmp_path):
    cat = write(catalog_rows(), tmp_path / "c.parquet")
    rows = log_rows()
    table = pa.Table.from_pylist(rows)
    table = table.set_column(table.schema.get_field_index("weight"), "weight", pa.array(["a", "b", "c", "d"]))
    lg = write(rows, tmp_path / "l.parquet", table=table)
    assert_refused(tmp_path, cat, lg, lg, "'weight'", "numeric")


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_a_file_without_rows(tmp_path, fmt):
    cat = write(catalog_rows(), tmp_path / f"c.{fmt}")
    lg = tmp_path / f"l.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(log_rows()).slice(0, 0), lg)
    else:
        lg.write_text("\n")
    assert_refused(tmp_path, cat, lg, lg, "no rows")


def test_refuses_unknown_and_unreadable_files(tmp_path):
    cat = write(catalog_rows(), tmp_path / "c.parquet")
    csv = tmp_path / "l.csv"
    csv.write_text("surface,engagement\n")
    message = assert_refused(tmp_path, cat, csv, csv, "unknown format", "Convert", ".parquet", ".jsonl")
    assert "pandas.read_csv('l.csv'" in message and "to_parquet('l.parquet')" in message
    assert "Rename" not in message
    broken = tmp_path / "l.parquet"
    broken.write_bytes(b"this is not parquet")
    assert_refused(tmp_path, cat, broken, broken, "Parquet")
    assert_refused(tmp_path, cat, tmp_path / "nowhere.jsonl", "nowhere.jsonl", "does not exist")


@pytest.mark.parametrize("split", [{"validation_from": iso(6), "test_from": iso(9)}, {}])
def test_a_bad_json_line_late_in_a_file_leaves_nothing(tmp_path, split):
    cat = write(catalog_rows(), tmp_path / "c.jsonl")
    lg = tmp_path / "l.jsonl"
    lg.write_text("".join(json.dumps(r) + "\n" for r in log_rows()) + '{"surface": "search",\n')
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=r"line 5"):
        ingest(cat, lg, out, IngestConfig(**SMALL, **split))
    assert not out.exists() and not list(tmp_path.glob("ds.tmp-*"))


def test_refuses_to_overwrite_a_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an itemsage dataset"):
        run(tmp_path, "jsonl", validation_from=iso(6), test_from=iso(9))
    assert (tmp_path / "ds" / "precious.txt").read_text() == "keep me"


def test_rerun_replaces_a_previous_dataset(tmp_path):
    run(tmp_path, "jsonl", validation_from=iso(6), test_from=iso(9))
    summary, out = run(tmp_path, "jsonl", validation_from=iso(1), test_from=iso(7))
    assert json.loads((out / "manifest.json").read_text())["config"]["validation_from"] == "2024-01-01T01:00:00Z"
    assert sum(summary.validation_rows.values()) == 1 and sum(summary.test_rows.values()) == 2
    assert not list(tmp_path.glob("ds.*"))


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="test_fraction"):
        IngestConfig(test_fraction=1.5)
    with pytest.raises(ConfigError, match="validation_fraction"):
        IngestConfig(validation_fraction=0.5, test_fraction=0.5)  # nothing left for train
    with pytest.raises(ConfigError, match="validation_from"):
        IngestConfig(validation_from="next tuesday", test_from=iso(1))
    with pytest.raises(ConfigError, match="go together"):
        IngestConfig(test_from=iso(1))
    with pytest.raises(ConfigError, match="after `ingest.test_from`"):
        IngestConfig(validation_from=iso(2), test_from=iso(1))
    with pytest.raises(ConfigError, match="per-user split takes fractions"):
        IngestConfig(split="per-user", validation_from=iso(1), test_from=iso(2))
    with pytest.raises(ConfigError, match="ingest.split"):
        IngestConfig(split="random")
    with pytest.raises(ConfigError, match="gap_hours"):
        IngestConfig(gap_hours=-1)
    with pytest.raises(ConfigError, match="text_fields"):
        IngestConfig(text_fields=("title", "title"))


# ---- split, order, formats, manifest ----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_fractions_split_the_last_parts_of_the_time_span(tmp_path, fmt):
    hours = [7, 0, 3, 10, 8, 8, 2, 9]  # span 0..10 h; test 0.15 -> from 8.5 h; validation 0.2 -> from 6.5 h
    rows = [dict(log_rows()[0], timestamp=iso(h), query_text=f"q{i}") for i, h in enumerate(hours)]
    summary, out = run(tmp_path, fmt, logs=rows, validation_fraction=0.2, test_fraction=0.15)
    assert (summary.validation_from, summary.test_from) == ("2024-01-01T06:30:00Z", "2024-01-01T08:30:00Z")
    assert window_texts(out) == {
        "train": ["q1", "q6", "q2"],  # 0, 2, 3 h
        "validation": ["q0", "q4", "q5"],  # 7, 8, 8 h (input order kept)
        "test": ["q7", "q3"],  # 9, 10 h
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_gap_drops_the_train_rows_just_before_validation(tmp_path, fmt):
    hours = [7, 0, 3, 10, 8, 8, 2, 9, 6, 5.5]  # validation from 6.5 h, a 1-hour gap: 5.5 and 6 h are dropped
    rows = [dict(log_rows()[0], timestamp=iso(h), query_text=f"q{i}") for i, h in enumerate(hours)]
    summary, out = run(tmp_path, fmt, logs=rows, validation_from=iso(6.5), test_from=iso(8.5), gap_hours=1)
    assert window_texts(out) == {"train": ["q1", "q6", "q2"], "validation": ["q0", "q4", "q5"], "test": ["q7", "q3"]}
    assert summary.gap_rows == 2
    assert json.loads((out / "manifest.json").read_text())["counts"]["gap_rows"] == 2


def window_texts(out: Path) -> dict[str, list[str]]:
    return {w: pq.read_table(out / schema.WINDOW_FILES[w]).column("query_text").to_pylist() for w in schema.WINDOWS}


def kept_rows(out: Path) -> int:
    return sum(pq.read_metadata(out / schema.WINDOW_FILES[w]).num_rows for w in schema.WINDOWS)


def per_user_reference(rows: list[dict], fv: float, ft: float, gap_h: float = 0) -> dict[str, list[str]]:
    """RecBole's ratio split, written out one user at a time: sort the user's rows by time (ties in
    input order), test gets int(ft * n), validation int(fv * n), and a window whose share is in (0, 1)
    takes one row from train while train keeps more than one (test first). Rows without a user: train."""
    window = {}
    users = sorted({r["user_id"] for r in rows if r["user_id"] is not None})
    for u in users:
        mine = sorted((i for i, r in enumerate(rows) if r["user_id"] == u), key=lambda i: rows[i]["timestamp"])
        n = len(mine)
        cnt = [0, int(fv * n), int(ft * n)]
        cnt[0] = n - cnt[1] - cnt[2]
        for i, ratio in ((2, ft), (1, fv)):
            if cnt[0] <= 1:
                break
            if 0 < ratio * n < 1:
                cnt[i] += 1
                cnt[0] -= 1
        for rank, i in enumerate(mine):
            window[i] = "train" if rank < cnt[0] else "validation" if rank < cnt[0] + cnt[1] else "test"
        if gap_h and cnt[0] < n:
            start = rows[mine[cnt[0]]]["timestamp"]
            for i in mine[: cnt[0]]:
                if start - rows[i]["timestamp"] <= dt.timedelta(hours=gap_h):
                    window[i] = "gap"
    order = sorted(range(len(rows)), key=lambda i: rows[i]["timestamp"])  # each file in time order
    return {w: [rows[i]["query_text"] for i in order if window.get(i, "train") == w] for w in schema.WINDOWS}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gap_h", [0, 1.5])
def test_per_user_split_matches_a_one_user_at_a_time_reference(tmp_path, fmt, gap_h):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(300):  # 12 users with 1..~50 rows each, repeated timestamps (ties), some rows without a user
        user = None if i % 17 == 0 else f"u{int(rng.integers(0, 12)) ** 2 % 37}"
        rows.append(dict(log_rows()[0], timestamp=iso(float(rng.integers(0, 40)) / 2), query_text=f"q{i}",
                         user_id=user))
    rows.append(dict(log_rows()[0], timestamp=iso(3), query_text="lonely", user_id="single"))  # 1 row: train
    summary, out = run(tmp_path, fmt, logs=rows, split="per-user", validation_fraction=0.2, test_fraction=0.1,
                       gap_hours=gap_h, sort_rows=16, batch_rows=29)  # many slabs and batches
    for r in rows:
        r["timestamp"] = dt.datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00"))
    expected = per_user_reference(rows, 0.2, 0.1, gap_h)
    assert window_texts(out) == expected
    assert "lonely" in expected["train"] and all(expected.values())
    assert summary.validation_from is None and summary.split == "per-user"
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["no_user_train_rows"] == sum(r["user_id"] is None for r in rows)
    assert counts["gap_rows"] == len(rows) - sum(len(v) for v in expected.values())
    assert (counts["gap_rows"] > 0) == (gap_h > 0)


def test_per_user_split_of_logs_without_users_warns_of_empty_windows(tmp_path, caplog):
    rows = [dict(r, user_id=None) for r in log_rows()]
    with caplog.at_level("WARNING", logger="itemsage.ingest"):
        summary, out = run(tmp_path, "jsonl", logs=rows, split="per-user")
    assert kept_rows(out) == pq.read_metadata(out / schema.TRAIN_FILE).num_rows == 4
    assert "validation window is empty" in caplog.text and "test window is empty" in caplog.text


def test_rows_at_a_split_time_go_to_the_later_window(tmp_path):
    summary, out = run(tmp_path, "jsonl", validation_from=iso(5), test_from=iso(8))  # rows at exactly 5 and 8 h
    validation = pq.read_table(out / schema.VALIDATION_FILE).column("timestamp").to_pylist()
    test = pq.read_table(out / schema.TEST_FILE).column("timestamp").to_pylist()
    assert validation == [T0 + dt.timedelta(hours=5)]
    assert test == [T0 + dt.timedelta(hours=8), T0 + dt.timedelta(hours=10)]


def test_sorting_in_small_slabs_matches_a_full_sort(tmp_path):
    rng = np.random.default_rng(0)
    minutes = rng.integers(0, 300, size=200)
    rows = [dict(log_rows()[0], timestamp=iso(m / 60), query_text=f"q{i}") for i, m in enumerate(minutes)]
    # slabs of ~7 rows and batches of 13: many runs, many slabs
    summary, out = run(tmp_path, "parquet", logs=rows, validation_from=iso(2), test_from=iso(3.5), sort_rows=7,
                       batch_rows=13)
    got = sum(window_texts(out).values(), [])
    expected = [f"q{i}" for i in sorted(range(len(minutes)), key=lambda i: minutes[i])]  # stable
    assert got == expected
    assert sum(summary.train_rows.values()) == int((minutes < 120).sum())


def test_jsonl_and_parquet_give_identical_datasets(tmp_path):
    cat, logs = catalog_rows(), log_rows()
    cat.append({"product_id": "p1", "title": "dup"})
    logs.append(log_row(surface="pins"))
    write(cat, tmp_path / "a/catalog.jsonl")
    write(logs, tmp_path / "a/logs.jsonl")
    # Parquet with real timestamp and integer-id types, which must normalise to the same dataset
    cat_table = pa.Table.from_pylist([{**{k: None for k in cat[0]}, **r} for r in cat])
    log_table = pa.Table.from_pylist(logs)
    log_table = log_table.set_column(
        log_table.schema.get_field_index("timestamp"), "timestamp",
        pa.array([dt.datetime.fromisoformat(r["timestamp"]) for r in logs], pa.timestamp("us", tz="UTC")))
    write([], tmp_path / "b/catalog.parquet", table=cat_table)
    write([], tmp_path / "b/logs.parquet", table=log_table)
    summaries = {}
    for d, fmt in (("a", "jsonl"), ("b", "parquet")):
        summaries[d] = ingest(tmp_path / d / f"catalog.{fmt}", tmp_path / d / f"logs.{fmt}", tmp_path / f"ds_{d}",
                              IngestConfig(**SMALL))
    for name in (schema.PRODUCTS_FILE, schema.TRAIN_FILE, schema.VALIDATION_FILE, schema.TEST_FILE):
        a, b = pq.read_table(tmp_path / "ds_a" / name), pq.read_table(tmp_path / "ds_b" / name)
        assert a.equals(b), name
    assert (tmp_path / "ds_a/vocab.json").read_bytes() == (tmp_path / "ds_b/vocab.json").read_bytes()
    ra, rb = rejects(tmp_path / "ds_a"), rejects(tmp_path / "ds_b")
    assert [(r["row"], r["reason"]) for r in ra] == [(r["row"], r["reason"]) for r in rb] == [
        (3, "duplicate_product_id"), (4, "unknown_surface")]
    assert summaries["a"].test_from == summaries["b"].test_from


def test_a_directory_of_files_is_read_in_name_order(tmp_path):
    cat = catalog_rows()
    write(cat[:2], tmp_path / "cat/part-0.parquet")
    write([cat[2], dict(cat[0], title="later p1")], tmp_path / "cat/part-1.jsonl")
    (tmp_path / "cat/_SUCCESS").write_text("")
    write(log_rows(), tmp_path / "logs/a.jsonl")
    summary = ingest(tmp_path / "cat", tmp_path / "logs", tmp_path / "ds", IngestConfig(**SMALL, validation_from=iso(6), test_from=iso(9)))
    assert summary.products == 3 and summary.rejects["duplicate_product_id"] == 1
    assert [r["file"].endswith("part-1.jsonl") and r["row"] for r in rejects(tmp_path / "ds")] == [1]


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
    summary, out = run(tmp_path, "parquet", validation_from=iso(6), test_from=iso(9))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "dataset"
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    for name, meta in manifest["files"].items():
        assert meta["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    for role in ("catalog", "logs"):
        path = tmp_path / f"in/{role}.parquet"
        assert manifest["inputs"][str(path)] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    counts = manifest["counts"]
    assert counts["products"] == 3 and counts["rejected"] == 0 and counts["image_dim"] == 4
    assert counts["train_rows"]["search.click"] == 1 and counts["test_rows"]["home.checkout"] == 1
    assert counts["validation_rows"]["search.add_to_cart"] == 1 and counts["gap_rows"] == 0
    assert (counts["train"], counts["validation"], counts["test"]) == (2, 1, 1)
    assert counts["query_dims"] == {"search": 384, "closeup": 4, "home": 2}
    assert manifest["config"]["validation_from"] == "2024-01-01T06:00:00Z"
    assert manifest["config"]["test_from"] == "2024-01-01T09:00:00Z"


# ---- image files through the image encoder ----------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    from itemsage.encoders.image import ImageEncoder

    return ImageEncoder()


def test_image_paths_go_through_the_image_encoder(tmp_path, encoder):
    from PIL import Image

    images = tmp_path / "in" / "img"
    images.mkdir(parents=True)
    for name, colour in (("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220)), ("green.png", (20, 200, 20))):
        Image.new("RGB", (40, 30), colour).save(images / name)
    cat = [
        {"product_id": "p1", "title": "red", "image_paths": ["img/red.png", "img/blue.png"]},  # relative
        {"product_id": "p2", "title": "blue", "image_paths": [str(images / "blue.png")]},
        {"product_id": "p3", "title": "gone", "image_paths": ["img/missing.png"]},
    ]
    logs = [
        {"surface": "closeup", "engagement": "click", "product_id": "p1", "timestamp": iso(1),
         "query_image_path": "img/green.png"},
        {"surface": "closeup", "engagement": "save", "product_id": "p2", "timestamp": iso(2),
         "query_image_path": "img/nothing.png"},
    ]
    summary, out = run(tmp_path, "jsonl", catalog=cat, logs=logs, validation_from=iso(6), test_from=iso(9))
    assert [(r["row"], r["reason"]) for r in rejects(out)] == [(2, "unreadable_image"), (1, "unreadable_image")]
    assert summary.image_dim == encoder.dim and summary.query_dims == {"closeup": encoder.dim}

    reference, errors = encoder.encode_paths([images / "red.png", images / "blue.png", images / "green.png"],
                                             progress=False)
    assert errors == [None, None, None]
    products = pq.read_table(out / schema.PRODUCTS_FILE).column("image_embeddings").to_pylist()
    np.testing.assert_allclose(np.array(products[0]), reference[:2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(products[1]), reference[1:2], rtol=1e-4, atol=1e-4)
    query = pq.read_table(out / schema.TRAIN_FILE).column("query_embedding").to_pylist()
    np.testing.assert_allclose(np.array(query[0]), reference[2], rtol=1e-4, atol=1e-4)


# ---- the command ------------------------------------------------------------------------------


def test_cli_prints_the_summary_and_refuses_bad_files_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from itemsage.cli import app

    cat = write(catalog_rows(), tmp_path / "c.jsonl")
    lg = write(log_rows(), tmp_path / "l.jsonl")
    runner = CliRunner()
    args = ["ingest", "--catalog", str(cat), "--logs", str(lg), "--out", str(tmp_path / "ds"), "--no-progress",
            "--validation-from", iso(6), "--test-from", iso(9), "--gap-hours", "0.5", "--max-trigrams", "50"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "search.click" in result.output and "products.parquet" in result.output
    config = json.loads((tmp_path / "ds/manifest.json").read_text())["config"]
    assert config["max_trigrams"] == 50 and config["gap_hours"] == 0.5 and config["test_from"] == iso(9)
    # the split times as given, printed (the paths in the output also contain "test" and "validation")
    assert f"validation from {config['validation_from']}" in " ".join(result.output.split())
    assert f"test from {iso(9)}" in " ".join(result.output.split())

    bad = write([{"title": "no id"}], tmp_path / "bad.jsonl")
    result = runner.invoke(app, ["ingest", "--catalog", str(bad), "--logs", str(lg), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "product_id" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, args + ["--test-fraction", "0.3"])  # split times and fractions: one or the other
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, ["ingest", "--catalog", str(cat), "--logs", str(lg), "--out", str(tmp_path / "pu"),
                                 "--no-progress", "--split", "per-user", "--validation-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "pu/manifest.json").read_text())["config"]
    assert config["split"] == "per-user" and config["validation_fraction"] == 0.25


# ---- memory: bounded by the batch and the slab, not by the log's length --------------------------

# Runs in a fresh process, so Arrow's peak (default_memory_pool().max_memory(), which never resets)
# is this run's. tracemalloc adds the peak of Python objects and numpy arrays.
PEAK_SCRIPT = """
import json, sys, tracemalloc
import pyarrow as pa
from itemsage.data.ingest import IngestConfig, ingest
catalog, warm_up, logs, out, options = sys.argv[1:]
config = IngestConfig(**json.loads(options))
ingest(catalog, warm_up, out + "-warm-up", config)  # first-use imports and caches are not the log's
tracemalloc.start()
ingest(catalog, logs, out, config)
print(pa.default_memory_pool().max_memory() + tracemalloc.get_traced_memory()[1])
"""


def test_memory_does_not_grow_with_the_log(tmp_path):
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    dim = 128
    cat = write([{"product_id": f"p{i}", "title": f"item {i}", "image_embeddings": [[1.0] * 4]} for i in range(50)],
                tmp_path / "catalog.parquet")

    def logs(rows: int) -> Path:
        # closeup rows with 128-d query vectors over ten days, in random time order; row groups that
        # do not line up with the batches
        ts = T0.timestamp() * 1000 + rng.integers(0, 10 * 86_400_000, rows)
        table = pa.table({
            "surface": ["closeup"] * rows, "engagement": ["click"] * rows,
            "product_id": [f"p{i}" for i in rng.integers(0, 50, rows)],
            "timestamp": pa.array(ts.astype(np.int64), pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            "query_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(rows * dim, dtype=np.float32)), dim).cast(pa.list_(pa.float32())),
        })
        path = tmp_path / f"logs{rows}.parquet"
        pq.write_table(table, path, row_group_size=1_500)
        return path

    small, large = 20_000, 80_000
    options = json.dumps({**SMALL, "batch_rows": 1_000, "sort_rows": 4_000})
    warm_up = logs(1_000)
    peaks = {}
    for rows in (small, large):
        out = tmp_path / f"ds{rows}"
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(cat), str(warm_up), str(logs(rows)), str(out),
                               options], capture_output=True, text=True, check=True)
        peaks[rows] = int(done.stdout.split()[-1])
        kept = kept_rows(out)
        assert kept == rows
    # The large log holds 30 MB more vectors; holding even a quarter of them would show.
    extra_vectors = (large - small) * dim * 4
    assert peaks[large] - peaks[small] < extra_vectors / 4, (peaks, extra_vectors)


def test_fast_take_matches_arrow_take():
    from itemsage.data.row_arrays import take_rows

    rng = np.random.default_rng(0)
    # null vectors, empty vectors, two widths; sliced and chunked, as scratch slabs come
    values = [None if i % 7 == 0 else [] if i % 11 == 0 else rng.standard_normal(3 if i % 2 else 5).tolist()
              for i in range(300)]
    vectors = pa.array(values, pa.list_(pa.float32()))
    table = pa.table({"id": pa.array([f"r{i}" for i in range(300)]), "v": vectors})
    chunked = pa.concat_tables([table.slice(0, 120), table.slice(120, 100), table.slice(220)])
    rows = rng.permutation(300)[:250]
    for t in (table, chunked, table.slice(40, 200)):
        picked = rows[rows < t.num_rows]
        got = take_rows(t, picked)
        assert got.equals(t.take(pa.array(picked))), t.num_rows
        assert got.column("v").to_pylist() == [t.column("v")[int(r)].as_py() for r in picked]


# ---- products as queries: query_product_id and the frozen query vectors ---------------------------


def product_query_logs() -> list[dict]:
    blank = {"query_text": None, "query_embedding": None, "query_product_id": None}  # every row every key (Parquet)
    return [{**blank, **r} for r in [
        {"surface": "closeup", "engagement": "click", "product_id": "p2", "timestamp": iso(1),
         "query_product_id": "p1", "user_id": "u1"},
        {"surface": "closeup", "engagement": "save", "product_id": "p3", "timestamp": iso(2),
         "query_embedding": [0.1, 0.2, 0.3, 0.4], "query_product_id": "p2", "user_id": "u1"},  # keeps its vector
        {"surface": "home", "engagement": "click", "product_id": "p1", "timestamp": iso(3),
         "query_product_id": "p3", "user_id": "u2"},
        {"surface": "search", "engagement": "click", "product_id": "p1", "timestamp": iso(4),
         "query_text": "oak", "user_id": "u2"},
    ]]


def all_windows(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / schema.WINDOW_FILES[w]) for w in schema.WINDOWS])


@pytest.mark.parametrize("fmt", FORMATS)
def test_query_product_rows_get_the_products_main_image_vector(tmp_path, fmt):
    summary, out = run(tmp_path, fmt, logs=product_query_logs())
    assert summary.rejected == 0
    rows = {(r["surface"], r["product_id"]): r for r in all_windows(out).to_pylist()}
    assert rows[("closeup", "p2")]["query_embedding"] == [1.0, 0.0, 0.0, 0.0]  # p1's main (first) image
    assert rows[("closeup", "p2")]["query_product_id"] == "p1"
    assert rows[("closeup", "p3")]["query_embedding"] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # its own vector
    assert rows[("home", "p1")]["query_embedding"] == [0.5, 0.5, 0.5, 0.5]  # p3's
    assert rows[("search", "p1")]["query_product_id"] is None
    assert pq.read_schema(out / schema.TRAIN_FILE).field(schema.QUERY_PRODUCT_ID).type == pa.string()
    products = pq.read_table(out / schema.PRODUCTS_FILE)
    assert products.schema.field(schema.QUERY_VECTOR).type == pa.list_(pa.float32())
    assert products.column(schema.QUERY_VECTOR).to_pylist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0.5] * 4]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest[schema.PRODUCT_QUERY] == {"source": "image", "fields": ["image_embeddings"], "dim": 4}


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_unknown_query_product_is_rejected_with_its_reason(tmp_path, fmt):
    logs = product_query_logs()
    logs[0]["query_product_id"] = "nope"
    summary, out = run(tmp_path, fmt, logs=logs)
    assert summary.rejects["unknown_query_product"] == 1 and summary.rejected == 1
    (entry,) = rejects(out)
    assert entry["reason"] == "unknown_query_product" and entry["row"] == 0
    assert "'nope'" in entry["detail"] and "not in the catalog" in entry["detail"]


def test_a_query_product_of_the_wrong_width_is_bad_vector_width(tmp_path):
    logs = product_query_logs()
    logs.insert(0, {"surface": "closeup", "engagement": "click", "product_id": "p1", "timestamp": iso(0),
                    "query_embedding": [0.5, 0.5]})  # fixes closeup at 2-d; the 4-d product query then misfits
    summary, out = run(tmp_path, "jsonl", logs=logs)
    bad = [e for e in rejects(out) if e["reason"] == "bad_vector_width"]
    assert [e["row"] for e in bad] == [1, 2]
    assert "query_product_id stands for the product's 4-d frozen query vector" in bad[0]["detail"]


class FakeTextEncoder:
    """A deterministic stand-in for MiniLM: the vector of a text is a hash of it."""
    dim = 8
    name = "fake"

    def __init__(self):
        self.seen: list[str] = []

    def encode(self, texts, batch_size=256, progress=False):
        self.seen += list(texts)
        return np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
                         .standard_normal(self.dim).astype(np.float32) for t in texts])


def test_product_query_option_chooses_the_source(tmp_path):
    catalog = catalog_rows()
    catalog[1]["image_embeddings"] = None  # p2 has no image: auto chooses text
    enc = FakeTextEncoder()
    cat = write(catalog, tmp_path / "in/catalog.jsonl")
    lg = write(product_query_logs()[2:], tmp_path / "in/logs.jsonl")
    summary = ingest(cat, lg, tmp_path / "ds", IngestConfig(**SMALL), text_encoder=enc)
    assert summary.product_query == {"source": "text", "fields": ["title"], "dim": 8}
    assert enc.seen == ["Oak chair", "Pine table", "Linen sofa"]
    home = pq.read_table(tmp_path / "ds" / schema.TRAIN_FILE).to_pylist()[0]
    assert home["query_embedding"] == pytest.approx(enc.encode(["Linen sofa"])[0].tolist())
    with pytest.raises(ConfigError, match="--product-query image: 1 of the 3 products have no image"):
        ingest(cat, lg, tmp_path / "ds2", IngestConfig(**SMALL, product_query="image"), text_encoder=enc)
    with pytest.raises(ConfigError, match="ingest.product_query"):
        IngestConfig(product_query="title")


def test_a_text_only_catalog_gets_384d_minilm_title_vectors(tmp_path):
    from itemsage.encoders.text import TextQueryEncoder

    catalog = [{k: v for k, v in r.items() if k != "image_embeddings"} for r in catalog_rows()]
    summary, out = run(tmp_path, "parquet", catalog=catalog, logs=product_query_logs()[::2])
    assert summary.rejected == 0 and summary.query_dims["closeup"] == 384 and summary.query_dims["home"] == 384
    assert summary.product_query == {"source": "text", "fields": ["title"], "dim": 384}
    expected = TextQueryEncoder().encode(["Oak chair", "Pine table", "Linen sofa"])  # one at a time would agree
    stored = np.array(pq.read_table(out / schema.PRODUCTS_FILE).column(schema.QUERY_VECTOR).to_pylist(), np.float32)
    np.testing.assert_allclose(stored, expected, atol=1e-6)
    rows = {r["surface"]: r for r in all_windows(out).to_pylist()}
    np.testing.assert_allclose(rows["closeup"]["query_embedding"], expected[0], atol=1e-6)
    np.testing.assert_allclose(rows["home"]["query_embedding"], expected[2], atol=1e-6)


def test_the_built_in_text_encoder_loads_once_per_ingest(tmp_path, monkeypatch):
    """A text source without a given encoder loads MiniLM (seconds, ~90 MB) once, not once per
    catalog batch."""
    from itemsage.encoders import text as query_encoder

    made = []

    class Counting(FakeTextEncoder):
        def __init__(self):
            super().__init__()
            made.append(self)

    monkeypatch.setattr(query_encoder, "TextQueryEncoder", Counting)
    catalog = [{k: v for k, v in r.items() if k != "image_embeddings"} for r in catalog_rows()]
    summary, out = run(tmp_path, "jsonl", catalog=catalog, logs=product_query_logs()[::2], batch_rows=1)
    assert summary.product_query["source"] == "text" and summary.products == 3
    assert len(made) == 1 and made[0].seen == ["Oak chair", "Pine table", "Linen sofa"]


# ---- text UTF-8 cannot store, and the bounded rejects file (issue 25) -------------------------------


def _surrogate_catalog(tmp_path: Path, how: str) -> Path:
    """catalog_rows() plus a 4th product whose title is "chair" and a lone surrogate, written `how`."""
    path = tmp_path / "in" / ("catalog.parquet" if how == "parquet" else "catalog.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = catalog_rows() + [{"product_id": "p4", "title": "chair \ud800", "image_embeddings": [[0.0, 0.0, 0.0, 1.0]]}]
    if how == "escape":  # JSON's \ud800 escape, alone
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif how == "bytes":  # the raw bytes ED A0 80 (UTF-8's form of U+D800, which UTF-8 forbids)
        path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                         .encode("utf-8", errors="surrogatepass"))
    else:  # Parquet: Arrow does not check a string column's bytes when they are viewed as strings
        titles = pa.array([r.pop("title").encode("utf-8", errors="surrogatepass") for r in rows], pa.binary())
        pq.write_table(pa.Table.from_pylist(rows).append_column("title", titles.view(pa.string())), path)
    return path


@pytest.mark.parametrize("how", ["escape", "bytes", "parquet"])
def test_text_utf8_cannot_store_is_a_row_reject_naming_the_field(tmp_path, how):
    catalog = _surrogate_catalog(tmp_path, how)
    logs = write([log_row(product_id=f"p{i % 3 + 1}", timestamp=iso(i)) for i in range(4)], tmp_path / "in/logs.jsonl")
    summary = ingest(catalog, logs, tmp_path / "ds", IngestConfig(**SMALL))
    assert summary.products == 3 and summary.rejects["bad_text_encoding"] == 1 and summary.rejected == 1
    (entry,) = rejects(tmp_path / "ds")
    assert (entry["row"], entry["reason"], entry["file"]) == (3, "bad_text_encoding", str(catalog))
    assert entry["detail"].startswith("title: ")
    assert ("character 6 is a lone surrogate" if how != "parquet" else "byte 6 (ed)") in entry["detail"]
    assert entry["record"]["product_id"] == "p4" and entry["record"]["title"].startswith("chair ")


def test_a_surrogate_in_a_log_field_or_an_extra_column_is_rejected_by_name(tmp_path):
    catalog = catalog_rows() + [{"product_id": "p4", "title": "stool", "note": ["ok", "x\udc00"],
                                 "image_embeddings": [[0.0, 0.0, 0.0, 1.0]]}]
    logs = [log_row(product_id="p1", timestamp=iso(0)), log_row(product_id="p2", timestamp=iso(1), user_id="u\ud83d"),
            log_row(product_id="p3", timestamp=iso(2))]
    summary, out = run(tmp_path, "jsonl", catalog, logs)
    found = {(e["file"].rsplit("/", 1)[1], e["row"]): e["detail"].split(":")[0] for e in rejects(out)}
    assert found == {("catalog.jsonl", 3): "note", ("logs.jsonl", 1): "user_id"}
    assert summary.rejects["bad_text_encoding"] == 2 and summary.products == 3


def _unknown_product_logs(unknown: int) -> list[dict]:
    """4 rows of catalog products, then `unknown` rows naming products no catalog row has."""
    return ([log_row(product_id=f"p{i % 3 + 1}", timestamp=iso(i)) for i in range(4)]
            + [log_row(product_id=f"x{i}", timestamp=iso(i / 100)) for i in range(unknown)])


def test_rejects_file_keeps_the_first_100_rows_of_each_reason_and_counts_all(tmp_path):
    logs = _unknown_product_logs(250) + [log_row(product_id="p1", weight=-1.0)] * 3
    summary, out = run(tmp_path, "jsonl", logs=logs)
    assert summary.rejects["unknown_product"] == 250 and summary.rejects["bad_weight"] == 3
    written = rejects(out)
    assert [e["row"] for e in written if e["reason"] == "unknown_product"] == list(range(4, 104))
    assert [e["row"] for e in written if e["reason"] == "bad_weight"] == [254, 255, 256]
    assert all("record" in e for e in written)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["counts"]["rejected"], manifest["counts"]["rejects_written"]) == (253, 103)
    assert "the first 100 rows of each reason" in summary.warnings[0]  # 250 of 257 log rows: the warning says where


@pytest.mark.parametrize("unknown, refused", [(999, False), (1000, True)])
def test_most_log_rows_rejected_for_one_reason_is_refused(tmp_path, unknown, refused):
    """Over 90% of the logs rejected as unknown_product, and at least 1,000 rows: the catalog and the logs
    do not belong together; nothing is written. 999 such rows of 1,003 (99.6%): below the count, written."""
    if not refused:
        summary, out = run(tmp_path, "jsonl", logs=_unknown_product_logs(unknown))
        assert summary.rejects["unknown_product"] == 999 and out.is_dir()
        return
    with pytest.raises(DataError, match=r"1,000 of 1,004 log rows \(99\.6%\) were rejected as unknown_product: "
                                        r"the catalog and the logs do not seem to belong together.*--max-reject-share 1"):
        run(tmp_path, "jsonl", logs=_unknown_product_logs(unknown))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing published, no temporary left
    summary, out = run(tmp_path, "jsonl", logs=_unknown_product_logs(unknown), max_reject_share=1.0)
    assert summary.rejects["unknown_product"] == 1000 and summary.warnings  # asked for: written, with the warning


def test_the_summary_gives_the_share_of_products_the_tower_reads_nothing_of(tmp_path):
    """No image and no token of the dataset's vocabulary: here a product with no text at all, and one whose
    only words the unigram, bigram and trigram caps (1 each) leave out."""
    catalog = catalog_rows() + [{"product_id": "p4"}, {"product_id": "p5", "title": "木製の椅子"}]
    cfg = {**SMALL, "max_unigrams": 1, "max_bigrams": 1, "max_trigrams": 1}
    summary = ingest(write(catalog, tmp_path / "in/catalog.jsonl"),
                     write([log_row(product_id="p1", timestamp=iso(i)) for i in range(3)], tmp_path / "in/logs.jsonl"),
                     tmp_path / "ds", IngestConfig(**cfg))
    assert summary.unreadable == 2 and summary.products == 5  # p1-p3 have images
    assert "2 of 5 products (40.0%) have no image and no text token in the vocabulary" in summary.warnings[-1]
    counts = json.loads((tmp_path / "ds" / "manifest.json").read_text())["counts"]
    assert counts["unreadable_products"] == 2
