"""Training under torchrun (2 CPU processes, gloo): the loss curve of one process, FSDP2, resuming
across process counts, and every process stopping at the same step. Starting torchrun for
`--nproc` is `test_launch`.

The reference curves are computed in the test, by one process on the same global batch: micro
batch 2 with `batch_tokens` 128 gives grad_accum 2 alone and 1 with two processes, so both take
the same rows and average the same gradients; they agree to float32 rounding (~1e-6).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.run

from tinyllm.config import resolve
from tinyllm.data.prompts import opening_prompts
from tinyllm.runtime.checkpoint import latest_checkpoint, load_model
from tinyllm.train import distributed
from tinyllm.train.run_plan import plan_run
from tinyllm.train.trainer import Trainer

TOLERANCE = 1e-4
BATCH = {"train.micro_batch": 2, "train.batch_tokens": 128, "train.eval_every": 4, "train.sample_every": 0,
         "train.checkpoint_every": 0}
# A constant rate after warmup: a run cut at step 4 and continued to 8 follows the 8-step run.
CONSTANT = {"optim.schedule": "constant", "optim.warmup_steps": 2}


pytestmark = pytest.mark.usefixtures("no_torchrun")  # fixtures in conftest.py


def settings(data: str, steps: int, **extra) -> dict:
    return {"data.dir": data, "train.max_steps": steps, **BATCH, **extra}


def train_here(run, values: dict, resume: bool = False):
    """One process, in this one (planned as `tinyllm train` plans: grad_accum from batch_tokens)."""
    plan = plan_run(run, preset="tiny", overrides=[(k, v, "test") for k, v in values.items()],
                    resume="auto" if resume else None)
    return Trainer(plan.config, run, resume_from=plan.resume_from, echo=False).run()


def cli_flags(run, values: dict) -> list[str]:
    return ["--preset", "tiny", "--out", str(run), *(f"--set={k}={v}" for k, v in values.items())]


def torchrun(run, values: dict, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "tinyllm",
           "train", *cli_flags(run, values), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def curve(run) -> dict[int, tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r.get("loss"), r.get("val_loss"), r["tokens"]) for r in records}


def assert_same_curve(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for step, (loss, val, tokens) in want.items():
        g_loss, g_val, g_tokens = got[step]
        assert g_tokens == tokens, step
        for a, b in ((g_loss, loss), (g_val, val)):
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= TOLERANCE), (step, a, b)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    train_here(run, settings(data, 8))
    return curve(run)


# -- one process ------------------------------------------------------------------------------


def test_without_torchrun_there_is_no_process_group():
    d, device = distributed.setup(torch.device("cpu"), "ddp")
    assert not d.active and d.is_main and d.world_size == 1 and device.type == "cpu"
    assert not dist.is_initialized()


def _agree_in(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        d = distributed.Dist(rank, rank, 2, "ddp")
        # Each rank's own clock would give its own progress; rank 1 alone has been asked to stop.
        first = distributed.agree_on_next_step("interrupted" if rank else None, 0.9 if rank else 0.25, d)
        second = distributed.agree_on_next_step(None, None, d)  # no budget: no progress
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps([first, second]))
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_rank_0s_progress_in_the_stop_agreement(tmp_path):
    torch.multiprocessing.spawn(_agree_in, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [["interrupted", 0.25], [None, None]]


# -- two processes ----------------------------------------------------------------------------


def test_two_ddp_processes_give_the_one_process_loss_curve(tmp_path, data, one_process):
    run = tmp_path / "ddp"
    r = torchrun(run, settings(data, 8))
    assert_same_curve(curve(run), one_process)
    log = (run / "train_output.txt").read_text()
    # Only rank 0 writes: one announcement, one summary.
    assert log.count("DDP over 2 processes; batch 2 x 1 x 2 processes x 32 = 128 tokens/step") == 1
    assert r.stdout.count("finished: 8 steps, 1,024 tokens") == 1


def test_fsdp_trains_and_its_checkpoint_is_one_ordinary_file(tmp_path, data, one_process):
    run = tmp_path / "fsdp"
    torchrun(run, settings(data, 8, **{"train.sample_every": 4}), "--parallel", "fsdp")
    got = curve(run)
    assert got[8][1] < got[0][1] - 0.5  # val loss falls
    assert_same_curve(got, one_process)
    # Rank 0 alone samples: one continuation of each default prompt (the openings of val documents).
    assert (run / "train_output.txt").read_text().count("--- sample at step 4 ---") == len(opening_prompts(data))
    model, _, ckpt = load_model(run)  # what sample, eval and export read
    assert ckpt.name == "step-00000008" and model.num_params() > 0


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_checkpoints_resume_with_another_number_of_processes(tmp_path, data, parallel):
    # A DDP checkpoint is rank 0's whole model and optimizer, an FSDP2 one is gathered whole; the
    # loader counts rows globally: one process continues what two started, and two what one did.
    values = settings(data, 8, **CONSTANT)
    whole = tmp_path / "whole"
    train_here(whole, values)

    two_then_one = tmp_path / "two_then_one"
    torchrun(two_then_one, {**values, "train.max_steps": 4}, "--parallel", parallel)
    assert train_here(two_then_one, values, resume=True).steps == 8
    assert_same_curve(curve(two_then_one), curve(whole))

    one_then_two = tmp_path / "one_then_two"
    train_here(one_then_two, {**values, "train.max_steps": 4})
    r = subprocess.run([sys.executable, "-m", "tinyllm", "train", *cli_flags(one_then_two, values), "--nproc", "2",
                        "--parallel", parallel], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at step 4" in r.stdout
    assert_same_curve(curve(one_then_two), curve(whole))


def test_under_a_time_budget_every_process_ends_at_the_same_step_at_the_floor(tmp_path, data):
    run = tmp_path / "run"
    r = torchrun(run, settings(data, 100_000, **{"train.max_time": "8s", "train.eval_every": 0}))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cfg = resolve("tiny")
    assert records[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)
    assert r.stdout.count(f"time budget: {records[-1]['step']:,} steps") == 1
    assert latest_checkpoint(run).name == f"step-{records[-1]['step']:08d}"


@pytest.mark.parametrize(("world", "mode", "line", "factor"), [
    (1, "ddp", ", DDP over 1 process", "1 process x "),  # torchrun --nproc-per-node=1: no plural
    (2, "fsdp", ", FSDP2 over 2 processes", "2 processes x "),
])
def test_the_first_line_names_the_processes(world, mode, line, factor):
    d = distributed.Dist(0, 0, world, mode)
    assert d.describe() == line and d.describe(short=True) == factor
