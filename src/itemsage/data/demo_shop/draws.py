"""Vectorised draws and renderings the generator is made of: group samplers (draw an item of a group
with probability proportional to its weight, among the items launched by a day), categorical
choices, unit rows, and Arrow string columns rendered from templates.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class GroupSampler:
    """Draw items of a group with probability ∝ weight, among the items launched by a given day.

    Items are sorted by (group key, launch day), so a group's items available on a day form one
    contiguous run, and a single `searchsorted` over the running sum of weights draws from it.
    """

    def __init__(self, keys: np.ndarray, weights: np.ndarray, launch: np.ndarray | None = None,
                 days: int = 0) -> None:
        self.span = days + 1
        combo = keys.astype(np.int64) * self.span
        if launch is not None:
            combo += launch
        order = np.argsort(combo, kind="stable")
        self.combo = combo[order]
        self.order = order
        self.cum = np.concatenate([[0.0], np.cumsum(weights[order], dtype=np.float64)])

    def sample(self, rng: np.random.Generator, keys: np.ndarray, day: int | None = None) -> np.ndarray:
        """[n] group keys -> [n] item indices, -1 where the group has no item by `day`."""
        base = keys.astype(np.int64) * self.span
        lo = np.searchsorted(self.combo, base, "left")
        hi = np.searchsorted(self.combo, base + (self.span - 1 if day is None else day), "right")
        u = self.cum[lo] + rng.random(len(keys)) * (self.cum[hi] - self.cum[lo])
        pos = np.clip(np.searchsorted(self.cum, u, "right") - 1, lo, np.maximum(hi - 1, lo))
        pos = np.minimum(pos, len(self.order) - 1)
        return np.where(hi > lo, self.order[pos], -1)


def draw(rng: np.random.Generator, attempts: list[tuple[GroupSampler, np.ndarray]],
          day: int | None = None) -> np.ndarray:
    """Try samplers in order (e.g. category+style, then category, then anything); -1 if all fail."""
    out = np.full(len(attempts[0][1]), -1, dtype=np.int64)
    for sampler, keys in attempts:
        miss = np.flatnonzero(out < 0)
        if len(miss) == 0:
            break
        out[miss] = sampler.sample(rng, keys[miss], day)
    return out


def choice(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """n draws from a categorical distribution (weights need not sum to 1)."""
    cum = np.cumsum(weights) / np.sum(weights)
    return np.minimum(np.searchsorted(cum, rng.random(n), "right"), len(weights) - 1)


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def strings(values: tuple[str, ...] | list[str]) -> pa.Array:
    return pa.array(list(values), type=pa.string())


def render(templates: tuple[str, ...], which: np.ndarray, fields: dict[str, pa.Array]) -> pa.Array:
    """Fill template `which[i]` for row i with the rows of `fields`; vectorised per template."""
    n = len(which)
    pieces: list[pa.Array] = []
    rows_in_order: list[np.ndarray] = []
    for t, template in enumerate(templates):
        rows = np.flatnonzero(which == t)
        if len(rows) == 0:
            continue
        take = pa.array(rows)
        parts: list[Any] = []
        for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
            if literal:
                parts.append(pa.scalar(literal))
            if name:
                parts.append(fields[name].take(take))
        joined = pc.binary_join_element_wise(*parts, "")
        pieces.append(joined if isinstance(joined, pa.Array) else pa.array([joined.as_py()] * len(rows)))
        rows_in_order.append(rows)
    if not pieces:
        return pa.array([], type=pa.string())
    stacked = pa.concat_arrays(pieces)
    inverse = np.empty(n, dtype=np.int64)
    inverse[np.concatenate(rows_in_order)] = np.arange(n)
    # Collapse the double spaces an empty noise slot leaves, and trim the ends.
    text = stacked.take(pa.array(inverse))
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"\s{2,}", " "))


def joined_list(first: pa.Array, second: pa.Array, has_second: np.ndarray, sep: str) -> pa.Array:
    """'a' or 'a{sep}b' per row."""
    both = pc.binary_join_element_wise(first, pa.scalar(sep), second, "")
    return pc.if_else(pa.array(has_second), both, first)


def list_column(first: np.ndarray, second: np.ndarray, names: pa.Array) -> pa.Array:
    """One or two names per row (second < 0: none) as list<string>."""
    counts = 1 + (second >= 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = np.empty(offsets[-1], dtype=np.int64)
    flat[offsets[:-1]] = first
    two = np.flatnonzero(second >= 0)
    flat[offsets[two] + 1] = second[two]
    return pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(flat)))


def id_strings(prefix: str, n: int) -> pa.Array:
    width = max(6, len(str(n - 1)))
    return pa.array(np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), width)), type=pa.string())
