"""The run's clock: pairs/s, the minute budget turned into a step count (re-estimated as the run goes;
train/loop.py's docstring has the rule), and a progress log line for runs without the bar.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from itemsage.train.config import TrainConfig
from itemsage.train.distributed import _broadcast_int

log = logging.getLogger(__name__)


_CALIBRATION_STEPS = 10  # steps timed to turn a minute budget into a first step count
_REESTIMATE_EVERY = 10  # steps between re-estimates of the step count under a minute budget
_BUDGET_TARGET = 0.98  # the step count aims at this fraction of the budget (the rest: the last estimate's error)
_LOG_EVERY_S = 60.0  # seconds between progress log lines when the progress bar is off


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
