"""Export a trained model: a Hugging Face folder (or, with --format c, the C runner's model.bin).

    python -m trainer.export runs/atom --out exports/atom                    # newest checkpoint, fp32
    python -m trainer.export runs/argonne/checkpoints/step_0010000 --out exports/argonne \
        --dtype bfloat16 --max-shard-size 2GB                                # sharded + index.json
    python -m trainer.export runs/llama-think --format c --out llama-think.bin

The folder holds model.safetensors (sharded above --max-shard-size), config.json,
generation_config.json, the tokenizer as transformers loads it (tokenizer.json, tokenizer_config.json,
special_tokens_map.json; ChatML chat_template for SFT runs), and README.md, a model card with the
training facts and the loss plot. A Llama-exact model loads in stock LlamaForCausalLM; any other
model carries the trainer's own modeling code and loads with trust_remote_code=True (trainer/tools/hf.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from shards.chat import CARD_SAMPLING, CHAT_TEMPLATE, has_chatml
from shards.tokenizers import save_hf_tokenizer
from trainer.tools import hf
from trainer.checkpoint import load_model, load_train_state
from shards.tokenizers import load_tokenizer
from trainer.tools.generate import stop_ids
from trainer.telemetry.metrics import MetricsLog

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def is_chat(cfg: dict, tok) -> bool:
    """A ChatML model: an SFT run (one conversation per row), or a folder whose template is ours,
    and in either case a tokenizer with the ChatML tokens."""
    template = (cfg.get("tokenizer") or {}).get("chat_template")
    wants = (cfg.get("data") or {}).get("packing") == "document" or template == CHAT_TEMPLATE
    return wants and has_chatml(tok)


def sample_settings(cfg: dict, chat: bool) -> dict:
    """generation_config's sampling: Axiom-Instruct's card for SFT runs, else the curriculum's sample."""
    if chat and "data" in cfg:
        return {"max_new_tokens": 128, **CARD_SAMPLING}
    return {k: v for k, v in (cfg.get("sample") or {}).items() if k in hf.GEN_KEYS}


def export(src: str | Path, out: str | Path, dtype: str | None = None, max_shard_size: str = "2GB") -> dict:
    """Write the HF folder for SRC (run, checkpoint, HF folder, hf://). Returns its config.json."""
    model, cfg, ckpt = load_model(src)
    tok = load_tokenizer(cfg)
    out = Path(out)
    chat = is_chat(cfg, tok)
    stops = list(stop_ids(tok, chat))
    # a folder's own (non-ChatML) template travels as it is
    template = CHAT_TEMPLATE if chat else (cfg.get("tokenizer") or {}).get("chat_template")
    ids = save_hf_tokenizer(tok, out, chat_template=template, model_max_length=model.config.max_seq_len)
    config = hf.write_model_folder(model, out, ids, DTYPES[dtype] if dtype else None, max_shard_size)
    gen = hf.generation_config(sample_settings(cfg, chat), ids, stops)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    if hf.is_hf_folder(ckpt):  # re-export: the card and plot travel as they are
        for name in ("README.md", "training.png"):
            if (ckpt / name).is_file() and ckpt.resolve() != out.resolve():
                shutil.copyfile(ckpt / name, out / name)
    else:
        write_card(out, model, cfg, ckpt, config, chat)
    return config


# ------------------------------------------------------------------------------------ model card


def _run_facts(ckpt: Path) -> dict:
    """Step, tokens and final losses from the run around a checkpoint (RUN/checkpoints/step_X)."""
    run = ckpt.parent.parent
    facts = {"step": None, "tokens": None, "train_loss": None, "val_loss": {}, "plot": None}
    if (ckpt / "train_state.pt").is_file():
        st = load_train_state(ckpt, mmap=True)
        facts["step"], facts["tokens"] = st.get("step"), st.get("tokens_seen")
    for row in MetricsLog(run, enabled=False).rows():
        if facts["step"] is not None and row.get("step", 0) > facts["step"]:
            continue  # rows of a later checkpoint than the one exported
        if row.get("type") == "train":
            facts["train_loss"] = row["loss"]
        elif row.get("type") == "eval":
            facts["val_loss"] = row["loss"]
    if (run / "training.png").is_file():
        facts["plot"] = run / "training.png"
    return facts


def write_card(out: Path, model, cfg: dict, ckpt: Path, config: dict, chat: bool) -> None:
    f = _run_facts(ckpt)
    llama = config["model_type"] == "llama"
    name = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
    data = cfg.get("data") or {}
    lines = [f"# {name}", "",
             f"Trained with ShardLoom. {model.num_params():,} parameters"
             + (f", {f['step']:,} steps, {f['tokens']:,} tokens." if f["step"] is not None else "."), "",
             "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "tok = AutoTokenizer.from_pretrained(PATH)",
             "model = AutoModelForCausalLM.from_pretrained(PATH" + ("" if llama else ", trust_remote_code=True") + ")",
             "```", "",
             ("Stock `LlamaForCausalLM` (no remote code)." if llama else
              "Custom architecture: the folder carries ShardLoom's own modeling code (`modeling_shardloom.py`)."),
             "Chat model: prompts use ChatML (`tok.apply_chat_template`)." if chat else "", "",
             "## Training", "", f"- model: `{json.dumps(cfg.get('model'), sort_keys=True)}`",
             f"- tokenizer: {(cfg.get('tokenizer') or {}).get('name')}",
             f"- sources: {', '.join(s.get('name', '?') for s in data.get('sources', [])) or 'n/a'}"]
    sources = [s.get("name", "?") for s in data.get("sources", [])]
    one = [{"at": 0.0, "weights": {sources[0]: 1}}] if len(sources) == 1 else []  # Config.mixture's default
    for p in data.get("schedule") or one:
        at = f"at {p['at']:.0%} of the run" if p.get("at") is not None else f"at {p.get('tokens'):,.0f} tokens"
        lines.append(f"- mixture {at}: " + ", ".join(f"{k} {v:g}" for k, v in p["weights"].items()))
    if f["train_loss"] is not None:
        lines.append(f"- final train loss: {f['train_loss']:.4f}")
    for src, v in f["val_loss"].items():
        lines.append(f"- final val loss ({src}): {v:.4f}")
    if f["plot"] is not None:
        shutil.copyfile(f["plot"], out / "training.png")
        lines += ["", "![loss, learning rate and mixture](training.png)"]
    (out / "README.md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------ CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="run dir, checkpoint dir, HF folder or hf://org/name")
    ap.add_argument("--out", required=True, help="output folder (hf) or file (c)")
    ap.add_argument("--format", choices=["hf", "c"], default="hf")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as trained (fp32)")
    ap.add_argument("--max-shard-size", default="2GB", help="hf: split model.safetensors above this size")
    args = ap.parse_args(argv)
    if args.format == "c":  # the C export's own command, so both spellings behave alike
        from trainer.tools import export_c

        dtype = "bf16" if DTYPES.get(args.dtype) == torch.bfloat16 else "fp32"
        return export_c.main([args.checkpoint, "--out", args.out, "--dtype", dtype])
    try:
        config = export(args.checkpoint, args.out, args.dtype, args.max_shard_size)
        kind = "LlamaForCausalLM" if config["model_type"] == "llama" else "ShardLoom (trust_remote_code=True)"
        print(f"[export] {args.out}: {kind}", file=sys.stderr)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
