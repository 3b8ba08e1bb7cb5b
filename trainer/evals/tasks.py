"""lm-evaluation-harness tasks on the live model, inside the training loop.

    from trainer.evals.tasks import check_tasks, live_lm, run_tasks

    counts = check_tasks(names, include_path, limit)       # start-up / --dry-run: ValueError, one line
    lm = live_lm(raw_model, tok, device=device, autocast=autocast, batch_size=8,
                 max_length=max_seq_len, rank=rank, world_size=world, sharded=is_sharded(raw_model))
    res = run_tasks(lm, names, include_path, limit)        # every rank calls it, at the same step
    if res is not None:                                    # rank 0: TaskResults(scores, seconds)
        log(res.flat("lm_eval/"))

The model is scored as it is in memory (no export, no reload, no copy): `live_lm` wraps it in an
`lm_eval.api.model.LM` whose per-request log-likelihoods equal lm-eval's HF backend (`HFLM`, what
`python -m trainer.evaluate` runs) on an export of the same weights: requests are encoded exactly as
HFLM encodes them with the exported tokenizer (trailing context spaces move to the continuation; a
BOS is prepended where the tokenizer's documents start with one, as the export's post-processor
does; the context is truncated from the left to max_length; loglikelihood_rolling uses lm-eval's own
windows; special-token strings in task text, such as "<s>" in HTML, are those tokens, as
transformers reads them, though our own `encode` keeps them as text).

`generate_until` (generative tasks such as gsm8k) is not implemented: `check_tasks` refuses those tasks
before training, and score them after training with `python -m trainer.evaluate`.

Ranks: lm-eval's evaluator gives each rank every world_size-th document and gathers the per-document
metrics on rank 0 (`all_gather` of request counts, `barrier`, `gather_object`, implemented here with
torch.distributed on the default process group). Every rank must hold at least one document of each
task. With `sharded=True` (FSDP: each forward all-gathers the parameters) every rank runs as many
forwards as the busiest one, padding with one-token dummy forwards.

lm_eval is imported only when these functions run, so the trainer imports without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

INSTALL_HINT = "lm-evaluation-harness is not installed (pip install 'shardloom[eval]')"


def require_lm_eval():
    """The lm_eval package, or an ImportError with one line saying how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return lm_eval


# ------------------------------------------------------------------ request encoding (as HFLM's)


def prefix_token_id(tok) -> int:
    """HFLM's `prefix_token_id` on our export: the export names a bos_token whenever the vocabulary
    has one (whether or not documents start with it), else the EOS."""
    return tok.bos_id if tok.bos_id is not None else tok.eos_id


def _prefix_text(tok) -> str:
    # HFLM compares the request text with tokenizer.decode(prefix): the special token's own string
    # (SentencePiece's decode of a control id is "", transformers' is "<s>").
    pid = prefix_token_id(tok)
    names = {i: s for s, i in tok.special_tokens.items()}
    return names.get(pid) or tok.decode([pid])


def hf_encode(tok, text: str, add_special: bool | None = None) -> list[int]:
    """HFLM.tok_encode on the exported tokenizer: transformers adds special tokens by default, and
    the export's post-processor prepends BOS iff `tok.add_bos`; HFLM skips that when the text
    already starts with the prefix token's string."""
    if add_special is None:
        prefix = _prefix_text(tok)
        add_special = not (prefix and text.startswith(prefix))
    ids = _encode_with_specials(tok, text)
    return [tok.bos_id] + ids if add_special and tok.add_bos else ids


def _encode_with_specials(tok, text: str) -> list[int]:
    """tok.encode, except that special-token strings in the text are those tokens, as transformers
    reads text (it splits on them, leftmost-longest, and encodes the pieces apart); our encode
    keeps them as plain text."""
    specials = tok.special_tokens
    if not any(s in text for s in specials):
        return tok.encode(text)
    ids, pos = [], 0
    for m in _specials_pattern(tuple(specials)).finditer(text):
        ids += tok.encode(text[pos:m.start()]) if m.start() > pos else []
        ids.append(specials[m.group()])
        pos = m.end()
    return ids + (tok.encode(text[pos:]) if pos < len(text) else [])


@functools.lru_cache(maxsize=8)
def _specials_pattern(strings: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))


def encode_request(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one loglikelihood request, as TemplateLM.loglikelihood and
    _encode_pair build them for a causal model."""
    if context == "":
        cont = hf_encode(tok, continuation, add_special=False)
        prefix = prefix_token_id(tok)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Answer: " + "yes" is scored as "Answer:" + " yes", the way BPE splits words
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = hf_encode(tok, context + continuation)
    ctx = hf_encode(tok, context)
    return ctx, whole[len(ctx):]


def rolling_windows(tok, text: str, max_length: int) -> list[tuple[list[int], list[int]]]:
    """HFLM.loglikelihood_rolling's (context, continuation) windows for one text: lm-eval's own
    window functions over `hf_encode(text)` (so a BOS tokenizer scores its BOS too, as HFLM does)."""
    from lm_eval import utils

    windows = utils.get_rolling_token_windows(token_list=hf_encode(tok, text), prefix_token=prefix_token_id(tok),
                                              max_seq_len=max_length, context_len=1)
    return [utils.make_disjoint_window(w) for w in windows]


# ---------------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class LiveModel:
    """What scoring needs: the model as the training loop holds it (under FSDP the sharded module
    itself; called as model(x[B,T]) -> logits[B,T,V]), our tokenizer, and how to run it."""

    model: torch.nn.Module
    tok: object
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    batch_size: int = 8
    max_length: int = 1024
    rank: int = 0
    world_size: int = 1
    sharded: bool = False


def score(live: LiveModel, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, whether greedy decoding gives it) for each
    (context ids, continuation ids), in the order given. Longest first, so a batch pads little."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    batches = [order[i:i + live.batch_size] for i in range(0, len(order), live.batch_size)]
    dummies = _dummy_forwards(live, len(batches))
    out: list = [None] * len(pairs)
    with _eval_mode(live.model), torch.no_grad():
        for batch in batches:
            for i, result in zip(batch, _score_batch(live, [pairs[i] for i in batch])):
                out[i] = result
        for _ in range(dummies):
            _forward(live, torch.full((1, 1), prefix_token_id(live.tok), dtype=torch.long, device=live.device))
    return out


def _score_batch(live: LiveModel, pairs) -> list[tuple[float, bool]]:
    # HFLM's input: context + continuation, left-truncated to max_length + 1, minus the last token
    # (it is only a target); rows right-padded, which a causal model never looks at.
    rows = [(ctx + cont)[-(live.max_length + 1):][:-1] for ctx, cont in pairs]
    x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for r, row in enumerate(rows):
        x[r, :len(row)] = torch.tensor(row, dtype=torch.long)
    logits = _forward(live, x.to(live.device))
    sums, greedy = [], []
    for r, ((_, cont), row) in enumerate(zip(pairs, rows)):
        logp = torch.log_softmax(logits[r, len(row) - len(cont):len(row)].float(), dim=-1)
        target = torch.tensor(cont, dtype=torch.long, device=logp.device)
        greedy.append((logp.argmax(dim=-1) == target).all())
        sums.append(logp.gather(-1, target[:, None]).sum())
    # one device-to-host copy per batch, not two per request
    return list(zip(torch.stack(sums).tolist(), torch.stack(greedy).tolist()))


def _forward(live: LiveModel, x: torch.Tensor) -> torch.Tensor:
    with live.autocast():
        return live.model(x)


def _dummy_forwards(live: LiveModel, n_batches: int) -> int:
    """Forwards this rank must add so that every rank runs as many (FSDP all-gathers in each)."""
    if not live.sharded or live.world_size <= 1:
        return 0
    import torch.distributed as dist

    most = torch.tensor(n_batches, device=live.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most) - n_batches


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


# ---------------------------------------------------------------------------- the LM


def live_lm(model: torch.nn.Module, tok, *, device: str | torch.device = "cpu",
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            batch_size: int = 8, max_length: int | None = None, rank: int = 0, world_size: int = 1,
            sharded: bool = False):
    """An `lm_eval.api.model.LM` scoring `model` in place. max_length defaults to model.config.max_seq_len
    (what the export's config gives HFLM); `sharded`: the model is FSDP-sharded (see the module doc)."""
    if max_length is None:
        max_length = model.config.max_seq_len
    live = LiveModel(model, tok, torch.device(device), autocast, batch_size, max_length, rank, world_size, sharded)
    return _lm_class()(live)


@functools.cache
def _lm_class():
    """The LM subclass, defined on first use so that lm_eval is imported only then."""
    LM = require_lm_eval().api.model.LM

    class LiveLM(LM):
        def __init__(self, live: LiveModel):
            super().__init__()
            self.live = live
            self._rank, self._world_size, self._device = live.rank, live.world_size, live.device

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return score(self.live, [encode_request(self.live.tok, *r.args) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            windows = [rolling_windows(self.live.tok, r.args[0], self.live.max_length) for r in requests]
            scores = iter(score(self.live, [w for ws in windows for w in ws]))  # one pass: one FSDP padding
            return [sum(next(scores)[0] for _ in ws) for ws in windows]

        def generate_until(self, requests, disable_tqdm: bool = False):
            names = sorted({str(r.task_name) for r in requests})
            raise NotImplementedError(f"generate_until tasks ({', '.join(names)}) are not scored in the training "
                                      "loop; score them after training with python -m trainer.evaluate")

        def all_gather(self, tensor):
            return _all_gather(tensor) if self.world_size > 1 else tensor

        def gather_object(self, obj, dst=0):
            if self.world_size <= 1:
                return [obj]
            out = [None] * self.world_size if self.rank == dst else None
            torch.distributed.gather_object(obj, out, dst=dst)
            return out

        def barrier(self):
            if self.world_size > 1:
                torch.distributed.barrier()

    return LiveLM


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """accelerate's gather, which HFLM uses: every rank's tensor concatenated along dim 0 (a 0-d
    tensor counts as shape [1]), in rank order."""
    import torch.distributed as dist

    t = tensor.reshape(1) if tensor.dim() == 0 else tensor.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


# ---------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class TaskResults:
    """scores: {task or group: {metric: value}} with lm-eval's metric names ("acc", "acc_norm",
    "acc_stderr", "word_perplexity", ...; a filter other than "none" stays as "metric,filter");
    seconds: wall time of the whole evaluation."""

    scores: dict[str, dict[str, float]]
    seconds: float

    def flat(self, prefix: str = "") -> dict[str, float]:
        """{f"{prefix}{task}/{metric}": value}, for a metrics logger."""
        return {f"{prefix}{task}/{m}": v for task, ms in self.scores.items() for m, v in ms.items()}


def run_tasks(lm, tasks: list[str], include_path: str | None = None, limit: float | None = None,
              bootstrap_iters: int = 100) -> TaskResults | None:
    """Score `tasks` (names of tasks, groups or tags) with lm-eval's own evaluator. Every rank must
    call it; rank 0 gets TaskResults, the other ranks None (lm-eval gathers to rank 0 only).
    The global RNGs (python, numpy, torch) are seeded as `lm_eval.simple_evaluate` seeds them, then
    restored, so training continues with its own random state. Stderrs are kept; bootstrapped ones
    (non-mean metrics) use `bootstrap_iters` draws in this process, never a forked pool."""
    require_lm_eval()
    from lm_eval import evaluator

    start = time.perf_counter()
    with _preserved_rng(), _env("DISABLE_MULTIPROC", "1"):
        _seed_like_simple_evaluate()
        loaded = _loaded(tuple(tasks), str(include_path) if include_path else None)
        _prepare(loaded["tasks"].values())  # every round: the few-shot sampler's seed as simple_evaluate sets it
        out = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                                 log_samples=False)
    if out is None:
        return None
    return TaskResults(_metrics(out["results"]), time.perf_counter() - start)


def check_tasks(tasks: list[str], include_path: str | None = None, limit: float | None = None) -> dict[str, int]:
    """Resolve every task before training: {leaf task: documents it will score (after `limit`)}.
    An unknown name, an unreadable YAML, a dataset that does not load, a generative task or a
    missing lm_eval is a ValueError naming the task and the reason, on one line."""
    try:
        require_lm_eval()
    except ImportError as e:
        raise ValueError(f"eval tasks: {e}") from None
    counts = {}
    for name in tasks:
        try:
            loaded = _load([name], include_path)
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many types; all mean "cannot load"
            raise ValueError(f"eval task '{name}': {_reason(name, e, include_path)}") from None
        for leaf, task in loaded["tasks"].items():
            if task.OUTPUT_TYPE == "generate_until":
                raise ValueError(f"eval task '{name}': {leaf} is a generate_until task, which the training loop "
                                 "does not score (run python -m trainer.evaluate after training)")
            counts[leaf] = _n_docs(task, limit)
    return counts


def _n_docs(task, limit) -> int:
    from lm_eval.evaluator_utils import get_sample_size

    n = len(task.eval_docs)
    cap = get_sample_size(task, limit)
    return min(n, cap) if cap is not None else n


def _reason(name: str, err: Exception, include_path: str | None) -> str:
    if isinstance(err, KeyError):
        manager = _manager(include_path, True)
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        reason = "unknown task (not in lm-eval's registry" + (" or the include path)" if include_path else ")")
        reason += f"; did you mean {', '.join(close)}?" if close else ""
        bad = _unreadable_yamls(include_path)
        return reason + (f"; unreadable task YAML: {'; '.join(bad)}" if bad else "")
    first = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {first}"


def _unreadable_yamls(include_path: str | None) -> list[str]:
    """'file: error' for each YAML under include_path that lm-eval's loader cannot read (its index
    skips those silently, so a typo in a YAML looks like an unknown task name)."""
    if not include_path:
        return []
    from lm_eval.tasks._yaml_loader import load_yaml

    bad = []
    for path in sorted(Path(include_path).rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False, recursive=True)
        except Exception as e:  # noqa: BLE001 - yaml errors, include cycles, missing includes
            bad.append(f"{path.name}: {' '.join(str(e).split())}")
    return bad


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None, defaults: bool):
    # Indexing lm-eval's ~15k built-in YAMLs takes ~9 s: once per process, not once per evaluation.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _load(tasks: list[str], include_path: str | None) -> dict:
    """TaskManager.load: from the include path alone when it defines every name asked for (no
    built-in index to build), else from lm-eval's registry plus the include path."""
    if include_path:
        local = _manager(str(include_path), False)
        if all(t in local.all_tasks for t in tasks):
            try:
                return local.load(tasks)
            except KeyError:  # e.g. a local group of built-in tasks
                pass
    return _manager(str(include_path) if include_path else None, True).load(tasks)


@functools.lru_cache(maxsize=4)
def _loaded(tasks: tuple[str, ...], include_path: str | None) -> dict:
    """Tasks loaded once per process: every scoring round of a run reuses them (a task's
    dataset and its document preprocessing, hellaswag's over its whole split, are not redone);
    lm-eval's evaluate() rebuilds each task's requests itself."""
    return _load(list(tasks), include_path)


def _prepare(tasks) -> None:
    """What simple_evaluate does to each loaded task before evaluate(): zero-shot unless the task
    says otherwise, and the default few-shot sampler seed."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    for task in tasks:
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)


def _seed_like_simple_evaluate() -> None:
    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)


@contextlib.contextmanager
def _preserved_rng():
    import numpy as np

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results ("acc,none": 0.5, "alias": ..., "acc_stderr,none": "N/A") as numbers only,
    without the default filter's ",none"."""
    return {task: {key.removesuffix(",none"): float(v) for key, v in metrics.items()
                   if "," in key and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in results.items()}
