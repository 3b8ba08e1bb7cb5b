"""Hugging Face folders in and out: weights, config.json, and the three formats we read.

Out (`export_folder`): a Llama-exact dense model becomes a stock `LlamaForCausalLM` folder (no remote
code); every other model becomes `model_type: shardloom` with its modeling code copied beside it
(`trainer/models/modeling_shardloom.py` and the files it imports) and an `auto_map`.

In (`read_folder`): an HF folder (ours, any Llama, or Argonne's published `argonne2` layout) as a
trainer `model:` section plus a state dict in our names. Nothing from the folder is executed: we read
config.json ourselves and build our own model, so `trust_remote_code` never comes into it.

RoPE layouts: our dense model rotates pairs (i, i+D/2) ("half", HF's rotate_half) or (2i, 2i+1)
("interleaved", Meta's original Llama and Axiom). Attention scores are q.k summed over head dims, so
permuting the rows of q_proj and k_proj within each head by the same permutation leaves them
unchanged; mapping pair (2i, 2i+1) to (i, i+D/2) turns an interleaved model into a half one exactly.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch

from shards.tokenizers import post_processor_bos
from trainer.models import make_config
from trainer.models.dense import DenseConfig

# Fields of DenseConfig that change nothing a forward pass computes from the weights.
NON_COMPUTE = {"activation_checkpointing", "max_seq_len", "init", "init_std", "use_fla", "linear_chunk_size",
               "rope_layout"}
LLAMA_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
LLAMA_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
               **{f"attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"},
               **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}}
# Argonne 3.0's own modeling code (model_type "argonne2") names its modules this way.
ARGONNE_TOP = {"embed.weight": "embed_tokens.weight", "norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
ARGONNE_BLOCK = {"attn_norm.weight": "input_norm.weight", "mlp_norm.weight": "post_norm.weight",
                 "attn_out_norm.weight": "attn_out_norm.weight", "mlp_out_norm.weight": "mlp_out_norm.weight",
                 "attn.q_norm.weight": "attn.q_norm.weight", "attn.k_norm.weight": "attn.k_norm.weight",
                 "attn.v_norm.weight": "attn.v_norm_layer.weight",
                 **{f"attn.{p}_proj.weight": f"attn.{p}_proj.weight" for p in "qkvo"},
                 **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}}
# The model files a shardloom export carries (the ones modeling_shardloom imports, transitively).
MODEL_FILES = ("modeling_shardloom.py", "layers.py", "dense.py", "hybrid.py", "csa.py", "gated_deltanet.py")
SHARDLOOM_AUTO_MAP = {"AutoConfig": "modeling_shardloom.ShardLoomConfig",
                      "AutoModelForCausalLM": "modeling_shardloom.ShardLoomForCausalLM"}


class FormatError(ValueError):
    """A folder we cannot read as a model: the message names the file and field."""


# ------------------------------------------------------------------------------------ RoPE rows


def _half_order(hd: int) -> torch.Tensor:
    """Row order that turns interleaved pairs (2i, 2i+1) into half pairs (i, i + hd/2)."""
    return torch.cat((torch.arange(0, hd, 2), torch.arange(1, hd, 2)))


def _permute_rows(w: torch.Tensor, n_heads: int, hd: int, order: torch.Tensor) -> torch.Tensor:
    return w.view(n_heads, hd, -1)[:, order].reshape(n_heads * hd, -1).contiguous()


def relayout_rope(sd: dict, cfg, src: str, dst: str) -> dict:
    """q/k rows of a dense state dict moved from RoPE layout `src` to `dst` (a copy; same if equal)."""
    if src == dst:
        return sd
    order = _half_order(cfg.head_dim)
    if src == "half":  # the inverse permutation
        order = torch.argsort(order)
    out = dict(sd)
    for i in range(cfg.n_layers):
        for p, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
            key = f"blocks.{i}.attn.{p}_proj.weight"
            out[key] = _permute_rows(sd[key], heads, cfg.head_dim, order)
    return out


# ------------------------------------------------------------------------------------ out


def llama_blockers(c) -> list[str]:
    """Why a DenseConfig is not exactly LlamaForCausalLM (empty: it is, up to the RoPE layout)."""
    why = [name for name, on in (("qk_norm", c.qk_norm), ("v_norm", c.v_norm), ("sandwich_norm", c.sandwich_norm),
                                 ("logit_softcap", c.logit_softcap is not None),
                                 ("sliding_window", c.sliding_window is not None),
                                 ("xsa_layers", any(c.xsa_for(i) for i in range(c.n_layers))),
                                 ("rope_dims", c.rope_dims not in (None, c.head_dim)),
                                 ("norm_fp32", not c.norm_fp32)) if on]
    if c.attn_scale is not None and abs(c.attn_scale - c.head_dim ** -0.5) > 1e-12:
        why.append("attn_scale")
    return why


def _rename(sd: dict, n_layers: int, top: dict, block: dict, prefix: str, inverse: bool = False) -> dict:
    """Our names -> a foreign layout (or back with inverse=True); an unmapped key is an error."""
    table = dict(top)
    for i in range(n_layers):
        table.update({f"blocks.{i}.{k}": prefix.format(i=i) + v for k, v in block.items()})
    if inverse:
        table = {v: k for k, v in table.items()}
    missing = [k for k in sd if k not in table]
    if missing:
        raise FormatError(f"unexpected weight names {missing[:5]}")
    return {table[k]: v for k, v in sd.items()}


def is_llama_exact(model) -> bool:
    return isinstance(model.config, DenseConfig) and not llama_blockers(model.config)


def hf_config(model, tok_info: dict) -> dict:
    """config.json for `model`: Llama's fields when it is Llama-exact, else ours with an auto_map."""
    c = model.config
    ids = {k: tok_info.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if is_llama_exact(model):
        # Both rope spellings: transformers 5 reads rope_parameters, 4.x rope_theta.
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
                "hidden_size": c.d_model, "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers,
                "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
                "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
                "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
                "initializer_range": 0.02, "tie_word_embeddings": bool(c.tie_embeddings), "use_cache": True,
                **ids}
    arch = "dense" if type(model).__name__ == "DenseLM" else "hybrid"
    return {"architectures": ["ShardLoomForCausalLM"], "model_type": "shardloom", "auto_map": SHARDLOOM_AUTO_MAP,
            "arch": arch, "shardloom": dataclasses.asdict(c), "vocab_size": c.vocab_size, "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layers, "max_position_embeddings": c.max_seq_len,
            "tie_word_embeddings": False, **ids}


def hf_state_dict(model) -> dict:
    """The weights as the exported config.json names them."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if not is_llama_exact(model):
        return {f"model.{k}": v for k, v in sd.items()}
    c = model.config
    sd = relayout_rope(sd, c, c.rope_layout, "half")
    return _rename(sd, c.n_layers, LLAMA_TOP, LLAMA_BLOCK, "model.layers.{i}.")


def transformers_llama(model, attn_implementation: str = "sdpa"):
    """A stock transformers `LlamaForCausalLM` computing the same function as a Llama-exact `model`
    (weights copied through the export mapping), for side-by-side checks and benchmarks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not is_llama_exact(model):
        raise FormatError(f"not Llama-exact: {', '.join(llama_blockers(model.config))}")
    config = LlamaConfig(**{k: v for k, v in hf_config(model, {}).items() if k not in ("architectures", "model_type")})
    config._attn_implementation = attn_implementation
    out = LlamaForCausalLM(config)
    sd = hf_state_dict(model)
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = out.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise FormatError(f"Llama mapping incomplete (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return out.to(next(model.parameters()).device).eval()


def copy_modeling_code(out: Path) -> None:
    """The trainer's own model files, imports made package-relative (how transformers loads them)."""
    src = Path(__file__).resolve().parents[1] / "models"
    for name in MODEL_FILES:
        text = (src / name).read_text()
        (out / name).write_text(re.sub(r"\bfrom trainer\.models\.(\w+) import", r"from .\1 import", text))


def save_weights(sd: dict, out: Path, dtype: torch.dtype | None, max_shard_size: str) -> list[str]:
    """model.safetensors, or shards + model.safetensors.index.json above max_shard_size."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
          for k, v in sorted(sd.items())}
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def write_model_folder(model, out: Path, tok_info: dict, dtype: torch.dtype | None = None,
                       max_shard_size: str = "2GB") -> dict:
    """config.json + weights (+ modeling code for shardloom exports) into `out`. Returns config.json."""
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(model, tok_info)
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    # Written beside the folder's current weights and swapped in once complete: a failed or killed
    # export leaves the previous one whole, and one with another shard count leaves no strays.
    staging = out / ".export-weights.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_weights(hf_state_dict(model), staging, dtype, max_shard_size)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    for new in sorted(staging.iterdir()):
        new.replace(out / new.name)
    staging.rmdir()
    if config["model_type"] == "shardloom":
        copy_modeling_code(out)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


# ------------------------------------------------------------------------------------ in


def is_hf_folder(path: str | Path) -> bool:
    """A folder whose config.json names a transformers model_type (ours carry a `model:` section)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def resolve_hub(path: str) -> Path:
    """`hf://org/name[@revision]` -> a local snapshot (weights, configs, tokenizer; no code is run)."""
    if not str(path).startswith("hf://"):
        return Path(path)
    repo = str(path)[len("hf://"):].removeprefix("models/")
    repo, _, revision = repo.partition("@")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision or None,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: one line, the hub's reason
        raise FileNotFoundError(f"{path}: cannot fetch from the Hugging Face hub ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None


def read_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FormatError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(folder / f)))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise FormatError(f"{folder / f}: unreadable safetensors ({e})") from None
    return sd


def _need(cfg: dict, key: str, file: Path):
    if key not in cfg:
        raise FormatError(f"{file}: {key} is missing")
    return cfg[key]


def _rope_theta(cfg: dict, file: Path) -> float:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default":
        raise FormatError(f"{file}: rope type {kind!r} is not supported (only plain RoPE)")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _dense_from_hf(cfg: dict, file: Path, tied_default: bool, **extra) -> dict:
    """Shapes from HF config.json keys; tied_default is what the format's own config class assumes
    when the key is absent (LlamaConfig: untied; Argonne's: tied)."""
    d, h = _need(cfg, "hidden_size", file), _need(cfg, "num_attention_heads", file)
    return {"arch": "dense", "vocab_size": _need(cfg, "vocab_size", file), "d_model": d,
            "n_layers": _need(cfg, "num_hidden_layers", file), "n_heads": h,
            "n_kv_heads": cfg.get("num_key_value_heads") or h, "head_dim": cfg.get("head_dim") or d // h,
            "ffn_dim": _need(cfg, "intermediate_size", file),
            "max_seq_len": cfg.get("max_position_embeddings", 1024), "rope_theta": _rope_theta(cfg, file),
            "rope_layout": "half", "norm_eps": cfg.get("rms_norm_eps", 1e-5),
            "tie_embeddings": bool(cfg.get("tie_word_embeddings", tied_default)), **extra}


def read_folder(folder: str | Path) -> tuple[dict, dict]:
    """(trainer `model:` section, state dict in our names) from an HF model folder."""
    folder = Path(folder)
    file = folder / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{file}: unreadable ({e})") from None
    kind = cfg.get("model_type")
    if kind not in ("shardloom", "llama", "argonne2"):
        raise FormatError(f"{file}: model_type {kind!r} is not one we read (llama, argonne2, shardloom)")
    sd = read_weights(folder)
    if kind == "shardloom":
        section = {"arch": _need(cfg, "arch", file), **_need(cfg, "shardloom", file)}
        return section, {k.removeprefix("model."): v for k, v in sd.items()}
    if kind == "llama":
        for key, want in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if cfg.get(key, want) != want:
                raise FormatError(f"{file}: {key}={cfg[key]!r} is not supported (expected {want!r})")
        section = _dense_from_hf(cfg, file, tied_default=False)
        sd = _rename(sd, section["n_layers"], LLAMA_TOP, LLAMA_BLOCK, "model.layers.{i}.", inverse=True)
    else:  # argonne2
        # The released weights were trained with full attention (their window lived only in an unused
        # flash-attn path): no window here, as in our argonne-3.0 preset.
        section = _dense_from_hf(cfg, file, tied_default=True, norm_eps=cfg.get("rms_norm_eps", 1e-6),
                                 qk_norm=bool(cfg.get("qk_norm", True)), v_norm=bool(cfg.get("v_norm", True)),
                                 sandwich_norm=bool(cfg.get("sandwich_norm", True)),
                                 logit_softcap=float(cfg["logit_softcap"]) if cfg.get("logit_softcap") else None)
        sd = _rename(sd, section["n_layers"], ARGONNE_TOP, ARGONNE_BLOCK, "blocks.{i}.", inverse=True)
    if section["tie_embeddings"] and "lm_head.weight" in sd:  # stored by some writers although tied
        if not torch.equal(sd["lm_head.weight"], sd.get("embed.weight", sd["lm_head.weight"])):
            raise FormatError(f"{file}: tie_word_embeddings is true but lm_head.weight differs from the embedding")
        sd.pop("lm_head.weight")
    return section, sd


def fit_to(sd: dict, src_section: dict, model) -> dict:
    """`sd` (laid out as src_section says) made ready for `model`: the same computation is required
    (a differing field is an error naming it); a different RoPE layout is converted."""
    src = make_config(src_section)
    dst = model.config
    if type(src) is not type(dst):
        raise FormatError(f"the weights are a {type(src).__name__} model, the curriculum builds a {type(dst).__name__}")
    a, b = dataclasses.asdict(src), dataclasses.asdict(dst)
    diff = sorted(k for k in a if k not in NON_COMPUTE and a[k] != b.get(k))
    if diff:
        raise FormatError("the weights' model differs from the curriculum's in "
                          + ", ".join(f"model.{k} ({a[k]!r} vs {b.get(k)!r})" for k in diff))
    if hasattr(src, "rope_layout"):
        sd = relayout_rope(sd, src, src.rope_layout, dst.rope_layout)
    return sd


def tokenizer_section(folder: Path) -> dict:
    """The `tokenizer:` section for a folder's tokenizer.json, with the special tokens its
    tokenizer_config.json names (so EOS/BOS and the BOS convention survive the round trip)."""
    if not (folder / "tokenizer.json").is_file():  # load_tokenizer names the problem unless a path is given
        model = folder / "tokenizer.model"  # a SentencePiece folder (Llama 2 style)
        return {"name": str(model.resolve())} if model.is_file() else {}
    tc = {}
    if (folder / "tokenizer_config.json").is_file():
        tc = json.loads((folder / "tokenizer_config.json").read_text())

    def token(v):
        return v.get("content") if isinstance(v, dict) else v
    bos, add_bos = token(tc.get("bos_token")), tc.get("add_bos_token")
    if add_bos is None:  # no stated convention: the post-processor's (transformers applies it too)
        if prepended := post_processor_bos(folder / "tokenizer.json"):
            bos, add_bos = prepended, True
    return {"name": str((folder / "tokenizer.json").resolve()), "eos": token(tc.get("eos_token")),
            "bos": bos, "add_bos": bool(add_bos), "chat_template": tc.get("chat_template")}


# ------------------------------------------------------------------------------------ sampling settings

# our GenerationConfig field -> transformers' generation_config.json key
GEN_KEYS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "repetition_penalty": "repetition_penalty", "no_repeat_ngram": "no_repeat_ngram_size"}


def generation_config(sample: dict, ids: dict, stop_ids: list[int]) -> dict:
    """generation_config.json from our sampling settings. top_k is always written (0 = off), since
    transformers would otherwise apply its own default of 50; temperature 0 is greedy, as in ours."""
    neutral = {"top_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram": 0}
    greedy = bool(sample.get("greedy")) or sample.get("temperature") == 0
    out = {"do_sample": not greedy, "bos_token_id": ids.get("bos_token_id"), "pad_token_id": ids.get("pad_token_id"),
           "eos_token_id": stop_ids[0] if len(stop_ids) == 1 else list(stop_ids), "top_k": sample.get("top_k") or 0}
    for ours, theirs in GEN_KEYS.items():
        v = sample.get(ours)
        if v is not None and v != neutral.get(ours) and ours != "top_k" and not (greedy and ours == "temperature"):
            out[theirs] = v
    return {k: v for k, v in out.items() if v is not None}


def sample_defaults(folder: Path) -> dict:
    """Our sampling settings back from a folder's generation_config.json ({} when there is none)."""
    f = Path(folder) / "generation_config.json"
    if not f.is_file():
        return {}
    g = json.loads(f.read_text())
    out = {ours: g[theirs] for ours, theirs in GEN_KEYS.items() if theirs in g}
    if not out.get("top_k"):  # 0 means off; ours says None
        out.pop("top_k", None)
    if g.get("do_sample") is False:
        out["temperature"] = 0.0  # greedy
    return out
