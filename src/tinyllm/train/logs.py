"""Everything a run writes about itself besides checkpoints.

  train_output.txt  the human log: the same lines the console shows (loss lines, evals, samples)
  metrics.jsonl     one JSON object per logged step: step, loss, lr, tokens (+ val_loss on evals);
                    the step-0 record is the untrained model's val_loss and has no train loss
  tb/               TensorBoard events for the same scalars
  loss.png          train and val loss against tokens, with the corpus floor when it is known

Why it is shaped this way: one object owns all four so the trainer says what happened once. On
resume, metrics past the checkpoint's step belong to a timeline that no longer exists, so
metrics.jsonl is cut back to the checkpoint and TensorBoard purges the same steps; the human log
is only appended to, with a line saying where the run resumed.

A write that fails (disk full, no permission) raises `LogWriteError`, a UserError naming the file:
the trainer then saves what it can and stops with that line, rather than a traceback from deep
inside a writer. TensorBoard's events are written by `events.EventFile` in this thread for the
same reason. Under torchrun only rank 0 writes; the other ranks' `QuietLog` keeps the metrics the
loop reads back and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tinyllm.errors import UserError
from tinyllm.fsio import atomic_write_text
from tinyllm.runtime.run_dir import METRICS, PLOT, TENSORBOARD, TEXT_LOG
from tinyllm.train.plot import plot_loss


class LogWriteError(UserError):
    """A run's log file could not be written; `path` names it, the message says how to fix it."""

    def __init__(self, path: Path, error: OSError, fix: str | None = None) -> None:
        self.path = path
        super().__init__(f"cannot write {path} ({error.strerror or error}): "
                         + (fix or f"free disk space or make {path.parent} writable"))


@contextlib.contextmanager
def writing(path: Path, fix: str | None = None) -> Iterator[None]:
    """Turn an OSError inside the block into a LogWriteError naming `path`."""
    try:
        yield
    except OSError as e:
        raise LogWriteError(path, e, fix) from None


class RunLog:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        resume_step: int | None = None,
        floor: float | None = None,
        tensorboard: bool = True,
        echo: bool = True,
    ) -> None:
        """Open the run's logs; `resume_step` None starts them afresh, else continues after it."""
        self.run_dir = Path(run_dir)
        self.floor = floor
        self.echo = echo
        self._text = self._metrics = self._tb = None
        with writing(self.run_dir, "pick another --out, or make that directory (or its parent) writable"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with writing(self.run_dir / METRICS):
                self.history = self._start_metrics(resume_step)
                self._metrics = open(self.run_dir / METRICS, "a", encoding="utf-8")
            with writing(self.run_dir / TEXT_LOG):
                self._text = open(self.run_dir / TEXT_LOG, "a" if resume_step is not None else "w", encoding="utf-8")
            with writing(self.run_dir / TENSORBOARD):
                self._tb = _open_tensorboard(self.run_dir / TENSORBOARD, resume_step) if tensorboard else None
        except BaseException:
            with contextlib.suppress(UserError):
                self.close()
            raise

    def _start_metrics(self, resume_step: int | None) -> list[dict]:
        path = self.run_dir / METRICS
        if resume_step is None or not path.exists():
            path.write_text("", encoding="utf-8")
            return []
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if record.get("step", math.inf) <= resume_step:
                kept.append(record)
        # Replaced whole, never truncated in place: a kill mid-rewrite keeps the old loss curve.
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def write(self, text: str) -> None:
        """A line for the human log, echoed above the progress bar."""
        if self.echo:
            tqdm.write(text)
        with writing(self.run_dir / TEXT_LOG):
            self._text.write(text + "\n")
            self._text.flush()

    def metrics(self, record: dict[str, Any]) -> None:
        """Append one step's scalars (needs `step`; `tokens` is the x axis of the plot)."""
        self.history.append(record)
        with writing(self.run_dir / METRICS):
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        if self._tb is not None:
            with writing(self._tb.path):
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._tb.add_scalar(_tb_tag(key), value, record["step"])
                self._tb.flush()

    def sample(self, step: int, prompt: str, text: str) -> None:
        self.write(f"--- sample at step {step} ---\n{prompt}{text}\n---")
        if self._tb is not None:
            with writing(self._tb.path):
                self._tb.add_text("sample", f"{prompt}{text}", step)
                self._tb.flush()

    def plot(self) -> None:
        with writing(self.run_dir / PLOT):
            plot_loss(self.history, self.run_dir / PLOT, floor=self.floor)

    def close(self) -> None:
        """Close every file, then raise a LogWriteError for the first whose last bytes could not be written."""
        failed: LogWriteError | None = None
        for f in (self._text, self._metrics, self._tb):
            try:
                if f is not None:
                    f.close()  # a file object is closed even when its final flush fails
            except OSError as e:
                failed = failed or LogWriteError(Path(getattr(f, "path", None) or f.name), e)
        if failed is not None:
            raise failed


class QuietLog:
    """The run log of ranks other than 0: remembers the metrics (the loop reads them), writes nothing."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def write(self, text: str) -> None:
        pass

    def metrics(self, record: dict[str, Any]) -> None:
        self.history.append(record)

    def sample(self, step: int, prompt: str, text: str) -> None:
        pass

    def plot(self) -> None:
        pass

    def close(self) -> None:
        pass


def _tb_tag(key: str) -> str:
    return {"loss": "loss/train", "val_loss": "loss/val"}.get(key, f"train/{key}")


def _open_tensorboard(path: Path, resume_step: int | None) -> Any:
    # Imported here: tensorboard takes about a second to import, and only training needs it.
    from tinyllm.train.events import EventFile

    return EventFile(path, purge_step=resume_step + 1 if resume_step is not None else None)
