"""The embedded default: a small real-text corpus from the documentation that ships with Python,
a 4,096-token byte-level BPE trained on it, and the pipeline run on it. No download.

    python -m pipelines.demo --output out/demo          (what `make demo` runs)

Writes, under OUTPUT:
  corpus/topics/*.jsonl.gz       pydoc_data.topics (the language reference sections)
  corpus/docstrings/*.jsonl.gz   docstrings of stdlib modules, classes and functions
  tokenizer.json                 byte-level BPE, 4,096 ids incl. <pad> <s> </s> <unk> <|endoftext|>
                                 (pipelines.train_tokenizer; + tokenizer_config.json, special_tokens_map.json)
                                 (Atom's tokenizer shape: its card's 3,412,800 params need vocab 4096)
  shards/topics, shards/docstrings   train/ + val/ + manifest.json each (two sources for a mixture)
  filter-sample/                 the FineWeb filter chain on a few documents (kept/removed counts)
Rows follow FineWeb's schema (text, id, dump, url, date, file_path, language, language_score,
token_count). Rerunning is cheap: unchanged inputs keep their shards (completion markers); changed
inputs (another Python version) rebuild them.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import inspect
import io
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

from shards.evalsets import write_multiple_choice_task

from .train_tokenizer import VOCAB_SIZE, train

# Modules whose docstrings make the corpus: the whole standard library (fixed per Python version)
# minus modules with import side effects or private/duplicate implementations, plus submodules.
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
                "venv", "pydoc", "pip"}
EXTRA_MODULES = """asyncio.events asyncio.streams asyncio.tasks collections.abc concurrent.futures
concurrent.futures.thread email.headerregistry email.message email.parser email.utils html.parser
http.client http.cookiejar http.server importlib.metadata importlib.resources json.decoder
logging.handlers multiprocessing.pool os.path unittest.mock urllib.error urllib.parse urllib.request
xml.dom xml.dom.minidom xml.etree.ElementTree xml.sax""".split()


def doc_modules() -> list[str]:
    names = {m for m in sys.stdlib_module_names if not m.startswith("_") and m not in SKIP_MODULES}
    return sorted(names | set(EXTRA_MODULES))


DATE = "2024-01-01T00:00:00Z"  # fixed: the corpus must be byte-identical run to run
MIN_DOCSTRING_CHARS = 100


def _row(text: str, doc_id: str, url: str, file_path: str) -> dict:
    return {
        "text": text, "id": doc_id, "dump": f"python-{sys.version_info.major}.{sys.version_info.minor}-docs",
        "url": url, "date": DATE, "file_path": file_path, "language": "en",
        # FineWeb stores fastText's English score and a GPT-2 token count; neither model is here
        # offline, so: null score, whitespace word count (documented, not pretended).
        "language_score": None, "token_count": len(text.split()),
    }


def topic_rows() -> list[dict]:
    import pydoc_data.topics as topics

    return [_row(text.strip(), f"<python-topic:{name}>", f"https://docs.python.org/3/reference/#{name}",
                 "pydoc_data/topics.py") for name, text in sorted(topics.topics.items()) if text.strip()]


def docstring_rows(modules=None, min_chars: int = MIN_DOCSTRING_CHARS) -> list[dict]:
    """Docstrings of modules and their public classes, functions and methods, deduplicated by text."""
    rows, seen = [], set()

    def add(obj, qualname, modname):
        doc = inspect.getdoc(obj)
        if not doc or len(doc) < min_chars or doc in seen:
            return
        seen.add(doc)
        url = f"https://docs.python.org/3/library/{modname.split('.')[0]}.html#{qualname}"
        rows.append(_row(doc, f"<python-doc:{qualname}>", url, f"{modname.replace('.', '/')}.py"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in modules or doc_modules():
            try:
                mod = importlib.import_module(modname)
            except BaseException:  # missing on this platform/build (winreg, _sqlite3, ...)
                continue
            add(mod, modname, modname)
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isroutine(obj):
                    add(obj, f"{modname}.{name}", modname)
                if inspect.isclass(obj):
                    for mname, member in sorted(vars(obj).items()):
                        if not mname.startswith("_") and inspect.isroutine(member):
                            add(member, f"{modname}.{name}.{mname}", modname)
    return rows


def write_jsonl_gz(rows: list[dict], path: Path) -> None:
    """Deterministic gzip (mtime 0, no file name) so identical rows give identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode())
    _write_if_changed(path, buf.getvalue())


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_corpus(out: Path, docstring_files: int = 2) -> dict[str, list[Path]]:
    """OUT/topics/*.jsonl.gz and OUT/docstrings/*.jsonl.gz; returns the files per source."""
    sources = {"topics": [topic_rows()], "docstrings": None}
    ds = docstring_rows()
    sources["docstrings"] = [ds[i::docstring_files] for i in range(docstring_files)]
    files: dict[str, list[Path]] = {}
    for name, parts in sources.items():
        files[name] = []
        for i, rows in enumerate(parts):
            p = out / name / f"{i:05d}.jsonl.gz"
            write_jsonl_gz(rows, p)
            files[name].append(p)
    return files


def iter_texts(files):
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)["text"]


def train_bpe(files, path: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Atom's tokenizer shape trained on the corpus files: `pipelines.train_tokenizer.train`, written
    beside `path` (OUT/tokenizer.json, with its transformers configs)."""
    return train(iter_texts(files), Path(path).parent, vocab_size)


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def write_demo_task(folder: Path, n: int = 40, seed: int = 0) -> Path:
    """A small multiple-choice task in lm-eval's YAML format, so the demo's training loop scores a
    downstream task offline: the opening of a Python reference topic, then its true next words
    against the same span of three other topics. The topics are in the training corpus: it shows
    the panel move, it is not a benchmark."""
    import random

    words = [r["text"].split() for r in topic_rows()]
    words = [w for w in words if len(w) >= 40]
    rng = random.Random(seed)
    docs = []
    for i in rng.sample(range(len(words)), min(n, len(words))):
        others = rng.sample([j for j in range(len(words)) if j != i], 3)
        choices = [" " + " ".join(words[j][30:38]) for j in [i, *others]]
        order = list(range(4))
        rng.shuffle(order)
        docs.append({"query": " ".join(words[i][:30]), "choices": [choices[k] for k in order], "gold": order.index(0)})
    write_multiple_choice_task(folder, "demo_pydoc", docs, text="{{query}}", target="{{gold}}")
    return folder


def run(output: str | Path, tasks: int = 2, val_fraction: float = 0.05, filter_sample: int = 40) -> dict:
    from .cli import main as cli_main
    from .fineweb import CORPUS

    out = Path(output)
    t0 = time.perf_counter()
    files = build_corpus(out / "corpus")
    t_corpus = time.perf_counter() - t0
    tok_path = train_bpe([f for fs in files.values() for f in fs], out / "tokenizer.json")
    t_bpe = time.perf_counter() - t0 - t_corpus

    # Inputs changed (another Python, another corpus, another vocabulary hash) -> the old shards and
    # markers are stale.
    from shards.tokenizers import HFTokenizer

    digest = _digest([tok_path] + [f for fs in files.values() for f in fs]) + HFTokenizer(tok_path).vocab_hash
    stamp = out / "shards" / "inputs.sha256"
    if stamp.exists() and stamp.read_text() != digest:
        shutil.rmtree(out / "shards")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest)

    for source in files:
        rc = cli_main(CORPUS, [
            "tokenize", "--input", str(out / "corpus" / source), "--output", str(out / "shards" / source),
            "--tokenizer", str(tok_path), "--tasks", str(tasks), "--workers", "1",
            "--val-fraction", str(val_fraction),
        ])
        if rc:
            raise SystemExit(rc)
    t_tok = time.perf_counter() - t0 - t_corpus - t_bpe
    if filter_sample:
        # The FineWeb chain on a few topic documents: shows kept/dropped per filter, offline.
        rc = cli_main(CORPUS, ["filter", "--input", str(out / "corpus" / "topics"), "--output",
                               str(out / "filter-sample"), "--limit", str(filter_sample)])
        if rc:
            raise SystemExit(rc)
    write_demo_task(out / "tasks")
    t_all = time.perf_counter() - t0
    return summary(out, files, tok_path, dict(corpus=t_corpus, bpe=t_bpe, tokenize=t_tok, total=t_all))


def summary(out: Path, files, tok_path: Path, times: dict) -> dict:
    from shards.manifest import read_manifest
    from shards.reader import open_split
    from shards.tokenizers import get_tokenizer

    tok = get_tokenizer(str(tok_path))
    info = {"tokenizer": str(tok_path), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "sources": {}}
    print("\n=== ShardLoom demo ===")
    print(f"tokenizer  {tok_path}  vocab {tok.vocab_size:,}  eos {tok.eos_id} ({'no BOS' if not tok.add_bos else 'BOS'})")
    for source in files:
        d = out / "shards" / source
        m = read_manifest(d)
        row = {s: {"documents": st.documents, "tokens": st.tokens} for s, st in m.splits.items()}
        info["sources"][source] = {"dir": str(d), "dtype": m.dtype, **row}
        print(f"{source:<11} {d}  {m.dtype}  " + "  ".join(
            f"{s}: {st.documents:,} docs / {st.tokens:,} tokens" for s, st in m.splits.items()))
    first = open_split(out / "shards" / "topics", "train")
    sample = tok.decode(first.shards[0].document(0)[:40])
    print(f"first train document of topics, decoded: {sample!r}...")
    print("times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    info["times"] = times
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default="out/demo")
    p.add_argument("--tasks", type=int, default=2, help="tokenize tasks per source")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--filter-sample", type=int, default=40, help="documents for the filter-chain showcase; 0 skips")
    args = p.parse_args(argv)
    run(args.output, args.tasks, args.val_fraction, args.filter_sample)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
