"""GraphConfig: the graph stage's options, validated at construction and saved in its manifest.

Defaults were chosen on the validation window of the 5k and 20k demo shops, one option at a time
(docs/METHOD.md, "What the logs know about a product: the graph stage"); most moved the signal
check's Recall@10 by less than 0.01 there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from itemsage import schema
from itemsage.config import require, require_int, require_number

EDGE_TYPES: tuple[str, ...] = ("session", "closeup", "home", "search")
TOKENS: tuple[str, ...] = ("walk",) + EDGE_TYPES  # a token: the walk neighbourhood, or one edge type's 1-hop
CONTENTS: tuple[str, ...] = ("query_vector", "mean_image")
MAX_WINDOW = 1_000  # session_window / search_window: pairs per row grow linearly with it
MAX_DEGREE = 100_000
MAX_WALK_STEPS = 100_000  # walks_per_node x walk_length: visits drawn per start node


def _default_engagement_weights() -> dict[str, float]:
    return {"click": 1.0, "save": 2.0, "add_to_cart": 3.0, "checkout": 4.0}


def _default_edge_type_weights() -> dict[str, float]:
    return {"session": 0.5, "closeup": 1.0, "home": 1.0, "search": 0.5}


@dataclass
class GraphConfig:
    """How the graph is built, walked and pooled (docs/METHOD.md has the why of each default).

    Edges (from train.parquet only):
    engagement_weights: a row's weight by engagement (a missing engagement: 0, the row is not used),
        times the row's own `weight` column.
    edge_type_weights: each edge type's factor in the sum; 0 (or absent) drops that type.
    recency_half_life_days: a row's weight halves every this many days before the train window's last
        engagement (0: no decay).
    session_window / session_gap_hours: a user's engagement is linked to their next `session_window`
        engagements (consecutive rows on one product merged) within `session_gap_hours`.
    search_window: a search row is linked to the next `search_window` rows of the same search text
        (normalised: NFKC, case-folded, whitespace collapsed), in time order.
    max_degree: each product keeps its `max_degree` strongest edges, per edge type and in the sum.
    hub_exponent: before the sum's cap, an edge i-j of the sum is divided by (s_i s_j)^(hub_exponent / 2),
        s = a product's summed edge weight before any cap (0: off; 1: the symmetric normalisation
        D^-1/2 A D^-1/2). Only the walk graph; the 1-hop tokens keep the plain weights.

    Neighbourhoods (random walks with restart, PinSage's importance pooling):
    walks_per_node, walk_length: walks from each product and steps per walk.
    restart: probability that a step returns to the start.
    top_t: the most visited products kept as the neighbourhood.
    walk_chunk: start products walked together (memory: ~ walk_chunk x walks_per_node x walk_length x
        8 bytes); does not change the result.
    seed: the walks' random draws (a counter-based hash of seed, start product, walk and step).

    Features:
    tokens: the G tokens, in order: `walk` (the walk neighbourhood) and any of the edge types (that
        type's 1-hop neighbours), each the importance-weighted mean of the neighbours' content vectors.
    content: the vectors pooled: `query_vector` (the product's frozen query vector from ingest: main
        image, or the title's MiniLM vector) or `mean_image` (the mean of its image vectors).
    neighbours: also write neighbours.parquet (each product's top-T walk neighbours and visit counts).
    """

    engagement_weights: dict[str, float] = field(default_factory=_default_engagement_weights)
    edge_type_weights: dict[str, float] = field(default_factory=_default_edge_type_weights)
    recency_half_life_days: float = 14.0
    session_window: int = 3
    session_gap_hours: float = 1.0
    search_window: int = 5
    max_degree: int = 50
    hub_exponent: float = 0.0
    walks_per_node: int = 32
    walk_length: int = 8
    restart: float = 0.5
    top_t: int = 50
    walk_chunk: int = 32_768
    seed: int = 0
    tokens: tuple[str, ...] = ("walk", "closeup", "search")
    content: str = "query_vector"
    neighbours: bool = True

    def __post_init__(self) -> None:
        for name, keys in (("engagement_weights", schema.ENGAGEMENTS), ("edge_type_weights", EDGE_TYPES)):
            table = getattr(self, name)
            require(isinstance(table, dict), f"graph.{name} must be a table of {{name: weight}}, got {table!r}")
            for key, value in table.items():
                require(key in keys, f"graph.{name} has an unknown key '{key}'; known: {', '.join(keys)}")
                require_number(value, f"graph.{name}.{key}", 0, 1e6)
            setattr(self, name, {str(k): float(v) for k, v in table.items()})
        require(any(self.engagement_weights.values()),
                "graph.engagement_weights gives every engagement weight 0: no row would make an edge")
        require(any(self.edge_type_weights.values()),
                "graph.edge_type_weights gives every edge type weight 0: the graph would have no edge")
        require_number(self.recency_half_life_days, "graph.recency_half_life_days", 0, 1e5, unit=" (0 = no decay)")
        require_int(self.session_window, "graph.session_window", 0, MAX_WINDOW)
        require_number(self.session_gap_hours, "graph.session_gap_hours", 0, 1e6, above=True)
        require_int(self.search_window, "graph.search_window", 0, MAX_WINDOW)
        require_int(self.max_degree, "graph.max_degree", 1, MAX_DEGREE)
        require_number(self.hub_exponent, "graph.hub_exponent", 0, 2, unit=" (0 = off)")
        require_int(self.walks_per_node, "graph.walks_per_node", 1, MAX_WALK_STEPS)
        require_int(self.walk_length, "graph.walk_length", 1, MAX_WALK_STEPS)
        require(self.walks_per_node * self.walk_length <= MAX_WALK_STEPS,
                f"graph.walks_per_node x graph.walk_length ({self.walks_per_node} x {self.walk_length}) must be "
                f"<= {MAX_WALK_STEPS:,} visits per product")
        require_number(self.restart, "graph.restart", 0, 1, below=True)
        require_int(self.top_t, "graph.top_t", 1, MAX_DEGREE)
        require_int(self.walk_chunk, "graph.walk_chunk", 1, 1 << 24)
        require_int(self.seed, "graph.seed", 0, (1 << 63) - 1)
        if isinstance(self.tokens, str):  # a run file may give "walk,closeup"
            self.tokens = tuple(t.strip() for t in self.tokens.split(",") if t.strip())
        self.tokens = tuple(self.tokens)
        unknown = [t for t in self.tokens if t not in TOKENS]
        require(bool(self.tokens) and not unknown and len(set(self.tokens)) == len(self.tokens),
                f"graph.tokens {list(self.tokens)} must be one or more distinct names of {', '.join(TOKENS)}")
        off = [t for t in self.tokens if t != "walk" and not self.edge_type_weights.get(t)]
        require(not off, f"graph.tokens asks for {', '.join(off)}, whose graph.edge_type_weights is 0 (or absent): "
                         "that token would always be masked. Give the type a weight or drop the token")
        require(self.content in CONTENTS, f"graph.content must be one of {', '.join(CONTENTS)}, got {self.content!r}")
        require(isinstance(self.neighbours, bool), f"graph.neighbours must be true or false, got {self.neighbours!r}")

    @property
    def walks(self) -> bool:
        """Whether the stage walks: the walk token or the neighbour lists need it."""
        return "walk" in self.tokens or self.neighbours

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

