"""`tinyllm train --nproc N`: one plan, made before any process starts, reaches the workers through
the run directory; mistakes are one line; Ctrl-C stops every worker at the same step."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.run

from tinyllm.cli import build_parser, main
from tinyllm.config import read_toml, resolve
from tinyllm.runtime.checkpoint import latest_checkpoint
from tinyllm.runtime.run_dir import held_for_training
from tinyllm.train import launch
from tinyllm.train.run_plan import plan_run

from .test_distributed import cli_flags, settings, train_here

pytestmark = pytest.mark.usefixtures("no_torchrun")  # fixtures in conftest.py


@pytest.fixture
def fake_torchrun(monkeypatch):
    """Stands in for torchrun: records its arguments and what its workers would inherit."""
    seen = {}

    def torchrun(config):
        seen.update(args=[*config.training_script_args], module=config.training_script,
                    threads=os.environ.get("OMP_NUM_THREADS"))

    monkeypatch.setattr(torch.distributed.run, "run", torchrun)
    return seen


def worker_plan(args: list[str], processes: int):
    """What a worker plans from the arguments the launcher gives it (as `tinyllm train` does)."""
    ns = build_parser().parse_args(args)
    return plan_run(ns.out, config_file=ns.config, resume=ns.resume, processes=processes)


def test_the_workers_plan_the_run_the_launcher_planned_from_its_directory(tmp_path, data, fake_torchrun):
    run = tmp_path / "run"
    flags = ["--set", "optim.lr=1e-3", "--set", "model.n_layer=1", "--parallel", "fsdp", "--batch-tokens", "256",
             "--set", "train.micro_batch=2", "--max-steps", "3", "--set", "train.device=cpu"]
    assert main(["train", "--preset", "tiny", "--data", data, "--out", str(run), "--nproc", "2", *flags]) == 0
    assert fake_torchrun["module"] == "tinyllm"
    assert fake_torchrun["args"] == ["train", "--config", str(run.resolve() / "config.toml"), "--out", str(run.resolve())]
    plan = plan_run(run, preset="tiny", overrides=[("data.dir", data, "t"), ("optim.lr", 1e-3, "t"),
                                                    ("model.n_layer", 1, "t"), ("train.parallel", "fsdp", "t"),
                                                    ("train.batch_tokens", 256, "t"), ("train.micro_batch", 2, "t"),
                                                    ("train.max_steps", 3, "t"), ("train.device", "cpu", "t")],
                    processes=2)
    assert plan.config.train.grad_accum == 2  # 256 tokens = 2 rows x 32 tokens x 2 processes x 2 micro-steps
    assert resolve(base=read_toml(run / "config.toml")) == plan.config
    worker = worker_plan(fake_torchrun["args"], processes=2)
    assert worker.config == plan.config and worker.resume_from is None


def test_a_new_runs_fp32_width_is_said_once_by_the_launcher_and_kept_by_the_workers(tmp_path, data, fake_torchrun,
                                                                                      capsys):
    run = tmp_path / "run"
    flags = ["--set", "train.fp32_width=16", "--max-steps", "3", "--set", "train.device=cpu"]  # tiny: fp32, heads of 16
    assert main(["train", "--preset", "tiny", "--data", data, "--out", str(run), "--nproc", "2", *flags]) == 0
    assert capsys.readouterr().out.count("16 wide with 1 head instead of 32 (train.fp32_width)") == 1
    worker = worker_plan(fake_torchrun["args"], processes=2)  # the workers read the width chosen: no second line
    assert (worker.config.model.n_embd, worker.config.model.n_head, worker.note) == (16, 1, None)


def test_continuing_an_older_checkpoint_names_it_to_the_workers(tmp_path, data, fake_torchrun):
    run = tmp_path / "run"
    values = {"data.dir": data, "train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 5,
              "train.eval_every": 0, "train.sample_every": 0, "train.micro_batch": 2, "train.grad_accum": 1}
    train_here(run, values)
    older = run / "checkpoints" / "step-00000002"
    assert main(["train", "--out", str(run), "--resume", str(older), "--max-steps", "6", "--nproc", "2",
                 "--set", "train.device=cpu"]) == 0
    assert fake_torchrun["args"][-2:] == ["--resume", str(older.resolve())]
    worker = worker_plan(fake_torchrun["args"], processes=2)
    assert worker.resume_from == older.resolve() and worker.config.train.max_steps == 6


def test_mistakes_are_one_line_before_any_process_starts(tmp_path, data, monkeypatch, capsys):
    base = ["train", "--preset", "tiny", "--data", data]
    assert main([*base, "--out", str(tmp_path / "a"), "--nproc", "0"]) == 2
    assert main([*base, "--out", str(tmp_path / "b"), "--nproc", "3", "--batch-tokens", "128",
                 "--set", "train.micro_batch=2"]) == 2
    # Each worker said it once, and the config.toml left behind refused the same run with ddp.
    assert main([*base, "--out", str(tmp_path / "c"), "--nproc", "2", "--parallel", "fsdp",
                 "--set", 'optim.optimizer="muon"']) == 2
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert main(base) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and "Traceback" not in "".join(err)
    assert "--nproc must be at least 1" in err[0]
    assert "not a multiple of micro_batch x model.block_size x processes (2 x 32 x 3 = 192)" in err[1]
    assert 'optim.optimizer = "muon" needs whole weight matrices; FSDP shards them' in err[2]
    assert "under torchrun every process must write to the same run: add --out RUN_DIR" in err[3]
    assert not any((tmp_path / name).exists() for name in "abc")


def test_nproc_gives_the_workers_their_threads_and_leaves_this_process_as_it_was(tmp_path, data, monkeypatch,
                                                                                 fake_torchrun):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = plan_run(tmp_path, preset="tiny", overrides=[("data.dir", data, "test"), ("train.device", "cpu", "test")])
    level = logging.getLogger("torch.distributed").level
    assert launch.launch(2, plan) == 0
    assert fake_torchrun["threads"] == str(max(1, (os.cpu_count() or 1) // 2))  # the processes share the cores
    assert "OMP_NUM_THREADS" not in os.environ
    assert logging.getLogger("torch.distributed").level == level


def test_a_second_nproc_run_into_a_run_being_trained_is_refused_before_its_config_is_replaced(
        tmp_path, data, fake_torchrun, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("# the running run's\n")
    with held_for_training(run):  # as rank 0 of the run that trains there holds it
        code = main(["train", "--preset", "tiny", "--data", data, "--out", str(run), "--nproc", "2",
                     "--set", "train.device=cpu"])
    assert code == 2 and not fake_torchrun
    assert f"{run} is being trained by another process" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == "# the running run's\n"


# SIGTERM (kill, timeout, SLURM) reached the workers as SIGTERM, which ends them unsaved.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_stops_every_process_at_the_same_step_with_a_checkpoint(tmp_path, data, sig):
    run = tmp_path / "run"
    values = settings(data, 100_000, **{"train.eval_every": 0})
    proc = subprocess.Popen([sys.executable, "-m", "tinyllm", "train", *cli_flags(run, values), "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and max(_steps(run), default=0) < 2:
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]  # stopped by the user: a chained command must not go on
    stopped = max(_steps(run))
    assert out.count(f"interrupted: {stopped} steps") == 1
    # Had the ranks disagreed on the step, the save would wait on a collective that never comes.
    assert latest_checkpoint(run).name == f"step-{stopped:08d}" and stopped < 100_000
    assert err == ""  # not torchrun's "Received 2 death signal, shutting down workers"


def test_a_run_that_diverges_on_every_process_ends_with_one_line(tmp_path, data):
    # Every rank reads the same all-reduced loss and stops at the same step: each printed the error.
    values = settings(data, 30, **{"optim.lr": 1e9, "train.max_bad_steps": 2, "train.eval_every": 0})
    r = subprocess.run([sys.executable, "-m", "tinyllm", "train", *cli_flags(tmp_path / "run", values), "--nproc", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("tinyllm train: error: training diverged: 2 steps")


def _steps(run) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]
