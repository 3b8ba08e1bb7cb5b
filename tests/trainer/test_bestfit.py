"""Best-fit packing (`data.packing: bestfit`, trainer/packing.py): rows start at document boundaries
(BOS), fit in seq_len+1, hold every document token or count it as cropped, pad without loss; the
mixture draws the same rows per source as stream packing; exact resume; DDP = grad accumulation."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from shards.manifest import TokenizerInfo
from trainer.data import DataError, MixtureLoader, MixturePoint, SourceSpec, iterate, open_source, val_batches
from trainer.packing import bestfit_plan
from trainhelp import make_source as tiny_source
from trainhelp import tiny_curriculum, train, write_shards

EOS, BOS, VOCAB, SEQ = 0, 1, 1000, 31  # rows of L = 32 tokens
L = SEQ + 1
INFO = TokenizerInfo(name="tiny-bos", vocab_size=VOCAB, vocab_hash="hb", eos_id=EOS, bos_id=BOS, add_bos=True)


def documents(seed: int, n: int, with_loss: bool = False):
    """BOS + body + EOS, lengths 3..80 (some longer than a row: those get cropped); bodies never hold
    BOS or EOS, so a BOS in a row is a document start."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        body = rng.integers(2, VOCAB, rng.integers(1, 79))
        doc = np.concatenate([[BOS], body, [EOS]])
        out.append((doc, (doc % 3 != 0).astype(np.uint8)) if with_loss else doc)
    return out


def make_bos_source(d, seed: int, docs=(300, 250), val=40, with_loss=False):
    shards = {f"train/{j:05d}": documents(seed * 10 + j, n, with_loss) for j, n in enumerate(docs)}
    shards["val/00000"] = documents(seed * 10 + 9, val, with_loss)
    return str(write_shards(d, shards, INFO, with_loss=with_loss))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("bestfit")
    return {"web": make_bos_source(root / "web", 1), "code": make_bos_source(root / "code", 2, docs=(200,))}


SCHED = [(0.0, {"web": 0.8, "code": 0.2}), (1.0, {"web": 0.3, "code": 0.7})]


def loader(srcs, packing="bestfit", mb=4, accum=2, world=1, rank=0, total=L * 4 * 2 * 200, sched=SCHED, **kw):
    specs = [SourceSpec(n, p) for n, p in srcs.items()]
    schedule = [MixturePoint(f * total, w) for f, w in sched]
    return MixtureLoader(specs, schedule, SEQ, mb, 7, rank, world, total, grad_accum=accum, packing=packing,
                         vocab_size=VOCAB, **kw)


def reference_rows(src):
    """Every plan row rebuilt in plain Python from the shard's documents: (tokens, used length)."""
    rows = []
    for shard, (order, ptr) in zip(src.shards, src.plans):
        for r in range(len(ptr) - 1):
            toks = np.concatenate([shard.document(int(d))[:L] for d in order[ptr[r]:ptr[r + 1]]])
            rows.append(toks)
    return rows


def test_plan_is_a_best_fit_partition():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 5000)
    order, ptr = bestfit_plan(lengths, 129, lookahead=64)
    assert sorted(order.tolist()) == list(range(len(lengths)))  # each document in exactly one row
    take = np.minimum(lengths, 129)[order.astype(np.int64)]
    used = np.add.reduceat(take, ptr[:-1])
    assert (np.diff(ptr) >= 1).all() and (used <= 129).all()
    assert 1 - used.sum() / (129 * (len(ptr) - 1)) < 0.02  # best fit leaves little padding
    again = bestfit_plan(lengths, 129, lookahead=64)
    assert np.array_equal(order, again[0]) and np.array_equal(ptr, again[1])  # a function of the data


def test_rows_start_at_boundaries_and_account_for_every_token(two):
    src = open_source("web", two["web"], "train", None, SEQ, "bestfit")
    rows, mask = src.gather(np.arange(src.n, dtype=np.int64), EOS)
    assert rows.shape == (src.n, L)  # no row exceeds seq_len+1
    assert (rows[:, 0] == BOS).all()  # every row starts a document (its BOS)
    ref = reference_rows(src)
    for row, m, want in zip(rows, mask, ref):
        assert np.array_equal(row[: len(want)], want) and m[: len(want)].all()
        assert (row[len(want):] == EOS).all() and not m[len(want):].any()  # padding: EOS, no loss
    lengths = np.concatenate([np.diff(s.offsets.astype(np.int64)) for s in src.shards])
    st = src.pack_stats
    held = int(mask.sum())
    assert st.cropped == int(np.maximum(lengths - L, 0).sum()) > 0  # some documents are longer than a row
    assert held + st.cropped == st.tokens == int(lengths.sum())  # each token in a row or counted cropped
    assert st.padded == src.n * L - held == int((~mask).sum())
    assert st.documents == len(lengths) == int((rows == BOS).sum())  # each document starts once


def test_batches_mask_padding_and_keep_loss_masks(two, tmp_path):
    ld = loader(two)
    for step in range(5):
        for micro in range(2):
            x, y, mask, info = ld.batch(step, micro)
            assert x.shape == (4, SEQ) and mask is not None
            assert (x[:, 0] == BOS).all()
            assert (y[~mask] == EOS).all()  # targets in the padding carry no loss
            assert set(info["sources"]) <= {"web", "code"}
    masked = make_bos_source(tmp_path / "sft", 3, docs=(120,), with_loss=True)
    src = open_source("sft", masked, "train", None, SEQ, "bestfit")
    rows, mask = src.gather(np.arange(src.n, dtype=np.int64), EOS)
    ref = reference_rows(src)
    loss = np.asarray(src.shards[0].loss)
    docs = src.shards[0].offsets
    for r, (row, m) in enumerate(zip(rows, mask)):  # mask = the shard's loss mask on real tokens
        d_list = src.plans[0][0][src.plans[0][1][r]:src.plans[0][1][r + 1]]
        want = np.concatenate([loss[docs[d]:docs[d + 1]][:L] != 0 for d in d_list.astype(np.int64)])
        assert np.array_equal(m[: len(ref[r])], want) and not m[len(ref[r]):].any()


def test_mixture_draws_the_same_rows_per_source_as_stream(two):
    best, stream = loader(two), loader(two, packing="stream")
    counts = {"web": 0, "code": 0}
    for step in range(40):
        for micro in range(2):
            a, b = best.batch(step, micro)[3], stream.batch(step, micro)[3]
            assert a["sources"] == b["sources"] and a["tokens_per_source"] == b["tokens_per_source"]
            for s in a["sources"]:
                counts[s] += 1
    assert best.cursors(40 * 8) == stream.cursors(40 * 8) == counts


def test_one_epoch_reads_every_row_once(two):
    ld = loader({"code": two["code"]}, mb=2, accum=1, sched=[(0.0, {"code": 1.0})])
    n = ld.sources[0].n
    seen = [s for step in range(n // 2) for s in ld.batch(step)[3]["samples"]]
    assert sorted(k for e, k in seen if e == 0) == list(range(n))


def test_resume_mid_step_gives_the_same_batches(two):
    ref = loader(two)
    want = [ref.batch(step, micro) for step in range(8) for micro in range(2)]
    first = loader(two)
    for step in range(3):
        for micro in range(2):
            first.batch(step, micro)
    first.batch(3, 0)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = loader(two)
    resumed.load_state_dict(state)
    got = [resumed.batch(3, 1)] + [resumed.batch(step, micro) for step in range(4, 8) for micro in range(2)]
    for (x, y, m, _), (x2, y2, m2, _) in zip(want[7:], got):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(m, m2)


def test_resume_at_another_world_size(two):
    one = loader(two, accum=4)
    for step in range(3):
        for micro in range(4):
            one.batch(step, micro)
    state = one.state_dict()
    for rank in range(2):  # the same tokens per step on two ranks: each takes its half from step 3 on
        r = loader(two, accum=2, world=2, rank=rank)
        r.load_state_dict(state)
        for micro in range(2):
            x = r.batch(3, micro)[0]
            assert torch.equal(x, one.prepare(3, 2 * micro + rank)[0])


def test_ddp_world_2_equals_grad_accumulation(two):
    single = loader(two, accum=4)
    ranks = [loader(two, accum=2, world=2, rank=r) for r in range(2)]
    for step in range(6):
        for micro in range(2):
            for rank, ld in enumerate(ranks):  # global row ((step*A + micro)*W + rank)*B: micro-step 2*micro+rank
                x, y, m, _ = ld.batch(step, micro)
                x1, y1, m1, _ = single.batch(step, 2 * micro + rank)
                assert torch.equal(x, x1) and torch.equal(y, y1) and torch.equal(m, m1)


def test_stats_val_and_generator(two):
    ld = loader(two)
    stats = ld.packing_stats()
    assert set(stats) == {"web", "code"} and all(s.rows == src.n for s, src in zip(stats.values(), ld.sources))
    assert loader(two, packing="stream").packing_stats() == {}
    batches = val_batches(two["web"], SEQ, 4, 3, packing="bestfit")
    assert len(batches) == 3 and all((x[:, 0] == BOS).all() and m is not None for x, _, m in batches)
    _, y, _ = next(iterate(ld))
    assert (y == -1).any()  # padding targets are ignored (ignore_index=-1)


def test_unknown_packing_names_the_choices(two):
    with pytest.raises(DataError, match=re.escape("expected stream | document | bestfit, got 'best-fit'")):
        loader(two, packing="best-fit")


def test_dry_run_budget_shows_crop_and_pad(tmp_path, capsys):
    a, b = tiny_source(tmp_path / "src" / "a", 1), tiny_source(tmp_path / "src" / "b", 2)
    data = {"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}], "packing": "bestfit",
            "schedule": [{"at": 0.0, "weights": {"a": 0.5, "b": 0.5}}]}
    path = tiny_curriculum(tmp_path, data=data, train={"steps": 4, "seed": 7, "dtype": "fp32"})
    rc, out, _ = train([str(path), "--dry-run", "--json"], capsys)
    assert rc == 0
    got = {s["name"]: s for s in json.loads(out.strip().splitlines()[-1])["sources"]}
    for name, d in (("a", a), ("b", b)):
        st = open_source(name, str(d), "train", None, 32, "bestfit").pack_stats
        assert (got[name]["cropped"], got[name]["padded"]) == (st.cropped, st.padded)
        assert got[name]["epochs"] == got[name]["tokens_planned"] / 32 / st.rows
