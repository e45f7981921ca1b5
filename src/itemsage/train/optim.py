"""The optimisers (AdamW, or LAMB for large batches) and the learning-rate schedule: linear warm-up,
then cosine decay to 0, driven by `progress` (the fraction of the decay done) so the step count may
be re-estimated under a minute budget without a jump (train/loop.py's docstring has the rule).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from itemsage.train.config import TrainConfig

log = logging.getLogger(__name__)


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020): Adam's bias-corrected step plus decoupled weight decay, rescaled
    per parameter tensor by the trust ratio ||p|| / ||update|| (1 where either norm is 0)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                p_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
                p.sub_(group["lr"] * trust * update)
        return loss


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, progress: float | None = None) -> float:
    """Learning rate of 0-based `step`: linear warm-up to `peak`, then cosine decay to 0 at total_steps.

    The warm-up is capped at a tenth of the run, so a short run (a small minute budget) still reaches
    the peak and decays instead of spending every step warming up. `progress` (the fraction of the
    decay done, see `advance`) replaces the step's own fraction when the step count is an estimate.
    """
    warmup_steps = min(warmup_steps, total_steps // 10)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if progress is None:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def advance(progress: float, step: int, total_steps: int, warmup_steps: int) -> float:
    """Decay progress after 0-based `step`: what is left, (1 - progress), spread over the steps left.

    With a fixed total_steps this gives exactly (step + 1 - warmup) / (total - warmup), the plain
    cosine's fraction; when total_steps is re-estimated only the remaining slope changes.
    """
    if step < min(warmup_steps, total_steps // 10):
        return progress
    return min(1.0, progress + (1.0 - progress) / max(1, total_steps - step))


def _optimizer(cfg: TrainConfig, params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    # Decay matrices only (nanoGPT's rule): biases, norms and the logit scale keep their values. The
    # popularity term has its own group at a scaled learning rate (`lr_scale`, applied by the loop).
    popular = [(n, p) for n, p in params if n.startswith("popularity.")]
    params = [(n, p) for n, p in params if not n.startswith("popularity.")]
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if popular:
        groups.append({"params": [p for _, p in popular], "weight_decay": 0.0, "lr_scale": cfg.popularity_lr_scale})
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr, eps=cfg.eps)
    # fused: one kernel over each tensor instead of several elementwise passes (CPU and CUDA alike)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.eps, fused=True)
