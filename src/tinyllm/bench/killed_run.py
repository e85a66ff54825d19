"""A training run killed with SIGKILL and resumed: do the losses carry on as if it had not been?

Why it is shaped this way: the killed run logs every step's loss, so the steps it took after its
last checkpoint are the reference; the resumed run restarts from that checkpoint and repeats the
same steps on the same data with the same RNG, so each repeated step's loss must match within the
tolerance. No second, uninterrupted run is needed, which halves the time on a GPU lent for minutes.
The resumed run is stopped with SIGINT (a Ctrl-C: it saves and exits) once it has repeated them,
because a smaller --max-steps would change the learning-rate schedule and with it the losses.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tinyllm.runtime.checkpoint import latest_checkpoint, list_checkpoints

MIN_REPEATED = 3  # steps logged past the checkpoint before the kill: what the resume must reproduce
_POLL_S = 0.2


def check(preset: str, env: dict, *, kill_after: float, checkpoint_every: int, run_dir: Path, deadline: float,
          tolerance: float) -> dict:
    """Train, SIGKILL once `kill_after` s have passed with MIN_REPEATED steps logged past a checkpoint,
    resume, compare. The summary's part: ok, the steps compared, the largest relative difference."""
    argv = [sys.executable, "-m", "tinyllm", "train", "--preset", preset, "--out", str(run_dir),
            "--max-steps", "1000000", "--checkpoint-every", str(checkpoint_every), "--eval-every", "0",
            "--sample-every", "0", "--set", "train.log_every=1"]
    if checkpoint_every <= MIN_REPEATED:  # the kill waits for MIN_REPEATED steps past the newest save
        raise ValueError(f"checkpoint_every must be over {MIN_REPEATED}, got {checkpoint_every}")
    started = time.monotonic()
    with _process(argv, env, run_dir / "killed.out") as proc:
        ready = _wait(proc, deadline, lambda: _killable(run_dir, started + kill_after))
        if ready is not True:
            return {"ok": False, "error": f"the run to be killed {ready}", "output": _tail(run_dir / "killed.out")}
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # A fast run may have saved again between the check and the kill, with nothing logged after that
    # newest save: resume from the newest checkpoint that has steps after it (the one before is kept).
    losses = _losses(run_dir)
    saved = resume_point(run_dir, losses)
    if saved is None:
        return {"ok": False, "error": "no step was logged after any checkpoint"}
    checkpoint_step = _step(saved)
    killed = {s: v for s, v in losses.items() if s > checkpoint_step}
    last = max(killed)
    # Set the killed run's log aside: a resume cuts metrics.jsonl back to its checkpoint, but until it
    # does, the old lines would read as steps the resumed run had already repeated.
    (run_dir / "metrics.jsonl").replace(run_dir / "metrics-killed.jsonl")
    with _process([*argv, "--resume", str(saved)], env, run_dir / "resumed.out") as proc:
        ready = _wait(proc, deadline, lambda: max(_losses(run_dir), default=0) >= last)
        if ready is not True:
            return {"ok": False, "error": f"the resumed run {ready}", "checkpoint_step": checkpoint_step,
                    "output": _tail(run_dir / "resumed.out")}
        proc.send_signal(signal.SIGINT)  # a Ctrl-C: it saves and exits
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    resumed = _losses(run_dir)
    diffs = {s: abs(resumed[s] - v) / max(abs(v), 1e-12) for s, v in killed.items() if s in resumed}
    worst = max(diffs.values(), default=float("inf"))
    return {"ok": len(diffs) == len(killed) and worst <= tolerance, "trained_s": round(time.monotonic() - started, 1),
            "checkpoint_step": checkpoint_step, "killed_after_step": last, "compared_steps": len(diffs),
            "max_relative_difference": worst, "tolerance": tolerance,
            "bitwise_equal": all(resumed.get(s) == v for s, v in killed.items()),
            "losses": {str(s): [v, resumed.get(s)] for s, v in killed.items()}}


class _process:
    """A child whose output goes to a file; killed if still running when the block is left."""

    def __init__(self, argv: list[str], env: dict, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(out, "wb")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(argv, env=env, stdout=self.file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def __enter__(self) -> subprocess.Popen:
        return self.proc

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.file.close()


def _wait(proc: subprocess.Popen, deadline: float, done) -> bool | str:
    """True once `done()`; else why not: the process ended, or the deadline passed."""
    while time.monotonic() < deadline:
        if done():
            return True
        if proc.poll() is not None:
            return f"ended on its own (exit status {proc.returncode}) before it got there"
        time.sleep(_POLL_S)
    return "did not get there before the deadline"


def _killable(run_dir: Path, not_before: float) -> bool:
    if time.monotonic() < not_before:
        return False
    saved = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if saved is None:
        return False
    return max(_losses(run_dir), default=0) >= _step(saved) + MIN_REPEATED


def resume_point(run_dir: Path, losses: dict[int, float]) -> Path | None:
    """The newest checkpoint with a step logged after it."""
    return next((c for c in reversed(list_checkpoints(run_dir)) if max(losses, default=0) > _step(c)), None)


def _step(ckpt: Path) -> int:
    return int(re.match(r"step-(\d+)", ckpt.name).group(1))


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from the run's metrics log (a line cut short by the kill is left out)."""
    path = run_dir / "metrics.jsonl"
    losses = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.is_file() else ""
