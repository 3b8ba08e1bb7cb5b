"""The `.ds` shard format, manifests, reader, and `python -m shards inspect|verify`; read back by
datatrove's own merger and dataset classes."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, real_texts
from shards.__main__ import main
from shards.check import verify_dir
from shards.format import ShardWriter, dtype_for_vocab, open_shard, read_metadata
from shards.manifest import TokenizerInfo, build_manifest, find_shards, read_manifest, write_manifest
from shards.reader import open_split
from trainhelp import write_shards


def random_docs(rng, n, vocab, max_len=50):
    docs = [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]
    docs[0][0] = vocab - 1  # the largest id must survive the dtype
    return docs


def info(vocab, name="synthetic"):
    return TokenizerInfo(name=name, vocab_size=vocab, vocab_hash="0" * 64, eos_id=0)


def make_dir(root, vocab=65537, with_loss=False, seed=0, name="synthetic"):
    """train/00000, train/00001, val/00000 + manifest. Returns (dir, {rel: [docs]}, {rel: [masks]})."""
    rng = np.random.default_rng(seed)
    written, masks, shards = {}, {}, {}
    for rel, n in (("train/00000", 30), ("train/00001", 20), ("val/00000", 5)):
        docs = random_docs(rng, n, vocab)
        ms = [rng.integers(0, 2, size=len(d)).astype(np.uint8) for d in docs] if with_loss else [None] * n
        shards[rel] = list(zip(docs, ms)) if with_loss else docs
        written[rel + ".ds"], masks[rel + ".ds"] = docs, ms
    write_shards(root, shards, info(vocab, name), with_loss=with_loss, source="test", seeds={"split_seed": 1337})
    return root, written, masks


# ---------------------------------------------------------------------------------------- format


def test_dtype_rule():
    assert dtype_for_vocab(256) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16  # ids 0..65535 fit in 16 bits
    assert dtype_for_vocab(65537) == np.uint32
    assert dtype_for_vocab(151669) == np.uint32
    with pytest.raises(ValueError):
        dtype_for_vocab(0)


@pytest.mark.parametrize("vocab,itemsize", [(65536, 2), (65537, 4)])
@pytest.mark.parametrize("with_loss", [False, True])
def test_round_trip(tmp_path, vocab, itemsize, with_loss):
    root, written, masks = make_dir(tmp_path, vocab, with_loss)
    for rel, docs in written.items():
        shard = open_shard(root / rel)
        assert shard.tokens.dtype.itemsize == itemsize
        assert shard.documents == len(docs)
        for i, d in enumerate(docs):
            np.testing.assert_array_equal(shard.document(i), d)
            if with_loss:
                np.testing.assert_array_equal(shard.loss[shard.offsets[i] : shard.offsets[i + 1]], masks[rel][i])
        assert (shard.loss is not None) == with_loss
        # The bytes on disk are exactly datatrove's layout.
        raw = (root / rel).read_bytes()
        assert raw == np.concatenate(docs).astype(f"<u{itemsize}").tobytes()
        ends = np.fromfile(str(root / rel) + ".index", dtype="<u8")
        np.testing.assert_array_equal(ends, np.cumsum([len(d) for d in docs]))
        meta = (root / (rel + ".metadata")).read_text().splitlines()
        assert meta[0] == f"synthetic|{itemsize}" and int(meta[1]) == sum(len(d) for d in docs)
    reader = open_split(root, "train")
    assert reader.dtype == dtype_for_vocab(vocab) and reader.has_loss_mask == with_loss
    want = written["train/00000.ds"] + written["train/00001.ds"]
    got = list(reader.documents_iter())
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_writer_rejects_bad_documents(tmp_path):
    with ShardWriter(tmp_path / "a", np.uint16, "t") as w:
        with pytest.raises(ValueError, match="out of range"):
            w.write([1, 65536])
        with pytest.raises(ValueError, match="non-empty"):
            w.write([])
        with pytest.raises(ValueError, match="with_loss=False"):
            w.write([1, 2], loss_mask=[1, 1])
        w.write([1, 2])
    with ShardWriter(tmp_path / "b", np.uint32, "t", with_loss=True) as w:
        with pytest.raises(ValueError, match="mask"):
            w.write([1, 2, 3], loss_mask=[1, 0])
        w.write([1, 2, 3], loss_mask=[1, 0, 1])
    assert open_shard(tmp_path / "a.ds").documents == 1 and open_shard(tmp_path / "b.ds").documents == 1


def test_abort_and_partial_writes_leave_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "train" / "00000", np.uint32, "t", with_loss=True) as w:
            w.write([1, 2, 3], loss_mask=[1, 1, 1])
            raise RuntimeError("killed mid-shard")
    assert list((tmp_path / "train").iterdir()) == []  # neither finished files nor .tmp leftovers
    # A crash (no close, no abort) leaves only .tmp files: never counted as a shard.
    w = ShardWriter(tmp_path / "train" / "00001", np.uint32, "t")
    w.write([5, 6])
    w._tokens.flush()
    assert all(p.name.endswith(".tmp") for p in (tmp_path / "train").iterdir())
    assert find_shards(tmp_path, "train") == []
    m = build_manifest(tmp_path, info(65537), splits=("train",))
    assert m.splits["train"].documents == 0 and m.files == {}
    write_manifest(tmp_path, m)
    rep = verify_dir(tmp_path)
    assert not rep.ok and all("partial write" in p[0] for p in rep.problems.values())
    assert set(rep.problems) == {"train/00001.ds.tmp", "train/00001.ds.index.tmp"}
    w.abort()


def test_manifest_round_trip_and_determinism(tmp_path):
    root, written, _ = make_dir(tmp_path / "a", with_loss=True)
    m = read_manifest(root)
    assert m == build_manifest(root, info(65537), source="test", seeds={"split_seed": 1337})
    assert m.dtype == "uint32" and m.tokenizer == info(65537)
    assert m.splits["train"].documents == 50 and m.splits["val"].documents == 5
    total = sum(len(d) for d in written["val/00000.ds"])
    assert m.splits["val"].tokens == total and m.splits["val"].shards[0].name == "val/00000.ds"
    assert m.splits["val"].shards[0].loss_tokens == int(np.count_nonzero(open_shard(root / "val/00000.ds").loss))
    assert len(m.files) == 3 * 4
    for rel, entry in m.files.items():
        data = (root / rel).read_bytes()
        assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    # Same input and seed -> byte-identical shards and manifest.
    root2, _, _ = make_dir(tmp_path / "b", with_loss=True)
    for f in sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()):
        assert (root / f).read_bytes() == (root2 / f).read_bytes(), f


# --------------------------------------------------------------------------------- datatrove


def test_datatrove_merger_reads_our_shards(tmp_path):
    """datatrove's DocumentTokenizerMerger (token size from our .metadata, documents from our
    .index, masks from our .loss) reproduces our tokens; our reader reads its output back."""
    from datatrove.pipeline.tokens.merger import DocumentTokenizerMerger

    root, written, masks = make_dir(tmp_path / "ours", vocab=151669, with_loss=True, name="qwen3")
    out = tmp_path / "merged"
    DocumentTokenizerMerger(str(root / "train"), str(out), "all", shuffle=False, save_loss_metadata=True,
                            progress=False).run()
    merged = open_shard(out / "000_all.ds")
    docs = written["train/00000.ds"] + written["train/00001.ds"]
    assert read_metadata(out / "000_all.ds").token_size == 4 and merged.documents == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(merged.document(i), d)
    np.testing.assert_array_equal(np.asarray(merged.loss), np.concatenate(masks["train/00000.ds"] + masks["train/00001.ds"]))


def test_datatrove_folder_dataset_reads_our_shards(tmp_path):
    torch = pytest.importorskip("torch")
    from datatrove.utils.dataset import DatatroveFolderDataset

    root, written, _ = make_dir(tmp_path, vocab=65536)
    seq = 16
    ds = DatatroveFolderDataset(str(root / "train"), seq_len=seq, token_size=2, return_positions=True)
    files = [written["train/00000.ds"], written["train/00001.ds"]]
    assert len(ds) == sum(sum(map(len, docs)) // (seq + 1) for docs in files)
    i = 0
    for docs in files:
        tokens = np.concatenate(docs)
        starts = np.cumsum([0] + [len(d) for d in docs])[:-1]
        for j in range(len(tokens) // (seq + 1)):
            g = np.arange(j * (seq + 1), (j + 1) * (seq + 1))
            item = ds[i]
            assert torch.equal(item["input_ids"], torch.as_tensor(tokens[g].astype(np.int64)))
            # positions come from our .ds.index: offset within the document, restarted per window
            doc_start = starts[np.searchsorted(starts, g, side="right") - 1]
            np.testing.assert_array_equal(item["positions"].numpy(), g - np.maximum(doc_start, g[0]))
            i += 1


# ---------------------------------------------------------------------------- inspect / verify


def run_cli(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def test_verify_ok_and_json(tmp_path, capsys):
    root, _, _ = make_dir(tmp_path, with_loss=True)
    rc, out = run_cli(capsys, "verify", str(root))
    assert rc == 0 and out.startswith("OK") and "3 shards" in out and "12 checksums verified" in out
    rc, out = run_cli(capsys, "verify", str(root), "--json")
    d = json.loads(out)
    assert rc == 0 and d["ok"] and d["documents"] == 55 and d["problems"] == {}


def corrupt(root, how):
    ds = root / "train/00001.ds"
    if how == "truncated_odd":
        ds.write_bytes(ds.read_bytes()[:-2])
    elif how == "truncated_token":
        ds.write_bytes(ds.read_bytes()[:-4])
    elif how == "index":
        ends = np.fromfile(str(ds) + ".index", dtype="<u8")
        ends[[3, 4]] = ends[[4, 3]]
        ends.tofile(str(ds) + ".index")
    elif how == "tamper":
        b = bytearray(ds.read_bytes())
        b[8] ^= 0x01  # low bit of token 2: still a valid id below the vocab size: only the checksum can tell
        ds.write_bytes(bytes(b))
    elif how == "missing":
        (root / "train/00001.ds.index").unlink()
    elif how == "extra":
        shutil.copy(ds, root / "val/00009.ds")
    elif how == "tmp":
        (root / "train/00002.ds.tmp").write_bytes(b"\0\0")
    elif how == "metadata":
        (root / "train/00001.ds.metadata").write_text("synthetic|2\n10\n10")
    elif how == "loss":
        loss = root / "train/00001.ds.loss"
        loss.write_bytes(loss.read_bytes()[:-1])
    return "train/00001.ds"


@pytest.mark.parametrize("how,file,needle", [
    ("truncated_odd", "train/00001.ds", "not a multiple of 4"),
    ("truncated_token", "train/00001.ds.index", "last offset"),
    ("index", "train/00001.ds.index", "not strictly increasing at document 4"),
    ("tamper", "train/00001.ds", "sha256"),
    ("missing", "train/00001.ds.index", "missing"),
    ("extra", "val/00009.ds", "not in the manifest"),
    ("tmp", "train/00002.ds.tmp", "partial write"),
    ("metadata", "train/00001.ds.metadata", "token_size 2 (uint16) but manifest dtype is uint32"),
    ("loss", "train/00001.ds.loss", "mask bytes"),
])
def test_verify_detects(tmp_path, capsys, how, file, needle):
    root, _, _ = make_dir(tmp_path, with_loss=True)
    corrupt(root, how)
    rc, out = run_cli(capsys, "verify", str(root))
    assert rc == 1 and out.startswith("FAILED"), out
    problems = json.loads(run_cli(capsys, "verify", str(root), "--json")[1])["problems"]
    assert any(needle in p for p in problems.get(file, [])), problems
    if how == "tamper":  # without checksums the flipped byte goes unnoticed: the hash is the guard
        assert run_cli(capsys, "verify", str(root), "--no-checksums")[0] == 0


def test_open_and_verify_share_the_layout_rules(tmp_path):
    """format.check_layout is the one rule: what verify lists, open_shard raises (an empty index under
    tokens was accepted by open_shard and reported by verify)."""
    root, _, _ = make_dir(tmp_path / "d", vocab=1000)
    index = root / "train" / "00001.ds.index"
    index.write_bytes(b"")
    rep = verify_dir(root, checksums=False)
    assert any("empty index for" in p for p in rep.problems["train/00001.ds.index"]), rep.problems
    with pytest.raises(ValueError, match=r"00001\.ds\.index: index inconsistent with \d+ tokens in 00001\.ds: empty index"):
        open_shard(root / "train" / "00001.ds")


def test_verify_detects_id_out_of_vocab(tmp_path, capsys):
    vocab = 151669
    write_shards(tmp_path, {"train/00000": [[1, 2, 3], [4, vocab + 5, 6]]},  # fits uint32, but not the vocabulary
                 info(vocab, "t"), splits=("train",))
    rc, out = run_cli(capsys, "verify", str(tmp_path))
    assert rc == 1 and f"token id {vocab + 5} >= vocab size {vocab} (first at position 4)" in out


def test_verify_without_manifest(tmp_path, capsys):
    rc, out = run_cli(capsys, "verify", str(tmp_path))
    assert rc == 1 and "manifest.json" in out


def test_inspect_decodes_first_document(tmp_path, capsys):
    from shards.tokenizers import get_tokenizer

    tok = get_tokenizer("qwen3")
    texts = real_texts(12)
    write_shards(tmp_path, {f"{split}/00000": tok.encode_documents(chunk) for split, chunk in (("train", texts[:10]), ("val", texts[10:]))},
                 tok.info(), source="pydoc")
    rc, out = run_cli(capsys, "inspect", str(tmp_path), "--max-chars", "100000")
    assert rc == 0 and "qwen3" in out and "uint32" in out
    assert texts[0] + "<|endoftext|>" in out  # decoded, followed by EOS
    rc, out = run_cli(capsys, "inspect", str(tmp_path), "--json")
    s = json.loads(out)
    n_tokens = [len(tok.encode_document(t)) for t in texts]
    assert s["splits"]["train"]["documents"] == 10 and s["splits"]["train"]["tokens"] == sum(n_tokens[:10])
    assert s["splits"]["val"]["mean_doc_tokens"] == round(sum(n_tokens[10:]) / 2, 1)
    assert s["first_document"]["tokens"] == n_tokens[0] and s["first_document"]["note"] == ""


def test_inspect_degrades_to_ids(tmp_path, capsys):
    root, written, _ = make_dir(tmp_path, name="mystery-tokenizer")
    rc, out = run_cli(capsys, "inspect", str(root))
    assert rc == 0 and "unavailable" in out and str(written["train/00000.ds"][0][:3].tolist())[:-1] in out
    (root / "manifest.json").unlink()  # a foreign/unfinished dir: summarised from shard metadata
    rc, out = run_cli(capsys, "inspect", str(root), "--json")
    s = json.loads(out)
    assert rc == 0 and not s["manifest"] and s["splits"]["train"]["documents"] == 50
    assert s["splits"]["train"]["tokenizer"] == "mystery-tokenizer"


def test_cli_help_without_arguments():
    r = subprocess.run([sys.executable, "-m", "shards"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "inspect" in r.stdout and "verify" in r.stdout
