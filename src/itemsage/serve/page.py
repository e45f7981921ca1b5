"""The page at `/` of `itemsage serve`: look at what the model retrieves.

One static file (static/index.html: HTML, CSS and a little JavaScript, no build step, nothing
fetched from the internet) calls the same JSON endpoints as any client (/readyz, /v1/search,
/v1/closeup), plus two read-only helpers this module adds for what the index does not hold:

    GET /page/products?ids=a,b,c        titles and image counts of those products
    GET /page/image/{product_id}?i=0    the product's i-th image file, as named in the catalog

Titles and images come from `--products`, read once at start-up into memory (about 100 bytes per
product plus its paths): a dataset directory (`itemsage ingest`: titles from products.parquet,
image paths from the catalog files its manifest names, when they still exist) or a catalog file or
directory. Without it the page shows product ids only. Image files are served only when the catalog
names them for that product, so the route cannot read any other file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from itemsage import schema

log = logging.getLogger(__name__)

MAX_IDS = 1000  # ids per /page/products request


@dataclass
class Titles:
    """product_id -> title and image files, for the page."""

    titles: dict[str, str] = field(default_factory=dict)
    images: dict[str, list[Path]] = field(default_factory=dict)
    source: str | None = None

    def describe(self, product_ids: list[str]) -> list[dict[str, Any]]:
        return [{"id": pid, "title": self.titles.get(pid), "images": len(self.images.get(pid, ()))}
                for pid in product_ids]


def _text(value: Any) -> str | None:
    if isinstance(value, list):
        value = " ".join(str(v) for v in value if v)
    return str(value) if value else None


def _read_catalog(path: Path, into: Titles, *, titles: bool) -> None:
    """Add the titles (when `titles`) and image paths of a catalog file or directory to `into`.
    Relative image paths are resolved against the file's directory, as ingest resolves them."""
    from itemsage.data.ingest import catalog_sources

    columns = [schema.PRODUCT_ID, "title", schema.IMAGE_PATHS]
    for src in catalog_sources(path):
        for _, batch in src.batches(65_536, columns):
            rows = batch.to_pylist() if src.fmt == "parquet" else batch
            for row in rows:
                pid = row.get(schema.PRODUCT_ID)
                if pid is None or pid == "":
                    continue
                pid = str(pid)
                if titles and pid not in into.titles and _text(row.get("title")):
                    into.titles[pid] = _text(row.get("title"))
                paths = row.get(schema.IMAGE_PATHS)
                if isinstance(paths, str):
                    paths = [paths]
                if paths and pid not in into.images:
                    into.images[pid] = [p if p.is_absolute() else src.path.parent / p
                                        for p in (Path(str(x)) for x in paths if x)]


def load_titles(path: str | Path | None) -> Titles:
    """Titles and image files from a dataset directory or a catalog (see the module doc)."""
    found = Titles()
    if path is None:
        return found
    path = Path(path)
    found.source = str(path)
    manifest = path / "manifest.json"
    if path.is_dir() and manifest.is_file() and json.loads(manifest.read_text()).get("kind") == "dataset":
        import pyarrow.parquet as pq

        table = pq.read_table(path / schema.PRODUCTS_FILE, columns=[schema.PRODUCT_ID, "title"])
        for pid, title in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
            if _text(title):
                found.titles[pid] = _text(title)
        catalogs = json.loads(manifest.read_text()).get("input_files", {}).get("catalog", [])
        for name in catalogs:
            if Path(name).is_file():
                _read_catalog(Path(name), found, titles=False)
            else:
                log.info("page: catalog file %s (named by the dataset) is gone; no images for its products", name)
    else:
        _read_catalog(path, found, titles=True)
    log.info("page: %d titles and %d products with images from %s", len(found.titles), len(found.images), path)
    return found


def page_html() -> str:
    return resources.files("itemsage.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def page_headers(html: str) -> dict[str, str]:
    """The page's security headers. Content-Security-Policy: the page's own inline <script> and <style>
    blocks run, allowed by their sha256 (computed here from the served HTML, so an edit to the file
    keeps working), and nothing else: no other script or style (no 'unsafe-inline'), requests and
    images to this origin only, no plugins, frames, base URL or form target. nosniff: the browser
    takes the declared content type. The page is static and reflects nothing of a request."""
    import base64
    import hashlib
    import re

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}\b[^>]*>(.*?)</{tag}>", html, flags=re.S | re.I)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in blocks) or "'none'"

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src 'self'; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"}


def add_page(app: Any, products: str | Path | None) -> None:
    """Add `/` and the /page/* helpers to the FastAPI `app`."""
    from fastapi import Query
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    titles = load_titles(products)
    html = page_html()
    headers = page_headers(html)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> Any:  # Any: the local imports are no annotations FastAPI can resolve
        return HTMLResponse(html, headers=headers)

    @app.get("/page/products", tags=["page"], response_model=None)
    async def product_titles(ids: str = Query("", description="Comma-separated product ids.")) -> Any:
        """Titles and image counts of products (from `itemsage serve --products`)."""
        wanted = [i for i in ids.split(",") if i][:MAX_IDS]
        return JSONResponse({"products": titles.describe(wanted), "source": titles.source})

    @app.get("/page/image/{product_id}", tags=["page"], response_model=None)
    async def product_image(product_id: str, i: int = 0) -> Any:
        """The product's i-th image file, as the catalog names it."""
        paths = titles.images.get(product_id, [])
        if not 0 <= i < len(paths) or not paths[i].is_file():
            return JSONResponse({"detail": f"no image {i} for product {product_id!r}"}, status_code=404)
        return FileResponse(paths[i], headers={"X-Content-Type-Options": "nosniff"})
