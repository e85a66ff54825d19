"""What a training run tells the person watching it, and how it answers their Ctrl-C.

Why it is shaped this way:
- The loop in `trainer` decides when to speak; this module decides what is said: the opening
  line (from a `RunSummary`), the progress bar and progress lines, the samples, SFT's held-out
  answers, and the `TrainResult` the run hands back. Rewording any of them never touches the loop.
- Lines go through the run's log, so rank 0 alone speaks and the console and `train_output.txt`
  agree; the bar and the Ctrl-C notice are console-only, and shown only when the trainer echoes.
- Everything here takes values, never the trainer: the opening line a `RunSummary` the loop fills
  in, Ctrl-C a callback that asks the run to stop. So the loop's fields can change without this
  module following, and this module does not import the trainer (which imports it).
- Ctrl-C lives here because it is a conversation with the same person: the first asks the loop
  to stop after the current step and save, the second quits at once. SIGTERM is answered the same
  way: it is what `kill`, `timeout`, `docker stop` and SLURM (before a preemption or the time limit)
  send, and each waits a while before SIGKILL, long enough to save the steps since the last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tinyllm.config import Config, TrainConfig
from tinyllm.console import interactive
from tinyllm.data.prompts import opening_prompts
from tinyllm.errors import UserError
from tinyllm.eval.qa import QAResult, held_out_qa
from tinyllm.inference.sampling import generate
from tinyllm.runtime.device import describe_precision, preserved_rng
from tinyllm.tokenizer import STOP_IDS, Tokenizer
from tinyllm.train.logs import QuietLog, RunLog
from tinyllm.train.schedule import LRSchedule


@dataclass
class TrainResult:
    """What a run did, for its caller (`tinyllm train` prints it, the benchmarks read it)."""

    run_dir: Path
    steps: int
    tokens: int
    seconds: float  # training seconds of the run, the processes before this one (resumes) included
    val_loss: float | None
    floor: float | None
    stopped: str  # "finished", "time budget", "interrupted"
    checkpoint: Path | None
    qa_accuracy: float | None = None  # sft: exact-answer accuracy on held-out questions
    val_bpb: float | None = None  # the val loss in bits per byte of the scored targets
    val_rows: tuple[int, int] | None = None  # the rows the val loss scored, of the val split's


@dataclass(frozen=True)
class RunSummary:
    """What the opening line says about a run beyond its config, as the loop hands it over."""

    step: int  # where the run starts: 0, or the step it resumes at
    params: int
    non_embedding_params: int
    device: str  # the device type: cpu, cuda, mps
    precision: torch.dtype | None  # the autocast dtype; None is fp32
    parallel: str  # how the ranks split the work, "" alone (`distributed.Setup.describe`)
    ranks: str  # the ranks' factor of the batch, "" alone (`describe(short=True)`)
    grad_accum: int
    tokens_per_step: int
    total_steps: int  # the schedule's
    follows_time: bool  # the lr schedule follows the seconds spent
    budget: float | None  # seconds
    compiled: bool
    compile_blocker: str | None  # why train.compile is on but not used
    precision_note: str | None = None  # why a recorded train.auto_dtype was not kept


def announce(log: RunLog | QuietLog, cfg: Config, run: RunSummary) -> None:
    """The run's first line: what is trained, how big, where, in what batches, for how long."""
    m, t = cfg.model, cfg.train
    verb = f"resuming at step {run.step}" if run.step else "training"
    if t.stage == "sft":
        verb += f" (chat fine-tuning from {t.init}, loss on {cfg.data.loss_on} tokens)"
    log.write(
        f"{verb}: {run.params:,} parameters ({run.non_embedding_params:,} "
        f"non-embedding), {m.n_layer} layers x {m.n_embd} wide, context {m.block_size}, on {run.device} "
        f"with {describe_precision(run.precision)}{run.parallel}; batch {t.micro_batch} x {run.grad_accum} x "
        f"{run.ranks}{m.block_size} = "
        f"{run.tokens_per_step:,} tokens/step, "
        + (f"loss on a random {t.loss_fraction:.0%} of positions, " if t.loss_fraction < 1 else "")
        + (f"budget {t.max_time} (at most {t.max_steps:,} steps), the lr schedule following the time spent"
           if run.follows_time else f"{run.total_steps:,} steps" + (f", budget {t.max_time}" if run.budget else ""))
        + (", torch.compile (the first steps include compiling)" if run.compiled else "")
    )
    if run.compile_blocker:
        log.write(f"train.compile is on, but {run.compile_blocker}: training without it")
    if run.precision_note:
        log.write(run.precision_note)


def already_finished(run_dir: Path, step: int, schedule: LRSchedule) -> str:
    """Why a run asked to continue does not train, and the flag that lets it."""
    flags = "--max-steps or --max-time" if schedule.follows else "--max-steps"
    return (f"{run_dir} is already at the end of its schedule (step {step} of at most {schedule.total_steps}): "
            f"pass a larger {flags} to train it further")


def after_log_failure(error: UserError, checkpoint: Path | None, run_dir: Path) -> str:
    """A log that could not be written stopped the run: the error's fix, then how to go on."""
    if checkpoint is None:
        return f"{error}, then run the same command again (no checkpoint was saved yet)"
    return f"{error}, then continue from {checkpoint} with: tinyllm train --out {shlex.quote(str(run_dir))} --resume"


def progress_line(record: dict) -> str:
    """One logged step as the console shows it: step | loss | val loss (bits/byte) | lr | tok/s."""
    parts = [f"step {record['step']}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "val_loss" in record:
        parts.append(val_text(record))
    parts += [f"{key[:-4]} acc {value:.3f}" for key, value in record.items() if key.endswith("_acc")]
    parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    return " | ".join(parts)


def val_text(record: dict) -> str:
    """The val loss in nats/token, and in bits per byte (which compares across tokenizers) when known."""
    bpb = f" ({record['val_bpb']:.4f} bits/byte)" if record.get("val_bpb") is not None else ""
    return f"val loss {record['val_loss']:.4f}{bpb}"


class ProgressBar:
    """The live bar under the log lines: steps done, a smoothed loss, lr and throughput.

    Only on a terminal (`console.interactive`): redirected, the periodic log lines
    (`progress_line`) are all that is printed.
    """

    def __init__(self, total: int, initial: int, *, enabled: bool) -> None:
        shown = enabled and interactive()
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not shown,
                         leave=False)
        self._smooth: float | None = None

    def update(self, loss: float | None, lr: float, tokens_per_s: float, total: int) -> None:
        """One step done; `loss` None (a skipped step) leaves the smoothed loss as it was."""
        if loss is not None:
            self._smooth = loss if self._smooth is None else 0.9 * self._smooth + 0.1 * loss
        self._bar.total = total  # under a time budget the steps to go are an estimate, made again each step
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{self._smooth:.3f}" if self._smooth is not None else "nan", lr=f"{lr:.2e}",
                              tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def close(self) -> None:
        self._bar.close()


def write_samples(log: RunLog | QuietLog, model: nn.Module, tok: Tokenizer, train: TrainConfig, step: int,
                  device: torch.device, data_dir: Path) -> None:
    """A continuation of each prompt, seeded per prompt so runs compare.

    The prompts are `train.sample_prompts`, or when that is empty the openings of the first val
    documents in `data_dir` (the run's own data: `tinyllm.data.prompts`).
    """
    prompts = train.sample_prompts or opening_prompts(data_dir)
    # Sampling draws random numbers; the training streams must not see it, or resuming drifts.
    with preserved_rng(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "stopped at the context" is expected on small models
        for i, prompt in enumerate(prompts):
            ids = generate(model, tok.prompt_ids(prompt), train.sample_tokens, temperature=train.sample_temperature,
                           top_k=train.sample_top_k or None, seed=train.seed + i, stop_ids=STOP_IDS)
            log.sample(step, prompt, tok.decode_text(ids))


def qa_seconds(gather: Callable[[], nn.Module | None], data_dir: Path, questions: int, *, probe: int = 16) -> float | None:
    """Seconds the end-of-run QA is expected to take, from the first `probe` of its questions, so
    the budget keeps them back (unreserved, 200 questions overran a 3-minute SFT budget by 9 s).
    None on ranks other than 0 and when there is nothing to ask."""
    model = gather()
    if model is None:
        return None
    started = time.monotonic()
    try:
        qa = held_out_qa(model, data_dir, min(probe, questions))
    except UserError:
        return None
    if qa is None:
        return None
    elapsed = time.monotonic() - started
    # Fewer than asked for are all there are (the rest do not fit the context): the end asks the same.
    return elapsed if qa.total < min(probe, questions) else elapsed * questions / qa.total


def end_of_run_qa(log: RunLog | QuietLog, gather: Callable[[], nn.Module | None], data_dir: Path, questions: int, *,
                  step: int, tokens: int, val_loss: float | None) -> QAResult | None:
    """SFT's end-of-run figure, after the checkpoint is safe: exact answers to held-out questions
    (scored by `tinyllm.eval.qa.held_out_qa`), told to the log and recorded in the metrics.

    `gather` returns the full model on rank 0 (FSDP ranks all help gather it), None on the others.
    """
    started = time.monotonic()
    model = gather()
    if model is None:
        return None
    try:
        qa = held_out_qa(model, data_dir, questions)
    except UserError as e:
        log.write(f"held-out QA skipped: {e}")
        return None
    if qa is None:
        return None
    for e in qa.examples[:3]:
        log.write(f"  Q: {e.question} A: {e.answer.strip()!r} (reference {e.reference!r})")
    val = f", val loss {val_loss:.4f}" if val_loss is not None else ""
    log.write(f"held-out QA: {qa.correct}/{qa.total} exact answers ({qa.accuracy:.1%}){val}, "
              f"{time.monotonic() - started:.0f}s")
    log.metrics({"step": step, "tokens": tokens, "qa_accuracy": qa.accuracy, "qa_questions": qa.total})
    return qa


@contextlib.contextmanager
def stop_signals(stop: Callable[[], bool], *, echo: bool) -> Iterator[None]:
    """`install_stop_signals` while the block runs, the previous handlers after it."""
    restore = install_stop_signals(stop, echo=echo)
    try:
        yield
    finally:
        restore()


def install_stop_signals(stop: Callable[[], bool], *, echo: bool) -> Callable[[], None]:
    """First Ctrl-C (or SIGTERM): finish the step, save, stop. Second: the usual KeyboardInterrupt.

    `stop()` asks the run to stop after the current step and returns False when a signal had
    already asked it (the second one). Returns the function that puts the previous handlers back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    # Not SIGTERM under torchrun: its agent ends the workers with it and must see them go at once.
    launched = "TORCHELASTIC_RUN_ID" in os.environ
    previous = {s: signal.getsignal(s) for s in ((signal.SIGINT,) if launched else (signal.SIGINT, signal.SIGTERM))}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    def handler(signum, frame):
        if not stop():
            restore()
            raise KeyboardInterrupt
        if echo:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            tqdm.write(f"{name}: stopping after this step to save a checkpoint (Ctrl-C again to quit without saving)")

    for s in previous:
        signal.signal(s, handler)
    return restore
