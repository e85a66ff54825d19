"""`tinyllm train` as a user runs it: help, presets, config errors, and Ctrl-C then continue."""

import json
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest

from tinyllm.cli.train import summary
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.train.report import TrainResult


def tinyllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=40_000, cache_dir=tmp_path_factory.mktemp("cache")))


def test_help_documents_every_flag():
    r = tinyllm("train", "--help")
    assert r.returncode == 0
    for flag in ("--preset", "--config", "--data", "--out", "--max-steps", "--seed", "--resume", "--checkpoint-every",
                 "--eval-every", "--sample-every", "--max-time", "--set", "--list-presets"):
        assert flag in r.stdout


def test_the_summary_says_how_to_continue_a_run_that_stopped():
    result = TrainResult(Path("runs/x"), 900, 1_843_200, 479.0, 0.95, 0.79, "time budget", None, val_bpb=1.3)
    text = summary(result, 480.0)
    assert "final val loss 0.9500 nats/token (1.3000 bits/byte)" in text
    assert "tinyllm train --out runs/x --max-time 960s   # continue training" in text  # its seconds are spent
    assert "--max-steps 200 " in summary(TrainResult(Path("runs/x"), 100, 1, 9.0, 1.0, None, "finished", None), 480.0)
    # Stopped by Ctrl-C at step 100 of its 3,000: running again goes on to 3,000, where --max-steps 200 would end it.
    stopped = summary(TrainResult(Path("runs/x"), 100, 1, 9.0, 1.0, None, "interrupted", None), 480.0)
    assert "tinyllm train --out runs/x   # continue where it stopped" in stopped and "--max-steps" not in stopped


def test_a_gap_over_part_of_the_val_split_says_so():
    # The corpus floor is the whole val split's; a val loss over some of its rows is not comparable.
    part = TrainResult(Path("runs/x"), 900, 1, 479.0, 0.95, 0.79, "time budget", None, val_rows=(64, 82))
    assert "gap 0.1600\n  (the val loss is over 64 of the val split's 82 rows" in summary(part, 480.0)
    assert "tinyllm eval --run runs/x` gives the whole split's gap" in summary(part, 480.0)
    whole = TrainResult(Path("runs/x"), 900, 1, 479.0, 0.95, 0.79, "time budget", None, val_rows=(82, 82))
    assert "gap 0.1600\nrun directory" in summary(whole, 480.0)


def test_list_presets():
    r = tinyllm("train", "--list-presets")
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert r.returncode == 0 and {"seed", "cpu", "tiny", "modern"} <= set(names)


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "optim.lrr=1e-3"], "unknown key optim.lrr (did you mean optim.lr?)"),
    (["--max-steps", "0"], "train.max_steps must be at least 1"),
    (["--set", "model.n_head=3"], "must be divisible by model.n_head (3)"),
    (["--data", "/nonexistent/dataset"], "--data /nonexistent/dataset: no such directory"),
    (["--max-time", "soon"], "cannot read 'soon' as a duration"),
])
def test_config_errors_are_one_line_with_the_fix(tmp_path, args, message):
    r = tinyllm("train", "--preset", "tiny", "--out", str(tmp_path / "run"), *args)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# SIGTERM is what `kill`, `timeout`, `docker stop` and SLURM send before SIGKILL: answered as Ctrl-C is.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_and_running_again_continues_exactly(tmp_path, data, sig):
    args = ["train", "--preset", "tiny", "--data", data, "--max-steps", "10", "--eval-every", "5",
            "--sample-every", "0", "--checkpoint-every", "0", "--set", "train.micro_batch=4"]
    assert tinyllm(*args, "--out", str(tmp_path / "whole")).returncode == 0

    run = tmp_path / "split"
    proc = subprocess.Popen([sys.executable, "-m", "tinyllm", *args, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(s >= 3 for s in _steps(run)):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    # Not 0: `tinyllm train && tinyllm train --stage sft ...` must not go on after the user stopped it.
    assert proc.returncode == 130, err
    assert "interrupted" in out
    stopped = max(_steps(run))
    assert 3 <= stopped < 10 and (run / "checkpoints" / f"step-{stopped:08d}").is_dir()

    again = tinyllm(*args, "--out", str(run))
    assert again.returncode == 0 and f"resuming at step {stopped}" in again.stdout
    assert losses(run) == losses(tmp_path / "whole") and len(losses(run)) == 10


def _steps(run) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def test_a_log_redirected_to_a_file_holds_the_step_lines_and_no_bar_redraws(tmp_path, data):
    log = tmp_path / "train.log"
    with open(log, "w") as f:  # as nohup, SLURM and CI keep it: stdout and stderr in one file
        r = subprocess.run([sys.executable, "-m", "tinyllm", "train", "--preset", "tiny", "--data", data,
                            "--out", str(tmp_path / "run"), "--max-steps", "5", "--eval-every", "0",
                            "--sample-every", "0"], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_bytes().decode()  # bytes as written: reading text would turn each \r into \n
    assert r.returncode == 0, text
    assert "\r" not in text
    assert all(f"step {n} | loss " in text for n in range(1, 6))  # the periodic lines (log_every 1) are all there


def test_a_second_train_into_a_run_being_trained_is_refused(tmp_path, data):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", data, "--out", str(run), "--sample-every", "0", "--eval-every", "0"]
    first = subprocess.Popen([sys.executable, "-m", "tinyllm", *args, "--max-steps", "100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _steps(run):
            time.sleep(0.05)
        # Two writers would share checkpoints and logs, and each one's rotation deletes the other's.
        second = tinyllm(*args, "--max-steps", "2")
        assert second.returncode == 2, second.stdout[-2000:]
        assert f"{run} is being trained by another process" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    again = tinyllm(*args, "--max-steps", str(max(_steps(run)) + 1))  # the lock went with its process
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "failed"])
def test_the_trainer_is_let_go_before_the_process_group_is_torn_down(tmp_path, data, monkeypatch, fails):
    # Under torchrun, DDP's reducer holds gloo's process group: let go after teardown, gloo's
    # destructor waited, holding the GIL, for a thread that needed the GIL (a worker hung at exit).
    from tinyllm.cli import main
    from tinyllm.errors import UserError
    from tinyllm.train import distributed, trainer

    if fails:  # a run that stops on an error (a full disk, a diverged loss) must exit too
        def fail(self):
            raise UserError("the disk is full")

        monkeypatch.setattr(trainer.Trainer, "run", fail)

    alive: weakref.WeakSet = weakref.WeakSet()
    build = trainer.Trainer.__init__

    def tracked(self, *args, **kwargs):
        alive.add(self)
        build(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "__init__", tracked)
    at_teardown: list[int] = []
    monkeypatch.setattr(distributed, "teardown", lambda: at_teardown.append(len(alive)))
    code = main(["train", "--preset", "tiny", "--data", data, "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--sample-every", "0", "--eval-every", "0"])
    assert code == (2 if fails else 0)
    assert at_teardown == [0]
