"""Model zoo: build_model(cfg) turns a curriculum's `model:` section into an nn.Module.

cfg["arch"] picks the family ("dense" or "hybrid"); an optional cfg["preset"] names a seed model
whose options the remaining keys override. Every other key must be a field of that family's config
dataclass: a misspelt or missing key is a ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import importlib

import torch
import torch.nn as nn

from trainer.config import did_you_mean
from trainer.models.layers import KVCache  # noqa: F401  (re-exported for generate / trainer)

ARCHS = {
    "dense": ("trainer.models.dense", "DenseConfig", "DenseLM"),
    # Llama Think, imported lazily so the dense path works without it.
    "hybrid": ("trainer.models.hybrid", "HybridConfig", "HybridLM"),
}


def _family(arch):
    if arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {arch!r}{did_you_mean(arch, ARCHS)}; "
                         f"expected one of {sorted(ARCHS)}")
    mod_name, cfg_name, cls_name = ARCHS[arch]
    mod = importlib.import_module(mod_name)
    return mod, getattr(mod, cfg_name), getattr(mod, cls_name)


def model_fields(arch) -> dict:
    """Field name -> type of the config dataclass `arch` selects (for typing a curriculum's values)."""
    import typing

    _, cfg_cls, _ = _family(arch)
    return {k: v for k, v in typing.get_type_hints(cfg_cls).items() if k in {f.name for f in dataclasses.fields(cfg_cls)}}


def make_config(cfg: dict):
    """Validate a `model:` section and return (config dataclass instance, model class)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"model: expected a mapping, got {type(cfg).__name__}")
    if "arch" not in cfg:
        raise ValueError("model.arch is required ('dense' or 'hybrid')")
    cfg = dict(cfg)
    mod, cfg_cls, model_cls = _family(cfg.pop("arch"))
    presets = getattr(mod, "PRESETS", {})
    values = {}
    if "preset" in cfg:
        name = cfg.pop("preset")
        if name not in presets:
            raise ValueError(f"model.preset: unknown preset {name!r}{did_you_mean(name, presets)}; "
                             f"known: {sorted(presets)}")
        values.update(presets[name])
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    for key in cfg:
        if key not in fields:
            raise ValueError(f"model.{key}: unknown option{did_you_mean(key, fields, n=3)}")
    values.update(cfg)
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.init]
    if missing:
        raise ValueError(f"model: missing required option(s) {', '.join('model.' + m for m in missing)}")
    try:
        return cfg_cls(**values), model_cls
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {e}") from None


def build_model(cfg: dict, device=None) -> nn.Module:
    """Build (and, off the meta device, initialise) the model described by a `model:` section."""
    config, model_cls = make_config(cfg)
    if device is None:
        return model_cls(config)
    with torch.device(device):
        return model_cls(config)


def count_params(cfg: dict) -> int:
    """Exact parameter count (tied weights once) without allocating: built on the meta device."""
    return build_model(cfg, device="meta").num_params()


__all__ = ["build_model", "count_params", "make_config", "model_fields", "KVCache"]
