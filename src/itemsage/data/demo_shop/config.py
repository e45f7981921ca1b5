"""What the demo shop generator makes (`DemoConfig`): sizes, days, seed and the mix of surfaces.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

from itemsage import schema
from itemsage.config import ConfigError, require
from itemsage.data.demo_shop.world import brand_candidates


@dataclass(frozen=True)
class DemoConfig:
    """What to generate. Sizes scale from a thousand to millions of products."""

    products: int = 20_000
    seed: int = 0
    days: int = 28
    users: int | None = None  # None: products // 5, at least 50
    image_dim: int = 256  # the paper's PinSage width
    engagements_per_product: float = 25.0  # log rows per product, all surfaces and types
    styles: int = 24  # latent visual styles (image-only signal)
    brands: int = 300
    max_images: int = 4  # 1..max_images image vectors per product
    late_fraction: float = 0.1  # products launched during the window (cold start)
    popularity_skew: float = 0.8  # Zipf exponent of product popularity
    surface_mix: tuple[float, float, float] = (0.4, 0.4, 0.2)  # search, closeup, home queries
    start_date: str = "2024-01-01"  # first day of the logs, UTC
    catalog_chunk: int = 20_000  # products per catalog row group
    chunk_rows: int = 100_000  # about this many log rows per engagement row group

    def __post_init__(self) -> None:
        require(self.products >= 10, f"`products` ({self.products}) must be at least 10.")
        require(self.seed >= 0, f"`seed` ({self.seed}) must be a non-negative integer.")
        require(2 <= self.days <= 3650, f"`days` ({self.days}) must be between 2 and 3650.")
        require(self.users is None or self.users >= 1, f"`users` ({self.users}) must be at least 1.")
        require(8 <= self.image_dim <= 4096, f"`image_dim` ({self.image_dim}) must be in 8..4096.")
        require(self.engagements_per_product > 0,
                f"`engagements_per_product` ({self.engagements_per_product}) must be positive.")
        require(2 <= self.styles <= 1000, f"`styles` ({self.styles}) must be in 2..1000.")
        most = sum(len(names) for names in brand_candidates())
        require(2 <= self.brands <= most, f"`brands` ({self.brands}) must be in 2..{most}.")
        require(1 <= self.max_images <= schema.MAX_IMAGES,
                f"`max_images` ({self.max_images}) must be in 1..{schema.MAX_IMAGES}.")
        require(0.0 <= self.late_fraction < 1.0,
                f"`late_fraction` ({self.late_fraction}) must be in [0, 1).")
        require(0.0 <= self.popularity_skew <= 3.0,
                f"`popularity_skew` ({self.popularity_skew}) must be in [0, 3].")
        require(len(self.surface_mix) == 3 and min(self.surface_mix) >= 0 and sum(self.surface_mix) > 0,
                f"`surface_mix` {self.surface_mix} must be three non-negative weights "
                "(search, closeup, home) with a positive sum.")
        try:
            dt.date.fromisoformat(self.start_date)
        except ValueError:
            raise ConfigError(f"`start_date` ({self.start_date!r}) must be a date like 2024-01-01.") from None
        require(self.catalog_chunk >= 1, f"`catalog_chunk` ({self.catalog_chunk}) must be positive.")
        # Offsets of the list<float32> columns are int32: one row group must hold < 2**31 floats.
        require(1_000 <= self.chunk_rows and self.chunk_rows * 2 * self.image_dim < 2**31,
                f"`chunk_rows` ({self.chunk_rows}) must be at least 1000 and below "
                f"{2**30 // self.image_dim} for image_dim {self.image_dim}.")
        require(self.catalog_chunk * self.max_images * self.image_dim < 2**31,
                f"`catalog_chunk` ({self.catalog_chunk}) is too large for {self.max_images} images "
                f"of width {self.image_dim}; lower it.")

    @property
    def n_users(self) -> int:
        return self.users if self.users is not None else max(50, self.products // 5)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "users": self.n_users}
