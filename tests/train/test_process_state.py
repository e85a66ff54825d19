"""Training from Python (a notebook, a test) leaves the process as it found it.

Process-wide settings belong to the process that owns them: `tinyllm train` keeps freed memory
in glibc's malloc for its own process; the library sets nothing that outlives a run (environment,
matplotlib's backend, TF32) and turns TF32 on only when train.dtype is not "fp32".
"""

import json
import subprocess
import sys

import pytest
import torch

from tinyllm.config import resolve
from tinyllm.data.dataset import default_builtin_dataset
from tinyllm.runtime.device import use_tf32
from tinyllm.train.trainer import Trainer

# Runs in a fresh interpreter: what one test sets must not hide what another would leave behind.
SCRIPT = r"""
import json, os, sys
import matplotlib
matplotlib.use("svg")  # the notebook's own choice, which training must not replace
import torch
from tinyllm.cli import main
from tinyllm.config import resolve
from tinyllm.runtime.device import keep_freed_memory
from tinyllm.train.trainer import Trainer

data, out = sys.argv[1], sys.argv[2]

def state():
    return {"env": dict(os.environ), "backend": dict.__getitem__(matplotlib.rcParams, "backend"),
            "pyplot": "matplotlib.pyplot" in sys.modules, "matmul": torch.get_float32_matmul_precision(),
            "cudnn_tf32": torch.backends.cudnn.allow_tf32, "malloc_set": keep_freed_memory.cache_info().currsize > 0}

before = state()
train = {"max_steps": 2, "eval_every": 1, "sample_every": 0, "micro_batch": 2, "grad_accum": 1}
cfg = resolve("tiny", overrides=[("data.dir", data, "test")] + [(f"train.{k}", v, "test") for k, v in train.items()])
Trainer(cfg, out + "/library", echo=False).run()
after = state()
code = main(["train", "--preset", "tiny", "--data", data, "--out", out + "/cli", "--max-steps", "1"])
print(json.dumps({"before": before, "after": after, "cli": code, "cli_malloc_set": keep_freed_memory.cache_info().currsize > 0}))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(default_builtin_dataset(max_tokens=40_000, cache_dir=tmp_path_factory.mktemp("cache")))


def test_training_in_process_leaves_the_process_as_it_was(data, tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, data, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert (tmp_path / "library" / "loss.png").is_file()  # the plot was drawn
    before, after = seen["before"], seen["after"]
    assert after["env"] == before["env"]
    assert after["backend"] == before["backend"] == "svg" and not after["pyplot"]
    assert (after["matmul"], after["cudnn_tf32"]) == (before["matmul"], before["cudnn_tf32"])
    assert not after["malloc_set"]  # glibc's settings are the command's, not the library's...
    assert seen["cli"] == 0 and seen["cli_malloc_set"]  # ...and `tinyllm train` sets them for its process


@pytest.mark.parametrize(("dtype", "during"), [("fp32", "highest"), ("bf16", "high"), ("auto", "high")])
def test_tf32_only_when_the_dtype_allows_it_and_only_until_restored(dtype, during):
    assert torch.get_float32_matmul_precision() == "highest"
    restore = use_tf32(torch.device("cuda"), dtype)  # sets flags only: no GPU needed
    try:
        assert torch.get_float32_matmul_precision() == during
    finally:
        restore()
    assert torch.get_float32_matmul_precision() == "highest"
    restore = use_tf32(torch.device("cpu"), dtype)
    assert torch.get_float32_matmul_precision() == "highest"
    restore()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("dtype", "during"), [("fp32", "highest"), ("bf16", "high")])
def test_a_cuda_run_uses_tf32_as_its_dtype_allows_and_puts_it_back(data, tmp_path, dtype, during):
    train = {"max_steps": 2, "eval_every": 0, "sample_every": 0, "micro_batch": 2, "grad_accum": 1, "dtype": dtype,
             "device": "cuda"}
    cfg = resolve("tiny", overrides=[("data.dir", data, "test")] + [(f"train.{k}", v, "test") for k, v in train.items()])
    trainer = Trainer(cfg, tmp_path / "run", echo=False)
    original, seen = trainer._train_step, []

    def step():
        seen.append(torch.get_float32_matmul_precision())
        return original()

    trainer._train_step = step
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    trainer.run()
    assert seen == [during, during]
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
