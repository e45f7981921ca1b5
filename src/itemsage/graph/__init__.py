"""The graph stage: what the train window's engagement logs know about each product, as G tokens.

ItemSage's tower reads PinSage embeddings, each a graph network's summary of a product's engagement
neighbourhood. This stage is the stand-in: a co-engagement graph over the train window (never
validation or test), PinSage-style importance neighbourhoods by random walks, and the neighbours'
frozen content vectors pooled into G unit tokens per product, with a mask (docs/METHOD.md, "What the
logs know about a product: the graph stage"). Optional: `itemsage graph DATASET` writes DATASET/graph/,
which the model reads through `read_graph_features`.

    from itemsage.graph import read_graph_features, graph_dir_of
    feats = read_graph_features(graph_dir_of(dataset_dir), artifacts.fingerprint(dataset_dir))
    feats.tokens  # [N, G, D] float16, feats.mask [N, G] bool, row i = products.parquet row i
"""

from itemsage.graph.artifact import GraphFeatures, graph_dir_of, read_graph_features, read_neighbours
from itemsage.graph.build import build_graph_features
from itemsage.graph.config import GraphConfig

__all__ = ["GraphConfig", "GraphFeatures", "build_graph_features", "graph_dir_of", "read_graph_features",
           "read_neighbours"]
