"""Prefetching (trainer/prefetch.py) and the loader's fast path: the same batches as the synchronous
loader, bit for bit, before and after a resume; the saved position follows what was served."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_data import _sft_docs, loader, make_source
from trainer.data import MixturePoint, feistel_params, permute, permute_many
from trainer.prefetch import Prefetcher


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pf")
    out = {n: make_source(root / n, t, n_tokens=400 + 100 * t, n_shards=2 + t % 2)
           for t, n in enumerate(["web", "edu", "math"])}
    out["masked"] = make_source(root / "masked", 5, n_tokens=500, with_loss=True)
    return out


def same(a, b):
    (xa, ya, ma, ia), (xb, yb, mb, ib) = a, b
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.is_contiguous() and xa.dtype == torch.int64
    assert (ma is None) == (mb is None) and (ma is None or torch.equal(ma, mb))
    assert ia == ib


SCHED4 = [(0.0, {"web": 0.5, "edu": 0.2, "math": 0.1, "masked": 0.2}),  # (fraction of the run, weights)
          (1.0, {"web": 0.1, "edu": 0.3, "math": 0.4, "masked": 0.2})]


@pytest.mark.parametrize("world,rank,accum", [(1, 0, 1), (1, 0, 3), (2, 1, 2)])
def test_prefetched_batches_and_state_equal_synchronous(srcs, world, rank, accum):
    steps = 40  # every source past its first epoch
    sync = loader(srcs, SCHED4, rank=rank, world=world, grad_accum=accum, total=16 * 4 * world * accum * steps)
    pre = loader(srcs, SCHED4, rank=rank, world=world, grad_accum=accum, total=16 * 4 * world * accum * steps)
    pf = Prefetcher(pre, 0, steps)
    for step in range(steps):
        for micro in range(accum):
            same(pf.batch(step, micro), sync.batch(step, micro))
            assert pre.state_dict() == sync.state_dict(), (step, micro)  # served, not prepared
    pf.close()
    assert max(sync.batch(steps - 1, accum - 1)[3]["epochs"].values()) >= 1  # epoch boundaries crossed


def test_prefetch_after_resume_equals_uninterrupted(srcs):
    total = 16 * 4 * 2 * 30
    straight = loader(srcs, SCHED4, total=total)
    first = loader(srcs, SCHED4, total=total)
    for step in range(12):
        for micro in range(2):
            first.batch(step, micro)
    resumed = loader(srcs, SCHED4, total=total)
    resumed.load_state_dict(first.state_dict())
    pf = Prefetcher(resumed, 12, 30)
    ref = [[straight.batch(s, m) for m in range(2)] for s in range(30)]
    for step in range(12, 30):
        for micro in range(2):
            same(pf.batch(step, micro), ref[step][micro])
    assert pf.batch(30, 0)[0].shape == (4, 16)  # past the end: served by the loader itself
    pf.close()


def test_document_packing_prefetched(tmp_path):
    rng = np.random.default_rng(3)
    sft = make_source(tmp_path / "sft", 9, with_loss=True, docs={"train": _sft_docs(rng, 120), "val": _sft_docs(rng, 8)})
    kw = dict(schedule=[MixturePoint(0, {"sft": 1})], seq_len=24, packing="document", total=None)
    sync, pre = loader({"sft": sft}, **kw), loader({"sft": sft}, **kw)
    pf = Prefetcher(pre, 0, 50)
    for step in range(50):
        for micro in range(2):
            same(pf.batch(step, micro), sync.batch(step, micro))
    pf.close()


def test_out_of_order_falls_back_and_errors_reach_the_caller(srcs):
    sync, pre = loader(srcs, SCHED4), loader(srcs, SCHED4)
    pf = Prefetcher(pre, 0, 10)
    same(pf.batch(0, 0), sync.batch(0, 0))
    same(pf.batch(3, 1), sync.batch(3, 1))  # not the next one: answered by the loader, prefetching stops
    assert not pf._thread.is_alive()

    class Broken:
        grad_accum = 1

        def prepare(self, step, micro):
            raise ValueError(f"bad shard at step {step}")

    pf = Prefetcher(Broken(), 0, 5)
    with pytest.raises(ValueError, match="bad shard at step 0"):
        pf.batch(0, 0)
    pf.close()


def test_permute_many_equals_one_permute_per_network():
    rng = np.random.default_rng(0)
    ns = [1, 2, 5, 97, 4096, 10_000_019]
    rows = [(n, key, int(rng.integers(0, n))) for n in ns for key in (3, 2**63 + 11)]
    idx = np.array([i for _, _, i in rows], dtype=np.uint64)
    n = np.array([n for n, _, _ in rows], dtype=np.uint64)
    params = np.array([feistel_params(n, k) for n, k, _ in rows], dtype=np.uint64).T.copy()
    want = np.array([permute(np.array([i]), n, k)[0] for n, k, i in rows])
    assert np.array_equal(permute_many(idx, n, params), want)


def test_stream_rows_are_the_shard_windows(srcs):
    """Independently of the strided views: row = tokens[sample * T : sample * T + T + 1] of the shard
    that holds that window."""
    ld = loader(srcs, SCHED4)
    for step in range(6):
        x, y, mask, info = ld.batch(step, 1)
        for r, (name, (_, sample)) in enumerate(zip(info["sources"], info["samples"])):
            src = ld.sources[ld.names.index(name)]
            j = int(np.searchsorted(src.cum, sample, side="right") - 1)
            start = (sample - int(src.cum[j])) * ld.seq_len
            window = np.asarray(src.shards[j].tokens[start : start + ld.seq_len + 1], dtype=np.int64)
            assert np.array_equal(x[r].numpy(), window[:-1]) and np.array_equal(y[r].numpy(), window[1:])
            if mask is not None:
                loss = src.shards[j].loss
                want = np.ones(ld.seq_len, bool) if loss is None else loss[start + 1 : start + ld.seq_len + 1] != 0
                assert np.array_equal(mask[r].numpy(), want)
