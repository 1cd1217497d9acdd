"""A wall-clock budget for a training run: a caller's object (the demo's 10-minute target), not part of the
run's config, so the trainer's own settings stay host-independent.

    budget = TimeBudget(seconds=300, reserve_steps=550)
    trainer.run(cfg, budget=budget)

The loop times `probe_steps` steps after its first one (allocation, first collectives), then lowers the run's
length to what the remaining seconds buy (never raises it); stages and the LR schedule shrink with it, so a
slow host trains fewer steps on the same schedule instead of overrunning. `reserve_steps` steps' worth of the
budget is left for work after the loop whose cost scales with the host like a step does (an evaluation). The
fitted length is logged and kept in checkpoints, so a resumed run keeps it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TimeBudget:
    seconds: float
    probe_steps: int = 20
    reserve_steps: int = 0

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.probe_steps < 1 or self.reserve_steps < 0:
            raise ValueError(f"time budget {self}: seconds must be > 0, probe_steps >= 1, reserve_steps >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TimeBudget | None:
        return cls(**d) if d else None


def fit_steps(step: int, elapsed_s: float, step_s: float, budget_s: float, max_steps: int,
              reserve_steps: int = 0) -> int:
    """Run length that fits a wall-clock budget: the steps done plus what the remaining seconds buy at the
    measured step time, after `reserve_steps` steps' worth of them is set aside; at most `max_steps` (a budget
    only shortens a run) and at least the steps done."""
    step_s = max(step_s, 1e-9)
    more = int(max(0.0, budget_s - elapsed_s - reserve_steps * step_s) // step_s)
    return max(step, min(max_steps, step + more))


class BudgetProbe:
    """The loop's side of a budget: `after_step` returns the fitted length once, at the end of the probe."""

    def __init__(self, budget: TimeBudget, first_step: int, started: float):
        self.budget, self.started = budget, started
        self.probe_from = first_step + 1   # the first step (allocation, first collectives) is not timed
        self.probe_t = 0.0

    def after_step(self, step: int, now: float, max_steps: int) -> tuple[int, float] | None:
        """(fitted steps, measured step seconds) when the probe ends at `step`, else None."""
        if step == self.probe_from:
            self.probe_t = now
        elif step == self.probe_from + self.budget.probe_steps:
            step_s = (now - self.probe_t) / self.budget.probe_steps
            return fit_steps(step, now - self.started, step_s, self.budget.seconds, max_steps,
                             self.budget.reserve_steps), step_s
        return None
