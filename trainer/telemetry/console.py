"""The trainer's one logger: rank-aware, configured once (on first import; trainer.run's main sets the
rank it got from torchrun).

    from trainer.telemetry.console import log
    log.info("[resume] ...")      # shown by rank 0 only
    log.warning("...")            # shown by every rank, prefixed "[rank N]" off rank 0

Modules use `logging.getLogger(__name__)` under `trainer.` or this `log`; both reach the one handler,
which writes each message as it is to the current sys.stdout (so progress lines, tests' capture and
torchrun's per-rank output all see the same stream).
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("trainer")


class _Stdout(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


class _Rank(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno < logging.WARNING:
            return False
        record.msg = f"[rank {self.rank}] {record.msg}"
        return True


def setup(rank: int | None = None, level: int = logging.INFO) -> logging.Logger:
    """Idempotent: one handler on the `trainer` logger, filtered for this process's rank."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    for h in list(log.handlers):
        if isinstance(h, _Stdout):
            log.removeHandler(h)
    handler = _Stdout()
    handler.addFilter(_Rank(rank))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    return log


setup()
