"""One val across sources: the default split key is the normalised text, so a page two corpora carry
under different ids (fineweb-edu's `id`, Ultra-FineWeb's `uid`) is in the same split in both; the
manifest records the rule and sources split differently are refused in one line. `shards overlap`
counts shared pages exactly and nearly (raw folders and shard sources agree), and the cross-source
dedup removes copies (first mode) or train copies of any val page (val mode), counted in manifests."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from datatrove.data import Document

from pipelines import cross_dedup
from pipelines.fineweb_edu import CORPUS as EDU
from pipelines.cli import main as cli_main
from pipelines.steps import HashSplit
from pipelines.ultra_fineweb import CORPUS as ULTRA
from shards.__main__ import main as shards_main
from shards.manifest import Manifest, decontaminated_tasks, read_manifest, split_conflict
from shards.reader import open_split
from shards.text import normalize_text, text_split, words
from shards.tokenizers import get_tokenizer
from trainhelp import paragraphs

VAL = 0.3
SHARED, NEAR, OWN = 60, 30, 80


def long_docs(n: int) -> list[str]:
    """n distinct documents of real prose, 150+ words each (consecutive paragraphs joined)."""
    prose = [p for p in paragraphs() if len(p.split()) >= 20 and len(words(p)) >= 0.9 * len(p.split())]
    docs, cur = [], []
    for p in prose:
        cur.append(p)
        if sum(len(x.split()) for x in cur) >= 150:
            docs.append("\n\n".join(cur))
            cur = []
    assert len(docs) >= n, len(docs)
    return docs[:n]


def near_copy(text: str, rng: random.Random) -> str:
    """One word replaced (as a re-crawl or a boilerplate edit would), and the copy's own whitespace."""
    w = text.split(" ")
    i = rng.randrange(len(w) // 3, 2 * len(w) // 3)
    w[i] = "changed"
    return " ".join(w)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """fineweb-edu-shaped A (text, id) and Ultra-FineWeb-shaped B (content, uid, meta) with SHARED pages
    in both (B's with other whitespace), NEAR near copies, and OWN pages each."""
    root = tmp_path_factory.mktemp("two")
    docs = long_docs(SHARED + NEAR + 2 * OWN)
    shared, near, own_a, own_b = (docs[:SHARED], docs[SHARED : SHARED + NEAR],
                                  docs[SHARED + NEAR : SHARED + NEAR + OWN], docs[SHARED + NEAR + OWN :])
    rng = random.Random(0)
    near_b = [near_copy(t, rng) for t in near]
    a = [{"text": t, "id": f"<urn:uuid:a-{i}>"} for i, t in enumerate(shared + near + own_a)]
    b = [{"content": t.replace("\n\n", "\n \n") + "\n", "uid": f"ufw-{i}", "meta": json.dumps({"url": f"https://b/{i}"})}
         for i, t in enumerate(shared + near_b + own_b)]
    for name, rows in (("a", a), ("b", b)):
        (root / name).mkdir()
        (root / name / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for corpus, name in ((EDU, "a"), (ULTRA, "b")):
        assert cli_main(corpus, ["tokenize", "--input", str(root / name), "--output", str(root / f"shards-{name}"),
                                 "--tokenizer", "cl100k", "--val-fraction", str(VAL), "--workers", "1"]) == 0
    return {"root": root, "a": a, "b": b, "shared": shared, "near": list(zip(near, near_b))}


def decoded(d: Path) -> dict[str, set[str]]:
    tok = get_tokenizer("cl100k")
    return {s: {normalize_text(tok.decode(doc[:-1].tolist())) for doc in open_split(d, s).documents_iter()}
            for s in ("train", "val")}


def test_shared_pages_never_cross_the_split_between_sources_with_different_ids(corpora):
    root = corpora["root"]
    a, b = decoded(root / "shards-a"), decoded(root / "shards-b")
    shared = {normalize_text(t) for t in corpora["shared"]}
    assert shared <= a["train"] | a["val"] and shared <= b["train"] | b["val"]
    assert not (a["val"] & b["train"]) and not (b["val"] & a["train"])
    assert shared & a["val"] and shared & a["val"] == shared & b["val"]  # some shared pages are val, in both
    # the old rule (each corpus's own id) puts some of the same pages in val in one and train in the other
    by_id = {}
    for name, rows, tk, ik in (("a", corpora["a"], "text", "id"), ("b", corpora["b"], "content", "uid")):
        docs = [Document(text=r[tk], id=r[ik]) for r in rows]
        by_id[name] = {normalize_text(d.text): d.metadata["split"] for d in HashSplit(VAL, 1337, key="id")(iter(docs))}
    assert sum(by_id["a"][t] != by_id["b"][t] for t in shared) > 0
    for name in ("a", "b"):
        m = read_manifest(root / f"shards-{name}")
        assert m.extra["split_key"] == "text" and "NFC" in m.extra["split_normalization"]
        assert m.seeds == {"split_seed": 1337, "val_fraction": VAL}
    sources = [(n, read_manifest(root / f"shards-{n}")) for n in ("a", "b")]
    assert split_conflict(sources) is None


def manifest(extra: dict, seeds: dict) -> Manifest:
    return Manifest.from_dict({"tokenizer": {"name": "t", "vocab_size": 10, "vocab_hash": "h", "eos_id": 1},
                               "dtype": "uint16", "splits": {}, "files": {}, "extra": extra, "seeds": seeds})


def test_sources_split_by_different_rules_are_refused_in_one_line(tmp_path):
    new = {"split_key": "text", "split_normalization": "NFC"}
    seeds = {"split_seed": 1337, "val_fraction": 0.001}
    cases = {
        "key": (manifest({"split_key": "id"}, seeds), ["split key text", "split key id"]),
        "seed": (manifest(new, {**seeds, "split_seed": 7}), ["seed 1337", "seed 7"]),
        "fraction": (manifest(new, {**seeds, "val_fraction": 0.01}), ["val_fraction 0.001", "val_fraction 0.01"]),
        "old": (manifest({}, seeds), ["split key not recorded", "old id rule"]),
    }
    base = manifest(new, seeds)
    assert split_conflict([("edu", base), ("ufw", manifest(dict(new), dict(seeds)))]) is None
    for other, wants in cases.values():
        msg = split_conflict([("edu", base), ("ufw", other)])
        assert msg and "\n" not in msg and "'edu'" in msg and "'ufw'" in msg, msg
        assert all(w in msg for w in wants), msg
    # two sources from before split keys were recorded were split alike (the old rule, same seed)
    assert split_conflict([("x", manifest({}, seeds)), ("y", manifest({"split_key": "auto"}, seeds))]) is None
    # an old manifest on disk, without the new fields, still loads
    d = json.loads(base.to_json())
    for k in ("split_key", "split_normalization"):
        d["extra"].pop(k)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    old = read_manifest(tmp_path)
    assert decontaminated_tasks(old) == set()
    assert decontaminated_tasks(manifest({"decontamination": {"tasks": ["arc_easy", "piqa"]}}, seeds)) == {"arc_easy", "piqa"}


def expected_val_in_train(pairs) -> tuple[int, int]:
    """Near-copy pairs (a, b) where a is val and b train, and where b is val and a train."""
    s = [(text_split(x, 1337, VAL), text_split(y, 1337, VAL)) for x, y in pairs]
    return sum(x == "val" and y == "train" for x, y in s), sum(y == "val" and x == "train" for x, y in s)


def overlap(capsys, *args) -> dict:
    capsys.readouterr()
    assert shards_main(["overlap", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_overlap_counts_exact_and_near_copies_raw_and_shards_alike(corpora, capsys):
    root = corpora["root"]
    raw = overlap(capsys, root / "a", root / "b", "--names", "edu", "ufw", "--val-fraction", VAL)
    shards = overlap(capsys, root / "shards-a", root / "shards-b", "--names", "edu", "ufw")
    (p,) = raw["pairs"]
    assert p["exact"] == SHARED
    assert p["near edu->ufw"] == p["near ufw->edu"] == NEAR
    a_in_b, b_in_a = expected_val_in_train(corpora["near"])
    assert (p["val in train edu->ufw"], p["val in train ufw->edu"]) == (a_in_b, b_in_a) and a_in_b + b_in_a > 0
    assert shards["pairs"] == raw["pairs"]  # decoded shards give the same answer as their raw input
    assert [s["documents"] for s in raw["sources"]] == [SHARED + NEAR + OWN] * 2
    capsys.readouterr()
    assert shards_main(["overlap", str(root / "a"), str(root / "nope")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def removed_ids(out: Path, name: str) -> list[str]:
    """Ids of the documents the cross-source dedup removed from one source (its exclusion writer keeps
    datatrove's layout: the source's id under `id`)."""
    return sorted(json.loads(line)["id"] for f in (out / name / "removed" / "cross_dedup").glob("*.gz")
                  for line in gzip.open(f, "rt"))


def test_cross_dedup_keeps_each_page_once_then_keeps_val_out_of_train(corpora, tmp_path, capsys):
    root = corpora["root"]
    args = ["--input", str(root / "a"), str(root / "b"), "--names", "edu", "ufw", "--text-key", "text", "content",
            "--id-key", "id", "uid"]
    first = tmp_path / "first"
    assert cross_dedup.main([*args, "--output", str(first)]) == 0
    b_ids = {normalize_text(r["content"]): r["uid"] for r in corpora["b"]}
    copies = sorted(b_ids[normalize_text(t)] for t in corpora["shared"]) + sorted(b_ids[normalize_text(y)]
                                                                                   for _, y in corpora["near"])
    assert removed_ids(first, "ufw") == sorted(copies) and not (first / "edu" / "removed").exists()
    kept = [json.loads(line) for f in (first / "ufw" / "kept").glob("*.gz") for line in gzip.open(f, "rt")]
    assert len(kept) == len(corpora["b"]) - SHARED - NEAR and all({"content", "uid", "meta"} <= set(r) for r in kept)
    # tokenized with the corpus module's defaults (content, uid), the manifest carries the count
    assert cli_main(ULTRA, ["tokenize", "--input", str(first / "ufw" / "kept"), "--output", str(tmp_path / "s"),
                            "--tokenizer", "cl100k", "--workers", "1"]) == 0
    note = [f for f in read_manifest(tmp_path / "s").filters if f.startswith("cross-source dedup")]
    assert note and f"removed {SHARED + NEAR} of {len(corpora['b'])}" in note[0]
    # val mode: only train documents near a val document go, from whichever source holds them
    val = tmp_path / "val"
    assert cross_dedup.main([*args, "--output", str(val), "--mode", "val", "--val-fraction", str(VAL)]) == 0
    a_ids = {normalize_text(r["text"]): r["id"] for r in corpora["a"]}
    want_a = sorted(a_ids[normalize_text(x)] for x, y in corpora["near"]
                    if text_split(x, 1337, VAL) == "train" and text_split(y, 1337, VAL) == "val")
    want_b = sorted(b_ids[normalize_text(y)] for x, y in corpora["near"]
                    if text_split(y, 1337, VAL) == "train" and text_split(x, 1337, VAL) == "val")
    assert removed_ids(val, "edu") == want_a and removed_ids(val, "ufw") == want_b
    assert want_a or want_b
    after = overlap(capsys, val / "edu" / "kept", val / "ufw" / "kept", "--names", "edu", "ufw", "--val-fraction", VAL)
    (p,) = after["pairs"]
    assert p["val in train edu->ufw"] == p["val in train ufw->edu"] == 0 and p["exact"] == SHARED
