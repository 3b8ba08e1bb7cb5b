"""Sample from a checkpoint with a KV cache (recurrent state for hybrid layers rides in the same cache).

    python -m trainer.generate RUN_DIR/checkpoints/step_0000100 --prompt "Once upon a time"
    python -m trainer.generate RUN_DIR --chat --prompt "What is a prime?" --temperature 0.2 \
        --top-p 0.85 --repetition-penalty 1.15 --no-repeat-ngram 3          # Axiom-instruct settings

CHECKPOINT is a checkpoint dir (config.json + model.safetensors), a run dir, or its checkpoints/ dir
(the newest complete step is used), an HF model folder (an export) or hf://org/name. Library use: `generate(model, ids, GenerationConfig(...))`.
Logit processing follows the usual order: repetition penalty, no-repeat-ngram ban, temperature,
top-k, top-p, then sample (or argmax with greedy).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from shards.chat import IM_START, chat_ids, has_chatml
from shards.tokenizers import load_tokenizer
from shards.chat import prompt as chat_prompt
from trainer.checkpoint import load_model
from trainer.config import Config
from trainer.telemetry.console import log



@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None            # keep the k most likely tokens
    top_p: float | None = None          # keep the smallest set with probability mass >= top_p
    repetition_penalty: float = 1.0     # > 1 discourages every token already in the context
    no_repeat_ngram: int = 0            # never produce an n-gram already in the context (0 = off)
    greedy: bool = False
    stop_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.max_new_tokens < 0 or self.no_repeat_ngram < 0:
            raise ValueError("temperature, max_new_tokens and no_repeat_ngram must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


# ----------------------------------------------------------------------------- logit processors
# Each takes and returns float logits [V] for the next token (1-D: generation here is one sequence).

def apply_repetition_penalty(logits: torch.Tensor, context: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style: a seen token's logit is divided by penalty if positive, multiplied if negative."""
    if penalty == 1.0 or not context:
        return logits
    idx = torch.tensor(sorted(set(context)), device=logits.device)
    sel = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(sel > 0, sel / penalty, sel * penalty)
    return logits


def banned_ngram_tokens(context: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in context."""
    if n <= 0 or len(context) < n:
        return set()
    if n == 1:
        return set(context)
    prefix = tuple(context[len(context) - n + 1:])
    return {context[i + n - 1] for i in range(len(context) - n + 1) if tuple(context[i:i + n - 1]) == prefix}


def apply_no_repeat_ngram(logits: torch.Tensor, context: list[int], n: int) -> torch.Tensor:
    banned = banned_ngram_tokens(context, n)
    if not banned:
        return logits
    logits = logits.clone()
    logits[torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
    return logits


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their mass reaches p (always at least one)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, -1)
    mass_before = torch.cumsum(probs, -1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, context: list[int], cfg: GenerationConfig,
               generator: torch.Generator | None = None) -> int:
    logits = logits.float()
    logits = apply_repetition_penalty(logits, context, cfg.repetition_penalty)
    logits = apply_no_repeat_ngram(logits, context, cfg.no_repeat_ngram)
    if cfg.greedy or cfg.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    logits = top_p_filter(top_k_filter(logits, cfg.top_k), cfg.top_p)
    probs = torch.softmax(logits, -1)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:  # everything banned: fall back to argmax
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


# ----------------------------------------------------------------------------- generation loop

@torch.inference_mode()
def generate(model, ids: list[int], cfg: GenerationConfig, *, generator: torch.Generator | None = None,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Continue `ids`; return only the new tokens (a stop token ends generation and is not returned).

    The prompt is run once through the model to fill the cache; each new token is then one step.
    """
    if not ids:
        raise ValueError("generate needs at least one prompt token")
    if generator is None and cfg.seed is not None:
        generator = torch.Generator().manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cache = model.new_cache(1, len(ids) + cfg.max_new_tokens)
    context = list(ids)
    out: list[int] = []
    stops = set(cfg.stop_ids)
    try:
        logits = model(torch.tensor([context], device=device), cache)[0, -1]
        for _ in range(cfg.max_new_tokens):
            tok = next_token(logits, context, cfg, generator)
            if tok in stops:
                break
            out.append(tok)
            context.append(tok)
            if on_token is not None:
                on_token(tok)
            if len(out) == cfg.max_new_tokens:
                break
            logits = model(torch.tensor([[tok]], device=device), cache)[0, -1]
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- text in, text out


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    """Plain text: [BOS if the tokenizer's documents start with it] + ids. chat: a one-turn ChatML
    conversation ending in the assistant header (`shards.chat`)."""
    if chat:
        return chat_prompt(tok, [{"role": "user", "content": prompt}])
    ids = tok.encode(prompt)
    if tok.add_bos and tok.bos_id is not None:  # trained on [BOS] + document (llama2 convention)
        ids = [tok.bos_id] + ids
    if not ids:  # an empty prompt: start from a document boundary
        ids = [tok.eos_id]
    return ids


def stop_ids(tok, chat: bool) -> tuple[int, ...]:
    """EOS, and <|im_end|> for chat models (the end of an assistant turn)."""
    return (tok.eos_id, chat_ids(tok)[1]) if chat else (tok.eos_id,)


def complete(model, tok, prompt: str, cfg: GenerationConfig, chat: bool = False) -> str:
    """Prompt text in, completion text out (stops at EOS, and at <|im_end|> in chat mode)."""
    ids = prompt_ids(tok, prompt, chat)
    cfg = dataclasses.replace(cfg, stop_ids=tuple(sorted(set(cfg.stop_ids) | set(stop_ids(tok, chat)))))
    return tok.decode(generate(model, ids, cfg))


class Streamer:
    """Print text as it is produced; hold back a trailing partial UTF-8 character."""

    def __init__(self, tok, stream=sys.stdout):
        self.tok, self.ids, self.shown, self.stream = tok, [], 0, stream

    def __call__(self, t: int):
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.stream.write(text[self.shown:])
        self.stream.flush()
        self.shown = len(text)

    def finish(self):
        text = self.tok.decode(self.ids)
        self.stream.write(text[self.shown:] + "\n")
        self.stream.flush()


def encode_with_specials(tok, text: str) -> list[int]:
    """encode() treats special-token strings as text; a ChatML sample prompt needs their real ids."""
    specials = {k: v for k, v in (getattr(tok, "special_tokens", None) or {}).items() if k and k in text}
    if not specials:
        return tok.encode(text)
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tok.encode(part))
    return ids


def sample_generation(cfg: Config, model) -> None:
    """Print a short sample from the trained model, where it is (the training device), with the one
    generation engine (trainer.tools.generate)."""
    if not cfg.sample.prompt:
        return
    tok = load_tokenizer(cfg.to_dict())
    ids = encode_with_specials(tok, cfg.sample.prompt)
    if getattr(tok, "add_bos", False) and tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    chat = IM_START in cfg.sample.prompt and has_chatml(tok)  # a ChatML prompt stops at <|im_end|> too
    gen = GenerationConfig(max_new_tokens=cfg.sample.max_new_tokens, temperature=cfg.sample.temperature,
                           top_k=cfg.sample.top_k or None, stop_ids=stop_ids(tok, chat), seed=cfg.train.seed)
    new = generate(model, ids, gen)
    log.info(f"[sample]\n{cfg.sample.prompt}{tok.decode(list(new))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="checkpoint dir, run dir, or run_dir/checkpoints")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--no-repeat-ngram", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in ChatML (SFT models)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="cast weights (default: as stored)")
    ap.add_argument("--tokenizer-path", default=None, help="override the tokenizer file from config.json")
    args = ap.parse_args(argv)

    try:
        gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p,
                                   repetition_penalty=args.repetition_penalty,
                                   no_repeat_ngram=args.no_repeat_ngram, greedy=args.greedy, seed=args.seed)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model, cfg, ckpt = load_model(args.checkpoint, device=args.device, dtype=dtype)
        tok = load_tokenizer(cfg, args.tokenizer_path)
        ids = prompt_ids(tok, args.prompt, args.chat)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen_cfg.stop_ids = stop_ids(tok, args.chat)
    print(f"[{ckpt}: {model.num_params():,} params, prompt {len(ids)} tokens]", file=sys.stderr)
    if not args.chat:
        sys.stdout.write(args.prompt)
    streamer = Streamer(tok)
    t0 = time.perf_counter()
    out = generate(model, ids, gen_cfg, on_token=streamer)
    streamer.finish()
    dt = time.perf_counter() - t0
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
