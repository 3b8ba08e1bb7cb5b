"""The tokenize fast path: whole batches per encoder call (shards.tokenizers.encode_documents_flat)
give exactly the per-document encoding, and ShardWriter.write_flat writes what write_many does."""
from __future__ import annotations

import numpy as np
import pytest

from shards.format import ShardWriter, open_shard
from conftest import TRICKY_TEXTS
from shards.tokenizers import get_tokenizer, parallel_map

EDGE = ["", " ", "plain text", "a<|endoftext|>b", "caf\u00e9 cafe\u0301 \u212b", "\n\n\t", "x" * 3000,
        "<|endoftext", "|>tail", "digits 1234567 and   spaces  ", "\u4e2d\u6587\u6587\u672c"]


def split_flat(flat, lengths):
    return [list(map(int, d)) for d in np.split(flat, np.cumsum(lengths)[:-1])] if len(lengths) else []


@pytest.mark.parametrize("name", ["cl100k", "qwen3"])
def test_flat_batches_equal_per_document_encoding(name, docs):
    tok = get_tokenizer(name)
    texts = docs[:300]
    batches = [texts, texts[:5] + EDGE + TRICKY_TEXTS, EDGE[3:4], EDGE[7:9], [], ["lone \ud800 surrogate", "fine"]]
    for batch in batches:
        want = [tok.encode_document(t) for t in batch] if "\ud800" not in "".join(batch) else tok.encode_documents(batch, 1)
        for threads in (1, 2, 3):
            flat, lengths = tok.encode_documents_flat(batch, threads)
            assert flat.dtype == np.uint32 and split_flat(flat, lengths) == want, (name, threads, batch[:2])


def test_parallel_map_keeps_order():
    items = list(range(1001))
    assert parallel_map(lambda x: x * x, items, 3) == [x * x for x in items]
    assert parallel_map(str, [1, 2], 4) == ["1", "2"]


def test_write_flat_equals_write_many(tmp_path):
    docs = [[5, 6, 7], [1], [9, 9]]
    with ShardWriter(tmp_path / "a", np.dtype("<u2"), "t") as w:
        w.write_many(docs)
    with ShardWriter(tmp_path / "b", np.dtype("<u2"), "t") as w:
        w.write_flat(np.array([5, 6, 7, 1, 9, 9], np.uint32), np.array([3, 1, 2]))
    for suffix in (".ds", ".ds.index", ".ds.metadata"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
    assert open_shard(tmp_path / "b.ds").document(2).tolist() == [9, 9]
    with ShardWriter(tmp_path / "c", np.dtype("<u2"), "t") as w:
        for lengths in ([3, 2], [3, 0, 3], [6, -0]):
            with pytest.raises(ValueError, match="non-empty"):
                w.write_flat(np.arange(6, dtype=np.uint32), np.array(lengths))
        with pytest.raises(ValueError, match="out of range"):
            w.write_flat(np.array([70000], np.uint32), np.array([1]))
        with pytest.raises(ValueError, match="with_loss=False"):
            w.write_flat(np.array([1], np.uint32), np.array([1]), loss=np.array([1]))
        assert w.documents == 0 and w.tokens == 0
