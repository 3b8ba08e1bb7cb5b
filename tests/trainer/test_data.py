"""Mixture loader: schedule adherence, determinism, resume, rank disjointness, held-out val, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.manifest import TokenizerInfo
from trainer.data import DataError, MixtureLoader, MixturePoint, SourceSpec, iterate, permute, val_batches
from trainhelp import write_shards

EOS = 0


def tok_info(vocab=1000, name="tiny", vocab_hash="h0"):
    return TokenizerInfo(name=name, vocab_size=vocab, vocab_hash=vocab_hash, eos_id=EOS)


def make_source(d: Path, tag: int, n_tokens=4000, n_shards=2, vocab=1000, val_tokens=600, with_loss=False,
                info=None, docs=None):
    """A shard dir whose train tokens encode (tag, position) so a window tells where it came from:
    token = 1 + (tag*131 + pos) % (vocab//2 - 1) in train, and ids >= vocab//2 in val."""
    info = info or tok_info(vocab)
    half = vocab // 2
    rng = np.random.default_rng(tag)
    shards = {}
    for split, total in (("train", n_tokens), ("val", val_tokens)):
        per = total // n_shards
        for j in range(n_shards):
            if docs is not None:
                picked = docs[split][j::n_shards]
                shards[f"{split}/{j:05d}"] = picked if with_loss else [toks for toks, _ in picked]
                continue
            pos = np.arange(j * per, (j + 1) * per)
            if split == "train":
                toks = 1 + (tag * 131 + pos) % (half - 1)
            else:
                toks = half + (pos % (half - 1))
            cuts = np.sort(rng.choice(np.arange(1, per), size=per // 50, replace=False))
            pieces = np.split(toks, cuts)
            shards[f"{split}/{j:05d}"] = [(p, (p % 2).astype(np.uint8)) for p in pieces] if with_loss else pieces
    return str(write_shards(d, shards, info, with_loss=with_loss))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {n: make_source(root / n, t, n_tokens=6000 + 1000 * t) for t, n in enumerate(["web", "edu", "math"])}


SCHED = [  # (fraction of the run, weights): `loader` places them in its run's tokens
    (0.0, {"web": 0.7, "edu": 0.2, "math": 0.1}),
    (0.6, {"web": 0.2, "edu": 0.5, "math": 0.3}),
    (1.0, {"web": 0.1, "edu": 0.4, "math": 0.5}),
]


def loader(srcs, schedule=SCHED, seq_len=16, mb=4, seed=7, rank=0, world=1, total=16 * 4 * 2 * 300, **kw):
    """schedule: MixturePoints (in tokens) or (fraction, weights) pairs, placed at fraction * total."""
    kw.setdefault("grad_accum", 2)
    specs = [SourceSpec(n, p) for n, p in srcs.items()]
    schedule = [p if isinstance(p, MixturePoint) else MixturePoint(p[0] * total, p[1]) for p in schedule]
    return MixtureLoader(specs, schedule, seq_len, mb, seed, rank, world, total, **kw)


def independent_integral(ld, total_tokens, n_grid=4001):
    """Expected tokens per source from weights_at on a fine grid (trapezoid), not from the loader's closed form."""
    t = np.linspace(0, total_tokens, n_grid)
    w = np.array([[ld.weights_at(x)[n] for n in ld.names] for x in t])
    return {n: float(np.trapezoid(w[:, i], t)) for i, n in enumerate(ld.names)}


def test_realised_proportions_match_schedule(three):
    ld = loader(three)
    steps = 300
    drawn = {n: 0 for n in ld.names}
    for step in range(steps):
        for micro in range(2):
            _, _, mask, info = ld.batch(step, micro)
            assert mask is None
            for n, t in info["tokens_per_source"].items():
                drawn[n] += t
    total = steps * ld.tokens_per_step
    expect = independent_integral(ld, total)
    for n in ld.names:
        assert abs(drawn[n] - expect[n]) / total < 0.01, (n, drawn[n], expect[n])
        # much tighter than 1%: within a few rows of the integral
        assert abs(drawn[n] - expect[n]) <= 4 * ld.seq_len, (n, drawn[n], expect[n])
    # also on a short prefix of the run (first 25 steps)
    prefix = {n: 0 for n in ld.names}
    for step in range(25):
        for micro in range(2):
            for n, t in ld.batch(step, micro)[3]["tokens_per_source"].items():
                prefix[n] += t
    exp = independent_integral(ld, 25 * ld.tokens_per_step, 1001)
    for n in ld.names:
        assert abs(prefix[n] - exp[n]) <= 4 * ld.seq_len


def test_stage_switch_happens_where_configured(three):
    total = 16 * 4 * 200
    sched = [(0, {"web": 1}), (0.4, {"web": 1}), (0.4 + 1e-9, {"math": 1}), (1, {"math": 1})]
    ld = loader(three, schedule=sched, total=total, grad_accum=1)
    seen = [s for step in range(200) for s in ld.batch(step)[3]["sources"]]
    switch = seen.index("math")
    assert switch == pytest.approx(0.4 * len(seen), abs=2)
    assert set(seen[:switch]) == {"web"} and set(seen[switch + 2 :]) == {"math"}
    assert ld.weights_at(0.3 * total) == {"web": 1.0, "edu": 0.0, "math": 0.0}
    assert ld.weights_at(0.5 * total)["math"] == 1.0
    # absolute-token points: the same switch written in tokens
    sched_abs = [MixturePoint(0, {"web": 1}), MixturePoint(0.4 * total, {"web": 1}),
                 MixturePoint(0.4 * total + 1, {"math": 1})]
    ld2 = loader(three, schedule=sched_abs, total=None, grad_accum=1)
    seen2 = [s for step in range(200) for s in ld2.batch(step)[3]["sources"]]
    assert seen2.index("math") == pytest.approx(switch, abs=1)


def test_points_are_taken_in_order_of_tokens(three):
    """One rule for the config and the loader: points in any order are sorted by tokens (stable)."""
    total = 16 * 4 * 2 * 300
    ordered = loader(three, schedule=SCHED, total=total)
    shuffled = loader(three, schedule=[SCHED[2], SCHED[0], SCHED[1]], total=total)
    for step in (0, 77, 299):
        assert ordered.batch(step)[3]["sources"] == shuffled.batch(step)[3]["sources"]
    assert shuffled.weights_at(0.3 * total) == ordered.weights_at(0.3 * total)


def test_batches_and_windows_come_from_the_shards(three):
    ld = loader(three)
    x, y, _, info = ld.batch(3, 1)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    for row, n in zip(torch.cat([x, y[:, -1:]], 1).numpy(), info["sources"]):
        # train tokens are 1 + (tag*131 + pos) % 499 with EOS=0 never written: recover pos and check contiguity
        assert np.all((row >= 1) & (row < 500))
        d = np.diff(row) % 499
        assert np.all(d == 1), (n, row)


def test_determinism_and_exact_resume(three, tmp_path):
    a, b = loader(three), loader(three)
    for step, micro in [(0, 0), (5, 1), (17, 0), (5, 1)]:
        xa, ya, _, ia = a.batch(step, micro)
        xb, yb, _, ib = b.batch(step, micro)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ia["sources"] == ib["sources"]
    assert not torch.equal(a.batch(5, 0)[0], a.batch(5, 1)[0])
    assert not torch.equal(loader(three, seed=8).batch(5, 0)[0], a.batch(5, 0)[0])

    # straight run vs stop/save/restore through torch.save + weights_only load
    straight = [a.batch(s, m)[0] for s in range(10) for m in range(2)]
    c = loader(three)
    first = [c.batch(s, m)[0] for s in range(4) for m in range(2)]
    torch.save(c.state_dict(), tmp_path / "ld.pt")
    sd = torch.load(tmp_path / "ld.pt", weights_only=True)
    assert sd["next_step"] == 4 and sd["next_micro_step"] == 0
    assert sum(sd["cursors"].values()) == 4 * c.rows_per_step
    d = loader(three)
    d.load_state_dict(sd)
    rest = [x for x, _, _ in _take(iterate(d, sd["next_step"]), 12)]
    for u, v in zip(straight, first + rest):
        assert torch.equal(u, v)
    # a changed config is refused, naming the field
    e = loader(three, seed=99)
    with pytest.raises(ValueError, match="seed"):
        e.load_state_dict(sd)
    f = loader(three, schedule=[MixturePoint(0, {"web": 1})])
    with pytest.raises(ValueError, match="cursors"):
        f.load_state_dict(sd)


def _take(gen, n):
    return [next(gen) for _ in range(n)]


def _samples(ld, steps):
    """(source, epoch, window) for every row this loader reads, checked against the row's content."""
    out = []
    for s in range(steps):
        for m in range(ld.grad_accum):
            x, _, _, info = ld.batch(s, m)
            for n, (e, w), r in zip(info["sources"], info["samples"], x.numpy()):
                src = ld.sources[ld.names.index(n)]
                j = int(np.searchsorted(src.cum, w, side="right") - 1)
                start = (w - src.cum[j]) * ld.seq_len
                assert np.array_equal(src.shards[j].tokens[start : start + ld.seq_len], r)
                out.append((n, e, w))
    return out


def test_ranks_disjoint_and_ddp_equals_accumulation(three):
    total = 16 * 4 * 2 * 2 * 40
    r0 = loader(three, rank=0, world=2, total=total, grad_accum=1)
    r1 = loader(three, rank=1, world=2, total=total, grad_accum=1)
    # within one epoch of each source (windows are unique per source) nothing repeats across ranks
    s0, s1 = _samples(r0, 30), _samples(r1, 30)
    assert not set(s0) & set(s1)
    assert len(set(s0)) == len(s0) and len(set(s1)) == len(s1)
    # 2 ranks x 1 micro-step read exactly what 1 rank x 2 micro-steps reads
    one = loader(three, rank=0, world=1, total=total, grad_accum=2)
    for step in range(5):
        a, b = r0.batch(step)[0], r1.batch(step)[0]
        assert torch.equal(torch.cat([a, b]), torch.cat([one.batch(step, 0)[0], one.batch(step, 1)[0]]))


def test_epochs_wrap_with_new_permutation(tmp_path):
    src = {"only": make_source(tmp_path / "only", 3, n_tokens=800, n_shards=1)}
    ld = loader(src, schedule=[MixturePoint(0, {"only": 1})], total=None, grad_accum=1)
    n = ld.sources[0].n  # 799 // 16 = 49 windows
    rows = _samples(ld, 2 * n // 4 + 2)
    assert [r[1] for r in rows[: 2 * n]] == [0] * n + [1] * n
    ep0 = [r[2] for r in rows[:n]]
    ep1 = [r[2] for r in rows[n : 2 * n]]
    assert sorted(ep0) == list(range(n)) and sorted(ep1) == list(range(n)) and ep0 != ep1


def test_permute_is_a_bijection():
    for n in (1, 2, 7, 64, 1000, 4097):
        p = permute(np.arange(n), n, key=5)
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))


def test_val_is_held_out(three):
    ld = loader(three)
    for step in range(120):
        for m in range(2):
            x, y, _, _ = ld.batch(step, m)
            assert int(torch.cat([x, y]).max()) < 500  # val ids are >= 500 in these shards
    vb = val_batches(three["edu"], 16, 4, 3)
    assert len(vb) == 3
    assert all(int(x.min()) >= 500 and m is None for x, _, m in vb)
    again = val_batches(three["edu"], 16, 4, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(vb, again))
    with pytest.raises(DataError, match=r"edu.*split 'val2' not in manifest"):
        val_batches(three["edu"], 16, 4, 1, split="val2")


def _counting_source(d: Path, info: TokenizerInfo, base: int, n=3000):
    pieces = np.array_split(base + np.arange(n), 10)
    return str(write_shards(d, {"train/00000": pieces, "val/00000": pieces}, info))


def test_dtype_from_manifest_uint16_and_uint32(tmp_path):
    s32 = _counting_source(tmp_path / "u32", tok_info(vocab=200000), base=70000)  # ids need 32 bits
    s16 = _counting_source(tmp_path / "u16", tok_info(vocab=60000), base=50000)
    assert json.loads((Path(s32) / "manifest.json").read_text())["dtype"] == "uint32"
    assert json.loads((Path(s16) / "manifest.json").read_text())["dtype"] == "uint16"
    for p, base in ((s16, 50000), (s32, 70000)):
        x, y, _, _ = loader({"a": p}, schedule=[MixturePoint(0, {"a": 1})], total=None).batch(0)
        rows = torch.cat([x, y[:, -1:]], 1).numpy()
        assert np.all(np.diff(rows, axis=1) == 1) and rows.min() >= base and rows.max() < base + 3000
        assert np.all((rows[:, 0] - base) % 16 == 0)  # window starts on the seq_len grid
    # a shard whose metadata disagrees with the manifest's dtype
    meta = Path(s32) / "train/00000.ds.metadata"
    meta.write_text(meta.read_text().replace("|4", "|2", 1))
    with pytest.raises(DataError, match=r"u32.*00000\.ds.*uint32"):
        loader({"a": s32}, schedule=[MixturePoint(0, {"a": 1})], total=None)


def test_errors_name_the_file_or_field(three, tmp_path):
    one = [MixturePoint(0, {"web": 1})]
    with pytest.raises(DataError, match=r"source 'web'.*not found"):
        loader({"web": str(tmp_path / "missing")}, schedule=one, total=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*manifest\.json"):
        loader({"web": str(tmp_path / "empty")}, schedule=one, total=None)
    with pytest.raises(DataError, match=r"schedule\[0\]\.weights: unknown source.*'blog'"):
        loader(three, schedule=[MixturePoint(0, {"blog": 1})])
    with pytest.raises(DataError, match=r"schedule\[1\]\.weights: must sum to > 0"):
        loader(three, schedule=[MixturePoint(0, {"web": 1}), MixturePoint(1, {"web": 0})])
    with pytest.raises(DataError, match=r"split 'test' not in manifest"):
        loader(three, split="test")
    with pytest.raises(DataError, match=r"tokenizer\.vocab_size 1000 exceeds.*512"):
        loader(three, vocab_size=512)
    # tokenizer mismatch between sources
    other = make_source(tmp_path / "other", 4, info=tok_info(vocab_hash="different"))
    with pytest.raises(DataError, match=r"source 'b'.*other/manifest\.json.*differs from source 'a'"):
        loader({"a": three["web"], "b": other}, schedule=[MixturePoint(0, {"a": 1, "b": 1})], total=None)
    # corrupted shard: truncated token file, and an index that does not match
    bad = make_source(tmp_path / "bad", 5)
    f = Path(bad) / "train/00001.ds"
    f.write_bytes(f.read_bytes()[:-6])
    with pytest.raises(DataError, match=r"source 'a'.*00001\.ds"):
        loader({"a": bad}, schedule=[MixturePoint(0, {"a": 1})], total=None)
    bad2 = make_source(tmp_path / "bad2", 6)
    idx = Path(bad2) / "train/00000.ds.index"
    ends = np.fromfile(idx, dtype="<u8")
    ends[3] = ends[5]
    ends.tofile(idx)
    with pytest.raises(DataError, match=r"source 'a'.*00000\.ds\.index"):
        loader({"a": bad2}, schedule=[MixturePoint(0, {"a": 1})], total=None)
    # ids beyond the vocabulary, found by the optional scan
    big = make_source(tmp_path / "big", 7, info=tok_info(vocab=1000))
    toks = np.fromfile(Path(big) / "train/00000.ds", dtype="<u2")
    ld = loader({"a": big}, schedule=[MixturePoint(0, {"a": 1})], total=None)
    ld.validate(scan_ids=True)
    ld.sources[0].shards[0] = ld.sources[0].shards[0].__class__(
        ld.sources[0].shards[0].path, np.concatenate([toks, [1500]]).astype("<u2"),
        ld.sources[0].shards[0].offsets, None)
    with pytest.raises(DataError, match=r"big/train/00000\.ds holds id 1500 >= vocab_size 1000"):
        ld.validate(scan_ids=True)
    with pytest.raises(DataError, match="packing"):
        loader(three, packing="ragged")


def _sft_docs(rng, n, vocab=1000):
    docs = []
    for _ in range(n):
        L = int(rng.integers(5, 40))
        toks = rng.integers(1, vocab, L)
        mask = np.zeros(L, np.uint8)
        a = int(rng.integers(1, L))
        mask[a:] = 1  # an "assistant" suffix
        docs.append((toks, mask))
    return docs


def test_sft_mask_alignment_stream_and_document(tmp_path):
    rng = np.random.default_rng(0)
    docs = {"train": _sft_docs(rng, 80), "val": _sft_docs(rng, 10)}
    src = {"chat": make_source(tmp_path / "chat", 0, with_loss=True, docs=docs)}
    sched = [MixturePoint(0, {"chat": 1})]
    # stream packing: the mask returned is the stored mask of the y positions
    ld = loader(src, schedule=sched, total=None, seq_len=24)
    streams = [(np.concatenate([d[0] for d in docs["train"][j::2]]),
                np.concatenate([d[1] for d in docs["train"][j::2]])) for j in (0, 1)]
    checked = 0
    for step in range(3):
        x, y, m, _ = ld.batch(step, 0)
        assert m is not None and m.dtype == torch.bool and m.shape == y.shape
        for xr, yr, mr in zip(x.numpy(), y.numpy(), m.numpy()):
            for stream, smask in streams:
                for s in range(0, len(stream) - 24, 24):  # windows sit on the seq_len grid
                    if np.array_equal(stream[s : s + 24], xr):
                        assert np.array_equal(stream[s + 1 : s + 25], yr)
                        assert np.array_equal(smask[s + 1 : s + 25].astype(bool), mr)
                        checked += 1
    assert checked >= 12
    # document packing: one conversation per row, EOS padding without loss
    dl = loader(src, schedule=sched, total=None, seq_len=48, packing="document")
    by_first = {tuple(d[0][:4]): d for d in docs["train"]}
    x, y, m, _ = dl.batch(2, 1)
    for xr, yr, mr in zip(x.numpy(), y.numpy(), m.numpy()):
        toks, mask = by_first[tuple(xr[:4])]
        L = len(toks)
        assert np.array_equal(xr[:L], toks) and np.all(xr[L:] == EOS)
        assert np.array_equal(yr[: L - 1], toks[1:]) and np.all(yr[L - 1 :] == EOS)
        assert np.array_equal(mr[: L - 1], mask[1:].astype(bool)) and not mr[L - 1 :].any()
    # iterate() turns masked targets into -1
    _, yi, _ = next(iterate(dl, 2))
    assert int((yi == -1).sum()) == int((~dl.batch(2, 0)[2]).sum())


@pytest.mark.parametrize("packing", ["stream", "document", "bestfit"])
def test_an_id_edited_in_after_the_manifest_is_named_by_the_loader(tmp_path, packing):
    # validate() trusts each manifest's max ids; a shard edited afterwards is caught on the rows
    # themselves, naming the step, the source and the window or document.
    rng = np.random.default_rng(0)
    docs = {"train": _sft_docs(rng, 40), "val": _sft_docs(rng, 6)}
    src = {"chat": make_source(tmp_path / "chat", 0, with_loss=True, docs=docs)}
    for f in (tmp_path / "chat" / "train").glob("*.ds"):
        toks = np.fromfile(f, dtype="<u2")
        toks[:] = 1001  # every id of every shard: whatever rows step 0 reads
        toks.tofile(f)
    sched = [MixturePoint(0, {"chat": 1})]
    ld = loader(src, schedule=sched, total=None, seq_len=48, packing=packing, vocab_size=1000)
    unit = {"stream": "window", "document": "document", "bestfit": "row"}[packing]
    with pytest.raises(DataError, match=rf"step 1: source 'chat' \(.*chat\) {unit} \d+ \(epoch 0\) holds token id 1001 "
                                        r">= the model's vocab_size 1000.*shards verify"):
        ld.batch(0, 0)
