"""`PrepareOptions`: the settings of one `tinyllm prepare` run.

Why a module of its own: `prepare` (the dataset directory) and `ingest` (one source into shards)
both read these settings, and `prepare` drives `ingest`; with the options here, neither has to
import the other's caller and the dependency points one way: prepare -> ingest -> options.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinyllm.errors import UserError


@dataclass(frozen=True)
class PrepareOptions:
    """The settings that shape a prepared dataset (all but `threads` and `progress`)."""

    val_fraction: float = 0.01
    max_docs: int | None = None  # per source; None = no cap
    max_tokens: int | None = None  # per source; None = the source's default cap, 0 = no cap
    shard_tokens: int = 1 << 24  # 32 MiB shards
    threads: int | None = None  # tokenizer threads; None = all cores
    progress: bool = True

    def check(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        for flag, v in (("--max-docs", self.max_docs), ("--max-tokens", self.max_tokens)):
            if v is not None and v < 0:
                raise UserError(f"{flag} {v} must be a positive count (or 0 for no cap)")
        if self.shard_tokens < 1:
            raise UserError(f"--shard-tokens {self.shard_tokens} must be positive")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads {self.threads} must be at least 1")
