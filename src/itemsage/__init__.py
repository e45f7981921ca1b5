"""ItemSage: one multi-modal product embedding for every shopping surface.

    import itemsage
    model = itemsage.load("runs/train/model")
    P = model.encode_products(products)                 # [N, D] float32 unit rows
    Q = model.encode_queries("search", ["red linen chair"])

Importing the package is cheap: torch and the model code load inside `load`, pyarrow on first use
of `itemsage.DataError` (the error `encode_products` raises for products it cannot use).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(directory: Any, device: Any = "cpu") -> Any:
    """A trained model directory (`itemsage train`'s OUT/model) -> `itemsage.model.LoadedModel`,
    with `encode_products(products)` and `encode_queries(surface, queries)` (numpy, unit rows)."""
    from itemsage.model.model import load_model

    return load_model(directory, device)


def __getattr__(name: str) -> Any:
    """`itemsage.DataError`, imported on first use (PEP 562) so that `import itemsage` stays cheap."""
    if name == "DataError":
        from itemsage.data.readers import DataError

        return DataError
    raise AttributeError(f"module 'itemsage' has no attribute {name!r}")


__all__ = ["DataError", "__version__", "load"]
