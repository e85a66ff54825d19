"""Exact resume on the paths the AdamW/fp32 kill test does not take: the Muon optimizer through a
real checkpoint after a SIGKILL, and bf16 autocast training stopped and resumed.

As in test_kill_resume, the uninterrupted runs are made in-process on one thread (the
subprocesses run on one thread too): on CPU, losses are bit-for-bit reproducible only at a fixed
thread count.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tinyllm.runtime.checkpoint import CHECKPOINTS, latest_checkpoint
from tinyllm.train.trainer import Trainer

from .conftest import ENV, TINY, cli, tiny_config

STEPS = 10
COMPARED = ("loss", "lr", "tokens", "grad_norm")


def records(run: Path) -> list[tuple[int, dict]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], {k: r[k] for k in COMPARED if k in r}) for r in map(json.loads, lines)]


def weights(run: Path) -> bytes:
    return (run / CHECKPOINTS / f"step-{STEPS:08d}" / "model.safetensors").read_bytes()


def one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_muon_killed_and_resumed_equals_the_uninterrupted_run(data, tmp_path):
    whole = tmp_path / "whole"
    cfg = tiny_config(data, max_steps=STEPS, checkpoint_every=1, keep_checkpoints=2)
    cfg.optim.optimizer = "muon"
    one_thread(lambda: Trainer(cfg, whole, echo=False).run())

    run = tmp_path / "run"
    args = ["train", *TINY, "--data", str(data), "--out", str(run), "--max-steps", str(STEPS),
            "--checkpoint-every", "1", "--set", "train.keep_checkpoints=2", "--set", "optim.optimizer=muon"]
    proc = subprocess.Popen([sys.executable, "-m", "tinyllm", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            ckpt = latest_checkpoint(run) if run.is_dir() else None
            if ckpt is not None and int(ckpt.name[5:]) >= 3:  # Muon's momentum is in the optimizer state by now
                break
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(latest_checkpoint(run).name[5:])
    assert 3 <= killed_at < STEPS

    r = cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming at step {killed_at}" in r.stdout
    assert records(run) == records(whole)
    assert weights(run) == weights(whole)


def test_bf16_autocast_stopped_and_resumed_equals_the_uninterrupted_run(data, tmp_path):
    cfg = tiny_config(data, max_steps=STEPS, checkpoint_every=0, dtype="bf16")
    whole = tmp_path / "whole"
    one_thread(lambda: Trainer(cfg, whole, echo=False).run())

    split = tmp_path / "split"
    first = Trainer(cfg, split, echo=False)
    assert first.amp is torch.bfloat16
    after_step = first._after_step

    def stop_at_5(*args):  # asked for after step 4, taken at the end of the step under way: 5
        after_step(*args)
        if first.step == 4:
            first.stop()

    first._after_step = stop_at_5
    assert one_thread(first.run).stopped == "interrupted"
    assert latest_checkpoint(split).name == "step-00000005"
    resumed = Trainer(cfg, split, resume_from=latest_checkpoint(split), echo=False)
    assert resumed.amp is torch.bfloat16
    assert one_thread(resumed.run).steps == STEPS
    assert records(split) == records(whole)
    assert weights(split) == weights(whole)
