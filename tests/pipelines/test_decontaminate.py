"""--decontaminate: lm-eval task examples (local task YAMLs, lm-eval's own loading) planted in real
text are dropped and counted per task, ordinary pages stay (false positives measured on real text),
the manifest and `shards inspect` record the tasks, bad task names are one line, and an interrupted
decontaminating tokenize, rerun, is byte-identical."""
from __future__ import annotations

import gzip
import json
import os
import random
import sys
from pathlib import Path

import pytest

from conftest import _DOC_MODULES, real_texts
from pipelines.cli import main as cli_main
from pipelines.cosmopedia import CORPUS as COSMOPEDIA
from pipelines.demo import docstring_rows, topic_rows
from pipelines.fineweb import CORPUS
from shards.manifest import decontaminated_tasks, read_manifest
from shards.ngrams import CHUNK, NGramIndex, Windows
from shards.text import words
from trainhelp import TEST_MODULES, kill_when_shard_1_starts, paragraphs, shard_files, tokenize_stats

pytest.importorskip("lm_eval")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def prose(rows, k: int | None = None, skip: int = 0, min_words: int = 34) -> list[str]:
    """Distinct prose paragraphs of `rows` (not grammar rules or tables, mostly punctuation)."""
    out = []
    for row in rows:
        for p in row["text"].split("\n\n"):
            p = p.strip()
            if len(p.split()) >= min_words and len(words(p)) >= 0.9 * len(p.split()) and p not in out:
                out.append(p)
    return out[skip : skip + k] if k else out[skip:]


def library(k: int, skip: int = 0, min_words: int = 34) -> list[str]:
    """Task examples come from the library's docstrings; the corpus is the language reference (pydoc
    topics) and other modules' docstrings: different documents, so a match there is a false one."""
    return prose(docstring_rows(TEST_MODULES, min_chars=80), k, skip, min_words)


def write_tasks(d: Path, held_out: list[str]) -> dict:
    """Two local lm-eval tasks from held-out real text: a multiple-choice one (question + 3 choices)
    and a generation one (question + one target). Returns {task: [(question, answer), ...]}."""
    d.mkdir(parents=True, exist_ok=True)
    mc = [{"question": " ".join(p.split()[:18]), "choices": [" ".join(p.split()[18:30]), "no", "maybe so"],
           "answer": 0} for p in held_out[:12]]
    gen = [{"prompt": " ".join(p.split()[:20]), "target": " ".join(p.split()[20:32])} for p in held_out[12:24]]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (d / "tiny_mc.yaml").write_text(f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                    f"    test: {d / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
                                    "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
                                    "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    (d / "tiny_gen.yaml").write_text(f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     f"    test: {d / 'gen.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
                                     "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
                                     "generation_kwargs:\n  until: [\"\\n\"]\nmetric_list:\n  - metric: exact_match\n")
    return {"tiny_mc": [(r["question"], r["choices"][0]) for r in mc], "tiny_gen": [(r["prompt"], r["target"]) for r in gen]}


def plant(question: str, answer: str, host: str, rng: random.Random) -> str:
    """An example inside an ordinary page, the way a web copy differs: case, punctuation, line breaks."""
    q = question.upper() if rng.random() < 0.3 else question
    q = q.replace(" ", "\n", 1).replace(",", " ,")
    return f"{host}\n\n{q}? -- {answer}!\n\nMore text follows here."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """400 real paragraphs, 16 of them with a task example planted (8 per task), as JSONL with ids."""
    root = tmp_path_factory.mktemp("decont")
    tasks = write_tasks(root / "tasks", library(24))
    hosts = [p for p in paragraphs() if len(p) >= 40][:400]  # the language reference's paragraphs come first
    rng = random.Random(0)
    planted = {}
    for k, (task, examples) in enumerate(tasks.items()):
        for j, (q, a) in enumerate(examples[:8]):
            i = 7 + 23 * (8 * k + j)
            hosts[i] = plant(q, a, hosts[i], rng)
            planted[f"doc-{i}"] = task
    rows = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(hosts)]
    (root / "in").mkdir()
    for f in range(2):
        (root / "in" / f"{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[f::2]))
    return {"root": root, "tasks": root / "tasks", "rows": rows, "planted": planted, "input": root / "in"}


def removed_rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "removed" / "decontaminate").glob("*.jsonl.gz"))
            for line in gzip.open(f, "rt")]


def test_planted_examples_are_dropped_counted_and_recorded(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(CORPUS, ["tokenize", "--input", str(corpus["input"]), "--output", str(out), "--tokenizer", "cl100k",
                             "--tasks", "2", "--workers", "1", "--val-fraction", "0.1",
                             "--decontaminate", "tiny_mc,tiny_gen", "--include-path", str(corpus["tasks"])]) == 0
    planted = corpus["planted"]
    removed = removed_rows(out)
    assert sorted(r["id"] for r in removed) == sorted(planted)  # every planted page, and nothing else
    assert all(planted[r["id"]] in r["metadata"]["contaminated_tasks"].split(",") for r in removed)
    m = read_manifest(out)
    docs = sum(st.documents for st in m.splits.values())
    assert docs == len(corpus["rows"]) - len(planted)
    per_task = {t: sum(v == t for v in planted.values()) for t in ("tiny_mc", "tiny_gen")}
    stats = tokenize_stats(out)
    assert stats["dropped_contaminated"] == len(planted)
    assert {t: stats[f"dropped_contaminated_{t}"] for t in per_task} == per_task
    decont = m.extra["decontamination"]
    assert decont["tasks"] == ["tiny_mc", "tiny_gen"] and decontaminated_tasks(m) == {"tiny_mc", "tiny_gen"}
    (p,) = decont["passes"]
    assert p["ngram"] == 13 and p["dropped"] == per_task and p["examples"] == {"tiny_mc": 36, "tiny_gen": 12}
    assert any(f.startswith("decontaminate: tiny_mc,tiny_gen") for f in m.filters)
    from shards.__main__ import main as shards_main

    capsys.readouterr()
    assert shards_main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "tiny_mc, tiny_gen: 13-gram words" in shown and f"tiny_mc {per_task['tiny_mc']}" in shown


def test_bad_tasks_and_flags_are_one_line(corpus, tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "broken.yaml").write_text("task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                                f"    test: {tmp_path / 'missing.jsonl'}\ntest_split: test\n"
                                                "output_type: generate_until\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\n")
    base = ["tokenize", "--input", str(corpus["input"]), "--tokenizer", "cl100k"]
    cases = [(["--decontaminate", "no_such_task_x", "--include-path", str(corpus["tasks"])], "no_such_task_x"),
             (["--decontaminate", "broken", "--include-path", str(tmp_path / "t")], "task 'broken' cannot be loaded"),
             (["--include-path", str(corpus["tasks"])], "--include-path applies only with --decontaminate"),
             (["--decontaminate", "tiny_mc", "--decont-ngram", "0"], "--decont-ngram must be >= 1")]
    for i, (extra, words_) in enumerate(cases):
        assert cli_main(CORPUS, [*base, "--output", str(tmp_path / f"o{i}"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words_ in err, err
    assert cli_main(CORPUS, ["dedup", "--input", str(corpus["input"]), "--decontaminate", "tiny_mc"]) == 2
    assert "--decontaminate applies to the filter" in capsys.readouterr().err


def test_run_decontaminates_in_its_filter_stage_and_the_manifest_says_so(corpus, tmp_path):
    out = tmp_path / "run"
    assert cli_main(COSMOPEDIA, ["run", "--input", str(corpus["input"]), "--output", str(out), "--tokenizer", "cl100k",
                                 "--workers", "1", "--decont-ngram", "10", "--decontaminate", "tiny_gen",
                                 "--include-path", str(corpus["tasks"])]) == 0
    want = sorted(i for i, t in corpus["planted"].items() if t == "tiny_gen")
    got = [json.loads(line)["id"] for f in sorted((out / "filtered" / "removed" / "decontaminate").glob("*.gz"))
           for line in gzip.open(f, "rt")]
    assert sorted(got) == want
    m = read_manifest(out / "shards")
    (p,) = m.extra["decontamination"]["passes"]
    assert p["tasks"] == ["tiny_gen"] and p["ngram"] == 10 and p["dropped"] == {"tiny_gen": len(want)}
    # the filter stage's output says what it applied, for a tokenize run on it later
    assert "tiny_gen" in (out / "filtered" / "kept" / "shardloom-applied.yaml").read_text()


def test_false_positives_on_real_text_under_half_a_percent(corpus):
    """The two tasks plus 300 more library paragraphs as examples, against real text from other
    documents (the language reference, whole and by paragraph, and other modules' docstrings): the
    share of those pages flagged."""
    from shards.evalsets import task_texts

    examples = task_texts(["tiny_mc", "tiny_gen"], str(corpus["tasks"]))
    extra = {"held_out": library(300, skip=24, min_words=20)}
    index = NGramIndex.build({**examples, **extra}, 13)
    others = [m for m in _DOC_MODULES if m not in TEST_MODULES]
    topics = [r["text"] for r in topic_rows()]
    docs = list(dict.fromkeys(topics + [p.strip() for t in topics for p in t.split("\n\n") if len(p.strip()) >= 40]
                              + [r["text"] for r in docstring_rows(others, min_chars=80)]))
    assert len(docs) > 1500
    flagged = sum(hit is not None for i in range(0, len(docs), 500) for hit in index.find(docs[i : i + 500]))
    rate = flagged / len(docs)
    # an upper bound: the reference quotes a few library docstrings (str.maketrans' in String Methods),
    # real copies that count here as false
    print(f"flagged: {flagged} of {len(docs)} real documents from other sources ({rate:.3%})")
    assert rate < 0.005
    # and the index finds those paragraphs when a page holds them, after a web copy's changes
    rng = random.Random(1)
    hits = index.find([plant(p[:200], p[200:400], "Intro.", rng) for p in extra["held_out"] if len(p) > 400])
    assert hits and all(h is not None and "held_out" in h[0] for h in hits)


def test_words_and_chunked_hashing_agree(monkeypatch):
    texts = real_texts(60) + ["Don’t “stop” — café NAÏVE x×y\u00a0z", "a" * 50, ""]
    whole = Windows(texts, 5)
    monkeypatch.setattr("shards.ngrams.CHUNK", 97)  # many chunks, cut at spaces, a word longer than one
    cut = Windows(texts, 5)
    assert (whole.hashes == cut.hashes).all() and len(whole.hashes) > 1000
    assert CHUNK > 97
    assert words("Don’t “stop” — café NAÏVE") == [b"don", b"t", b"stop", "café".encode(), "naÏve".lower().encode()]
    # a window never spans two texts: the same 5 words split across texts give no window
    assert len(Windows(["one two three", "four five"], 5).hashes) == 0
    assert len(Windows(["one two three four five"], 5).hashes) == 1


def test_interrupted_decontaminating_tokenize_reruns_byte_identical(corpus, tmp_path):
    """A real SIGKILL while task 1 writes, then a rerun: shards and manifest equal a fresh run's."""
    inp = tmp_path / "in"
    inp.mkdir()
    rows = corpus["rows"]
    (inp / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    (inp / "b.jsonl").write_text("".join(json.dumps({**r, "id": f"{r['id']}-{k}"}) + "\n"
                                         for k in range(12) for r in rows))
    args = ["--tokenizer", "cl100k", "--tasks", "2", "--workers", "1", "--val-fraction", "0.1", "--batch-size", "20",
            "--decontaminate", "tiny_mc,tiny_gen", "--include-path", str(corpus["tasks"])]
    assert cli_main(CORPUS, ["tokenize", "--input", str(inp), "--output", str(tmp_path / "fresh"), *args]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipelines.fineweb", "tokenize", "--input", str(inp), "--output", str(out), *args]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    kill_when_shard_1_starts(cmd, out, env, timeout=120)
    assert not (out / "manifest.json").exists()
    assert cli_main(CORPUS, ["tokenize", "--input", str(inp), "--output", str(out), *args]) == 0
    shards = lambda d: {k: v for k, v in shard_files(d).items() if not k.startswith("removed/")}  # noqa: E731
    assert shards(out) == shards(tmp_path / "fresh")
    # the dropped documents too (gzip headers carry a time, so compared decompressed)
    assert removed_rows(out) == removed_rows(tmp_path / "fresh") and len(removed_rows(out)) > 16
