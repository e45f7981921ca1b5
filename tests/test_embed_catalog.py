"""embed --catalog: a catalog alone is checked by ingest's own checks and embedded like a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from itemsage import schema
from itemsage.data.ingest import DataError, IngestConfig, check_products, ingest
from itemsage.data.text import Vocabulary
from itemsage.embed.catalog import CATALOG_DIR, embed_from_catalog
from itemsage.embed.shards import embed_batch
from itemsage.index.build import read_embeddings
from itemsage.model.config import model_config
from itemsage.model.model import load_model, save_model
from itemsage.model.tower import ItemSage, QueryAdapters

IMAGE_DIM = 8


def catalog_rows(n: int = 12, seed: int = 0) -> list[dict]:
    """Raw catalog rows as a shop writes them: text fields as strings, image vectors as lists."""
    rng = np.random.default_rng(seed)
    words = "oak pine chair table lamp red blue linen wool modern rustic".split()
    return [{"product_id": f"p{i:03d}", "title": " ".join(rng.choice(words, 3)), "brand": str(rng.choice(words)),
             "colors": [str(rng.choice(words))],
             "image_embeddings": rng.standard_normal((1 + i % 2, IMAGE_DIM)).round(3).tolist()} for i in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = model_config("tiny")
    vocab = Vocabulary.build([[r["title"]] for r in catalog_rows(30)])
    directory = tmp_path_factory.mktemp("model")
    save_model(directory, ItemSage(cfg, len(vocab), IMAGE_DIM), QueryAdapters({"search": 384}, cfg.out_dim), cfg,
               vocab, image_dim=IMAGE_DIM, query_dims={"search": 384})
    return directory


def bad_rows() -> list[dict]:
    rows = catalog_rows()
    rows[3]["image_embeddings"] = [[1.0, 2.0, 3.0]]  # wrong width for this model (8)
    rows[5]["product_id"] = "p000"  # duplicate of row 0
    rows[7]["product_id"] = ""  # missing
    return rows


def test_catalog_is_checked_as_ingest_checks_it(tmp_path, model_dir):
    catalog = write_jsonl(bad_rows(), tmp_path / "in" / "catalog.jsonl")
    summary, rejected = embed_from_catalog(model_dir, catalog, tmp_path / "emb", batch_size=4, progress=False)
    assert rejected == 3 and summary.count == 9

    # The reference: ingest of the same catalog (with one log row), image width fixed to the model's.
    log_row = {"surface": "search", "engagement": "click", "product_id": "p001", "timestamp": "2024-01-01T00:00:00Z",
               "query_text": "oak"}
    logs = write_jsonl([log_row], tmp_path / "in" / "logs.jsonl")
    ingest(catalog, logs, tmp_path / "ds", IngestConfig(image_dim=IMAGE_DIM, progress=False, max_unigrams=100,
                                                        max_bigrams=100, max_trigrams=100))

    def entries(path: Path) -> list[tuple]:
        return [(e["file"], e["row"], e["reason"], e["detail"])
                for e in map(json.loads, path.read_text().splitlines()) if e["file"].endswith("catalog.jsonl")]

    staged = tmp_path / "emb" / CATALOG_DIR
    # The same rows, reasons and details; only where the image width comes from is worded for each
    # (ingest: its --image-dim; embed --catalog: the model, which no flag changes).
    ingest_width = "the dataset's image width is 8, set by --image-dim (ingest.image_dim)"
    model_width = "this model's image width is 8 (the width of the image vectors it was trained on)"
    assert entries(staged / schema.REJECTS_FILE) == [
        (f, r, reason, detail.replace(ingest_width, model_width))
        for f, r, reason, detail in entries(tmp_path / "ds" / schema.REJECTS_FILE)]
    assert model_width in entries(staged / schema.REJECTS_FILE)[0][3]
    assert [r for _, _, r, _ in entries(staged / schema.REJECTS_FILE)] == [
        "bad_vector_width", "duplicate_product_id", "missing_product_id"]
    ours = pq.read_table(staged / schema.PRODUCTS_FILE)
    theirs = pq.read_table(tmp_path / "ds" / schema.PRODUCTS_FILE).select(ours.column_names)
    assert ours.equals(theirs)

    # Each vector equals the product embedded alone from ingest's products.parquet.
    ids, vectors, _ = read_embeddings(tmp_path / "emb")
    model = load_model(model_dir)
    for row in range(theirs.num_rows):
        alone = embed_batch(model, theirs.slice(row, 1))
        assert ids[row] == alone.column(schema.PRODUCT_ID)[0].as_py()
        np.testing.assert_allclose(vectors[row], alone.column("vector")[0].as_py(), atol=1e-5)


def test_in_memory_catalogs_give_the_same_products(tmp_path):
    rows = bad_rows()
    path = write_jsonl(rows, tmp_path / "catalog.jsonl")

    def products(catalog) -> pa.Table:
        return pa.concat_tables(t for t, _ in check_products(catalog, image_dim=IMAGE_DIM))

    from_file = products(path)
    assert from_file.num_rows == 9
    assert products(rows).equals(from_file)
    assert products(pa.Table.from_pylist(rows)).equals(from_file)
    pd = pytest.importorskip("pandas")
    assert products(pd.DataFrame(rows)).equals(from_file)


def test_rerun_resumes_and_incremental_reembeds_only_changes(tmp_path, model_dir):
    rows = catalog_rows()
    catalog = write_jsonl(rows, tmp_path / "catalog.jsonl")
    first, _ = embed_from_catalog(model_dir, catalog, tmp_path / "emb", batch_size=4, progress=False)
    assert first.embedded == 12
    again, _ = embed_from_catalog(model_dir, catalog, tmp_path / "emb", batch_size=4, progress=False)
    assert again.embedded == 0  # already complete
    rows[2]["title"] = "brand new title"
    rows.append({"product_id": "p999", "title": "new lamp", "image_embeddings": [[0.5] * IMAGE_DIM]})
    write_jsonl(rows, catalog)
    update, _ = embed_from_catalog(model_dir, catalog, tmp_path / "emb", batch_size=4, incremental=True,
                                   progress=False)
    assert (update.embedded, update.reused, update.count) == (2, 11, 13)


def test_a_catalog_with_every_row_rejected_is_refused(tmp_path, model_dir):
    rows = [dict(r, image_embeddings=[[1.0, 2.0]]) for r in catalog_rows(4)]
    catalog = write_jsonl(rows, tmp_path / "catalog.jsonl")
    with pytest.raises(DataError, match="every one of the 4 catalog rows was rejected"):
        embed_from_catalog(model_dir, catalog, tmp_path / "emb", progress=False)
    assert not (tmp_path / "emb").exists()


def test_cli_embeds_a_catalog(tmp_path, model_dir):
    from typer.testing import CliRunner

    from itemsage.cli import app

    catalog = write_jsonl(bad_rows(), tmp_path / "catalog.jsonl")
    result = CliRunner().invoke(app, ["embed", str(model_dir), "--catalog", str(catalog), "--out",
                                      str(tmp_path / "emb"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 catalog row(s) rejected" in result.output and "9 products x 16 dims" in result.output
    result = CliRunner().invoke(app, ["embed", str(model_dir), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--catalog" in result.output


def test_catalog_embedding_serves_products_as_queries_from_the_models_source(tmp_path):
    """train records its dataset's product_query source in the model; embed --catalog then writes each
    product's frozen query vector from that source, so the index answers query_vector by product id:
    for an image source, the product's main image vector (the first of its image_embeddings)."""
    from test_train import make_dataset, tiny

    from itemsage import artifacts
    from itemsage.index.build import build_from_embeddings
    from itemsage.index.faiss_index import ProductIndex
    from itemsage.train.loop import train

    data = make_dataset(tmp_path / "data", n_products=24, n_train=120, n_eval=30, n_test=30)
    entry = {"source": "image", "fields": [schema.IMAGE_EMBEDDINGS], "dim": IMAGE_DIM}
    artifacts.write_manifest(data, "dataset", extra={schema.PRODUCT_QUERY: entry})  # as ingest writes it
    result = train(data, tmp_path / "run", tiny(max_steps=2), progress=False)
    assert load_model(result.model_dir).extra[schema.PRODUCT_QUERY] == entry

    rows = catalog_rows(12)
    catalog = write_jsonl(rows, tmp_path / "in" / "catalog.jsonl")
    embed_from_catalog(result.model_dir, catalog, tmp_path / "emb", batch_size=4, progress=False)
    _, version_dir = build_from_embeddings(tmp_path / "emb", tmp_path / "index", version="v1")
    index = ProductIndex.load(version_dir)
    ids = ["p005", "p000", "p011", "p005"]
    main_images = np.array([rows[int(pid[1:])]["image_embeddings"][0] for pid in ids], np.float32)
    np.testing.assert_array_equal(index.query_vector(ids), main_images)
    assert index.product_query == entry


def test_catalog_with_a_product_without_image_gets_no_query_vectors(tmp_path, caplog):
    """An image source cannot give a product without an image a query vector: none are written, with
    a warning (the catalog is still embedded)."""
    torch.manual_seed(0)
    cfg = model_config("tiny")
    vocab = Vocabulary.build([[r["title"]] for r in catalog_rows(30)])
    entry = {"source": "image", "fields": [schema.IMAGE_EMBEDDINGS], "dim": IMAGE_DIM}
    model = tmp_path / "model"
    save_model(model, ItemSage(cfg, len(vocab), IMAGE_DIM), QueryAdapters({"closeup": IMAGE_DIM}, cfg.out_dim), cfg,
               vocab, image_dim=IMAGE_DIM, query_dims={"closeup": IMAGE_DIM}, extra={schema.PRODUCT_QUERY: entry})
    rows = catalog_rows(6)
    del rows[2]["image_embeddings"]
    catalog = write_jsonl(rows, tmp_path / "in" / "catalog.jsonl")
    with caplog.at_level("WARNING", logger="itemsage.embed"):
        summary, rejected = embed_from_catalog(model, catalog, tmp_path / "emb", batch_size=4, progress=False)
    assert (summary.count, rejected) == (6, 0)
    assert "1 of the catalog's products have no image" in caplog.text
    assert schema.QUERY_VECTOR not in pq.read_schema(tmp_path / "emb" / "part-00000.parquet").names


def test_catalog_text_query_vectors_load_the_text_encoder_once(tmp_path, monkeypatch):
    """A text source without a given encoder loads MiniLM once for the whole catalog, not once per
    row group of the staged products."""
    from itemsage.embed.catalog import stage_catalog
    from itemsage.encoders import text as query_encoder

    made = []

    class Counting:
        dim = 4

        def __init__(self):
            made.append(self)

        def encode(self, texts, batch_size=256, progress=False):
            return np.ones((len(texts), self.dim), np.float32) / 2

    monkeypatch.setattr(query_encoder, "TextQueryEncoder", Counting)
    catalog = write_jsonl(catalog_rows(6), tmp_path / "in" / "catalog.jsonl")
    stage_catalog(catalog, tmp_path / "staged", text_fields=("title",), image_dim=IMAGE_DIM, max_images=2,
                  batch_rows=2, product_query={"source": "text", "fields": ["title"], "dim": 4})
    staged = pq.ParquetFile(tmp_path / "staged" / schema.PRODUCTS_FILE)
    assert staged.num_row_groups == 3 and staged.read().column(schema.QUERY_VECTOR).to_pylist() == [[0.5] * 4] * 6
    assert len(made) == 1


def test_a_refused_catalog_changes_nothing(tmp_path, model_dir):
    """embed --catalog B into an --out holding A's finished embeddings, without --incremental, is
    refused before anything is written: OUT/catalog/ still holds A, as the shards do."""
    from itemsage.artifacts import ArtifactError

    rows = catalog_rows(12)
    a = write_jsonl(rows[:6], tmp_path / "in" / "a.jsonl")
    b = write_jsonl(rows[6:], tmp_path / "in" / "b.jsonl")
    out = tmp_path / "emb"
    embed_from_catalog(model_dir, a, out, batch_size=4, progress=False)

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = files()
    with pytest.raises(ArtifactError, match="another version of the catalog"):
        embed_from_catalog(model_dir, b, out, batch_size=4, progress=False)
    assert files() == before
    staged = pq.read_table(out / CATALOG_DIR / schema.PRODUCTS_FILE).column(schema.PRODUCT_ID).to_pylist()
    assert staged == [r["product_id"] for r in rows[:6]] == list(read_embeddings(out)[0])
    # the refused run left no temporary directory either
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [CATALOG_DIR]
    # with --incremental the same catalog B is taken, and OUT/catalog/ then holds B
    summary, _ = embed_from_catalog(model_dir, b, out, batch_size=4, incremental=True, progress=False)
    assert summary.count == 6 and list(read_embeddings(out)[0]) == [r["product_id"] for r in rows[6:]]


def test_the_service_names_the_product_without_an_image_as_the_cause(tmp_path):
    """An index built from such a catalog answers closeup by product id with a 409 that gives the
    real cause (a product without an image), not "made before products could be queries"."""
    from itemsage.index.build import build_from_embeddings
    from itemsage.serve.bodies import CloseupRequest, RequestError
    from itemsage.serve.service import Service

    torch.manual_seed(0)
    cfg = model_config("tiny")
    vocab = Vocabulary.build([[r["title"]] for r in catalog_rows(30)])
    entry = {"source": "image", "fields": [schema.IMAGE_EMBEDDINGS], "dim": IMAGE_DIM}
    model = tmp_path / "model"
    save_model(model, ItemSage(cfg, len(vocab), IMAGE_DIM), QueryAdapters({"closeup": IMAGE_DIM}, cfg.out_dim), cfg,
               vocab, image_dim=IMAGE_DIM, query_dims={"closeup": IMAGE_DIM}, extra={schema.PRODUCT_QUERY: entry})
    rows = catalog_rows(6)
    del rows[2]["image_embeddings"], rows[4]["image_embeddings"]
    embed_from_catalog(model, write_jsonl(rows, tmp_path / "catalog.jsonl"), tmp_path / "emb", progress=False)
    build_from_embeddings(tmp_path / "emb", tmp_path / "index")
    service = Service(model, tmp_path / "index")
    with pytest.raises(RequestError) as refused:
        service.closeup(CloseupRequest(product_id="p000", k=3))
    assert refused.value.status == 409
    message = refused.value.message
    assert "2 of the catalog's products have no image" in message and "'p002'" in message, message
    assert "made before products could be queries" not in message
    # closeup with the product's learned embedding still works
    learned = service.closeup(CloseupRequest(product_id="p000", k=3, product_to_product=True, exclude_self=False))
    assert learned.ids[0] == "p000"


def test_cli_a_catalog_row_with_a_lone_surrogate_is_a_reject_naming_file_row_and_field(tmp_path, model_dir):
    """It was "error: 'utf-8' codec can't encode character '\\ud800'", naming no file, row or field."""
    from typer.testing import CliRunner

    from itemsage.cli import app

    rows = catalog_rows(6)
    rows[4]["title"] = "chair \ud800"
    catalog = write_jsonl(rows, tmp_path / "catalog.jsonl")  # json.dumps writes the lone \ud800 escape
    result = CliRunner().invoke(app, ["embed", str(model_dir), "--catalog", str(catalog), "--out",
                                      str(tmp_path / "emb"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 catalog row(s) rejected" in result.output and "5 products x 16 dims" in result.output
    (entry,) = [json.loads(line) for line in (tmp_path / "emb" / CATALOG_DIR / schema.REJECTS_FILE).open()]
    assert (entry["file"], entry["row"], entry["reason"]) == (str(catalog), 4, "bad_text_encoding")
    assert entry["detail"].startswith("title: character 6 is a lone surrogate")


def test_catalog_rejects_keep_the_first_100_rows_of_each_reason(tmp_path, model_dir):
    """The same rejects file as ingest's: counted in full, written for the first 100 rows of a reason."""
    rows = catalog_rows(150)
    for r in rows[:130]:
        r["image_embeddings"] = [[1.0, 2.0, 3.0]]  # wrong width for this model (8)
    _, rejected = embed_from_catalog(model_dir, write_jsonl(rows, tmp_path / "c.jsonl"), tmp_path / "emb",
                                     progress=False)
    written = [json.loads(line) for line in (tmp_path / "emb" / CATALOG_DIR / schema.REJECTS_FILE).open()]
    assert rejected == 130 and [e["row"] for e in written] == list(range(100))
    counts = json.loads((tmp_path / "emb" / CATALOG_DIR / "manifest.json").read_text())["counts"]
    assert (counts["rejected"], counts["rejects"]["bad_vector_width"], counts["rejects_written"]) == (130, 130, 100)


def test_embed_counts_the_products_the_model_reads_nothing_of(tmp_path, model_dir, caplog):
    """No image and no vocabulary token: the vector is exactly an empty product's; the manifest, the log
    and the CLI say how many."""
    from typer.testing import CliRunner

    from itemsage.cli import app

    rows = [{"product_id": "ja", "title": "木製の椅子"}, {"product_id": "ru", "title": "Стул из дуба"},
            {"product_id": "zz", "title": "zzqxv qqvvw"}, {"product_id": "empty"},
            {"product_id": "ok", "title": "oak chair"},
            {"product_id": "img", "title": "木製の椅子", "image_embeddings": [[0.5] * IMAGE_DIM]}]
    catalog = write_jsonl(rows, tmp_path / "catalog.jsonl")
    with caplog.at_level("WARNING"):
        result = CliRunner().invoke(app, ["embed", str(model_dir), "--catalog", str(catalog), "--out",
                                          str(tmp_path / "emb"), "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["counts"] == {"products": 6, "unreadable": 4}
    assert "the model reads nothing of 4 of the 6 products" in " ".join(result.output.split())
    assert "4 of 6 products (66.7%) have no image and no word the model's vocabulary knows (e.g. ja, ru, zz)" \
        in caplog.text
    ids, vectors, _ = read_embeddings(tmp_path / "emb")
    by_id = dict(zip(ids.tolist(), vectors))
    for pid in ("ja", "ru", "zz"):  # the count is of exactly these: an empty product's vector
        assert np.array_equal(by_id[pid], by_id["empty"]), pid
    for pid in ("ok", "img"):
        assert not np.array_equal(by_id[pid], by_id["empty"]), pid
