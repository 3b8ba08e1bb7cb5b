"""smol-smoltalk -> ChatML shards: exact tokens against tiktoken itself, loss masks on assistant spans,
system turns dropped, bad rows counted, and the loader's SFT view of the result."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import read_stats
from pipelines.smoltalk import main, render_chatml
from shards.manifest import read_manifest
from shards.reader import open_split
from trainer.data import MixtureLoader, MixturePoint, SourceSpec

IM_START, IM_END = 100264, 100265


@pytest.fixture(scope="module")
def reference():
    """cl100k straight from tiktoken and the shipped ranks file, with Axiom's two ChatML ids."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    import tiktoken_ext

    ranks = load_tiktoken_bpe(str(Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"))
    base = tiktoken.Encoding("ref", pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
                             mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 100257, "<|im_start|>": IM_START, "<|im_end|>": IM_END})
    return base


def conversations():
    texts = [
        "What is the capital of France?", "Paris is the capital of France.\n\nIt sits on the Seine.",
        "Write a haiku about rain 🌧️", "Soft rain on the roof —\n  drops count the hours;  café naïve.",
        "def f(x):\n    return x ** 2  # why?", "It squares its argument.", "Thanks!", "You're welcome.",
    ]
    convs = []
    for i in range(40):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": f"You are a helpful assistant number {i}."})
        for t in range(1 + i % 3):
            q, a = texts[(2 * (i + t)) % len(texts)], texts[(2 * (i + t) + 1) % len(texts)]
            msgs.append({"role": "user", "content": f"{q} (#{i}.{t})"})
            msgs.append({"role": "assistant", "content": f"{a} [{i}.{t}]"})
        convs.append(msgs)
    return convs


BAD_ROWS = [
    {"messages": []},                                                       # empty
    {"other": 1},                                                           # no messages
    {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},  # bad role
    {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "ok"}]},  # empty turn
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "only a question"}]},  # no assistant
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},  # turn without content
]


def run(args):
    assert main(args) == 0


@pytest.fixture(scope="module")
def sft_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    convs = conversations()
    pq.write_table(pa.table({"messages": convs, "source": ["test"] * len(convs)}), root / "chats.parquet")
    out = root / "shards"
    run(["tokenize", "--input", str(root / "chats.parquet"), "--output", str(out), "--tokenizer", "cl100k",
         "--tasks", "1", "--workers", "1", "--val-fraction", "0.25", "--split-seed", "7"])
    return convs, out


def test_tokens_equal_chatml_rendering_and_masks_cover_assistant_turns(sft_out, reference):
    convs, out = sft_out
    m = read_manifest(out)
    assert m.dtype == "uint32" and m.tokenizer.name == "cl100k" and m.tokenizer.vocab_size == 100277
    assert m.splits["train"].documents + m.splits["val"].documents == len(convs)
    assert m.splits["val"].documents > 0 and m.splits["train"].documents > 0
    by_text = {render_chatml(c): c for c in convs}
    seen = set()
    for split in ("train", "val"):
        r = open_split(out, split)
        assert r.has_loss_mask
        for shard in r.shards:
            for i in range(shard.documents):
                ids = shard.document(i).tolist()
                mask = np.asarray(shard.loss[shard.offsets[i] : shard.offsets[i + 1]]).tolist()
                text = reference.decode(ids)
                conv = by_text[text]  # KeyError if the decoded document is not a rendered conversation
                seen.add(text)
                assert ids == reference.encode(text, allowed_special="all")
                # independent mask: per turn, the whole <|im_start|>role\n...<|im_end|>\n segment
                want = []
                for turn in conv:
                    if turn["role"] == "system":
                        continue
                    seg = reference.encode(f"<|im_start|>{turn['role']}\n{turn['content']}<|im_end|>\n",
                                           allowed_special="all")
                    want += [int(turn["role"] == "assistant")] * len(seg)
                assert mask == want
                kept = "".join(f"<|im_start|>assistant\n{t['content']}<|im_end|>\n" for t in conv if t["role"] == "assistant")
                assert reference.decode([t for t, k in zip(ids, mask) if k]) == kept
                assert "system" not in text and "helpful assistant number" not in text
                assert ids[0] == IM_START and ids[-2] == IM_END  # no EOS appended: ends "<|im_end|>\n"
    assert len(seen) == len(convs)


def test_chat_and_the_exported_template_render_the_trained_ids(sft_out, tmp_path):
    """What chat prompts with and what an export's chat_template tokenizes to are the ids the SFT
    shards hold: per conversation, the shard document up to its last assistant turn, then the
    assistant header."""
    from transformers import AutoTokenizer

    from shards import chat
    from shards.tokenizers import get_tokenizer, save_hf_tokenizer

    convs, out = sft_out
    tok = get_tokenizer("cl100k")
    save_hf_tokenizer(tok, tmp_path / "tok", chat_template=chat.CHAT_TEMPLATE)
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    by_text = {render_chatml(c): c for c in convs}
    shard = open_split(out, "train").shards[0]
    header = [IM_START] + tok.encode("assistant\n")
    for i in range(min(shard.documents, 12)):
        ids = shard.document(i).tolist()
        conv = [m for m in by_text[tok.decode(ids)] if m["role"] != "system"]
        last = conv[-1]["content"]  # the final assistant answer, as the shard holds it
        answer = [IM_START] + tok.encode(f"assistant\n{last}") + [IM_END] + tok.encode("\n")
        assert ids[-len(answer):] == answer
        prompt = ids[: len(ids) - len(answer)] + header
        assert chat.prompt(tok, conv[:-1]) == prompt
        assert hf.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True,
                                      return_dict=False) == prompt
        assert hf.apply_chat_template(conv, tokenize=True, return_dict=False) == ids


def test_bad_rows_are_counted_skips_named(tmp_path, capfd):
    good = conversations()[:5]
    path = tmp_path / "chats.jsonl"
    with open(path, "w") as f:
        for row in [{"messages": c} for c in good[:2]] + BAD_ROWS + [{"messages": c} for c in good[2:]]:
            f.write(json.dumps(row) + "\n")
        f.write("{not json\n")
    out = tmp_path / "out"
    run(["tokenize", "--input", str(path), "--output", str(out), "--tasks", "1", "--workers", "1",
         "--val-fraction", "0"])
    m = read_manifest(out)
    assert m.splits["train"].documents == 5 and m.splits["val"].documents == 0
    stats = dict(read_stats(str(out / "logs" / "tokenize")))
    reader = next(v for k, v in stats.items() if "chats" in k.lower())
    assert reader.get("skipped_no_messages") == 2
    assert reader.get("skipped_bad_role") == 1 and reader.get("skipped_empty_turn") == 1
    assert reader.get("skipped_no_assistant") == 1 and reader.get("skipped_bad_turn") == 1
    assert reader.get("skipped_bad_json") == 1
    err = capfd.readouterr().err
    assert "chats.jsonl row 4: turn 1 has role 'robot'" in err


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["tokenize", "--input", str(tmp_path / "nope.parquet"), "--output", str(tmp_path / "o")]) == 2
    assert "nope.parquet does not exist" in capsys.readouterr().err


def test_loader_reads_sft_shards_mask_for_y(sft_out, reference):
    convs, out = sft_out
    ld = MixtureLoader([SourceSpec("chat", str(out))], [MixturePoint(0, {"chat": 1})], seq_len=64, micro_batch=4,
                       seed=1, packing="document", vocab_size=100277)
    by_text = {render_chatml(c): c for c in convs}
    x, y, mask, _ = ld.batch(0)
    for xr, yr, mr in zip(x.tolist(), y.tolist(), mask.tolist()):
        row = xr + yr[-1:]
        real = [t for t in row if t != 100257]
        n = len(real)
        full = None
        for text in by_text:  # the conversation this row starts
            ids = reference.encode(text, allowed_special="all")
            if ids[: min(n, 65)] == real[:65]:
                full = ids
        assert full is not None
        assert all(t == 100257 for t in row[n:])  # EOS padding
        ref_mask = []
        for turn in by_text[reference.decode(full)]:
            if turn["role"] != "system":
                seg = reference.encode(f"<|im_start|>{turn['role']}\n{turn['content']}<|im_end|>\n", allowed_special="all")
                ref_mask += [turn["role"] == "assistant"] * len(seg)
        want = (ref_mask + [False] * 65)[1:65]
        assert mr == want  # mask of the y positions, padding excluded


def test_threads_and_batch_size_flags_reach_the_step(tmp_path, monkeypatch):
    # The SFT stage once ignored --threads and --batch-size; it now shares fineweb's tokenize job.
    import pipelines.smoltalk as st

    seen = {}

    class Spy(st.TokenizeShards):
        def __init__(self, *a, **kw):
            seen.update(kw)
            super().__init__(*a, **kw)

    monkeypatch.setattr(st, "TokenizeShards", Spy)
    convs = conversations()
    pq.write_table(pa.table({"messages": convs}), tmp_path / "chats.parquet")
    run(["tokenize", "--input", str(tmp_path / "chats.parquet"), "--output", str(tmp_path / "o"), "--tokenizer",
         "cl100k", "--tasks", "1", "--workers", "1", "--threads", "1", "--batch-size", "3"])
    assert seen["num_threads"] == 1 and seen["batch_size"] == 3
    assert (tmp_path / "o" / "manifest.json").exists()


def test_one_tokenize_step_skips_long_conversations_and_counts_loss_tokens(tmp_path, capsys):
    # Chat data goes through the same TokenizeShards as plain text, with the ChatML encoder: its
    # too-long skip and stats are the text path's, and the shard keeps the masks.
    convs = conversations()
    pq.write_table(pa.table({"messages": convs}), tmp_path / "chats.parquet")
    out = tmp_path / "o"
    encoded = _reference_encode(convs)
    lengths = sorted(len(ids) for ids, _ in encoded)
    limit = lengths[len(lengths) // 2]  # about half the conversations are longer
    run(["tokenize", "--input", str(tmp_path / "chats.parquet"), "--output", str(out), "--tokenizer", "cl100k",
         "--tasks", "1", "--workers", "1", "--val-fraction", "0", "--max-doc-tokens", str(limit)])
    kept = [(ids, m) for ids, m in encoded if len(ids) <= limit]
    stats = dict(read_stats(str(out / "logs" / "tokenize")))
    step = next(v for k, v in stats.items() if "Token shards" in k)
    assert step["skipped_too_long"] == len(convs) - len(kept)
    assert step["train_documents"] == len(kept)
    assert step["loss_tokens"] == sum(int(m.sum()) for _, m in kept)
    split = open_split(out, "train")
    assert split.documents == len(kept)
    assert np.array_equal(np.concatenate([s.tokens for s in split.shards]), np.concatenate([i for i, _ in kept]))
    assert np.array_equal(np.concatenate([s.loss for s in split.shards]), np.concatenate([m for _, m in kept]))
    assert main(["tokenize", "--input", str(tmp_path / "chats.parquet"), "--output", str(tmp_path / "o2"),
                 "--too-long", "truncate"]) == 2
    assert "--too-long truncate does not apply to chat data" in capsys.readouterr().err


def _reference_encode(convs):
    from shards import chat
    from shards.tokenizers import get_tokenizer

    return chat.encode(get_tokenizer("cl100k"), [[m for m in c if m["role"] != "system"] for c in convs])
