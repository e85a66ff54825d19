"""`train.dtype = "auto"` is decided once per run: on a CPU it times a GEMM, which can come out
either way, so rank 0 decides for every rank, the choice is recorded in the run's config.toml
(`train.auto_dtype`), and a resume or a run from that file keeps it without timing again.

The timing is replaced by a stub per process, so the tests do not depend on this CPU.
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tinyllm.config import read_toml, resolve
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.runtime import device
from tinyllm.runtime.checkpoint import latest_checkpoint
from tinyllm.train.run_plan import plan_run
from tinyllm.train.trainer import Trainer

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=40_000, cache_dir=tmp_path_factory.mktemp("cache")))


def config(data: str, **train):
    quiet = {"dtype": "auto", "micro_batch": 2, "grad_accum": 1, "eval_every": 0, "sample_every": 0, **train}
    return resolve("tiny", overrides=[("data.dir", data, "test")] + [(f"train.{k}", v, "test") for k, v in quiet.items()])


def bf16_timing(monkeypatch, speedup: float) -> list[float]:
    """A CPU with bf16 units whose GEMM timing says `speedup`; the list records each timing."""
    timed: list[float] = []
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: timed.append(speedup) or speedup)
    return timed


def recorded(path: Path) -> str:
    return read_toml(path / "config.toml")["train"]["auto_dtype"]


def _as_rank(rank: int, port: int, data: str, run: str) -> None:
    """One of two gloo processes; each times bf16 differently (rank 0: 3x faster, rank 1: slower)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device.cpu_has_native_bf16 = lambda: True
    device.cpu_bf16_speedup = lambda: 3.0 if rank == 0 else 0.5
    trainer = Trainer(config(data), run, echo=False)
    Path(run, f"rank{rank}.txt").write_text("bf16" if trainer.amp is torch.bfloat16 else "fp32")
    trainer.log.close()
    torch.distributed.barrier()
    # Leave as torchrun workers do (tinyllm/__main__.py): gloo's teardown at interpreter exit can hang.
    os._exit(0)


def test_ranks_whose_timings_disagree_train_at_rank_0s_precision(tmp_path, data, monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    run.mkdir()
    mp.spawn(_as_rank, args=(port, data, str(run)), nprocs=2)
    assert [(run / f"rank{r}.txt").read_text() for r in (0, 1)] == ["bf16", "bf16"]
    assert recorded(run) == "bf16"


def test_a_resume_keeps_the_recorded_precision_without_timing_again(tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    first = bf16_timing(monkeypatch, 3.0)
    Trainer(config(data, max_steps=2), run, echo=False).run()
    assert first and recorded(run) == "bf16" and recorded(latest_checkpoint(run)) == "bf16"
    assert read_toml(run / "config.toml")["train"]["dtype"] == "auto"  # the user's intent stays

    now = bf16_timing(monkeypatch, 0.5)  # timing again would now choose fp32
    plan = plan_run(run, overrides=[("train.max_steps", 3, "test")])
    resumed = Trainer(plan.config, run, resume_from=plan.resume_from, echo=False)
    assert resumed.amp is torch.bfloat16 and now == []
    assert resumed.run().steps == 3 and recorded(run) == "bf16"

    # A new run from the saved file keeps the choice too; an explicit dtype still wins.
    again = plan_run(tmp_path / "again", config_file=run / "config.toml")
    assert Trainer(again.config, tmp_path / "again", echo=False).amp is torch.bfloat16 and now == []
    fp32 = plan_run(tmp_path / "fp32", config_file=run / "config.toml", overrides=[("train.dtype", "fp32", "test")])
    assert Trainer(fp32.config, tmp_path / "fp32", echo=False).amp is None


def test_an_explicit_dtype_is_not_timed(tmp_path, data, monkeypatch):
    timed = bf16_timing(monkeypatch, 3.0)
    trainer = Trainer(config(data, dtype="fp32"), tmp_path, echo=False)
    assert trainer.amp is None and timed == [] and recorded(tmp_path) == ""


def test_a_recorded_bf16_is_not_kept_on_a_cpu_without_bf16_units(tmp_path, data, monkeypatch):
    """A run begun where bf16 is fast (a GPU, a CPU with AMX), then resumed or fine-tuned on a
    laptop without bf16 units: emulated bf16 trained at half the speed of fp32."""
    run = tmp_path / "run"
    bf16_timing(monkeypatch, 3.0)
    Trainer(config(data, max_steps=2), run, echo=False).run()
    assert recorded(run) == "bf16"

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    # A new run from the saved file (as chat fine-tuning's config starts from the pretrained run's).
    again = plan_run(tmp_path / "again", config_file=run / "config.toml")
    assert Trainer(again.config, tmp_path / "again", echo=False).amp is None
    # An explicit bf16 is the user's to ask for, units or not.
    explicit = plan_run(tmp_path / "bf16", config_file=run / "config.toml", overrides=[("train.dtype", "bf16", "test")])
    assert Trainer(explicit.config, tmp_path / "bf16", echo=False).amp is torch.bfloat16

    plan = plan_run(run, overrides=[("train.max_steps", 3, "test")])
    resumed = Trainer(plan.config, run, resume_from=plan.resume_from, echo=False)
    assert resumed.amp is None
    assert resumed.run().steps == 3 and recorded(run) == "fp32"
    log = (run / "train_output.txt").read_text()
    assert "chose bf16 where it started (train.auto_dtype), but this cpu has no bf16 units: training in fp32" in log
