"""smol-smoltalk (HuggingFaceTB/smol-smoltalk) -> ChatML token shards with loss masks, for SFT.

    python -m pipelines.smoltalk tokenize                                   # hub parquet (train files)
    python -m pipelines.smoltalk tokenize --input chats.parquet --output out/sft --tokenizer cl100k
    python -m pipelines.smoltalk download --output data/smol-smoltalk         # mirror, then --input it

Each row's `messages` (a list of {role, content}) becomes one document in ChatML, as `shards.chat`
defines it (Axiom-Instruct's format: system turns dropped, loss only on assistant turns). No EOS is
appended: ChatML delimits the turns, and the loader's document packing (`packing: document`, one
conversation per 1025-token row) pads with EOS that carries no loss.

Shards: DIR/train/NNNNN.ds(+.index/.loss/.metadata), DIR/val/..., DIR/manifest.json (written last),
train/val by the shared `HashSplit` over the rendered conversation (rows have no stable id).
Bad rows are counted skips naming the file and row: no/empty `messages`, a turn that is not
{role: str, content: str}, an unknown role, an empty turn, no assistant turn, invalid UTF-8.
The command line is the shared one (`pipelines/cli.py`); only `download` and `tokenize` apply.
"""
from __future__ import annotations

import numpy as np
from datatrove.data import Document

from shards import chat
from shards.chat import ROLES

from .cli import build_parser, run_command, stage_download, tokenize_job
from .readers import CountingJsonlReader, CountingParquetReader, InputError, check_hub_input, resolve_input
from .spec import Corpus, Job, job_from_args
from .steps import POSITION_ID_FLAG, Encoded, TokenizeShards

CORPUS = Corpus(
    name="smol-smoltalk",
    hub_repo="HuggingFaceTB/smol-smoltalk",
    hub_subset="data",
    description="smol-smoltalk SFT conversations (messages: [{role, content}])",
    text_key="messages",
)
HUB_GLOB = "train-*.parquet"  # the hub's test-*.parquet stays out; our own hash split makes val
render_chatml = chat.render  # the text a conversation becomes: the reference for decode checks


# ------------------------------------------------------------------------------------------ reading


class _ChatRows:
    """Row checks for chat data: replaces the text checks of the counting readers."""

    def _row_to_document(self, data, filepath: str, row: int):
        if not isinstance(data, dict):
            self._note("skipped_not_object", filepath, row, f"a JSON {type(data).__name__}, not an object")
            return None
        messages = data.get(self.text_key)
        if messages is None or (hasattr(messages, "__len__") and len(messages) == 0):
            self._note("skipped_no_messages", filepath, row, f"no or empty '{self.text_key}'")
            return None
        if not isinstance(messages, (list, tuple)):
            self._note("skipped_no_messages", filepath, row, f"'{self.text_key}' is {type(messages).__name__}, not a list")
            return None
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                self._note("skipped_bad_turn", filepath, row, f"turn {i} is not {{role: str, content: str}}: {str(m)[:80]}")
                return None
            if m["role"] not in ROLES:
                self._note("skipped_bad_role", filepath, row, f"turn {i} has role {m['role']!r} (expected one of {ROLES})")
                return None
            if not m["content"].strip():
                self._note("skipped_empty_turn", filepath, row, f"turn {i} ({m['role']}) is empty")
                return None
            try:
                m["content"].encode("utf-8")
            except UnicodeEncodeError as e:
                self._note("skipped_invalid_utf8", filepath, row, f"turn {i}: not valid UTF-8 ({e.reason})")
                return None
            if m["role"] != "system":  # dropped, as Axiom's SFT code does
                turns.append({"role": m["role"], "content": m["content"]})
        if not any(t["role"] == "assistant" for t in turns):
            self._note("skipped_no_assistant", filepath, row, "no assistant turn: nothing to learn from")
            return None
        ident = data.get(self.id_key)
        doc = Document(text=render_chatml(turns), id=str(ident) if ident not in (None, "") else f"{filepath}/{row}",
                       metadata={"messages": turns, "file_path": filepath, "row": row})
        if ident in (None, ""):
            doc.metadata[POSITION_ID_FLAG] = True  # HashSplit then hashes the rendered conversation
        return doc


class ChatParquetReader(_ChatRows, CountingParquetReader):
    name = "📒 Parquet chats (counted)"


class ChatJsonlReader(_ChatRows, CountingJsonlReader):
    name = "🐿 Jsonl chats (counted)"


def make_chat_reader(path: str, limit: int = -1, messages_key: str = "messages", id_key: str = "id",
                     storage_options: dict | None = None):
    if path.startswith("hf://"):
        check_hub_input(path)
        folder, fmt, glob = path, "parquet", HUB_GLOB
    else:
        folder, fmt, glob = resolve_input(path, storage_options)
    kw = dict(limit=limit, text_key=messages_key, id_key=id_key, glob_pattern=glob)
    return ChatParquetReader(folder, **kw) if fmt == "parquet" else ChatJsonlReader(folder, **kw)


# ------------------------------------------------------------------------------------- tokenizing


def encode_chatml(tok, texts, docs, num_threads=None) -> Encoded:
    """`TokenizeShards`'s encoder for conversations: each document's `metadata["messages"]` in
    ChatML with its loss mask (`shards.chat.encode`); `texts` (the rendered text) is not re-read."""
    pairs = chat.encode(tok, [d.metadata["messages"] for d in docs], num_threads)
    lengths = np.fromiter((len(ids) for ids, _ in pairs), dtype=np.int64, count=len(pairs))
    return Encoded(np.concatenate([ids for ids, _ in pairs]), lengths, np.concatenate([m for _, m in pairs]))


# ------------------------------------------------------------------------------------------ stages


def stage_tokenize(job: Job) -> str:
    source = job.read.path if job.read.path != job.corpus.hub_input else f"{job.corpus.hub_input}/{HUB_GLOB}"
    tk = job.tokenize
    if tk.too_long != "skip":  # a cut conversation would end inside a turn, with no <|im_end|>
        raise InputError("--too-long truncate does not apply to chat data: over-long conversations are skipped")
    if job.read.invalid_utf8 != "skip":  # the chat reader checks every turn itself
        raise InputError("--invalid-utf8 replace does not apply to chat data: such rows are skipped_invalid_utf8")
    reader = make_chat_reader(job.read.path, job.read.limit, job.read.text_key, job.read.id_key, job.storage.options())
    try:
        im_start, im_end = chat.chat_ids(tk.load())
    except ValueError as e:
        raise InputError(str(e)) from None

    def step(out_dir, num_threads):
        return TokenizeShards(out_dir, tk.tokenizer, tk.path, max_doc_tokens=tk.max_doc_tokens,
                              batch_size=tk.batch_size, num_threads=num_threads, encode=encode_chatml)

    extra = {"corpus": job.corpus.name, "format": "chatml", "tasks": job.execution.tasks, **job.split.manifest_extra(),
             "limit_per_task": job.read.limit, "im_start": im_start, "im_end": im_end,
             "system_turns": "dropped", "no_eos": True,
             "loss_mask": "1 on assistant turns incl. <|im_start|>assistant\\n header, <|im_end|> and trailing \\n"}
    return tokenize_job(job, reader, [], step, source=source, output=job.output, filters=["chatml-row-checks"],
                        extra=extra, settings=dict(stage="sft-tokenize", batch_size=tk.batch_size))


def run_stage(job: Job) -> None:
    if job.stage == "download":
        stage_download(job)
        return
    if job.decont:  # --decontaminate: the rendered conversations are checked against the tasks' n-grams
        from .decont import prepare

        prepare(job.decont)
    stage_tokenize(job)


def main(argv=None) -> int:
    p = build_parser(CORPUS, stages=("download", "tokenize"))  # filter/dedup/split/run are for web text
    p.prog = "python -m pipelines.smoltalk"
    p.set_defaults(tokenizer="cl100k", output=f"out/{CORPUS.name}")
    args = p.parse_args(argv)
    return run_command(lambda: run_stage(job_from_args(args, CORPUS)))


if __name__ == "__main__":  # LocalPipelineExecutor uses forkserver: workers re-import this module
    raise SystemExit(main())
