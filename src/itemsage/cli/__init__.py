"""The `itemsage` command line: one module per command group, registered on one Typer app.

The modules are imported in pipeline order, which is the order `itemsage --help` lists them in.
"""

from itemsage.cli.common import app
from itemsage.cli import data  # noqa: F401, I001  demo-data, ingest
from itemsage.cli import train  # noqa: F401  train
from itemsage.cli import embed  # noqa: F401  embed
from itemsage.cli import index  # noqa: F401  index
from itemsage.cli import serve  # noqa: F401  serve
from itemsage.cli import evaluate  # noqa: F401  evaluate, compare
from itemsage.cli import demo  # noqa: F401  demo

__all__ = ["app"]
