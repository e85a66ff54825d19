"""DDP checkpoints resume with another number of processes, both ways, on the curve of a run
that never stopped (the FSDP2 case is in test_distributed). A DDP checkpoint is rank 0's whole
model and optimizer, and the loader's position counts rows globally, so one process can continue
what two started and two what one started."""

import subprocess
import sys

from .test_distributed import (  # noqa: F401 (data and no_torchrun are fixtures)
    CONSTANT,
    assert_same_curve,
    cli_flags,
    curve,
    data,
    no_torchrun,
    settings,
    torchrun,
    train_here,
)


def test_ddp_checkpoints_resume_with_another_number_of_processes(tmp_path, data):  # noqa: F811
    values = settings(data, 8, **CONSTANT)
    whole = tmp_path / "whole"
    train_here(whole, values)

    two_then_one = tmp_path / "two_then_one"
    torchrun(two_then_one, {**values, "train.max_steps": 4}, "--parallel", "ddp")
    assert train_here(two_then_one, values, resume=True).steps == 8
    assert_same_curve(curve(two_then_one), curve(whole))

    one_then_two = tmp_path / "one_then_two"
    train_here(one_then_two, {**values, "train.max_steps": 4})
    r = subprocess.run([sys.executable, "-m", "tinyllm", "train", *cli_flags(one_then_two, values), "--nproc", "2",
                        "--parallel", "ddp"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step 4" in r.stdout
    assert_same_curve(curve(one_then_two), curve(whole))
