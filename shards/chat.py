"""ChatML, defined once: what the SFT pipeline trains on, what generation and chat prompt with, and
the `chat_template` an export hands to transformers.

    <|im_start|>{role}\\n{content}<|im_end|>\\n        for every user/assistant turn, in order
    <|im_start|>assistant\\n                          the generation prompt

Axiom-Instruct's convention: system turns are dropped; the special tokens are the tokenizer's own ids
(cl100k: <|im_start|> 100264, <|im_end|> 100265); the text between them, `{role}\\n{content}`, is
encoded as plain text in one call and the "\\n" after <|im_end|> on its own. That is also how an HF
tokenizer tokenizes the rendered template (it cuts the text at special tokens and encodes each piece),
so `apply_chat_template(..., tokenize=True)` on an export gives these same ids.

Loss mask (SFT): 1 on assistant turns including their `<|im_start|>assistant\\n` header, <|im_end|> and
the trailing newline (Axiom's code counts those too), 0 elsewhere.
"""
from __future__ import annotations

import numpy as np

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")

# Jinja for transformers' apply_chat_template: the same text render() gives.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Axiom-Instruct's published sampling settings: the defaults for chatting with an SFT model.
CARD_SAMPLING = dict(temperature=0.2, top_p=0.85, repetition_penalty=1.15, no_repeat_ngram=3)


def render(messages, add_generation_prompt: bool = False) -> str:
    """The text a conversation becomes (system turns dropped)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages if m["role"] != "system")
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def has_chatml(tok) -> bool:
    """Whether the tokenizer has <|im_start|> and <|im_end|> as special tokens."""
    sp = getattr(tok, "special_tokens", None) or {}
    return IM_START in sp and IM_END in sp


def chat_ids(tok) -> tuple[int, int]:
    """(<|im_start|>, <|im_end|>) ids, or a ValueError naming the tokenizer."""
    if not has_chatml(tok):
        raise ValueError(f"tokenizer {tok.name} has no {IM_START}/{IM_END} special tokens: ChatML needs them")
    return tok.special_tokens[IM_START], tok.special_tokens[IM_END]


def encode(tok, conversations, num_threads: int | None = None, add_generation_prompt: bool = False):
    """[(ids, loss_mask)] per conversation (lists of {role, content}); system turns are dropped.
    With add_generation_prompt each ends with `<|im_start|>assistant\\n` (mask 0): a prompt."""
    start, end = chat_ids(tok)
    newline = tok.encode("\n")
    convs = [[m for m in conv if m["role"] != "system"] for conv in conversations]
    pieces = [f"{m['role']}\n{m['content']}" for conv in convs for m in conv]
    encoded = tok.encode_batch(pieces, num_threads=num_threads) if pieces else []
    header = tok.encode("assistant\n") if add_generation_prompt else []
    out, i = [], 0
    for conv in convs:
        ids, mask = [], []
        for m in conv:
            seg = [start, *encoded[i], end, *newline]
            i += 1
            ids.extend(seg)
            mask.extend([1 if m["role"] == "assistant" else 0] * len(seg))
        if add_generation_prompt:
            ids.extend([start, *header])
            mask.extend([0] * (1 + len(header)))
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)))
    return out


def prompt(tok, messages) -> list[int]:
    """Ids of a conversation so far plus the assistant header: what a chat model continues."""
    return [int(t) for t in encode(tok, [messages], add_generation_prompt=True)[0][0]]
