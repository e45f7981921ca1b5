"""The popularity term: a per-product score added to the query-product logit (docs/METHOD.md).

A unit vector cannot say how popular a product is, and the logs know it. With the term, a training
logit is `scale * cos(q, p) + b_p`; the mixed-negative loss's logQ correction removes the in-batch
sampling bias, so `b_p` learns how often the product is engaged beyond what its similarity to the
query explains (the sampled softmax's estimate of log popularity). Retrieval ranks by the same
logit: a product's retrieval vector is [p, b_p / scale] and a query's [q, 1], so one inner product
scores both. Training's validation and evaluate's exact search rank that way; the ANN index and the
service do not keep the term yet (they rank by p alone; `itemsage index` warns), which is one reason
it is an option, off by default (docs/METHOD.md, "The popularity term").

    b_p = prior(p) + offset[p]

- `prior`: a linear function of the product's embedding p (its content), learned from every product;
  it is all a product has that had no engagement in the train window (a new product, an upsert):
  what products like it are worth, not a floor that buries it.
- `offset`: one learned scalar per product engaged in the train window (its id is recorded in the
  model, in `warm_ids` order). A product never engaged has no offset (the padding row: always 0,
  never updated), so random negatives cannot push it down to where no query looks, the way a
  per-product term learned for every catalog product would.

`mode`: "content" (the prior alone) or "id" (prior + offsets). Axes: B products, D width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn


class Popularity(nn.Module):
    """b_p for a batch of products: prior(p) + offset of the product's warm row (0 when it has none)."""

    def __init__(self, dim: int, mode: str, warm_ids: Sequence[str] = ()) -> None:
        super().__init__()
        self.mode = mode
        self.warm_ids = [str(i) for i in warm_ids] if mode == "id" else []
        self.prior = nn.Linear(dim, 1)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)
        # Row len(warm_ids) is the padding row of every product without one: 0, and no gradient.
        n = len(self.warm_ids)
        self.offset = nn.Embedding(n + 1, 1, padding_idx=n)
        nn.init.zeros_(self.offset.weight)
        self._row_of = {pid: i for i, pid in enumerate(self.warm_ids)}

    @property
    def padding_row(self) -> int:
        return len(self.warm_ids)

    def warm_rows(self, product_ids: Sequence[str]) -> np.ndarray:
        """[B] int64: each product's offset row, the padding row for a product never engaged in training."""
        pad = self.padding_row
        return np.fromiter((self._row_of.get(str(pid), pad) for pid in product_ids), np.int64, len(product_ids))

    def forward(self, p: Tensor, warm_rows: Tensor | None = None) -> Tensor:
        """p [B, D] unit product embeddings, warm_rows [B] (None: no offsets) -> b [B]."""
        b = self.prior(p).squeeze(-1)  # [B]
        if self.mode == "id" and warm_rows is not None:
            b = b + self.offset(warm_rows.to(p.device)).squeeze(-1).to(b.dtype)
        return b


def retrieval_vectors(products: Tensor, queries: Tensor, popularity: Tensor | None) -> tuple[Tensor, Tensor]:
    """The vectors one inner product ranks by: products [N, D] -> [p, b_p / scale] [N, D + 1] and
    queries [Q, D] -> [q, 1] [Q, D + 1], given `popularity` [N] in retrieval units (b_p / scale);
    unchanged when it is None."""
    if popularity is None:
        return products, queries
    return (torch.cat([products, popularity.to(products.dtype).unsqueeze(1)], 1),
            torch.cat([queries, queries.new_ones(queries.shape[0], 1)], 1))
