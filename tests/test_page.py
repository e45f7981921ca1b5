"""The page at `/` of the service: its helpers (titles, images) over HTTP, and the page itself in a
real browser (headless Chromium driven by Playwright: type a query, click a result).

The browser test skips when Playwright or Chromium is absent. Its screenshots are saved under the
test's tmp dir, or under $ITEMSAGE_SCREENSHOTS when that is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from itemsage import schema
from itemsage.data.text import Vocabulary
from itemsage.embed.shards import embed_batch
from itemsage.index.faiss_index import ProductIndex
from itemsage.index.versions import publish, version_path
from itemsage.model.config import model_config
from itemsage.model.model import load_model, save_model
from itemsage.model.tower import ItemSage, QueryAdapters
from itemsage.serve import app as serve

IMAGE_DIM = 8
COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 70), "black": (30, 30, 30),
           "white": (250, 246, 232), "brown": (120, 80, 40)}
KINDS = [("chair", "oak"), ("table", "pine"), ("lamp", "brass"), ("sofa", "linen")]


class FakeTextEncoder:
    """text -> a unit vector of width 384 seeded by the text's sha256 (no model download)."""

    dim = 384

    def encode(self, texts, batch_size=256):
        out = []
        for t in texts:
            v = np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")).standard_normal(384)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model, a flat index over 24 products, and a catalog file with titles and (for even
    products) image files."""
    base = tmp_path_factory.mktemp("page")
    rng = np.random.default_rng(0)
    (base / "img").mkdir()
    rows, catalog = [], []
    for k, (item, material) in enumerate(KINDS):
        for c, colour in enumerate(COLOURS):
            pid = f"p{6 * k + c:02d}"
            title = f"{colour} {material} {item}"
            row = {schema.PRODUCT_ID: pid, **{f: [] for f in schema.TEXT_FIELDS}, "title": [title],
                   schema.IMAGE_EMBEDDINGS: [rng.standard_normal(IMAGE_DIM).astype(np.float32).tolist()]}
            rows.append(row)
            entry = {"product_id": pid, "title": title}
            if (6 * k + c) % 2 == 0:
                Image.new("RGB", (64, 64), COLOURS[colour]).save(base / "img" / f"{pid}.png")
                entry["image_paths"] = [f"img/{pid}.png"]  # relative to the catalog file
            catalog.append(entry)
    (base / "catalog.jsonl").write_text("".join(json.dumps(e) + "\n" for e in catalog))
    table = pa.Table.from_pylist(rows, schema=pa.schema(
        [(schema.PRODUCT_ID, pa.string())] + [(f, pa.list_(pa.string())) for f in schema.TEXT_FIELDS]
        + [(schema.IMAGE_EMBEDDINGS, pa.list_(pa.list_(pa.float32())))]))
    torch.manual_seed(0)
    cfg = model_config("tiny", dropout=0.0)
    vocab = Vocabulary.build(r["title"] for r in rows)
    save_model(base / "model", ItemSage(cfg, len(vocab), IMAGE_DIM),
               QueryAdapters({"search": 384, "closeup": IMAGE_DIM, "home": cfg.out_dim}, cfg.out_dim), cfg, vocab,
               image_dim=IMAGE_DIM, query_dims={"search": 384, "closeup": IMAGE_DIM, "home": cfg.out_dim})
    model = load_model(base / "model")
    vectors = embed_batch(model, table)
    ids = np.asarray(vectors.column(schema.PRODUCT_ID).to_pylist(), dtype=object)
    matrix = np.asarray(vectors.column("vector").to_pylist(), np.float32)
    # Each product's frozen query vector: its main image vector (what closeup by product_id queries with).
    frozen = np.asarray([r[schema.IMAGE_EMBEDDINGS][0] for r in rows], np.float32)
    attributes = pa.table({"kind": [item for item, _ in KINDS for _ in COLOURS],  # filterable columns
                           "colour": [colour for _ in KINDS for colour in COLOURS],
                           "price": [float(10 + i) for i in range(len(rows))]})
    index = ProductIndex.build(ids, matrix, kind="flat", query_vectors=frozen, product_query={"source": "image"},
                               attributes=attributes)
    directory = version_path(base / "index", "v1")
    index.save(directory, inputs={"model": model.fingerprint})
    publish(base / "index", directory)
    return {"base": base, "ids": list(ids), "vectors": matrix, "catalog": base / "catalog.jsonl", "frozen": frozen,
            "kind": dict(zip(ids, attributes.column("kind").to_pylist())),
            "colour": dict(zip(ids, attributes.column("colour").to_pylist())),
            "closeup_weight": model.model.adapters.maps["closeup"].weight.detach().numpy().astype(np.float64),
            "titles": {e["product_id"]: e["title"] for e in catalog}}


def make_app(world, products=None):
    return serve.create_app(world["base"] / "model", world["base"] / "index", text_encoder=FakeTextEncoder(),
                            products=products if products is not None else world["catalog"])


def test_page_and_helpers(world):
    client = TestClient(make_app(world))
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "ItemSage neighbours" in page.text and 'api("/v1/" + surface' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    found = client.get("/page/products", params={"ids": "p00,p01,nope"}).json()["products"]
    assert found == [{"id": "p00", "title": "red oak chair", "images": 1},
                     {"id": "p01", "title": "blue oak chair", "images": 0},
                     {"id": "nope", "title": None, "images": 0}]
    image = client.get("/page/image/p00")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == (world["base"] / "img" / "p00.png").read_bytes()
    assert client.get("/page/image/p01").status_code == 404  # no image in the catalog
    assert client.get("/page/image/p00", params={"i": 5}).status_code == 404
    assert client.get("/page/image/..%2F..%2Fetc%2Fpasswd").status_code == 404  # the router's own 404
    missing = client.get("/page/image/p00.png")  # reaches the handler: not a catalog product
    assert missing.status_code == 404 and "p00.png" in missing.text


def test_the_page_has_a_content_security_policy_and_reflects_nothing(world):
    """The policy allows the page's own inline script and style by their sha256 and nothing else; the
    page is the packaged file byte for byte whatever the request holds."""
    import base64
    import re

    client = TestClient(make_app(world))
    page = client.get("/")
    html = (Path(serve.__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    policy = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert policy == {"default-src": "'none'", "script-src": sha(script), "style-src": sha(style),
                      "img-src": "'self'", "connect-src": "'self'", "base-uri": "'none'",
                      "form-action": "'none'", "frame-ancestors": "'none'"}
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/page/image/p00").headers["x-content-type-options"] == "nosniff"
    probe = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>"
    for response in (page, client.get("/", params={"q": probe, "product": probe}),
                     client.get("/", headers={"Referer": probe, "User-Agent": probe}), client.get("/?" + probe)):
        assert response.status_code == 200 and response.content == html.encode("utf-8")


def test_titles_from_a_dataset_directory(world, tmp_path):
    from itemsage.data.ingest import IngestConfig, ingest

    logs = tmp_path / "logs.jsonl"
    logs.write_text(json.dumps({"surface": "search", "engagement": "click", "product_id": "p00",
                                "timestamp": "2024-01-01T00:00:00Z", "query_text": "oak"}) + "\n")
    catalog = tmp_path / "catalog.jsonl"  # images given as vectors in the dataset; paths kept for the page
    rows = [json.loads(line) for line in world["catalog"].read_text().splitlines()]
    shutil.copytree(world["base"] / "img", tmp_path / "img")
    catalog.write_text("".join(json.dumps(dict(r, image_embeddings=[[0.5] * IMAGE_DIM])) + "\n" for r in rows))
    ingest(catalog, logs, tmp_path / "ds", IngestConfig(progress=False, max_unigrams=100, max_bigrams=100,
                                                        max_trigrams=100))
    from itemsage.serve.page import load_titles

    titles = load_titles(tmp_path / "ds")
    assert titles.titles == world["titles"]
    assert titles.images["p02"] == [tmp_path / "img" / "p02.png"] and "p03" not in titles.images


def test_openapi_describes_closeup_vector_and_max_clusters(world):
    spec = TestClient(make_app(world)).get("/openapi.json").json()["components"]["schemas"]
    vector = spec["CloseupRequest"]["properties"]["vector"]["description"]
    assert "query_embedding" in vector and "query_dims.closeup" in vector and not vector.startswith("An image vector")
    assert "clusters" in spec["HomeRequest"]["properties"]["max_clusters"]["description"]


# ---- the page in a real browser -----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture()
def server(world):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(make_app(world), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started, "the test server did not start"
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def wait_until(page, expression: str, timeout_s: float = 15.0) -> None:
    """Poll a JavaScript expression until it is truthy. Not Playwright's wait_for_function: that compiles
    its predicate with eval inside the page, which the page's Content-Security-Policy forbids (as it
    should); page.evaluate goes through the DevTools protocol, which the policy does not govern."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def test_the_page_in_a_browser(world, server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    shots = Path(os.environ.get("ITEMSAGE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    ids, vectors, titles = world["ids"], world["vectors"], world["titles"]

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            blocked = []  # anything the Content-Security-Policy stops (the page must need nothing it forbids)
            page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
            response = page.goto(server + "/")
            assert "script-src 'sha256-" in response.headers["content-security-policy"]
            wait_until(page, "document.getElementById('info').textContent.includes('24 products')")

            # Search: type a query, see the top k with titles, scores, the surface and the version.
            page.fill("#search-text", "red oak chair")
            page.press("#search-text", "Enter")
            page.wait_for_selector("#results li")
            items = page.locator("#results li")
            assert items.count() == 12
            assert page.locator("#status .surface").inner_text() == "search"
            assert page.locator("#status .version").inner_text() == "v1"
            shown = [items.nth(i).get_attribute("data-id") for i in range(12)]
            for i, pid in enumerate(shown):
                assert items.nth(i).locator(".title").inner_text() == titles[pid]
            first_score = float(items.nth(0).locator(".score").inner_text().split()[-1])
            assert first_score >= float(items.nth(11).locator(".score").inner_text().split()[-1])
            wait_until(page, "[...document.querySelectorAll('#results img')].every(i => i.complete)")
            assert page.locator("#results img").count() == sum(int(pid[1:]) % 2 == 0 for pid in shown)
            assert page.evaluate("document.querySelector('#results img').naturalWidth") == 64
            page.screenshot(path=str(shots / "page-search.png"), full_page=True)

            # Click a result: its neighbours by closeup (its frozen vector through the closeup adapter), the
            # exact top 12 of the index (itself left out).
            clicked = shown[2]
            items.nth(2).click()
            wait_until(page, "document.querySelector('#status .surface')?.textContent === 'closeup'")
            wait_until(
                page, f"document.querySelector('#results li') && "
                f"document.querySelector('#query .pid')?.textContent === '{clicked}'")
            x = world["frozen"][ids.index(clicked)].astype(np.float64)
            q = world["closeup_weight"] @ (x / np.linalg.norm(x))
            scores = vectors @ (q / np.linalg.norm(q))
            expected = [ids[j] for j in np.argsort(-scores, kind="stable") if ids[j] != clicked][:12]
            got = [items.nth(i).get_attribute("data-id") for i in range(items.count())]
            assert got == expected
            assert page.locator("#query .title").inner_text() == titles[clicked]
            wait_until(page, "[...document.querySelectorAll('img')].every(i => i.complete)")
            page.screenshot(path=str(shots / "page-closeup.png"), full_page=True)

            # A product id typed in; an unknown one shows the server's message.
            page.fill("#product-id", "nope")
            page.press("#product-id", "Enter")
            wait_until(page, "document.getElementById('error').textContent.length > 0")
            assert "nope" in page.locator("#error").inner_text()
            assert blocked == []
            # ... and the policy is enforced: an injected inline script does not run, and is reported
            ran = page.evaluate("(() => { const s = document.createElement('script'); s.textContent = "
                                "'window.injected = 1'; document.body.appendChild(s); return window.injected === 1; })()")
            deadline = time.monotonic() + 5
            while not blocked and time.monotonic() < deadline:
                page.wait_for_timeout(50)  # the violation report arrives as a console event
            assert ran is False and any("script-src" in m for m in blocked), blocked

            # Filters: a shared URL restores the search and its filter; only lamps come back (6 of them).
            def shown_ids() -> list[str]:
                wait_until(page, "document.getElementById('status').textContent.includes('top')")
                found = page.locator("#results li")
                return [found.nth(i).get_attribute("data-id") for i in range(found.count())]

            page.goto(server + "/?q=red+oak+chair&kind=lamp")
            got = shown_ids()
            assert len(got) == 6 and all(world["kind"][pid] == "lamp" for pid in got)
            assert page.locator("#search-text").input_value() == "red oak chair"
            assert page.locator("#chips .chip").inner_text().startswith("kind is lamp")
            # One more, picked from the values the index stores: colour is not red.
            page.select_option("#filter-column", "colour")
            page.select_option("#filter-op", "not")
            assert "red" in page.eval_on_selector_all("#filter-values option", "o => o.map(x => x.value)")
            page.fill("#filter-value", "red")
            page.press("#filter-value", "Enter")
            wait_until(page, "location.search.includes('colour.not=red')")
            wait_until(page, "document.querySelectorAll('#results li').length === 5")
            got = shown_ids()
            assert all(world["kind"][p] == "lamp" and world["colour"][p] != "red" for p in got) and len(got) == 5
            page.screenshot(path=str(shots / "page-filter.png"), full_page=True)
            # Reloaded, the URL gives the same view; a result's neighbours keep the filters.
            page.reload()
            assert shown_ids() == got and page.locator("#chips .chip").count() == 2
            page.locator("#results li").nth(0).click()
            wait_until(page, "new URLSearchParams(location.search).get('product') !== null")
            wait_until(page, "document.querySelector('#status .surface')?.textContent === 'closeup'")
            got = shown_ids()
            assert got and all(world["kind"][p] == "lamp" and world["colour"][p] != "red" for p in got)
            # Removing a filter runs the view again without it.
            page.locator("#chips .chip button").nth(1).click()
            wait_until(page, "!location.search.includes('colour.not')")
            wait_until(page, "document.querySelectorAll('#results li').length === 5")  # 6 lamps, less itself
            # Nothing the URL holds is read as HTML, and a bad filter shows the server's 422 as text.
            hostile = "<img src=x onerror=window.__pwned=1>"
            from urllib.parse import urlencode

            page.goto(server + "/?" + urlencode([("q", hostile), (hostile, "1")]))
            wait_until(page, "document.getElementById('error').textContent.length > 0")
            assert "not a filterable column" in page.locator("#error").inner_text()
            assert page.locator("#chips .chip").inner_text().startswith(hostile + " is 1")
            assert page.evaluate("window.__pwned") is None and page.locator("#chips img, #error img").count() == 0
        finally:
            browser.close()
    assert (shots / "page-search.png").stat().st_size > 0 and (shots / "page-closeup.png").stat().st_size > 0
