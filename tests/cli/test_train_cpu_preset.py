"""The default recipe end to end, shrunk to seconds: `tinyllm train --preset cpu` on its built-in
corpus (Muon, the wsd schedule following the time budget, dtype auto), then `sample` and `eval` on
the run, each as a user runs it. Only sizes are changed (`--set`), so every other line of the
preset is what a user's first run takes."""

import json
import math
import os
import re
import subprocess
import sys

from tinyllm.config import read_toml
from tinyllm.runtime.checkpoint import list_checkpoints

SHRUNK = ["--set", "model.n_layer=1", "--set", "model.n_embd=64", "--set", "model.n_head=2",
          "--set", "model.block_size=32", "--set", "data.builtin_tokens=40000",
          "--set", "train.micro_batch=4", "--set", "train.eval_batches=2", "--set", "train.sample_tokens=8"]


def test_cpu_preset_trains_samples_and_evaluates_end_to_end(tmp_path):
    env = {**os.environ, "TINYLLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def tinyllm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tinyllm", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    run = tmp_path / "run"
    r = tinyllm("train", "--preset", "cpu", "--out", str(run), "--max-steps", "12", "--eval-every", "6",
                "--sample-every", "6", "--checkpoint-every", "6", *SHRUNK)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished: 12 steps" in r.stdout
    assert re.search(r"final val loss \d+\.\d{4} nats/token \(\d+\.\d{4} bits/byte\)", r.stdout)
    # Shrunk, its 2 val batches are 8 of the split's rows: the gap says it is not the whole split's.
    assert re.search(r"\(the val loss is over 8 of the val split's \d+ rows", r.stdout)

    saved = read_toml(run / "config.toml")
    assert saved["preset"] == "cpu" and saved["optim"]["optimizer"] == "muon"
    assert saved["optim"]["schedule"] == "wsd" and saved["train"]["max_time"] == "9m"
    assert saved["train"]["dtype"] == "auto" and saved["train"]["auto_dtype"] in ("bf16", "fp32")
    assert [p.name for p in list_checkpoints(run)] == ["step-00000006", "step-00000012"]  # keep_checkpoints 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 6, 12] and vals[-1] < vals[0]
    assert "--- sample at step 6 ---" in (run / "train_output.txt").read_text()

    r = tinyllm("sample", "--run", str(run), "--prompt", "Once upon a time", "--max-new-tokens", "8", "--seed", "1")
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time"), r.stderr[-3000:]
    r = tinyllm("eval", "--run", str(run), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    figures = json.loads(r.stdout)
    assert figures["checkpoint"].endswith("step-00000012") and figures["tokens"] > 0
    assert math.isfinite(figures["loss"]) and figures["loss"] < vals[0]  # the trained model, not the initial one
