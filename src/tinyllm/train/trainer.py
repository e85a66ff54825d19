"""The training loop: one object that owns the model, optimizer, schedule, data and logs of a run.

Why it is shaped this way:
- Each component is built from its own config section (GPT from `model`, the loader from `data`,
  the optimizer and schedule from `optim`); only the loop reads `train`.
- Every piece of state is saved and restored through its own `state_dict`, so a run stopped at
  step k and resumed computes bit-for-bit the same later steps as one that never stopped (on CPU).
  Evaluation and sampling never move the training RNG streams or the training loader.
- Stopping is cooperative: Ctrl-C, the time budget and the step limit are all checked between
  optimizer steps, so the state saved is always that of a whole step. A second Ctrl-C quits at once.
  Under a time budget the schedule (`schedule`) follows the seconds spent, planned by rank 0 one
  step ahead from the measured costs of steps, evaluations, samples and saves.
- Long-run bookkeeping (when to log, evaluate, sample, save) lives in `_after_step`, the step
  itself in `_train_step`, so each reads in one screen. What the run says to the person watching
  it (and how it hears their Ctrl-C) is in `report`: the loop decides when, `report` what, from
  the values the loop hands it (a `RunSummary`, a stop callback), never from the trainer itself.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from tinyllm.config import Config, save_toml, time_budget
from tinyllm.data.dataset import qa_dataset, run_dataset
from tinyllm.data.loader import TokenLoader
from tinyllm.errors import UserError
from tinyllm.eval.loss import EvalResult
from tinyllm.eval.qa import QAResult
from tinyllm.eval.tasks import load_probe, probe_record
from tinyllm.runtime import checkpoint as ckpt
from tinyllm.runtime.device import (
    autocast,
    autocast_dtype,
    build_model,
    compile_blocker,
    pick_device,
    recorded_choice,
    synchronize,
    use_tf32,
)
from tinyllm.tokenizer import get_tokenizer
from tinyllm.train import distributed, report, sharded_state
from tinyllm.train.logs import LogWriteError, QuietLog, RunLog, writing
from tinyllm.train.optim import build_optimizer
from tinyllm.train.report import TrainResult
from tinyllm.train.schedule import (
    LRSchedule,
    WorkCosts,
    end_work,
    step_seconds,
    typical_step_seconds,
    work_due,
)
from tinyllm.train.sft import load_init_weights
from tinyllm.train.step import Diverged, StepRecords, next_batches, reads_after, step_if_finite
from tinyllm.train.validation import fixed_batches, val_loss


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, *, resume_from: Path | None = None, echo: bool = True) -> None:
        """Build everything for a run; `resume_from` is a checkpoint to continue from."""
        self.cfg, self.run_dir, self.echo = cfg, Path(run_dir), echo
        t = cfg.train
        self.budget = time_budget(t)
        self.dist, self.device = distributed.setup(pick_device(t.device), t.parallel)
        self.echo = echo and self.dist.is_main  # only rank 0 prints
        self.amp = self._precision()
        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, self.device)
        if t.stage == "sft" and resume_from is None:  # resuming restores the run's own weights instead
            load_init_weights(self.model, t.init)
        self.wrapped = distributed.wrap(self.model, self.dist, self.device)  # the model itself when alone
        self.compile_blocker = compile_blocker(self.device) if t.compile else None
        self.compiled = t.compile and self.compile_blocker is None
        self.forward = torch.compile(self.wrapped) if self.compiled else self.wrapped
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.schedule = LRSchedule(cfg.optim, t.max_steps, self.budget, follow=t.budget_drives_schedule,
                                   clock=time.monotonic)
        self.data_dir = data_dir = run_dataset(cfg.data)
        self.qa_dir = qa_dataset(cfg.data) if t.qa_questions else data_dir
        self.loader = self._loader(data_dir, "train", sequential=False)
        # The fixed validation set (`validation`): what `tinyllm eval --max-batches eval_batches` scores.
        val = self._loader(data_dir, "val", sequential=True)
        self.val_batches = fixed_batches(val, t.eval_batches, self.device)
        # (rows scored, rows in the split): a corpus floor is the whole split's, so a gap to it is exact only for all.
        self.val_rows = (sum(len(x) for x, _ in self.val_batches), sum(val.eval_rows().values()))
        self.task_probe = load_probe(t.eval_tasks, t.eval_task_items)  # [] when none
        # Rows with ignored targets (pads, non-assistant tokens) make micro-batches unequal: weight by targets.
        # So does a loss on some positions only (train.loss_fraction).
        self.token_weighted = cfg.data.mode == "padded" or cfg.data.loss_on == "assistant" or t.loss_fraction < 1
        self.qa: QAResult | None = None  # sft: the end-of-run held-out questions, answered
        # The corpus floor is per token over all tokens: no bound for a loss on assistant tokens only.
        self.floor = self.loader.manifest.get("floor") if cfg.data.loss_on == "all" else None
        self.grad_accum = t.grad_accum  # from train.batch_tokens, when it is set, by the run's plan
        self.tokens_per_step = t.micro_batch * self.grad_accum * self.dist.world_size * cfg.model.block_size
        assert t.batch_tokens in (0, self.tokens_per_step), "plan_run derives grad_accum for this many processes"
        self.step, self.tokens = 0, 0
        self.records = StepRecords(t.max_bad_steps)  # losses and norms stay on the device until read
        self.last_val: float | None = None
        self.last_bpb: float | None = None
        self.saved_step = -1  # the step of the last checkpoint this process wrote
        self.last_ckpt: Path | None = resume_from
        distributed.check_same_start(resume_from, self.dist)
        if resume_from is not None:
            place = partial(sharded_state.load_sharded, self.model, self.optimizer) if self.dist.sharded else None
            self.load_state_dict(ckpt.load_training_state(resume_from, self.model, self.optimizer, place=place))
        self.log = (RunLog(self.run_dir, resume_step=self.step if resume_from else None, floor=self.floor, echo=echo)
                    if self.dist.is_main else QuietLog())
        aside = ckpt.set_aside_after(self.run_dir, self.step) if resume_from and self.dist.is_main else None
        if aside is not None:
            self.log.write(f"moved the checkpoints after step {self.step} to {aside} (kept, not deleted): "
                           f"this run continues from {resume_from}")
        if t.dtype == "auto":  # recorded in config.toml (the run's and each checkpoint's): resumes keep it
            self.cfg = replace(cfg, train=replace(t, auto_dtype="bf16" if self.amp is torch.bfloat16 else "fp32"))
        if self.dist.is_main:
            with writing(self.run_dir / "config.toml"):
                save_toml(self.cfg, self.run_dir / "config.toml")
        self.stop_reason: str | None = None  # what all ranks agreed on; ends the loop
        self.stop_requested: str | None = None  # this process's wish; a signal handler writes it
        self.overhead = WorkCosts()

    def _loader(self, data_dir: Path, split: str, *, sequential: bool) -> TokenLoader:
        t, d = self.cfg.train, self.cfg.data
        # Ranks read disjoint rows of each training batch; every rank holds the whole validation set.
        rank, world = (self.dist.rank, self.dist.world_size) if split == "train" else (0, 1)
        return TokenLoader(data_dir, split, t.micro_batch, self.cfg.model.block_size, mode=d.mode, seed=t.seed,
                           sequential=sequential, loss_on=d.loss_on, rank=rank, world_size=world)

    def _precision(self) -> torch.dtype | None:
        """The autocast dtype, decided once for all ranks: "auto" on a CPU times a GEMM, which can come out
        either way, so rank 0 decides; a run that recorded its choice (`train.auto_dtype`) keeps it."""
        wanted, self.precision_note = recorded_choice(self.device, self.cfg.train.dtype, self.cfg.train.auto_dtype)
        return distributed.from_main(autocast_dtype(self.device, wanted) if self.dist.is_main else None, self.dist)

    def state_dict(self) -> dict:
        """A checkpoint's state.json: the loop's counters and its schedule's, loader's and step records'
        states (weights, optimizer and RNG have files of their own). The keys are the on-disk format."""
        return {"step": self.step, "tokens": self.tokens, "tokens_per_step": self.tokens_per_step,
                "schedule": self.schedule.state_dict(),
                "loader": self.loader.state_dict(), **self.records.state_dict(), "max_steps": self.cfg.train.max_steps,
                "precision": "bf16" if self.amp is torch.bfloat16 else "fp32", "val_loss": self.last_val, "val_bpb": self.last_bpb}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.records.load_state_dict(state)
        # Older checkpoints keep max_steps beside the schedule's state only.
        self.schedule.load_state_dict({"max_steps": state["max_steps"], **state["schedule"]})
        self.loader.load_state_dict(state["loader"])
        self.last_val, self.last_bpb = state["val_loss"], state.get("val_bpb")  # older ones have no val_bpb
        if self.cfg.train.dtype == "auto" and not self.cfg.train.auto_dtype:  # older checkpoints record it only here
            self.amp = autocast_dtype(self.device, recorded_choice(self.device, "auto", state["precision"])[0])

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until the step limit, the time budget or Ctrl-C (or a log it cannot write); ends saved."""
        if self.schedule.finished(self.step):
            self.log.write(report.already_finished(self.run_dir, self.step, self.schedule))
            self.log.close()
            return self._result("already finished", self.last_ckpt)
        with self._running(first_step=self.step):
            report.announce(self.log, self.cfg, self._summary())
            # Held until the last step is saved: a Ctrl-C or SIGTERM as the run ends still saves it.
            with report.stop_signals(self.stop, echo=self.echo):
                self._loop()
                path = self._save_end()
            return self._finish(path)

    def _loop(self) -> None:
        t = self.cfg.train
        with contextlib.closing(report.ProgressBar(self.schedule.expected_steps(self.step), self.step,
                                                   enabled=self.echo)) as bar:
            if self.step == 0 and t.eval_every:
                self._evaluate()
            if self.step == 0 and t.sample_every:
                self._sample()
            if t.stage == "sft" and t.qa_questions and self.budget is not None:
                self._time_qa()
            timed: list[float] = []
            while self.stop_reason is None:
                started = time.monotonic()
                lr = self._train_step()
                if self.budget is not None or reads_after(t, self.step):  # else the GPU runs on
                    synchronize(self.device)
                timed.append(time.monotonic() - started)
                # Decided before the bookkeeping, so the last step's record carries the final val loss.
                planned = self._plan_next(timed)
                # A Ctrl-C handled in this all-reduce sets `stop_requested` (nothing else does): agreed next step.
                self.stop_reason, planned = distributed.agree_on_next_step(self.stop_requested, planned, self.dist)
                if planned is not None:  # rank 0's, on every rank
                    self.schedule.planned = planned
                last = self.schedule.finished(self.step) or self.stop_reason is not None
                if self.stop_reason == "interrupted":
                    # Save before anything slow: the user wants out, and under torchrun the workers
                    # are killed 30 s after the signal is passed on; a last eval can take that long.
                    self._checkpoint()
                loss = self._after_step(lr, timed, last)
                bar.update(loss, lr, self.tokens_per_step / timed[-1], self.schedule.expected_steps(self.step))
                if last:
                    break

    @contextlib.contextmanager
    def _running(self, first_step: int) -> Iterator[None]:
        """TF32 while the run lasts (as train.dtype allows). On failure the logs are closed (torchrun
        workers exit without finalizers, see __main__); a log that cannot be written stops the run
        with the step reached saved when it is new (alone: ranks would wait in the save for rank 0)."""
        restore_tf32 = use_tf32(self.device, self.cfg.train.dtype)
        try:
            yield
        except BaseException as e:
            saved, log_failed = self.last_ckpt, isinstance(e, LogWriteError)
            if log_failed and self.step not in (first_step, self.saved_step) and not self.dist.active:
                with contextlib.suppress(UserError):  # the disk refuses it too: the previous one stands
                    saved = self._checkpoint()
            with contextlib.suppress(UserError):  # the error that stopped the run is the one to report
                self.log.close()
            if not log_failed:
                raise
            raise UserError(report.after_log_failure(e, saved, self.run_dir)) from None
        finally:
            restore_tf32()

    def _train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; a NaN/Inf step is skipped. Its loss
        and gradient norm stay on the device (`records`) until a step that reads them; the lr."""
        lr, clip = self.schedule.apply(self.optimizer, self.step), self.cfg.optim.grad_clip
        total = torch.zeros((), device=self.device)
        batches = next_batches(self.loader, self.grad_accum, self.cfg, self.dist.rank, self.step)
        # The step's loss is the mean over its targets: each micro-batch's mean counts by its share
        # of them. In packed pretraining every target counts, so shares are equal: 1/grad_accum.
        counts = [int((b.targets != -1).sum()) for b in batches] if self.token_weighted else []
        if self.token_weighted:  # shares of all ranks' targets; x world size, as ranks' gradients are averaged
            n_targets = max(distributed.sum_across([sum(counts)], self.dist)[0], 1) / self.dist.world_size
        for i, batch in enumerate(batches):
            x = batch.inputs.to(self.device, non_blocking=True)  # [B, T]
            y = batch.targets.to(self.device, non_blocking=True)  # [B, T], -1 = no loss
            with distributed.grad_sync(self.wrapped, self.dist, enabled=i == len(batches) - 1):
                with autocast(self.device, self.amp):
                    loss = self.forward(x, y, known_valid=not self.token_weighted)
                loss = loss * (counts[i] / n_targets) if self.token_weighted else loss / self.grad_accum
                loss.backward()
            total += loss.detach()
        total = distributed.mean_across(total, self.dist)  # every rank logs, and judges NaN by, the same loss
        grad_norm = distributed.clip_grad_norm(self.model, clip if clip > 0 else math.inf, self.dist)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.records.add(self.step, total, grad_norm)
        step_if_finite(self.optimizer, torch.isfinite(total) & torch.isfinite(grad_norm))
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def _read_steps(self) -> tuple[float | None, float]:
        """The last step's loss (None when skipped) and gradient norm; skipped steps logged and counted."""
        try:
            return self.records.read(self.log.write)
        except Diverged as e:
            raise e.for_user(self.cfg.optim.lr, self.last_ckpt) from None

    @property
    def skipped(self) -> int:  # steps skipped for a NaN/Inf loss or gradient, as of the last read
        return self.records.skipped

    def _after_step(self, lr: float, timed: list[float], last: bool) -> float | None:
        """Log, evaluate, sample and save as their intervals (and the last step) ask; the loss when read."""
        t, step = self.cfg.train, self.step
        record: dict = {}
        loss, grad_norm = self._read_steps() if reads_after(t, step, last) else (None, math.nan)
        if loss is not None and (step % t.log_every == 0 or last):
            # Steps between reads are queued, not waited for: their rate is the interval's.
            since = timed[-min(step % t.log_every or t.log_every, len(timed)):]
            record = {"step": step, "loss": loss, "lr": lr, "tokens": self.tokens, "grad_norm": round(grad_norm, 4),
                      "tokens_per_s": round(self.tokens_per_step * len(since) / sum(since), 1),
                      "elapsed_s": round(self.schedule.elapsed(), 2)}
        if t.eval_every and (step % t.eval_every == 0 or last):
            record = {"step": step, "lr": lr, "tokens": self.tokens, **record, **self._val_loss_timed()}
        if record:
            self.log.metrics(record)
            self.log.write(report.progress_line(record))
            if "val_loss" in record:
                self.log.plot()
        if t.sample_every and step % t.sample_every == 0 and not last:
            self._sample()
        if t.checkpoint_every and step % t.checkpoint_every == 0 and not last:
            self._checkpoint()
        return loss

    def _plan_next(self, timed: list[float]) -> float | None:
        """Rank 0's progress for the next step under a budget; with no room left for it, the run stops."""
        if self.budget is None or not self.dist.is_main:
            return None
        t, costs, step_s = self.cfg.train, self.overhead, step_seconds(timed)
        costs.step_s = typical_step_seconds(timed)
        planned = self.schedule.plan_next(self.step, step_s, work_now=work_due(t, costs, self.step, step_s),
                                          work_next=work_due(t, costs, self.step + 1, step_s),
                                          end=end_work(t, costs, step_s))
        if planned is None:
            self.stop("time budget")
        return planned

    def stop(self, reason: str = "interrupted") -> bool:
        """Ask the loop to stop after the current step (it then evaluates, saves and returns); False
        when a Ctrl-C had asked already. It is never downgraded to a time-budget stop."""
        if first := self.stop_requested != "interrupted":
            self.stop_requested = reason
        return first

    def _summary(self) -> report.RunSummary:
        m, s, d = self.model, self.schedule, self.dist
        return report.RunSummary(self.step, m.num_params(), m.num_params(non_embedding=True), self.device.type, self.amp,
                                 d.describe(), d.describe(short=True), self.grad_accum, self.tokens_per_step,
                                 s.total_steps, s.follows, self.budget, self.compiled, self.compile_blocker, self.precision_note)

    # -- evaluation, samples, checkpoints -------------------------------------------------------

    def evaluate(self) -> EvalResult:
        """Loss over the fixed validation batches, as `tinyllm eval` gives it (mean and bits per byte)."""
        return val_loss(self.forward, self.model, self.val_batches, self.dist, self.device, self.amp)

    def _val_loss_timed(self) -> dict[str, float]:
        """Evaluate, timed (the schedule plans with the cost): val_loss, val_bpb, any eval_tasks' accuracy."""
        started = time.monotonic()
        result = self.evaluate()
        self.last_val, self.last_bpb = result.loss, result.bits_per_byte
        tasks = probe_record(sharded_state.full_model(self.model, self.dist), self.task_probe) if self.task_probe else {}
        self.overhead.record("eval", time.monotonic() - started)
        bpb = {"val_bpb": result.bits_per_byte} if self.last_bpb is not None else {}
        return {"val_loss": result.loss, **bpb, **tasks}

    def _evaluate(self) -> None:
        """The untrained model's val loss, the first point of the curve."""
        record = {"step": self.step, "tokens": self.tokens, "lr": self.schedule.lr_for(self.step),
                  **self._val_loss_timed()}
        self.log.metrics(record)
        self.log.write(f"step {self.step}: {report.val_text(record)}")

    def _sample(self) -> None:
        tok = get_tokenizer()  # before the clock starts: its one-off build is no sampling cost
        started = time.monotonic()
        model = sharded_state.full_model(self.model, self.dist)  # rank 0 samples; FSDP ranks all help gather it
        if model is None:
            return
        report.write_samples(self.log, model, tok, self.cfg.train, self.step, self.device, self.data_dir)
        self.overhead.record("sample", time.monotonic() - started)

    def _time_qa(self) -> None:
        gather = partial(sharded_state.full_model, self.model, self.dist)  # FSDP ranks all help gather it
        if seconds := report.qa_seconds(gather, self.qa_dir, self.cfg.train.qa_questions):
            self.overhead.record("qa", seconds)

    def _checkpoint(self) -> Path:
        started = time.monotonic()
        self._read_steps()  # the skip counts saved are those of every step taken
        state = self.state_dict()
        model, optimizer = sharded_state.checkpoint_states(self.model, self.optimizer, self.dist)  # FSDP: gathered
        path = None
        if self.dist.is_main:  # the loader's position is global: rank 0's is every rank's
            path = ckpt.save_checkpoint(self.run_dir, self.step, model=model, optimizer=optimizer,
                                        state=state, config=self.cfg, keep=self.cfg.train.keep_checkpoints)
        self.last_ckpt = distributed.from_main(path, self.dist)
        self.saved_step = self.step
        self.overhead.record("checkpoint", time.monotonic() - started)
        return self.last_ckpt

    # -- the end of the run ---------------------------------------------------------------------

    def _save_end(self) -> Path:
        """The last step's val loss and checkpoint; the samples and QA that follow may be cut short."""
        evaluated_now = self.log.history and self.log.history[-1].get("step") == self.step and "val_loss" in self.log.history[-1]
        if not evaluated_now and self.cfg.train.eval_every:
            self.log.metrics({"step": self.step, "lr": self.schedule.last_lr, "tokens": self.tokens,
                              **self._val_loss_timed()})
        return self.last_ckpt if self.saved_step == self.step else self._checkpoint()

    def _finish(self, path: Path) -> TrainResult:
        # A Ctrl-C, even one during the last save, is an interrupted run (exit 130); a budget may end it early.
        reason = self.stop_reason or ("interrupted" if self.stop_requested == "interrupted" else
                                      "time budget" if self.step < self.schedule.total_steps else "finished")
        if self.cfg.train.sample_every:
            self._sample()
        if self.cfg.train.stage == "sft":
            self.qa = report.end_of_run_qa(self.log, partial(sharded_state.full_model, self.model, self.dist),
                                           self.qa_dir, self.cfg.train.qa_questions, step=self.step,
                                           tokens=self.tokens, val_loss=self.last_val)
        self.log.plot()
        self.log.close()
        return self._result(reason, path)

    def _result(self, reason: str, path: Path | None) -> TrainResult:
        # The run's seconds, as its steps and tokens are: a resumed run's rate is over all of them.
        return TrainResult(self.run_dir, self.step, self.tokens, self.schedule.elapsed(), self.last_val,
                           self.floor, reason, path, self.qa.accuracy if self.qa else None, self.last_bpb,
                           self.val_rows)
