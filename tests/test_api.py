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
