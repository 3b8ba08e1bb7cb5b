"""Chat with an SFT model in the terminal: multi-turn ChatML (`shards.chat`, what SFT trained on).

    python -m trainer.chat runs/axiom-380m-sft
    python -m trainer.chat exports/axiom-instruct --temperature 0.7 --top-p 0.9

Defaults are the model's own sampling settings (an export's generation_config.json; else
Axiom-Instruct's card: temperature 0.2, top_p 0.85, repetition_penalty 1.15, no_repeat_ngram 3);
every flag overrides one. The conversation is kept within the context window: when the next prompt
would not leave room for --max-new-tokens, the oldest turns are dropped first, and it says so.
/reset starts over, /exit (or end of input) quits.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

import torch

from shards import chat
from shards.chat import CARD_SAMPLING
from trainer.checkpoint import load_model
from shards.tokenizers import load_tokenizer
from trainer.tools.generate import GenerationConfig, Streamer, generate, stop_ids


def fit_history(tok, history: list[dict], budget: int) -> tuple[list[int], int]:
    """Prompt ids for `history` (ending with a user turn) within `budget` tokens, dropping the oldest
    turns first (a user turn with its answer). Returns (ids, turns dropped); ValueError if even the
    newest user turn alone does not fit."""
    dropped = 0
    while True:
        ids = chat.prompt(tok, history[dropped:])
        if len(ids) <= budget:
            return ids, dropped
        if len(history) - dropped <= 1:
            raise ValueError(f"the message alone is {len(ids)} tokens; the context leaves {budget}")
        dropped += 2 if history[dropped]["role"] == "user" and len(history) - dropped > 2 else 1


def converse(model, tok, gen: GenerationConfig, read: Callable[[], str | None], out=sys.stdout,
             note=sys.stderr) -> list[dict]:
    """The chat loop; `read` returns the next user line, or None at end of input. Returns the history."""
    history: list[dict] = []
    budget = model.config.max_seq_len - gen.max_new_tokens
    gen = dataclasses.replace(gen, stop_ids=stop_ids(tok, chat=True))
    while (line := read()) is not None:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("[history cleared]", file=note)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            ids, dropped = fit_history(tok, history, budget)
        except ValueError as e:
            history.pop()
            print(f"[not sent: {e}]", file=note)
            continue
        if dropped:
            history = history[dropped:]
            print(f"[context full: dropped the {dropped} oldest turn{'s' * (dropped > 1)}]", file=note)
        streamer = Streamer(tok, out)
        reply = generate(model, ids, gen, on_token=streamer)
        streamer.finish()
        history.append({"role": "assistant", "content": tok.decode(reply)})
    return history


def _read_line(prompt: str = "you> ") -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def main(argv=None, read: Callable[[], str | None] = _read_line) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.chat", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="SFT run dir, checkpoint dir, HF folder or hf://org/name")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--repetition-penalty", type=float, default=None)
    ap.add_argument("--no-repeat-ngram", type=int, default=None)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        model, cfg, src = load_model(args.checkpoint, device=args.device)
        tok = load_tokenizer(cfg)
        chat.chat_ids(tok)  # no ChatML tokens: not a chat model, say so before the first prompt
        defaults = {"max_new_tokens": 256, **CARD_SAMPLING, **((cfg.get("sample") or {}) if "data" not in cfg else {})}
        flags = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                               "repetition_penalty", "no_repeat_ngram") if getattr(args, k) is not None}
        known = {f.name for f in dataclasses.fields(GenerationConfig)}
        gen = GenerationConfig(**{k: v for k, v in {**defaults, **flags}.items() if k in known},
                               greedy=args.greedy, seed=args.seed)
        if gen.max_new_tokens >= model.config.max_seq_len:
            raise ValueError(f"--max-new-tokens {gen.max_new_tokens} leaves no room in the "
                             f"{model.config.max_seq_len}-token context")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{src}: {model.num_params():,} params, context {model.config.max_seq_len}; "
          f"temperature {gen.temperature}, top_p {gen.top_p}, repetition_penalty {gen.repetition_penalty}, "
          f"no_repeat_ngram {gen.no_repeat_ngram}; /reset, /exit]", file=sys.stderr)
    converse(model, tok, gen, read)
    return 0


if __name__ == "__main__":
    sys.exit(main())
