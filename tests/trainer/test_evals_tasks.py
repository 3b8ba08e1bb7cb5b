"""trainer.evals.tasks: lm-eval tasks on the live model score as lm-eval's own HF backend (HFLM) scores
an export of the same weights, request by request and through trainer.tools.evaluate; two gloo ranks score
as one; check_tasks resolves tasks up front with one-line errors. Local tasks only (no network)."""
from __future__ import annotations

import functools
import json
import os
import random

import pytest
import torch
import trainhelp
from conftest import real_texts

from shards.evalsets import write_multiple_choice_task
from shards.tokenizers import get_tokenizer

lm_eval = pytest.importorskip("lm_eval")

from trainer.evals.tasks import (
    check_tasks,
    hf_encode,
    live_lm,
    prefix_token_id,
    run_tasks,
)

PPL = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GROUP = """group: tiny_suite
task: [tiny_mc, tiny_mc_b]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
"""
GEN = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
"""


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """Local tasks: two 12-question multiple-choice tasks (one group), a 7-document perplexity task
    whose even documents are long (several windows) and odd ones short, so that ranks get unequal
    numbers of forwards; plus broken ones: a YAML that does not parse, a missing data file and a
    generative task (lm-eval's index skips the broken YAML, so the good tasks load beside them)."""
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    words = ["statement", "function", "module", "class", "loop", "value", "name", "object"]
    mc = _jsonl(d / "mc.jsonl", [{"question": f"In Python, the {rng.choice(words)} is", "choices": rng.sample(words, 3),
                                  "answer": rng.randrange(3)} for _ in range(12)])
    paras = real_texts(200)
    long, short = [t for t in paras if 700 < len(t) < 1500], [t for t in paras if 40 < len(t) < 200]
    ppl = _jsonl(d / "ppl.jsonl", [{"text": (long if i % 2 == 0 else short)[i]} for i in range(7)])
    write_multiple_choice_task(d, "tiny_mc", data=mc)
    write_multiple_choice_task(d, "tiny_mc_b", data=mc, text="Q: {{question}}\\nA:")
    (d / "tiny_suite.yaml").write_text(GROUP)
    (d / "tiny_ppl.yaml").write_text(PPL.format(data=ppl))
    (d / "broken.yaml").write_text("task: broken_task\ndataset_path: json\n  oops: [unclosed\n")
    write_multiple_choice_task(d, "tiny_nodata", data=d / "missing.jsonl", text="x")
    (d / "tiny_gen.yaml").write_text(GEN.format(data=mc))
    return d


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _make(tmp_path, arch: str, bpe, llama2_model=None):
    """A run in make_run's layout (random weights, norms moved off their init): (run dir, the model,
    our tokenizer). The tokenizer is `bpe` (conftest's 384-id byte-level BPE, no BOS), or with
    `llama2_model` Llama 2's SentencePiece, which puts BOS before every document (and the model
    then has its 32,000 ids)."""
    run, model = trainhelp.make_run(tmp_path, arch, bpe)
    if llama2_model is None:
        return run, model, get_tokenizer(str(bpe))
    from safetensors.torch import save_model

    from trainer.models import build_model

    ck = run / "checkpoints" / "step_0000003"
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["vocab_size"] = 32000
    cfg["tokenizer"] = {"name": "llama2", "path": str(llama2_model)}
    torch.manual_seed(0)
    model = build_model(cfg["model"]).eval()
    with torch.no_grad():  # as make_run: norms off their init
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    save_model(model, str(ck / "model.safetensors"))
    (ck / "config.json").write_text(json.dumps(cfg))
    return run, model, get_tokenizer("llama2", path=str(llama2_model))


def _greedy_pairs(model, tok, contexts):
    """(context, continuation) pairs that the model's greedy next token spells, where the text
    round-trips to exactly that token, so some requests are greedy (is_greedy True)."""
    specials = set(tok.special_tokens.values())
    out = []
    for ctx in contexts:
        ids, plain = hf_encode(tok, ctx), tok.encode(ctx)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        g = next(i for i in logits.argsort(descending=True).tolist() if i not in specials)
        cont = tok.decode(plain + [g])[len(tok.decode(plain)):]  # SentencePiece drops a leading space alone
        if cont and hf_encode(tok, ctx + cont) == ids + [g]:
            out.append((ctx, cont))
    return out


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.parametrize("arch,tokenizer", [("hybrid", "bpe"), ("atom-no-xsa", "llama2")],
                         ids=["remote-code-hybrid", "llama-dense-sentencepiece-bos"])
def test_live_scores_equal_the_hf_backend_on_the_export(arch, tokenizer, tmp_path, tasks_dir, chat_bpe_json, monkeypatch,
                                                        request):
    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM

    from trainer.tools.evaluate import evaluate
    from trainer.tools.export import export

    llama2 = request.getfixturevalue("llama2_model") if tokenizer == "llama2" else None
    run, model, tok = _make(tmp_path, arch, chat_bpe_json, llama2)
    lm = live_lm(model, tok, device="cpu", batch_size=3)
    export(run, tmp_path / "export")
    ref = HFLM(pretrained=str(tmp_path / "export"), trust_remote_code=True, dtype="float32", batch_size=2, device="cpu")
    assert (ref.max_length, ref.prefix_token_id) == (lm.live.max_length, prefix_token_id(tok))
    long = " ".join(real_texts(30))[:1500]  # > max_length tokens: truncated from the left / several windows
    pairs = [("The class statement", " defines a class"), ("In Python, the ", "module is"), ("", "Hello world"),
             ("café naïve résumé", " — “quotes” 😀 中文"), ("<|endoftext|>", " after a special string"),
             ("<s> is a strike-through tag", " in HTML"), (long, " and so on"),
             *_greedy_pairs(model, tok, ["The class", "def f(x):\n   ", "import", "The value of", "A function"])]
    theirs, ours = ref.loglikelihood(_requests("loglikelihood", pairs)), lm.loglikelihood(_requests("loglikelihood", pairs))
    assert any(greedy for _, greedy in theirs), "no greedy request: the is_greedy comparison would be vacuous"
    for pair, (t_ll, t_greedy), (o_ll, o_greedy) in zip(pairs, theirs, ours, strict=True):
        assert abs(t_ll - o_ll) < 1e-4 and t_greedy == o_greedy, (pair[0][:40], pair[1], t_ll, o_ll)
    texts = [(long,), ("short text",), ("",), ("<s> starts with the BOS string",), ("emoji 😀 and CJK 中文字符",)]
    theirs = ref.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    ours = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-4)

    # whole tasks, in-loop against `python -m trainer.evaluate`'s function on the same checkpoint. Its
    # TaskManager indexes lm-eval's ~15k built-in YAMLs (~10 s); these tasks are all local.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    mine = run_tasks(lm, ["tiny_suite", "tiny_ppl"], str(tasks_dir), limit=6)
    results = evaluate(run, ["tiny_suite", "tiny_ppl"], str(tasks_dir), limit=6, batch_size=4,
                       output=tmp_path / "lm_eval.json")["results"]
    for task in ("tiny_mc", "tiny_mc_b"):
        for metric in ("acc", "acc_norm"):
            assert mine.scores[task][metric] == results[task][f"{metric},none"]
        assert mine.scores[task]["acc_stderr"] == pytest.approx(results[task]["acc_stderr,none"], rel=1e-9)
    assert mine.scores["tiny_suite"]["acc"] == results["tiny_suite"]["acc,none"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert mine.scores["tiny_ppl"][metric] == pytest.approx(results["tiny_ppl"][f"{metric},none"], rel=1e-6)
    assert mine.seconds > 0 and mine.flat("lm_eval/")["lm_eval/tiny_mc/acc"] == mine.scores["tiny_mc"]["acc"]


class _Counting(torch.nn.Module):
    """The model, counting its forwards (and those of a single token: the FSDP padding ones)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.dummies = inner, 0, 0

    def forward(self, x):
        self.calls += 1
        self.dummies += x.shape == (1, 1)
        return self.inner(x)


def _rank_main(rank, world, port, run, tok_json, tasks_dir, out):
    import torch.distributed as dist

    from trainer.checkpoint import load_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, _, _ = load_model(run)
        counting = _Counting(model)
        lm = live_lm(counting, get_tokenizer(tok_json), device="cpu", batch_size=3,
                     max_length=model.config.max_seq_len, rank=rank, world_size=world, sharded=True)
        res = run_tasks(lm, ["tiny_suite", "tiny_ppl"], tasks_dir)
        (out / f"rank{rank}.json").write_text(json.dumps(
            {"calls": counting.calls, "dummies": counting.dummies, "scores": res and res.scores}))
    finally:
        dist.barrier()  # rank 1 leaves gather_object before rank 0 has received: gloo aborts a torn-down peer
        dist.destroy_process_group()
    # After the full suite, a spawned rank has aborted in interpreter teardown ("terminate called without
    # an active exception") once its results were written; end it here: what is tested is written above.
    os._exit(0)


def test_two_ranks_score_as_one(tmp_path, tasks_dir, chat_bpe_json):
    """Each rank scores every other document; rank 0 gets the scores one rank gets; under `sharded`
    both ranks run as many forwards, the one with the short documents padding with dummy ones."""
    import torch.multiprocessing as mp

    run, model, tok = _make(tmp_path, "atom-no-xsa", chat_bpe_json)
    one = run_tasks(live_lm(model, tok, batch_size=3), ["tiny_suite", "tiny_ppl"], str(tasks_dir))
    mp.spawn(_rank_main, args=(2, trainhelp.free_port(), run, tok.path, str(tasks_dir), tmp_path), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["scores"] is None and r0["calls"] == r1["calls"] and r0["dummies"] + r1["dummies"] > 0
    two = r0["scores"]
    assert two.keys() == one.scores.keys()
    for task, metrics in one.scores.items():
        for metric, value in metrics.items():
            exact = metric in ("acc", "acc_norm")
            assert two[task][metric] == (value if exact else pytest.approx(value, rel=1e-6)), (task, metric)


def test_check_tasks_counts_and_one_line_errors(tasks_dir):
    inc = str(tasks_dir)
    assert check_tasks(["tiny_suite", "tiny_ppl"], inc) == {"tiny_mc": 12, "tiny_mc_b": 12, "tiny_ppl": 7}
    assert check_tasks(["tiny_mc", "tiny_ppl"], inc, limit=5) == {"tiny_mc": 5, "tiny_ppl": 5}
    assert check_tasks(["tiny_mc"], inc, limit=0.5) == {"tiny_mc": 6}
    cases = {"tiny_mcc": ["unknown task", "did you mean", "tiny_mc", "broken.yaml"],
             "broken_task": ["unknown task", "broken.yaml", "line 3"],
             "tiny_nodata": ["missing.jsonl"],
             "tiny_gen": ["generate_until", "after training"]}
    for name, words in cases.items():
        with pytest.raises(ValueError) as e:
            check_tasks(["tiny_mc", name], inc)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"eval task '{name}':"), msg
        assert all(w in msg for w in words), (words, msg)


def test_generate_until_is_refused_by_name(tmp_path, tasks_dir, chat_bpe_json):
    _, model, tok = _make(tmp_path, "atom-no-xsa", chat_bpe_json)
    with pytest.raises(NotImplementedError, match="tiny_gen.*after training"):
        run_tasks(live_lm(model, tok, batch_size=2), ["tiny_gen"], str(tasks_dir), limit=2)


def test_lm_eval_is_imported_only_when_used(monkeypatch):
    import subprocess
    import sys

    code = "import sys, trainer.evals.tasks, trainer.evals.bpb; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=trainhelp.ROOT, env=trainhelp.env())
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ValueError, match=r"^eval tasks: lm-evaluation-harness is not installed \(pip install"):
        check_tasks(["tiny_mc"])
    with pytest.raises(ImportError, match="pip install"):
        run_tasks(None, ["tiny_mc"])
