"""What a newcomer following the README hits: each case was a traceback, a silent no-op or a
misleading table before its fix. Kept fast (tiny models, in-process CLIs)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trainhelp
import yaml

from datatrove.data import Document

from pipelines.cli import main as fineweb_main
from pipelines.cli import print_stats
from pipelines.fineweb import CORPUS
from pipelines.filters import WEB_CHAIN, build_filters


def test_url_filter_passes_and_counts_documents_without_url(tmp_path):
    """A plain {id, text} corpus (README: `--input` any jsonl) through `filter`: datatrove's URLFilter
    asserted on the missing url and killed the task; now such documents pass, counted."""
    url_filter = build_filters(WEB_CHAIN, str(tmp_path))[0]
    docs = [Document(text="A document with no url.", id="a"),
            Document(text="One with a url.", id="b", metadata={"url": "https://docs.python.org/3/"})]
    kept = list(url_filter.run(iter(docs), rank=0, world_size=1))
    assert [d.id for d in kept] == ["a", "b"]
    assert url_filter.stats["no_url"].total == 1


def test_writer_row_is_not_shown_as_a_filter_that_kept_nothing(tmp_path, capsys):
    """The stage table printed a JsonlWriter (it counts "total") as `in N, kept 0, dropped 0`."""
    stats = [{"name": "💽 - WRITER: 🐿 Jsonl", "stats": {"train/XXXXX.jsonl.gz": 52, "val/XXXXX.jsonl.gz": 8,
                                                       "total": 60}}]
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "00000.json").write_text(json.dumps(stats))
    print_stats("split", str(tmp_path))
    line = [l for l in capsys.readouterr().out.splitlines() if "WRITER" in l][0]
    assert "60" in line.split() and "0" not in line.split(), line


def test_download_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert fineweb_main(CORPUS, ["download", "--output", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: download HuggingFaceFW/fineweb/sample/10BT") and "\n" not in err, err


# ------------------------------------------------------------------------------------------ trainer


@pytest.fixture()
def finished_run(tmp_path, four_step_run):
    """A copy of the finished 4-step run (checkpoints at 2 and 4)."""
    cur, done = four_step_run
    return cur, shutil.copytree(done, tmp_path / "run")


def test_resume_of_a_finished_run_with_more_steps_is_refused(finished_run, capsys):
    """It printed "already done" and exited 0 without training: the new train.steps was ignored."""
    cur, run_dir = finished_run
    rc, out, err = trainhelp.train([cur, "--run-dir", run_dir, "--resume", "train.steps=8"], capsys)
    assert rc == 2
    assert "finished at step 4" in err and "train.init_from=" in err and len(err.strip().splitlines()) == 1, err
    # the same settings still resume as "done"
    rc, out, err = trainhelp.train([cur, "--run-dir", run_dir, "--resume"], capsys)
    assert rc == 0 and "already done" in out


def test_resume_with_changed_settings_is_one_line(finished_run, capsys):
    """An unfinished run resumed with another train.steps: the loader's ValueError was a traceback."""
    cur, run_dir = finished_run
    (run_dir / "DONE").unlink()
    rc, out, err = trainhelp.train([cur, "--run-dir", run_dir, "--resume", "train.steps=9"], capsys)
    assert rc == 2
    assert "cannot resume with these settings" in err and "train.steps 4" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_bad_tokenizer_path_fails_before_training(tmp_path, capsys):
    """The tokenizer is only needed for the end-of-run sample, so a typo in tokenizer.path used to
    surface after the whole run. Now it stops before the first step."""
    cur = trainhelp.tiny_curriculum(tmp_path)
    raw = yaml.safe_load(cur.read_text())
    raw["sample"] = {"prompt": "hello", "max_new_tokens": 4}
    cur.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    rc, out, err = trainhelp.train([cur, "--run-dir", run_dir, f"tokenizer.path={tmp_path / 'nope.json'}"], capsys)
    assert rc == 2 and "nope.json" in err and "tokenizer" in err, err
    assert not (run_dir / "checkpoints").exists(), "trained before failing on the tokenizer"


def test_checkpoint_config_makes_the_tokenizer_path_absolute(tmp_path, monkeypatch):
    # trainer.tools.generate reads config.json from anywhere; a path relative to the training cwd would not resolve.
    from trainer.config import load_curriculum
    from trainer.resume import checkpoint_config

    (tmp_path / "tok.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    cfg = load_curriculum(Path(__file__).resolve().parents[2] / "curricula/demo-atom.yaml", ["tokenizer.path=tok.json"])[-1]
    out = checkpoint_config(cfg, world=1)
    assert out["tokenizer"]["path"] == str((tmp_path / "tok.json").resolve())
    assert out["world_size"] == 1 and out["model"] == cfg.to_dict()["model"]
