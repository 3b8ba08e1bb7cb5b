"""Text keys shared by the split, the overlap report and decontamination.

`normalize_text` is the split key: two corpora that carry the same page under different ids (FineWeb's
`id`, Ultra-FineWeb's `uid`) or with different whitespace still hash to the same split.

`word_bytes` is the text decontamination takes n-grams of, for a whole batch at once: lowercased (ASCII
and Latin-1 letters: str.lower() on text with curly quotes runs at ~20 MB/s, slower than tokenizing),
every separator a space. Separators are ASCII punctuation, symbols and whitespace (everything but
letters, digits and "_", as `\\w` has them), the General Punctuation block U+2000-U+206F (curly quotes,
dashes, ellipsis, the special spaces), U+00A0-U+00BF (no-break space, guillemets, inverted marks, ...),
and the multiplication and division signs. Other non-ASCII characters are word characters: accented
letters stay in their words. It works on UTF-8 bytes, with one translate and a few numpy passes per
batch, because per-word Python work would cost more than tokenizing the same text.
"""
from __future__ import annotations

import hashlib
import unicodedata

import numpy as np

NORMALIZATION = "NFC, whitespace runs collapsed to one space, ends stripped"
SPACE = 0x20


def normalize_text(text: str) -> str:
    """Unicode NFC with every whitespace run collapsed to one space and the ends stripped."""
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


def hash_fraction(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from (seed, key): blake2b, never Python's salted hash()."""
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, key=str(int(seed)).encode())
    return int.from_bytes(h.digest(), "little") / 2.0**64


def assign_split(key: str, seed: int, val_fraction: float) -> str:
    """The split rule every source shares: val iff hash_fraction(key, seed) < val_fraction."""
    return "val" if hash_fraction(key, seed) < val_fraction else "train"


def text_split(text: str, seed: int, val_fraction: float) -> str:
    """The default (text-keyed) split of a document."""
    return assign_split(normalize_text(text), seed, val_fraction)


# ASCII letters lowercased, digits and "_" kept, every other ASCII byte a space; bytes >= 0x80 unchanged.
_ASCII_TABLE = bytes(c if chr(c).isalnum() or c == ord("_") else SPACE for c in range(128)).lower() + bytes(range(128, 256))


def word_bytes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The texts lowercased and joined by one space, separators turned into spaces, as a uint8 array;
    and each text's start offset in it."""
    parts = [t.encode("utf-8", "surrogatepass") for t in texts]
    starts = np.zeros(len(parts), dtype=np.int64)
    if parts:
        starts[1:] = np.cumsum(np.fromiter(map(len, parts), np.int64, len(parts)) + 1)[:-1]
    joined = b" ".join(parts).translate(_ASCII_TABLE)
    buf = np.frombuffer(joined, dtype=np.uint8).copy()
    if len(buf) and buf.max() >= 0x80:
        _fold_non_ascii(buf)
    return buf, starts


def _fold_non_ascii(buf: np.ndarray) -> None:
    """In place: spaces over the UTF-8 of U+2000-U+206F (E2 80 xx, E2 81 80-AF), U+00A0-U+00BF (C2 A0-BF),
    U+00D7 and U+00F7 (C3 97, C3 B7); Latin-1 capitals U+00C0-U+00DE (C3 80-9E) lowercased. Only lead
    bytes are examined: English text has few."""
    lead = np.flatnonzero((buf[:-1] == 0xC2) | (buf[:-1] == 0xC3) | (buf[:-1] == 0xE2))
    b0, b1 = buf[lead], buf[lead + 1]
    b2 = buf[np.minimum(lead + 2, len(buf) - 1)]
    capital = lead[(b0 == 0xC3) & (b1 >= 0x80) & (b1 <= 0x9E) & (b1 != 0x97)]
    two = lead[((b0 == 0xC2) & (b1 >= 0xA0) & (b1 <= 0xBF)) | ((b0 == 0xC3) & ((b1 == 0x97) | (b1 == 0xB7)))]
    three = lead[(b0 == 0xE2) & ((b1 == 0x80) | ((b1 == 0x81) & (b2 <= 0xAF)))]
    buf[capital + 1] += 0x20
    for k in range(2):
        buf[two + k] = SPACE
    for k in range(3):
        buf[np.minimum(three + k, len(buf) - 1)] = SPACE


def words(text: str) -> list[bytes]:
    """The words of one text as `word_bytes` separates them (for reading and tests; the n-gram index
    works on whole batches)."""
    return word_bytes([text])[0].tobytes().split()
