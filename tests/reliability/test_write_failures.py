"""A checkpoint write that fails (disk full, no permission) stops training with a one-line message,
leaves every earlier checkpoint byte for byte as it was and no temporary behind, and the run
resumes from the last good checkpoint once the problem is fixed. A run log that cannot be written
(metrics, the text log, TensorBoard, the plot) stops the run the same way, with the step it
reached saved.

Disk full is simulated twice: in-process by making the writer raise ENOSPC halfway through a
checkpoint, and in a real process by a file-size limit (RLIMIT_FSIZE) that lets the weights
through but not the optimizer state, so the write fails for real inside `torch.save`.
"""

from __future__ import annotations

import errno
import json
import os
import resource
from pathlib import Path

import pytest

import tinyllm.runtime.checkpoint as ckpt
from tinyllm.errors import UserError
from tinyllm.train.logs import METRICS
from tinyllm.train.trainer import Trainer

from .conftest import TINY, assert_user_error, cli, snapshot, tiny_config


def checkpoint_files(run: Path) -> dict:
    return snapshot(run / ckpt.CHECKPOINTS)


def leftovers(run: Path) -> list[str]:
    return [p.name for p in (run / ckpt.CHECKPOINTS).iterdir() if p.name.startswith(".")]


def test_disk_full_mid_checkpoint_stops_cleanly_then_resumes(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_config(data, max_steps=4, checkpoint_every=2, keep_checkpoints=1)
    trainer = Trainer(cfg, run, echo=False)
    real_save = ckpt._save_torch
    saves = {"n": 0}

    def fills_the_disk(obj, path):
        saves["n"] += 1
        if saves["n"] == 3:  # the second checkpoint's optimizer state: its weights are already written
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "_save_torch", fills_the_disk)
    good = {}
    original = trainer._after_step

    def remember(*args):
        original(*args)
        if trainer.step == 2:
            good.update(checkpoint_files(run))

    trainer._after_step = remember
    with pytest.raises(UserError, match=r"could not write checkpoint .*step-00000004 \(No space left on device\); "
                                        r"the previous checkpoint .*step-00000002 is intact"):
        trainer.run()
    assert checkpoint_files(run) == good and leftovers(run) == []

    monkeypatch.setattr(ckpt, "_save_torch", real_save)  # space freed: the run continues from step 2
    resumed = Trainer(cfg, run, resume_from=ckpt.latest_checkpoint(run), echo=False)
    assert resumed.step == 2
    assert resumed.run().steps == 4 and ckpt.latest_checkpoint(run).name == "step-00000004"


def make_read_only(root: Path, monkeypatch) -> None:
    root.chmod(0o555)
    if os.access(root, os.W_OK):  # running as root, which ignores permissions: fail as the kernel would
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.parent == root:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)


def test_read_only_checkpoint_directory_is_a_clear_error(run_copy, monkeypatch):
    root = run_copy / ckpt.CHECKPOINTS
    cfg = ckpt.read_config(ckpt.latest_checkpoint(run_copy))
    before = checkpoint_files(run_copy)
    make_read_only(root, monkeypatch)
    try:
        trainer = Trainer(cfg, run_copy, resume_from=ckpt.latest_checkpoint(run_copy), echo=False)
        with pytest.raises(UserError, match=r"could not write checkpoint .*\(Permission denied\).*step-00000002 is "
                                            r"intact: free disk space or make .* writable"):
            trainer._checkpoint()
    finally:
        root.chmod(0o755)
    assert checkpoint_files(run_copy) == before


def limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_a_real_write_failure_in_a_real_process(run_copy):
    newest = ckpt.latest_checkpoint(run_copy)
    weights = (newest / "model.safetensors").stat().st_size
    optimizer = (newest / "optimizer.pt").stat().st_size
    assert weights < optimizer  # AdamW keeps two moments per weight
    before = checkpoint_files(run_copy)
    # Files may grow to just past the weights: the optimizer state is cut short by EFBIG mid-write.
    r = cli("train", "--out", str(run_copy), "--max-steps", "4", preexec_fn=limit_file_size(weights + 4096))
    assert_user_error(r, "could not write checkpoint", "step-00000003 (File too large)",
                      f"the previous checkpoint {newest} is intact", "--resume")
    assert checkpoint_files(run_copy) == before and leftovers(run_copy) == []

    r = cli("train", "--out", str(run_copy), "--max-steps", "4")
    assert r.returncode == 0, r.stderr
    assert "resuming at step 2" in r.stdout and ckpt.latest_checkpoint(run_copy).name == "step-00000004"


def test_a_full_disk_while_the_weights_are_written_is_the_same_one_line_error(run_copy):
    """The weights are a checkpoint's first file, so on a filling disk the likeliest to fail;
    safetensors reports that as its own error, with the OS error only in its text."""
    newest = ckpt.latest_checkpoint(run_copy)
    weights = (newest / "model.safetensors").stat().st_size
    before = checkpoint_files(run_copy)
    r = cli("train", "--out", str(run_copy), "--max-steps", "4", preexec_fn=limit_file_size(weights // 2))
    assert_user_error(r, "could not write checkpoint", "step-00000003 (File too large)",
                      f"the previous checkpoint {newest} is intact", "--resume")
    assert checkpoint_files(run_copy) == before and leftovers(run_copy) == []


# -- the run's own logs: metrics, the text log, TensorBoard, the plot ---------------------------

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@pytest.mark.parametrize(("which", "stops_at"), [("text", 3), ("metrics", 3), ("tensorboard", 3), ("plot", 4)])
def test_a_log_on_a_full_disk_stops_the_run_saved_and_it_resumes(data, tmp_path, which, stops_at, disk_full):
    run = tmp_path / "run"
    cfg = tiny_config(data, max_steps=6, checkpoint_every=2, eval_every=2)  # the plot is drawn at each eval
    trainer = Trainer(cfg, run, echo=False)
    original, failing = trainer._after_step, []

    def fill_the_disk_after_step_2(*args):
        original(*args)
        if trainer.step == 2:
            failing.append(disk_full(trainer.log, which))

    trainer._after_step = fill_the_disk_after_step_2
    with pytest.raises(UserError) as caught:
        trainer.run()
    saved = run / ckpt.CHECKPOINTS / f"step-{stops_at:08d}"
    assert str(caught.value) == (
        f"cannot write {failing[0]} (No space left on device): free disk space or make {failing[0].parent} writable, "
        f"then continue from {saved} with: tinyllm train --out {run} --resume")
    assert ckpt.latest_checkpoint(run) == saved and leftovers(run) == []
    assert trainer.log._text.closed and trainer.log._metrics.closed
    steps = [json.loads(line)["step"] for line in (run / METRICS).read_text().splitlines()]
    assert steps[:3] == [0, 1, 2]  # what was written before the disk filled stays

    resumed = Trainer(cfg, run, resume_from=ckpt.latest_checkpoint(run), echo=False)
    assert resumed.step == stops_at and resumed.run().steps == 6
    steps = [json.loads(line)["step"] for line in (run / METRICS).read_text().splitlines()]
    assert steps[-1] == 6 and steps == sorted(steps)


@needs_dev_full
def test_a_full_disk_under_the_metrics_in_a_real_process(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS).symlink_to("/dev/full")  # every write to metrics.jsonl fails with ENOSPC
    r = cli("train", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "3")
    assert_user_error(r, f"cannot write {run / METRICS} (No space left on device): free disk space",
                      f"then continue from {run / ckpt.CHECKPOINTS / 'step-00000001'} with: "
                      f"tinyllm train --out {run} --resume")
    (run / METRICS).unlink()  # space freed
    r = cli("train", "--out", str(run), "--resume", "--max-steps", "3")
    assert r.returncode == 0, r.stderr
    assert "resuming at step 1" in r.stdout and ckpt.latest_checkpoint(run).name == "step-00000003"
