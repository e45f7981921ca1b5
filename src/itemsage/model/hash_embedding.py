"""The hash embedding of text bags (Svenstrup et al. 2017; docs/METHOD.md): two fixed hash functions
of a token id, the batch's bags with their tokens deduplicated (`TokenBags`), and `HashEmbedding`,
the module that turns a field's bag of vocabulary ids into one vector.

Axes: T token occurrences, U distinct tokens, N = B*F bags, Dh hash-embedding width.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as fn
from torch import Tensor, nn

from itemsage.config import require

# Two fixed universal hash functions h(i) = ((a*i + b) mod p) mod num_buckets. Plain integer maths,
# so every process and machine agrees (Python's `hash` is salted per process). a < p and i < p keep
# a*i + b below 2**62, inside int64.
HASH_PRIME = 2**31 - 1
HASH_A1, HASH_B1 = 1_103_515_245, 12_345
HASH_A2, HASH_B2 = 1_664_525, 1_013_904_223


def hash_token_ids(ids: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bucket indices per token id: ids [*] int -> (h1 [*], h2 [*]) int64 in [0, num_buckets)."""
    require(isinstance(num_buckets, int) and num_buckets > 0,
            f"num_buckets must be a positive integer, got {num_buckets!r}")
    ids = ids.long()
    # Range check on CPU only: on an accelerator it would cost a host sync on every forward.
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= HASH_PRIME):
        raise ValueError(f"token ids must lie in [0, {HASH_PRIME}), got min {int(ids.min())}, max {int(ids.max())}")
    h1 = (ids * HASH_A1 + HASH_B1) % HASH_PRIME % num_buckets
    h2 = (ids * HASH_A2 + HASH_B2) % HASH_PRIME % num_buckets
    return h1, h2


class TokenBags(NamedTuple):
    """A batch's text bags with their tokens deduplicated: the layout the hash bag computes on.

    The T token occurrences of the batch's N = B*F bags use U distinct vocabulary ids. Read as a
    sparse N x U count matrix S, `index` + the batch's token_offsets are S in CSR form (bag n's
    occurrences are index[offsets[n]:offsets[n+1]]) and `by_token` + `starts` are S transposed
    (unique token u occurs in bags by_token[starts[u]:starts[u+1]]). The transposed half is only
    needed for a backward pass; it is None when not built.
    """

    unique: torch.Tensor  # [U] int64 distinct vocabulary ids, ascending
    index: torch.Tensor  # [T] int64 position in `unique` of each token occurrence
    by_token: torch.Tensor | None  # [T] int64 bag of each occurrence, grouped by unique token (bag order within)
    starts: torch.Tensor | None  # [U] int64 start of each unique token's group in by_token

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBags:
        return TokenBags(*(t if t is None else t.to(device, non_blocking=non_blocking) for t in self))


def token_bags(token_ids: np.ndarray, offsets: np.ndarray, *, transpose: bool) -> TokenBags:
    """Deduplicate the tokens of N bags (token_ids [T] int, offsets [N] bag starts) -> TokenBags.

    O(T + V) with no sort: the distinct ids come from a bincount, the transposed layout from a
    CSR -> CSC conversion (a counting sort, scipy.sparse).
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    counts = np.bincount(ids) if len(ids) else np.zeros(0, np.int64)
    unique = np.flatnonzero(counts)  # [U]
    remap = np.zeros(len(counts), np.int64)
    remap[unique] = np.arange(len(unique))
    index = remap[ids]  # [T]
    by_token = starts = None
    if transpose:
        import scipy.sparse

        n = len(offsets)
        indptr = np.append(np.asarray(offsets, np.int64), len(ids))  # [N + 1]
        csc = scipy.sparse.csr_matrix((np.ones(len(ids), np.float32), index, indptr),
                                      shape=(n, len(unique))).tocsc()  # counting sort by column
        by_token = torch.from_numpy(csc.indices.astype(np.int64))
        starts = torch.from_numpy(csc.indptr[:-1].astype(np.int64))
    return TokenBags(torch.from_numpy(unique), torch.from_numpy(index), by_token, starts)


class _BagSum(torch.autograd.Function):
    """out[n] = sum of vectors[index[t]] over the occurrences t of bag n: [U, Dh] -> [N, Dh].

    The bag-by-token count matrix S [N, U] times `vectors`, in CSR form. The backward is the
    transposed product S^T @ grad, run as the same gather-and-sum over the transposed layout (each
    unique token's bags), so neither direction sorts or scatters the T occurrences.
    """

    @staticmethod
    def forward(ctx: Any, vectors: Tensor, index: Tensor, offsets: Tensor, by_token: Tensor,
                starts: Tensor) -> Tensor:
        ctx.save_for_backward(by_token, starts)
        return fn.embedding_bag(index, vectors, offsets, mode="sum")  # [N, Dh]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        by_token, starts = ctx.saved_tensors
        return fn.embedding_bag(by_token, grad.contiguous(), starts, mode="sum"), None, None, None, None  # [U, Dh]


def _token_bags(token_ids: Tensor, offsets: Tensor, transpose: bool) -> TokenBags:
    """TokenBags of a batch that came without them (torch ops, any device; the transpose sorts)."""
    counts = torch.bincount(token_ids)
    unique = counts.nonzero().squeeze(1)  # [U] ascending
    remap = torch.zeros_like(counts)
    remap[unique] = torch.arange(unique.numel(), device=unique.device)
    index = remap[token_ids]  # [T]
    if not transpose:
        return TokenBags(unique, index, None, None)
    lengths = torch.diff(offsets, append=offsets.new_full((1,), token_ids.numel()))  # [N] bag sizes
    bag_of = torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), lengths)  # [T]
    order = torch.sort(index, stable=True).indices  # [T] occurrences grouped by unique token
    starts = torch.cumsum(counts[unique], 0) - counts[unique]  # [U] exclusive prefix sum
    return TokenBags(unique, index, bag_of[order], starts)


class HashEmbedding(nn.Module):
    """Hash embedding of a bag of tokens (Svenstrup et al. 2017).

    A token id i has vector W[i,0]·E[h1(i)] + W[i,1]·E[h2(i)] with E [buckets, Dh] shared through
    two fixed hash functions and W [V, 2] its learned importance; a bag's vector is the sum of its
    tokens' vectors.

    Computed on the batch's distinct tokens (`TokenBags`): the U unique tokens' vectors are built
    once ([U, Dh], two gathers from E), then summed into bags by a sparse bag-by-token product whose
    backward is the transposed product (`_BagSum`). Each token occurrence is touched once forward
    and once backward, instead of twice each way plus a sort of all 2T hashed lookups (the plain
    EmbeddingBag with per-sample weights). docs/METHOD.md has the measurements.
    """

    def __init__(self, vocab_size: int, num_buckets: int, dim: int, token_dropout: float = 0.0) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.token_dropout = token_dropout
        self.table = nn.Embedding(num_buckets, dim)  # E [buckets, Dh]
        self.importance = nn.Embedding(vocab_size, 2)  # W [V, 2]
        nn.init.normal_(self.table.weight, std=dim**-0.5)
        nn.init.normal_(self.importance.weight, std=1.0)

    def forward(self, token_ids: Tensor, offsets: Tensor, bags: TokenBags | None = None) -> Tensor:
        """token_ids [T] vocab ids of all bags; offsets [N] start of each bag -> [N, Dh] (0 if empty).

        `bags`: the same tokens deduplicated (ProductStore.batch builds them); computed here if None.
        """
        needs_grad = torch.is_grad_enabled() and (self.table.weight.requires_grad or self.importance.weight.requires_grad)
        if bags is None or (needs_grad and bags.by_token is None):
            bags = _token_bags(token_ids.long(), offsets, transpose=needs_grad)
        h1, h2 = hash_token_ids(bags.unique, self.num_buckets)  # [U], [U]
        w = self.importance(bags.unique)  # [U, 2]
        vectors = w[:, :1] * self.table(h1) + w[:, 1:] * self.table(h2)  # [U, Dh]
        vectors = vectors.to(self.table.weight.dtype)
        if self.training and self.token_dropout > 0:  # a dropped token is absent from every bag of the batch
            keep = torch.rand(vectors.shape[0], 1, device=vectors.device) >= self.token_dropout  # [U, 1]
            vectors = vectors * keep / (1.0 - self.token_dropout)
        if not needs_grad:
            return fn.embedding_bag(bags.index, vectors, offsets, mode="sum")  # [N, Dh]
        return _BagSum.apply(vectors, bags.index, offsets, bags.by_token, bags.starts)  # [N, Dh]
