"""The run's TensorBoard event file, written by the thread that logs.

Why not `torch.utils.tensorboard.SummaryWriter`: it writes from a thread of its own, so a full
disk or a lost permission surfaces there, as a traceback on stderr from threading's excepthook,
and reaches the run only at some later call. Here each logged step's records are written and
flushed by the call that logs them, so a failure is an OSError at that call and the run can stop
with one line that names the file. A record is a few dozen bytes per scalar, one flush per
logged step. The framing (TFRecord), the `Event` protos and the summaries are tensorboard's and
torch's own; this module only decides when the bytes reach the file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard.summary import scalar, text

_serial = itertools.count()  # two files opened in the same second by one process get distinct names


class EventFile:
    """One events.out.tfevents.* file in `log_dir`; `purge_step` hides the earlier files' steps from it on."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_serial)}"
        self.path = log_dir / name
        self._records = RecordWriter(open(self.path, "ab"))  # TFRecord framing around a file of ours
        try:
            self._write(Event(file_version="brain.Event:2"))
            if purge_step is not None:  # what SummaryWriter(purge_step=...) writes: TensorBoard drops later steps
                self._write(Event(step=purge_step, file_version="brain.Event:2"))
                self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
            self.flush()
        except BaseException:
            with contextlib.suppress(OSError):  # its unwritten bytes fail again; the first error says why
                self._records.close()
            raise

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(Event(summary=scalar(tag, value), step=step))

    def add_text(self, tag: str, value: str, step: int) -> None:
        self._write(Event(summary=text(tag, value), step=step))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()

    def _write(self, event: Event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())
