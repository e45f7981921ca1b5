"""The model over a whole catalog and over a window's pairs, in chunks: training's validation Recall@K
(the model selection) and evaluate's test-window figures both encode with these.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from itemsage.metrics import closeup_exclusions, exact_ranks, group_recall
from itemsage.model.batch import ProductStore
from itemsage.model.model import ItemSageModel
from itemsage.model.popularity import retrieval_vectors
from itemsage.train.pairs import Pairs

log = logging.getLogger(__name__)


@torch.inference_mode()
def embed_catalog(model: torch.nn.Module, store, device: torch.device | str = "cpu", chunk: int = 2048) -> torch.Tensor:
    """model.encode_products over every product of a ProductStore, in chunks -> [N, D] float32 unit rows."""
    was = model.training
    model.eval()
    try:
        parts = [
            model.encode_products(store.batch(np.arange(i, min(i + chunk, len(store)))).to(device)).float()
            for i in range(0, len(store), chunk)
        ]
    finally:
        model.train(was)
    return torch.cat(parts) if parts else torch.zeros(0, 0)


@torch.inference_mode()
def embed_pair_queries(model: torch.nn.Module, pairs, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each pair's frozen query vector through model.encode_queries -> [Q, D] unit rows."""
    was = model.training
    model.eval()
    try:
        out = torch.zeros(len(pairs), model.out_dim, device=device)
        for surface, table in pairs.queries.items():
            pos = np.flatnonzero(pairs.surface == surface)
            if len(pos):
                vectors = table[torch.from_numpy(pairs.query_row[pos])].to(device)
                out[torch.from_numpy(pos).to(device)] = model.encode_queries(surface, vectors).float()
    finally:
        model.train(was)
    return out


@torch.inference_mode()
def catalog_popularity(model: ItemSageModel, catalog: torch.Tensor, product_ids: np.ndarray) -> torch.Tensor | None:
    """The products' popularity in retrieval units (b_p / logit scale) [N], None without the term;
    catalog [N, D]: their embeddings."""
    if model.popularity is None:
        return None
    rows = torch.from_numpy(model.popularity.warm_rows(list(product_ids))).to(catalog.device)
    return model.popularity(catalog, rows) / model.logit_scale()


def held_out_recall(model: ItemSageModel, store: ProductStore, pairs: Pairs,
                    device: torch.device, chunk: int = 2048) -> dict[str, dict[str, float]]:
    """Exact Recall@{1,10,100} per task: each pair's product ranked among the whole catalog, as
    evaluate ranks the test window (a closeup pair's query product left out, as served), so the
    model is chosen by the protocol it is reported with."""
    catalog = embed_catalog(model, store, device, chunk)  # [N, D]
    queries = embed_pair_queries(model, pairs, device)  # [Q, D]
    catalog, queries = retrieval_vectors(catalog, queries, catalog_popularity(model, catalog, store.ids))
    ranks = exact_ranks(queries, catalog, torch.from_numpy(pairs.product_row).to(device),
                        exclude_rows=closeup_exclusions(pairs.surface, pairs.query_product_row))
    return group_recall(ranks, pairs.task.astype(str))
