"""What a checkpoint carries beyond the weights, and resuming from it: the typed train state
(`train_state.pt`), the config stored beside it, and `restore`, which refuses what would change the
batches and applies every other change from the resumed step on."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import load_model_weights, load_train_state, set_rng_state
from .config import Config, ConfigError
from .telemetry.console import log
from .parallel import Dist, load_checkpoint


def checkpoint_config(cfg: Config, world: int) -> dict:
    """The config.json stored with each checkpoint. A relative tokenizer path is made absolute: it was
    relative to where training ran, and `trainer.tools.generate` may be run from anywhere."""
    out = {**cfg.to_dict(), "world_size": world}
    tok = dict(out.get("tokenizer") or {})
    if tok.get("path") and Path(tok["path"]).exists():
        tok["path"] = str(Path(tok["path"]).resolve())
    out["tokenizer"] = tok
    return out


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'section.key old -> new' for every value that differs between two checkpoint config dicts."""
    out = []
    for k in sorted(set(old) | set(new) - {"source_file"}):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {json.dumps(a)} -> {json.dumps(b)}")
    return out


@dataclass
class TrainState:
    """What train_state.pt holds (plain types and tensors, so it loads with weights_only=True)."""

    step: int
    tokens_seen: int
    optimizer: dict
    loader: dict
    rng: dict
    tokens_by_source: dict
    stage: str
    world_size: int
    total_steps: int
    guard: dict = field(default_factory=dict)  # trainer.guard.GuardState as a dict: skipped steps, spike window

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def load(cls, ckpt: Path) -> "TrainState":
        raw = load_train_state(ckpt)
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in raw and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{ckpt / 'train_state.pt'}: not a train state of this trainer (missing {missing})")
        return cls(**{f.name: raw[f.name] for f in fields if f.name in raw})


def restore(ckpt: Path, cfg: Config, world: int, model, opt, loader, device, d: Dist) -> TrainState:
    """Load a checkpoint for --resume (or a rollback); returns its train state. What would change the batches (steps, schedule,
    batch, world size) or cannot carry over (another optimizer, another model shape) is refused in one
    line; any other change (optim.lr, schedule, ...) is applied from this step on, and printed."""
    st = TrainState.load(ckpt)
    saved = json.loads((ckpt / "config.json").read_text())
    changes = config_changes(saved, checkpoint_config(cfg, world))
    # the optimizer state is one optimizer's, and a DCP folder under fsdp but a tensor dict under ddp
    for section, key, now, default in (("optim", "name", cfg.optim.name, None),
                                       ("train", "parallel", cfg.train.parallel, "ddp")):
        was = saved.get(section, {}).get(key, default)
        if was != now:
            raise ConfigError(f"{ckpt}: cannot resume with {section}.{key} {now}: the run's optimizer state was "
                              f"saved with {section}.{key} {was}; resume with {section}.{key}={was}, or start a "
                              f"new run with train.init_from={ckpt}")
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        if cfg.train.parallel == "fsdp":  # sharded optimizer state through DCP, resharded to this world
            load_checkpoint(model, opt, ckpt)
        else:
            load_model_weights(model, ckpt, device=device)
            opt.load_state_dict(st.optimizer)
        loader.load_state_dict(st.loader)
    except ValueError as e:  # changed steps/schedule/batch/world size: the batches would differ
        hint = ""
        if st.world_size != world:
            tps = st.loader["rows_per_step"] * st.loader["seq_len"]
            hint = (f"; to resume at world size {world}, keep the tokens per step: batch.tokens_per_step={tps} "
                    f"batch.grad_accum=null (grad_accum then follows the world size)")
        raise ConfigError(
            f"{ckpt}: cannot resume with these settings: {e}. Resume with the settings the run started with "
            f"(train.steps {st.total_steps}, world size {st.world_size}){hint}, or start a new run "
            f"from its weights with train.init_from={ckpt}") from None
    if changes:  # the saved param groups carry the old lr/betas/decay: the settings given now win
        for g, f in zip(opt.param_groups, fresh):
            g.update(f)
        log.info(f"[resume] changed since {ckpt.name}, applied from step {int(st.step)} on: {', '.join(changes)}")
    set_rng_state(st.rng)
    return st
