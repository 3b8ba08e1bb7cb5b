"""Best-fit packing (`data.packing: bestfit`): rows of seq_len+1 tokens that each start at a document
boundary, filled with whole documents by best fit (nanochat's default loader, OLMo-core's packed
fixed-length dataset).

Why: stream packing cuts windows at fixed offsets, so most rows begin mid-document and most documents
are split across two windows (the tokens after the cut are trained on without their beginning).
Here every row starts with a document's first token (its BOS where the tokenizer adds one); the price
is padding at a row's end (no loss) and the tail of a document longer than a row (cropped, counted).

The plan, per shard, once, independent of the seed (a static property of the data, as stream windows
are): documents in shard order pass through a lookahead buffer of `lookahead` documents; each row takes
the largest buffered document that fits the room left, again, until none fits. A bounded buffer keeps
it O(n log lookahead) time and O(lookahead) working memory, and reads each shard roughly in order.
The plan is the shard's document ids in row order and each row's first index into them (4 bytes per
document, 8 per row). The loader then treats a plan row exactly as a stream window: the mixture counts
rows, a keyed Feistel permutation per epoch orders them, so the schedule's exact accounting, the
pure-function-of-step contract and world-size-independent resume carry over unchanged.
"""
from __future__ import annotations

from bisect import bisect_right, insort
from dataclasses import astuple, dataclass

import numpy as np

LOOKAHEAD = 1024  # documents buffered: nanochat's is 1000; more gives less padding, slower planning
_LOW = (1 << 32) - 1  # a buffer key is length << 32 | (_LOW - doc): largest first, then earliest doc


@dataclass
class PackStats:
    """Token accounting of a packing, in tokens of rows of L = seq_len+1."""

    documents: int = 0
    tokens: int = 0  # document tokens in the shards
    rows: int = 0
    cropped: int = 0  # document tokens no row holds (a document's tail past L)
    padded: int = 0  # row positions holding no document token (EOS, no loss)

    def __add__(self, other: PackStats) -> PackStats:
        return PackStats(*(a + b for a, b in zip(astuple(self), astuple(other))))


def bestfit_plan(lengths: np.ndarray, L: int, lookahead: int = LOOKAHEAD) -> tuple[np.ndarray, np.ndarray]:
    """(order, row_ptr): row r holds documents order[row_ptr[r]:row_ptr[r+1]], each from its first token,
    min(length, L) tokens of it; every document is in exactly one row. Deterministic in `lengths`."""
    n = len(lengths)
    if n >= _LOW:
        raise ValueError(f"{n} documents in one shard: best-fit plans hold fewer than 2**32")
    take = np.minimum(np.asarray(lengths, dtype=np.int64), L).tolist()  # Python ints: the loop is scalar
    order = np.empty(n, dtype=np.uint32)
    ptr = [0]
    keys: list[int] = []  # sorted buffer
    nxt = out = 0
    while out < n:
        while len(keys) < lookahead and nxt < n:  # refill once per row: a row never waits on the stream
            insort(keys, (take[nxt] << 32) | (_LOW - nxt))
            nxt += 1
        room = L
        while keys:  # each document fits an empty row (take <= L), so no row is empty
            i = bisect_right(keys, (room << 32) | _LOW) - 1
            if i < 0:
                break
            key = keys.pop(i)
            order[out] = _LOW - (key & _LOW)
            out += 1
            room -= key >> 32
        ptr.append(out)
    return order, np.array(ptr, dtype=np.int64)


def plan_stats(lengths: np.ndarray, rows: int, L: int) -> PackStats:
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = int(lengths.sum())
    cropped = int(np.maximum(lengths - L, 0).sum())
    return PackStats(len(lengths), tokens, rows, cropped, rows * L - (tokens - cropped))


def gather_rows(tokens: np.ndarray, offsets: np.ndarray, loss: np.ndarray | None, order: np.ndarray,
                ptr: np.ndarray, rows: np.ndarray, L: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, L] int64 (padded with `pad`) and masks [n, L] bool (False on padding and where the
    shard's loss mask is 0) of plan rows `rows` of one shard: one fancy index for all their tokens."""
    lo, hi = ptr[rows], ptr[rows + 1]
    count = hi - lo
    first = np.cumsum(count) - count  # each row's first piece in the flat piece list
    docs = order[np.repeat(lo - first, count) + np.arange(int(count.sum()))].astype(np.int64)
    start = offsets[docs].astype(np.int64)
    take = np.minimum(offsets[docs + 1].astype(np.int64) - start, L)
    # a row's pieces are contiguous from its position 0, so in row-major order the real tokens are the
    # pieces back to back: one source index for all of them, one boolean store
    before = np.cumsum(take) - take
    src = np.repeat(start - before, take) + np.arange(int(take.sum()))
    used = np.add.reduceat(take, first) if len(take) else np.zeros(0, dtype=np.int64)
    valid = np.arange(L) < used[:, None]
    toks = np.full((len(rows), L), pad, dtype=np.int64)
    toks[valid] = np.asarray(tokens)[src]
    if loss is None:
        return toks, valid
    mask = np.zeros_like(valid)
    mask[valid] = np.asarray(loss)[src] != 0
    return toks, mask
