"""The training loss (docs/METHOD.md): mixed-negative sampled softmax with logQ correction.

Three parts:

- `CountMinSketch`: a fixed-memory frequency counter for the ids of a stream.
- `LogQ`: log of the expected number of times a product appears in a batch (B * count / total, not
  capped at 1), estimated online from a sketch of the products seen so far as positives. Updated
  every step BEFORE that step's loss.
- `mixed_negative_loss`: two separate softmax terms, summed (the paper found this more stable than
  one normaliser over both sources):
    in-batch: the other positives of the batch are negatives, corrected by -log Q(product);
    random:   negatives drawn from the catalog, corrected by their sampling log-probability.

The positive logit is never corrected. With that choice, each row's normaliser is an importance-
sampled estimate of the full-catalog partition function: the true product counted once with its
exact logit, plus sum_j exp(s_j) / E[times j is drawn]. This is also what OmniSearchSage does (the
positive sits in its own column, the negative columns get the correction). It makes each term
equal the full-catalog softmax exactly when every catalog product is drawn the same number of times
k (log q = log k), a test checks both.

Accidental hits (a negative that is the row's own product, or another positive of the same query in
the batch) are masked with -inf; the positive column is never masked.

Axes: B batch (local rows), N candidate positives (the global batch under DDP, else N = B),
R random negatives, D width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from itemsage.config import require

LOGIT_SCALE_MAX = 100.0  # cap on the learned inverse temperature (CLIP's choice), kept by model.LogitScale
NEGATIVE_MODES = ("mixed", "in_batch", "random")

_PRIME = (1 << 31) - 1  # Mersenne prime of the universal hash family; width must stay below it
_CHUNKS = 4  # an int64 id is hashed as four 16-bit digits, so no product can overflow int64


class CountMinSketch:
    """Count-min sketch (Cormode & Muthukrishnan 2005) over int64 ids.

    `depth` rows of `width` int64 counters. Each row has its own hash, drawn once from a universal
    family by `seed` (numpy's PCG64, identical on every machine and process, never Python's salted
    `hash`): an id's four 16-bit digits c_k give h(x) = ((sum_k a_k c_k + b) mod p) mod width with
    p = 2^31 - 1. `update` adds 1 to one counter per row; `estimate` takes the minimum over rows.

    The estimate never under-counts. With eps = e / width and delta = e^-depth, for a stream of
    N = `total` ids: estimate(x) <= true(x) + eps * N with probability at least 1 - delta (per id,
    over the choice of hashes). Memory is 8 * depth * width bytes.

    Under DDP, update every rank's sketch with the all-gathered ids so the copies stay identical.
    """

    def __init__(self, depth: int, width: int, seed: int = 0):
        require(isinstance(depth, int) and depth >= 1, f"CountMinSketch depth ({depth}) must be an int >= 1")
        require(
            isinstance(width, int) and 1 <= width < _PRIME,
            f"CountMinSketch width ({width}) must be an int in [1, {_PRIME}); e.g. 2**20",
        )
        self.depth, self.width, self.seed = depth, width, seed
        rng = np.random.default_rng(seed)
        # a: [depth, 4], b: [depth]; a and b uniform over [0, p): the standard universal family
        self.hash_a = torch.from_numpy(rng.integers(0, _PRIME, size=(depth, _CHUNKS), dtype=np.int64))
        self.hash_b = torch.from_numpy(rng.integers(0, _PRIME, size=(depth,), dtype=np.int64))
        self.counts = torch.zeros(depth, width, dtype=torch.int64)
        self.total = torch.zeros((), dtype=torch.int64)

    @property
    def eps(self) -> float:
        return math.e / self.width

    @property
    def delta(self) -> float:
        return math.exp(-self.depth)

    def to(self, device: torch.device | str) -> CountMinSketch:
        for name in ("hash_a", "hash_b", "counts", "total"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _flat_index(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [*] int64 -> [*, depth] positions in the flattened counters."""
        ids = ids.to(device=self.counts.device, dtype=torch.int64)
        shifts = torch.arange(_CHUNKS, device=ids.device) * 16
        digits = (ids.unsqueeze(-1) >> shifts) & 0xFFFF  # [*, 4]; shift + mask also works for ids < 0
        # [*, 1, 4] * [depth, 4] -> [*, depth]; each term < 2^47, the sum < 2^50: no overflow
        h = (digits.unsqueeze(-2) * self.hash_a).sum(-1) + self.hash_b
        h = (h % _PRIME) % self.width
        return h + torch.arange(self.depth, device=ids.device) * self.width  # row d starts at d * width

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        """Count every occurrence in `ids` (any shape; duplicates within the call all count)."""
        flat = self._flat_index(ids.reshape(-1)).reshape(-1)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
        self.total += ids.numel()

    @torch.no_grad()
    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated count of each id: LongTensor shaped like `ids`, on `ids`' device; >= the true count."""
        flat = self._flat_index(ids)  # [*, depth]
        return self.counts.view(-1)[flat].min(-1).values.to(ids.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors (safetensors-ready); the hash parameters travel with the counts."""
        return {"counts": self.counts, "total": self.total, "hash_a": self.hash_a, "hash_b": self.hash_b}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted({"counts", "total", "hash_a", "hash_b"} - set(state))
        require(not missing,
                f"count-min sketch state lacks {missing}; was it saved by CountMinSketch.state_dict()?")
        require(
            tuple(state["counts"].shape) == (self.depth, self.width),
            f"count-min sketch state has counts of shape {tuple(state['counts'].shape)}, this sketch is "
            f"(depth, width) = ({self.depth}, {self.width}); build it with the checkpoint's depth and width",
        )
        device = self.counts.device
        self.counts = state["counts"].to(device=device, dtype=torch.int64).clone()
        self.total = state["total"].to(device=device, dtype=torch.int64).reshape(()).clone()
        self.hash_a = state["hash_a"].to(device=device, dtype=torch.int64).clone()
        self.hash_b = state["hash_b"].to(device=device, dtype=torch.int64).clone()


class LogQ:
    """log Q(p): the expected number of times product p appears in a batch, estimated online.

    Q(p) = batch_size * count(p) / total, where count comes from a count-min sketch of every
    positive product seen so far and total is the number of positives seen. Q is not capped at 1:
    the in-batch loss keeps one column per copy of a product, so a product expected k times per
    batch contributes about k columns, and subtracting log k is what makes their sum an unbiased
    estimate of its one term of the full-catalog partition function (a cap at 1 would leave a
    product drawn 3.5x per batch over-penalised 3.5-fold). Q is floored at `floor` so log never
    sees 0 (an id never counted).

    Call `update` with the step's positive ids BEFORE `log_q` (or use `step`, which does both), so a
    product's first appearance is counted. Under DDP, pass the all-gathered ids and the global batch
    size on every rank so all ranks hold the same sketch.
    """

    def __init__(self, depth: int = 4, width: int = 2**20, seed: int = 0, floor: float = 1e-9):
        require(0.0 < floor <= 1.0, f"LogQ floor ({floor}) must be in (0, 1]; e.g. 1e-9")
        self.floor = floor
        self.sketch = CountMinSketch(depth, width, seed)

    def to(self, device: torch.device | str) -> LogQ:
        self.sketch.to(device)
        return self

    def update(self, product_ids: torch.Tensor) -> None:
        self.sketch.update(product_ids)

    def log_q(self, product_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """product_ids [*] int64 -> log Q [*] float32 on the ids' device, in [log floor, log batch_size]."""
        counts = self.sketch.estimate(product_ids).to(torch.float64)
        total = max(int(self.sketch.total), 1)
        q = (batch_size * counts / total).clamp(min=self.floor)  # expected copies per batch, uncapped
        return q.log().to(torch.float32)

    def step(self, product_ids: torch.Tensor) -> torch.Tensor:
        """Count this batch's positives, then return their log q (batch size = len(product_ids))."""
        self.update(product_ids)
        return self.log_q(product_ids, batch_size=product_ids.numel())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"sketch.{k}": v for k, v in self.sketch.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sketch.load_state_dict({k.removeprefix("sketch."): v for k, v in state.items()})


class LossParts(NamedTuple):
    total: torch.Tensor  # in_batch + random, scalar
    in_batch: torch.Tensor  # scalar; 0 when switched off
    random: torch.Tensor  # scalar; 0 when switched off


def _softmax_term(pos_logit: torch.Tensor, neg_logits: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy with the positive in column 0. pos_logit [B], neg_logits/hit [B, C] -> [B]."""
    neg_logits = neg_logits.masked_fill(hit, float("-inf"))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logits], dim=1)  # [B, 1 + C]
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


def in_batch_hits(
    pos_ids: torch.Tensor, query_keys: torch.Tensor, candidate_ids: torch.Tensor, candidate_keys: torch.Tensor
) -> torch.Tensor:
    """Accidental hits among the in-batch candidates: [B, N] bool, True = mask.

    Candidate j is a hit for row i when it is the same product (the row's own copy included: its
    logit lives in the positive column) or a positive of the same query.
    """
    same_product = pos_ids.unsqueeze(1) == candidate_ids.unsqueeze(0)  # [B, N]
    same_query = query_keys.unsqueeze(1) == candidate_keys.unsqueeze(0)  # [B, N]
    return same_product | same_query


def random_hits(
    pos_ids: torch.Tensor,
    query_keys: torch.Tensor,
    neg_ids: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_keys: torch.Tensor,
) -> torch.Tensor:
    """Accidental hits among the random negatives: [B, R] bool, True = mask.

    Negative n is a hit for row i when it is the row's own product, or the product of another
    positive of the same query in the (global) batch given by candidate_ids / candidate_keys.
    """
    hit = pos_ids.unsqueeze(1) == neg_ids.unsqueeze(0)  # [B, R]
    # Only negatives equal to some candidate positive can be hits through a shared query, so the
    # [B, N] x [N, R'] product runs over those few columns, not all R.
    is_cand = neg_ids.unsqueeze(1) == candidate_ids.unsqueeze(0)  # [R, N]
    cols = is_cand.any(1).nonzero().squeeze(1)  # [R']
    if cols.numel():
        same_query = (query_keys.unsqueeze(1) == candidate_keys.unsqueeze(0)).float()  # [B, N]
        hit[:, cols] |= (same_query @ is_cand[cols].float().T) > 0  # [B, R']
    return hit


def _check_len(name: str, t: torch.Tensor, n: int, what: str) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per {what}); got shape {tuple(t.shape)}")


def mixed_negative_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    random_neg: torch.Tensor | None,
    *,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor | None,
    query_keys: torch.Tensor,
    log_q_pos: torch.Tensor,
    log_q_neg: torch.Tensor | None,
    logit_scale: torch.Tensor | float,
    weights: torch.Tensor | None = None,
    negatives: str = "mixed",
    candidates: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
    candidate_keys: torch.Tensor | None = None,
    candidate_log_q: torch.Tensor | None = None,
    weight_sum: torch.Tensor | float | None = None,
) -> LossParts:
    """Mixed-negative sampled softmax with logQ correction and accidental-hit masking.

    Args:
        query [B, D], positive [B, D]: unit vectors; row i is a (query, engaged product) pair.
        random_neg [R, D]: unit vectors of catalog products drawn as negatives (None if negatives="in_batch").
        pos_ids [B] int64: product id of each positive (equal ids = same product).
        neg_ids [R] int64: product id of each random negative.
        query_keys [B] int64: query identity (equal keys = same query, e.g. a hash of surface + query);
            other positives of the same query are never used as its negatives.
        log_q_pos [B]: log Q of each positive (from `LogQ`), the correction of the in-batch columns.
        log_q_neg [R]: log of the expected number of times each negative is drawn, e.g. for R uniform
            draws from a catalog of C products log(R / C) (a constant; 0 when every product is drawn once).
        logit_scale: scalar tensor, the learned inverse temperature (the multiplier itself, not its log),
            used as given: `model.LogitScale` keeps it at most LOGIT_SCALE_MAX = 100 by clamping its
            stored parameter after each optimiser step. (A clamp here would zero the gradient above
            the cap, and momentum could then hold the scale there for good.)
        weights [B] or None: per-example weights; each term is sum(w * loss) / sum(w).
        negatives: "mixed" (both terms), "in_batch" or "random" (one term, for the ablations).
        candidates [N, D], candidate_ids [N], candidate_keys [N], candidate_log_q [N]: for a DDP caller,
            the positives of the global batch (all-gathered with gradient), their ids, query keys and
            log Q. Default None: the local batch (positive, pos_ids, query_keys, log_q_pos). Each
            local row's own copy among them is masked as an accidental hit (same product id), and its
            positive logit comes from `positive` in column 0, so no row offset is needed. Pass the
            all-gathered random negatives as random_neg / neg_ids / log_q_neg likewise.
        weight_sum: denominator of the weighted mean; default sum(weights) (or B). A DDP caller that
            wants the exact global weighted mean passes global_sum(weights) / world_size, because DDP
            averages gradients over ranks.

    Returns LossParts(total, in_batch, random) of scalars; a switched-off term is 0.
    """
    require(negatives in NEGATIVE_MODES,
            f"negatives ({negatives!r}) must be one of {', '.join(NEGATIVE_MODES)}")
    if query.dim() != 2 or query.shape != positive.shape:
        raise ValueError(f"query and positive must both be [B, D]; "
                         f"got {tuple(query.shape)} and {tuple(positive.shape)}")
    b = query.shape[0]
    for name, t in (("pos_ids", pos_ids), ("query_keys", query_keys), ("log_q_pos", log_q_pos)):
        _check_len(name, t, b, "row")
    if weights is not None:
        _check_len("weights", weights, b, "row")

    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=query.device)
    # Logits in float32 even under autocast: the corrections and the softmax need the range.
    pos_logit = scale * (query * positive).sum(-1).float()  # [B]; never corrected, never masked

    if candidates is None:
        candidates, candidate_ids, candidate_keys, candidate_log_q = positive, pos_ids, query_keys, log_q_pos
    elif candidate_ids is None or candidate_keys is None or candidate_log_q is None:
        raise ValueError("candidates needs candidate_ids, candidate_keys and candidate_log_q too")
    n = candidates.shape[0]
    for name, t in (("candidate_ids", candidate_ids), ("candidate_keys", candidate_keys),
                    ("candidate_log_q", candidate_log_q)):
        _check_len(name, t, n, "candidate")

    zero = pos_logit.new_zeros(())
    in_batch = random = zero
    if weights is None:
        w = torch.ones_like(pos_logit)
    else:
        w = weights.to(pos_logit.dtype)
    denom = w.sum() if weight_sum is None else torch.as_tensor(weight_sum, dtype=w.dtype, device=w.device)

    def reduce(per_row: torch.Tensor) -> torch.Tensor:  # [B] -> scalar weighted mean
        # where(), not w * loss: a zero-weight row must contribute exactly 0, even if its loss were inf
        return torch.where(w != 0, w * per_row, 0.0).sum() / denom

    if negatives in ("mixed", "in_batch"):
        # [B, N]: every positive of the (global) batch, corrected by its log Q
        logits = scale * (query @ candidates.T).float() - candidate_log_q.float().unsqueeze(0)
        hit = in_batch_hits(pos_ids, query_keys, candidate_ids, candidate_keys)
        in_batch = reduce(_softmax_term(pos_logit, logits, hit))

    if negatives in ("mixed", "random"):
        if random_neg is None or neg_ids is None or log_q_neg is None:
            raise ValueError(f"negatives={negatives!r} needs random_neg, neg_ids and log_q_neg; got None "
                             "(pass negatives='in_batch' to train without random negatives)")
        r = random_neg.shape[0]
        if random_neg.dim() != 2 or random_neg.shape[1] != query.shape[1]:
            raise ValueError(f"random_neg must be [R, {query.shape[1]}]; got {tuple(random_neg.shape)}")
        _check_len("neg_ids", neg_ids, r, "random negative")
        _check_len("log_q_neg", log_q_neg, r, "random negative")
        logits = scale * (query @ random_neg.T).float() - log_q_neg.float().unsqueeze(0)  # [B, R]
        hit = random_hits(pos_ids, query_keys, neg_ids, candidate_ids, candidate_keys)
        random = reduce(_softmax_term(pos_logit, logits, hit))

    return LossParts(total=in_batch + random, in_batch=in_batch, random=random)


def gather_with_grad(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every rank's `t` in rank order, keeping the gradient path to each rank's slice."""
    if world == 1:
        return t
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(t.contiguous()))


class MixedNegativeLoss(torch.nn.Module):
    """The training loss as one call, DDP gathering inside (as sentence-transformers' losses do).

    Every rank holds the same global batch of B pairs and embeds its own rows `rows` (lo:hi): its
    positives and its share of the random negatives. The candidates (every rank's positives and
    negatives) are all-gathered with gradient here, and each rank's loss is its rows' weighted sum
    over the global weight sum, so DDP's gradient average equals the one-process gradient.
    """

    def __init__(self, negatives: str = "mixed", rows: tuple[int, int] | None = None, world: int = 1) -> None:
        super().__init__()
        require(negatives in NEGATIVE_MODES, f"negatives must be one of {', '.join(NEGATIVE_MODES)}, got {negatives!r}")
        self.negatives, self.rows, self.world = negatives, rows, world

    def forward(self, query: torch.Tensor, products: torch.Tensor, *, ids: torch.Tensor, keys: torch.Tensor,
                log_q: torch.Tensor, weights: torch.Tensor, logit_scale: torch.Tensor | float,
                neg_ids: torch.Tensor | None = None, log_q_neg: torch.Tensor | None = None,
                popularity: torch.Tensor | None = None) -> LossParts:
        """query [b, D] this rank's queries; products [b + r, D] this rank's positives then its random
        negatives; ids, keys, log_q, weights [B]: the global batch's product ids, query keys, log Q and
        loss weights; neg_ids, log_q_neg [R]: the global random negatives' (None: no random negatives);
        popularity [b + r]: each product's b_p (model/popularity.py), or None.

        With popularity every logit is scale * q.p + b_p, computed as scale * (q'.p') over the
        augmented vectors q' = [q, 1 / scale] and p' = [p, b_p]: the loss's inner products, gathering
        and corrections then apply to it unchanged."""
        if popularity is not None:
            scale = torch.as_tensor(logit_scale, dtype=query.dtype, device=query.device)
            query = torch.cat([query, (1.0 / scale).expand(query.shape[0], 1)], 1)  # [b, D + 1]
            products = torch.cat([products, popularity.to(products.dtype).unsqueeze(1)], 1)  # [b + r, D + 1]
        lo, hi = self.rows if self.rows is not None else (0, len(ids))
        b = hi - lo
        random = gather_with_grad(products[b:], self.world) if neg_ids is not None else None
        return mixed_negative_loss(
            query, products[:b], random, pos_ids=ids[lo:hi], neg_ids=neg_ids, query_keys=keys[lo:hi],
            log_q_pos=log_q[lo:hi], log_q_neg=log_q_neg, logit_scale=logit_scale, weights=weights[lo:hi],
            negatives=self.negatives, candidates=gather_with_grad(products[:b], self.world), candidate_ids=ids,
            candidate_keys=keys, candidate_log_q=log_q, weight_sum=weights.sum() / self.world)
