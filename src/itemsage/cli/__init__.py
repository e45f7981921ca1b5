"""The `itemsage` command line: one module per command group, registered on one Typer app.

The modules are imported in pipeline order, which is the order `itemsage --help` lists them in.
"""

from itemsage.cli import (
    data,  # noqa: F401, I001  demo-data, ingest
    demo,  # noqa: F401  demo
    embed,  # noqa: F401  embed
    evaluate,  # noqa: F401  evaluate, compare
    graph,  # noqa: F401  graph
    index,  # noqa: F401  index
    serve,  # noqa: F401  serve
    train,  # noqa: F401  train
)
from itemsage.cli.common import app

__all__ = ["app"]
