"""datatrove's tokenized-shard layout (`.ds`), written and read without datatrove or torch.

One shard is four sibling files sharing a prefix:

    NAME.ds           raw little-endian token ids, uint16 or uint32
    NAME.ds.index     uint64 cumulative end offset of each document (last == total tokens)
    NAME.ds.loss      one byte per token, 1 where the token counts toward the loss (only with masks)
    NAME.ds.metadata  "tokenizer|token_size\\ncount\\nhuman count"

datatrove's DocumentTokenizerMerger and nanotron read exactly this. The writer streams to
`*.tmp` files and renames them into place only on `close()`, so a crash never leaves a file
that looks like a finished shard.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKENS, INDEX, LOSS, METADATA = ".ds", ".ds.index", ".ds.loss", ".ds.metadata"
SUFFIXES = (TOKENS, INDEX, LOSS, METADATA)


def shard_file(ds: str | Path, suffix: str) -> Path:
    """The file of shard NAME.ds with `suffix` (one of SUFFIXES): NAME.ds + ".index" for INDEX.
    Works on relative names too (`shard_file("train/00000.ds", LOSS).as_posix()`)."""
    if suffix not in SUFFIXES:
        raise ValueError(f"not a shard suffix: {suffix!r} (one of {SUFFIXES})")
    return Path(str(ds) + suffix[len(TOKENS):])


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits (vocab <= 65,536), else uint32 — datatrove's rule."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def max_id(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest token id, read in chunks (32-64 MiB of a memory-mapped shard at a time); -1 if empty."""
    m = -1
    for i in range(0, len(tokens), chunk):
        m = max(m, int(tokens[i : i + chunk].max()))
    return m


def human_count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


class ShardWriter:
    """Append documents (token arrays, optional loss masks) to one `.ds` shard.

    Use as a context manager; an exception inside the block discards the partial files.
    """

    def __init__(self, path: str | Path, dtype: np.dtype, tokenizer_name: str, with_loss: bool = False):
        self.path = Path(path)
        if self.path.suffix == TOKENS:  # accept "00000.ds" as well as the prefix "00000" (not "00000.ds.ds")
            self.path = self.path.with_suffix("")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype("<u2"), np.dtype("<u4")):
            raise ValueError(f"shard dtype must be uint16 or uint32, got {self.dtype}")
        self.max_id = np.iinfo(self.dtype).max
        self.tokenizer_name = tokenizer_name
        self.with_loss = with_loss
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tokens = open(self._tmp(TOKENS), "wb")
        self._index = open(self._tmp(INDEX), "wb")
        self._loss = open(self._tmp(LOSS), "wb") if with_loss else None
        self.documents = 0
        self.tokens = 0
        self._closed = False

    def _tmp(self, suffix: str) -> Path:
        return Path(str(self.path) + suffix + ".tmp")

    def write(self, tokens, loss_mask=None) -> None:
        self.write_many([tokens], None if loss_mask is None else [loss_mask])

    def write_many(self, docs, loss_masks=None) -> int:
        """Append several documents with one write per file (per-document writes cost more than
        tokenizing short documents). Everything is validated before any byte is written, so a
        rejected batch leaves the shard consistent with its index. Returns the tokens written."""
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        if len(docs) == 0:
            return 0
        if (lengths <= 0).any():
            raise ValueError("a document must be a non-empty 1-D sequence of token ids")
        if loss_masks is not None and self._loss is not None and (
                len(loss_masks) != len(docs) or any(len(m) != n for m, n in zip(loss_masks, lengths))):
            raise ValueError("this shard stores loss masks: each document needs one mask value per token")
        flat = np.concatenate([np.asarray(d).reshape(-1) for d in docs])
        loss = None if loss_masks is None else np.concatenate([np.asarray(m, dtype=np.uint8) for m in loss_masks])
        return self.write_flat(flat, lengths, loss)

    def write_flat(self, tokens: np.ndarray, lengths: np.ndarray, loss: np.ndarray | None = None) -> int:
        """`write_many` for documents already concatenated: tokens [sum(lengths)], one length per
        document (a tokenizer's batch output needs no split into per-document arrays)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            return 0
        total = int(lengths.sum())
        if (lengths <= 0).any() or len(tokens) != total or tokens.ndim != 1:
            raise ValueError("a document must be a non-empty 1-D sequence of token ids (lengths must sum to the tokens)")
        lo, hi = tokens.min(), tokens.max()
        if lo < 0 or hi > self.max_id:
            raise ValueError(f"token id out of range for {self.dtype.name}: min {lo}, max {hi}")
        if self._loss is not None:
            if loss is None or len(loss) != total:
                raise ValueError("this shard stores loss masks: each document needs one mask value per token")
        elif loss is not None:
            raise ValueError("loss_mask given to a ShardWriter opened with with_loss=False")
        self._tokens.write(tokens.astype(self.dtype, copy=False).tobytes())
        if self._loss is not None:
            self._loss.write(np.asarray(loss, dtype=np.uint8).tobytes())
        self._index.write((self.tokens + np.cumsum(lengths)).astype("<u8").tobytes())
        self.tokens += total
        self.documents += len(lengths)
        return total

    def close(self) -> None:
        if self._closed:
            return
        for f in (self._tokens, self._index, self._loss):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._tmp(METADATA).write_text(metadata_text(ShardMetadata(self.tokenizer_name, self.dtype.itemsize, self.tokens)))
        # Metadata is renamed last: its presence marks a complete shard.
        for suffix in SUFFIXES:
            if suffix == LOSS and self._loss is None:
                continue
            os.replace(self._tmp(suffix), str(self.path) + suffix)
        self._closed = True

    def abort(self) -> None:
        for f in (self._tokens, self._index, self._loss):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:  # a full disk fails the flush close() tries; the file is closed anyway
                    pass
        for suffix in SUFFIXES:
            self._tmp(suffix).unlink(missing_ok=True)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


@dataclass
class ShardMetadata:
    tokenizer: str
    token_size: int
    tokens: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype({2: "<u2", 4: "<u4"}[self.token_size])


def metadata_text(meta: ShardMetadata) -> str:
    """NAME.ds.metadata as datatrove writes it: 'tokenizer|token_size', the token count, the count in words."""
    return f"{meta.tokenizer}|{meta.token_size}\n{meta.tokens}\n{human_count(meta.tokens)}"


def rename_tokenizer(path: str | Path, name: str) -> str:
    """Set the tokenizer name in NAME.ds.metadata (atomically; the other lines kept as written, by
    whichever tool wrote them); returns the name it had."""
    meta = read_metadata(path)
    if meta.tokenizer != name:
        p = shard_file(path, METADATA)
        lines = p.read_text().splitlines()
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("\n".join([f"{name}|{meta.token_size}", *lines[1:]]))
        os.replace(tmp, p)
    return meta.tokenizer


def read_metadata(path: str | Path) -> ShardMetadata:
    """Parse NAME.ds.metadata (path may be NAME.ds or the metadata file itself)."""
    p = Path(path) if str(path).endswith(METADATA) else shard_file(path, METADATA)
    if not p.exists():
        raise FileNotFoundError(f"{p}: missing shard metadata (an unfinished or foreign shard?)")
    lines = p.read_text().splitlines()
    try:
        name, size = lines[0].rsplit("|", 1)
        meta = ShardMetadata(tokenizer=name, token_size=int(size), tokens=int(lines[1]))
    except (IndexError, ValueError) as e:
        raise ValueError(f"{p}: malformed metadata, expected 'tokenizer|token_size' then a count ({e})") from None
    if meta.token_size not in (2, 4):
        raise ValueError(f"{p}: token_size must be 2 or 4, got {meta.token_size}")
    return meta


try:  # POSIX mmap(2) straight from libc: see map_readonly
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
except (OSError, AttributeError):  # not POSIX
    _libc = None


def map_readonly(path: str | Path, dtype: np.dtype, n: int) -> np.ndarray:
    """The first n items of a file as a read-only memory-mapped array that holds no file descriptor.

    np.memmap (Python's mmap) keeps a duplicate descriptor open per map, so a mixture of ~1,000 shard
    files failed under the usual `ulimit -n 1024`. A mapping outlives the descriptor it was made from,
    so this one is closed at once (Python >= 3.13's `mmap(..., trackfd=False)` does the same); the
    pages are unmapped when the last array viewing them is gone. Same page cache, same speed."""
    dtype = np.dtype(dtype)
    if n == 0:
        return np.zeros(0, dtype)
    if _libc is None:
        return np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    size = n * dtype.itemsize
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"{path}: mmap failed ({os.strerror(err)})")
    buf = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(buf, _libc.munmap, addr, size)
    arr = np.frombuffer(buf, dtype=dtype, count=n)  # keeps buf (and so the mapping) alive
    arr.flags.writeable = False  # PROT_READ: a write would be a segfault, not an exception
    return arr


@dataclass
class Shard:
    """One `.ds` shard opened as memory maps (holding no file descriptors: `map_readonly`).
    `offsets[i]:offsets[i+1]` is document i."""

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray  # len = documents + 1, starts at 0
    loss: np.ndarray | None

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])


@dataclass
class Layout:
    """What NAME.ds's files say about each other, read without trusting metadata or manifest."""

    tokens: int  # ids in NAME.ds; -1 when its size is not a whole number of them
    ends: np.ndarray | None  # the index's document end offsets; None when absent or unreadable
    problems: list[tuple[str, str]]  # (suffix, what is wrong), in the order checked


def check_layout(path: str | Path, dtype: np.dtype, name: str | None = None) -> Layout:
    """The one rule for a shard's own consistency (open_shard raises its first problem, `shards
    verify` lists them all): NAME.ds a whole number of ids, the index uint64 offsets rising strictly
    and ending at the token count, NAME.ds.loss one byte per token. A missing index or loss file is
    not a problem here: whether one is needed is the caller's to say. `name` is what the messages
    call NAME.ds (its file name by default)."""
    path, dtype = Path(path), np.dtype(dtype)
    nbytes = path.stat().st_size
    if nbytes % dtype.itemsize:
        return Layout(-1, None, [(TOKENS, f"size {nbytes} is not a multiple of {dtype.itemsize} ({dtype.name})")])
    n = nbytes // dtype.itemsize
    problems: list[tuple[str, str]] = []
    index_path, ends = shard_file(path, INDEX), None
    if index_path.exists():
        isize = index_path.stat().st_size
        if isize % 8:
            problems.append((INDEX, f"size {isize} is not a multiple of 8 (uint64 offsets)"))
        else:
            ends = np.fromfile(index_path, dtype="<u8")
            if len(ends) == 0 and n:
                problems.append((INDEX, f"empty index for {n} tokens"))
            elif len(ends):
                starts = np.concatenate([[0], ends[:-1]]).astype(np.uint64)
                bad = np.flatnonzero(ends <= starts)
                if len(bad):
                    problems.append((INDEX, f"not strictly increasing at document {int(bad[0])} ({len(bad)} bad entries)"))
                if int(ends[-1]) != n:
                    problems.append((INDEX, f"last offset {int(ends[-1])} != {n} tokens in {name or path.name}"))
    loss_path = shard_file(path, LOSS)
    if loss_path.exists() and loss_path.stat().st_size != n:
        problems.append((LOSS, f"{loss_path.stat().st_size} mask bytes for {n} tokens"))
    return Layout(n, ends, problems)


def open_shard(path: str | Path, dtype: np.dtype | None = None) -> Shard:
    """Memory-map NAME.ds (+ index, + loss). dtype defaults to the one in the metadata; when
    the caller passes the manifest's dtype the two must agree. Raises the first `check_layout` problem."""
    path = Path(path)
    meta = read_metadata(path)
    if dtype is not None and np.dtype(dtype) != meta.dtype:
        raise ValueError(f"{path}: manifest says {np.dtype(dtype).name} but shard metadata says {meta.dtype.name}")
    dtype = meta.dtype
    layout = check_layout(path, dtype)
    if layout.problems and layout.problems[0][0] == TOKENS:
        raise ValueError(f"{path}: {layout.problems[0][1]}")
    index_path = shard_file(path, INDEX)
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path}: missing document index")
    n = layout.tokens
    for suffix, problem in layout.problems[:1]:
        where = shard_file(path, suffix)
        if suffix == INDEX:
            raise ValueError(f"{where}: index inconsistent with {n} tokens in {path.name}: {problem}")
        raise ValueError(f"{where}: {problem}")
    offsets = np.concatenate([[0], layout.ends]).astype(np.int64)
    loss_path = shard_file(path, LOSS)
    loss = map_readonly(loss_path, np.uint8, n) if loss_path.exists() else None
    return Shard(path=path, tokens=map_readonly(path, dtype, n), offsets=offsets, loss=loss)
