"""Export a trainer model (dense or hybrid) to the single-file binary that c/run.c runs.

    python -m trainer.export_c RUN_OR_CHECKPOINT --out model.bin [--dtype fp32|bf16]
    export_c(model, cfg, tok, "model.bin", dtype="fp32")      # library use

The layout is in docs/c-format.md: a fixed header (magic, version, the whole numeric config), one
record per layer (mixer kind, attention window, XSA), a table of every tensor's dtype and shape, the
config as JSON, the tensors in the fixed order `tensor_names` gives, then the tokenizer's pieces and
scores (trainer/tools/c_tokenizer.py). Every entry of the model's state dict is written, and nothing else:
an exporter that silently drops a parameter (a compressor, a hyper-connection scale) cannot pass
`_check_complete`. With dtype="bf16" the matrices are stored as bfloat16 and vectors stay float32.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

from shards.tokenizers import load_tokenizer
from trainer.checkpoint import load_model
from trainer.tools.c_tokenizer import tokenizer_section
from trainer.models.dense import DenseConfig
from trainer.models.hybrid import HybridConfig

MAGIC = b"SLMC"
VERSION = 1
HEADER_BYTES = 192
ALIGN = 64
FAMILY = {"dense": 1, "hybrid": 2}
MIXER = {"attn": 0, "linear": 1, "csa": 2, "full": 3}
DTYPES = {"fp32": 0, "bf16": 1}
N_INTS, N_FLOATS = 24, 8


def _family(model) -> str:
    c = model.config
    if isinstance(c, DenseConfig):
        return "dense"
    if isinstance(c, HybridConfig):
        return "hybrid"
    raise ValueError(f"export_c: unsupported model config {type(c).__name__} (dense or hybrid only)")


def _dense_layer(i: int, c: DenseConfig) -> list[str]:
    p = f"blocks.{i}."
    names = [p + "attn_norm.weight"] + [p + f"attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if c.qk_norm:
        names += [p + "attn.q_norm.weight", p + "attn.k_norm.weight"]
    if c.v_norm:
        names.append(p + "attn.v_norm.weight")
    if c.sandwich_norm:
        names.append(p + "attn_out_norm.weight")
    names += [p + "mlp_norm.weight"] + [p + f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    if c.sandwich_norm:
        names.append(p + "mlp_out_norm.weight")
    return names


def _hybrid_layer(i: int, c: HybridConfig) -> list[str]:
    p = f"blocks.{i}."
    kind = c.mixer_for(i)
    if kind == "linear":
        mixer = ["in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight",
                 "conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight"]
    else:
        mixer = ["wq.weight", "wk.weight", "wv.weight", "wo.weight", "q_norm.weight", "k_norm.weight"]
        if kind == "csa":
            mixer += ["compress_k.weight", "compress_v.weight", "blend_gate.weight"]
    return ([p + "mixer_norm.weight"] + [p + "mixer." + m for m in mixer]
            + [p + "mixer_residual_scale", p + "mixer_sublayer_scale", p + "ffn_norm.weight"]
            + [p + f"ffn.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
            + [p + "ffn_residual_scale", p + "ffn_sublayer_scale"])


def tensor_names(model) -> list[str]:
    """State-dict names in file order (docs/c-format.md lists the same order)."""
    c = model.config
    layer = _dense_layer if _family(model) == "dense" else _hybrid_layer
    names = ["embed.weight"]
    for i in range(c.n_layers):
        names += layer(i, c)
    names.append("norm.weight")
    if not c.tie_embeddings:
        names.append("lm_head.weight")
    return names


def _check_complete(names: list[str], state: dict) -> None:
    missing, extra = set(state) - set(names), set(names) - set(state)
    if missing or extra:
        raise ValueError(f"export_c: the file order and the model disagree: not exported {sorted(missing)}, "
                         f"not in the model {sorted(extra)}")


def _config_fields(model) -> tuple[list[int], list[float], list[tuple[int, int, int]]]:
    """The header's int and float config slots and one (mixer, window, xsa) record per layer."""
    c = model.config
    dense = _family(model) == "dense"
    ints = [c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.max_seq_len,
            (c.rope_dims or c.head_dim) if dense else c.rope_dims,
            int(dense and c.rope_layout == "interleaved"), int(c.tie_embeddings), int(not dense),
            int(c.qk_norm) if dense else 1, int(c.v_norm) if dense else 0, int(c.sandwich_norm) if dense else 0]
    ints += [0] * 5 if dense else [c.linear_heads, c.linear_head_dim, c.linear_conv_kernel, c.csa_window, c.csa_block]
    scale = (c.attn_scale if c.attn_scale is not None else c.head_dim ** -0.5) if dense else c.head_dim ** -0.5
    softcap = (c.logit_softcap or 0.0) if dense else 0.0
    floats = [c.rope_theta, c.norm_eps, scale, softcap]
    if dense:
        layers = [(MIXER["attn"], c.window_for(i) or 0, int(c.xsa_for(i))) for i in range(c.n_layers)]
    else:
        layers = [(MIXER[c.mixer_for(i)], c.csa_window if c.mixer_for(i) == "csa" else 0, 0)
                  for i in range(c.n_layers)]
    return ints + [0] * (N_INTS - len(ints)), floats + [0.0] * (N_FLOATS - len(floats)), layers


def _as_stored(name: str, t: torch.Tensor, dtype: str) -> tuple[int, torch.Tensor]:
    """(dtype code, tensor as written): 1-D or 2-D, the depthwise conv [C, 1, K] as [C, K]."""
    t = t.detach().to("cpu", torch.float32)
    if t.ndim == 3:  # conv1d.weight
        t = t.reshape(t.shape[0], t.shape[2])
    if t.ndim not in (1, 2):
        raise ValueError(f"export_c: {name} has {t.ndim} dims; the format stores 1-D and 2-D tensors")
    if dtype == "bf16" and t.ndim == 2:
        return DTYPES["bf16"], t.to(torch.bfloat16)
    return DTYPES["fp32"], t.contiguous()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype("<f4").tobytes()


def _header(family: str, n_tensors: int, offsets: dict, ints, floats) -> bytes:
    h = MAGIC + struct.pack("<III", VERSION, FAMILY[family], n_tensors)
    h += struct.pack("<6Q", offsets["data"], offsets["data_bytes"], offsets["tok"], offsets["tok_bytes"],
                     offsets["meta"], offsets["meta_bytes"])
    h += struct.pack(f"<{N_INTS}i", *ints) + struct.pack(f"<{N_FLOATS}f", *floats)
    assert len(h) == HEADER_BYTES
    return h


def export_c(model, cfg: dict, tok, out_path, dtype: str = "fp32") -> Path:
    """Write `model` (and `tok`'s pieces, if given) to out_path in the C runner's format.

    cfg is the checkpoint's config (or its `model:` section); it is stored as JSON for reference.
    tok is a shards.tokenizers tokenizer or None (then the runner takes token ids only).
    """
    if dtype not in DTYPES:
        raise ValueError(f"export_c: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    family = _family(model)
    c = model.config
    if tok is not None and tok.vocab_size > c.vocab_size:
        raise ValueError(f"export_c: tokenizer {tok.name} has {tok.vocab_size} ids, the model only {c.vocab_size}")
    state = model.state_dict()
    names = tensor_names(model)
    _check_complete(names, state)
    stored = [_as_stored(n, state[n], dtype) for n in names]
    ints, floats, layers = _config_fields(model)
    table = b"".join(struct.pack("<4I", code, t.ndim, t.shape[0], t.shape[1] if t.ndim == 2 else 0)
                     for code, t in stored)
    layer_recs = b"".join(struct.pack("<4i", m, w, x, 0) for m, w, x in layers)
    meta = json.dumps(cfg, sort_keys=True, default=str).encode()
    meta_off = HEADER_BYTES + len(layer_recs) + len(table)
    data_off = -(-(meta_off + len(meta)) // ALIGN) * ALIGN
    data_bytes = sum(t.numel() * (2 if t.dtype == torch.bfloat16 else 4) for _, t in stored)
    tok_sec = tokenizer_section(tok)
    offsets = dict(data=data_off, data_bytes=data_bytes, tok=data_off + data_bytes, tok_bytes=len(tok_sec),
                   meta=meta_off, meta_bytes=len(meta))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_header(family, len(stored), offsets, ints, floats) + layer_recs + table + meta)
        f.write(b"\0" * (data_off - meta_off - len(meta)))
        for _, t in stored:
            f.write(_tensor_bytes(t))
        f.write(tok_sec)
    tmp.replace(out)  # a crash never leaves a half-written model.bin under the real name
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.export_c",
                                 description="Export a checkpoint to c/run.c's model.bin (docs/c-format.md).")
    ap.add_argument("checkpoint", help="run dir, checkpoint dir or HF folder")
    ap.add_argument("--out", required=True, help="output file, e.g. model.bin")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="matrices as fp32 or bf16")
    ap.add_argument("--tokenizer-path", default=None, help="override the tokenizer file from config.json")
    ap.add_argument("--no-tokenizer", action="store_true", help="write no pieces (the runner then takes ids only)")
    args = ap.parse_args(argv)
    try:
        model, cfg, ckpt = load_model(args.checkpoint)
        tok = None if args.no_tokenizer else load_tokenizer(cfg, args.tokenizer_path)
        out = export_c(model, cfg, tok, args.out, args.dtype)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{ckpt} -> {out} ({out.stat().st_size:,} bytes, {model.num_params():,} params, {args.dtype}, "
          f"tokenizer {tok.name if tok is not None else 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
