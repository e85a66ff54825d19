"""Run logs: metrics.jsonl, the human log, the plot, and cutting the logs back on resume."""

import contextlib
import json
import re

import pytest

from tinyllm.train.logs import METRICS, PLOT, TEXT_LOG, LogWriteError, RunLog


def records(run):
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def test_metrics_text_and_plot_are_written(tmp_path):
    log = RunLog(tmp_path, floor=1.5, tensorboard=False, echo=False)
    log.metrics({"step": 0, "tokens": 0, "lr": 0.1, "val_loss": 10.0})
    log.metrics({"step": 1, "loss": 9.0, "lr": 0.1, "tokens": 64})
    log.write("step 1 | loss 9.0")
    log.sample(1, "Once", " upon")
    log.plot()
    log.close()
    assert records(tmp_path)[1] == {"step": 1, "loss": 9.0, "lr": 0.1, "tokens": 64}
    text = (tmp_path / TEXT_LOG).read_text()
    assert "step 1 | loss 9.0" in text and "Once upon" in text
    assert (tmp_path / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_cuts_metrics_back_to_the_checkpoint_and_keeps_the_text(tmp_path):
    log = RunLog(tmp_path, tensorboard=False, echo=False)
    for step in range(1, 6):
        log.metrics({"step": step, "loss": 1.0 / step, "lr": 0.1, "tokens": 8 * step})
    log.write("first session")
    log.close()
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by a crash
    log = RunLog(tmp_path, resume_step=3, tensorboard=False, echo=False)
    assert [r["step"] for r in log.history] == [1, 2, 3]
    log.metrics({"step": 4, "loss": 0.2, "lr": 0.1, "tokens": 32})
    log.close()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]
    assert "first session" in (tmp_path / TEXT_LOG).read_text()


def test_a_fresh_start_clears_old_metrics(tmp_path):
    (tmp_path / METRICS).write_text('{"step": 9, "loss": 1.0}\n')
    RunLog(tmp_path, tensorboard=False, echo=False).close()
    assert (tmp_path / METRICS).read_text() == ""


def tensorboard_scalars(run, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [(e.step, round(e.value, 4)) for e in events.Scalars(tag)]


def test_tensorboard_reads_the_events_back_and_a_resume_replaces_later_steps(tmp_path):
    log = RunLog(tmp_path, echo=False)
    for step in range(1, 6):
        log.metrics({"step": step, "loss": 1.0 / step, "lr": 0.1, "tokens": 8 * step})
    log.sample(5, "Once", " upon")
    log.close()
    log = RunLog(tmp_path, resume_step=3, echo=False)
    log.metrics({"step": 4, "loss": 0.9, "lr": 0.1, "tokens": 32})
    log.close()
    assert tensorboard_scalars(tmp_path, "loss/train") == [(1, 1.0), (2, 0.5), (3, 0.3333), (4, 0.9)]
    assert tensorboard_scalars(tmp_path, "train/tokens") == [(1, 8), (2, 16), (3, 24), (4, 32)]


# -- a file that cannot be written: one UserError naming it, not a traceback from inside a writer ---

def log_a_step(log: RunLog, step: int) -> None:
    log.metrics({"step": step, "loss": 1.0, "lr": 0.1, "tokens": 8 * step, "val_loss": 1.1})
    log.write(f"step {step}")
    log.sample(step, "Once", " upon")
    log.plot()


@pytest.mark.parametrize("which", ["text", "metrics", "tensorboard", "plot"])
def test_a_full_disk_is_a_user_error_naming_the_file(tmp_path, which, disk_full):
    log = RunLog(tmp_path, echo=False)
    log_a_step(log, 1)
    plot = (tmp_path / PLOT).read_bytes()
    path = disk_full(log, which)
    with pytest.raises(LogWriteError, match=rf"cannot write {re.escape(str(path))} \(No space left on device\): "
                                            "free disk space or make .* writable") as caught:
        log_a_step(log, 2)
    assert caught.value.path == path
    with contextlib.suppress(LogWriteError):  # the failed file's unwritten bytes fail again
        log.close()
    assert all(f.closed for f in (log._text, log._metrics))
    if which != "plot":
        return
    assert not (tmp_path / f".{PLOT}.tmp").exists()  # no half image left behind
    assert (tmp_path / PLOT).read_bytes() == plot  # the last good plot stays


def test_a_run_directory_that_cannot_be_made_names_it_and_the_fix(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(LogWriteError, match=r"cannot write .*file/run \(Not a directory\): pick another --out"):
        RunLog(tmp_path / "file" / "run", echo=False)
