"""The names of what a run directory holds, shared by the code that writes them and the code that reads them.

  RUN/config.toml          the resolved config of the run (each checkpoint keeps its own copy)
  RUN/checkpoints/step-N/  complete checkpoints (`checkpoint`); `superseded-DATE-TIME/` holds those
                           set aside when a resume continued from an older one
  RUN/metrics.jsonl        one JSON object per logged step (`tinyllm.train.logs`)
  RUN/train_output.txt     the human log
  RUN/tb/                  TensorBoard events
  RUN/loss.png             the loss curve

Why it is shaped this way: the trainer writes these and `serve`, `sample`, `eval` and the tests
read them; one module of names keeps the readers from importing the trainer's log writer to learn
a file name, and keeps the two sides from drifting apart.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tinyllm.errors import UserError

CONFIG_FILE = "config.toml"
CHECKPOINTS = "checkpoints"
# Checkpoints of an abandoned timeline (newer than the one a resume continued from), kept aside.
SUPERSEDED = "superseded-"
METRICS = "metrics.jsonl"
TEXT_LOG = "train_output.txt"
PLOT = "loss.png"
TENSORBOARD = "tb"
@contextlib.contextmanager
def held_for_training(run_dir: Path) -> Iterator[None]:
    """One training process per run directory. The same command started twice (two terminals, a
    job submitted twice) would write the same checkpoints and logs, and each one's checkpoint
    rotation deletes the other's: the second is refused with one line instead.

    The lock is the kernel's (flock) on the directory itself, so it leaves no file behind and goes
    with its process however that ends. A filesystem without such locks (some network mounts) goes
    unguarded. `run_dir` must exist: the caller holds it before the trainer touches it, or, for a
    new run, as soon as the trainer has made it.
    """
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): two runs into one directory are not caught
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir} is being trained by another process: wait for it to end or stop it, "
                            "or pick another --out") from None
        except OSError:  # no flock on this filesystem
            pass
        yield
    finally:
        os.close(fd)
