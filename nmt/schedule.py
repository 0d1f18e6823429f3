"""The learning rate: a pure function of the step, or of the training clock under a time budget.

Step schedules (`constant`, `inverse_sqrt`, `exponential`, `plateau`) depend on the step alone.
The budget schedules (`linear`, `cosine`) decay from the peak, right after warm-up, to
`train.min_lr` exactly at the end of training (Li, Yumer & Ramanan, "Budgeted Training: Rethinking
Deep Neural Network Training Under Resource Constraints", ICLR 2020: a schedule that reaches zero
at the budget beats a step schedule cut short by it). The end is the deadline when
`train.max_minutes` is set, measured on the training clock (validation included, as the budget
counts it), and otherwise `train.max_steps`. A resumed run carries its clock in the checkpoint,
so it continues the same schedule.
"""

from __future__ import annotations

import math

from nmt.config import TrainConfig

BUDGET_SCHEDULES = ("linear", "cosine")
MAX_WARMUP_SHARE = 0.1  # under a time budget, warm-up ends by this share of it at the latest


def warmup_done(step: int, elapsed: float, cfg: TrainConfig) -> bool:
    """Whether warm-up is over before `step` (1-based): after `warmup_steps` steps, or, for a
    budget schedule with a deadline, once 10% of the budget has passed (so that a short budget
    on a slow machine is not spent warming up)."""
    if step >= cfg.warmup_steps:
        return True
    budgeted = cfg.schedule in BUDGET_SCHEDULES and cfg.max_minutes > 0
    return budgeted and elapsed >= MAX_WARMUP_SHARE * cfg.max_minutes * 60


def budget_progress(
    step: int, elapsed: float, warmup_seconds: float | None, cfg: TrainConfig
) -> float:
    """How far a budget schedule is from the end of warm-up (0) to the end of training (1).

    Args:
        step: the step about to run (1-based).
        elapsed: seconds on the training clock so far.
        warmup_seconds: the clock when warm-up ended (None: it ends with this step).
        cfg: the training settings; the horizon is `max_minutes` if set, else `max_steps`.
    """
    if cfg.max_minutes > 0:
        start = elapsed if warmup_seconds is None else warmup_seconds  # warm-up ends now
        span = cfg.max_minutes * 60 - start
        return min(max((elapsed - start) / span, 0.0), 1.0) if span > 0 else 1.0
    span_steps = cfg.max_steps - cfg.warmup_steps
    if span_steps <= 0:
        return 1.0
    return min(max((step - cfg.warmup_steps) / span_steps, 0.0), 1.0)


def learning_rate(
    step: int,
    cfg: TrainConfig,
    plateau_scale: float = 1.0,
    elapsed: float = 0.0,
    warmup_seconds: float | None = None,
) -> float:
    """The learning rate at `step` (1-based).

    A pure function of the step and the plateau scale, plus, for the budget schedules, of the
    training clock (`elapsed` seconds) and the clock at the end of warm-up.
    """
    warm = cfg.warmup_steps
    if warm > 0 and step < warm and not warmup_done(step, elapsed, cfg):
        if cfg.schedule in BUDGET_SCHEDULES and cfg.max_minutes > 0:
            return cfg.lr * max(step / warm, elapsed / (MAX_WARMUP_SHARE * cfg.max_minutes * 60))
        return cfg.lr * step / warm * plateau_scale
    if cfg.schedule in BUDGET_SCHEDULES:
        progress = budget_progress(step, elapsed, warmup_seconds, cfg)
        if cfg.schedule == "linear":
            remaining = 1.0 - progress
        else:  # cosine annealing without restarts (Loshchilov & Hutter, 2017, eq. 5)
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * remaining
    if cfg.schedule == "inverse_sqrt":
        factor = math.sqrt(max(warm, 1) / max(step, 1))
    elif cfg.schedule == "exponential":
        factor = cfg.decay_rate ** ((step - warm) / max(cfg.decay_steps, 1))
    else:  # constant, plateau
        factor = 1.0
    return max(cfg.lr * factor * plateau_scale, cfg.min_lr)
