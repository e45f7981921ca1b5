"""Multi-task training of the product tower (docs/METHOD.md).

One plain loop (`train`), nanoGPT style: sample a batch of (query, product) positives across all
tasks, run the tower once over the positives and the random negatives, map each query through its
surface's adapter, update the logQ sketch, take the mixed-negative loss, step the optimiser. Logging
and checkpointing are one call each, outside the maths.

Choices written down here:
- Sampling is with replacement from a fixed distribution over the training rows (natural
  frequency; add_to_cart/checkout rows times `upweight_conversions`), drawn by one seeded numpy
  Generator. Random negatives are R = random_negatives_ratio * B uniform catalog rows; their
  expected draw count R/N gives the constant correction log(R/N). N counts the products on sale in
  the train window: a catalog's `listed_at` leaves later products out (pairs.negative_pool).
- Under DDP every rank draws the SAME global batch from the shared sampler and keeps its slice, so
  the union is exactly what one process would draw. Embeddings are all-gathered with gradient, each
  rank takes the loss of its own rows against the global candidates, with the global weighted-mean
  denominator (losses.mixed_negative_loss `weight_sum`), so DDP's gradient average equals the
  one-process gradient.
- The learning rate is linear warm-up (capped at a tenth of the run) then cosine decay to 0 at
  `total_steps`, computed from the step (no scheduler object); its state is (step, total_steps).
- `max_minutes`: the step count is an estimate, re-made as the run goes. After `_CALIBRATION_STEPS`
  timed steps (the first step excluded) and then every `_REESTIMATE_EVERY` steps, total_steps =
  min(max_steps, step + the steps that fit in the budget left at the recent wall-clock speed, which
  includes evaluations and checkpoints). The budget counts from the first step: loading the data
  (and encoding new search texts once) is not in it; a hard stop at the budget bounds the run.
  The learning rate stays smooth when the estimate moves: the cosine is driven by `progress`, the
  fraction of the decay done, and each step advances it by (1 - progress) / (steps left), i.e.
  what is left of the schedule is spread over the steps now expected to be left. With a fixed step
  count this is exactly the plain cosine of the step; when the count changes only the remaining
  slope changes (no jump), and the decay reaches 0 at whatever final step the run reaches (as well
  as the last estimate predicts it). Progress and the estimate are stored in checkpoints.
- The next batch is drawn and gathered in a background thread while the current step runs
  (`Prefetch`, as nanoGPT's get_batch). Draws come from a copy of the sampler that runs one batch
  ahead; the sampler itself advances when its batch is consumed, so a checkpoint saves exactly the
  state from which a resumed run redraws the same next batch.
- Random negatives are capped at the catalog size (R uniform draws from N < R products would mostly
  repeat products the loss already has).
- Checkpoints are directories `checkpoints/step-XXXXXXXX/` written under a temp name, manifest
  last, then renamed: weights, optimiser, sketch and RNG state (every rank's torch RNG) as
  safetensors tensors plus a JSON of everything else. No pickle.
- The held-out Recall@K is exact: the whole catalog is embedded with the current tower and each
  pair's engaged product is ranked among all products (evaluate.exact_ranks), per task. The sample
  is stratified: an equal share of `eval_sample` per task (all pairs of a smaller task), so the
  sparse conversion tasks get a usable count. It comes from the validation window only (the test
  window is for `itemsage evaluate`), the same seeded sample at every evaluation.
- Model selection: each evaluation whose overall validation Recall@10 beats the best so far saves the
  model to `best/`; the run stops early after `patience` evaluations without a gain, or at the
  step/minute budget. The final `model/` is the best evaluation's model (its step is recorded as
  `best_step` in the training summary), or the last step's when nothing was evaluated (no
  validation rows, or eval_sample 0). Best score, best step and the evaluations since are in each
  checkpoint, so a resumed run selects and stops as the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn

from itemsage import artifacts, schema
from itemsage.config import ConfigError, require, to_dict
from itemsage.evaluate.evaluation import embed_catalog, embed_pair_queries, exact_ranks, group_recall
from itemsage.data.features import ProductStore, Vocabulary
from itemsage.train.losses import NEGATIVE_MODES, LogQ, MixedNegativeLoss
from itemsage.train.checkpoint import CHECKPOINT_DIR, _rng_state, _set_rng_state, latest_checkpoint, load_checkpoint, save_checkpoint
from itemsage.model.model import PRESETS, ItemSageModel, model_config, save_model
from itemsage.train.pairs import Pairs, Prefetch, Sampler, _loss_weights, _mixture, load_pairs, negative_pool

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "lamb")
MODEL_DIR = "model"
BEST_DIR = "best"  # the best model so far, renamed to MODEL_DIR at the end
TENSORBOARD_DIR = schema.TENSORBOARD_DIR
_CALIBRATION_STEPS = 10  # steps timed to turn a minute budget into a first step count
_REESTIMATE_EVERY = 10  # steps between re-estimates of the step count under a minute budget
_BUDGET_TARGET = 0.98  # the step count aims at this fraction of the budget (the rest: the last estimate's error)
_LOG_EVERY_S = 60.0  # seconds between progress log lines when the progress bar is off
_PREFETCH_THREAD: bool | None = None  # build batches in a background thread; None = where it can overlap
# Options a resumed run may change; every other option must equal the checkpoint's.
_RESUME_FREE = ("max_minutes", "checkpoint_every", "eval_every", "keep_checkpoints", "device", "patience")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything `itemsage train` can be told. Validated at construction; errors name the option."""

    preset: str = "cpu"  # model preset (model.PRESETS)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. {"aggregator": "sum"}
    batch_size: int = 1024  # B: positives per step (global, across DDP ranks)
    random_negatives_ratio: float = 4.0  # R = ratio * B uniform catalog negatives per step
    negatives: str = "mixed"  # mixed | in_batch | random
    optimizer: str = "adamw"  # adamw | lamb
    lr: float = 1e-3
    weight_decay: float = 0.01  # on matrices only (no biases, norms, logit scale)
    eps: float = 1e-6  # Adam/LAMB epsilon; 1e-6 (not torch's 1e-8) keeps float noise in gradients that
    # are mathematically 0 (e.g. the attention key bias) from being blown up to full-size steps
    warmup_steps: int = 100  # at most a tenth of the total steps
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    max_steps: int | None = 2000
    max_minutes: float | None = None  # wall-clock budget; the step count is re-estimated (see module doc)
    tasks: tuple[str, ...] = ()  # train only on these surface.engagement tasks; () = all
    upweight_conversions: float = 1.0  # sampling factor of add_to_cart / checkout rows
    engagement_weights: dict[str, float] = field(default_factory=dict)  # loss weight per engagement (x row weight)
    sketch_depth: int = 4  # count-min sketch of the logQ estimate
    sketch_width: int = 2**20
    checkpoint_every: int = 500  # steps; 0 = only at the end
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    eval_every: int = 500  # steps between validation Recall@K; 0 = only at the end
    eval_sample: int = 2000  # validation pairs per evaluation (validation.parquet); 0 = no evaluation
    patience: int = 5  # evaluations without a better validation Recall@10 before stopping; 0 = never stop early
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast, on CUDA only

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks.split(",")) if isinstance(self.tasks, str) else tuple(self.tasks)
        self.model = dict(self.model)
        self.engagement_weights = {str(k): float(v) for k, v in dict(self.engagement_weights).items()}

        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= low,
                    f"train.{name} ({v!r}) must be an integer >= {low}")

        require(self.preset in PRESETS, f"train.preset ({self.preset!r}) must be one of {', '.join(PRESETS)}")
        model_config(self.preset, **self.model)  # raises ConfigError naming model.<option>
        integer("batch_size", 2)
        require(isinstance(self.random_negatives_ratio, (int, float)) and self.random_negatives_ratio >= 0,
                f"train.random_negatives_ratio ({self.random_negatives_ratio!r}) must be >= 0")
        require(self.negatives in NEGATIVE_MODES,
                f"train.negatives ({self.negatives!r}) must be one of {', '.join(NEGATIVE_MODES)}")
        require(self.negatives == "in_batch" or self.num_random_negatives >= 1,
                f"train.random_negatives_ratio ({self.random_negatives_ratio}) gives no random negatives "
                f"for train.negatives={self.negatives!r}; raise it (e.g. 4) or use negatives='in_batch'")
        require(self.optimizer in OPTIMIZERS,
                f"train.optimizer ({self.optimizer!r}) must be one of {', '.join(OPTIMIZERS)}")
        require(isinstance(self.lr, (int, float)) and 0 < self.lr < 10, f"train.lr ({self.lr!r}) must be in (0, 10)")
        require(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
                f"train.weight_decay ({self.weight_decay!r}) must be >= 0")
        require(isinstance(self.eps, (int, float)) and self.eps > 0, f"train.eps ({self.eps!r}) must be > 0")
        integer("warmup_steps", 0)
        require(isinstance(self.grad_clip, (int, float)) and self.grad_clip >= 0,
                f"train.grad_clip ({self.grad_clip!r}) must be >= 0 (0 = off)")
        require(self.max_steps is not None or self.max_minutes is not None,
                "train.max_steps and train.max_minutes are both unset; give a step count or a minute budget")
        if self.max_steps is not None:
            integer("max_steps", 1)
        if self.max_minutes is not None:
            require(isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0,
                    f"train.max_minutes ({self.max_minutes!r}) must be > 0")
        unknown = [t for t in self.tasks if t not in schema.ALL_TASKS]
        require(not unknown, f"train.tasks has unknown task(s) {unknown}; tasks are surface.engagement, "
                             f"one of {', '.join(schema.ALL_TASKS)}")
        require(isinstance(self.upweight_conversions, (int, float)) and self.upweight_conversions > 0,
                f"train.upweight_conversions ({self.upweight_conversions!r}) must be > 0 (1 = natural frequency)")
        bad = {k: v for k, v in self.engagement_weights.items() if k not in schema.ENGAGEMENTS or not v >= 0}
        require(not bad, f"train.engagement_weights {bad} invalid: keys must be one of "
                         f"{', '.join(schema.ENGAGEMENTS)} and weights >= 0")
        integer("sketch_depth", 1)
        integer("sketch_width", 1)
        integer("checkpoint_every", 0)
        integer("keep_checkpoints", 1)
        integer("eval_every", 0)
        integer("eval_sample", 0)
        integer("patience", 0)
        integer("seed", 0)
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                f"train.device ({self.device!r}) must be auto, cpu, cuda or cuda:N")
        require(isinstance(self.amp, bool), f"train.amp ({self.amp!r}) must be true or false")

    @property
    def num_random_negatives(self) -> int:
        return 0 if self.negatives == "in_batch" else int(round(self.random_negatives_ratio * self.batch_size))


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    pairs_per_s: float  # positives per second of training steps (global batch, evals excluded)
    final_recall: dict[str, dict[str, float]]  # task -> {"recall@1", "recall@10", "recall@100", "n"}; "all"
    final_loss: float
    elapsed_s: float
    resumed_from: int | None = None
    median_step_s: float = float("nan")  # median seconds of one training step (first step excluded)
    best_step: int | None = None  # the step of the saved model (None: no evaluation, the last step)
    stopped_early: bool = False  # patience ran out before the step/minute budget
    notes: list[str] = field(default_factory=list)  # choices made from the data, for the user to read


# ----------------------------------------------------------------------------------------------
# LAMB (torch.optim has none)
# ----------------------------------------------------------------------------------------------


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
    # Decay matrices only (nanoGPT's rule): biases, norms and the logit scale keep their values.
    groups = [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr, eps=cfg.eps)
    # fused: one kernel over each tensor instead of several elementwise passes (CPU and CUDA alike)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.eps, fused=True)


# ----------------------------------------------------------------------------------------------
# One step's query groups, and the held-out recall
# ----------------------------------------------------------------------------------------------


def _query_groups(queries: dict[str, Tensor], pairs: Pairs, rows: np.ndarray, device: torch.device
                  ) -> list[tuple[str, Tensor, Tensor]]:
    """Pairs `rows` [b] grouped by surface: (surface, positions in rows [b_s], query vectors [b_s, Dq])."""
    groups = []
    for s, table in queries.items():
        pos = np.flatnonzero(pairs.surface[rows] == s)
        if len(pos):
            index = torch.from_numpy(pairs.query_row[rows[pos]]).to(table.device)
            groups.append((s, torch.from_numpy(pos).to(device), table[index].to(device)))
    return groups


def held_out_recall(model: ItemSageModel, store: ProductStore, pairs: Pairs,
                    device: torch.device, chunk: int = 2048) -> dict[str, dict[str, float]]:
    """Exact Recall@{1,10,100} per task: each pair's product ranked among the whole catalog."""
    catalog = embed_catalog(model, store, device, chunk)  # [N, D]
    queries = embed_pair_queries(model, pairs, device)  # [Q, D]
    ranks = exact_ranks(queries, catalog, torch.from_numpy(pairs.product_row).to(device))
    return group_recall(ranks, pairs.task.astype(str))


def checkpoint_config(out_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig of the newest complete checkpoint in `out_dir` (None if there is none)."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    data = json.loads((path / "state.json").read_text())["config"]
    return TrainConfig(**data)


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------


def _init_distributed(cfg_device: str) -> tuple[int, int, bool]:
    """(rank, world_size, we_initialised) from torchrun's environment; 1 process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    cuda = cfg_device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _all_rng_states(world: int, device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """Every rank's torch RNG state (CPU and CUDA), gathered so rank 0 can checkpoint them."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    if world == 1:
        return [cpu], [cuda] if cuda is not None else []
    comm = device if device.type == "cuda" else torch.device("cpu")  # nccl gathers on the GPU
    out = []
    for state in (cpu, cuda):
        if state is None:
            out.append([])
            continue
        parts = [torch.empty_like(state, device=comm) for _ in range(world)]
        dist.all_gather(parts, state.to(comm))
        out.append([p.cpu() for p in parts])
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# Logging and progress (one call each from the loop)
# ----------------------------------------------------------------------------------------------


def _log_scalars(writer: Any, step: int, scalars: dict[str, float]) -> None:
    if writer is not None:
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None, start: int) -> Iterator[Any]:
    from itemsage.progress import progress_bar

    with progress_bar(enabled, fields="{task.fields[pps]:>8.0f} pairs/s  loss {task.fields[loss]:.4f}") as bar:
        task = bar.add_task("train", total=total, completed=start, pps=0.0, loss=float("nan"))
        yield lambda **kw: bar.update(task, **kw)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(not name.startswith("cuda") or torch.cuda.is_available(),
            f"train.device is {name!r} but torch sees no CUDA device; use device='cpu' or 'auto'")
    return torch.device(name)


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = to_dict(cfg)
    for name, value in saved.items():
        if name not in _RESUME_FREE and _jsonable(now.get(name)) != _jsonable(value):
            raise ConfigError(f"train.{name} ({now.get(name)!r}) differs from the checkpoint's ({value!r}); "
                              "resume with the same options, or train into a new --out directory")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


class Clock:
    """Pairs/s over training steps (the first step, which pays one-off costs, excluded), the minute
    budget turned into a step count (first after `_CALIBRATION_STEPS` timed steps, then re-estimated
    every `_REESTIMATE_EVERY` steps), and a progress log line every `_LOG_EVERY_S` seconds."""

    def __init__(self, cfg: TrainConfig, world: int, device: torch.device, calibrated: bool,
                 now: Any = time.perf_counter):
        self.now = now
        self.start = now()
        self.cfg, self.world, self.device = cfg, world, device
        self.budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
        self.calibrated = calibrated or self.budget_s is None
        self.train_s, self.timed, self.ticks = 0.0, 0, 0
        self.step_times: list[float] = []
        self.marks: list[tuple[int, float]] = []  # (step, time) at each estimate: the recent wall-clock speed
        self.last_log = self.start

    @property
    def pairs_per_s(self) -> float:
        return self.cfg.batch_size * self.timed / self.train_s if self.train_s else 0.0

    def tick(self, step: int, total_steps: int | None, step_s: float) -> int | None:
        """Record one step of `step_s` seconds; return the (possibly re-estimated) total step count."""
        self.ticks += 1
        if self.ticks > 1:
            self.train_s, self.timed = self.train_s + step_s, self.timed + 1
            self.step_times.append(step_s)
        if self.budget_s is None:
            return total_steps
        now = self.now()
        elapsed = now - self.start
        if _broadcast_int(int(elapsed > self.budget_s), self.world, self.device):  # rank 0 decides for all
            log.warning("stopping at step %d: the %g-minute budget is spent", step, self.cfg.max_minutes)
            return step
        if not self.calibrated and self.timed == _CALIBRATION_STEPS:
            rate = self.timed / self.train_s  # steps/s of the timed steps
        elif self.calibrated and self.marks and step - self.marks[-1][0] >= _REESTIMATE_EVERY:
            first_step, first_time = self.marks[max(0, len(self.marks) - 3)]  # about the last 30 steps
            rate = (step - first_step) / max(now - first_time, 1e-9)  # wall clock: evals and checkpoints in
        elif self.calibrated and not self.marks:  # a resumed run: start measuring from here
            self.marks.append((step, now))
            return total_steps
        else:
            return total_steps
        fit = step + int(rate * (_BUDGET_TARGET * self.budget_s - elapsed))
        new_total = _broadcast_int(max(step + 1, min(fit, self.cfg.max_steps or fit)), self.world, self.device)
        if not self.calibrated or new_total != total_steps:  # the first estimate is news; re-estimates, every
            # few steps, are for debugging (the progress bar shows the total)
            log.log(logging.DEBUG if self.calibrated else logging.INFO,
                    "minute budget: %.2f steps/s, %.0f s left -> %d steps in total", rate, self.budget_s - elapsed,
                    new_total)
        self.calibrated = True
        self.marks.append((step, now))
        return new_total

    def report(self, step: int, total_steps: int | None, loss: float) -> None:
        """Log step, pairs/s, loss and ETA every `_LOG_EVERY_S` seconds (for runs without the bar)."""
        now = self.now()
        if now - self.last_log < _LOG_EVERY_S:
            return
        self.last_log = now
        elapsed = now - self.start
        left = (total_steps - step) * elapsed / step if total_steps is not None and step else math.inf
        if self.budget_s is not None:
            left = min(left, self.budget_s - elapsed)
        eta = f"{left:.0f} s" if math.isfinite(left) else "unknown"
        log.info("step %d/%s  %.0f pairs/s  loss %.4f  ETA %s", step, total_steps if total_steps is not None else "?",
                 self.pairs_per_s, loss, eta)


def _broadcast_int(value: int, world: int, device: torch.device) -> int:
    """Rank 0's value on every rank (so all ranks agree on when to stop)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return int(t.item())


def _mean_over_ranks(t: Tensor, world: int) -> list[float]:
    """Each rank's loss covers its rows (scaled by world / global weight): the global loss is the mean."""
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t.tolist()


def _load_data(dataset_dir: Path, cfg: TrainConfig, text_fields: tuple[str, ...], max_images: int,
               progress: bool) -> tuple[Vocabulary, ProductStore, Pairs, Pairs | None]:
    vocab = Vocabulary.load(dataset_dir / schema.VOCAB_FILE)
    store = ProductStore.from_dataset(dataset_dir, vocab, text_fields, max_images, progress=progress)
    pairs = load_pairs(dataset_dir, schema.TRAIN_FILE, store, tasks=cfg.tasks, progress=progress)
    require(len(pairs) > 0, f"{dataset_dir / schema.TRAIN_FILE} has no rows for train.tasks "
                            f"{list(cfg.tasks) or 'all'}; check the task names against the dataset manifest's counts")
    if not cfg.eval_sample:
        return vocab, store, pairs, None
    held_out = load_pairs(dataset_dir, schema.VALIDATION_FILE, store, sample=cfg.eval_sample, seed=cfg.seed,
                          progress=progress)
    if not len(held_out):
        log.warning("%s has no rows: no model selection or early stopping, the model is the last step's",
                    dataset_dir / schema.VALIDATION_FILE)
    keep = np.isin(held_out.surface, list(pairs.queries))  # a surface absent from training has no adapter
    held_out = held_out.take(keep)
    for s, q in held_out.queries.items():
        if s in pairs.queries and q.shape[1] != pairs.queries[s].shape[1]:
            raise ValueError(f"{s} queries are {q.shape[1]}-d in {schema.VALIDATION_FILE} but "
                             f"{pairs.queries[s].shape[1]}-d in "
                             "train.parquet; re-run `itemsage ingest`")
    return vocab, store, pairs, held_out


def train(dataset_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, progress: bool = True,
          resume: bool = False) -> TrainResult:
    """Train the tower and adapters on `dataset_dir` into `out_dir`; the model lands in out_dir/model/.

    Runs as one process, or as one rank of a torchrun job (DDP; gloo on CPU, nccl on CUDA); only
    rank 0 writes. `resume` continues from the newest complete checkpoint in out_dir/checkpoints/.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    artifacts.verify_dataset(dataset_dir)  # refuses an unfinished or corrupted dataset, naming the file
    # The products' frozen query vectors' source, recorded in the model: `embed --catalog` computes them.
    product_query = artifacts.read_manifest(dataset_dir).get(schema.PRODUCT_QUERY)
    rank, world, own_group = _init_distributed(cfg.device)
    device = _resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    lead = rank == 0
    B, R = cfg.batch_size, cfg.num_random_negatives
    require(B % world == 0 and R % world == 0, f"train.batch_size ({B}) and the random negatives ({R}) must "
                                               f"divide evenly over the {world} processes")
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        log.info("no complete checkpoint in %s: starting from step 0", out_dir / CHECKPOINT_DIR)
    if not resume and any((out_dir / CHECKPOINT_DIR).glob("step-*")):
        raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue that run, "
                          "or choose a new --out directory")

    # Data, once. Rank 0 goes first so the text-query cache is computed once, not raced.
    mcfg = model_config(cfg.preset, **cfg.model)
    if world > 1 and not lead:
        dist.barrier()
    vocab, store, pairs, held_out = _load_data(dataset_dir, cfg, mcfg.text_fields, mcfg.max_images, progress and lead)
    if world > 1 and lead:
        dist.barrier()
    notes = []
    if store.image_dim == 0 and "modalities" not in cfg.model and mcfg.modalities != "text":
        # Modalities follow the data: a catalog without images trains a text-only tower. The saved
        # config records the choice, so a re-run from it (or a resume) reads the same features.
        cfg = dataclasses.replace(cfg, model={**cfg.model, "modalities": "text"})
        mcfg = model_config(cfg.preset, **cfg.model)
        notes.append("the catalog has no image vectors (image width 0), so the tower reads text only "
                     "(modalities 'text'); give image_embeddings or image_paths in the catalog to use images")
        log.info("%s", notes[-1])
    pool = negative_pool(dataset_dir, store) if R else None  # [N'] rows on sale in the train window, or all
    pool_size = len(store) if pool is None else len(pool)
    if pool is not None:
        notes.append(f"random negatives are drawn from the {pool_size} of {len(store)} products listed by the "
                     "train window's last engagement (the catalog's listed_at)")
    if R > pool_size:  # uniform draws beyond the catalog size would only repeat products
        capped = pool_size // world * world
        require(capped > 0 or cfg.negatives == "in_batch", f"the catalog has {pool_size} products to draw from, "
                f"too few to draw random negatives over {world} processes; use negatives='in_batch'")
        log.info("random negatives capped at the catalog size: %d a step, not %d (train.random_negatives_ratio "
                 "%g x batch %d)", capped, R, cfg.random_negatives_ratio, B)
        R = capped
    queries = {s: q.to(device) for s, q in pairs.queries.items()}  # surface -> [U_s, Dq] frozen
    loss_weight = torch.from_numpy(_loss_weights(pairs, cfg))  # [N]
    query_key, product_row = torch.from_numpy(pairs.query_key), torch.from_numpy(pairs.product_row)  # [N], [N]

    # Model, optimiser, sketch, sampler. The same seed on every rank gives identical initial weights.
    torch.manual_seed(cfg.seed)
    module = ItemSageModel.build(mcfg, len(vocab), store.image_dim, pairs.query_dims).to(device)
    optimizer = _optimizer(cfg, list(module.named_parameters()))
    logq = LogQ(cfg.sketch_depth, cfg.sketch_width, seed=cfg.seed)
    sampler = Sampler(_mixture(pairs, cfg), len(store), cfg.seed, pool=pool)
    torch.manual_seed(cfg.seed + 1 + rank)  # each rank its own dropout stream
    schedule = {"step": 0, "total_steps": cfg.max_steps, "calibrated": False, "progress": 0.0}
    # Model selection on validation Recall@10 (all tasks): the best so far and evaluations since it.
    selection: dict[str, Any] = {"best_recall": None, "best_step": None, "since_best": 0, "recall": {}}
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        _check_resume_config(state["config"], cfg)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        logq.load_state_dict(state["logq"])
        schedule = state["schedule"]
        selection = state.get("selection", selection)
        _set_rng_state(state["rng"], sampler, rank, device)
        log.info("resumed from %s (step %d)", ckpt, schedule["step"])
    step, total_steps = int(schedule["step"]), schedule["total_steps"]
    if selection.get("stopped"):  # the resumed run had stopped early: it is over
        total_steps = step
    progress_done = 0.0  # fraction of the LR decay done (`advance`); a checkpoint from before it: the step's
    if "progress" in schedule:
        progress_done = float(schedule["progress"])
    elif total_steps:
        w = min(cfg.warmup_steps, total_steps // 10)
        progress_done = min(1.0, max(0.0, (step - w) / max(1, total_steps - w)))
    resumed_from = step if ckpt is not None else None
    ddp = module
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    module.train()
    use_amp = cfg.amp and device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    writer = None
    if lead:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR))
    log_q_neg = torch.full((R,), math.log(R / pool_size) if R else 0.0, device=device)  # [R] uniform draws
    lo, hi, rlo, rhi = rank * B // world, (rank + 1) * B // world, rank * R // world, (rank + 1) * R // world
    loss_fn = MixedNegativeLoss(cfg.negatives, (lo, hi), world)  # this rank's rows of the global batch
    clock = Clock(cfg, world, device, calibrated=bool(schedule["calibrated"]))
    recall: dict[str, dict[str, float]] = {}
    losses = [float("nan")] * 3
    stopped_early = False

    def checkpoint() -> None:
        torch_states, cuda_states = _all_rng_states(world, device)  # a collective: every rank calls it
        if lead:
            save_checkpoint(out_dir, step, {
                "config": to_dict(cfg), "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "logq": logq.state_dict(), "rng": _rng_state(sampler, torch_states, cuda_states),
                "schedule": {"step": step, "total_steps": total_steps, "calibrated": clock.calibrated,
                             "progress": progress_done},
                "selection": selection}, cfg.keep_checkpoints)

    def save(directory: Path) -> None:
        summary = {"steps": step, "pairs_per_s": clock.pairs_per_s, "final_loss": losses[0], "world_size": world,
                   "train_pairs": len(pairs), "catalog": len(store),
                   "negative_pool": pool_size if R else 0, "best_step": selection["best_step"],
                   "stopped_early": stopped_early or bool(selection.get("stopped")),
                   "validation_recall": selection["recall"] if selection["best_step"] is not None else recall}
        save_model(directory, module.tower, module.adapters, mcfg, vocab, image_dim=store.image_dim,
                   query_dims=pairs.query_dims, logit_scale=module.logit_scale,
                   extra={"train_config": to_dict(cfg), "training": summary,
                          **({schema.PRODUCT_QUERY: product_query} if isinstance(product_query, dict) else {})})

    def evaluate() -> bool:
        """Validation Recall@K; a new best is saved to best/. True (on every rank) when patience is spent."""
        nonlocal recall
        stop = 0
        if lead and held_out is not None and len(held_out):
            recall = held_out_recall(module, store, held_out, device)
            _log_scalars(writer, step, {f"validation/recall@10/{t}": r["recall@10"] for t, r in recall.items()})
            log.info("step %d validation Recall@10: %s", step,
                     ", ".join(f"{t} {r['recall@10']:.3f}" for t, r in recall.items()))
            score = recall["all"]["recall@10"]
            if selection["best_step"] == step:  # re-evaluated (the final call after a periodic one)
                pass
            elif selection["best_recall"] is None or score > selection["best_recall"]:
                selection.update(best_recall=score, best_step=step, since_best=0, recall=recall)
                save(out_dir / BEST_DIR)
            else:
                selection["since_best"] += 1
            stop = int(bool(cfg.patience) and selection["since_best"] >= cfg.patience)
            if stop:
                selection["stopped"] = True
                log.info("stopping at step %d: validation Recall@10 has not beaten %.4f (step %d) for %d evaluations",
                         step, selection["best_recall"], selection["best_step"], cfg.patience)
        return bool(_broadcast_int(stop, world, device))

    def log_step(parts: Any, lr: float, scale: Tensor, show: Any) -> list[float]:
        """Progress bar or log line, and TensorBoard scalars, of the step just taken -> the losses."""
        losses = _mean_over_ranks(torch.stack([parts.total, parts.in_batch, parts.random]).detach(), world)
        show(completed=step, total=total_steps, pps=clock.pairs_per_s, loss=float(losses[0]))
        if lead and not progress:
            clock.report(step, total_steps, float(losses[0]))
        _log_scalars(writer, step, {"loss/total": losses[0], "loss/in_batch": losses[1], "loss/random": losses[2],
                                    "lr": lr, "logit_scale": float(scale.detach()), "pairs_per_s": clock.pairs_per_s})
        return losses

    def build(rows: np.ndarray, negs: np.ndarray) -> Any:  # runs in the Prefetch thread: numpy gathers only
        products = store.batch(np.concatenate([pairs.product_row[rows[lo:hi]], negs[rlo:rhi]]), backward=True)
        return products.pin_memory() if device.type == "cuda" else products

    background = _PREFETCH_THREAD if _PREFETCH_THREAD is not None else (
        device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads())  # else it competes with the step
    batches = Prefetch(sampler, B, R, build, background)
    with _progress_bar(progress and lead, total_steps, step) as show, contextlib.closing(batches):
        while total_steps is None or step < total_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps or 10**9, cfg.warmup_steps, cfg.lr, progress_done)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows, negs, products = batches.next()  # [B], [R]: the global batch, same on every rank; built ahead
            products = products.to(device, non_blocking=True)  # this rank's positives, then its negatives
            pos_ids = product_row[rows]  # [B] store rows double as product ids
            logq.update(pos_ids)  # count the global batch first, on every rank: identical sketches
            with amp:  # one model call over this rank's queries, positives and random negatives
                q, p, scale = ddp(products, _query_groups(queries, pairs, rows[lo:hi], device), hi - lo)  # [b, D], [b + r, D]
            parts = loss_fn(q.float(), p.float(), ids=pos_ids.to(device), keys=query_key[rows].to(device),
                            log_q=logq.log_q(pos_ids, batch_size=B).to(device), weights=loss_weight[rows].to(device),
                            logit_scale=scale, neg_ids=torch.from_numpy(negs).to(device) if R else None,
                            log_q_neg=log_q_neg if R else None)  # DDP gathering inside (losses.MixedNegativeLoss)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            optimizer.step()
            module.logit_scale.clamp_()  # the temperature cap, on the stored parameter (model.LogitScale)
            progress_done = advance(progress_done, step, total_steps or 10**9, cfg.warmup_steps)
            step += 1

            total_steps = clock.tick(step, total_steps, time.perf_counter() - t0)
            losses = log_step(parts, lr, scale, show)
            last = step >= total_steps if total_steps is not None else False
            stopped_early = bool(cfg.eval_every and step % cfg.eval_every == 0 and not last and evaluate())
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not last and not stopped_early:
                checkpoint()
            if stopped_early:
                break

    if not stopped_early:  # the last step's evaluation (an early stop has just had it)
        evaluate()
    checkpoint()
    model_dir = out_dir / MODEL_DIR
    if lead:
        _publish_model(out_dir, module, selection, save)
        writer.close()
    if world > 1:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return TrainResult(model_dir=model_dir, steps=step, pairs_per_s=clock.pairs_per_s,
                       final_recall=selection["recall"] if selection["best_step"] is not None else recall,
                       final_loss=losses[0], elapsed_s=time.perf_counter() - clock.start, resumed_from=resumed_from,
                       median_step_s=float(np.median(clock.step_times)) if clock.step_times else float("nan"),
                       best_step=selection["best_step"], stopped_early=bool(selection.get("stopped")), notes=notes)


def _publish_model(out_dir: Path, module: ItemSageModel, selection: dict[str, Any], save: Any) -> None:
    """out_dir/model/ := the best evaluation's weights (from best/), or the last step's when nothing
    was evaluated. Loads the best weights into `module` (training is over)."""
    best = out_dir / BEST_DIR
    if selection["best_step"] is not None and not best.is_dir() and (out_dir / MODEL_DIR / artifacts.MANIFEST).is_file():
        return  # a finished run resumed: model/ holds the best already
    try:  # best/ must be complete and from the recorded step (a kill can leave a torn or newer one)
        artifacts.verify_manifest(best, kind="model")
        saved_step = json.loads((best / "config.json").read_text())["extra"]["training"]["steps"]
    except (artifacts.ArtifactError, OSError, ValueError, KeyError):
        saved_step = None
    if selection["best_step"] is not None and saved_step == selection["best_step"]:
        module.load_state_dict(load_file(str(best / "model.safetensors")))  # keys tower.*, adapters.*, logit_scale.*
        log.info("model: the step-%d weights, validation Recall@10 %.4f", selection["best_step"],
                 selection["best_recall"])
    elif selection["best_step"] is not None:
        log.warning("%s does not hold the step-%d model; the model is the last step's", best, selection["best_step"])
        selection.update(best_step=None)
    else:
        log.info("no validation evaluation: the model is the last step's")
    save(out_dir / MODEL_DIR)
    shutil.rmtree(best, ignore_errors=True)
