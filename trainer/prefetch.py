"""Batches prepared in a background thread while the current step runs.

    prefetch = Prefetcher(loader, start_step, end_step, pin_memory=device.type == "cuda")
    x, y, loss_mask, info = prefetch.batch(step, micro_step)     # same as loader.batch(step, micro_step)
    prefetch.close()

A batch is a pure function of (step, micro_step) (trainer/data.py), so a thread can compute the next
ones early without changing any of them. The loader's saved position (`state_dict`, what a checkpoint
resumes from) moves only when a batch is handed out, never when it is prepared, so checkpoints and
resumes are the same as without prefetching. numpy's gathers and the copies release the GIL, so the
thread runs beside the training step. On CUDA the tensors are pinned: `.to(device, non_blocking=True)`
is then an asynchronous copy. A request out of order (or after close) falls back to the loader.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref

_DONE = object()


def _fill(loader, start: int, end: int, out: queue.Queue, stop: threading.Event, pin: bool, data_step) -> None:
    """Worker: put ((step, micro), batch) for every micro-step of steps start..end-1, in order."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for step in range(start, end):
            for micro in range(loader.grad_accum):
                if stop.is_set():
                    return
                x, y, mask, info = loader.prepare(data_step(step), micro)
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                    mask = mask.pin_memory() if mask is not None else None
                if not put(((step, micro), (x, y, mask, info))):
                    return
    except BaseException as e:  # handed to the training thread, raised there
        put((_DONE, e))
        return
    put((_DONE, None))


class Prefetcher:
    def __init__(self, loader, start_step: int, end_step: int, pin_memory: bool = False, depth: int | None = None,
                 data_step=lambda step: step):
        """Training steps start_step..end_step-1; `data_step` maps one to the loader step it reads (the
        identity, or trainer.guard.data_step past skipped batches)."""
        self.loader, self.data_step = loader, data_step
        self.depth = depth or max(2, loader.grad_accum)  # a whole step ahead: run.py takes a step's batches at once
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._next = (start_step, 0) if start_step < end_step else None
        self.wait_seconds = 0.0  # time the training thread spent waiting for a batch (the loader on the critical path)
        self._thread = threading.Thread(target=_fill, name="shardloom-prefetch", daemon=True,
                                        args=(loader, start_step, end_step, self._queue, self._stop, pin_memory,
                                              data_step))
        self._thread.start()
        weakref.finalize(self, self._stop.set)  # an abandoned prefetcher (an exception in training) stops its thread

    def batch(self, step: int, micro_step: int = 0):
        if (step, micro_step) != self._next:
            self.close()
            return self.loader.batch(self.data_step(step), micro_step)
        t0 = time.perf_counter()
        key, item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if key is _DONE:
            self._next = None
            if item is not None:
                raise item
            return self.loader.batch(self.data_step(step), micro_step)
        self.loader.mark_served(self.data_step(step), micro_step)
        self._next = (step, micro_step + 1) if micro_step + 1 < self.loader.grad_accum else (step + 1, 0)
        return item

    def close(self) -> None:
        self._next = None
        self._stop.set()
        self._thread.join()
