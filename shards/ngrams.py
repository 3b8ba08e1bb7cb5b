"""An n-gram index of reference texts (eval task examples) and the batch lookup decontamination runs.

An n-gram is n consecutive words as `shards.text.word_bytes` separates them (lowercased, punctuation
stripped). Everything is computed over a batch of documents at once, in numpy, with no per-word
Python: a word's hash is a polynomial over its bytes (from prefix sums of the bytes times powers of
the inverse multiplier, then mixed), an n-gram's hash a polynomial over its n word hashes, all mod
2**64. The index is a sorted uint64 array per label (task), never strings, and a lookup is a bitmap
test per n-gram plus an exact search for the few the bitmap lets through.

On disk (`save`/`load`): FOLDER/index.json (n, labels, counts, sha256 of the hashes), FOLDER/<k>.hashes.npy
per label, FOLDER/union.npy and FOLDER/bits0.npy, bits1.npy (the lookup's bitmaps), loaded memory-mapped.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .text import SPACE, word_bytes

INDEX = "index.json"
_P = np.uint64(0x100000001B3)  # odd (the FNV prime): invertible mod 2**64
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_MULT = np.uint64(0x9E3779B97F4A7C15)  # n-gram polynomial over word hashes
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))  # splitmix64's finaliser
CHUNK = 1 << 20  # bytes hashed at once: bounds the temporaries (~40 MB) whatever the document size


class _Powers:
    """P**k and P**-k for k < len, grown on demand (cumulative products wrap mod 2**64)."""

    def __init__(self):
        self.fwd = self.inv = np.ones(1, np.uint64)

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.fwd) < n:
            size = max(n, 2 * len(self.fwd))
            self.fwd, self.inv = (np.cumprod(_steps(size, m), dtype=np.uint64) for m in (_P, _P_INV))
        return self.fwd[:n], self.inv[:n]


_POWERS = _Powers()


def _steps(size: int, m: np.uint64) -> np.ndarray:
    a = np.full(size, m, dtype=np.uint64)
    a[0] = 1
    return a


def _mix(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(30)
    h *= _MIX[0]
    h ^= h >> np.uint64(27)
    h *= _MIX[1]
    h ^= h >> np.uint64(31)
    return h


def _word_spans(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) offsets of the runs of non-space bytes."""
    is_word = np.concatenate(([False], buf != SPACE, [False]))
    edges = np.flatnonzero(is_word[1:] != is_word[:-1])
    return edges[0::2], edges[1::2]


def _chunk_word_hashes(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Word starts, ends and hashes of one chunk: hash = mix(sum of byte_j * P**(j - start))."""
    starts, ends = _word_spans(buf)
    fwd, inv = _POWERS.upto(len(buf))
    prefix = np.zeros(len(buf) + 1, np.uint64)
    np.multiply(buf, inv, out=prefix[1:], dtype=np.uint64)
    np.cumsum(prefix[1:], out=prefix[1:])
    h = (prefix[ends] - prefix[starts]) * fwd[starts]
    return starts, ends, _mix(h)


def word_hashes(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, hashes) of every word in a `word_bytes` buffer, CHUNK bytes at a time (cut at a
    space, so no word is split)."""
    out, a, n = [], 0, len(buf)
    raw = buf.tobytes() if n > CHUNK else b""
    while a < n:
        b = n if n - a <= CHUNK else raw.rfind(b" ", a, a + CHUNK)
        if b <= a:  # one word longer than CHUNK: take it whole
            b = raw.find(b" ", a + CHUNK)
            b = n if b < 0 else b
        s, e, h = _chunk_word_hashes(buf[a:b])
        out.append((s + a, e + a, h))
        a = b
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64)
    return tuple(np.concatenate(parts) for parts in zip(*out))


def window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of n consecutive word hashes (len(ids) - n + 1 of them)."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = ids[:m].copy()
    for k in range(1, n):
        h *= _MULT
        h += ids[k : k + m]
    return h


class Windows:
    """A batch's n-grams: the hash of every window of n words inside one text, where it starts (word
    index), and the words' byte spans in the batch buffer."""

    def __init__(self, texts: list[str], n: int):
        self.buf, doc_starts = word_bytes(texts)
        self.starts, self.ends, ids = word_hashes(self.buf)
        self.n = n
        self.first_word = np.searchsorted(self.starts, doc_starts)  # each text's first word (1 lookup per text)
        self.word_counts = np.diff(np.append(self.first_word, len(ids)))
        m = max(0, len(ids) - n + 1)
        # a window starting up to n-1 words before a text's first word spans two texts
        crossing = (self.first_word[self.first_word > 0][:, None] - np.arange(1, n)).ravel()
        inside = np.ones(m, dtype=bool)
        inside[crossing[(crossing >= 0) & (crossing < m)]] = False
        self.window = np.flatnonzero(inside)
        self.hashes = window_hashes(ids, n)[inside]

    def doc(self, i: int) -> int:
        """The text window i lies in."""
        return int(np.searchsorted(self.first_word, self.window[i], side="right")) - 1

    def text(self, i: int) -> str:
        w = self.window[i]
        return " ".join(self.buf[self.starts[w] : self.ends[w + self.n - 1]].tobytes().decode("utf-8", "replace").split())


class NGramIndex:
    """Sorted n-gram hashes per label; `find` reports which documents share an n-gram with a label."""

    def __init__(self, n: int, hashes: dict[str, np.ndarray], counts: dict | None = None,
                 union: np.ndarray | None = None, bits: list[np.ndarray] | None = None):
        self.n, self.hashes, self.counts = n, hashes, counts or {}
        if union is None:
            union = sorted_unique(np.concatenate(list(hashes.values()))) if hashes else np.zeros(0, np.uint64)
        self.union = union
        # ~32 bits per indexed hash (3% of absent hashes pass a bitmap), 8 KiB to 32 MiB each
        self._bit_count = int(min(28, max(16, np.ceil(np.log2(max(1, len(self.union)) * 32)))))
        self._bits = bits

    @classmethod
    def build(cls, texts_by_label: dict[str, list[str]], n: int = 13, batch: int = 1000) -> "NGramIndex":
        if n < 1:
            raise ValueError(f"n-gram size must be >= 1, got {n}")
        hashes, counts = {}, {}
        for label, texts in texts_by_label.items():
            parts, short = [], 0
            for i in range(0, len(texts), batch):
                w = Windows(texts[i : i + batch], n)
                parts.append(w.hashes)
                short += int((w.word_counts < n).sum())  # nothing n words long to match: the manifest shows it
            hashes[label] = sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
            counts[label] = {"examples": len(texts), "too_short": short, "ngrams": int(len(hashes[label]))}
        return cls(n, hashes, counts)

    def digest(self) -> str:
        """sha256 over n and every label's hashes: equal digests, equal lookups."""
        h = hashlib.sha256(str(self.n).encode())
        for label in sorted(self.hashes):
            h.update(label.encode() + b"\0" + self.hashes[label].astype("<u8").tobytes())
        return h.hexdigest()

    def contains(self, h: np.ndarray) -> np.ndarray:
        """Which of the hashes `h` are in the index. A search of the sorted union costs ~20 cache misses
        per hash, so two bitmaps (of the top bits, then of the low bits: 3% of absent hashes pass each)
        rule out nearly all first, at one memory access each; the few left are searched exactly."""
        bits = self.bitmaps()
        out = np.zeros(len(h), dtype=bool)
        maybe = np.flatnonzero(_test(bits[0], self._slot(h, 0)))
        maybe = maybe[_test(bits[1], self._slot(h[maybe], 1))]
        if len(maybe):
            cand = h[maybe]
            idx = np.minimum(np.searchsorted(self.union, cand), len(self.union) - 1)
            out[maybe] = self.union[idx] == cand
        return out

    def _slot(self, h: np.ndarray, which: int) -> np.ndarray:
        """Bitmap positions: the top bits of each hash (which=0) or its low bits (which=1)."""
        if which == 0:
            return h >> np.uint64(64 - self._bit_count)
        return h & np.uint64((1 << self._bit_count) - 1)

    def find(self, texts: list[str]) -> list[tuple[list[str], str] | None]:
        """Per text: None, or (labels it shares an n-gram with, the first such n-gram's words)."""
        out: list = [None] * len(texts)
        if not len(self.union) or not texts:
            return out
        w = Windows(texts, self.n)
        for i in np.flatnonzero(self.contains(w.hashes)).tolist():
            d, value = w.doc(i), w.hashes[i]
            if out[d] is None:  # the first hit names the n-gram; a later one may add labels
                out[d] = ([], w.text(i))
            labels = out[d][0]
            labels += [lb for lb, arr in self.hashes.items() if lb not in labels and _contains(arr, value)]
        return out

    # -- files ------------------------------------------------------------------------------------
    def save(self, folder: str | Path, meta: dict | None = None) -> Path:
        """Write the hashes per label, their union and its two bitmaps (what every worker would otherwise
        sort and build again), then index.json (last); returns index.json's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        labels = sorted(self.hashes)
        for i, label in enumerate(labels):
            np.save(folder / f"{i}.hashes.npy", self.hashes[label].astype("<u8"))
        np.save(folder / "union.npy", self.union.astype("<u8"))
        for k, bits in enumerate(self.bitmaps()):
            np.save(folder / f"bits{k}.npy", bits)
        info = {"n": self.n, "labels": labels, "counts": self.counts, "sha256": self.digest(), **(meta or {})}
        tmp = folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, folder / INDEX)
        return folder / INDEX

    @classmethod
    def load(cls, folder: str | Path) -> "NGramIndex":
        """Memory-mapped: loading costs nothing, and the worker processes of one machine share the pages."""
        folder = Path(folder)
        info = read_info(folder)
        arr = lambda name: np.load(folder / name, mmap_mode="r")  # noqa: E731
        hashes = {label: arr(f"{i}.hashes.npy") for i, label in enumerate(info["labels"])}
        return cls(info["n"], hashes, info.get("counts"), union=arr("union.npy"), bits=[arr("bits0.npy"), arr("bits1.npy")])

    def bitmaps(self) -> list[np.ndarray]:
        if self._bits is None:
            self._bits = [_bitmap(self._slot(self.union, k), self._bit_count) for k in (0, 1)]
        return self._bits


def read_info(folder: str | Path) -> dict:
    p = Path(folder) / INDEX
    if not p.exists():
        raise FileNotFoundError(f"{p}: no n-gram index here (built by --decontaminate before the stage runs)")
    return json.loads(p.read_text())


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy 2's default hash-based unique is ~10x slower on millions of uint64."""
    a = np.sort(a)
    keep = np.ones(len(a), dtype=bool)
    keep[1:] = a[1:] != a[:-1]
    return a[keep]


def _bitmap(slots: np.ndarray, bit_count: int) -> np.ndarray:
    """Bit `slot` set for every slot, least significant bit first in each byte (what `_test` reads)."""
    flags = np.zeros(1 << bit_count, dtype=bool)
    flags[slots] = True
    return np.packbits(flags, bitorder="little")


def _test(bits: np.ndarray, slots: np.ndarray) -> np.ndarray:
    return ((bits[slots >> np.uint64(3)] >> (slots & np.uint64(7)).astype(np.uint8)) & 1).astype(bool)


def _contains(sorted_arr: np.ndarray, value) -> bool:
    i = int(np.searchsorted(sorted_arr, value))
    return i < len(sorted_arr) and sorted_arr[i] == value
