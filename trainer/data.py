"""Mixture loader: batches of seq_len+1 windows drawn from memory-mapped token shards by a schedule.

Contract (consumed by trainer/run.py):

    loader = MixtureLoader(sources, schedule, seq_len, micro_batch, seed, rank, world_size, total_tokens,
                           split="train", cache_dir=None, *, grad_accum=1, packing="stream",
                           vocab_size=None)
    x, y, loss_mask, info = loader.batch(step, micro_step)
    loader.prepare(step, micro_step)   the same batch without moving the saved position (prefetching,
                                       trainer/prefetch.py); loader.mark_served(step, micro_step) moves it
    loader.state_dict() / loader.load_state_dict(sd) / loader.reset_data_cursor(step)
    loader.weights_at(tokens_seen) -> {source: weight};  loader.validate()
    loader.packing_stats() -> {source: PackStats} (bestfit: tokens cropped and padded; else {})
    val_batches(source_path, seq_len, batch_size, n_batches, split="val") -> [(x, y, loss_mask), ...]
    iterate(loader, start_step) -> yields (x, y, state), nanochat-style (y = -1 where the mask is 0)

Beyond a plain window sampler (all keyword-only with defaults):
`grad_accum` (rows per optimizer step = world_size * grad_accum * micro_batch; without it a step's
token position, and so the schedule, is unknown), `packing`, `vocab_size` (the model's; ids must be
below it), `reset_data_cursor()`.

How a batch is chosen (why it is exact, disjoint and independent of worker count):
- Rows form one global sequence. Row g = ((step*grad_accum + micro_step)*world_size + rank)*micro_batch + i.
  Each row belongs to exactly one (rank, micro_step), and 2 ranks x 1 micro-step reads exactly the rows
  of 1 rank x 2 micro-steps: DDP equals gradient accumulation, batch for batch.
- Row -> source, by the integral of the schedule (no random draw): E_s(b) = expected rows of source s
  among the first b rows (normalised weights interpolated linearly between points, integrated exactly).
  Source s "arrives" in row-bucket b when round(E_s(b)) steps up; rows are the arrivals in order
  (bucket, source index). So after any number of rows every source's count is within about
  (number of sources)/2 rows of the schedule's integral, even in short runs, and the k-th row of
  source s is known in O(1) from the closed form: nothing depends on the history of calls.
- The k-th row of source s reads window perm_e(k mod N_s), e = k // N_s its epoch, perm_e a keyed
  Feistel permutation of that source's N_s windows (new permutation per epoch; O(1) memory).
  "Disjoint samples per rank" therefore means: within one epoch of a source, no window is read twice
  by any rank, and no two ranks ever read the same (window, epoch). It holds for any world size.
- Windows: stream packing cuts each shard into non-overlapping windows of seq_len+1 tokens (stride
  seq_len, so y covers every token; the < seq_len tail of each shard is unused). Document packing
  (SFT) uses one document per row, truncated to seq_len+1 and padded with EOS that carries no loss.
  Best-fit packing (`bestfit`, trainer/packing.py) packs whole documents into rows that each start at
  a document boundary, by a per-shard plan fixed by the data; a plan row is drawn as a window is, so
  all of the above holds unchanged. Its padding carries no loss; `packing_stats()` counts it and the
  tokens cropped from documents longer than a row.
- The val split is never opened by the train loader; `val_batches` reads it in fixed order.
"""
from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shards.reader import SplitReader, open_split
from shards.s3 import is_s3_uri
from trainer.config import Packing
from trainer.telemetry.console import log
from trainer.mixture import MixtureError, MixturePoint, MixtureSchedule
from trainer.packing import PackStats, bestfit_plan, gather_rows, plan_stats


STATE_FORMAT = "shardloom.loader/1"


class DataError(ValueError):
    """A source, shard or schedule problem; the message names the source and file or field."""


class SplitTooSmall(DataError):
    """A source's split is missing, has no shards, or holds less than one batch: for the val split,
    a source the eval skips (with this message) rather than a broken source."""


@dataclass
class SourceSpec:
    name: str
    path: str  # shard dir, or s3:// URI (fetched into cache_dir and verified by shards.storage)


# ---------------------------------------------------------------- permutation


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:  # splitmix64 finaliser
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


_M64 = 2**64 - 1


def feistel_params(n: int, key: int) -> tuple[int, ...]:
    """(half bits, half mask, 4 round keys) of the keyed Feistel network `permute` uses for [0, n)."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    return (bits // 2, (1 << (bits // 2)) - 1,
            *((key * 0x9E3779B97F4A7C15 + r * 0xD1B54A32D192ED03) & _M64 for r in range(4)))


def _feistel(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """params: uint64 [6] (one network) or [6, len(x)] (one per element)."""
    half, mask = params[0], params[1]
    left, right = x >> half, x & mask
    for r in range(2, 6):
        left, right = right, left ^ (_mix((right + params[r]) * _GOLD) & mask)
    return (left << half) | right


def permute_many(idx: np.ndarray, n, params: np.ndarray) -> np.ndarray:
    """`permute` of each idx[i] with its own range n[i] and network params[:, i] (columns from
    `feistel_params`): rows of several sources and epochs in one vectorised pass, the same values
    one call each gives."""
    idx = np.asarray(idx, dtype=np.uint64)
    n = np.asarray(n, dtype=np.uint64)
    per_row = params.ndim == 2
    with np.errstate(over="ignore"):
        out = _feistel(idx, params)
        todo = np.flatnonzero(out >= n)  # cycle-walk the values that landed outside [0, n)
        while len(todo):
            out[todo] = _feistel(out[todo], params[:, todo] if per_row else params)
            todo = todo[out[todo] >= (n[todo] if n.ndim else n)]
    return out


def permute(idx: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n) evaluated at idx: 4-round Feistel on the next even power of two,
    cycle-walking back into range. Random access in O(1) memory, whatever n."""
    idx = np.asarray(idx, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(idx)
    return permute_many(idx, n, np.array(feistel_params(n, key), dtype=np.uint64))


def _stable_hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


# ---------------------------------------------------------------- sources


def open_reader(name: str, path: str, split: str, cache_dir: str | None) -> SplitReader:
    where = f"source '{name}' ({path})"
    if is_s3_uri(path):
        from shards.storage import StorageError, fetch_to_cache  # lazy: boto3 only for object storage

        try:
            path = fetch_to_cache(path, cache_dir)
        except StorageError as e:  # unreachable, denied, missing: one line naming the source
            raise DataError(f"{where}: {e}") from None
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{where}: directory not found: {p}")
    try:
        reader = open_split(p, split)
    except KeyError as e:  # the manifest has no such split (KeyError quotes its message: unwrap)
        raise SplitTooSmall(f"{where}: {e.args[0]}") from None
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{where}: {e}") from None
    if not reader.shards:
        raise SplitTooSmall(f"{where}: split '{split}' has no shards")
    return reader


class Source:
    """One source's split as windows (stream), documents (document packing) or best-fit rows
    (bestfit: trainer/packing.py's plan per shard); `n` of them, each one row of the loader."""

    def __init__(self, name: str, reader: SplitReader, seq_len: int, packing: str):
        self.name, self.reader, self.packing = name, reader, packing
        self.shards = reader.shards
        L = seq_len + 1
        self.unit = {"stream": "window", "document": "document", "bestfit": "row"}[packing]
        if packing == "stream":
            counts = [max(0, (len(s.tokens) - 1) // seq_len) for s in self.shards]
        elif packing == "bestfit":
            lengths = [np.diff(s.offsets.astype(np.int64)) for s in self.shards]
            self.plans = [bestfit_plan(n, L) for n in lengths]
            counts = [len(ptr) - 1 for _, ptr in self.plans]
            self.pack_stats = sum((plan_stats(n, c, L) for n, c in zip(lengths, counts)), PackStats())
        else:
            counts = [s.documents for s in self.shards]
        self.cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.cum[-1])
        self.L = L
        self.seq_len = seq_len
        self.has_loss = reader.has_loss_mask
        if packing == "stream":  # each shard as a [windows, L] strided view: a window is one row copy
            self.windows = [_windows(s.tokens, c, L, seq_len) for s, c in zip(self.shards, counts)]
            # a shard without masks reads as all ones (a zero-stride view: no memory)
            self.loss_windows = [_windows(np.ones(1, np.uint8) if s.loss is None else s.loss, c, L,
                                          0 if s.loss is None else seq_len) for s, c in zip(self.shards, counts)]

    def gather(self, samples: np.ndarray, eos: int):
        """Rows [n, L] of token ids and masks [n, L] (bool, True = counts) for sample ids. Stream rows
        keep the shard's dtype (callers widen them once, into their own buffers) and have no mask
        (None) unless the split stores loss masks; document rows are int64 with a mask."""
        n = len(samples)
        if self.packing == "stream":
            toks = take_windows(self.windows, self.cum[:-1], samples)
            return toks, take_windows(self.loss_windows, self.cum[:-1], samples) != 0 if self.has_loss else None
        toks = np.empty((n, self.L), dtype=np.int64)
        mask = np.empty((n, self.L), dtype=bool)
        shard_of = np.searchsorted(self.cum, samples, side="right") - 1
        ar = np.arange(self.L)
        for j in np.unique(shard_of).tolist():
            rows = np.flatnonzero(shard_of == j)
            shard = self.shards[j]
            local = samples[rows] - self.cum[j]
            if self.packing == "bestfit":
                toks[rows], mask[rows] = gather_rows(shard.tokens, shard.offsets, shard.loss, *self.plans[j], local,
                                                     self.L, eos)
                continue
            start, end = shard.offsets[local], shard.offsets[local + 1]
            idx = np.minimum(start[:, None] + ar, (end - 1)[:, None])
            valid = ar < (end - start)[:, None]
            toks[rows] = np.where(valid, shard.tokens[idx], eos)
            mask[rows] = valid if shard.loss is None else valid & (shard.loss[idx] != 0)
        return toks, mask


def open_source(name: str, path: str, split: str, cache_dir: str | None, seq_len: int, packing: str) -> Source:
    """One source's split, opened and checked, as the loader reads it (the data budget counts it too)."""
    return Source(name, open_reader(name, path, split, cache_dir), seq_len, packing)


def _windows(a: np.ndarray, count: int, L: int, stride: int) -> np.ndarray:
    """Read-only [count, L] view of `a` whose row i starts at i*stride (rows overlap by L - stride)."""
    a = a.view(np.ndarray)  # a memmap's fancy indexing costs more than a plain array's
    return np.lib.stride_tricks.as_strided(a, shape=(count, L), strides=(stride * a.itemsize, a.itemsize * (stride > 0)),
                                           writeable=False)


def take_windows(views: list[np.ndarray], starts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows `views[j][ids[i] - starts[j]]`, j the view holding global window ids[i] (views[j] holds
    windows starts[j] .. starts[j+1]-1): one row copy per window, one fancy index per view touched."""
    # fancy indexing, not np.take: take would first copy the whole (overlapping) strided view
    if len(views) == 1:
        return views[0][ids - starts[0]]
    j = np.searchsorted(starts, ids, side="right") - 1
    order = np.argsort(j, kind="stable")
    js = j[order]
    local = ids[order] - starts[js]
    bounds = [0, *(np.flatnonzero(js[1:] != js[:-1]) + 1).tolist(), len(ids)]
    rows = np.empty((len(ids), views[0].shape[1]), dtype=views[0].dtype)
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # rows sorted by view, then back into order
        rows[lo:hi] = views[js[lo]][local[lo:hi]]
    out = np.empty_like(rows)
    out[order] = rows
    return out


# ---------------------------------------------------------------- the loader


def schedule_for(names: list[str], schedule, seq_len: int) -> MixtureSchedule:
    """The loader's schedule: a resolved MixtureSchedule as it is (the curriculum's, built once), or
    one built from points (library use)."""
    if isinstance(schedule, MixtureSchedule):
        if list(schedule.names) != names or schedule.seq_len != seq_len:
            raise MixtureError(None, "sources", f"the schedule is over {list(schedule.names)} at seq_len "
                                                f"{schedule.seq_len}, the loader has {names} at {seq_len}")
        return schedule
    points = [p if isinstance(p, MixturePoint) else MixturePoint(**p) for p in schedule]
    return MixtureSchedule(names, points, seq_len)


class MixtureLoader:
    def __init__(
        self,
        sources,
        schedule,
        seq_len: int,
        micro_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        total_tokens: float | None = None,
        split: str = "train",
        cache_dir: str | None = None,
        *,
        grad_accum: int = 1,
        packing: str = "stream",
        vocab_size: int | None = None,
    ):
        sources = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in sources]
        if not sources:
            raise DataError("sources: at least one source is required")
        names = [s.name for s in sources]
        if packing not in typing.get_args(Packing):
            raise DataError(f"packing: expected {' | '.join(typing.get_args(Packing))}, got {packing!r}")
        for k, v in (("seq_len", seq_len), ("micro_batch", micro_batch), ("world_size", world_size),
                     ("grad_accum", grad_accum)):
            if int(v) < 1:
                raise DataError(f"{k}: must be >= 1, got {v}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank: {rank} not in [0, {world_size})")
        self.specs, self.names = sources, names
        self.seq_len, self.micro_batch, self.seed = int(seq_len), int(micro_batch), int(seed)
        self.rank, self.world_size, self.grad_accum = int(rank), int(world_size), int(grad_accum)
        self.total_tokens, self.split, self.packing, self.vocab_size = total_tokens, split, packing, vocab_size
        self.rows_per_step = self.world_size * self.grad_accum * self.micro_batch
        self.tokens_per_step = self.rows_per_step * self.seq_len
        try:
            self.schedule = schedule_for(names, schedule, self.seq_len)
        except MixtureError as e:
            raise DataError(str(e)) from None
        self.sources = [open_source(s.name, s.path, split, cache_dir, self.seq_len, packing) for s in sources]
        self.step_offset = 0
        self._epochs_logged = {n: 0 for n in names}
        self._last = None  # (step, micro_step) of the last batch served, for state_dict
        self._sizes = np.array([src.n for src in self.sources], dtype=np.int64)
        self._has_loss = np.array([src.has_loss for src in self.sources])
        if packing == "stream":  # every source's shards as one list: global window id = base[source] + sample
            self._base = np.concatenate([[0], np.cumsum(self._sizes)[:-1]]).astype(np.int64)
            self._starts = np.concatenate([b + src.cum[:-1] for b, src in zip(self._base, self.sources)])
            self._views = [w for src in self.sources for w in src.windows]
            self._loss_views = [w for src in self.sources for w in src.loss_windows]
        self._plan_cache = None  # ((step_offset, step), plan) of the latest step: its micro-steps share it
        self._networks: dict[tuple[int, int], tuple[int, ...]] = {}  # (source, epoch) -> feistel_params
        self.validate()
        tok = self.sources[0].reader.manifest.tokenizer
        self.eos_id = int(tok.eos_id)

    # -- checks
    def validate(self, scan_ids: bool = False) -> None:
        """Raise DataError when sources disagree on the tokenizer, a weighted source has no windows,
        or the tokenizer's ids may exceed the model's vocabulary. scan_ids=True also reads every
        shard once and checks its largest id (slow on big data; `python -m shards verify` does it too).
        Tokenizers are compared by vocabulary hash: one vocabulary may be named (or its file typed) two ways."""
        first = self.sources[0]
        t0 = first.reader.manifest.tokenizer
        for src in self.sources[1:]:
            t = src.reader.manifest.tokenizer
            if t.vocab_hash != t0.vocab_hash:
                raise DataError(
                    f"source '{src.name}' ({src.reader.directory / 'manifest.json'}): tokenizer "
                    f"{t.name} (vocab_hash {t.vocab_hash[:12]}) differs from source '{first.name}': "
                    f"{t0.name} (vocab_hash {t0.vocab_hash[:12]})"
                )
        if self.vocab_size is not None and t0.vocab_size > self.vocab_size:
            raise DataError(
                f"source '{first.name}' ({first.reader.directory / 'manifest.json'}): tokenizer.vocab_size "
                f"{t0.vocab_size} exceeds the model's vocab_size {self.vocab_size}"
            )
        limit = min(self.vocab_size or t0.vocab_size, t0.vocab_size)
        for src in self.sources:  # cheap: the manifest records each shard's largest id (every split: eval reads val)
            shards = [st for stats in src.reader.manifest.splits.values() for st in stats.shards]
            for st in shards:
                if st.max_id is not None and st.max_id >= limit:
                    raise DataError(
                        f"source '{src.name}' ({src.reader.directory}): {st.name} holds token id {st.max_id}, but the "
                        f"vocabulary has {limit} ids (model {self.vocab_size}, tokenizer {t0.vocab_size}; manifest.json max_id)")
            if any(st.max_id is None for st in shards):
                log.warning("source '%s' (%s): manifest.json records no max_id per shard (written by an older "
                            "version): ids are only checked batch by batch; `python -m shards verify` checks them all",
                            src.name, src.reader.directory)
        for src in self.sources if scan_ids else ():
            for shard in src.shards:
                if len(shard.tokens) and int(shard.tokens.max()) >= limit:
                    raise DataError(f"source '{src.name}': {shard.path} holds id {int(shard.tokens.max())} "
                                    f">= vocab_size {limit}")
        used = self.schedule.w.max(axis=0) > 0
        for src, u in zip(self.sources, used):
            if u and src.n == 0:
                raise DataError(
                    f"source '{src.name}' ({src.reader.directory}/{self.split}): no "
                    f"{'windows of ' + str(self.seq_len + 1) + ' tokens' if self.packing == 'stream' else 'documents'}"
                )

    # -- row -> (source, k)
    def _rows(self, g0: int, n: int):
        """Sources and per-source ordinals k of global rows g0 .. g0+n-1 (see module docstring)."""
        S = len(self.names)
        margin = S + 8
        lo = max(1, g0 - margin)
        hi = g0 + n + margin
        while True:
            b = np.arange(lo - 1, hi + 1, dtype=np.float64)
            A = self.schedule.arrivals(b)  # [buckets, S]
            before = int(A[0].sum())  # arrivals in buckets < lo
            if before > g0 and lo > 1:
                lo = max(1, lo - 4 * margin)
                continue
            # arrivals per bucket lo..hi and source; E is monotone, the clip only guards float ties
            inc = np.maximum(np.diff(A, axis=0), 0)
            if before + int(inc.sum()) < g0 + n:
                hi += 4 * margin
                continue
            flat = inc.ravel()
            src = np.repeat(np.tile(np.arange(S), len(inc)), flat)
            # k of each arrival: A[bucket-1, s] + position within this bucket's increment
            base = np.repeat(A[:-1].ravel(), flat)
            within = np.arange(len(src)) - np.repeat(np.cumsum(flat) - flat, flat)
            k = base + within
            a = g0 - before
            counts_before = A[0] + np.bincount(src[:a], minlength=S)
            return src[a : a + n], k[a : a + n], counts_before

    def _row_index(self, step: int, micro_step: int) -> int:
        s = step - self.step_offset
        if s < 0:
            raise ValueError(f"step {step} is before this loader's start step {self.step_offset}")
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step {micro_step} not in [0, grad_accum={self.grad_accum})")
        return ((s * self.grad_accum + micro_step) * self.world_size + self.rank) * self.micro_batch

    def cursors(self, row: int) -> dict[str, int]:
        """Windows (or documents) read per source, by all ranks together, before global row `row`."""
        _, _, before = self._rows(row, 0)
        return {n: int(c) for n, c in zip(self.names, before)}

    def batch(self, step: int, micro_step: int = 0):
        """(x [B,T] int64, y [B,T] int64, loss_mask [B,T] bool or None, info) for this rank."""
        out = self.prepare(step, micro_step)
        self.mark_served(step, micro_step)
        return out

    def mark_served(self, step: int, micro_step: int) -> None:
        """Record (step, micro_step) as the last batch handed to training: `state_dict` resumes after it."""
        self._last = (step, micro_step)

    def prepare(self, step: int, micro_step: int = 0):
        """`batch` without moving the position `state_dict` saves: what a prefetching thread calls."""
        g0 = self._row_index(step, micro_step)
        plan = self._plan(step)
        src, samples, epoch = plan["source"][micro_step], plan["sample"][micro_step], plan["epoch"][micro_step]
        counts, top = plan["rows_per_source"][micro_step], plan["max_epoch"][micro_step]
        present = np.flatnonzero(counts)
        want_mask = self.packing != "stream" or bool(self._has_loss[present].any())  # padding has no loss
        T = self.seq_len
        if self.packing == "stream":
            ids = self._base[src] + samples
            rows = take_windows(self._views, self._starts, ids)
            self._check_ids(rows, step, src, samples, epoch)
            x, y = rows[:, :-1].astype(np.int64), rows[:, 1:].astype(np.int64)
            mask = take_windows(self._loss_views, self._starts, ids)[:, 1:] != 0 if want_mask else None
        else:
            x = np.empty((self.micro_batch, T), dtype=np.int64)
            y = np.empty_like(x)
            mask = np.empty((self.micro_batch, T), dtype=bool)
            for s in present.tolist():
                sel = np.flatnonzero(src == s)
                toks, m = self.sources[s].gather(samples[sel], self.eos_id)
                self._check_ids(toks, step, src[sel], samples[sel], epoch[sel])
                x[sel], y[sel], mask[sel] = toks[:, :-1], toks[:, 1:], m[:, 1:]
        names = self.names
        info = {
            "row": g0,
            "sources": [names[s] for s in src.tolist()],
            # (epoch, window or document index) of each row within its source
            "samples": list(zip(epoch.tolist(), samples.tolist())),
            "tokens_per_source": {names[s]: int(counts[s]) * T for s in present.tolist()},
            "epochs": {names[s]: int(top[s]) for s in present.tolist()},
            "weights": self.weights_at(g0 * T),
        }
        return (torch.from_numpy(x), torch.from_numpy(y), None if mask is None else torch.from_numpy(mask), info)

    def _check_ids(self, rows: np.ndarray, step: int, src, samples, epoch) -> None:
        """An id without an embedding would end the step in a bare IndexError (a device assert on GPU).
        The manifests' max ids passed in `validate`, so a shard changed after its manifest: name it.
        Here, on the rows before they become x and y, so a prefetching thread does it off the step."""
        if self.vocab_size is None:
            return
        top = int(rows.max())
        if top < self.vocab_size:
            return
        row = int(np.flatnonzero((rows >= self.vocab_size).any(axis=1))[0])
        source = self.sources[int(src[row])]
        unit = source.unit
        raise DataError(f"step {step + 1}: source '{source.name}' ({source.reader.directory}) {unit} {int(samples[row])} "
                        f"(epoch {int(epoch[row])}) holds token id {top} >= the model's vocab_size {self.vocab_size}, "
                        "though manifest.json's max ids pass: a shard changed after its manifest was written "
                        f"(`python -m shards verify {source.reader.directory}` names it)")

    def _plan(self, step: int) -> dict[str, np.ndarray]:
        """Source, sample and epoch of every row this rank reads in `step` ([grad_accum, micro_batch]
        each), rows and the largest epoch per source ([grad_accum, sources]): one schedule walk and one
        vectorised permutation per step, shared by its micro-steps."""
        key = (self.step_offset, step)
        cached = self._plan_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        A, W, B, S = self.grad_accum, self.world_size, self.micro_batch, len(self.names)
        src_all, k_all, _ = self._rows(self._row_index(step, 0) - self.rank * B, A * W * B)
        own = ((np.arange(A)[:, None] * W + self.rank) * B + np.arange(B)).ravel()
        src, k = src_all[own], k_all[own]
        n = self._sizes[src]
        epoch, pos = k // n, k % n
        # one Feistel network per (source, epoch) present, applied to all rows in one pass
        span = int(epoch.max()) + 1
        groups, inv = np.unique(src * span + epoch, return_inverse=True)
        params = np.empty((len(groups), 6), dtype=np.uint64)
        for i, code in enumerate(groups.tolist()):
            s, e = divmod(code, span)
            params[i] = self._network(s, e)
            if e > self._epochs_logged[self.names[s]]:
                log.info("source '%s': epoch %d begins (all %d %ss read)", self.names[s], e, self._sizes[s],
                         self.sources[s].unit)
                self._epochs_logged[self.names[s]] = e
        samples = permute_many(pos, n, np.ascontiguousarray(params[inv.ravel()].T)).astype(np.int64)
        cell = np.repeat(np.arange(A), B) * S + src  # (micro-step, source) of each row
        max_epoch = np.zeros(A * S, dtype=np.int64)
        np.maximum.at(max_epoch, cell, epoch)
        plan = {"source": src.reshape(A, B), "sample": samples.reshape(A, B), "epoch": epoch.reshape(A, B),
                "rows_per_source": np.bincount(cell, minlength=A * S).reshape(A, S),
                "max_epoch": max_epoch.reshape(A, S)}
        self._plan_cache = (key, plan)
        return plan

    def _network(self, s: int, epoch: int) -> tuple[int, ...]:
        """Feistel parameters of source s's permutation in `epoch` (keyed by seed, name, epoch)."""
        net = self._networks.get((s, epoch))
        if net is None:
            key = _stable_hash(self.seed, self.names[s], epoch)
            net = self._networks[(s, epoch)] = feistel_params(int(self._sizes[s]), key)
        return net

    def packing_stats(self) -> dict[str, PackStats]:
        """Per source, the documents, tokens, rows, and tokens cropped and padded by best-fit packing."""
        return {src.name: src.pack_stats for src in self.sources if self.packing == "bestfit"}

    def weights_at(self, tokens_seen: float) -> dict[str, float]:
        w = self.schedule.weights(tokens_seen / self.seq_len)
        return {n: float(v) for n, v in zip(self.names, w)}

    # -- state
    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "packing": self.packing, "split": self.split,
                "sources": list(self.names), "rows_per_step": self.rows_per_step}

    def state_dict(self) -> dict:
        nxt = self._next_step()
        row = self._row_index(*nxt) - self.rank * self.micro_batch  # first row of the next (step, micro)
        return {
            "format": STATE_FORMAT,
            **self._fingerprint(),
            "step_offset": self.step_offset,
            "next_step": nxt[0],
            "next_micro_step": nxt[1],
            "cursors": self.cursors(row),
        }

    def _next_step(self):
        if self._last is None:
            return (self.step_offset, 0)
        step, micro = self._last
        return (step, micro + 1) if micro + 1 < self.grad_accum else (step + 1, 0)

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state: format {sd.get('format')!r}, expected {STATE_FORMAT!r}")
        mine = self._fingerprint()
        for key, value in mine.items():
            if sd.get(key) != value:
                raise ValueError(
                    f"loader state: {key} was {sd.get(key)!r} at save time, now {value!r} "
                    "(start a new stage with reset_data_cursor() instead of resuming the loader)"
                )
        self.step_offset = int(sd["step_offset"])
        step, micro = int(sd["next_step"]), int(sd["next_micro_step"])
        self._last = None if (step, micro) == (self.step_offset, 0) else self._prev(step, micro)
        row = self._row_index(step, micro) - self.rank * self.micro_batch
        now = self.cursors(row)
        if now != dict(sd["cursors"]):
            raise ValueError(f"loader state: cursors {dict(sd['cursors'])} do not match the schedule's {now} "
                             "(schedule changed since the checkpoint?)")

    def _prev(self, step, micro):
        return (step, micro - 1) if micro > 0 else (step - 1, self.grad_accum - 1)

    def reset_data_cursor(self, step: int) -> None:
        """New stage: `step` becomes this loader's first step, with every source starting afresh."""
        self.step_offset = int(step)
        self._last = None


# ---------------------------------------------------------------- val and generator forms


def val_batches(source_path, seq_len: int, batch_size: int, n_batches: int, split: str = "val",
                packing: str = "stream", cache_dir: str | None = None, name: str | None = None):
    """Fixed eval batches for one source: its first n_batches*batch_size windows (or documents) of
    `split` in order, so every eval sees the same tokens. Returns fewer batches when the split is
    smaller (at least one full batch is required)."""
    name = name or Path(str(source_path)).name
    src = open_source(name, str(source_path), split, cache_dir, int(seq_len), packing)
    want = batch_size * n_batches
    if src.n < batch_size:
        raise SplitTooSmall(f"source '{name}' ({source_path}/{split}): {src.n} rows of {seq_len + 1} tokens, "
                        f"fewer than one batch of {batch_size}")
    n = min(want, (src.n // batch_size) * batch_size)
    if n < want:
        log.warning("source '%s' split '%s': only %d of %d eval batches available", name, split,
                    n // batch_size, n_batches)
    eos = int(src.reader.manifest.tokenizer.eos_id)
    rows, mask = src.gather(np.arange(n, dtype=np.int64), eos)
    out = []
    for i in range(0, n, batch_size):
        r = rows[i : i + batch_size]
        out.append((torch.from_numpy(r[:, :-1].astype(np.int64)), torch.from_numpy(r[:, 1:].astype(np.int64)),
                    torch.from_numpy(mask[i : i + batch_size, 1:].copy()) if mask is not None else None))
    return out


def iterate(loader: MixtureLoader, start_step: int = 0):
    """nanochat-style generator: yields (x, y, state) per micro-step from `start_step` on. Masked
    targets are set to -1 (use cross_entropy(ignore_index=-1)); `state` is the loader's state_dict
    after this micro-batch (resume from it to continue with the next one)."""
    step = start_step
    while True:
        for micro in range(loader.grad_accum):
            x, y, mask, _ = loader.batch(step, micro)
            if mask is not None:
                y = y.masked_fill(~mask, -1)
            yield x, y, loader.state_dict()
        step += 1
