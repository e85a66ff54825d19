"""Run logs: metrics.jsonl, the human log, the plot, and cutting the logs back on resume."""

import json

from tinyllm.train.logs import METRICS, PLOT, TEXT_LOG, RunLog


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


def test_tensorboard_events_are_written(tmp_path):
    log = RunLog(tmp_path, echo=False)
    log.metrics({"step": 1, "loss": 2.0, "lr": 0.1, "tokens": 8})
    log.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
