"""Curricula: one YAML per model, loaded into small typed dataclasses.

A curriculum holds the architecture (`model:`, loaded into the config dataclass its `arch` picks, so
`Config.model` is a DenseConfig or HybridConfig that `trainer.models.build_model` takes), the
tokenizer, the data sources with a mixture schedule, optimizer, LR schedule, batch, train, eval and
checkpoint sections. An optional `stages:` list runs the same curriculum several times in a row,
each stage overriding some sections (Argonne: pretrain, then continued pretraining from its final
checkpoint with a fresh optimizer and a reset data cursor).

Every error names the file and the dotted field, e.g.
    curricula/atom.yaml: optim.lr: expected a number, got 'abc'
CLI overrides `section.key=value` are typed by the dataclass field they land on (so `optim.lr=1e-3`
is a float even though YAML 1.1 would read `1e-3` as a string).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shards.s3 import is_s3_uri

from .errors import ConfigError, did_you_mean
from .loss import LOSS_CHUNK
from .mixture import MixtureError, MixturePoint, MixtureSchedule
from .models import make_config, model_fields, model_section

# The allowed values of each choice, in one place: the converter refuses anything else, naming the
# field, and the modules that act on a choice dispatch on these names.
OptimName = Literal["adamw", "adamw8bit", "muon"]
LRScheduleKind = Literal["wsd", "warmup_constant_cosine", "cosine", "constant"]
MuonMomentumStyle = Literal["sum", "ema"]  # buf = mu*buf + g (Llama Think, the default) | buf = lerp(buf, g, 1-mu)
MuonNSDtype = Literal["fp32", "bf16"]  # Newton-Schulz precision; bf16 applies on CUDA only
# pretraining windows | SFT: one conversation per row | whole documents per row by best fit (trainer/packing.py)
Packing = Literal["stream", "document", "bestfit"]
ParamKind = Literal["embedding", "matrix", "vector"]
StopSignal = Literal["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"]  # trainer/faults.py


@dataclass
class TokenizerSection:
    name: str = ""
    path: str | None = None  # for tokenizer.json / SentencePiece models; `name` may itself be a path


@dataclass
class SourceSection:
    name: str = ""
    path: str = ""  # shard dir or s3:// URI


@dataclass
class MixturePointSection:
    """Weights at one point of the run, as a curriculum writes it: `at` is a fraction (0..1) or
    `tokens` an absolute count (`Config.mixture` places both in tokens). Between points the weights
    move linearly; a hard switch is two points close together."""

    weights: dict[str, float] = field(default_factory=dict)
    at: float | None = None
    tokens: float | None = None


@dataclass
class DataSection:
    sources: list[SourceSection] = field(default_factory=list)
    schedule: list[MixturePointSection] = field(default_factory=list)
    cache_dir: str | None = None  # local cache for s3:// sources
    packing: Packing = "stream"
    verify_checksums: bool = False  # sha256 every shard file against its manifest before training


@dataclass
class MuonSection:
    lr: float | None = None  # None: optim.lr
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    weight_decay: float | None = None  # None: optim.weight_decay
    momentum_style: MuonMomentumStyle = "sum"
    ns_dtype: MuonNSDtype = "fp32"
    # AdamW settings for the non-matrix params (embedding, norms, gains) when name == muon
    adamw_lr: float | None = None  # None: optim.lr
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.01


@dataclass
class OptimSection:
    name: OptimName = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables
    # which param kinds (from model.param_kinds()) AdamW decays; norms/gains ("vector") usually not
    decay_kinds: list[ParamKind] = field(default_factory=lambda: ["embedding", "matrix"])
    muon: MuonSection = field(default_factory=MuonSection)


@dataclass
class LRScheduleSection:
    """The learning-rate schedule (a curriculum's `schedule:`; the data mixture is `data.schedule`)."""

    kind: LRScheduleKind = "cosine"
    warmup: int = 0
    cooldown: int = 0  # wsd: linear decay over the final `cooldown` steps
    decay: int = 0  # warmup_constant_cosine: cosine over the final `decay` steps
    min_lr: float | None = None
    min_lr_ratio: float | None = None  # used when min_lr is None; default 0


@dataclass
class BatchSection:
    seq_len: int = 1024
    micro_batch: int = 1
    grad_accum: int | None = None
    # Alternative to grad_accum: the card's global batch; grad_accum is derived per world size.
    tokens_per_step: int | None = None


@dataclass
class RollbackSection:
    """A bad step (non-finite loss or gradient norm; a spike when spike_sigma is set) rolls back to the
    last good checkpoint and skips its batches (trainer/guard.py)."""

    max_rollbacks: int = 3  # then stop with one line; 0: a bad step stops the run at once
    spike_sigma: float | None = None  # loss > mean + sigma * sd of the trailing window; None: off
    window: int = 100
    min_history: int = 20  # losses in the window before spikes are judged


@dataclass
class TrainSection:
    steps: int | None = None
    tokens: float | None = None  # steps = tokens // tokens_per_step when steps is not given
    seed: int = 1337
    dtype: Literal["bf16", "fp32"] = "bf16"  # bf16: autocast on GPU, fp32 weights; fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False  # its one home: a training choice, handed to the model config
    parallel: Literal["ddp", "fsdp"] = "ddp"  # replicated weights | FSDP2: weights, grads, optimizer sharded
    init_from: str | None = None  # checkpoint dir (or run dir) to take model weights from
    reset_data_cursor: bool = False  # with init_from: the loader starts from step 0 of its own schedule
    log_every: int = 1  # metrics.jsonl train rows (the loss itself is all-reduced every step, for the guard)
    print_every: int = 10  # progress line
    # tokens per chunk of the fused head + cross-entropy (trainer/loss.py): the [tokens, vocab] logits
    # never exist at once; exact (the same loss and gradients); 0: full logits
    loss_chunk: int = LOSS_CHUNK
    rollback: RollbackSection = field(default_factory=RollbackSection)
    # faults of the machine (trainer/faults.py): these signals stop after the current step with a
    # checkpoint (exit 75); requeue runs `scontrol requeue` after a stop by one of requeue_signals
    # (SIGUSR1: what `sbatch --signal=USR1@120` sends before the time limit; SIGTERM is also scancel's)
    stop_signals: list[StopSignal] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    requeue: bool = False
    requeue_signals: list[StopSignal] = field(default_factory=lambda: ["SIGUSR1"])
    dist_timeout: float = 10.0  # minutes a collective waits for every rank before the run exits (exit 69)


@dataclass
class EvalSection:
    every: int = 0  # 0: only at the end
    batches: int = 8
    micro_batch: int | None = None  # None: batch.micro_batch
    # lm-evaluation-harness tasks scored on the live model (trainer/evals/tasks.py): task, group or tag
    # names; include_path a folder of task YAMLs; limit examples per task (a fraction below 1)
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    limit: float | None = None
    tasks_every: int | None = None  # steps; None: at every eval; the final eval always scores them
    tasks_batch_size: int = 8  # requests per forward


@dataclass
class CheckpointSection:
    every: int = 0  # 0: only at the end
    keep_last: int = 3  # locally, and under `upload`
    upload: str | None = None  # s3://bucket/run: each finished checkpoint pushed there in the background
    endpoint_url: str | None = None  # for `upload` and s3:// resume/init_from (R2); else the AWS chain


@dataclass
class WandbSection:
    project: str = ""
    name: str | None = None  # None: W&B's own run name
    entity: str | None = None


@dataclass
class LoggingSection:
    """Mirrors of metrics.jsonl on rank 0, both off by default (trainer/telemetry/mirrors.py)."""

    wandb: WandbSection | None = None
    tensorboard: str | None = None  # event-file folder


@dataclass
class SampleSection:
    prompt: str = ""  # empty: no sample generation at the end
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40


@dataclass
class Resolved:
    """What the sections imply at one world size, worked out once when the curriculum is loaded (the
    loop reads these every step; the loader takes the schedule as it is)."""

    world_size: int
    grad_accum: int
    tokens_per_step: int
    total_steps: int
    total_tokens: int
    mixture: MixtureSchedule


@dataclass
class Config:
    model: Any = None  # the family's config dataclass (trainer.models: DenseConfig | HybridConfig)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: LRScheduleSection = field(default_factory=LRScheduleSection)  # the LR schedule
    batch: BatchSection = field(default_factory=BatchSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    sample: SampleSection = field(default_factory=SampleSection)
    name: str = ""  # stage name ("" for single-stage curricula)
    source_file: str = ""  # where this came from (for messages)
    resolved: Resolved | None = field(default=None, init=False, repr=False, compare=False)  # set by `resolve`

    # ---- derived quantities --------------------------------------------------------------------
    def grad_accum(self, world_size: int = 1) -> int:
        b = self.batch
        per_micro = b.seq_len * b.micro_batch * world_size
        if b.tokens_per_step is not None:
            if b.tokens_per_step % per_micro:
                raise ConfigError(
                    f"{self.source_file}: batch.tokens_per_step: {b.tokens_per_step} is not a multiple of "
                    f"seq_len*micro_batch*world_size = {b.seq_len}*{b.micro_batch}*{world_size}"
                )
            accum = b.tokens_per_step // per_micro
            if b.grad_accum is not None and b.grad_accum != accum:
                raise ConfigError(
                    f"{self.source_file}: batch.grad_accum: {b.grad_accum} disagrees with tokens_per_step "
                    f"{b.tokens_per_step} at world size {world_size} (needs {accum})"
                )
            return accum
        return b.grad_accum or 1

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch.seq_len * self.batch.micro_batch * self.grad_accum(world_size) * world_size

    def total_steps(self, world_size: int = 1) -> int:
        if self.train.steps is not None:
            return int(self.train.steps)
        return int(self.train.tokens // self.tokens_per_step(world_size))

    def total_tokens(self, world_size: int = 1) -> int:
        return self.total_steps(world_size) * self.tokens_per_step(world_size)

    def mixture(self, world_size: int = 1) -> list[MixturePoint]:
        """The mixture schedule in tokens, in the curriculum's order (`at` fractions placed in this
        run's tokens); a single source without a schedule is that source throughout."""
        if not self.data.schedule and len(self.data.sources) == 1:
            return [MixturePoint(0.0, {self.data.sources[0].name: 1.0})]
        total = self.total_tokens(world_size)
        return [MixturePoint(float(p.at * total if p.at is not None else p.tokens), dict(p.weights))
                for p in self.data.schedule]

    def mixture_points(self, world_size: int = 1) -> list[tuple[float, dict[str, float]]]:
        """`mixture` for display: (fraction of the run, normalised weights), sorted."""
        total = self.total_tokens(world_size)
        out = []
        for p in self.mixture(world_size):
            s = sum(p.weights.values())
            out.append((p.tokens / total if total else 0.0, {k: v / s for k, v in p.weights.items()}))
        return sorted(out, key=lambda t: t[0])

    def resolve(self, world_size: int) -> Resolved:
        """Work out the derived values at `world_size` once (kept in `self.resolved`)."""
        names = [s.name for s in self.data.sources]
        self.resolved = Resolved(world_size, self.grad_accum(world_size), self.tokens_per_step(world_size),
                                 self.total_steps(world_size), self.total_tokens(world_size),
                                 MixtureSchedule(names, self.mixture(world_size), self.batch.seq_len))
        return self.resolved

    def to_dict(self) -> dict:
        """Plain types (checkpoint config.json): the model as a `model:` section, without the training
        switch it carries (train.activation_checkpointing is its home)."""
        out = {f.name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
               for f in dataclasses.fields(self) if f.name not in ("model", "resolved")
               for v in [getattr(self, f.name)]}
        model = model_section(self.model) if self.model is not None else {}
        model.pop("activation_checkpointing", None)
        return {"model": model, **out}


# ---- typed conversion ----------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is float or tp is int:
        return "a number" if tp is float else "an integer"
    if tp is bool:
        return "true/false"
    if tp is str:
        return "a string"
    if origin in (list,):
        return "a list"
    if origin in (dict,):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _convert_number(value, tp, where: str, file: str):
    """An int or float field: YAML numbers, or strings such as '1e-3' and '20_000' (YAML 1.1 reads those
    as strings); never a bool, never inf or nan."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{file}: {where}: expected {_type_name(tp)}, got {value!r}")
    try:
        num = float(value.replace("_", "").strip()) if isinstance(value, str) else value
    except ValueError:
        raise ConfigError(f"{file}: {where}: expected {_type_name(tp)}, got {value!r}") from None
    if not math.isfinite(num):
        raise ConfigError(f"{file}: {where}: expected a finite number, got {value!r}")
    if tp is int:
        if float(num) != int(num):
            raise ConfigError(f"{file}: {where}: expected an integer, got {value!r}")
        return int(num)
    return float(num)


def _convert(value, tp, where: str, file: str):
    """Coerce a YAML/CLI value to the annotated type or raise ConfigError naming file and field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alt in inner[:-1]:  # `list[int] | str`: the first alternative the value converts to
            try:
                return _convert(value, alt, where, file)
            except ConfigError:
                pass
        return _convert(value, inner[-1], where, file)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{file}: {where}: expected {' | '.join(map(str, args))}, got {value!r}"
                              f"{did_you_mean(value, args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: {where}: expected a mapping, got {value!r}")
        return _build(tp, value, where, file)
    if origin is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{file}: {where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}.{i}", file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: {where}: expected a mapping, got {value!r}")
        kt, vt = args
        return {str(k): _convert(v, vt, f"{where}.{k}", file) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{file}: {where}: expected true/false, got {value!r}")
    if tp in (int, float):
        return _convert_number(value, tp, where, file)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{file}: {where}: expected a string, got {value!r}")
        return str(value)
    return value


def _typed_model(raw, file: str):
    """The `model:` section as its family's config dataclass (`arch` picks it): values typed by that
    dataclass (so `rope_theta: 1e4` is a float) and the shape checked here, naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: model: expected a mapping, got {raw!r}")
    if "arch" not in raw:
        raise ConfigError(f"{file}: model.arch: missing (dense | hybrid)")
    if "activation_checkpointing" in raw:
        raise ConfigError(f"{file}: model.activation_checkpointing: a training choice: set "
                          f"train.activation_checkpointing instead")
    out = dict(raw)
    try:
        hints = model_fields(out["arch"])
        for key, value in out.items():
            if key in hints:
                out[key] = _convert(value, hints[key], f"model.{key}", file)
        return make_config(out)
    except ValueError as e:  # ConfigError included: one message naming the file and field
        msg = str(e)
        raise ConfigError(msg if msg.startswith(f"{file}:") else f"{file}: {msg}") from None


def _build(cls, raw: dict, where: str, file: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            hint = did_you_mean(key, names) or f" (known: {', '.join(names)})"
            raise ConfigError(f"{file}: {path}: unknown key{hint}")
        if cls is Config and key == "model":
            kwargs[key] = _typed_model(value, file)
            continue
        kwargs[key] = _convert(value, hints[key], path, file)
    out = cls(**kwargs)
    if cls is Config and out.model is not None:  # the model runs with the training switch it implements
        out.model.activation_checkpointing = out.train.activation_checkpointing
    return out


# ---- loading -------------------------------------------------------------------------------------


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "weights":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(raw: dict, item: str, file: str = "<cli>") -> None:
    """`section.key=value` on the raw dict. Values stay strings: the dataclass conversion types them
    (the model section's by its family's config), so errors read the same as for YAML."""
    if "=" not in item:
        raise ConfigError(f"{file}: override {item!r}: expected section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(p)]
            except (ValueError, IndexError):
                raise ConfigError(f"{file}: {'.'.join(parts[:i + 1])}: no list item {p!r}") from None
            continue
        if p not in node or node[p] is None:
            node[p] = {}
        if not isinstance(node[p], (dict, list)):
            raise ConfigError(f"{file}: {'.'.join(parts[:i + 1])}: is a value, cannot set {key}")
        node = node[p]
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"{file}: {key}: no list item {last!r}") from None
    else:
        node[last] = value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: curriculum file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_curriculum(path: str | Path, overrides: list[str] = (), world_size: int = 1) -> list[Config]:
    """Curriculum file (+ CLI overrides) -> one validated Config per stage."""
    file = str(path)
    raw = load_yaml(path)
    return resolve(raw, file, overrides, world_size)


def resolve(raw: dict, file: str, overrides: list[str] = (), world_size: int = 1) -> list[Config]:
    raw = copy.deepcopy(raw)
    stages_raw = raw.pop("stages", None)
    if stages_raw is None:
        stages_raw = [{}]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{file}: stages: expected a non-empty list of stage mappings")
    configs = []
    for i, st in enumerate(stages_raw):
        if not isinstance(st, dict):
            raise ConfigError(f"{file}: stages.{i}: expected a mapping")
        merged = _deep_merge(raw, st)
        merged.setdefault("name", st.get("name", ""))
        for item in overrides:
            apply_override(merged, item, file)
        cfg = _build(Config, merged, "", file)
        cfg.source_file = file
        if not cfg.name and len(stages_raw) > 1:
            cfg.name = f"stage{i}"
        validate(cfg, world_size, where=f"stages.{i}." if len(stages_raw) > 1 else "")
        cfg.resolve(world_size)
        configs.append(cfg)
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{file}: stages: stage names must be unique, got {names}")
    return configs


def from_dict(d: dict, file: str = "<dict>") -> Config:
    """Rebuild a Config from `Config.to_dict()` (checkpoint config.json)."""
    d = {k: v for k, v in d.items() if k not in ("source_file", "world_size")}  # world_size: a checkpoint's
    d["model"] = {k: v for k, v in d.get("model", {}).items() if k != "activation_checkpointing"}  # older files
    cfg = _build(Config, d, "", file)
    cfg.source_file = file
    return cfg


def _validate_data(cfg: Config, world_size: int, err) -> None:
    """The sources and the mixture schedule: where the curriculum places each point is checked here,
    its weights by MixtureSchedule (the loader's own check)."""
    if not cfg.data.sources:
        err("data.sources", "at least one source is needed")
    names = [s.name for s in cfg.data.sources]
    for i, s in enumerate(cfg.data.sources):
        if not s.name:
            err(f"data.sources.{i}.name", "missing")
        if not s.path:
            err(f"data.sources.{i}.path", "missing")
    if not cfg.data.schedule and len(names) > 1:
        err("data.schedule", "several sources need a mixture schedule")
    total = cfg.total_tokens(world_size)
    for i, p in enumerate(cfg.data.schedule):  # where the curriculum places each point
        w = f"data.schedule.{i}"
        if (p.at is None) == (p.tokens is None):
            err(w, "give exactly one of `at` (fraction of the run) or `tokens`")
        if p.at is not None and not 0 <= p.at <= 1:
            err(f"{w}.at", f"a fraction of the run in [0, 1], got {p.at}")
        if p.tokens is not None and not 0 <= p.tokens <= total:
            err(f"{w}.tokens", f"must be within the run's {total} tokens, got {p.tokens}")
    try:
        MixtureSchedule(names, cfg.mixture(world_size), cfg.batch.seq_len)
    except MixtureError as e:
        w = f"data.schedule.{e.index}"
        if e.unknown:
            err(f"{w}.weights.{e.unknown[0]}", "not a source" + (did_you_mean(e.unknown[0], names) or f" (sources: {names})"))
        err(f"{w}.{e.field}" if e.index is not None else f"data.{e.field or 'schedule'}", e.message)


def validate(cfg: Config, world_size: int = 1, where: str = "") -> None:
    f = cfg.source_file

    def err(field_: str, msg: str):
        raise ConfigError(f"{f}: {where}{field_}: {msg}")

    if cfg.model is None:
        err("model", "missing model section")
    if cfg.batch.seq_len > cfg.model.max_seq_len:  # positions past the model's context: refused, not extrapolated
        err("batch.seq_len", f"{cfg.batch.seq_len} is longer than the model's context (model.max_seq_len "
                             f"{cfg.model.max_seq_len}); raise model.max_seq_len to train longer windows")
    if cfg.train.parallel == "fsdp" and cfg.optim.name == "adamw8bit":
        # bitsandbytes keeps its 8-bit state per whole tensor, not per DTensor shard (Muon gathers its matrices)
        err("train.parallel", "fsdp supports optim.name adamw or muon, not adamw8bit (bitsandbytes' 8-bit "
                              "state is per whole tensor; use train.parallel: ddp)")
    if cfg.optim.lr <= 0:
        err("optim.lr", f"must be > 0, got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        err("optim.betas", f"expected two values in [0, 1), got {cfg.optim.betas}")
    if cfg.optim.weight_decay < 0:
        err("optim.weight_decay", f"must be >= 0, got {cfg.optim.weight_decay}")
    for k in ("warmup", "cooldown", "decay"):
        if getattr(cfg.schedule, k) < 0:
            err(f"schedule.{k}", "must be >= 0")
    if cfg.schedule.min_lr_ratio is not None and not 0 <= cfg.schedule.min_lr_ratio <= 1:
        err("schedule.min_lr_ratio", f"must be in [0, 1], got {cfg.schedule.min_lr_ratio}")
    for k in ("seq_len", "micro_batch"):
        if getattr(cfg.batch, k) <= 0:
            err(f"batch.{k}", "must be > 0")
    if cfg.batch.grad_accum is not None and cfg.batch.grad_accum <= 0:
        err("batch.grad_accum", "must be > 0")
    cfg.grad_accum(world_size)  # divisibility
    if cfg.train.steps is None and cfg.train.tokens is None:
        err("train", "give steps or tokens")
    rb = cfg.train.rollback
    if rb.window < 1 or rb.min_history < 0 or rb.max_rollbacks < 0 or (rb.spike_sigma is not None and rb.spike_sigma <= 0):
        err("train.rollback", "window >= 1, min_history >= 0, max_rollbacks >= 0 and spike_sigma > 0 (or null)")
    if cfg.train.loss_chunk < 0:
        err("train.loss_chunk", f"must be >= 0 (0: full logits), got {cfg.train.loss_chunk}")
    if cfg.train.steps is not None and cfg.train.steps <= 0:
        err("train.steps", f"must be > 0, got {cfg.train.steps}")
    if cfg.total_steps(world_size) <= 0:
        err("train.tokens", f"{cfg.train.tokens} tokens is less than one step of {cfg.tokens_per_step(world_size)}")
    if not cfg.tokenizer.name and not cfg.tokenizer.path:
        err("tokenizer.name", "missing")
    _validate_data(cfg, world_size, err)
    if cfg.eval.every < 0 or cfg.eval.batches < 0:
        err("eval", "every and batches must be >= 0")
    if cfg.eval.tasks_every is not None and cfg.eval.tasks_every < 0:
        err("eval.tasks_every", f"must be >= 0, got {cfg.eval.tasks_every}")
    if cfg.eval.limit is not None and cfg.eval.limit <= 0:
        err("eval.limit", f"must be > 0, got {cfg.eval.limit}")
    if cfg.eval.tasks_batch_size < 1:
        err("eval.tasks_batch_size", "must be >= 1")
    if cfg.train.dist_timeout <= 0:
        err("train.dist_timeout", f"minutes, must be > 0, got {cfg.train.dist_timeout}")
    if cfg.train.requeue and not set(cfg.train.requeue_signals) <= set(cfg.train.stop_signals):
        err("train.requeue_signals", f"{cfg.train.requeue_signals} must be among train.stop_signals "
                                     f"{cfg.train.stop_signals} (only those stop the run with a checkpoint)")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 1:
        err("checkpoint", "every >= 0 and keep_last >= 1")
    if cfg.checkpoint.upload is not None and not is_s3_uri(cfg.checkpoint.upload):
        err("checkpoint.upload", f"expected s3://bucket/prefix, got {cfg.checkpoint.upload!r}")
    if cfg.logging.wandb is not None and not cfg.logging.wandb.project:
        err("logging.wandb.project", "missing")


def dumps(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
