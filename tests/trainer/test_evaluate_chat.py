"""trainer.tools.evaluate against lm-evaluation-harness's own HF backend on a separate export, on a local
multiple-choice task (no network); trainer.tools.chat's loop: history, context trimming, stop at <|im_end|>."""
from __future__ import annotations

import io
import json
import random

import pytest

from shards.evalsets import write_multiple_choice_task
import torch

from trainhelp import make_run
from trainer.tools.chat import converse, fit_history, main as chat_main
from trainer.tools.export import export
from trainer.tools.generate import GenerationConfig

lm_eval = pytest.importorskip("lm_eval")


def write_task(d):
    """A 16-question multiple-choice task in JSONL with its task YAML (lm-eval's `json` loader)."""
    rng = random.Random(0)
    words = ["statement", "function", "module", "class", "loop", "value", "name", "object"]
    rows = [{"question": f"In Python, the {rng.choice(words)} is", "choices": rng.sample(words, 3),
             "answer": rng.randrange(3)} for _ in range(16)]
    write_multiple_choice_task(d, "tiny_mc", rows)
    return d


def test_evaluate_equals_the_harness_hf_backend_on_the_export(tmp_path, chat_bpe_json, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = write_task(tmp_path / "tasks")
    run, _ = make_run(tmp_path, "atom-xsa", chat_bpe_json)
    from trainer.tools.evaluate import main
    assert main([str(run), "--tasks", "tiny_mc", "--include-path", str(tasks), "--batch-size", "4"]) == 0
    assert "acc_norm" in capsys.readouterr().out  # lm-eval's table
    ours = json.loads((run / "checkpoints" / "step_0000003" / "lm_eval.json").read_text())["results"]["tiny_mc"]
    # independently: the harness's own HF backend on an export of the same run
    export(run, tmp_path / "export")
    from lm_eval.tasks import TaskManager
    ref = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "export"),
                                                          "trust_remote_code": True, "dtype": "float32"},
                                  tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tasks)),
                                  batch_size=1, device="cpu")["results"]["tiny_mc"]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == ref[metric]
    assert main([str(run), "--tasks", "no_such_task", "--include-path", str(tasks)]) == 2


def test_chat_keeps_history_and_trims_the_oldest_turns(tmp_path, chat_bpe_json):
    run, model = make_run(tmp_path, "hybrid", chat_bpe_json, chat=True)
    from shards import chat
    from shards.tokenizers import get_tokenizer
    tok = get_tokenizer(str(chat_bpe_json))
    history = [{"role": "user", "content": "hello there " * 20}, {"role": "assistant", "content": "hi " * 20},
               {"role": "user", "content": "what is a class?"}]
    full = chat.prompt(tok, history)
    ids, dropped = fit_history(tok, history, budget=len(full))
    assert (ids, dropped) == (full, 0)
    ids, dropped = fit_history(tok, history, budget=len(full) - 1)
    assert dropped == 2 and ids == chat.prompt(tok, history[2:])
    with pytest.raises(ValueError, match="alone"):
        fit_history(tok, history[2:], budget=3)

    lines = iter(["first question", "/reset", "second question", "third question", None])
    out, note = io.StringIO(), io.StringIO()
    gen = GenerationConfig(max_new_tokens=8, greedy=True)
    h = converse(model, tok, gen, lambda: next(lines), out, note)
    assert [m["role"] for m in h] == ["user", "assistant", "user", "assistant"]
    assert h[0]["content"] == "second question" and "[history cleared]" in note.getvalue()
    # the second answer was generated from the whole ChatML history, as the SFT data renders it
    from trainer.tools.generate import generate, stop_ids
    expect = generate(model, chat.prompt(tok, h[:3]), GenerationConfig(max_new_tokens=8, greedy=True,
                                                                         stop_ids=stop_ids(tok, True)))
    assert h[3]["content"] == tok.decode(expect)


def test_chat_cli_defaults_and_refusals(tmp_path, chat_bpe_json, capsys):
    run, _ = make_run(tmp_path, "atom-xsa", chat_bpe_json, chat=True)
    assert chat_main([str(run), "--max-new-tokens", "4", "--top-p", "0.5"], read=iter(["hi", None]).__next__) == 0
    err = capsys.readouterr().err
    assert "temperature 0.2, top_p 0.5, repetition_penalty 1.15, no_repeat_ngram 3" in err  # card + override
    assert chat_main([str(run), "--max-new-tokens", "500"], read=lambda: None) == 2
    assert "no room" in capsys.readouterr().err
    torch.manual_seed(0)
    export(run, tmp_path / "e")  # an export carries the card settings in generation_config.json
    g = json.loads((tmp_path / "e" / "generation_config.json").read_text())
    assert (g["temperature"], g["top_p"], g["repetition_penalty"], g["no_repeat_ngram_size"]) == (0.2, 0.85, 1.15, 3)
    assert g["eos_token_id"] == [0, 2]  # EOS and <|im_end|>
    assert "chat_template" in json.loads((tmp_path / "e" / "tokenizer_config.json").read_text())
