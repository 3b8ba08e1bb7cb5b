"""Pipelines past one machine: our CLI on datatrove's Slurm and Ray executors.

- Slurm: `run --executor slurm` submits its stages as one chain of dependent jobs (afterok). With
  Debian's slurm-wlm installed, a one-node cluster on 127.0.0.1 (tests/slurm_cluster.sh) runs a
  chain for real and its shards must equal the local executor's; the `run --dedup` chain's shape is
  checked with a stand-in `sbatch` that records each script and refuses a dependency on a job it
  has not seen. Each test's name (or skip reason, with -ra) says which ran.
- Ray: a Ray head on 127.0.0.1 (skipped when the optional `ray` is not installed).
- More tasks than input files: a warning naming the idle tasks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.cli import main as cli_main
from pipelines.fineweb import CORPUS
from trainhelp import paragraphs, shard_files, write_corpus
from trainhelp import free_port

REPO = Path(__file__).resolve().parents[2]
TOK = ["--tokenizer", "cl100k", "--val-fraction", "0.2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "in", paragraphs(400), files=2)


@pytest.fixture(scope="module")
def local_shards(corpus, tmp_path_factory) -> Path:
    """The reference: the local executor, 3 tasks over the 2 input files."""
    out = tmp_path_factory.mktemp("local") / "shards"
    assert cli_main(CORPUS, ["tokenize", "--input", str(corpus), "--output", str(out), "--tasks", "3", *TOK]) == 0
    return out


def test_more_tasks_than_files_warns_naming_the_idle_tasks(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli_main(CORPUS, ["split", "--input", str(corpus), "--output", str(out), "--tasks", "5"]) == 0
    err = capsys.readouterr().err
    assert "--tasks 5 but the input has 2 file(s)" in err and "3 of the 5 tasks will get no documents" in err
    assert cli_main(CORPUS, ["split", "--input", str(corpus), "--output", str(tmp_path / "p"), "--tasks", "2"]) == 0
    assert "no documents" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ slurm


def slurm_args(corpus, out: Path, *extra) -> list[str]:
    return ["--input", str(corpus), "--output", str(out), "--tasks", "3", *TOK, "--executor", "slurm",
            "--slurm-partition", "debug", "--slurm-venv", sys.prefix, *extra]


def test_slurm_without_sbatch_or_with_a_bad_venv_is_one_line(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert cli_main(CORPUS, ["run", *slurm_args(corpus, tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "`sbatch` is not on PATH" in err, err
    monkeypatch.setenv("PATH", f"{standin_sbatch(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    args = slurm_args(corpus, tmp_path / "o")
    args[args.index("--slurm-venv") + 1] = str(tmp_path)
    assert cli_main(CORPUS, ["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--slurm-venv {tmp_path}: no virtualenv there" in err, err


_STANDIN = '''#!{python}
"""Stand-in sbatch: records each submission; a dependency must be afterok on a job seen before."""
import json, os, sys
log = os.environ["STANDIN_SBATCH_LOG"]
jobs = [json.loads(l) for l in open(log)] if os.path.exists(log) else []
args, script = sys.argv[1:-1], open(sys.argv[-1]).read()
deps = [d for a in args if a.startswith("--dependency=") for d in a.split("=", 1)[1].split(",")]
for d in deps:
    kind, _, job = d.partition(":")
    if kind != "afterok" or job not in [j["id"] for j in jobs]:
        sys.exit(f"sbatch: error: dependency {{d}} names no earlier job")
job = str(1000 + len(jobs))
with open(log, "a") as f:
    f.write(json.dumps({{"id": job, "deps": deps, "script": script}}) + "\\n")
print(f"Submitted batch job {{job}}")
'''


def standin_sbatch(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "standin-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(_STANDIN.format(python=sys.executable))
    (bin_dir / "sbatch").chmod(0o755)
    return bin_dir


def test_slurm_run_chain_with_standin_sbatch(corpus, tmp_path, monkeypatch):
    """Stand-in sbatch (nothing executes): filter -> 4 minhash stages -> tokenize -> manifest, each
    job afterok on the one before, every script activating the venv by its activate script."""
    log = tmp_path / "sbatch.jsonl"
    monkeypatch.setenv("STANDIN_SBATCH_LOG", str(log))
    monkeypatch.setenv("PATH", f"{standin_sbatch(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    assert cli_main(CORPUS, ["run", *slurm_args(corpus, tmp_path / "out", "--dedup")]) == 0
    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    name = {j["id"]: re.search(r"--job-name=(\S+)", j["script"]).group(1) for j in jobs}
    stages = [j for j in jobs if "merge_stats" not in j["script"]]
    assert [name[j["id"]] for j in stages] == [
        "fineweb-filter", "fineweb-minhash1_signatures", "fineweb-minhash2_buckets", "fineweb-minhash3_cluster",
        "fineweb-minhash4_filter", "fineweb-tokenize", "fineweb-manifest"]
    assert stages[0]["deps"] == []
    for before, job in zip(stages, stages[1:]):
        assert job["deps"] == [f"afterok:{before['id']}"], (name[job["id"]], job["deps"])
    for j in jobs:  # merge_stats jobs wait for the stage they summarise
        assert f"source {Path(sys.prefix).resolve() / 'bin' / 'activate'}\n" in j["script"]
    assert len(jobs) == 2 * len(stages)
    # the tokenize job reads what the dedup job will write (not checked at submit time: not there yet)
    assert not (tmp_path / "out" / "dedup" / "kept").exists()
    assert "dedup/kept" in (tmp_path / "out" / "logs" / "tokenize" / "executor.json").read_text()


def _squeue_empty(env) -> bool:
    return subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, check=True).stdout.strip() == ""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "squeue") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"a real one-node Slurm needs Debian's slurm-wlm (missing {', '.join(missing)}); "
                    "the stand-in sbatch test covers the chain")
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip("the tests do not run in a virtualenv for the Slurm jobs to activate")
    d = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(REPO / "tests" / "slurm_cluster.sh"), "start", str(d)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"slurmctld/slurmd did not start on 127.0.0.1: {r.stderr.strip()[-300:]}")
    yield d, r.stdout.strip()
    subprocess.run(["bash", str(REPO / "tests" / "slurm_cluster.sh"), "stop", str(d)], timeout=30)


@pytest.mark.slow
def test_slurm_tokenize_chain_on_a_one_node_cluster_equals_local(slurm, corpus, local_shards, tmp_path, monkeypatch):
    """Real slurmctld + slurmd: the tokenize array job, then the manifest job afterok on it; the
    shards and manifest equal the local executor's byte for byte."""
    d, conf = slurm
    monkeypatch.setenv("SLURM_CONF", conf)
    out = tmp_path / "shards"
    assert cli_main(CORPUS, ["tokenize", *slurm_args(corpus, out)]) == 0
    deadline = time.time() + 120
    while not _squeue_empty(os.environ) and time.time() < deadline:
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((out / "logs").rglob("slurm_logs/*.out")))
    assert (out / "manifest.json").exists(), f"no manifest after the chain ran:\n{logs}"
    assert shard_files(out) == shard_files(local_shards)


# -------------------------------------------------------------------------------------------- ray


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1, in its own process group (killed if it does not stop)."""
    pytest.importorskip("ray", reason="ray is not installed (an optional extra: pip install -e '.[ray]')")
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    temp = Path("/tmp") / f"ray-t{port}"  # ray's socket paths must stay short
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_ADDRESS": address}
    try:
        deadline = time.time() + 90
        while subprocess.run([str(ray_bin), "status", f"--address={address}"], env=env,
                             capture_output=True).returncode != 0:
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray head did not start: {head.stderr.read().decode()[-1000:]}")
            time.sleep(1)
        yield address
    finally:
        head.terminate()  # the head stops the raylet, GCS and workers it started (~1 s)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_head_on_loopback_gives_the_local_shards(ray_head, corpus, local_shards, tmp_path):
    out = tmp_path / "shards"
    env = {**os.environ, "RAY_ADDRESS": ray_head, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pipelines.fineweb", "tokenize", "--input", str(corpus), "--output",
                        str(out), "--tasks", "3", *TOK, "--executor", "ray"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 of the 3 tasks will get no documents" in r.stderr
    assert shard_files(out) == shard_files(local_shards)
