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
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from tinyllm.config import save_toml
from tinyllm.errors import UserError
from tinyllm.runtime.device import pick_device
from tinyllm.runtime.run_dir import CONFIG_FILE, held_for_training
from tinyllm.train.distributed import launched
from tinyllm.train.logs import writing
from tinyllm.train.optim import MUON_SHARDED
from tinyllm.train.run_plan import RunPlan

# The signals torchrun handles itself and passes on to the workers: its default, less SIGTERM.
_PASSED_ON = "SIGINT,SIGHUP,SIGQUIT"


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
    SIGTERM is passed on as Ctrl-C (`_sigterm_as_ctrl_c`), so it saves too, as it does alone.
    """
    device = pick_device(plan.config.train.device)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc} needs one GPU per process, this machine has {torch.cuda.device_count()}: "
                        f"use --nproc {torch.cuda.device_count()}")
    if plan.config.train.parallel == "fsdp" and plan.config.optim.optimizer == "muon":
        raise UserError(MUON_SHARDED)  # here, not once per worker after config.toml was written
    config = plan.run_dir / CONFIG_FILE
    with writing(config, f"make {plan.run_dir} writable, or pick another --out"):
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        # Refused here, before its config.toml is replaced under the run that trains there. Let go
        # before the workers start: rank 0 takes it (a window of a second for a third command).
        with held_for_training(plan.run_dir):
            save_toml(plan.config, config)
    with _threads_per_process(nproc, device), _quiet_torch_logger(), _sigterm_as_ctrl_c():
        return _torchrun(["--standalone", f"--nproc-per-node={nproc}", *_signals_flag(), "-m", "tinyllm",
                          *worker_args(plan)], plan.run_dir)


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
    """torch.distributed's own failure logging, silenced: the outcome is reported by `_torchrun`.

    Its elastic loggers each set their own level when their module is imported (then a parent's
    level is not consulted: "Received 2 death signal" came with every Ctrl-C), so all are imported
    first and each is quieted."""
    import torch.distributed.run  # noqa: F401

    loggers = [logging.getLogger("torch.distributed")]
    loggers += [lg for name, lg in logging.Logger.manager.loggerDict.items()
                if name.startswith("torch.distributed.") and isinstance(lg, logging.Logger)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _signals_flag() -> list[str]:
    """torchrun's flag for `_PASSED_ON`; none in an older torch, where SIGTERM still ends the workers unsaved."""
    from torch.distributed.run import get_args_parser

    known = any("--signals-to-handle" in a.option_strings for a in get_args_parser()._actions)
    return [f"--signals-to-handle={_PASSED_ON}"] if known else []


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, SLURM) to this process reaches the workers as SIGINT.

    torchrun passes on the signal it got, and a worker keeps SIGTERM's default (the agent also
    ends the workers with it after a peer failed, and must see them go at once): so the workers
    died without saving. torchrun is told to leave SIGTERM alone (`_PASSED_ON`) to this handler, which
    raises what its own raises for SIGINT; it then stops the workers with SIGINT, and they save.
    torchrun leaves its list in the environment: put back too."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    if threading.current_thread() is not threading.main_thread():  # no handlers there: torchrun's way
        yield
        return

    def as_sigint(signum, frame):
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.SIGINT)

    key = "TORCHELASTIC_SIGNALS_TO_HANDLE"
    handled, previous = os.environ.get(key), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, as_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if handled is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = handled
