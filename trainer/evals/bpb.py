"""Bits per byte: the validation loss in a unit that does not depend on the tokenizer.

    table = token_byte_lengths(tok, model_vocab_size).to(device)      # once, at start-up
    loss_sum, n_bytes = 0.0, 0
    for x, y, mask in val_batches:                                    # the val loop
        l, b = loss_and_bytes(model, x, y, mask, table)
        loss_sum, n_bytes = loss_sum + l, n_bytes + b                 # all-reduce both across ranks
    bpb = bits_per_byte(float(loss_sum), int(n_bytes))

bpb = (summed next-token cross-entropy of the counted targets, in nats) / ln 2 / (UTF-8 bytes those
targets stand for). The bytes come from a per-id table read off the tokenizer's own vocabulary, so the
val loop adds two reductions per batch and never decodes text.

What a token is worth, in bytes of decoded text:
  tiktoken (qwen3, cl100k) and byte-level BPE tokenizer.json: the token's raw bytes (exact: the bytes
      of a whole encoded text add up to len(text.encode()); qwen3 counts the NFC form it encodes).
  SentencePiece (llama2) and SentencePiece-style tokenizer.json (Metaspace '▁', <0xNN> byte pieces):
      '▁' is one space byte, a byte-fallback piece <0xNN> one byte. SentencePiece's dummy prefix is a
      '▁' too, so an encoded document counts one byte more than its text (one space per document).
  WordPiece tokenizer.json: the piece without its '##' continuation mark.
  Anything else (e.g. WordLevel): the token string's UTF-8 length; the whitespace a pre-tokenizer
      split on belongs to no token and is not counted.
  Special/control tokens (EOS, BOS, ChatML, <unk>) and ids the tokenizer does not define (a model
      vocabulary padded past the tokenizer's, cl100k's unused ids): 0 bytes.

Targets worth 0 bytes still add their loss (an EOS prediction is information about the text: where
it ends); pass `skip_zero_byte=True` to drop them as nanochat's evaluate_bpb does.
"""
from __future__ import annotations

import json
import math
import re

import torch

_BYTE_PIECE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")
_METASPACE = "▁".encode()


def token_byte_lengths(tok, vocab_size: int) -> torch.Tensor:
    """int64 [vocab_size]: the UTF-8 bytes each id adds to decoded text (0 for special tokens and for
    ids the tokenizer does not define). Built from the tokenizer's own `_id_tokens`, once."""
    measure = _measure(tok)
    lengths = [0] * vocab_size
    for i, special, data in tok._id_tokens():
        if i >= vocab_size:
            raise ValueError(f"tokenizer {tok.name}: id {i} does not fit the model's vocab_size {vocab_size}")
        if not special:
            lengths[i] = measure(data)
    return torch.tensor(lengths, dtype=torch.int64)


def bits_per_byte(loss_sum_nats: float, n_bytes: int) -> float:
    """Summed cross-entropy (nats) over the bytes it predicted, in bits per byte (nan for no bytes)."""
    return loss_sum_nats / math.log(2) / n_bytes if n_bytes else math.nan


def loss_and_bytes(model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, byte_table: torch.Tensor,
                   skip_zero_byte: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss in nats, float64; summed bytes, int64) over the counted targets of one
    batch x [B,T] -> targets y [B,T]. A target counts where mask [B,T] is true (None: all) and y >= 0
    (the loader writes -1 for masked targets). The loss comes from the model's own head + loss
    (`model(x, targets=, loss_mask=)`, chunked: no [tokens, vocab] logits); byte_table is
    `token_byte_lengths` on x's device. Both stay tensors: a val loop sums them without a sync per batch."""
    counted = y >= 0
    if mask is not None:
        counted &= mask.bool()
    safe_y = y.clamp(min=0)  # -1 is not an index; those targets are not counted anyway
    nbytes = byte_table[safe_y] * counted
    if skip_zero_byte:
        counted &= nbytes > 0
    n = counted.sum()
    mean = model(x, targets=safe_y, loss_mask=counted)
    return mean.double() * n, nbytes.sum()


def _measure(tok):
    """bytes-of-a-token -> bytes it decodes to, for this tokenizer's spelling of its vocabulary."""
    from shards.tokenizers import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer

    if isinstance(tok, TiktokenTokenizer):
        return len  # ranks are raw bytes
    if isinstance(tok, SentencePieceTokenizer):
        return _piece_bytes
    if isinstance(tok, HFTokenizer):
        return _hf_measure(tok)
    raise TypeError(f"no byte table for {type(tok).__name__} ({tok.name})")


def _piece_bytes(piece: bytes) -> int:
    """A SentencePiece piece: <0xNN> is one byte; every '▁' (3 bytes of UTF-8) is one space."""
    if _BYTE_PIECE.fullmatch(piece):
        return 1
    return len(piece.replace(_METASPACE, b" "))


def _hf_measure(tok):
    # `_id_tokens` already maps byte-level BPE tokens to their raw bytes; other models spell tokens
    # the way their decoder undoes, so the decoder says which rule applies.
    if tok._byte_level():
        return len
    kinds = _decoder_kinds(tok.tok.decoder)
    if kinds & {"Metaspace", "ByteFallback"} or "▁" in json.dumps(_decoder_json(tok.tok.decoder), ensure_ascii=False):
        return _piece_bytes
    if "WordPiece" in kinds:
        return lambda piece: len(piece.removeprefix(b"##"))
    return len


def _decoder_json(decoder) -> dict:
    return json.loads(decoder.__getstate__()) if decoder is not None else {}


def _decoder_kinds(decoder) -> set[str]:
    dec = _decoder_json(decoder)
    parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    return {d.get("type") for d in parts}
