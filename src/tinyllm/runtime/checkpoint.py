"""Checkpoints: written atomically, kept to the last K, and loadable for training or inference.

Layout: `RUN/checkpoints/step-00001000/` holding
  model.safetensors  weights (safetensors: no code runs when a file is loaded)
  optimizer.pt       AdamW's (or Muon + AdamW's) state (torch.save; loaded with weights_only=True)
  rng.pt             torch RNG streams (CPU, and CUDA when present)
  state.json         step, tokens, tokens a step, schedule, data-loader position, counters, Python/NumPy RNG
  config.toml        the resolved config, so `sample`, `chat`, `eval` need only this directory

Why it is shaped this way: a checkpoint is the sum of the state of everything stateful, each in
the format that suits it. It is built in a hidden temporary directory, every file and the
directory are fsynced, and only then is it renamed into place; a name `step-*` therefore always
means a complete checkpoint, and a crash mid-write leaves the previous ones untouched. Old
checkpoints are pruned only after the new one is in place, only those older than it, and are
renamed out of the `step-*` namespace before being deleted, so a kill mid-delete never leaves a
half-deleted `step-*`. Resuming from an older checkpoint deletes nothing: the newer ones are moved
to `checkpoints/superseded-DATE-TIME/` (`set_aside_after`).
A write that fails (disk full, no permission) removes its temporary and becomes a UserError
saying the previous checkpoint is intact.

Loading never runs code from a file: weights come from safetensors, the other state from
`torch.load(weights_only=True)` or JSON, and a file that does not parse (corrupt, truncated, or
a crafted pickle the restricted unpickler refuses) is a UserError naming it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_file as save_safetensors_file
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from tinyllm.config import Config, read_toml, resolve, to_toml
from tinyllm.errors import UserError
from tinyllm.fsio import fsync_dir, fsync_file, os_error_in, write_synced
from tinyllm.model.gpt import GPT
from tinyllm.runtime.run_dir import CHECKPOINTS, CONFIG_FILE, SUPERSEDED

_STEP_DIR = re.compile(r"^step-(\d+)$")
# A checkpoint set aside while the same step is saved again; complete, so it counts until replaced.
_SET_ASIDE = re.compile(r"^\.old-(step-\d+)-\d+$")
_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json", CONFIG_FILE)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = {p.name: p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()}
    for p in root.iterdir():  # a crash between the two renames of a re-save left only this one
        if (m := _SET_ASIDE.match(p.name)) and p.is_dir() and m.group(1) not in found:
            found[m.group(1)] = p
    return [found[name] for name in sorted(found, key=lambda name: int(name[len("step-"):]))]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def set_aside_after(run_dir: str | Path, step: int) -> Path | None:
    """Move a run's checkpoints newer than `step` into `checkpoints/superseded-DATE-TIME/`.

    Resuming from an older checkpoint starts a new timeline; the newer checkpoints belong to the
    old one. They are the user's work, so they are kept whole, out of the `step-*` names that
    resuming and rotation read, with a note saying what they are. Returns the folder, or None
    when nothing was newer.
    """
    newer = [p for p in list_checkpoints(run_dir) if _step_of(p) > step]
    if not newer:
        return None
    root = Path(run_dir) / CHECKPOINTS
    aside = _new_superseded_dir(root)
    (aside / "README.txt").write_text(
        f"These checkpoints came after step {step}, which `tinyllm train --resume` continued from on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}; the run now goes on from there without them.\n"
        f"They are complete and untouched: continue one with `tinyllm train --resume {aside}/step-N`, "
        "or delete this folder when it is no longer wanted.\n", encoding="utf-8")
    for p in reversed(newer):  # newest first: cut short, what is left is still a run up to some step
        p.rename(aside / checkpoint_name(_step_of(p)))
    fsync_dir(root)
    return aside


def _new_superseded_dir(root: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):  # two resumes in one second get folders of their own
        path = root / (f"{SUPERSEDED}{stamp}" if n == 1 else f"{SUPERSEDED}{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"{root} has 999 superseded-{stamp}* folders: remove some")


def run_dir_of(ckpt: str | Path) -> Path:
    """The run a checkpoint belongs to: RUN for RUN/checkpoints/step-N and for a superseded one."""
    parent = Path(ckpt).parent
    return parent.parent.parent if parent.name.startswith(SUPERSEDED) else parent.parent


def _step_of(path: Path) -> int:
    return int((_STEP_DIR.match(path.name) or _SET_ASIDE.match(path.name)).group(1)[len("step-"):])


def _delete(path: Path) -> None:
    """Remove a checkpoint: first out of the `step-*` names (atomic), then from the disk."""
    doomed = path.with_name(f".del-{path.name}-{os.getpid()}")
    try:
        path.rename(doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict,
    state: dict,
    config: Config,
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete older ones beyond `keep` in all. Returns its path.

    A failed write (disk full, permissions) raises UserError; the checkpoints already there are untouched.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_files(tmp, step, model, optimizer, state, config)
        fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. a periodic and a final save)
            old = root / f".old-{checkpoint_name(step)}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            previous = latest_checkpoint(run_dir)
        except OSError:  # the directory cannot even be listed
            previous = None
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise UserError(
            f"could not write checkpoint {final} ({e.strerror or e}); {kept}: free disk space or make {root} "
            f"writable, then run the same command again{' with --resume' if previous else ''}"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Only after the new one is complete, and only older ones: `final` and `keep - 1` before it stay.
    older = [p for p in list_checkpoints(run_dir) if _step_of(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        _delete(old)
    return final


def _write_files(
    tmp: Path, step: int, model: nn.Module | dict, optimizer: torch.optim.Optimizer | dict, state: dict, config: Config
) -> None:
    try:
        if isinstance(model, dict):  # full weights gathered from a sharded model: one name per tensor
            save_safetensors_file({k: v.contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"),
                                  metadata={"step": str(step)})
        else:  # save_model drops the second name of a tied tensor; load_model restores the tie.
            save_safetensors_model(model, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    except SafetensorError as e:
        # A full disk, met first by the weights, the first file written: the one-line error any failed save is.
        if (error := os_error_in(e)) is None:
            raise
        raise error from e
    # safetensors writes its file 0600; give it the mode the other files get from open() (the
    # temporary folder's, made by mkdir under the same umask, less x), so whoever may read the run reads its weights.
    (tmp / "model.safetensors").chmod(tmp.stat().st_mode & 0o666)
    fsync_file(tmp / "model.safetensors")
    _save_torch(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    _save_torch(_torch_rng_state(), tmp / "rng.pt")
    record = {"step": step, **state, "python_rng": _python_rng_state(), "numpy_rng": _numpy_rng_state()}
    write_synced(tmp / "state.json", json.dumps(record, indent=1))
    write_synced(tmp / CONFIG_FILE, to_toml(config))


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # A failed write (disk full) surfaces from torch's zip writer as a RuntimeError raised
            # while handling the OSError; report the OSError, which says what went wrong.
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_temporaries(root: Path) -> None:
    """Drop what a crashed process left behind: half-written or half-deleted directories, and
    restore a checkpoint that was set aside for a re-save that never completed."""
    for p in root.iterdir():
        m = _SET_ASIDE.match(p.name)
        if m and p.is_dir() and not (root / m.group(1)).exists():
            p.rename(root / m.group(1))
        elif p.name.startswith((".tmp-", ".old-", ".del-")) and p.is_dir():
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
    rng = _load_torch(ckpt / "rng.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- loading ------------------------------------------------------------------------------------


def load_training_state(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                        place: Callable[[dict[str, torch.Tensor], dict], None] | None = None) -> dict:
    """Restore weights, optimizer and RNG streams in place; returns state.json (step, loader, ...).

    `place(weights, optimizer_state)`, when given, loads the full state dicts instead (a model
    sharded across processes puts only its own part of them in place).
    """
    ckpt = Path(ckpt)
    _check_complete(ckpt)
    if place is not None:
        place(_read_weights(ckpt), _load_torch(ckpt / "optimizer.pt"))
    else:
        _load_weights(model, ckpt)
        optimizer_state = _load_torch(ckpt / "optimizer.pt")
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError) as e:
            raise _unreadable(ckpt / "optimizer.pt", f"it does not fit this model's optimizer: {e}") from None
    state = _read_state(ckpt / "state.json")
    _restore_rng(ckpt, state)
    return state


def _load_torch(path: Path) -> Any:
    """A torch.save file, unpickled with torch's restricted (tensors and containers only) unpickler."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weightsunpickler" in str(e).lower():
            raise _unreadable(path, "it holds Python objects other than tensors, which could run code when "
                              "loaded, so it was refused unopened; tinyllm never writes such files") from None
        raise _unreadable(path, f"not a torch file: {_brief(e)}") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        raise _unreadable(path, f"{type(e).__name__}: {_brief(e)}") from None


def read_state(ckpt: str | Path) -> dict:
    """A checkpoint's state.json (step, tokens, ...), checked as loading checks it."""
    return _read_state(Path(ckpt) / "state.json")


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _unreadable(path, f"not JSON: {_brief(e)}") from None
    if not isinstance(state, dict) or not {"step", "python_rng", "numpy_rng"} <= state.keys():
        raise _unreadable(path, "not the state.json tinyllm writes")
    return state


def _unreadable(path: Path, why: str) -> UserError:
    # Training and inference both load checkpoints, and each names another one its own way.
    other = f"{path.parent.parent}/step-N"
    return UserError(f"checkpoint file {path} cannot be loaded ({why}): use another checkpoint (resume from it "
                     f"with tinyllm train --resume {other}; sample, chat, eval, serve and export take "
                     f"--checkpoint {other}), or start the run afresh")


def _brief(e: BaseException) -> str:
    """An exception's message on one line (the CLI prints errors as one line), cut to a sane length."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def read_config(ckpt: str | Path) -> Config:
    """The resolved config a checkpoint (or a run directory's config.toml) was trained with."""
    path = Path(ckpt) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{ckpt} has no config.toml: it is not a tinyllm checkpoint or run directory")
    return resolve(base=read_toml(path), base_name=str(path))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory given either itself or a run directory (its newest checkpoint)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    if p.is_file():
        raise UserError(f"{p} is a file: give a run directory or one of its checkpoints/step-N directories")
    if not p.is_dir():
        raise UserError(f"{p}: no such run or checkpoint directory")
    if p.name == CHECKPOINTS and latest_checkpoint(p.parent) is not None:  # RUN/checkpoints means RUN
        p = p.parent
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
        raise UserError(f"{ckpt}/model.safetensors does not fit this model's shape (was the config changed?): "
                        f"{_brief(e)}") from None
    except Exception as e:  # safetensors' own error for a damaged file, or an OSError reading it
        raise _unreadable(ckpt / "model.safetensors", f"not a complete safetensors file: {_brief(e)}") from None


def _read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_file(str(ckpt / "model.safetensors"))
    except Exception as e:  # safetensors' own error for a damaged file, or an OSError reading it
        raise _unreadable(ckpt / "model.safetensors", f"not a complete safetensors file: {_brief(e)}") from None


def _check_complete(ckpt: Path, need_optimizer: bool = True) -> None:
    needed = _FILES if need_optimizer else ("model.safetensors", CONFIG_FILE)
    missing = [f for f in needed if not (ckpt / f).is_file()]
    if missing:
        raise UserError(f"checkpoint {ckpt} is incomplete (missing {', '.join(missing)}): pick another with --checkpoint")
