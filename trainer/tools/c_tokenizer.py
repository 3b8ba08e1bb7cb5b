"""A shards tokenizer as the C runner's tokenizer section: every id's bytes, score and type.

The runner's encoder (c/run.c) is merge-by-score BPE over these pieces, which reproduces:
  * tiktoken ranks (qwen3, cl100k): score = -rank; tiktoken merges the adjacent pair whose
    concatenation has the lowest rank, and takes a whole pre-token that is itself a token.
  * SentencePiece BPE (llama2): score = the piece's score; SentencePiece merges the pair whose
    concatenation is the best-scoring piece; unknown characters fall back to byte pieces.
  * HF byte-level BPE (tokenizer.json, e.g. the demo's): score = -(rank of the merge making the token).
Pre-tokenizers are the GPT-2, cl100k and Qwen2 regexes, hand-coded in C; docs/c-format.md lists where
the C encoder is approximate (non-ASCII character classes, normalisation). Anything else is exported
for decoding only, with encoder kind "none" (the runner then needs ids, `-t`).
"""
from __future__ import annotations

import json
import struct
import warnings

from shards.tokenizers import CL100K_PATTERN, QWEN_PATTERN, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer

TOK_MAGIC = b"SLTK"
KIND = {"none": 0, "sentencepiece": 1, "bytelevel": 2}
PRETOK = {"none": 0, "gpt2": 1, "cl100k": 2, "qwen2": 3}
# piece types: normal; special (decoded as its text, never produced by the encoder); byte fallback;
# hidden (control/unused: decoded as nothing, never produced)
NORMAL, SPECIAL, BYTE, HIDDEN = 0, 1, 2, 3
FLAG_ADD_BOS, FLAG_DUMMY_PREFIX, FLAG_WHOLE_FIRST, FLAG_PREFIX_SPACE = 1, 2, 4, 8


def _section(kind, pretok, bos, eos, flags, pieces) -> bytes:
    """pieces: list of (bytes, score, type) indexed by id."""
    max_len = max((len(b) for b, _, _ in pieces), default=0)
    head = TOK_MAGIC + struct.pack("<IIIiiII", len(pieces), KIND[kind], PRETOK[pretok],
                                   -1 if bos is None else bos, -1 if eos is None else eos, flags, max_len)
    return head + b"".join(struct.pack("<fII", score, typ, len(b)) + b for b, score, typ in pieces)


def _tiktoken(tok) -> bytes:
    pieces = [(b"", 0.0, HIDDEN)] * tok.vocab_size
    for i, special, data in tok._id_tokens():  # a tiktoken id is its rank
        pieces[i] = (data, 0.0, SPECIAL) if special else (data, -float(i), NORMAL)
    pretok = {QWEN_PATTERN: "qwen2", CL100K_PATTERN: "cl100k"}.get(tok.pattern)
    if pretok is None:
        warnings.warn(f"tokenizer {tok.name}: its pre-split regex has no C version; exported for decoding only")
    return _section("bytelevel" if pretok else "none", pretok or "none", tok.bos_id, tok.eos_id,
                    FLAG_WHOLE_FIRST, pieces)


def _sentencepiece(tok) -> bytes:
    sp = tok.sp
    pieces = []
    for i in range(tok.vocab_size):
        p = sp.id_to_piece(i)
        if sp.is_byte(i):  # "<0x0A>" stands for the raw byte
            pieces.append((bytes([int(p[3:5], 16)]), sp.get_score(i), BYTE))
        elif sp.is_unknown(i):
            pieces.append((" \u2047 ".encode(), 0.0, SPECIAL))  # what SentencePiece decodes <unk> to
        elif sp.is_control(i) or sp.is_unused(i):
            pieces.append((p.encode(), 0.0, HIDDEN))
        else:
            pieces.append((p.replace("\u2581", " ").encode(), sp.get_score(i), NORMAL))
    dummy = sp.encode("a", out_type=str)[0].startswith("\u2581")  # add_dummy_prefix, read off its behaviour
    flags = (FLAG_ADD_BOS if tok.add_bos else 0) | (FLAG_DUMMY_PREFIX if dummy else 0)
    return _section("sentencepiece", "none", tok.bos_id, tok.eos_id, flags, pieces)


def _hf_pretok(spec: dict | None) -> tuple[str | None, int]:
    """(pre-tokenizer name, flags) for a ByteLevel setup the C encoder knows; (None, 0) otherwise."""
    if spec is None:
        return None, 0
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt2", FLAG_PREFIX_SPACE if spec.get("add_prefix_space") else 0
    if spec.get("type") == "Sequence":  # Split(regex) + ByteLevel(use_regex=False), as to_hf_tokenizer writes
        parts = spec.get("pretokenizers", [])
        if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel" \
                and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space"):
            regex = parts[0].get("pattern", {}).get("Regex")
            known = {QWEN_PATTERN: "qwen2", CL100K_PATTERN.replace("{1,3}+", "{1,3}"): "cl100k"}
            return known.get(regex), 0
    return None, 0


def _hf(tok) -> bytes:
    spec = json.loads(tok.tok.to_str())
    model = spec.get("model", {})
    pretok, flags = _hf_pretok(spec.get("pre_tokenizer")) if model.get("type") == "BPE" else (None, 0)
    rank = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    added = {t["id"] for t in spec.get("added_tokens", [])}  # HF matches these in raw text, not by merging
    as_str = {i: s for s, i in tok.tok.get_vocab(with_added_tokens=True).items()}
    pieces = [(b"", 0.0, HIDDEN)] * tok.vocab_size
    for i, _special, data in tok._id_tokens():  # byte-level stand-ins already mapped back to bytes
        # a token no merge makes ranks last
        pieces[i] = (data, 0.0, SPECIAL) if i in added else (data, -float(rank.get(as_str[i], len(rank))), NORMAL)
    if pretok is None:
        warnings.warn(f"tokenizer {tok.name}: not a byte-level BPE the C encoder knows; exported for decoding only")
    if model.get("ignore_merges"):
        flags |= FLAG_WHOLE_FIRST
    flags |= FLAG_ADD_BOS if tok.add_bos else 0
    return _section("bytelevel" if pretok else "none", pretok or "none", tok.bos_id, tok.eos_id, flags, pieces)


def tokenizer_section(tok) -> bytes:
    """The tokenizer section of model.bin for `tok` (None: an empty section, ids only)."""
    if tok is None:
        return _section("none", "none", None, None, 0, [])
    if isinstance(tok, TiktokenTokenizer):
        return _tiktoken(tok)
    if isinstance(tok, SentencePieceTokenizer):
        return _sentencepiece(tok)
    if isinstance(tok, HFTokenizer):
        return _hf(tok)
    raise ValueError(f"export_c: tokenizer {tok!r} is of an unknown kind")
