"""Model zoo: a curriculum's `model:` section becomes its family's typed config (`make_config`), and
`build_model(config)` turns that into an nn.Module.

section["arch"] picks the family ("dense" or "hybrid"); an optional section["preset"] names a seed
model whose options the remaining keys override. Every other key must be a field of that family's
config dataclass: a misspelt or missing key is a ValueError naming it. Each config class carries its
family name as `arch` (a ClassVar, so `dataclasses.asdict` leaves it out and `model_section` puts it
back), which is how a typed config finds its model class again.
"""
from __future__ import annotations

import dataclasses
import importlib

import torch
import torch.nn as nn

from trainer.errors import did_you_mean
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
    """Validate a `model:` section and return its family's config dataclass instance."""
    if not isinstance(cfg, dict):
        raise ValueError(f"model: expected a mapping, got {type(cfg).__name__}")
    if "arch" not in cfg:
        raise ValueError("model.arch is required ('dense' or 'hybrid')")
    cfg = dict(cfg)
    mod, cfg_cls, _ = _family(cfg.pop("arch"))
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
        return cfg_cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {e}") from None


def model_section(config) -> dict:
    """A typed config written back as a `model:` section (`arch` plus every field, presets expanded):
    what a checkpoint's config.json stores, and what `make_config` reads back to the same config."""
    return {"arch": config.arch, **dataclasses.asdict(config)}


def build_model(config, device=None) -> nn.Module:
    """Build (and, off the meta device, initialise) the model a typed config describes. A `model:`
    section as written (a dict, e.g. a checkpoint's config.json) is validated by make_config first."""
    if isinstance(config, dict):
        config = make_config(config)
    model_cls = _family(config.arch)[2]
    if device is None:
        return model_cls(config)
    with torch.device(device):
        return model_cls(config)


def count_params(config) -> int:
    """Exact parameter count (tied weights once) without allocating: built on the meta device."""
    return build_model(config, device="meta").num_params()


__all__ = ["build_model", "count_params", "make_config", "model_fields", "model_section", "KVCache"]
