"""The learning-rate schedule: its shape, and what drives it, the steps or a time budget.

Why it is shaped this way:
- The rate is a function of the step (warmup is counted in steps) and of progress p in [0, 1]
  (the shape: `cosine`, `constant`, or `wsd`, warmup-stable-decay). Without a budget p is the
  step's place in `max_steps`, exactly the step-based schedule runs always had, which exact
  resuming relies on. With a budget (`train.max_time`) p is the fraction of the budget spent, so
  step time may change freely (a slow first step, a second process competing for the cores
  halfway through) and the run still ends on time with the rate at its floor on its last step.
  `max_steps` still bounds a fast machine: p is never below (step + 1) / max_steps.
- Under a budget p is planned one step ahead, from the seconds spent and the expected seconds
  of what comes next (the step, the evaluation, samples and checkpoint due after it, and the
  end-of-run work kept back: a last eval, sample, checkpoint and plot, at their measured costs).
  When the step after next would not fit, the next is the last and gets p = 1; a step that overran
  its estimate so far that the next no longer fits still gets that last step, at p = 1, from the
  end-of-run reserve when the budget holds it, so the rate ends at its floor. Rank 0 plans; the
  trainer hands its p to every rank in the collective that already agrees on stopping each step,
  as ranks' clocks differ.
- `wsd` holds the peak until the last `decay_fraction` of the run, then decays as 1 - sqrt to the
  floor. A stable phase suits a budget: while it lasts the rate does not depend on how well the
  step time was predicted, and only the decay, late, when the estimate has settled, does. The
  1 - sqrt cooldown ended lower than a linear one of the same length in Hägele et al. 2024
  ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").
- Training seconds spent are state, saved with the checkpoint, so a resumed run continues its
  schedule where it was instead of spending a whole new budget.
- `train.budget_drives_schedule = false` (`follow`) makes the budget a deadline of this process
  alone, the schedule going by steps: a job's time limit (SLURM's), each resumed job getting it
  afresh, as budgets were before they drove the schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from tinyllm.config import OptimConfig, TrainConfig

# The first steps of a process touch cold memory and run several times slower than the rest: the
# expected step time leaves them out once later steps are timed.
COLD_STEPS = 2
_RECENT_STEPS = 5


class LRSchedule:
    """Warmup over `warmup_steps`, then the shape from the peak `lr` to `lr * min_lr_ratio`.

    `lr_at(step, progress)` is the rate for the update at 0-based `step`; by steps (progress
    None) the last step of the horizon (`total_steps - 1`) gets exactly the floor, and later
    steps stay there. `budget` (seconds, or None) makes the schedule follow the time spent.
    """

    def __init__(self, cfg: OptimConfig, max_steps: int, budget: float | None = None, *, follow: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_lr = cfg.lr
        self.kind = cfg.schedule
        self.warmup_steps = cfg.warmup_steps
        self.min_lr = cfg.lr * cfg.min_lr_ratio
        self.decay_fraction = cfg.decay_fraction
        self.max_steps = self.total_steps = max_steps  # total_steps: the horizon (older runs fitted it)
        self.budget = budget
        # follow=False: the budget is only this process's deadline (a job's time limit) and the
        # schedule goes by steps, as it would with no budget.
        self.follows = budget is not None and follow
        self.clock, self.started = clock, clock()
        self.elapsed_before = 0.0  # training seconds of the processes before this one (resumed)
        self.planned = 0.0  # p of the next update, as rank 0 planned it
        self.progress = 0.0  # p of the last update
        self.last_lr: float | None = None

    # -- the shape ------------------------------------------------------------------------------

    def lr_at(self, step: int, progress: float | None = None) -> float:
        if progress is None:  # by steps
            if step < self.warmup_steps:
                return self.base_lr * (step + 1) / self.warmup_steps
            span = max(1, self.total_steps - 1 - self.warmup_steps)
            return self._shape(min(1.0, (step - self.warmup_steps) / span))
        lr = self._shape(progress)
        # The ramp scales the shape, so it joins the shape wherever p stands when warmup ends.
        return lr * (step + 1) / self.warmup_steps if step < self.warmup_steps else lr

    def _shape(self, p: float) -> float:
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "cosine":
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        decayed = min(1.0, (p - (1.0 - self.decay_fraction)) / self.decay_fraction)  # wsd
        return self.base_lr if decayed <= 0 else self.min_lr + (self.base_lr - self.min_lr) * (1 - math.sqrt(decayed))

    # -- what drives it -------------------------------------------------------------------------

    def progress_for(self, step: int) -> float | None:
        """p of the update at `step` under a budget (None: by steps); never below its share of max_steps."""
        if not self.follows:
            return None
        return min(1.0, max(self.planned, (step + 1) / self.total_steps))

    def lr_for(self, step: int) -> float:
        """The rate the update at `step` gets, however the schedule is driven."""
        return self.lr_at(step, self.progress_for(step))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for the update at `step`; returns it."""
        progress = self.progress_for(step)
        lr = self.lr_at(step, progress)
        if progress is not None:
            self.progress = progress
        self.last_lr = lr
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a group's own multiple (optim.adamw_lr_scale)
        return lr

    def finished(self, step: int) -> bool:
        """True once `step` updates have run the schedule to its end."""
        return step >= self.total_steps or self.progress >= 1.0

    def elapsed(self) -> float:
        """Training seconds spent, this process's and those before it (resumes)."""
        return self.elapsed_before + self.clock() - self.started

    def plan_next(self, step: int, step_s: float, *, work_now: float, work_next: float, end: float) -> float | None:
        """p for the update at `step` (the next), or None when it no longer fits in the budget.

        `step_s` is the expected seconds of a step, `work_now` those of the periodic work due
        before it, `work_next` of that due after it, `end` of the end-of-run work kept back.
        """
        assert self.budget is not None
        if not self.follows:  # this process's deadline: its own seconds only
            return self.planned if self.clock() - self.started + step_s <= self.budget else None
        usable = self.budget - end
        ends = self.elapsed() + work_now + step_s
        if ends > usable:
            # A step that ran over its estimate by more than a step's worth (a stall, a competing
            # process) took the room of the step planned to reach the floor: that one still runs,
            # at the floor, on the reserve kept back for the end, when it fits in the budget.
            return 1.0 if self.progress < 1.0 and ends <= self.budget else None
        p = 1.0 if ends + work_next + step_s > usable else ends / usable  # the one after would not fit
        return min(1.0, max(p, self.progress, (step + 1) / self.total_steps))

    def expected_steps(self, step: int) -> int:
        """The steps the run will likely take, `step` of them done (the horizon when by steps)."""
        if not self.follows or self.progress <= 0:
            return self.total_steps
        return min(self.total_steps, max(step, round(step / self.progress)))

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "max_steps": self.max_steps,
                "budget_s": self.budget if self.follows else None,
                "elapsed_s": self.elapsed(), "progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved schedule; checkpoints from before budgets drove it hold only `total_steps`
        (and `max_steps`, which the trainer adds from the checkpoint)."""
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if int(state["max_steps"]) != self.max_steps:
            return  # --max-steps changed to go on: the new horizon holds
        self.total_steps = int(state["total_steps"])
        if self.follows and state.get("budget_s") == self.budget:  # a new --max-time: p from the seconds spent
            self.planned = self.progress = float(state.get("progress", 0.0))


def step_seconds(timed: list[float]) -> float:
    """The expected seconds of the next step: the mean of the last few (past the cold first ones),
    or the last alone when it was slower. A mean alone lags a slow-down by several steps, and near
    the end that lag is a last step planned too late, which then does not fit; a one-off slow step
    costs at most that step's worth of budget left unused."""
    return max(typical_step_seconds(timed), timed[-1])


def typical_step_seconds(timed: list[float]) -> float:
    """The mean of the last few steps past the cold first ones: how slow the machine is now, not
    swayed by one step, as `WorkCosts` scales by it."""
    recent = (timed[COLD_STEPS:] or timed)[-_RECENT_STEPS:]
    return sum(recent) / len(recent)


class WorkCosts:
    """The measured seconds of the periodic work (eval, sample, checkpoint), expected at the step
    time of now. That work runs the same kernels as the steps, so a competing process slows both
    alike: a cost measured while steps took 0.5 s is expected to take 20x as long once they take
    10 s. Taken at face value, a real run slowed that way kept back 18 s for its end and spent 105."""

    def __init__(self) -> None:
        self.step_s = 0.0  # the typical seconds of a step now (`typical_step_seconds`), set by the planner
        self._measured: dict[str, tuple[float, float]] = {}

    def record(self, name: str, seconds: float) -> None:
        self._measured[name] = (seconds, self.step_s)

    def expected(self, name: str, step_s: float) -> float:
        """Seconds `name` is expected to take now, scaled by the typical step time now against
        then (one slow step alone would stop a run early); two steps' worth of `step_s` while not
        yet measured."""
        seconds, then = self._measured.get(name, (0.0, 0.0))
        if not seconds:
            return 2 * step_s
        return seconds * max(1.0, self.step_s / then) if then > 0 else seconds


def work_due(train: TrainConfig, costs: WorkCosts, step: int, step_s: float) -> float:
    """Seconds of the evaluation, samples and checkpoint due after `step`."""
    intervals = {"eval": train.eval_every, "sample": train.sample_every, "checkpoint": train.checkpoint_every}
    return sum(costs.expected(name, step_s) for name, every in intervals.items() if every and step % every == 0)


def end_work(train: TrainConfig, costs: WorkCosts, step_s: float) -> float:
    """Seconds kept back for the end of the run: a last eval, sample and checkpoint, SFT's held-out
    questions, and a step's worth for the plot and logs."""
    qa = train.stage == "sft" and train.qa_questions
    names = [n for n, on in (("eval", train.eval_every), ("sample", train.sample_every), ("checkpoint", 1),
                             ("qa", qa)) if on]
    return step_s + sum(costs.expected(name, step_s) for name in names)
