"""TrainConfig (every option of `itemsage train`, validated at construction; errors name the option),
TrainResult, and what a resumed run may change: every other option must equal the checkpoint's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itemsage import schema
from itemsage.config import ConfigError, require, require_int, require_number, to_dict
from itemsage.model.config import PRESETS, model_config
from itemsage.train.checkpoint import latest_checkpoint
from itemsage.train.losses import NEGATIVE_MODES

log = logging.getLogger(__name__)


OPTIMIZERS = ("adamw", "lamb")
# Upper bounds of the options that have a sane one: a value past them is a typo or a unit slip, and
# would start hours of work (or an allocation) before failing. Checkpoint directories are named with
# 8 digits (`step-XXXXXXXX`, sorted by name), so steps must stay below 10^8; 10^7 is days on a GPU.
MAX_STEPS = 10_000_000
MAX_MINUTES = 30 * 24 * 60  # a 30-day budget
MAX_BATCH = 1 << 20  # positives per step
MAX_NEGATIVES_RATIO = 1_000.0  # random negatives per positive (the paper: 4)
MAX_SEED = 2**32 - 1  # numpy's and most tools' seed range


# Options a resumed run may change; every other option must equal the checkpoint's.
# max_steps: an unfinished run continues to the new count (train/loop.py, `_new_step_count`).
_RESUME_FREE = ("max_minutes", "max_steps", "checkpoint_every", "eval_every", "keep_checkpoints", "device", "patience")


@dataclass
class TrainConfig:
    """Everything `itemsage train` can be told. Validated at construction; errors name the option."""

    preset: str = "cpu"  # model preset (model.PRESETS)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. {"aggregator": "sum"}
    batch_size: int = 1024  # B: positives per step (global, across DDP ranks)
    random_negatives_ratio: float = 4.0  # R = ratio * B uniform catalog negatives per step
    negatives: str = "mixed"  # mixed | in_batch | random
    # the share of the random negatives drawn from the categories of the batch's positives (the
    # catalog's `category` field; pairs.Sampler), each corrected by its own sampling probability; 0 =
    # uniform draws only. Uniform draws rarely hold a product of the positive's own category, so fine
    # attributes (a size, a material) are seldom what tells a positive from its negatives
    category_negatives: float = 0.0
    optimizer: str = "adamw"  # adamw | lamb
    lr: float = 1e-3
    # the popularity term's learning rate is lr times this (model.popularity): its offsets need to
    # move by several logit units (log popularity), and each offset is updated only when its product
    # is drawn, so at the tower's rate it barely leaves 0 in a run of a few thousand steps
    popularity_lr_scale: float = 30.0
    # the popularity offsets' start: "zero", or "log_count": log(1 + train-window positives), centred,
    # the sampled softmax's own target for them (an offset's Adam steps are as large for a product seen
    # twice as for one seen a thousand times, so learning them from zero buries the rare ones)
    popularity_init: str = "log_count"
    weight_decay: float = 0.01  # on matrices only (no biases, norms, logit scale)
    eps: float = 1e-6  # Adam/LAMB epsilon; 1e-6 (not torch's 1e-8) keeps float noise in gradients that
    # are mathematically 0 (e.g. the attention key bias) from being blown up to full-size steps
    warmup_steps: int = 100  # at most a tenth of the total steps
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    max_steps: int | None = 2000
    max_minutes: float | None = None  # wall-clock budget; the step count is re-estimated (see module doc)
    tasks: tuple[str, ...] = ()  # train only on these surface.engagement tasks; () = all
    # read the dataset's graph features (DATASET/graph, written by `itemsage graph`) when it has them:
    # the tower then takes graph tokens (model.graph_tokens); False trains on content alone
    graph: bool = True
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
        require(isinstance(self.model, dict), f"train.model ({self.model!r}) must be a table of model options")
        self.model = dict(self.model)
        require(isinstance(self.engagement_weights, dict),
                f"train.engagement_weights ({self.engagement_weights!r}) must be a table: engagement -> weight")
        self.engagement_weights = dict(self.engagement_weights)

        def integer(name: str, low: int, high: int | None = MAX_STEPS) -> None:
            require_int(getattr(self, name), f"train.{name}", low, high)

        require(self.preset in PRESETS, f"train.preset ({self.preset!r}) must be one of {', '.join(PRESETS)}")
        model_config(self.preset, **self.model)  # raises ConfigError naming model.<option>
        integer("batch_size", 2, MAX_BATCH)
        require_number(self.random_negatives_ratio, "train.random_negatives_ratio", 0, MAX_NEGATIVES_RATIO)
        require(self.negatives in NEGATIVE_MODES,
                f"train.negatives ({self.negatives!r}) must be one of {', '.join(NEGATIVE_MODES)}")
        require(self.negatives == "in_batch" or self.num_random_negatives >= 1,
                f"train.random_negatives_ratio ({self.random_negatives_ratio}) gives no random negatives "
                f"for train.negatives={self.negatives!r}; raise it (e.g. 4) or use negatives='in_batch'")
        require(self.optimizer in OPTIMIZERS,
                f"train.optimizer ({self.optimizer!r}) must be one of {', '.join(OPTIMIZERS)}")
        require(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and 0 < self.lr < 10,
                f"train.lr ({self.lr!r}) must be in (0, 10)")
        require(self.popularity_init in ("zero", "log_count"),
                f"train.popularity_init must be 'zero' or 'log_count', got {self.popularity_init!r}")
        require_number(self.popularity_lr_scale, "train.popularity_lr_scale", 0, 1000, above=True)
        require_number(self.category_negatives, "train.category_negatives", 0, 1)
        require_number(self.weight_decay, "train.weight_decay", 0, 1)
        require_number(self.eps, "train.eps", 0, 10, above=True)
        integer("warmup_steps", 0)
        require_number(self.grad_clip, "train.grad_clip", 0, 1e6, unit=" (0 = off)")
        require(self.max_steps is not None or self.max_minutes is not None,
                "train.max_steps and train.max_minutes are both unset; give a step count or a minute budget")
        if self.max_steps is not None:
            integer("max_steps", 1)
        if self.max_minutes is not None:
            require_number(self.max_minutes, "train.max_minutes", 0, MAX_MINUTES, above=True, unit=" (30 days)")
        unknown = [t for t in self.tasks if t not in schema.ALL_TASKS]
        require(not unknown, f"train.tasks has unknown task(s) {unknown}; tasks are surface.engagement, "
                             f"one of {', '.join(schema.ALL_TASKS)}")
        require_number(self.upweight_conversions, "train.upweight_conversions", 0, 1e6, above=True,
                       unit=" (1 = natural frequency)")
        bad = {k: v for k, v in self.engagement_weights.items() if k not in schema.ENGAGEMENTS
               or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1e6}
        require(not bad, f"train.engagement_weights {bad} invalid: keys must be one of "
                         f"{', '.join(schema.ENGAGEMENTS)} and weights numbers from 0 to 1e6")
        self.engagement_weights = {str(k): float(v) for k, v in self.engagement_weights.items()}
        integer("sketch_depth", 1, 64)
        integer("sketch_width", 1, 1 << 28)  # depth x width int64 counters: 4 x 2^28 is 8 GiB
        integer("checkpoint_every", 0)
        integer("keep_checkpoints", 1, 10_000)
        integer("eval_every", 0)
        integer("eval_sample", 0, 100_000_000)
        integer("patience", 0, 1_000_000)
        integer("seed", 0, MAX_SEED)
        require(isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())),
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


def checkpoint_config(out_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig of the newest complete checkpoint in `out_dir` (None if there is none)."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    data = json.loads((path / "state.json").read_text())["config"]
    return TrainConfig(**data)


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    now = to_dict(cfg)
    for name, value in saved.items():
        if name not in _RESUME_FREE and _jsonable(now.get(name)) != _jsonable(value):
            raise ConfigError(f"train.{name} ({now.get(name)!r}) differs from the checkpoint's ({value!r}); "
                              "resume with the same options, or train into a new --out directory")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
