"""Downstream tasks and bits per byte in the training loop: the eval row, eval.csv and the plot carry
them; a resumed run logs the same task scores as an uninterrupted one; a task that cannot load is
one line before step 0."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from shards.evalsets import write_multiple_choice_task
from shards.tokenizers import HFTokenizer
from trainhelp import make_source, make_tokenizer_json, metric_rows, tiny_curriculum, train

pytest.importorskip("lm_eval")

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A curriculum whose sources are tokenized by a loadable tokenizer.json (so bpb and tasks run) and a
    local multiple-choice task in its vocabulary: arithmetic progressions, as the sources hold."""
    root = tmp_path_factory.mktemp("evalloop")
    tok_path = make_tokenizer_json(root / "tok.json")
    info = HFTokenizer(tok_path).info()
    a, b = make_source(root / "src/a", 1, info=info), make_source(root / "src/b", 2, info=info)
    docs = []
    for i in range(12):
        start, step = 1 + 5 * i % 50, 1 + i % 3
        seq = [f"w{start + step * k}" for k in range(6)]
        wrong = [f"w{1 + (start * 7 + k * 11) % 62}" for k in range(3)]
        docs.append({"question": " ".join(seq[:5]), "choices": [" " + seq[5], *(" " + w for w in wrong)], "answer": 0})
    tasks = root / "tasks"
    write_multiple_choice_task(tasks, "seq_mc", docs)
    (tasks / "broken.yaml").write_text("task: broken_task\ndataset_path: json\n  oops: [unclosed\n")
    cur = tiny_curriculum(root, tokenizer={"name": "tiny-words", "path": str(tok_path)},
                          data={"sources": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}],
                                "schedule": [{"at": 0.0, "weights": {"a": 0.9, "b": 0.1}},
                                             {"at": 1.0, "weights": {"a": 0.1, "b": 0.9}}]},
                          eval={"every": 4, "batches": 1, "tasks": ["seq_mc"], "include_path": str(tasks)},
                          checkpoint={"every": 4, "keep_last": 3})
    run = root / "run"
    rc, _, err = train([cur, "--run-dir", run])
    assert rc == 0, err
    return cur, run, tasks


def test_eval_rows_hold_bpb_and_lm_eval_scores(setup):
    cur, run, _ = setup
    evals = metric_rows(run, "eval")
    assert [e["step"] for e in evals] == [4, 8]
    for e in evals:
        assert set(e["bpb"]) == {"a", "b", "overall"} and all(0 < v < 50 for v in e["bpb"].values())
        assert set(e["tasks"]) == {"seq_mc"} and {"acc", "acc_norm"} <= set(e["tasks"]["seq_mc"])
        assert all(0.0 <= e["tasks"]["seq_mc"][m] <= 1.0 for m in ("acc", "acc_norm"))
        assert e["tasks_seconds"] > 0
    with open(run / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    task_rows = {(int(r["step"]), r["metric"]): float(r["value"]) for r in rows if r["task"] == "seq_mc"}
    assert task_rows[(8, "acc_norm")] == pytest.approx(evals[-1]["tasks"]["seq_mc"]["acc_norm"], abs=1e-6)
    overall = [r for r in rows if r["source"] == "overall"]
    assert float(overall[-1]["bpb"]) == pytest.approx(evals[-1]["bpb"]["overall"], rel=1e-5)
    assert (run / "training.png").stat().st_size > 0


def test_trainer_evaluate_on_the_final_checkpoint_agrees_with_the_loop(setup, tmp_path):
    """lm-eval's HF backend on an export of the final checkpoint gives the loop's scores, and
    trainer.evaluate's bpb on the run's val shards is the loop's bpb."""
    from trainer.tools.evaluate import evaluate

    cur, run, tasks = setup
    res = evaluate(run, ["seq_mc"], include_path=str(tasks), output=tmp_path / "lm_eval.json")
    last = metric_rows(run, "eval")[-1]
    hf = {m.split(",")[0]: v for m, v in res["results"]["seq_mc"].items() if m.split(",")[0] in ("acc", "acc_norm")}
    assert hf == {m: last["tasks"]["seq_mc"][m] for m in ("acc", "acc_norm")}
    assert res["bpb"] == pytest.approx(last["bpb"], rel=1e-6)


def test_resumed_run_logs_the_same_task_scores(setup, tmp_path):
    """Resume from the step-4 checkpoint (as after a crash past it): the step-8 eval scores the same."""
    cur, run, _ = setup
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints/step_0000008")
    (resumed / "DONE").unlink()
    rc, _, err = train([cur, "--run-dir", resumed, "--resume"])
    assert rc == 0, err
    want, got = metric_rows(run, "eval")[-1], metric_rows(resumed, "eval")[-1]
    assert got["step"] == want["step"] == 8
    assert got["tasks"] == want["tasks"] and got["bpb"] == want["bpb"]


@pytest.mark.parametrize("name, words", [("seq_mcc", ["seq_mcc", "did you mean", "seq_mc"]),
                                         ("broken_task", ["broken_task", "broken.yaml"])])
def test_a_task_that_cannot_load_is_one_line_before_step_0(setup, tmp_path, capsys, name, words):
    cur, _, _ = setup
    rc, out, err = train([cur, "--run-dir", tmp_path / "r", f"eval.tasks=[{name}]"], capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "eval.tasks" in line and all(w in line for w in words), err
    assert "Traceback" not in err and not (tmp_path / "r" / "metrics.jsonl").exists()


def test_dry_run_lists_the_tasks_and_their_examples(setup, capsys):
    cur, _, _ = setup
    rc, out, err = train([cur, "--dry-run", "--json"], capsys)
    assert rc == 0, err
    assert "seq_mc" in out and "12 examples" in out
    assert json.loads(out.strip().splitlines()[-1])["stages"][0]["tasks"] == {"seq_mc": 12}


def _edit_manifest(source, **extra):
    m = json.loads((source / "manifest.json").read_text())
    m["extra"] = {**m.get("extra", {}), **extra}
    (source / "manifest.json").write_text(json.dumps(m))


def test_dry_run_warns_when_eval_tasks_were_not_decontaminated(setup, tmp_path, capsys):
    cur, _, _ = setup
    rc, out, err = train([cur, "--dry-run"], capsys)
    assert rc == 0, err
    assert "[decont] eval.tasks not decontaminated" in out and "source 'a': seq_mc" in out
    sources = [tmp_path / n for n in "ab"]
    for s, orig in zip(sources, ("a", "b")):
        shutil.copytree(cur.parent / "src" / orig, s)
        _edit_manifest(s, decontamination={"tasks": ["seq_mc"]})
    rc, out, err = train([cur, "--dry-run", f"data.sources.0.path={sources[0]}", f"data.sources.1.path={sources[1]}"],
                         capsys)
    assert rc == 0, err
    assert "[decont]" not in out


def test_sources_split_by_different_rules_are_refused_in_one_line(setup, tmp_path, capsys):
    """A page would be val in one source and train in the other: refused before step 0, naming both."""
    cur, _, _ = setup
    b = tmp_path / "b"
    shutil.copytree(cur.parent / "src" / "b", b)
    _edit_manifest(b, split_key="text", split_normalization="nfc+whitespace")
    rc, out, err = train([cur, f"data.sources.1.path={b}", "--run-dir", tmp_path / "r"], capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert "data.sources" in line and "'a'" in line and "'b'" in line and "split key text" in line, err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_task_with_fewer_examples_than_ranks_is_refused(setup, capsys, monkeypatch):
    """lm-eval gives each rank every world-th example: a rank with none would fail at the eval, so it
    is one line before step 0 (the dry run at world size 2 plans it without a process group)."""
    cur, _, _ = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, out, err = train([cur, "--dry-run", "eval.limit=1"], capsys)
    assert rc == 2 and "seq_mc (1 examples)" in err and "2 ranks" in err and "Traceback" not in err, err
