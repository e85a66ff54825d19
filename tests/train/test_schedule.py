"""The learning-rate schedule: its shapes, by steps (as runs always had it) and by a time budget."""

import math

import pytest

from tinyllm.config import OptimConfig, TrainConfig
from tinyllm.train.schedule import (
    LRSchedule,
    WorkCosts,
    end_work,
    step_seconds,
    typical_step_seconds,
    work_due,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_warmup_then_cosine_to_the_floor():
    s = LRSchedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), max_steps=110)
    assert s.lr_at(0) == pytest.approx(0.1)  # linear ramp, never a zero first step
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.55, abs=0.01)  # half way down the cosine
    assert s.lr_at(109) == pytest.approx(0.1)  # the last step is exactly the floor
    assert s.lr_at(500) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_constant_schedule():
    s = LRSchedule(OptimConfig(lr=2.0, warmup_steps=0, schedule="constant"), max_steps=5)
    assert s.lr_at(0) == s.lr_at(99) == s.lr_at(3, progress=1.0) == 2.0


def test_wsd_holds_the_peak_then_decays_as_one_minus_sqrt_to_the_floor():
    s = LRSchedule(OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.4),
                   max_steps=101)
    assert s.lr_at(0) == s.lr_at(60) == 1.0  # stable through the first 60% (step 60 of 100)
    assert s.lr_at(70) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))  # a quarter into the decay
    assert s.lr_at(100) == pytest.approx(0.1) and s.lr_at(200) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert s.lr_at(5, progress=0.5) == 1.0 and s.lr_at(5, progress=1.0) == pytest.approx(0.1)


def test_by_progress_the_warmup_ramp_scales_the_shape():
    s = LRSchedule(OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.0), max_steps=100)
    assert s.lr_at(1, progress=0.5) == pytest.approx(0.5 * 0.5)  # half the cosine, half the ramp
    assert s.lr_at(4, progress=0.5) == pytest.approx(0.5)


class Opt:
    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.0}, {"lr": 0.0}]


def test_apply_sets_every_group():
    opt = Opt()
    lr = LRSchedule(OptimConfig(lr=1.0, warmup_steps=4), 10).apply(opt, 1)
    assert lr == 0.5 and all(g["lr"] == 0.5 for g in opt.param_groups)


def budgeted(budget: float = 100.0, max_steps: int = 10_000, start: float = 0.0, **optim) -> tuple[LRSchedule, Clock]:
    clock = Clock()
    clock.now = start
    cfg = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.1, **optim)
    return LRSchedule(cfg, max_steps, budget, clock=clock), clock


def run_steps(s: LRSchedule, clock: Clock, seconds, *, end: float = 0.0, stop: int = -1) -> list[tuple[float, float]]:
    """Steps as the trainer takes them: apply, spend the step's seconds, plan the next; (lr, time at end)."""
    out, timed, step, opt = [], [], 0, Opt()
    while not s.finished(step) and step != stop:
        lr = s.apply(opt, step)
        clock.now += seconds(step)
        timed.append(seconds(step))
        step += 1
        out.append((lr, clock.now))
        planned = s.plan_next(step, step_seconds(timed), work_now=0.0, work_next=0.0, end=end)
        if planned is None:
            break
        s.planned = planned
    return out


@pytest.mark.parametrize("shape", ["cosine", "wsd"])
def test_a_slow_down_halfway_still_ends_on_time_at_the_floor(shape):
    s, clock = budgeted(100.0, schedule=shape)
    steps = run_steps(s, clock, lambda i: 1.0 if clock.now < 50 else 2.0, end=10.0)
    assert s.finished(len(steps))
    assert steps[-1][0] == pytest.approx(0.1)  # the last step at the floor
    assert all(t <= 90.0 for _, t in steps)  # no step ate into what was kept back for the end
    assert steps[-1][1] > 86.0  # nor was the budget left unused
    lrs = [lr for lr, _ in steps]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_a_stall_just_before_the_last_step_still_ends_at_the_floor_on_time():
    # The step before the last was planned to leave room for one more; it stalled for two steps'
    # worth, so by the plan's own reckoning the last no longer fits before the end-of-run reserve.
    s, clock = budgeted(100.0, schedule="wsd")
    steps = run_steps(s, clock, lambda i: 3.0 if i == 87 else 1.0, end=10.0)  # step 87 starts at 87 s
    assert steps[-1][0] == pytest.approx(0.1) and s.finished(len(steps))
    assert steps[-1][1] <= 100.0


def test_max_steps_caps_a_fast_machine_and_it_still_ends_at_the_floor():
    s, clock = budgeted(100.0, max_steps=20, schedule="wsd")
    steps = run_steps(s, clock, lambda i: 0.1)
    assert len(steps) == 20 and steps[-1][0] == pytest.approx(0.1) and steps[-1][1] < 3.0


def test_no_room_for_another_step_stops_the_plan():
    s, clock = budgeted(10.0)
    clock.now = 9.5
    assert s.plan_next(1, 1.0, work_now=0.0, work_next=0.0, end=0.0) is None
    clock.now = 8.5  # the next fits, the one after would not: it is the last
    assert s.plan_next(1, 1.0, work_now=0.0, work_next=0.0, end=0.0) == 1.0
    assert s.plan_next(1, 1.0, work_now=1.0, work_next=0.0, end=0.0) is None  # an eval due first


def test_state_carries_the_seconds_spent_and_the_progress():
    s, clock = budgeted(100.0)
    run_steps(s, clock, lambda i: 1.0, stop=30)
    state = s.state_dict()
    assert state["elapsed_s"] == 30.0 and state["progress"] == pytest.approx(0.3)  # the 30th step ended at 30 s

    again, later = budgeted(100.0, start=5000.0)  # another process, its own clock
    again.load_state_dict(state)
    assert again.elapsed() == 30.0 and again.progress_for(30) == state["progress"]
    later.now += 1.0
    assert again.elapsed() == 31.0
    changed, _ = budgeted(200.0)  # a new --max-time: p starts again from the seconds spent
    changed.load_state_dict(state)
    assert changed.elapsed() == 30.0 and changed.progress == 0.0


def test_checkpoints_from_before_budgets_drove_the_schedule_still_load():
    s = LRSchedule(OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0), max_steps=100)
    s.load_state_dict({"total_steps": 7, "max_steps": 100})  # a horizon fitted once to a budget
    assert s.total_steps == 7 and s.elapsed_before == 0.0 and s.lr_at(6) == pytest.approx(0.0)
    other = LRSchedule(OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0), max_steps=200)
    other.load_state_dict({"total_steps": 7, "max_steps": 100})  # --max-steps changed to go on
    assert other.total_steps == 200


def costs_measured(step_s: float, **seconds: float) -> WorkCosts:
    costs = WorkCosts()
    costs.step_s = step_s
    for name, s in seconds.items():
        costs.record(name, s)
    return costs


def test_the_end_of_run_work_is_kept_back_at_its_measured_cost():
    t = TrainConfig(eval_every=50, sample_every=100, checkpoint_every=100)
    costs = costs_measured(0.5, eval=3.0, sample=5.0, checkpoint=2.0)
    assert end_work(t, costs_measured(0.5, eval=3.0, sample=5.0, checkpoint=0.0), 0.5) == 0.5 + 3.0 + 5.0 + 1.0
    assert work_due(t, costs, 100, 0.5) == 10.0
    assert work_due(t, costs, 50, 0.5) == 3.0
    assert work_due(t, WorkCosts(), 7, 0.5) == 0.0


def test_sft_keeps_back_its_held_out_questions_and_pretraining_asks_none():
    costs = costs_measured(0.5, checkpoint=2.0, qa=10.0)
    sft = TrainConfig(stage="sft", init="run", eval_every=0, sample_every=0, qa_questions=200)
    assert end_work(sft, costs, 0.5) == 0.5 + 2.0 + 10.0
    assert end_work(TrainConfig(stage="sft", init="run", eval_every=0, sample_every=0, qa_questions=0), costs, 0.5) == 0.5 + 2.0
    assert end_work(TrainConfig(eval_every=0, sample_every=0, qa_questions=200), costs, 0.5) == 0.5 + 2.0


def test_the_work_is_expected_to_slow_down_as_the_steps_do():
    costs = costs_measured(0.5, eval=3.0)
    costs.step_s = typical_step_seconds([0.5, 0.5, 5.0, 5.0, 5.0])
    assert costs.expected("eval", 5.0) == pytest.approx(30.0)  # steps 10x slower: so is the eval
    costs.step_s = typical_step_seconds([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 5.0])
    assert costs.expected("eval", 5.0) == pytest.approx(3.0 * 1.4 / 0.5)  # one slow step counts as a fifth
    costs.step_s = 0.25
    assert costs.expected("eval", 0.25) == 3.0  # never expected faster than it was seen
    assert costs.expected("sample", 5.0) == 10.0  # not yet measured: two steps' worth
    assert step_seconds([9.0, 9.0, 1.0, 1.0]) == 1.0  # the cold first steps left out
    assert step_seconds([9.0, 9.0, 1.0, 1.0, 1.0, 1.0, 2.0]) == 2.0  # a slow-down counts at once
