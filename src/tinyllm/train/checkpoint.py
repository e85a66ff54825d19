"""Checkpoints: written atomically, kept to the last K, and loadable for training or inference.

Layout: `RUN/checkpoints/step-00001000/` holding
  model.safetensors  weights (safetensors: no code runs when a file is loaded)
  optimizer.pt       AdamW state (torch.save; loaded with weights_only=True)
  rng.pt             torch RNG streams (CPU, and CUDA when present)
  state.json         step, tokens, schedule, data-loader position, counters, Python/NumPy RNG
  config.toml        the resolved config, so `sample`, `chat`, `eval` need only this directory

Why it is shaped this way: a checkpoint is the sum of the state of everything stateful, each in
the format that suits it. It is built in a hidden temporary directory, every file and the
directory are fsynced, and only then is it renamed into place; a name `step-*` therefore always
means a complete checkpoint, and a crash mid-write leaves the previous ones untouched. Old
checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from tinyllm.config import Config, read_toml, resolve, to_toml
from tinyllm.errors import UserError
from tinyllm.model.gpt import GPT

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json", "config.toml")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def discard_after(run_dir: str | Path, step: int) -> list[Path]:
    """Delete a run's checkpoints newer than `step` (a timeline abandoned by resuming earlier)."""
    newer = [p for p in list_checkpoints(run_dir) if int(_STEP_DIR.match(p.name).group(1)) > step]
    for p in newer:
        shutil.rmtree(p, ignore_errors=True)
    return newer


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    config: Config,
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`. Returns its path."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, step, model, optimizer, state, config)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. a periodic and a final save)
            old = root / f".old-{checkpoint_name(step)}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(
    tmp: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, config: Config
) -> None:
    # save_model drops the second name of a tied tensor; load_model restores the tie.
    save_safetensors_model(model, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    _fsync_file(tmp / "model.safetensors")
    _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
    _save_torch(_torch_rng_state(), tmp / "rng.pt")
    record = {"step": step, **state, "python_rng": _python_rng_state(), "numpy_rng": _numpy_rng_state()}
    _write_text(tmp / "state.json", json.dumps(record, indent=1))
    _write_text(tmp / "config.toml", to_toml(config))


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(root: Path) -> None:
    """Drop half-written directories a crashed process left behind."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# -- RNG ----------------------------------------------------------------------------------------


def _torch_rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _restore_rng(ckpt: Path, state: dict) -> None:
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- loading ------------------------------------------------------------------------------------


def load_training_state(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG streams in place; returns state.json (step, loader, ...)."""
    ckpt = Path(ckpt)
    _check_complete(ckpt)
    _load_weights(model, ckpt)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    _restore_rng(ckpt, state)
    return state


def read_config(ckpt: str | Path) -> Config:
    """The resolved config a checkpoint (or a run directory's config.toml) was trained with."""
    path = Path(ckpt) / "config.toml"
    if not path.is_file():
        raise UserError(f"{ckpt} has no config.toml: it is not a tinyllm checkpoint or run directory")
    return resolve(base=read_toml(path))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory given either itself or a run directory (its newest checkpoint)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    if not p.is_dir():
        raise UserError(f"{p}: no such run or checkpoint directory")
    latest = latest_checkpoint(p)
    if latest is None:
        raise UserError(f"{p} has no checkpoint yet: train it first (tinyllm train --out {p}), or pass a checkpoint directory")
    return latest


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Config, Path]:
    """The trained model (eval mode) from a run directory or checkpoint, with its config and path."""
    ckpt = find_checkpoint(path)
    _check_complete(ckpt, need_optimizer=False)
    cfg = read_config(ckpt)
    model = GPT(cfg.model)
    _load_weights(model, ckpt)
    return model.to(device).eval(), cfg, ckpt


def _load_weights(model: nn.Module, ckpt: Path) -> None:
    try:
        load_safetensors_model(model, str(ckpt / "model.safetensors"), strict=True)
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{ckpt}/model.safetensors does not fit this model's shape (was the config changed?): {e}") from None


def _check_complete(ckpt: Path, need_optimizer: bool = True) -> None:
    needed = _FILES if need_optimizer else ("model.safetensors", "config.toml")
    missing = [f for f in needed if not (ckpt / f).is_file()]
    if missing:
        raise UserError(f"checkpoint {ckpt} is incomplete (missing {', '.join(missing)}): pick another with --checkpoint")
