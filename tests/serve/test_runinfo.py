"""What GET /run tells the chat page about the served run, read from the run's own files: a bad
or missing file leaves a gap (and a note where the curve would be), never a failed server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tinyllm.runtime.checkpoint import checkpoint_name
from tinyllm.runtime.run_dir import CHECKPOINTS, METRICS
from tinyllm.serve import BackgroundServer
from tinyllm.serve.runinfo import CurvePoint, RunInfo, read_run_info

# What the trainer logs: step 0's val loss, train lines, evals merged into them, and a final eval
# of a step whose train line came first (two records of step 4).
LOG = [
    {"step": 0, "tokens": 0, "lr": 0.0, "val_loss": 10.9},
    {"step": 2, "loss": 9.5, "lr": 0.1, "tokens": 128},
    {"step": 4, "loss": 8.0, "lr": 0.1, "tokens": 256},
    {"step": 4, "lr": 0.1, "tokens": 256, "val_loss": 8.25, "val_bpb": 2.5},
    {"step": 4, "tokens": 256, "qa_accuracy": 0.1, "qa_questions": 10},
    {"step": 6, "loss": 7.0, "lr": 0.1, "tokens": 384, "val_loss": 7.5},
]


def make_run(root: Path, step: int = 4, log: list | None = LOG, state: dict | None = None) -> Path:
    """A run directory with checkpoint `step` (state.json only: nothing here loads weights)."""
    ckpt = root / CHECKPOINTS / checkpoint_name(step)
    ckpt.mkdir(parents=True)
    state = {"step": step, "tokens": 64 * step, "val_loss": 8.25, "val_bpb": 2.5} if state is None else state
    (ckpt / "state.json").write_text(json.dumps(state))
    if log is not None:
        (root / METRICS).write_text("".join(json.dumps(r) + "\n" for r in log))
    return ckpt


def test_a_run_gives_its_name_step_val_loss_and_curve_up_to_the_checkpoint(tmp_path):
    ckpt = make_run(tmp_path / "my-run")
    info = read_run_info(ckpt)
    assert (info.name, info.checkpoint, info.step, info.tokens) == ("my-run", "step-00000004", 4, 256)
    assert (info.val_loss, info.val_bpb) == (8.25, 2.5)
    # One point per logged step; step 4's records merged; step 6 is past the served weights.
    assert info.curve == [CurvePoint(0, 0, None, 10.9), CurvePoint(2, 128, 9.5, None),
                          CurvePoint(4, 256, 8.0, 8.25)]
    assert info.curve_note is None


def test_bad_lines_in_the_metrics_log_are_skipped(tmp_path):
    ckpt = make_run(tmp_path / "run", log=LOG[:3])
    with open(tmp_path / "run" / METRICS, "ab") as f:
        f.write(b'[1, 2]\n"text"\n{"loss": 1.0}\n{"step": "3", "loss": 1.0}\n{"step": -1, "loss": 1}\n')
        f.write(b'{"step": 3, "loss": NaN, "val_loss": Infinity}\n{"step": 3, "loss": 1e999}\n')
        f.write(b'{"step": 3, "val_loss": ' + b"9" * 400 + b"}\n")  # no float holds it
        f.write(b'{"step": 1, "loss": "high", "val_loss": true, "tokens": 64}\n\xff\xfe not UTF-8\n')
        f.write(b'{"step": 4, "loss": 7.9, "tok')  # a line cut short by a crash
    info = read_run_info(ckpt)
    assert [(p.step, p.loss, p.val_loss) for p in info.curve] == [
        (0, None, 10.9), (2, 9.5, None), (4, 8.0, None)]
    assert info.val_loss == 8.25


def test_a_run_without_metrics_still_has_its_name_step_and_val_loss(tmp_path):
    info = read_run_info(make_run(tmp_path / "quiet", log=None))
    assert (info.name, info.step, info.val_loss) == ("quiet", 4, 8.25)
    assert info.curve == [] and info.curve_note == f"the run has no {METRICS}"
    assert info.to_json()["curve"] is None and METRICS in info.to_json()["curve_note"]


def test_a_log_with_no_loss_up_to_the_checkpoint_says_so(tmp_path):
    info = read_run_info(make_run(tmp_path / "run", step=1, log=LOG[1:]))
    assert info.curve == [] and info.curve_note == f"{METRICS} has no loss logged up to step 1"


def test_a_checkpoint_copied_out_of_its_run_has_no_curve(tmp_path):
    ckpt = make_run(tmp_path / "run")
    alone = tmp_path / "shared-model"
    ckpt.rename(alone)
    info = read_run_info(alone)
    assert (info.name, info.checkpoint, info.step, info.val_loss) == ("shared-model", "shared-model", 4, 8.25)
    assert info.curve == [] and "not inside a run directory" in info.curve_note


def test_an_unreadable_state_falls_back_to_the_directory_name_and_the_log(tmp_path):
    ckpt = make_run(tmp_path / "run", step=6, state={})
    (ckpt / "state.json").write_text('{"step": 6, "tok')  # torn
    info = read_run_info(ckpt)
    assert (info.step, info.tokens, info.val_bpb) == (6, None, None)
    assert info.val_loss == 7.5  # the log's last eval
    assert [p.step for p in info.curve] == [0, 2, 4, 6]


def test_a_superseded_checkpoint_belongs_to_its_run(tmp_path):
    ckpt = make_run(tmp_path / "run")
    aside = tmp_path / "run" / CHECKPOINTS / "superseded-20260101-000000"
    aside.mkdir()
    info = read_run_info(ckpt.rename(aside / ckpt.name))
    assert info.name == "run" and [p.step for p in info.curve] == [0, 2, 4]


def test_get_run_serves_it_as_json(tmp_path, make_model, tokenizer):
    info = read_run_info(make_run(tmp_path / "my-run"))
    with BackgroundServer(make_model(), tokenizer, model_name="m", run_info=info) as srv:
        body = httpx.get(srv.url + "/run", timeout=10).json()
    assert body == {
        "name": "my-run", "checkpoint": "step-00000004", "step": 4, "tokens": 256,
        "val_loss": 8.25, "val_bpb": 2.5, "curve_note": None,
        "curve": {"step": [0, 2, 4], "tokens": [0, 128, 256], "loss": [None, 9.5, 8.0],
                  "val_loss": [10.9, None, 8.25]},
    }


def test_a_server_without_a_run_says_why_there_is_no_curve(server):
    body = httpx.get(server.url + "/run", timeout=10).json()
    assert body["name"] is None and body["step"] is None and body["curve"] is None
    assert body["curve_note"] == RunInfo().curve_note
