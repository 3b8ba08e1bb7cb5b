"""Input readers: datatrove's JSONL/Parquet readers with bad rows counted and named, not dropped
silently, plus the input checks the CLI runs before any executor starts.

datatrove's own readers skip a row without text after a single anonymous warning, and stop reading
a JSONL file at the first invalid UTF-8 byte (losing the rest of the file). Ours read JSONL as bytes
line by line, so a bad line costs only itself, and every skip is a stat plus a log line naming the
file and row (for the first few).

A local file that breaks part-way (a truncated .jsonl.gz, a parquet data page that does not decode)
keeps the rows read before the damage (a parquet file also its other row groups) and is a counted
skip (`skipped_unreadable`, and `skipped_unreadable_rows` where the file says how many it holds) with
one line naming the file and row. A remote one fails its task instead, with the same line: a rerun retries a network error.
"""
from __future__ import annotations

import functools
import json
import lzma
import zlib
from pathlib import Path
from time import perf_counter

import orjson

from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseReader
from datatrove.utils.logging import logger
from datatrove.utils.stats import MetricStats

from .steps import POSITION_ID_FLAG

def _distribution_installed(name: str) -> bool | None:
    """datatrove's `_is_distribution_available` (True, or None when absent), by one metadata lookup."""
    import importlib.metadata

    try:
        return True if importlib.metadata.distribution(name).metadata.get("Name", "").lower() == name else None
    except importlib.metadata.PackageNotFoundError:
        return None


def use_fast_dependency_check() -> None:
    """Every datatrove step checks, when constructed (and unpickled in each worker), that its pip
    distributions are installed, by parsing the metadata of every installed distribution: about 75 ms
    per process, most of a one-file run's start-up after imports. The same answer from one lookup."""
    from datatrove.utils import _import_utils

    current = getattr(_import_utils, "_is_distribution_available", None)
    if current is None:  # a datatrove without it: nothing to speed up
        return
    if getattr(current, "__wrapped__", None) is not _distribution_installed:
        _import_utils._is_distribution_available = functools.lru_cache(_distribution_installed)


use_fast_dependency_check()  # here: every process that builds or unpickles our steps imports this module

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".jsonl.bz2")
PARQUET_SUFFIXES = (".parquet",)
FOLDER_GLOB = {"parquet": "**/*.parquet", "jsonl": "**/*.json*"}  # a folder input's files, by format
MAX_LOGGED = 5


class InputError(Exception):
    """Bad input path: the CLI prints it and exits with status 2 before starting any executor."""


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged file raises while being read or decompressed (by codec and by pyarrow)."""
    import pyarrow as pa
    import zstandard

    return (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zstandard.ZstdError, pa.ArrowException)


def _lines(f, chunk: int = 1 << 20):
    """The lines of a binary stream, every complete line decoded before a read error delivered first
    (a buffered readline reads a chunk ahead, and an error in that read loses all its lines)."""
    read = getattr(f, "read1", None) or f.read
    tail = b""
    while block := read(chunk):
        *lines, tail = (tail + block).split(b"\n")
        yield from lines
    if tail:
        yield tail


class _CountingMixin:
    """Shared row checks. `self._logged` bounds the log lines; stats count every case.

    Per-document bookkeeping is batched: datatrove's reader updates a running doc_len statistic and
    a timer for every row, which costs more than parsing a short row. Lengths and times are collected
    and merged into the same datatrove statistics every STATS_EVERY documents and when the task ends
    (`MetricStats.__add__` merges count, mean, variance, min and max exactly)."""

    invalid_utf8 = "skip"
    STATS_EVERY = 4096

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        self._doc_lens, self._row_times = [], []
        # The last batch is merged when the reader is drained or closed: datatrove drains the pipeline
        # before it saves a task's stats, and a step that stopped early would close this generator.
        try:
            yield from super().run(data, rank, world_size)
        finally:
            self._flush_doc_stats()

    def update_doc_stats(self, document) -> None:
        self._doc_lens.append(len(document.text))
        if token_count := document.metadata.get("token_count"):
            self.stat_update("doc_len_tokens", value=token_count, unit="doc")
        if len(self._doc_lens) >= self.STATS_EVERY:
            self._flush_doc_stats()

    def _timed(self, seconds: float) -> None:
        self._row_times.append(seconds)
        if len(self._row_times) >= self.STATS_EVERY:
            self._flush_doc_stats()

    def _flush_doc_stats(self) -> None:
        if self._doc_lens:
            self.stats["doc_len"] = self.stats["doc_len"] + metric_stats(self._doc_lens, "doc")
            self._doc_lens.clear()
        if self._row_times:
            t = self.stats.time_stats
            # MetricStats' merge, not TimingStats': these are more rows of this same task, and the
            # timer's own `+` would count them as another task in its per-task figures
            self.stats.time_stats = MetricStats.__add__(t, metric_stats(self._row_times, t.unit, type(t)))
            self._row_times.clear()

    def _note(self, label: str, filepath: str, row: int, why: str) -> None:
        self.stat_update(label)
        n = getattr(self, "_logged", 0)
        if n < MAX_LOGGED:
            self._logged = n + 1
            logger.warning(f"{filepath} row {row}: {why} ({label})")

    def _unreadable(self, filepath: str, row: int, e: BaseException, what: str = "the rest of the file",
                    lost_rows: int | None = None) -> None:
        """A file that broke at `row`: a counted, named skip of `what` (local), or a failed task (remote)."""
        why = " ".join(str(e).split())[:300]
        msg = f"{filepath}: unreadable at row {row} ({type(e).__name__}: {why})"
        from fsspec.implementations.local import LocalFileSystem

        if not isinstance(self.data_folder.fs, LocalFileSystem):
            raise RuntimeError(msg + "; the task fails so that a rerun retries it") from None
        self.stat_update("skipped_unreadable")
        if lost_rows:
            self.stat_update("skipped_unreadable_rows", value=lost_rows)
        logger.warning(f"{msg}: rows read before it are kept, {what} is skipped "
                       f"(skipped_unreadable{'' if lost_rows is None else f', {lost_rows} rows lost'})")

    def _row_to_document(self, data, filepath: str, row: int):
        if not isinstance(data, dict):
            self._note("skipped_not_object", filepath, row, f"a JSON {type(data).__name__}, not an object")
            return None
        text = data.get(self.text_key)
        if text is None:
            why = f"'{self.text_key}' is null" if self.text_key in data else \
                f"no '{self.text_key}' field (keys: {sorted(data)[:8]})"
            self._note("skipped_no_text", filepath, row, why)
            return None
        if not isinstance(text, str):
            self._note("skipped_no_text", filepath, row, f"'{self.text_key}' is {type(text).__name__}, not text")
            return None
        if not text.strip():
            self._note("skipped_empty", filepath, row, "empty text")
            return None
        had_id = data.get(self.id_key) not in (None, "")
        # BaseReader's conversion, then file_path resolved once per file (datatrove's disk reader
        # resolves it through fsspec for every row, which costs more than parsing the row).
        doc = BaseReader.get_document_from_dict(self, data, filepath, row)
        if doc is not None and getattr(self, "add_file_path", False):
            if getattr(self, "_resolved_for", None) != filepath:
                self._resolved_for, self._resolved = filepath, self.data_folder.resolve_paths(filepath)
            doc.metadata.setdefault("file_path", self._resolved)
        if doc is not None and not had_id:
            # datatrove names it "<file>/<row>"; flag it so HashSplit hashes the text instead.
            doc.metadata[POSITION_ID_FLAG] = True
        return doc


def metric_stats(values: list, unit: str, cls=MetricStats) -> MetricStats:
    """datatrove's running statistic (`cls`: MetricStats or TimingStats) of `values`, equal to
    `update`-ing each in turn: count, total, mean, min, max and the sum of squared deviations."""
    import numpy as np

    x = np.asarray(values)
    mean = float(x.mean())
    as_py = int if x.dtype.kind in "iu" else float
    return cls(total=as_py(x.sum()), n=len(x), mean=mean, min=as_py(x.min()), max=as_py(x.max()),
               _running_variance=float(((x - mean) ** 2).sum()), unit=unit)


class CountingJsonlReader(_CountingMixin, JsonlReader):
    name = "🐿 Jsonl (counted)"

    def __init__(self, *args, invalid_utf8: str = "skip", **kwargs):
        super().__init__(*args, **kwargs)
        if invalid_utf8 not in ("skip", "replace"):
            raise ValueError(f"invalid_utf8 must be 'skip' or 'replace', got {invalid_utf8!r}")
        self.invalid_utf8 = invalid_utf8

    def read_file(self, filepath: str):
        row = 0  # lines read whole so far: where a damaged file broke
        try:
            with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
                for raw in _lines(f):
                    t0 = perf_counter()
                    document = self._parse_line(raw, filepath, row) if raw.strip() else None
                    self._timed(perf_counter() - t0)
                    row += 1
                    if document is not None:
                        yield document
        except _read_errors() as e:
            self._unreadable(filepath, row, e)

    def _parse_line(self, raw: bytes, filepath: str, row: int):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.invalid_utf8 == "skip":
                self._note("skipped_invalid_utf8", filepath, row, f"invalid UTF-8 at byte {e.start}")
                return None
            self.stat_update("replaced_invalid_utf8")
            line = raw.decode("utf-8", "replace")
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            try:  # orjson rejects lone surrogate escapes ("\ud800"): text that is not valid UTF-8
                data = json.loads(line)
            except ValueError:
                self._note("skipped_bad_json", filepath, row, f"invalid JSON ({e})")
                return None
            if self.invalid_utf8 == "skip":
                self._note("skipped_invalid_utf8", filepath, row, f"lone surrogate escape, not valid UTF-8 ({e})")
                return None
            self.stat_update("replaced_invalid_utf8")
            data = {k: _fix_surrogates(v) for k, v in data.items()} if isinstance(data, dict) else data
        return self._row_to_document(data, filepath, row)


def _fix_surrogates(v):
    return v.encode("utf-8", "replace").decode("utf-8") if isinstance(v, str) else v


class CountingParquetReader(_CountingMixin, ParquetReader):
    name = "📒 Parquet (counted)"

    def read_file(self, filepath: str):
        import pyarrow.parquet as pq

        try:
            with self.data_folder.open(filepath, "rb") as f, pq.ParquetFile(f) as pqf:
                if self.text_key not in pqf.schema_arrow.names:
                    self._note("skipped_no_text_file", filepath, 0,
                               f"no '{self.text_key}' column (columns: {pqf.schema_arrow.names[:8]})")
                    self.stat_update("skipped_no_text", value=pqf.metadata.num_rows)
                    return
                yield from self._read_row_groups(pqf, filepath)
        except _read_errors() as e:  # the footer itself (a remote file is not checked up front)
            self._unreadable(filepath, 0, e, "the whole file")

    def _read_row_groups(self, pqf, filepath: str):
        """Row group by row group, so a damaged page costs only its own row group."""
        columns = None if self.read_metadata else [c for c in (self.text_key, self.id_key)
                                                   if c in pqf.schema_arrow.names]
        first = 0  # the row group's first row in the file
        for rg in range(pqf.num_row_groups):
            n, row = pqf.metadata.row_group(rg).num_rows, first
            try:
                for batch in pqf.iter_batches(batch_size=self.batch_size, row_groups=[rg], columns=columns):
                    documents = []
                    with self.track_time("batch"):
                        for data in batch.to_pylist():
                            doc = self._row_to_document(data, filepath, row)
                            row += 1
                            if doc is not None:
                                documents.append(doc)
                    yield from documents
            except _read_errors() as e:
                self._unreadable(filepath, row, e, f"the rest of row group {rg}", lost_rows=first + n - row)
            first += n


# ------------------------------------------------------------------------------------- input paths


def _fmt(name: str) -> str | None:
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def check_hub_input(path: str) -> None:
    """One listing of an hf:// folder before any executor starts, so being offline (or a typo in the
    repo path) is one clear line instead of a network traceback from inside a datatrove worker."""
    from huggingface_hub import HfFileSystem

    try:
        names = HfFileSystem().ls(path.removeprefix("hf://"), detail=False)
    except FileNotFoundError:
        raise InputError(f"input {path}: not found on the Hugging Face hub") from None
    except Exception as e:  # offline mode, DNS failure, auth: all mean "can't read it from here"
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(
            f"input {path}: cannot reach the Hugging Face hub ({type(e).__name__}: {reason}). "
            "Mirror it with the `download` stage on a connected machine, or pass --input PATH."
        ) from None
    if not names:
        raise InputError(f"input {path}: the hub folder is empty")


def resolve_input(path: str, storage_options: dict | None = None) -> tuple[object, str, str | None]:
    """Check `path` and return (datatrove data folder, format, glob pattern).

    Raises InputError naming the path when it is missing, empty, unreadable or holds no
    parquet/jsonl files. A single file becomes (its folder, format, its name).
    """
    if path.startswith("hf://"):
        check_hub_input(path)
        return path, "parquet", None
    if "://" in path:
        return _resolve_remote(path, storage_options or {})
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"input path {p} does not exist")
    if p.is_file():
        fmt = _fmt(p.name)
        if fmt is None:
            raise InputError(f"input file {p}: not a .parquet or .jsonl(.gz/.zst) file")
        try:
            with open(p, "rb") as f:
                first = f.read(1)
        except OSError as e:
            raise InputError(f"input file {p} is not readable ({e.strerror})") from None
        if not first:
            raise InputError(f"input file {p} is empty")
        _check_decompresses(p)
        return str(p.parent), fmt, p.name
    try:
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and _fmt(f.name)]
    except OSError as e:
        raise InputError(f"input folder {p} is not readable ({e.strerror})") from None
    if not files:
        raise InputError(f"input folder {p} holds no .parquet or .jsonl(.gz/.zst) files")
    fmts = {_fmt(f.name) for f in files}
    if len(fmts) > 1:
        raise InputError(f"input folder {p} mixes parquet and jsonl files; point --input at one kind")
    unreadable = [f for f in files if not _readable(f)]
    if unreadable:
        raise InputError(f"input file {unreadable[0]} is not readable")
    if all(f.stat().st_size == 0 for f in files):
        raise InputError(f"input folder {p}: every data file is empty")
    empty = [f for f in files if _fmt(f.name) == "parquet" and f.stat().st_size == 0]
    if empty:  # an empty .jsonl is zero rows; an empty .parquet is no parquet file at all
        raise InputError(f"input file {empty[0]} is empty (0 bytes, not a parquet file): remove or replace it"
                         + (f" ({len(empty) - 1} more empty .parquet files)" if len(empty) > 1 else ""))
    for f in files:
        _check_decompresses(f)
    fmt = fmts.pop()
    return str(p), fmt, FOLDER_GLOB[fmt]


def _check_decompresses(f: Path) -> None:
    """Read the first bytes through the file's codec, so a corrupt .gz/.zst/.parquet stops the run
    before any executor starts, with the file named."""
    try:
        if f.name.endswith(PARQUET_SUFFIXES):
            if f.stat().st_size:
                import pyarrow.parquet as pq

                pq.ParquetFile(f).close()
            return
        from fsspec.core import open as fsopen

        with fsopen(str(f), "rb", compression="infer") as fh:
            fh.read(1)
    except Exception as e:
        raise InputError(f"input file {f} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def _readable(f: Path) -> bool:
    try:
        with open(f, "rb"):
            return True
    except OSError:
        return False


def _resolve_remote(uri: str, storage_options: dict):
    from datatrove.io import get_datafolder

    try:
        folder = get_datafolder((uri, storage_options))
        if folder.isfile(""):
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            parent = uri.rstrip("/").rsplit("/", 1)[0]
            if _fmt(name) is None:
                raise InputError(f"input {uri}: not a .parquet or .jsonl(.gz/.zst) object")
            return (parent, storage_options), _fmt(name), name
        files = [f for f in folder.list_files(recursive=True) if _fmt(f)]
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"input {uri} cannot be listed ({type(e).__name__}: {str(e)[:200]})") from None
    if not files:
        raise InputError(f"input {uri} holds no .parquet or .jsonl(.gz/.zst) objects (missing or empty)")
    fmts = {_fmt(f) for f in files}
    if len(fmts) > 1:
        raise InputError(f"input {uri} mixes parquet and jsonl objects")
    fmt = fmts.pop()
    return (uri, storage_options), fmt, FOLDER_GLOB[fmt]


def input_files(reader) -> list[list]:
    """[name, bytes] of every file `reader` reads, in one listing (datatrove gives each task its files
    by position in this list): what a run's completion markers hold for."""
    from glob import has_magic

    glob = reader.glob_pattern
    if glob and not has_magic(glob):
        glob = f"*{glob}"  # datatrove's own reading of a bare extension
    depth = None if reader.recursive else 1
    folder = reader.data_folder
    found = folder.glob(glob, maxdepth=depth, detail=True) if glob else folder.find("", maxdepth=depth, detail=True)
    return sorted([name, info.get("size")] for name, info in found.items() if info.get("type") != "directory")


def make_reader(path: str, limit: int = -1, text_key: str = "text", id_key: str = "id",
                invalid_utf8: str = "skip", storage_options: dict | None = None):
    """A counted reader for a checked input (see `resolve_input`)."""
    return reader_for(*resolve_input(path, storage_options), limit=limit, text_key=text_key, id_key=id_key,
                      invalid_utf8=invalid_utf8)


def reader_for(folder, fmt: str, glob: str | None, limit: int = -1, text_key: str = "text", id_key: str = "id",
               invalid_utf8: str = "skip"):
    """The counted reader of format `fmt` over `folder`, without checking it (make_reader checks first)."""
    common = dict(limit=limit, text_key=text_key, id_key=id_key, glob_pattern=glob)
    if fmt == "parquet":
        return CountingParquetReader(folder, **common)
    return CountingJsonlReader(folder, invalid_utf8=invalid_utf8, **common)
