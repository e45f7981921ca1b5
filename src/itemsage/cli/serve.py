"""`itemsage serve`: the candidate-generation service and its page (serve/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itemsage.cli.common import _PROGRESS_HELP, _STATE, Backend, _progress, app, console, fail


@app.command("serve")
def serve_cmd(
    model: Path = typer.Option(..., "--model", help="A model directory (itemsage train)."),
    index: Optional[Path] = typer.Option(None, "--index", help="An index root (itemsage index); serves its CURRENT version."),
    backend: Backend = typer.Option(Backend.faiss, "--backend", help="faiss (--index) or milvus (--uri)."),
    uri: Optional[str] = typer.Option(None, "--uri", show_default=False,
                                      help="Milvus URI: ./file.db (Milvus Lite) or http://host:19530."),
    collection: str = typer.Option("itemsage", "--collection", help="Milvus alias naming the served version."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; loopback by default."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    reload_token_env: str = typer.Option(
        "ITEMSAGE_RELOAD_TOKEN", "--reload-token-env",
        help="Environment variable holding the /admin/reload bearer token (reload is off when it is unset). "
             "A variable, not an option, so the token never shows in `ps`.",
    ),
    threads: int = typer.Option(1, "--threads", help="Torch and faiss threads per request (requests run concurrently)."),
    query_encoder: str = typer.Option("onnx", "--query-encoder",
                                      help="Text query encoder: onnx (MiniLM via ONNX Runtime), onnx-int8, or torch."),
    query_cache: int = typer.Option(10_000, "--query-cache", help="Recent search texts whose vectors are kept (0: off)."),
    query_batch: int = typer.Option(8, "--query-batch", help="Encode up to this many concurrent search texts "
                                    "together (1: one at a time)."),
    products: Optional[Path] = typer.Option(
        None, "--products", show_default=False,
        help="Titles and images for the page at /: a dataset directory (itemsage ingest) or a catalog file "
             "or directory (default: ids only)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=_PROGRESS_HELP),
) -> None:
    """Serve candidate retrieval over HTTP: a page at /, search, closeup, home, embed, metrics and hot reload.

    Example:

        itemsage serve --model runs/train/model --index runs/index --products runs/data
    """
    import os

    from itemsage.artifacts import ArtifactError
    from itemsage.config import ConfigError
    from itemsage.serve.app import run

    _progress(progress)  # no bar of its own; the flag (and -q) still silence the libraries' (MiniLM loading)
    token = os.environ.get(reload_token_env) or None
    if token is None:
        console.print(f"reload and live updates disabled: ${reload_token_env} is not set", highlight=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] binding {host}: the service has no authentication except on "
                      "/admin/*; put it behind your own gateway", highlight=False)
    console.print(f"page: http://{host}:{port}/   API docs: http://{host}:{port}/docs", highlight=False)
    try:
        if backend == Backend.milvus:
            if uri is None:
                fail("--backend milvus needs --uri (the Milvus the index was written to)")
            from itemsage.index.milvus import MilvusVersions

            source = MilvusVersions(uri, collection)  # reload re-resolves the alias: the hot swap
        else:
            if index is None:
                fail("--index is required with --backend faiss (an index root from `itemsage index`)")
            source = index
        run(model, source, host=host, port=port, reload_token=token, threads=threads, query_encoder=query_encoder,
            query_cache=query_cache, query_batch=query_batch, products=products,
            log_level="warning" if _STATE["quiet"] else "info")  # -q: no uvicorn INFO lines either
    except (ConfigError, ArtifactError, ValueError, OSError, ImportError) as err:
        fail(str(err))
