"""The Python API: itemsage.load(...).encode_products / encode_queries, against `itemsage embed` and by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.numpy import load_file

import itemsage
from itemsage.config import ConfigError
from itemsage.data.ingest import DataError
from itemsage.data.text import Vocabulary
from itemsage.embed.catalog import embed_from_catalog
from itemsage.index.build import read_embeddings
from itemsage.model.config import model_config
from itemsage.model.model import save_model
from itemsage.model.tower import ItemSage, QueryAdapters

IMAGE_DIM = 8


def catalog_rows(n: int = 23, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "oak pine chair table lamp red blue linen wool modern rustic".split()
    return [{"product_id": f"p{i:03d}", "title": " ".join(rng.choice(words, 3)), "brand": str(rng.choice(words)),
             "description": "  ".join(rng.choice(words, 5)).upper(),  # normalised by the tokeniser
             "image_embeddings": rng.standard_normal((1 + i % 3, IMAGE_DIM)).round(3).tolist()} for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = model_config("tiny", adapter="linear")
    vocab = Vocabulary.build([[r["title"], r["description"]] for r in catalog_rows()])
    directory = tmp_path_factory.mktemp("model")
    dims = {"search": 384, "closeup": IMAGE_DIM}
    save_model(directory, ItemSage(cfg, len(vocab), IMAGE_DIM), QueryAdapters(dims, cfg.out_dim, "linear"), cfg,
               vocab, image_dim=IMAGE_DIM, query_dims=dims)
    return directory


def embed_cli_vectors(model_dir: Path, catalog: Path, out: Path) -> dict[str, np.ndarray]:
    """What `itemsage embed MODEL --catalog FILE` writes, by product id."""
    embed_from_catalog(model_dir, catalog, out, batch_size=5, progress=False)
    ids, vectors, _ = read_embeddings(out)
    return dict(zip(ids, vectors))


def test_encode_products_equals_itemsage_embed(tmp_path, model_dir):
    rows = catalog_rows()
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = embed_cli_vectors(model_dir, catalog, tmp_path / "emb")
    expected = np.stack([reference[r["product_id"]] for r in rows])  # [N, D], input order

    model = itemsage.load(model_dir)
    table = pa.Table.from_pylist(rows)
    for products in (rows, table, table.to_pandas(), catalog, str(catalog)):
        got = model.encode_products(products, batch_size=4)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)


def test_encode_products_rejects_rows_as_ingest_does(model_dir):
    model = itemsage.load(model_dir)
    rows = catalog_rows(4)
    rows[2]["image_embeddings"] = [[1.0, 2.0]]  # not the model's image width (8)
    with pytest.raises(DataError, match="bad_vector_width"):
        model.encode_products(rows)
    with pytest.raises(DataError, match="product_id"):
        model.encode_products([{"title": "no id"}])


def test_encode_queries_vectors_by_hand(model_dir):
    """A linear adapter is x @ W^T, L2-normalised: computed here from the saved weights."""
    model = itemsage.load(model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    rng = np.random.default_rng(3)
    for surface, dim in (("search", 384), ("closeup", IMAGE_DIM)):
        x = rng.standard_normal((7, dim)).astype(np.float32)
        w = weights[f"adapters.maps.{surface}.weight"]  # [D, Dq]
        y = x.astype(np.float64) @ w.T.astype(np.float64)
        expected = y / np.linalg.norm(y, axis=1, keepdims=True)
        got = model.encode_queries(surface, x, batch_size=3)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(model.encode_queries(surface, x.tolist()), got, atol=1e-6)
        np.testing.assert_allclose(model.encode_queries(surface, x[2]), got[2:3], atol=1e-6)  # one vector


def test_encode_queries_errors_say_what_to_send(model_dir):
    model = itemsage.load(model_dir)
    with pytest.raises(ConfigError, match="no 'home' query adapter"):
        model.encode_queries("home", np.ones((1, 8)))
    with pytest.raises(ConfigError, match="384-d"):
        model.encode_queries("search", np.ones((2, 5)))


def test_import_itemsage_is_cheap():
    code = "import sys, itemsage; print(sorted(m for m in ('torch', 'pyarrow', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_encode_products_takes_python_times_as_a_table_does(model_dir):
    """Rows from `pyarrow.Table.to_pylist()` hold `listed_at` as datetime (a date column as date):
    the list of dicts is accepted and embeds exactly as the Table it came from."""
    import datetime as dt

    from itemsage.data.normalise import _time_ms

    model = itemsage.load(model_dir)
    rows = catalog_rows(5)
    stamps = [dt.datetime(2024, 3, 1, 12, tzinfo=dt.timezone.utc), dt.datetime(2024, 3, 2), None,
              dt.datetime(2024, 3, 3), dt.datetime(2023, 12, 31, 23, 59, tzinfo=dt.timezone(dt.timedelta(hours=-5)))]
    for row, when in zip(rows, stamps):
        row["listed_at"] = when
    table = pa.Table.from_pylist(rows)
    assert pa.types.is_timestamp(table.schema.field("listed_at").type)  # what a catalog.parquet holds
    expected = model.encode_products(table)
    np.testing.assert_array_equal(model.encode_products(table.to_pylist()), expected)
    np.testing.assert_array_equal(model.encode_products(rows), expected)
    rows[3]["listed_at"] = dt.date(2024, 3, 3)  # a date column's value
    np.testing.assert_array_equal(model.encode_products(rows), expected)
    # the times read, in UTC milliseconds (naive = UTC; a date: its midnight UTC)
    stamps[3] = dt.date(2024, 3, 3)
    assert [_time_ms(w)[0] for w in stamps] == [1709294400000, 1709337600000, None, 1709424000000, 1704085140000]


def test_data_error_is_importable_from_the_package_without_torch():
    code = ("import sys, itemsage; from itemsage import DataError; "
            "from itemsage.data.readers import DataError as D; "
            "print(DataError is D, sorted(m for m in ('torch',) if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True []"
    assert "DataError" in itemsage.__all__


def test_api_errors_are_worded_for_the_caller_not_the_cli(model_dir, tmp_path):
    """Raised by the Python API, a refusal names what the caller passed, never a CLI flag."""
    model = itemsage.load(model_dir)
    rows = catalog_rows(2)
    rows[1]["image_embeddings"] = [[0.1] * 7]
    with pytest.raises(itemsage.DataError) as err:
        model.encode_products(rows)
    assert "bad_vector_width" in str(err.value) and "image width is 8" in str(err.value)
    with pytest.raises(itemsage.DataError) as missing:
        model.encode_products(tmp_path / "nope.parquet")
    with pytest.raises(itemsage.DataError) as empty:
        model.encode_products([])
    for message in (str(err.value), str(missing.value), str(empty.value)):
        assert "--" not in message, message


def test_image_path_queries_need_the_built_in_encoders_width(model_dir):
    """This model's closeup queries are 8-d (its catalog's image vectors), not the built-in encoder's
    1280-d: an image path is refused before any image is read, and the refusal says why."""
    model = itemsage.load(model_dir)
    with pytest.raises(ConfigError, match=r"1280-d.*8-d.*image_paths"):
        model.encode_queries("closeup", ["does-not-exist.png"])
