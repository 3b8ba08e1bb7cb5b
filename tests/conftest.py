"""Shared test fixtures: offline assets and a small real-text corpus from Python's own docs."""
from __future__ import annotations

import importlib
import inspect
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
