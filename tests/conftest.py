"""Shared test fixtures: offline assets, a small real-text corpus from Python's own docs, and a moto
S3 server on 127.0.0.1 (`server`, `s3`). The helpers behind them live in trainhelp.py."""
from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # importable without `pip install -e .` too
    sys.path.insert(0, str(REPO))
if str(REPO / "tests") not in sys.path:  # `import trainhelp` under any --import-mode
    sys.path.insert(0, str(REPO / "tests"))
# `../shared` beside the repo root (CI has it beside the clone).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA2_MODEL = SHARED_DATA / "llama2-tokenizer.model"

# Modules whose docstrings make a varied, deterministic English/code corpus (no download).
_DOC_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools",
    "gzip", "hashlib", "heapq", "http.client", "inspect", "io", "itertools", "json", "logging", "os",
    "pathlib", "pickle", "random", "re", "shutil", "socket", "statistics", "string", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)


def real_texts(limit: int = 400, min_chars: int = 40) -> list[str]:
    """pydoc_data.topics entries, then stdlib module/function docstrings; deterministic order."""
    from pydoc_data.topics import topics

    out = [topics[k] for k in sorted(topics)]
    for name in _DOC_MODULES:
        with warnings.catch_warnings():  # typing.io/typing.re deprecation on attribute access
            warnings.simplefilter("ignore")
            out.extend(_docstrings(name, min_chars))
    seen, uniq = set(), []
    for t in out:
        if t not in seen:
            seen.add(t)
            uniq.append(t)
    return uniq[:limit]


def _docstrings(name: str, min_chars: int) -> list[str]:
    mod = importlib.import_module(name)
    docs = [inspect.getdoc(mod)] + [
        inspect.getdoc(obj) for attr, obj in sorted(vars(mod).items())
        if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == mod.__name__
    ]
    return [d for d in docs if d and len(d) >= min_chars]


# Hand-made edge cases: unicode, emoji, whitespace runs, CRLF, digits, special-token strings as text.
TRICKY_TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\t\tnew\nlines\n\n\n and CRLF\r\nend",
    "café naïve résumé Zürich — “quotes” ‘single’ …",
    "e\u0301 decomposed vs \u00e9 composed",
    "emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 and CJK 中文字符 日本語 한국어",
    "Ελληνικά Русский العربية עברית हिन्दी",
    "numbers 3132 1234567890 3.14159 1e-9 0x1F",
    "code: def f(x):\n    return x ** 2  # square\n",
    "<|endoftext|> is just text here, as are <s> and </s> and <|im_start|>",
    "a" * 300,
    " ",
    "\n",
]


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return real_texts()


@pytest.fixture(scope="session")
def llama2_model() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} absent: llama2 tokenizer.model not available")
    return LLAMA2_MODEL


@pytest.fixture(scope="session")
def chat_bpe_json(tmp_path_factory) -> Path:
    """A 384-id byte-level BPE with EOS and the ChatML tokens, trained on Python's docs."""
    from trainhelp import make_bpe_json

    return make_bpe_json(tmp_path_factory.mktemp("tok") / "tokenizer.json", real_texts(150), vocab_size=384)


@pytest.fixture(scope="module")
def server():
    """moto's S3 server app on 127.0.0.1 (trainhelp.StoppableS3: stop() severs it, start() brings it back)."""
    pytest.importorskip("moto")
    from trainhelp import StoppableS3

    srv = StoppableS3()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def s3(server, monkeypatch, tmp_path):
    """(client, bucket): credentials in the environment only, nothing from ~/.aws, never the real AWS;
    a fresh bucket; moto's storage reset afterwards."""
    import uuid

    boto3 = pytest.importorskip("boto3")
    from trainhelp import SECRET

    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    bucket = "b-" + uuid.uuid4().hex[:12]
    client = boto3.client("s3", endpoint_url=server.endpoint)
    client.create_bucket(Bucket=bucket)
    yield client, bucket
    server.post("/moto-api/reset")


@pytest.fixture(autouse=True)
def _loguru_to_the_live_stderr():
    """datatrove's in-process executor ends by pointing loguru at whatever sys.stderr is then: inside a
    test using capsys/capfd, a capture stream closed when that test ends, so a later test's first
    datatrove log line prints 'Logging error in Loguru Handler' into its own captured stderr. After
    each test, point loguru back at the stderr that stays open."""
    yield
    if "datatrove.utils.logging" in sys.modules:
        sys.modules["datatrove.utils.logging"].setup_default_logger()


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    """A test of one process never sees torchrun's variables (a suite started under torchrun, or a
    test that set them): the trainer reads WORLD_SIZE even in a dry run."""
    from trainhelp import TORCHRUN_VARS

    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="session")
def four_step_run(tmp_path_factory):
    """(curriculum, run dir) of a finished 4-step tiny run, checkpoints at 2 and 4, no eval: trained
    once; tests copy the run dir (shutil.copytree) before resuming or editing it."""
    from trainhelp import tiny_curriculum, train

    root = tmp_path_factory.mktemp("four-steps")
    cur = tiny_curriculum(root, train={"steps": 4, "seed": 7, "dtype": "fp32"}, eval={"every": 0, "batches": 0},
                          checkpoint={"every": 2, "keep_last": 3})
    rc, _, err = train([cur, "--run-dir", root / "run"])
    assert rc == 0, err
    return cur, root / "run"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 4 MiB mounted for the test (skipped where mounting is not allowed)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True, text=True, check=False)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {(r.stderr or r.stdout).strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)
