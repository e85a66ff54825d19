"""`tinyllm export` writes a folder that transformers loads offline and that computes the run's logits."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it at import

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tinyllm.runtime.checkpoint import list_checkpoints, load_model
from tinyllm.tokenizer import EOT, get_tokenizer


def test_exported_model_gives_the_runs_logits(tiny_run, tmp_path):
    out = tmp_path / "hf"
    r = tiny_run.tinyllm("export", "--run", str(tiny_run.path), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "from_pretrained" in r.stdout
    ours, _, _ = load_model(tiny_run.path)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[EOT, *get_tokenizer().encode("Once upon a time, Tom had a red kite.")]])
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_an_older_checkpoint_in_bf16(tiny_run, tmp_path):
    older = list_checkpoints(tiny_run.path)[0]
    out = tmp_path / "hf-bf16"
    r = tiny_run.tinyllm("export", "--checkpoint", str(older), "--out", str(out), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model, _, _ = load_model(older)
    with safe_open(out / "model.safetensors", "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.bfloat16
    assert torch.equal(embed, model.wte.weight[: model.config.vocab_size].bfloat16())


def test_a_folder_in_use_is_refused(tiny_run, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    r = tiny_run.tinyllm("export", "--run", str(tiny_run.path), "--out", str(tmp_path))
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_an_out_that_cannot_be_written_is_one_line(tiny_run, tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "hf"  # a folder cannot be made inside a file (as root too)
    r = tiny_run.tinyllm("export", "--run", str(tiny_run.path), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"--out {out}: cannot write" in r.stderr and "pick another --out" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_disk_that_fills_midway_is_one_line_and_leaves_nothing(tiny_run, tmp_path):
    # A 1 MB file size limit fails the 6 MB weights file as a full disk does (EFBIG, not ENOSPC).
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "tinyllm", "export", "--run", str(tiny_run.path), "--out", str(out)],
                       capture_output=True, text=True, env=tiny_run.env, timeout=300, preexec_fn=limit)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"--out {out}: cannot write {out} (File too large)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_help_names_every_architecture_an_export_can_be():
    from tinyllm.cli import build_parser
    from tinyllm.export import gguf, hf

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["export"]
    text = " ".join(sub.format_help().split())
    ggufs = {"gpt2", *(t.arch for t in gguf._ROPE_TARGETS.values())}
    hfs = {hf.GPT2_ARCHITECTURE.removesuffix("LMHeadModel"),
           *(t.architecture.removesuffix("ForCausalLM") for t in hf._ROPE_TARGETS.values())}
    assert [a for a in sorted(ggufs | hfs) if a not in text] == []
