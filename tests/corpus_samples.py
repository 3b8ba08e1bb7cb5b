"""Small schema-faithful samples of Atom's five corpora: parquet files with each corpus's real column
names and types (docs/data.md), laid out as the hub folders are, text from Python's own docs."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import real_texts

ROWS = 40
CORPORA = ("fineweb-edu", "ultra-fineweb", "finemath-3plus", "cosmopedia-v2", "ultradata-math")


def _texts(i: int, rows: int) -> list[str]:
    base = real_texts(len(CORPORA) * 2 * rows)
    mine = base[i * 2 * rows:(i + 1) * 2 * rows]
    return [mine[2 * j] + "\n\n" + mine[2 * j + 1] for j in range(rows)]


def _url(j: int) -> str:
    return f"https://docs.example.org/page/{j}.html"


def fineweb_edu(texts, int_scores=None) -> pa.Table:
    n = len(texts)
    int_scores = int_scores or [3 + j % 3 for j in range(n)]
    return pa.table({
        "text": texts, "id": [f"<urn:uuid:00000000-0000-0000-0000-{j:012d}>" for j in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n, "url": [_url(j) for j in range(n)],
        "date": ["2024-02-21T10:00:00Z"] * n,
        "file_path": [f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/{j}.warc.gz" for j in range(n)],
        "language": ["en"] * n, "language_score": [0.93] * n,
        "token_count": pa.array([len(t.split()) for t in texts], pa.int64()),
        "score": [s + 0.25 for s in int_scores], "int_score": pa.array(int_scores, pa.int64()),
    })


def ultra_fineweb(texts) -> pa.Table:
    n = len(texts)
    meta = [json.dumps({"url": _url(j), "date": "2025-05-20T08:00:00Z", "dump": "CC-MAIN-2025-21"}) for j in range(n)]
    return pa.table({
        "content": texts, "uid": [f"ufw-{j:08x}" for j in range(n)], "meta": meta,
        "score": [0.9 - j / (10 * n) for j in range(n)], "source": ["fineweb"] * n,
        "dataset_index": pa.array(range(n), pa.int64()),
    })


def finemath(texts, scores=None) -> pa.Table:
    n = len(texts)
    texts = [f"Solve $\\frac{{x^{{2}}}}{{2}} = {j + 2}$ for $x$.\n\n{t}" for j, t in enumerate(texts)]
    scores = scores or [3.0 + (j % 5) * 0.4 for j in range(n)]
    return pa.table({
        "url": [_url(j) for j in range(n)], "fetch_time": pa.array([1_700_000_000 + j for j in range(n)], pa.int64()),
        "content_mime_type": ["text/html"] * n, "warc_filename": [f"crawl-data/CC-MAIN-2023-50/{j}.warc.gz" for j in range(n)],
        "warc_record_offset": pa.array([1000 * j for j in range(n)], pa.int32()),
        "warc_record_length": pa.array([900] * n, pa.int32()), "text": texts,
        "token_count": pa.array([len(t.split()) for t in texts], pa.int32()),
        "char_count": pa.array([len(t) for t in texts], pa.int32()), "metadata": ["{}"] * n,
        "score": pa.array(scores, pa.float64()), "int_score": pa.array([None if s is None else int(s) for s in scores], pa.int64()),
        "crawl": ["CC-MAIN-2023-50"] * n, "snapshot_type": ["latest"] * n, "language": ["en"] * n,
        "language_score": [0.9] * n,
    })


def cosmopedia(texts) -> pa.Table:
    n = len(texts)
    texts = [f"# Chapter {j + 1}\n\n- a list item\n- another\n\n```python\ndef f(x):\n    return {{x: 1}}\n```\n\n{t}"
             for j, t in enumerate(texts)]
    return pa.table({
        "prompt": [f"Write a textbook chapter about topic {j}." for j in range(n)], "text": texts,
        "token_length": pa.array([len(t.split()) for t in texts], pa.int64()),
        "audience": ["college_students"] * n, "format": ["textbook"] * n, "seed_data": ["web_samples_v2"] * n,
    })


def ultradata_math(texts) -> pa.Table:
    n = len(texts)
    meta = [json.dumps({"url": _url(j), "timestamp": "2014-04-20T15:52:35Z", "content_type": None,
                        "content_length": str(len(t)), "record_id": f"<urn:uuid:{j}>"}) for j, t in enumerate(texts)]
    return pa.table({"content": [f"Let $f(x) = x^{{{j % 7 + 2}}}$.\n\n{t}" for j, t in enumerate(texts)], "meta": meta})


# corpus -> (module, hub subset folder, file name, table builder)
LAYOUT = {
    "fineweb-edu": ("fineweb_edu", "sample/10BT", "000_00000.parquet", fineweb_edu),
    "ultra-fineweb": ("ultra_fineweb", "data/ultrafineweb_en_v1_4/CC-MAIN-2025-21",
                      "ultrafineweb-en-CC-MAIN-2025-21-part-0001-of-512.parquet", ultra_fineweb),
    "finemath-3plus": ("finemath", "finemath-3plus", "train-00000-of-00128.parquet", finemath),
    "cosmopedia-v2": ("cosmopedia", "cosmopedia-v2", "train-00000-of-00104.parquet", cosmopedia),
    "ultradata-math": ("ultradata_math", "data/UltraData-Math-L2-preview",
                       "UltraData-Math-L2-part-00001-of-00138.parquet", ultradata_math),
}
TEXT_KEY = {"fineweb-edu": "text", "ultra-fineweb": "content", "finemath-3plus": "text", "cosmopedia-v2": "text",
            "ultradata-math": "content"}


def write_sample(root: Path, corpus: str, rows: int = ROWS, table: pa.Table | None = None) -> Path:
    """ROOT/<corpus>/<hub subset>/<file>.parquet; returns the subset folder (a local mirror's --input)."""
    _, subset, name, build = LAYOUT[corpus]
    folder = Path(root) / corpus / subset
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table if table is not None else build(_texts(CORPORA.index(corpus), rows)), folder / name)
    return folder


def write_all(root: Path, rows: int = ROWS) -> dict[str, Path]:
    return {c: write_sample(root, c, rows) for c in CORPORA}
