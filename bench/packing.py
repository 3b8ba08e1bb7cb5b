"""Tokens cropped and padded by best-fit packing against stream packing, on real text.

    .venv/bin/python -m bench.packing [--seq-lens 512 1024 2048] [--tokenizer cl100k]

The corpus is pipelines.demo's (the documentation that ships with Python: pydoc topics and every
stdlib docstring; no download), documents shuffled with a fixed seed as a pipeline's shards would hold
them, tokenized with `--tokenizer` (document + EOS, BOS where it has one) into one shard. Per seq_len,
per 1M document tokens:
  stream   dropped: tokens no window holds (the shard's tail shorter than a window);
           headless: row positions whose document starts before the row (trained without its start);
           docs split: documents no single window holds whole.
  bestfit  cropped: tokens of documents longer than a row past its end (no row holds them);
           padded: row positions with no document token (EOS, no loss); headless: 0 by construction;
           docs cropped: documents longer than a row.
Also the plan's cost (documents per second) and MixtureLoader.batch tokens/s for both packings.
Prints a table; writes bench/results/packing.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shards.manifest import TokenizerInfo, write_source  # noqa: E402
from trainer.data import MixtureLoader, MixturePoint, SourceSpec, open_source  # noqa: E402


def corpus(seed: int = 0) -> list[str]:
    from pipelines.demo import docstring_rows, topic_rows

    texts = [r["text"] for r in topic_rows() + docstring_rows()]
    order = np.random.default_rng(seed).permutation(len(texts))  # topics (long) would otherwise come first
    return [texts[i] for i in order]


def tokenize(texts: list[str], name: str) -> tuple[TokenizerInfo, list[np.ndarray]]:
    from shards.tokenizers import get_tokenizer

    tok = get_tokenizer(name)
    docs = [np.asarray(d, dtype=np.int64) for d in tok.encode_documents(texts)]
    # the vocabulary hash is only compared between sources: one source needs none computed
    return TokenizerInfo(tok.name, tok.vocab_size, f"bench-{name}", tok.eos_id, tok.bos_id, tok.add_bos), docs


def stream_figures(lengths: np.ndarray, seq_len: int) -> dict:
    """Stream packing of one shard: windows of seq_len+1 at stride seq_len."""
    L, ends = seq_len + 1, np.cumsum(lengths)
    starts, total = ends - lengths, int(ends[-1])
    windows = max(0, (total - 1) // seq_len)
    covered = windows * seq_len + 1 if windows else 0
    a = np.arange(windows, dtype=np.int64) * seq_len  # window starts
    i = np.searchsorted(starts, a)  # first document starting at or after each window's start
    first = np.where(i < len(starts), starts[np.minimum(i, len(starts) - 1)], total)
    headless = int(np.minimum(first - a, L).sum())
    k = starts // seq_len  # the last window starting at or before each document: the one that could hold it
    split = int(((ends > k * seq_len + L) | (k >= windows)).sum())
    return {"rows": windows, "dropped": total - covered, "padded": 0, "headless": headless, "docs_split": split}


def bestfit_figures(path: Path, seq_len: int, lengths: np.ndarray) -> dict:
    t0 = time.perf_counter()
    st = open_source("bench", str(path), "train", None, seq_len, "bestfit").pack_stats
    dt = time.perf_counter() - t0
    return {"rows": st.rows, "cropped": st.cropped, "padded": st.padded, "headless": 0,
            "docs_cropped": int((lengths > seq_len + 1).sum()), "plan_seconds": dt, "plan_docs_per_s": st.documents / dt}


def loader_tokens_per_s(path: Path, seq_len: int, packing: str, micro_batch: int, batches: int) -> float:
    ld = MixtureLoader([SourceSpec("bench", str(path))], [MixturePoint(0, {"bench": 1})], seq_len, micro_batch,
                       seed=0, packing=packing)
    ld.batch(0)
    best = float("inf")
    for _ in range(3):  # best of 3: the pass least disturbed by other processes on a shared machine
        t0 = time.perf_counter()
        for s in range(1, batches + 1):
            ld.batch(s)
        best = min(best, time.perf_counter() - t0)
    return batches * micro_batch * seq_len / best


def per_million(fig: dict, tokens: int) -> dict:
    keys = ("dropped", "cropped", "padded", "headless")
    return {k: round(fig[k] * 1e6 / tokens) for k in keys if k in fig}


def print_table(results: dict) -> None:
    print(f"corpus: {results['corpus']['documents']:,} documents, {results['corpus']['tokens']:,} tokens "
          f"({results['corpus']['tokenizer']}); per 1M document tokens:")
    print(f"  {'seq_len':>7} {'packing':>8} {'lost':>8} {'padded':>8} {'headless':>9} {'docs cut':>9} {'tok/s':>8}")
    for seq, r in results["by_seq_len"].items():
        for name, lost, cut in (("stream", "dropped", "docs_split"), ("bestfit", "cropped", "docs_cropped")):
            f, pm = r[name], r[name + "_per_1M"]
            print(f"  {seq:>7} {name:>8} {pm[lost]:>8,} {pm['padded']:>8,} {pm['headless']:>9,} "
                  f"{f[cut]:>9,} {r[name + '_loader_tokens_per_s'] / 1e6:>7.1f}M")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--tokenizer", default="cl100k")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "packing.json"))
    args = p.parse_args(argv)
    logging.getLogger("trainer").setLevel(logging.WARNING)  # the tiny corpus starts an epoch every few batches
    info, docs = tokenize(corpus(), args.tokenizer)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = int(lengths.sum())
    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(), "loadavg_start": os.getloadavg()},
               "corpus": {"source": "pipelines.demo (pydoc topics + stdlib docstrings), shuffled seed 0",
                          "tokenizer": args.tokenizer, "bos": info.bos_id if info.add_bos else None,
                          "documents": len(docs), "tokens": tokens,
                          "doc_tokens_p50_p90_p99": np.percentile(lengths, [50, 90, 99]).round().tolist()},
               "by_seq_len": {}}
    with tempfile.TemporaryDirectory(prefix="shardloom-packing-") as tmp:
        path = write_source(Path(tmp) / "src", {"train/00000": docs, "val/00000": docs[:8]}, info)
        for seq in args.seq_lens:
            r = {"stream": stream_figures(lengths, seq), "bestfit": bestfit_figures(path, seq, lengths)}
            for name in ("stream", "bestfit"):
                r[name + "_per_1M"] = per_million(r[name], tokens)
                r[name + "_loader_tokens_per_s"] = loader_tokens_per_s(path, seq, name, args.micro_batch, args.batches)
            results["by_seq_len"][seq] = r
    results["machine"]["loadavg_end"] = os.getloadavg()
    print_table(results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
