"""The `itemsage` command line: thin Typer commands that parse options and call the stage functions.

Heavy imports (torch, faiss, fastapi) happen inside each command so `itemsage --help` stays quick.
The CLI prints results; library code only logs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="itemsage",
    help="ItemSage: one product embedding for search, closeup and home, trained from engagement logs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def fail(message: str, code: int = 2) -> None:
    """Print a user-facing error (no traceback) and exit non-zero."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


# ---- demo-data (demo_data.py) ----

# ---- ingest (ingest.py) ----

# ---- train (train.py) ----

# ---- embed (embed.py) ----

# ---- index (index.py) ----

# ---- serve (serve.py) ----

# ---- evaluate (evaluate.py) ----

# ---- compare (compare.py) ----

# ---- demo (demo.py) ----


if __name__ == "__main__":
    app()
