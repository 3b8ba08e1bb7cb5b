"""Checkpoints: atomic, self-describing, resumable.

    RUN_DIR/checkpoints/step_0000100/
        model.safetensors   model state dict (a tied weight stored once)
        config.json         the full resolved curriculum stage (model + tokenizer sections included)
        train_state.pt      optimizer, loader, RNG states, step, tokens seen (torch.load(weights_only=True))
        checksums.json      sha256 of the three files above, taken at save

Everything is written into `step_0000100.tmp/`, fsynced, then renamed: a crash leaves at worst a
`.tmp` directory, which `latest_checkpoint` ignores. A file damaged later (truncated, a flipped
bit) fails its checksum, and `latest_checkpoint` falls back to the newest checkpoint that passes.
Only plain types and tensors go into train_state.pt so it loads with `weights_only=True` (numpy's
RNG state is stored as a tensor).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file, save_model

from shards.manifest import sha256_file
from trainer.faults import is_no_space, no_space, tensor_bytes
from trainer.models import build_model
from trainer.tools import hf
from trainer.telemetry.console import log

STEP_RE = re.compile(r"^step_(\d{7,})$")
FILES = ("model.safetensors", "config.json", "train_state.pt")  # what --resume needs
WEIGHT_FILES = ("model.safetensors", "config.json")  # what generation and init_from need
CHECKSUMS = "checksums.json"  # {file: sha256} of FILES


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    st = {
        "python": list(py_keys) + [py_gauss if py_gauss is not None else -1],
        "python_version": py_version,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    py = st["python"]
    gauss = None if py[-1] == -1 else py[-1]
    random.setstate((st["python_version"], tuple(int(v) for v in py[:-1]), gauss))
    np.random.set_state(
        ("MT19937", st["numpy_keys"].numpy().astype(np.uint32), st["numpy_pos"], st["numpy_gauss"][0], st["numpy_gauss"][1])
    )
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir, step: int, model: torch.nn.Module | dict, train_state: dict, config: dict,
                    keep_last: int = 3, folders: dict[str, Path] | None = None) -> Path:
    """Write step_X.tmp/ then rename to step_X/ (rank 0 only). Prunes to the newest `keep_last`.
    `model` is a module or a full state dict (FSDP gathers one); `folders` are moved in before the
    rename, under their names (FSDP's optimizer state, written by every rank through DCP), and
    their files go into checksums.json too."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    staged = _files_bytes((folders or {}).values())  # measured now: the write moves them into tmp
    try:
        _write(tmp, model, train_state, config, folders or {})
    except Exception as e:
        needed = tensor_bytes(model) + tensor_bytes(train_state) + staged
        full = is_no_space(e, tmp)  # asked before the partial files go: a full disk shows ~0 bytes free
        for p in (tmp, *(folders or {}).values()):  # at once: a full disk must not keep a partial save
            shutil.rmtree(p, ignore_errors=True)
        if not full:
            raise
        good = list_checkpoints(run_dir)
        raise no_space(final, needed, good[-1] if good else None) from None
    if final.exists():  # re-saving the same step (e.g. a resumed run finishing): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune(run_dir, keep_last)
    return final


def _write(tmp: Path, model, train_state: dict, config: dict, folders: dict[str, Path]) -> None:
    """Every file of a checkpoint into `tmp`, checksummed and fsynced."""
    if isinstance(model, dict):
        save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_model(model, str(tmp / "model.safetensors"))  # dedups tied tensors
    names = FILES
    for name, folder in folders.items():
        os.replace(folder, tmp / name)
        names += tuple(sorted(p.relative_to(tmp).as_posix() for p in (tmp / name).rglob("*") if p.is_file()))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    torch.save(train_state, tmp / "train_state.pt")
    with ThreadPoolExecutor(len(FILES)) as pool:  # hashlib releases the GIL: the files hash in parallel
        sums = dict(zip(names, pool.map(lambda name: sha256_file(tmp / name), names)))
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")
    for name in names + (CHECKSUMS,):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)


def _files_bytes(folders) -> int:
    """Bytes of the files under the staged folders (FSDP's DCP shards) that a save moves in whole."""
    return sum(f.stat().st_size for d in folders for f in Path(d).rglob("*") if f.is_file())


def is_valid(path: Path, files=FILES) -> bool:
    return path.is_dir() and STEP_RE.match(path.name) is not None and all((path / f).is_file() and (path / f).stat().st_size > 0 for f in files)


def list_checkpoints(run_dir, files=FILES) -> list[Path]:
    """Valid checkpoints, oldest first (`.tmp` dirs and ones missing a file are skipped)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if is_valid(p, files)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` must not be resumed from, or None. With checksums.json (written by
    `save` after every file): a file it lists, or one of FILES, that fails its sha256; the files are
    then the bytes that were saved, so they are not also loaded here (the train state can be the whole
    optimizer state, and resuming loads it anyway). Without (saved before checksums existed): the
    weights, train state and config must load."""
    sums_file = path / CHECKSUMS
    if sums_file.is_file():
        try:
            sums = json.loads(sums_file.read_text())
        except ValueError as e:
            return f"{CHECKSUMS} unreadable ({e})"
        for name in sorted(set(FILES) | set(sums)):  # FSDP's optimizer/ shards are listed there too
            if not (path / name).is_file():
                return f"{name} is missing"
            got = sha256_file(path / name)
            if got != sums.get(name):
                return f"{name} fails its sha256 check against {CHECKSUMS} ({got[:12]}… != {str(sums.get(name))[:12]}…)"
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt"):  # header and size: catches a truncation
            pass
        torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        json.loads((path / "config.json").read_text())
    except Exception as e:  # noqa: BLE001 - any damage means "not this one"
        return f"{type(e).__name__}: {e}"
    return None


def latest_checkpoint(run_dir) -> Path | None:
    """Newest checkpoint without a `checkpoint_problem`; each one skipped is printed with why."""
    skipped = []
    for p in reversed(list_checkpoints(run_dir)):
        why = checkpoint_problem(p)
        if why is None:
            if skipped:
                log.info(f"[checkpoint] falling back to {p} (the newer {', '.join(skipped)} failed the checks above)")
            return p
        log.info(f"[checkpoint] skipping {p}: {why}")
        skipped.append(p.name)
    return None


def prune(run_dir, keep_last: int) -> None:
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
    d = Path(run_dir) / "checkpoints"
    # stale .tmp dirs from crashed saves
    for p in d.glob("step_*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def find_weights(path: str | Path) -> Path:
    """For generation and init_from-style use: a checkpoint dir itself, an HF model folder (an export,
    any Llama, Argonne's release), or the newest step_* under a run dir or its checkpoints/ that holds
    weights + config (no optimizer state needed; `.tmp` skipped)."""
    p = Path(path)
    if (p / "model.safetensors").is_file() or hf.is_hf_folder(p):
        return p
    found = list_checkpoints(p.parent if p.name == "checkpoints" else p, files=WEIGHT_FILES)
    if found:
        return found[-1]
    raise FileNotFoundError(f"{p}: no checkpoint here (expected model.safetensors + config.json, "
                            f"or checkpoints/step_*/ holding them)")


def _fill(model: torch.nn.Module, sd: dict, where) -> None:
    """load_state_dict, strict about names, except that a tied weight stored once satisfies all its
    aliases, and DDP/compile prefixes ("module.", "_orig_mod.") are dropped."""
    for prefix in ("module.", "_orig_mod."):
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise ValueError(f"{where}: does not match the model ({str(e).splitlines()[-1].strip()})") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in sd if k in params}
    missing = [k for k in missing if not (k in params and id(params[k]) in loaded)]
    if missing or unexpected:
        raise ValueError(f"{where}: does not match the model "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


def load_model_weights(model: torch.nn.Module, ckpt: str | Path, device="cpu") -> None:
    """Fill `model` from a checkpoint dir (CKPT/model.safetensors) or an HF model folder (converted
    to the model's own layout, e.g. an HF Llama into Axiom's interleaved RoPE; a folder whose model
    computes something else is refused, naming the fields)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    if hf.is_hf_folder(ckpt):
        section, sd = hf.read_folder(ckpt)
        _fill(model, hf.fit_to(sd, section, model), ckpt)
        return
    file = ckpt / "model.safetensors"
    try:
        sd = load_file(str(file), device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ValueError(f"{file}: unreadable safetensors ({e})") from None
    _fill(model, sd, file)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The one loader behind generate, chat, export, evaluate and the end-of-run sample.

    PATH is a run dir, its checkpoints/, a checkpoint dir, an HF model folder, or hf://org/name.
    Returns (model in eval mode, config dict with at least `model` and `tokenizer`, the folder read).
    The model is built on the meta device (no time spent on a random init), then filled.
    """
    src = find_weights(hf.resolve_hub(str(path)))
    if hf.is_hf_folder(src):
        section, sd = hf.read_folder(src)
        cfg = {"model": section, "tokenizer": hf.tokenizer_section(src), "sample": hf.sample_defaults(src)}
    else:
        try:
            cfg = json.loads((src / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{src / 'config.json'}: unreadable ({e})") from None
        if not isinstance(cfg, dict) or "model" not in cfg:
            raise ValueError(f"{src / 'config.json'}: no 'model' section")
        sd = None
    model = build_model(cfg["model"], device="meta")
    model.to_empty(device=device)
    if any(True for _ in model.buffers()):  # non-persistent buffers are not in the file: recompute them
        model.init_weights()
    if sd is None:
        load_model_weights(model, src, device)
    else:
        _fill(model, {k: v.to(device) for k, v in sd.items()}, src)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), cfg, src


def load_train_state(ckpt: str | Path, mmap: bool = False) -> dict:
    """train_state.pt; with mmap its tensors (the optimizer state) are mapped, not read, for a caller
    that wants only the counters."""
    return torch.load(Path(ckpt) / "train_state.pt", map_location="cpu", weights_only=True, mmap=mmap)
