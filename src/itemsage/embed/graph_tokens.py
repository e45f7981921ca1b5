"""The graph tokens an embedding run gives the model: the dataset's graph artifact (itemsage/graph), or
another dataset's for a catalog without logs, or none (`--no-graph`, or a model that reads none)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from itemsage import artifacts
from itemsage.artifacts import ArtifactError

log = logging.getLogger(__name__)


def graph_inputs(model_dir: Path, dataset_dir: Path, graph_dir: str | Path | None, no_graph: bool,
                 catalog: bool = False) -> tuple[Any, str | None]:
    """(the products' graph tokens by id, the graph artifact's fingerprint) for a model that reads graph
    tokens; (None, None) for one that does not, or with `no_graph`. The dataset's own graph
    (DATASET/graph) must have been built from this dataset; for a catalog without logs (`catalog`),
    `graph_dir` names the graph of the dataset its products' engagements are in."""
    from itemsage.graph import graph_dir_of, read_graph_features
    from itemsage.model.batch import GraphInputs
    from itemsage.model.model import CONFIG_FILE

    reads = int(artifacts.read_json(Path(model_dir) / CONFIG_FILE).get("graph_dim", 0)) > 0
    if not reads or no_graph:
        if no_graph and reads:
            log.info("embedding without graph tokens (--no-graph): every product from its content alone")
        return None, None
    if graph_dir is None and catalog:
        raise ArtifactError(f"the model {model_dir} reads graph tokens (what the logs know about a product); a "
                            "catalog without logs has none of its own: pass --graph DIR (the graph of the dataset "
                            "whose engagements these products have, from `itemsage graph DATASET`), or --no-graph to "
                            "embed every product from its content alone")
    own = graph_dir is None
    graph_dir = graph_dir_of(dataset_dir) if own else Path(graph_dir)
    if not (graph_dir / artifacts.MANIFEST).is_file():
        raise ArtifactError(f"the model {model_dir} reads graph tokens, but {graph_dir} holds no graph features: run "
                            f"`itemsage graph {dataset_dir}` first (or pass --graph DIR, or --no-graph to embed "
                            "every product from its content alone)")
    features = read_graph_features(graph_dir, artifacts.fingerprint(dataset_dir) if own else None)
    return GraphInputs.of(features), artifacts.fingerprint(graph_dir)
