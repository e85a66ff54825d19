"""`tinyllm train --nproc N`: start torchrun's N workers on a run this process has planned.

Why it is shaped this way: the run is planned once, here, before any worker starts (config
resolved, `train.batch_tokens` checked for N processes, the checkpoint to continue chosen), so a
mistake is one line rather than one per process. The plan reaches the workers the way every run's
config does, through the run directory: the resolved config is written to RUN/config.toml and each
worker runs `tinyllm train --config RUN/config.toml --out RUN` (and `--resume CHECKPOINT` when
continuing), which plans the same run again. That is what starting torchrun by hand does, and
nothing here needs to know the command's flags.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from tinyllm.config import save_toml
from tinyllm.errors import UserError
from tinyllm.runtime.device import pick_device
from tinyllm.runtime.run_dir import CONFIG_FILE
from tinyllm.train.distributed import launched
from tinyllm.train.logs import writing
from tinyllm.train.run_plan import RunPlan


def check_nproc(nproc: int) -> int:
    """`--nproc N` as the number of processes to plan for; a one-line error where it cannot apply."""
    if launched():
        raise UserError("--nproc starts torchrun itself: drop it when running under torchrun")
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    return nproc


def worker_args(plan: RunPlan) -> list[str]:
    """What each worker runs after `-m tinyllm`: the planned run, read back from its directory."""
    run = plan.run_dir.resolve()
    args = ["train", "--config", str(run / CONFIG_FILE), "--out", str(run)]
    if plan.resume_from is not None:  # maybe not the newest checkpoint: name it
        args += ["--resume", str(plan.resume_from.resolve())]
    return args


def launch(nproc: int, plan: RunPlan) -> int:
    """Run `torchrun --standalone --nproc-per-node N -m tinyllm train --config RUN/config.toml --out RUN`.

    Returns the exit status to give. Ctrl-C reaches torchrun (the workers run in sessions of their
    own), which passes it on once; the workers then finish the step and save, as one process would.
    """
    device = pick_device(plan.config.train.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc} needs one GPU per process, this machine has {torch.cuda.device_count()}: "
                        f"use --nproc {torch.cuda.device_count()}")
    config = plan.run_dir / CONFIG_FILE
    with writing(config, f"make {plan.run_dir} writable, or pick another --out"):
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        save_toml(plan.config, config)
    with _threads_per_process(nproc, device), _quiet_torch_logger():
        return _torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "tinyllm", *worker_args(plan)],
                         plan.run_dir)


def _torchrun(args: list[str], run_dir: Path) -> int:
    """torchrun's outcome as this command's exit status, with a line for a worker that died without one."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    try:
        torchrun(parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:  # it printed its own error
            return failure.exitcode
        print(f"tinyllm train: error: the process of rank {rank} died ({failure.signal_name() or failure.exitcode}); "
              f"rerun the same command to continue from the last checkpoint in {run_dir}", file=sys.stderr)
        return 1
    except SignalException:
        # Stopped by a signal whether or not the workers saved first (rank 0 then printed the
        # summary): 130, so whatever the user chained after this command does not run.
        return 130
    return 0


@contextlib.contextmanager
def _threads_per_process(nproc: int, device: torch.device) -> Iterator[None]:
    """torchrun would give each process one thread; on a CPU the processes share its cores. The
    workers inherit the variable; afterwards the process is the caller's again (torchrun sets it too)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if device.type == "cpu" and threads is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        yield
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)


@contextlib.contextmanager
def _quiet_torch_logger() -> Iterator[None]:
    """torch.distributed's own failure logging, silenced: the outcome is reported by `_torchrun`."""
    logger = logging.getLogger("torch.distributed")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
