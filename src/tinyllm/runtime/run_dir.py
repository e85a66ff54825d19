"""The names of what a run directory holds, shared by the code that writes them and the code that reads them.

  RUN/config.toml          the resolved config of the run (each checkpoint keeps its own copy)
  RUN/checkpoints/step-N/  complete checkpoints (`checkpoint`); `superseded-DATE-TIME/` holds those
                           set aside when a resume continued from an older one
  RUN/metrics.jsonl        one JSON object per logged step (`tinyllm.train.logs`)
  RUN/train_output.txt     the human log
  RUN/tb/                  TensorBoard events
  RUN/loss.png             the loss curve

Why it is shaped this way: the trainer writes these and `serve`, `sample`, `eval` and the tests
read them; one module of names keeps the readers from importing the trainer's log writer to learn
a file name, and keeps the two sides from drifting apart.
"""

from __future__ import annotations

CONFIG_FILE = "config.toml"
CHECKPOINTS = "checkpoints"
# Checkpoints of an abandoned timeline (newer than the one a resume continued from), kept aside.
SUPERSEDED = "superseded-"
METRICS = "metrics.jsonl"
TEXT_LOG = "train_output.txt"
PLOT = "loss.png"
TENSORBOARD = "tb"
