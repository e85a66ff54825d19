"""loss.png: train and val loss against tokens seen, with the data's entropy floor when known.

Tokens, not steps, on the x axis, so runs with different batch sizes line up. The floor (the
lowest loss any model can reach on the built-in corpus) shows how much is left to learn. The
image is written to a temporary name and renamed, so a viewer never reads half a file.

The figure is matplotlib's object API on the Agg canvas, not pyplot: pyplot would pick (or need
us to force) the process's backend, which is not ours to change when tinyllm runs in a notebook.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def plot_loss(history: list[dict], path: str | Path, floor: float | None = None) -> None:
    """Plot `history` (metrics.jsonl records with tokens, loss and/or val_loss) to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["tokens"], r["loss"]) for r in history if "loss" in r and "tokens" in r]
    val = [(r["tokens"], r["val_loss"]) for r in history if "val_loss" in r and "tokens" in r]
    fig = Figure(figsize=(8, 5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), label="val loss", color="tab:orange", marker="o", markersize=3)
    if floor is not None:
        ax.axhline(floor, color="tab:green", linestyle="--", linewidth=1, label=f"corpus floor {floor:.3f}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or val or floor is not None:
        ax.legend()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        canvas.print_png(tmp)
        os.replace(tmp, path)
    except BaseException:  # disk full, say: no half image left behind under a hidden name
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
