"""Reusable datatrove steps: hash train/val split, tokenizing shard writer, manifest writer.

They compose with any datatrove pipeline:

    [JsonlReader(...), *filters, HashSplit(0.001, seed=1337), TokenizeShards("out/x", "qwen3")]
    then, once every task has finished:  [WriteManifest("out/x", "qwen3", ...)]

`HashSplit` only *tags* `doc.metadata["split"]` (it does not drop documents): one read pass then
feeds one writer that fans out to both splits, and a JsonlWriter can route by the same tag with
`output_filename="${split}/${rank}.jsonl.gz"`. Pass `keep="val"` to filter to one split instead.
"""
from __future__ import annotations

import errno
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

from shards.format import SUFFIXES, ShardWriter, dtype_for_vocab
from shards.text import assign_split, hash_fraction, normalize_text  # noqa: F401 - re-exported

# text: the normalised text (shards.text.normalize_text), the default: the same page carried by two
# corpora under different ids (FineWeb's `id`, Ultra-FineWeb's `uid`) lands in the same split in both.
# id: the rule before that (the source id, or the raw text when there is none); "auto" is its old name.
SPLIT_KEYS = ("text", "id", "auto")
# datatrove's default adapter names a row without an id "<file path>/<row number>": such an id
# changes when files are re-chunked or re-read from another mirror, so it must not drive the split.
_POSITION_ID = re.compile(r".+\.(parquet|jsonl|json|jsonl\.gz|json\.gz|jsonl\.zst|jsonl\.bz2|csv|arrow)/\d+")
POSITION_ID_FLAG = "id_is_position"  # set by pipelines.readers when the source row had no id
SPLIT_RULE = ("val iff blake2b(key, key=str(seed)) as little-endian uint64 / 2**64 < val_fraction; "
              "key text = the text after NFC and whitespace collapsing; key id = the source id, or the raw "
              "text when the id is missing/position-based")


def split_key(doc, key: str = "text") -> tuple[str, str]:
    """(kind, key) used to place `doc`. text = its normalised text; id (or auto) = the source id, unless
    it is missing or position-based (datatrove's "<file>/<row>" fallback, or flagged by our readers):
    then the raw text, as before text keys were the default."""
    if key not in SPLIT_KEYS:
        raise ValueError(f"split key must be one of {SPLIT_KEYS}, got {key!r}")
    if key == "text":  # a text-less row is skipped by TokenizeShards later; it needs a split until then
        return "text", normalize_text(doc.text) if isinstance(doc.text, str) else ""
    synthetic = (
        not doc.id
        or doc.metadata.get(POSITION_ID_FLAG)
        or _POSITION_ID.fullmatch(str(doc.id)) is not None
    )
    if synthetic:
        return "text", doc.text
    return "id", str(doc.id)


class HashSplit(PipelineStep):
    """Tag each document `metadata["split"]` = "train" | "val" from a hash of a stable key.

    val iff blake2b(key; seed) / 2**64 < val_fraction, so a document's split depends only on itself
    and the seed: not on tasks, workers, order or which corpus carries it. With the default text key,
    exact copies (up to Unicode form and whitespace) land together within a source and across sources
    split with the same seed and fraction, so no source's val holds a page another source trains on.
    """

    name = "✂️ Hash split"
    type = "🔀 - SPLIT"

    def __init__(self, val_fraction: float = 0.001, seed: int = 1337, key: str = "text", keep: str | None = None):
        super().__init__()
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        if key not in SPLIT_KEYS:
            raise ValueError(f"key must be one of {SPLIT_KEYS}, got {key!r}")
        if keep not in (None, "train", "val"):
            raise ValueError(f"keep must be None, 'train' or 'val', got {keep!r}")
        self.val_fraction = val_fraction
        self.seed = seed
        self.key = key
        self.keep = keep

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts: dict[str, int] = {}
        try:
            for doc in data:
                kind, key = split_key(doc, self.key)
                split = assign_split(key, self.seed, self.val_fraction)
                doc.metadata["split"] = split
                # counted locally and flushed in bulk: per-document stat updates cost more than the hash
                counts[split] = counts.get(split, 0) + 1
                counts[f"key_{kind}"] = counts.get(f"key_{kind}", 0) + 1
                if self.keep is None or split == self.keep:
                    yield doc
        finally:
            for label, n in sorted(counts.items()):
                self.stat_update(label, value=n, unit="task")


def clean_rank_outputs(output_dir: str | Path, rank: int, splits) -> int:
    """Delete this task's shard files and stale `.tmp` leftovers before (re)running it: a rerun of
    an unfinished task rewrites them from scratch, so nothing from the killed run survives."""
    removed = 0
    for split in splits:
        base = Path(output_dir) / split / f"{rank:05d}"
        for suffix in SUFFIXES:
            for p in (Path(str(base) + suffix), Path(str(base) + suffix + ".tmp")):
                if p.exists():
                    p.unlink()
                    removed += 1
    return removed


class SplitWriters:
    """One ShardWriter per split, OUTPUT/<split>/<rank:05d>.ds, opened by the first `get(split, ...)`
    (a split no document goes to gets no empty shard)."""

    def __init__(self, output_dir: str | Path, rank: int, dtype, tokenizer_name: str):
        self.output_dir, self.rank, self.dtype, self.tokenizer_name = Path(output_dir), rank, dtype, tokenizer_name
        self.opened: dict[str, ShardWriter] = {}

    def get(self, split: str, with_loss: bool = False) -> ShardWriter:
        if split not in self.opened:
            self.opened[split] = ShardWriter(self.output_dir / split / f"{self.rank:05d}", self.dtype,
                                             self.tokenizer_name, with_loss=with_loss)
        return self.opened[split]


@contextmanager
def split_writers(output_dir: str | Path, rank: int, dtype, tokenizer_name: str):
    """SplitWriters for one task: every shard is closed (renamed into place) if the block succeeds,
    and every one aborted (its .tmp files removed) on any exception, interrupts included."""
    writers = SplitWriters(output_dir, rank, dtype, tokenizer_name)
    try:
        yield writers
        for split in sorted(writers.opened):
            writers.opened[split].close()
    except BaseException:
        for w in writers.opened.values():
            w.abort()
        raise


@dataclass
class Encoded:
    """A batch of documents as the shard writer takes it: every document's ids concatenated, one
    length per document, and a loss mask over the ids (None: every token trains)."""

    tokens: np.ndarray
    lengths: np.ndarray
    loss: np.ndarray | None = None

    def documents(self):
        """(ids, mask or None) per document."""
        cuts = np.cumsum(self.lengths)[:-1]
        masks = np.split(self.loss, cuts) if self.loss is not None else [None] * len(self.lengths)
        return zip(np.split(self.tokens, cuts), masks)


def encode_text(tok, texts: list[str], docs: list, num_threads: int | None = None) -> Encoded:
    """Plain documents: [BOS if the tokenizer's convention says so] + ids + [EOS] each, no mask."""
    return Encoded(*tok.encode_documents_flat(texts, num_threads=num_threads))


class TokenizeShards(PipelineStep):
    """Tokenize documents in batches and write `OUTPUT/<split>/<rank:05d>.ds` (datatrove layout).

    `encode(tok, texts, docs, num_threads) -> Encoded` turns a batch into ids (and a loss mask):
    `encode_text` by default, `pipelines.smoltalk.encode_chatml` for conversations, any module-level
    function of that shape otherwise (it travels to the workers by reference). It returns the batch
    concatenated rather than a list of (ids, mask) pairs because plain text is written as one array
    per batch: per-document arrays cost more than tokenizing short documents. A shard stores loss
    masks iff the encoder gives them. `texts` are the documents' texts after the checks below (with
    invalid_utf8="replace", repaired); an encoder that reads `docs` instead (ChatML reads each
    conversation's turns) must have had its input checked by its reader.

    Encoding runs in a background thread on every core (tiktoken / tokenizers / sentencepiece release
    the GIL) while this thread reads the next batch and writes the previous one. Counted skips
    (datatrove stats, and a log line for the first few):
      skipped_no_text       text missing or not a string
      skipped_empty         text empty or only whitespace
      skipped_invalid_utf8  text holds lone surrogates (un-encodable as UTF-8); or replaced, counted
                            as replaced_invalid_utf8, with invalid_utf8="replace"
      skipped_too_long      more than max_doc_tokens tokens (too_long="skip", the default: a cut
                            document followed by EOS would teach a fake ending, and enormous
                            documents are mostly dumps/logs); truncated_too_long with "truncate"
    and per task: <split>_documents, <split>_tokens, loss_tokens (masked encoders), tokens, documents.
    """

    name = "🧩 Token shards"
    type = "🔢 - TOKENIZER"

    def __init__(
        self,
        output_dir: str | Path,
        tokenizer: str = "qwen3",
        tokenizer_path: str | None = None,
        splits: tuple[str, ...] = ("train", "val"),
        default_split: str = "train",
        max_doc_tokens: int = 1_000_000,
        too_long: str = "skip",
        invalid_utf8: str = "skip",
        batch_size: int = 1000,
        num_threads: int | None = None,
        log_interval: float = 30.0,
        max_logged_skips: int = 5,
        encode: Callable[..., Encoded] = encode_text,
    ):
        super().__init__()
        if too_long not in ("skip", "truncate"):
            raise ValueError(f"too_long must be 'skip' or 'truncate', got {too_long!r}")
        if invalid_utf8 not in ("skip", "replace"):
            raise ValueError(f"invalid_utf8 must be 'skip' or 'replace', got {invalid_utf8!r}")
        if default_split not in splits:
            raise ValueError(f"default_split {default_split!r} not in splits {splits}")
        self.output_dir = str(output_dir)
        self.tokenizer_name = tokenizer
        self.tokenizer_path = tokenizer_path
        self.splits = tuple(splits)
        self.default_split = default_split
        self.max_doc_tokens = int(max_doc_tokens)
        self.too_long = too_long
        self.invalid_utf8 = invalid_utf8
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.log_interval = log_interval
        self.max_logged_skips = max_logged_skips
        self.encode = encode
        self._logged = 0
        self._counts: dict[str, int] = {}

    def load_tokenizer(self):
        from shards.tokenizers import get_tokenizer

        return get_tokenizer(self.tokenizer_name, path=self.tokenizer_path)

    # -- per-document checks (main thread, cheap) ------------------------------------------------
    def _count(self, label: str, n: int = 1) -> None:
        # counted locally and flushed once per task: per-document stat updates cost more than encoding
        self._counts[label] = self._counts.get(label, 0) + n

    def _skip(self, label: str, doc, why: str) -> None:
        self._count(label)
        if self._logged < self.max_logged_skips:
            self._logged += 1
            where = doc.metadata.get("file_path", "?") if doc is not None else "?"
            logger.warning(f"skipping document {getattr(doc, 'id', '?')!r} from {where}: {why} ({label})")

    def _clean_text(self, doc) -> str | None:
        text = doc.text
        if not isinstance(text, str):
            self._skip("skipped_no_text", doc, f"text is {type(text).__name__}, not a string")
            return None
        if not text or text.isspace():
            self._skip("skipped_empty", doc, "empty text")
            return None
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                if self.invalid_utf8 == "skip":
                    self._skip("skipped_invalid_utf8", doc, f"not valid UTF-8 ({e.reason} at {e.start})")
                    return None
                self._count("replaced_invalid_utf8")
                text = text.encode("utf-8", "replace").decode("utf-8")
        return text

    def _valid_batches(self, data):
        """Batches of {split: (texts, docs)} holding batch_size documents that passed the checks."""
        batch, n = {}, 0
        for doc in data:
            text = self._clean_text(doc)
            if text is None:
                continue
            split = doc.metadata.get("split", self.default_split)
            if split not in self.splits:
                raise ValueError(f"document {doc.id!r} tagged split={split!r}, not one of {self.splits}")
            texts, docs = batch.setdefault(split, ([], []))
            texts.append(text)
            docs.append(doc)
            n += 1
            if n >= self.batch_size:
                yield batch
                batch, n = {}, 0
        if batch:
            yield batch

    def _encode(self, tok, batch) -> dict:
        """{split: (Encoded, docs)}: one encoder call per split."""
        return {split: (self.encode(tok, texts, docs, self.num_threads), docs)
                for split, (texts, docs) in batch.items()}

    def _write(self, writers, encoded: dict, eos: int) -> None:
        for split, (enc, docs) in encoded.items():
            if (enc.lengths > self.max_doc_tokens).any():
                enc = self._limit_length(enc, docs, eos)
                if not len(enc.lengths):  # every document skipped: no shard for this split yet
                    continue
            n_tok = writers.get(split, with_loss=enc.loss is not None).write_flat(enc.tokens, enc.lengths, enc.loss)
            self._count(f"{split}_documents", len(enc.lengths))
            self._count(f"{split}_tokens", n_tok)
            self._count("documents", len(enc.lengths))
            self._count("tokens", n_tok)
            if enc.loss is not None:
                self._count("loss_tokens", int(enc.loss.sum()))

    # -- main loop --------------------------------------------------------------------------------
    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tok = self.load_tokenizer()
        if removed := clean_rank_outputs(self.output_dir, rank, self.splits):
            logger.info(f"task {rank}: removed {removed} files left by an earlier unfinished run")
        self._counts = {"documents": 0, "tokens": 0}
        start = last_log = time.perf_counter()
        try:
            with split_writers(self.output_dir, rank, dtype_for_vocab(tok.vocab_size), tok.name) as writers, \
                    ThreadPoolExecutor(1) as pool:
                pending = None
                for batch in self._valid_batches(data):
                    with self.track_time(unit="batch"):
                        future = pool.submit(self._encode, tok, batch)
                        if pending is not None:
                            self._write(writers, pending.result(), tok.eos_id)
                        pending = future
                    now = time.perf_counter()
                    if now - last_log >= self.log_interval:
                        last_log = now
                        self._log_progress(rank, now - start)
                if pending is not None:
                    with self.track_time(unit="batch"):
                        self._write(writers, pending.result(), tok.eos_id)
        except OSError as e:  # the writers removed this task's partial shards on the way out
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            from .readers import InputError  # readers imports this module

            raise InputError(f"tokenize task {rank}: no space left on device writing shards to {self.output_dir} "
                             f"(its partial shards removed): free space and rerun the same command (finished "
                             f"tasks are kept, this one starts over)") from None
        finally:
            for label, n in sorted(self._counts.items()):
                self.stat_update(label, value=n, unit="task")
        self._log_progress(rank, time.perf_counter() - start, final=True)
        return
        yield  # a generator: datatrove drains it

    def _limit_length(self, enc: Encoded, docs, eos) -> Encoded:
        """Documents over max_doc_tokens skipped (too_long="skip") or cut to max_doc_tokens - 1 ids
        plus EOS ("truncate"), each counted; the rest pass unchanged."""
        ids_out, loss_out = [], []
        for (d, m), doc in zip(enc.documents(), docs):
            if len(d) > self.max_doc_tokens:
                if self.too_long == "skip":
                    self._skip("skipped_too_long", doc, f"{len(d):,} tokens > max_doc_tokens {self.max_doc_tokens:,}")
                    continue
                self._count("truncated_too_long")
                d = np.append(d[: self.max_doc_tokens - 1], np.asarray(eos, dtype=d.dtype))
                m = None if m is None else np.append(m[: self.max_doc_tokens - 1], np.uint8(1))  # EOS trains, as in text
            ids_out.append(d)
            loss_out.append(m)
        if not ids_out:
            return Encoded(enc.tokens[:0], enc.lengths[:0], None if enc.loss is None else enc.loss[:0])
        lengths = np.fromiter(map(len, ids_out), dtype=np.int64, count=len(ids_out))
        return Encoded(np.concatenate(ids_out), lengths, None if enc.loss is None else np.concatenate(loss_out))

    def _log_progress(self, rank, elapsed, final=False):
        elapsed = max(elapsed, 1e-9)
        docs, tokens = self._counts["documents"], self._counts["tokens"]
        logger.info(
            f"task {rank}{' done' if final else ''}: {docs:,} docs ({docs / elapsed:,.0f} docs/s), "
            f"{tokens:,} tokens ({tokens / elapsed:,.0f} tokens/s)"
        )


class WriteManifest(PipelineStep):
    """Run as a 1-task job after the tokenize job: scan DIR/<split>/ and write DIR/manifest.json
    (last: its presence means "complete"), then optionally upload DIR to object storage."""

    name = "📜 Manifest"
    type = "🔢 - TOKENIZER"

    def __init__(
        self,
        output_dir: str | Path,
        tokenizer: str,
        tokenizer_path: str | None = None,
        splits: tuple[str, ...] = ("train", "val"),
        source: str = "",
        filters: list[str] | None = None,
        seeds: dict | None = None,
        extra: dict | None = None,
        upload_to: str | None = None,
        storage_kwargs: dict | None = None,
        decontamination: list[dict] | None = None,
    ):
        super().__init__()
        self.output_dir = str(output_dir)
        self.tokenizer_name = tokenizer
        self.tokenizer_path = tokenizer_path
        self.splits = tuple(splits)
        self.source = source
        self.filters = list(filters or [])
        self.seeds = dict(seeds or {})
        self.extra = dict(extra or {})
        self.upload_to = upload_to
        self.storage_kwargs = dict(storage_kwargs or {})
        self.decontamination = list(decontamination or [])

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if rank == 0:
            extra = {**self.extra, **decontamination_extra(self.decontamination)}
            path = write_shard_manifest(
                self.output_dir, self.tokenizer_name, self.tokenizer_path, self.splits,
                self.source, self.filters, self.seeds, extra,
            )
            logger.info(f"wrote {path}")
            if self.upload_to:
                from shards.storage import upload  # lazy: boto3 only when uploading
                logger.info(f"uploading {self.output_dir} -> {self.upload_to}")
                upload(self.output_dir, self.upload_to, **self.storage_kwargs)
        if data:
            yield from data


def decontamination_extra(passes: list[dict]) -> dict:
    """{"decontamination": {tasks, passes}} for a manifest's extra ({} without passes). Run when the
    manifest is written, after the stages: each pass's dropped counts come from its stage's stats."""
    if not passes:
        return {}
    from .decont import dropped_counts

    done = []
    for p in passes:
        p = dict(p)
        stats_dir = p.pop("stats_dir", None)
        if stats_dir is not None or "dropped" not in p:
            p["dropped"] = dropped_counts(stats_dir, p["tasks"])
        done.append(p)
    tasks = list(dict.fromkeys(t for p in done for t in p["tasks"]))
    return {"decontamination": {"tasks": tasks, "passes": done}}


def write_shard_manifest(output_dir, tokenizer, tokenizer_path=None, splits=("train", "val"), source="",
                         filters=None, seeds=None, extra=None) -> Path:
    from shards.manifest import build_manifest, write_manifest
    from shards.tokenizers import get_tokenizer

    out = Path(output_dir)
    stale = sorted(p.relative_to(out).as_posix() for s in splits for p in (out / s).glob("*.tmp"))
    if stale:
        raise RuntimeError(f"{out}: unfinished shard files {stale[:3]}: a task did not complete; rerun it")
    tok = get_tokenizer(tokenizer, path=tokenizer_path)
    manifest = build_manifest(out, tok.info(), splits=tuple(splits), source=source, filters=filters,
                              seeds=seeds, extra=extra)
    if not any(st.documents for st in manifest.splits.values()):  # a "complete" empty dataset would verify
        raise RuntimeError(f"{out}: 0 documents in every split (every input row was skipped: see the tokenize "
                           "stage's stats); no manifest written")
    return write_manifest(out, manifest)
