"""What the chat page shows about the model it talks to: the run's name, the checkpoint's step and
val loss, and the run's loss curve (GET /run).

Why it is shaped this way: `read_run_info` reads the run's files once, when `tinyllm serve`
starts, into a plain value (`RunInfo`); the app only hands that value out, so the server knows
nothing of training and tests can build one by hand. The files are read defensively: a checkpoint
copied out of its run, a run with no metrics.jsonl, a line cut short by a crash or by a run still
training, a state.json from another version - each gap becomes a null, and the missing curve a
sentence the page shows instead. None of them stops the server; the model is what it serves.

The curve stops at the served checkpoint's step: past it the log describes other weights (a later
checkpoint, or a timeline abandoned by a resume from an older one). Records of one step (a train
line, then the final eval) are merged into one point, so the curve has one point per logged step.
Only checkpoint and run *names* are handed out, never paths: the page may be reachable by others.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from tinyllm.runtime.run_dir import CHECKPOINTS, METRICS, SUPERSEDED

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CurvePoint:
    step: int
    tokens: int | None = None
    loss: float | None = None  # the training loss logged at this step
    val_loss: float | None = None


@dataclass(frozen=True)
class RunInfo:
    name: str | None = None  # the run directory's name (the checkpoint's own, copied out of a run)
    checkpoint: str | None = None  # the checkpoint directory's name, e.g. step-00001200
    step: int | None = None
    tokens: int | None = None
    val_loss: float | None = None  # the last val loss the trainer measured before saving it
    val_bpb: float | None = None
    curve: list[CurvePoint] = field(default_factory=list)  # by step, up to `step`
    # Why there is no curve (shown on the page instead of it).
    curve_note: str | None = "the server was given a model, not a run directory"

    def to_json(self) -> dict[str, Any]:
        """The body of GET /run: the curve as columns (step, tokens, loss, val_loss), nulls where a
        step logged no such value."""
        keys = ("step", "tokens", "loss", "val_loss")
        columns = {key: [getattr(p, key) for p in self.curve] for key in keys}
        return {
            "name": self.name, "checkpoint": self.checkpoint, "step": self.step,
            "tokens": self.tokens, "val_loss": self.val_loss, "val_bpb": self.val_bpb,
            "curve": columns if self.curve else None,
            "curve_note": None if self.curve else self.curve_note,
        }


def read_run_info(ckpt: str | Path) -> RunInfo:
    """What the page shows about checkpoint directory `ckpt`, from its state.json and its run's
    metrics.jsonl; whatever is missing or unreadable is left out."""
    ckpt = Path(ckpt).resolve()
    state = _read_json(ckpt / "state.json")
    step = _count(state.get("step"))
    if step is None and (m := _STEP_DIR.match(ckpt.name)):
        step = int(m.group(1))
    run = run_dir(ckpt)
    if run is None:
        curve, note = [], (f"{ckpt.name} is not inside a run directory (RUN/{CHECKPOINTS}/step-N), "
                           "so there is no training log")
    else:
        curve, note = read_curve(run / METRICS, up_to=step)
    val_loss = _number(state.get("val_loss"))
    if val_loss is None:  # state.json unreadable, or saved before any eval: the log's last eval
        val_loss = next((p.val_loss for p in reversed(curve) if p.val_loss is not None), None)
    return RunInfo(
        name=(run or ckpt).name, checkpoint=ckpt.name, step=step,
        tokens=_count(state.get("tokens")), val_loss=val_loss,
        val_bpb=_number(state.get("val_bpb")), curve=curve, curve_note=note,
    )


def run_dir(ckpt: Path) -> Path | None:
    """The run holding checkpoint `ckpt` (RUN/checkpoints/step-N, or one set aside in
    RUN/checkpoints/superseded-*/), or None for a checkpoint that is not in a run."""
    parent = ckpt.parent
    if parent.name == CHECKPOINTS:
        return parent.parent
    if parent.name.startswith(SUPERSEDED) and parent.parent.name == CHECKPOINTS:
        return parent.parent.parent
    return None


def read_curve(path: Path, up_to: int | None = None) -> tuple[list[CurvePoint], str | None]:
    """The loss curve in metrics.jsonl `path` up to step `up_to`, one point per step, and None; or
    no points and the reason there are none. Lines that are not a record with a step are skipped."""
    merged: dict[int, dict[str, Any]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                record = _parse(line)
                step = _count(record.get("step"))
                if step is None or (up_to is not None and step > up_to):
                    continue
                point = merged.setdefault(step, {})
                for key, read in (("tokens", _count), ("loss", _number), ("val_loss", _number)):
                    if (value := read(record.get(key))) is not None:
                        point[key] = value
    except FileNotFoundError:
        return [], f"the run has no {METRICS}"
    except OSError as e:
        return [], f"{METRICS} could not be read ({e.strerror or e})"
    points = [CurvePoint(step, **merged[step]) for step in sorted(merged)
              if "loss" in merged[step] or "val_loss" in merged[step]]  # not qa_accuracy alone
    if not points:
        until = f" up to step {up_to}" if up_to is not None else ""
        return [], f"{METRICS} has no loss logged{until}"
    return points, None


def add_run_route(app: FastAPI, info: RunInfo) -> None:
    """GET /run: `info` as JSON, encoded once (a long run's curve has thousands of points)."""
    body = json.dumps(info.to_json(), allow_nan=False, separators=(",", ":"))

    @app.get("/run")
    async def run_info() -> Response:
        return Response(body, media_type="application/json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _parse(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:  # cut short by a crash, or still being written
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    """A finite float, or None (NaN and Infinity parse as JSON numbers but would not draw)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return value if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
