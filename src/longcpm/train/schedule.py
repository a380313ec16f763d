"""Warmup-Stable-Decay learning-rate multiplier (../shared/spec/training.md §1), usable with any torch optimizer.

`WSD` is a frozen, picklable function object for `torch.optim.lr_scheduler.LambdaLR`: lr(s) = η·WSD(s). It holds
no state besides its parameters, so the step count (LambdaLR.last_epoch) is all a resume needs, mid-decay included.
Because warmup and stable steps do not depend on where the decay starts, any stable-phase checkpoint can branch
into a decay later: resume it with `decay_start` set to its step (spec §1 "key property").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

SHAPES = ("exp", "linear", "cosine")


@dataclass(frozen=True)
class WSD:
    """Multiplier of the peak lr at optimizer step s (0-based, the number of steps already taken).

    total_steps S; warmup_steps W; the decay starts at T = decay_start, else S - decay_steps, else
    S - round(decay_fraction·S), and runs until S (D = S - T steps), then holds its final value.
    shape "exp": f(τ) = 0.5^(τ/T_half) with T_half = half_life, or chosen so that f(D) = final_ratio
    (T_half = D·ln2 / ln(1/final_ratio)); "linear": 1 → final_ratio (BMTrain WarmupStableDrop at 0.1);
    "cosine": final_ratio + (1 - final_ratio)·(1 + cos(πτ/D))/2.
    """

    total_steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.1
    decay_steps: int | None = None
    decay_start: int | None = None
    shape: str = "exp"
    final_ratio: float = 0.1
    half_life: float | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"WSD shape must be one of {SHAPES}, got {self.shape!r}")
        if self.total_steps < 0 or self.warmup_steps < 0:
            raise ValueError("WSD total_steps and warmup_steps must be >= 0")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"WSD decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.decay_steps is not None and not 0 <= self.decay_steps <= self.total_steps:
            raise ValueError(f"WSD decay_steps must be in [0, total_steps], got {self.decay_steps}")
        if self.decay_start is not None and not 0 <= self.decay_start <= self.total_steps:
            raise ValueError(f"WSD decay_start must be in [0, total_steps], got {self.decay_start}")
        if self.half_life is not None and self.half_life <= 0:
            raise ValueError("WSD half_life must be positive")
        if self.shape == "exp" and self.half_life is None and not 0.0 < self.final_ratio <= 1.0:
            raise ValueError("WSD exp decay needs final_ratio in (0, 1] (or a half_life)")
        if self.shape != "exp" and not 0.0 <= self.final_ratio <= 1.0:
            raise ValueError("WSD final_ratio must be in [0, 1]")
        if self.decay_begin < self.warmup_steps:
            raise ValueError(f"WSD decay starts at step {self.decay_begin}, inside the warmup ({self.warmup_steps})")

    @property
    def decay_begin(self) -> int:
        """T, the first decay step."""
        if self.decay_start is not None:
            return self.decay_start
        if self.decay_steps is not None:
            return self.total_steps - self.decay_steps
        return self.total_steps - round(self.decay_fraction * self.total_steps)

    @property
    def decay_length(self) -> int:
        return self.total_steps - self.decay_begin

    @property
    def t_half(self) -> float:
        """Half-life of the exp shape in steps."""
        if self.half_life is not None:
            return float(self.half_life)
        if self.final_ratio >= 1.0 or self.decay_length == 0:
            return math.inf
        return self.decay_length * math.log(2) / math.log(1 / self.final_ratio)

    def decay_factor(self, tau: float) -> float:
        """f(τ) for 0 <= τ <= D."""
        D = self.decay_length
        if self.shape == "exp":
            return 0.5 ** (tau / self.t_half)
        frac = min(tau / D, 1.0) if D > 0 else 1.0
        if self.shape == "linear":
            return 1.0 - (1.0 - self.final_ratio) * frac
        return self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def phase(self, step: int) -> str:
        if step < self.warmup_steps:
            return "warmup"
        return "stable" if step < self.decay_begin else "decay"

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        T = self.decay_begin
        if step < T:
            return 1.0
        return self.decay_factor(min(step, self.total_steps) - T)

    def to_dict(self) -> dict:
        return asdict(self)


def wsd_lr(step: int, peak_lr: float, **wsd_kwargs) -> float:
    """The lr at `step` for a WSD schedule with these parameters (see WSD)."""
    return peak_lr * WSD(**wsd_kwargs)(step)


def wsd_scheduler(optimizer: torch.optim.Optimizer, schedule: WSD, last_step: int = 0
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over every param group (each keeps its own base lr, e.g. μP groups) positioned at last_step:
    the next optimizer.step() uses lr = base·schedule(last_step)."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if last_step:
        set_scheduler_step(sched, last_step)
    return sched


def set_scheduler_step(sched: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Move a LambdaLR to `step` without stepping through the intermediate values (resume, branching)."""
    sched.last_epoch = step
    sched._step_count = step + 1
    values = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, values):
        group["lr"] = lr
    sched._last_lr = values
