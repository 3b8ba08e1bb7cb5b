"""Atom's five corpora through their pipeline modules, on schema-faithful local samples (real column
names: tests/corpus_samples.py): every row tokenized and decoded back to its own text column, ids from
the corpus's id column (or the text), the score thresholds counted, --subset wired to the hub path,
each corpus's filter chain; then Atom end to end (train_tokenizer -> five shard sources -> atom.yaml
trains a few steps, and its dry run shows the data budget)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datatrove.data import Document

from corpus_samples import CORPORA, LAYOUT, ROWS, TEXT_KEY, _texts, finemath, fineweb_edu, write_all, write_sample
from pipelines import train_tokenizer
from pipelines.cli import build_parser
from pipelines.spec import job_from_args
from pipelines.readers import InputError
from pipelines.steps import assign_split
from shards.manifest import read_manifest
from shards.reader import open_split
from shards.text import normalize_text
from shards.tokenizers import get_tokenizer
from trainhelp import tokenize_stats, train

ROOT = Path(__file__).resolve().parents[2]


def module(corpus: str):
    return importlib.import_module(f"pipelines.{LAYOUT[corpus][0]}")


def run(corpus: str, *argv) -> int:
    mod = module(corpus)
    return mod.main(mod.CORPUS, [str(a) for a in argv])


@pytest.fixture(scope="module")
def atom(tmp_path_factory):
    """Samples of the five corpora, Atom's tokenizer trained on all of them, five shard sources."""
    root = tmp_path_factory.mktemp("atom")
    samples = write_all(root / "raw")
    assert train_tokenizer.main(["--input", *map(str, samples.values()), "--text-key", *TEXT_KEY.values(),
                                 "--output", str(root / "tok"), "--no-progress"]) == 0
    for c in CORPORA:
        assert run(c, "tokenize", "--input", samples[c], "--output", root / "shards" / c, "--tokenizer", root / "tok",
                   "--val-fraction", 0.2, "--workers", 1) == 0
    return root, samples


def rows_of(folder: Path) -> dict:
    return pq.read_table(next(folder.glob("*.parquet"))).to_pydict()


@pytest.mark.parametrize("corpus", CORPORA)
def test_corpus_module_tokenizes_every_row_from_its_text_column(atom, corpus):
    root, samples = atom
    rows = rows_of(samples[corpus])
    texts = rows[TEXT_KEY[corpus]]
    tok = get_tokenizer(str(root / "tok"))
    m = read_manifest(root / "shards" / corpus)
    assert m.tokenizer.vocab_size == 4096 and m.extra["corpus"] == module(corpus).CORPUS.name
    decoded = {s: [tok.decode(d[:-1].tolist()) for d in open_split(root / "shards" / corpus, s).documents_iter()]
               for s in ("train", "val")}
    assert sorted(decoded["train"] + decoded["val"]) == sorted(texts)  # every row, its own text, nothing else
    # the split key: the normalised text, whatever id column the corpus has (uid, id or none), so a
    # page two corpora share is in the same split in both
    want_val = sorted(t for t in texts if assign_split(normalize_text(t), 1337, 0.2) == "val")
    assert sorted(decoded["val"]) == want_val and 0 < len(want_val) < ROWS




def test_score_thresholds_are_counted_like_filters(atom, tmp_path):
    root, _ = atom
    ints = [1, 2, 3, 4, 5] * 8
    edu = write_sample(tmp_path / "raw", "fineweb-edu", table=fineweb_edu(_texts(0, 40), int_scores=ints))
    assert run("fineweb-edu", "tokenize", "--input", edu, "--output", tmp_path / "edu", "--tokenizer", root / "tok",
               "--val-fraction", 0, "--min-int-score", 3, "--workers", 1) == 0
    m = read_manifest(tmp_path / "edu")
    s = tokenize_stats(tmp_path / "edu")
    assert m.splits["train"].documents == sum(i >= 3 for i in ints) == 24
    assert s["dropped_below_int_score"] == 16 and "score: int_score >= 3" in m.filters
    scores = [3.0 + (j % 5) * 0.4 for j in range(39)] + [None]  # one row without a score
    fm = write_sample(tmp_path / "raw", "finemath-3plus", table=finemath(_texts(2, 40), scores=scores))
    assert run("finemath-3plus", "tokenize", "--input", fm, "--output", tmp_path / "fm", "--tokenizer", root / "tok",
               "--val-fraction", 0, "--min-score", 3.5, "--workers", 1) == 0
    s = tokenize_stats(tmp_path / "fm")
    kept = sum(x is not None and x >= 3.5 for x in scores)
    assert read_manifest(tmp_path / "fm").splits["train"].documents == kept == 23
    assert s["dropped_below_score"] == 16 and s["dropped_no_score"] == 1


def test_score_flag_on_a_corpus_without_that_column_is_one_line(atom, capsys):
    root, samples = atom
    assert run("cosmopedia-v2", "tokenize", "--input", samples["cosmopedia-v2"], "--output", root / "x",
               "--tokenizer", root / "tok", "--min-score", 3) == 2
    assert capsys.readouterr().err.strip() == "error: --min-score: cosmopedia has no 'score' column (its score columns: none)"


def test_wrong_text_column_is_one_line_before_any_executor(atom, capsys):
    root, samples = atom
    assert run("ultra-fineweb", "tokenize", "--input", samples["ultra-fineweb"], "--output", root / "y",
               "--tokenizer", root / "tok", "--text-key", "text") == 2
    err = capsys.readouterr().err
    assert "no 'text' column (columns: content, uid, meta" in err and "--text-key" in err and not (root / "y").exists()


@pytest.mark.parametrize("corpus", ("fineweb", *CORPORA, "smoltalk"))
def test_subset_selects_the_hub_folder(corpus, monkeypatch, tmp_path):
    seen = []

    def offline(path):
        seen.append(path)
        raise InputError(f"input {path}: offline")

    monkeypatch.setattr("pipelines.readers.check_hub_input", offline)
    mod = importlib.import_module(f"pipelines.{LAYOUT[corpus][0] if corpus in LAYOUT else corpus}")
    if hasattr(mod, "check_hub_input"):  # bound by name at import (smoltalk): patch it there too
        monkeypatch.setattr(mod, "check_hub_input", offline)
    argv = ["tokenize", "--subset", "data/CC-MAIN-2025-21/", "--output", str(tmp_path / "o")]
    rc = mod.main(argv) if corpus == "smoltalk" else mod.main(mod.CORPUS, argv)
    assert rc == 2 and seen == [f"hf://datasets/{mod.CORPUS.hub_repo}/data/CC-MAIN-2025-21"]


def test_download_mirrors_the_subset(monkeypatch, tmp_path):
    import huggingface_hub

    from pipelines.fineweb import CORPUS
    from pipelines.cli import main

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)))
    assert main(CORPUS, ["download", "--subset", "data/CC-MAIN-2025-21", "--output", str(tmp_path)]) == 0
    assert calls == [("HuggingFaceFW/fineweb", dict(repo_type="dataset", allow_patterns="data/CC-MAIN-2025-21/*.parquet",
                                                    local_dir=str(tmp_path)))]


def test_filter_chain_per_corpus():
    web = ["datatrove.URLFilter", "datatrove.LanguageFilter", "datatrove.GopherRepetitionFilter",
           "datatrove.GopherQualityFilter", "datatrove.C4QualityFilter", "datatrove.FineWebQualityFilter"]
    want = {"fineweb": web, "fineweb-edu": web, "ultra-fineweb": web, "finemath-3plus": web[:2],
            "ultradata-math": web[:2], "cosmopedia-v2": []}
    for corpus, names in want.items():
        mod = importlib.import_module(f"pipelines.{LAYOUT[corpus][0] if corpus in LAYOUT else corpus}")
        args = build_parser(mod.CORPUS).parse_args(["filter"])
        assert [n.split("(")[0] for n in job_from_args(args, mod.CORPUS).filters.names()] == names, corpus


def test_why_math_and_synthetic_text_skip_the_prose_heuristics():
    """C4's curly-bracket rule (in FineWeb's chain) drops every LaTeX page and every code sample."""
    from datatrove.pipeline.filters import C4QualityFilter

    c4 = C4QualityFilter(filter_no_terminal_punct=False)
    prose = " ".join(["The cat sat on the mat and looked at the garden for a while."] * 8)
    assert c4.filter(Document(text=prose, id="p")) is True
    for table in (finemath(_texts(2, 2)), ):
        text = table.column("text").to_pylist()[0]
        assert "{" in text and c4.filter(Document(text=text, id="m")) is not True


def test_cosmopedia_filter_stage_passes_every_row(atom, tmp_path):
    _, samples = atom
    assert run("cosmopedia-v2", "filter", "--input", samples["cosmopedia-v2"], "--output", tmp_path / "f",
               "--workers", 1) == 0
    kept = [json.loads(line) for f in (tmp_path / "f" / "kept").glob("*.jsonl.gz")
            for line in __import__("gzip").open(f, "rt")]
    assert len(kept) == ROWS and not (tmp_path / "f" / "removed").exists()


def test_url_filter_reads_the_url_inside_meta(monkeypatch):
    """Ultra-FineWeb v1.4 and UltraData-Math keep the url in a JSON `meta` column."""
    from datatrove.pipeline.filters import URLFilter

    from pipelines.filters import LocalURLFilter, meta_url

    assert meta_url({"meta": json.dumps({"url": "https://a.org/x"})}) == "https://a.org/x"
    assert meta_url({"meta": {"url": "https://b.org"}}) == "https://b.org"
    assert meta_url({"meta": "not json"}) is None and meta_url({}) is None
    judged = []
    monkeypatch.setattr(URLFilter, "filter", lambda self, doc: judged.append(doc.metadata["url"]) or True)
    f = LocalURLFilter()
    assert f.filter(Document(text="t", id="1", metadata={"meta": json.dumps({"url": "https://c.org"})}))
    assert f.filter(Document(text="t", id="2", metadata={"meta": json.dumps({"date": "2020"})}))  # no url: passes
    assert judged == ["https://c.org"]


def test_atom_end_to_end(atom, tmp_path, capsys):
    root, _ = atom
    over = [f"data.sources.{i}.path={root / 'shards' / c}" for i, c in enumerate(CORPORA)] + [
        f"tokenizer.path={root / 'tok'}", "train.steps=3", "train.compile=false", "train.device=cpu",
        "train.dtype=fp32", "batch.seq_len=64", "batch.micro_batch=2", "batch.tokens_per_step=128",
        "schedule.warmup=1", "schedule.cooldown=1", "eval.every=0", "eval.batches=1", "checkpoint.every=0",
        "eval.tasks=[]",  # the card's tasks load from the hub; tests/trainer/test_eval_in_loop.py scores local ones
        "sample.max_new_tokens=4"]
    atom_yaml = str(ROOT / "curricula" / "atom.yaml")
    rc, out, _ = train([atom_yaml, *over, "--dry-run", "--json"], capsys)
    assert rc == 0
    assert "data budget (train split)" in out
    budget = json.loads(out.strip().splitlines()[-1])["sources"]
    assert [b["name"] for b in budget] == list(CORPORA)
    for b, c in zip(budget, CORPORA):
        assert b["tokens_available"] == read_manifest(root / "shards" / c).splits["train"].tokens > 0
    assert sum(b["tokens_planned"] for b in budget) == 3 * 128
    assert train([atom_yaml, *over, "--run-dir", tmp_path / "run"], capsys)[0] == 0
    assert (tmp_path / "run" / "DONE").exists()


def test_run_tokenizes_what_the_filter_stage_kept_whatever_the_text_column(atom, tmp_path):
    # UltraData-Math keeps its text under `content`; the filter stage writes datatrove JSONL (`text`),
    # which is what `run`'s tokenize stage must read.
    import gzip

    root, samples = atom
    out = tmp_path / "o"
    assert run("ultradata-math", "run", "--input", samples["ultradata-math"], "--output", out,
               "--tokenizer", root / "tok", "--val-fraction", 0, "--workers", 1) == 0
    kept = [json.loads(line)["text"] for f in (out / "filtered" / "kept").glob("*.jsonl.gz")
            for line in gzip.open(f, "rt")]
    assert kept
    tok = get_tokenizer(str(root / "tok"))
    decoded = [tok.decode(d[:-1].tolist()) for d in open_split(out / "shards", "train").documents_iter()]
    assert sorted(decoded) == sorted(kept)
