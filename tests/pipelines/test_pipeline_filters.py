"""The FineWeb filter chain and MinHash dedup, offline: no socket may be opened while they run."""
from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main as cli_main, read_stats
from pipelines.fineweb import CORPUS

ENGLISH = (
    "The river town grew slowly over two hundred years, and its people learned to live with the floods "
    "that came every spring. Farmers planted their fields on the higher ground, while the merchants built "
    "their shops on stone foundations near the old bridge. Children walked to the small school on the hill, "
    "where a single teacher taught reading, arithmetic and the history of the valley. In the evenings, "
    "families gathered on their porches to talk about the weather, the price of grain and the news that "
    "arrived with the weekly mail coach. When the railway finally reached the town, everything changed: "
    "new families moved in, a hospital was opened, and the market square filled with goods from distant "
    "cities. Yet the older residents still measured the seasons by the height of the water against the "
    "bridge, and they told their grandchildren stories about the great flood that had once reached the church."
)
FRENCH = (
    "La petite ville au bord de la rivière a grandi lentement pendant deux siècles, et ses habitants ont "
    "appris à vivre avec les crues qui arrivaient chaque printemps. Les agriculteurs cultivaient leurs champs "
    "sur les hauteurs, tandis que les marchands construisaient leurs boutiques sur des fondations de pierre "
    "près du vieux pont. Les enfants marchaient jusqu'à la petite école sur la colline, où une seule "
    "institutrice enseignait la lecture, le calcul et l'histoire de la vallée."
)


@pytest.fixture
def no_network(monkeypatch):
    real_connect = socket.socket.connect

    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    def connect(self, address):
        if self.family == socket.AF_UNIX:  # the executor's multiprocessing manager: local only
            return real_connect(self, address)
        refuse(address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_local_language_id_english_and_french(no_network):
    from datatrove.data import Document

    from pipelines.filters import LocalLanguageFilter, local_lid_model

    assert Path(local_lid_model()).name == "lid.176.ftz"
    lf = LocalLanguageFilter(language_threshold=0.65)
    en = Document(text=ENGLISH, id="en")
    fr = Document(text=FRENCH, id="fr")
    assert lf.filter(en) is True
    assert en.metadata["language"] == "en" and en.metadata["language_score"] >= 0.65
    assert not lf.filter(fr)
    assert fr.metadata["language"] == "fr" and fr.metadata["language_score"] > 0.65


def test_url_filter_offline_without_env_and_import_leaves_env(monkeypatch, no_network):
    """The URL filter needs no TLDEXTRACT_* variable to stay offline, and importing the filters
    module does not touch the process environment."""
    from datatrove.data import Document

    from pipelines.filters import LocalURLFilter

    env = {k: v for k, v in os.environ.items() if not k.startswith("TLDEXTRACT")}
    probe = ("import os; before = dict(os.environ); import pipelines.filters; "
             "changed = sorted(set(os.environ.items()) ^ set(before.items())); print(changed)")
    r = subprocess.run([sys.executable, "-c", probe], env=env, cwd=Path(__file__).resolve().parents[2],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
    for k in [k for k in os.environ if k.startswith("TLDEXTRACT")]:
        monkeypatch.delenv(k)
    f = LocalURLFilter()
    assert f.tldextractor.suffix_list_urls == ()
    assert f.tldextractor("https://news.example.co.uk/x").top_domain_under_public_suffix == "example.co.uk"
    assert f.filter(Document(text="t", id="ok", metadata={"url": "https://example.org/history"})) is True
    assert f.filter(Document(text="t", id="bad", metadata={"url": "https://example.com/bukkake/page"}))[0] is False


def _read_removed(out: Path, name: str) -> list[str]:
    ids = []
    for f in sorted((out / "removed" / name).glob("*.jsonl.gz")):
        with gzip.open(f, "rt") as fh:
            ids += [json.loads(line)["id"] for line in fh]
    return ids


def test_fineweb_chain_runs_offline_with_counts(tmp_path, no_network, capsys):
    rows = [
        {"id": "good", "text": ENGLISH, "url": "https://example.org/history/river-town"},
        {"id": "good2", "text": ENGLISH.replace("river", "mountain").replace("floods", "storms"),
         "url": "https://example.org/history/mountain-town"},
        {"id": "badurl", "text": ENGLISH, "url": "https://example.com/bukkake/page"},
        {"id": "french", "text": FRENCH, "url": "https://example.fr/ville"},
        {"id": "repeat", "text": "buy cheap shoes now and save money today. " * 60, "url": "https://example.org/a"},
        {"id": "short", "text": ("Please note that our village library closes early on Friday because of the spring holiday. "
                      "Borrowed books may be returned through the slot beside the main door, and the reading room "
                      "opens again on Monday morning with new magazines, local newspapers and a small exhibition "
                      "about bridges."), "url": "https://example.org/b"},
    ]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "filtered"
    assert cli_main(CORPUS, ["filter", "--input", str(inp), "--output", str(out), "--workers", "1"]) == 0
    table = capsys.readouterr().out
    assert "Url-filter" in table and "dropped" in table
    assert _read_removed(out, "url") == ["badurl"]
    assert _read_removed(out, "language") == ["french"]
    assert _read_removed(out, "gopher_repetition") == ["repeat"]
    assert _read_removed(out, "gopher_quality") == ["short"]
    kept = []
    for f in sorted((out / "kept").glob("*.jsonl.gz")):
        with gzip.open(f, "rt") as fh:
            kept += [json.loads(line) for line in fh]
    assert [r["id"] for r in kept] == ["good", "good2"]
    assert kept[0]["metadata"]["language"] == "en"
    stats = dict(read_stats(str(out / "logs" / "filter")))
    filters = [(n, s) for n, s in stats.items() if "FILTER" in n]
    assert len(filters) == 6
    total_in = 6
    for name, s in filters:  # every document is accounted for at each filter
        assert s.get("total", 0) == total_in and s.get("forwarded", 0) + s.get("dropped", 0) == total_in, name
        total_in = s.get("forwarded", 0)
    assert total_in == 2


def test_minhash_dedup_stage(tmp_path, no_network):
    other = [
        "Bees collect nectar from hundreds of flowers every day and carry it back to the hive, where workers "
        "turn it into honey that feeds the colony through the long winter months.",
        "A lighthouse keeper once had to climb the spiral staircase several times each night to wind the clock "
        "mechanism that turned the great lens and kept ships away from the rocks.",
        "Modern bicycles use chains and gears so that riders can choose an easy ratio for steep hills and a "
        "harder one for flat roads, which makes long journeys far less tiring.",
    ]
    rows = [{"id": "a", "text": ENGLISH}, {"id": "a-copy", "text": ENGLISH + " The end."},
            {"id": "b", "text": FRENCH}] + [{"id": f"u{i}", "text": t} for i, t in enumerate(other)]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dedup"
    assert cli_main(CORPUS, ["dedup", "--input", str(inp), "--output", str(out), "--workers", "1"]) == 0
    kept = []
    for f in sorted((out / "kept").glob("*.jsonl.gz")):
        with gzip.open(f, "rt") as fh:
            kept += [json.loads(line)["id"] for line in fh]
    removed = _read_removed(out, "minhash")
    assert len(removed) == 1 and removed[0] in ("a", "a-copy")
    assert sorted(kept + removed) == sorted(r["id"] for r in rows)


def test_split_with_filter_applies_the_chain_inline(tmp_path, no_network):
    rows = [{"id": "en", "text": ENGLISH, "url": "https://example.org/en"},
            {"id": "fr", "text": FRENCH, "url": "https://example.fr/fr"}]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def split_ids(out):
        ids = []
        for f in sorted(out.glob("*/*.jsonl.gz")):
            with gzip.open(f, "rt") as fh:
                ids += [json.loads(line)["id"] for line in fh]
        return sorted(ids)

    base = ["split", "--input", str(inp), "--workers", "1", "--val-fraction", "0"]
    assert cli_main(CORPUS, [*base, "--output", str(tmp_path / "plain")]) == 0
    assert split_ids(tmp_path / "plain") == ["en", "fr"]
    assert cli_main(CORPUS, [*base, "--output", str(tmp_path / "filtered"), "--filter"]) == 0
    assert split_ids(tmp_path / "filtered") == ["en"]
