"""ItemSage: one multi-modal product embedding for every shopping surface.

    import itemsage
    model = itemsage.load("runs/train/model")
    P = model.encode_products(products)                 # [N, D] float32 unit rows
    Q = model.encode_queries("search", ["red linen chair"])

Importing the package is cheap: torch and the model code load inside `load`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(directory: Any, device: Any = "cpu") -> Any:
    """A trained model directory (`itemsage train`'s OUT/model) -> `itemsage.model.LoadedModel`,
    with `encode_products(products)` and `encode_queries(surface, queries)` (numpy, unit rows)."""
    from itemsage.model.model import load_model

    return load_model(directory, device)


__all__ = ["__version__", "load"]
