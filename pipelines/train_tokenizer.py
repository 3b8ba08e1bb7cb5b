"""Train a byte-level BPE tokenizer (HF `tokenizers`) with Atom's special tokens.

    python -m pipelines.train_tokenizer --input data/raw/fineweb-edu data/raw/ultra-fineweb \\
        --text-key text content --vocab-size 4096 --limit-docs 200000 --output data/tokenizers/atom-4096

Inputs are whatever the pipelines read (parquet / jsonl(.gz/.zst) files or folders, s3://, hf://),
through the same counted readers; `--text-key` is one column for every input or one per input (most
corpora call it `text`, Ultra-FineWeb and UltraData-Math `content`); `--limit-docs N` reads at most N
documents of each input. OUTPUT holds tokenizer.json, tokenizer_config.json and
special_tokens_map.json (shards.tokenizers.save_hf_tokenizer), so `AutoTokenizer.from_pretrained` and
`GPT2TokenizerFast.from_pretrained` load it as it is, and `--tokenizer OUTPUT` (or its tokenizer.json)
works everywhere a tokenizer is named.

The vocabulary: ids 0-4 are <pad> <s> </s> <unk> <|endoftext|> (documents end with <|endoftext|>,
the EOS our registry and transformers both pick), then the 256 byte symbols (GPT-2's byte-level
alphabet, so any text round-trips and nothing is ever unknown), then merges up to exactly
`--vocab-size` ids; a corpus too small to reach it is an error, not a smaller vocabulary. Training
is deterministic: the same inputs in the same order give the same files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Iterator

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|endoftext|>"]  # ids 0..4
VOCAB_SIZE = 4096  # Atom's: its card's 3,412,800 parameters need exactly this many ids
BYTE_SYMBOLS = 256


class TrainError(ValueError):
    """The input cannot give the requested vocabulary (too small), or bad arguments."""


def train_bpe(texts: Iterable[str], vocab_size: int = VOCAB_SIZE, min_frequency: int = 2,
              progress: bool = False):
    """An HF `tokenizers.Tokenizer`: GPT-2 style byte-level BPE with exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    smallest = len(SPECIAL_TOKENS) + BYTE_SYMBOLS
    if vocab_size < smallest:
        raise TrainError(f"--vocab-size {vocab_size}: at least {smallest} (the special tokens and 256 bytes)")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=min_frequency,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise TrainError(f"BPE training gave {tok.get_vocab_size():,} ids, not the {vocab_size:,} asked for: the "
                         f"input is too small for that vocabulary (give more text, or --vocab-size "
                         f"{tok.get_vocab_size()})")
    return tok


def train(texts: Iterable[str], out_dir: str | Path, vocab_size: int = VOCAB_SIZE, min_frequency: int = 2,
          progress: bool = False) -> Path:
    """Train and write OUT_DIR/tokenizer.json + tokenizer_config.json + special_tokens_map.json;
    returns the tokenizer.json path."""
    from shards.tokenizers import HFTokenizer, save_hf_tokenizer

    hf = train_bpe(texts, vocab_size, min_frequency, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    hf.save(str(path))
    # Loaded directly (not through get_tokenizer's cache, which would keep an older file's tokenizer).
    save_hf_tokenizer(HFTokenizer(path), out)
    return path


def iter_inputs(inputs: list[str], text_keys: list[str], limit_docs: int = -1, storage_options: dict | None = None,
                progress: bool = True) -> Iterator[str]:
    """Document texts of each input in turn, through the pipelines' counted readers (at most
    `limit_docs` per input); a tqdm bar counts documents and characters."""
    from tqdm import tqdm

    from .cli import check_text_column
    from .readers import make_reader

    readers = []
    for path, key in zip(inputs, text_keys):  # every input checked before training starts
        reader = make_reader(path, limit=limit_docs, text_key=key, storage_options=storage_options)
        check_text_column(reader, key)
        readers.append(reader)
    return _texts(inputs, readers, tqdm(unit=" docs", disable=not progress, file=sys.stderr, desc="reading"))


def _texts(inputs, readers, bar) -> Iterator[str]:
    chars = 0
    for path, reader in zip(inputs, readers):
        bar.set_description(f"reading {path}")
        for doc in reader.run(None, 0, 1):
            chars += len(doc.text)
            bar.update(1)
            bar.set_postfix_str(f"{chars / 1e6:,.1f}M chars", refresh=False)
            yield doc.text
    bar.close()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pipelines.train_tokenizer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files/folders/s3:// or hf:// URIs the pipelines read")
    p.add_argument("--text-key", nargs="+", default=["text"], help="text column: one for all inputs, or one per input")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="ids in all, special tokens included")
    p.add_argument("--limit-docs", type=int, default=-1, help="documents read from each input; -1 all")
    p.add_argument("--min-frequency", type=int, default=2, help="a pair merges only if it occurs this often")
    p.add_argument("--output", required=True, help="folder for tokenizer.json and its transformers configs")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// inputs (R2)")
    p.add_argument("--profile", help="AWS profile for s3:// inputs")
    p.add_argument("--region", help="S3 region name")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from .spec import Storage
    from .readers import InputError

    args = parse_args(argv)
    keys = args.text_key * len(args.input) if len(args.text_key) == 1 else args.text_key
    try:
        if len(keys) != len(args.input):
            raise TrainError(f"--text-key: {len(args.text_key)} keys for {len(args.input)} inputs (give 1 or one each)")
        texts = iter_inputs(args.input, keys, args.limit_docs, Storage.from_args(args).options() or None, not args.no_progress)
        path = train(texts, args.output, args.vocab_size, args.min_frequency, progress=not args.no_progress)
    except (InputError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from shards.tokenizers import get_tokenizer

    tok = get_tokenizer(str(path))
    print(f"wrote {path.parent}: {tok.vocab_size:,} ids, eos {tok.eos_id} <|endoftext|>, "
          f"specials {SPECIAL_TOKENS}, vocab hash {tok.vocab_hash[:12]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
