"""Models out and back in: trainer.tools.export -> transformers (logits, greedy generate), stock Llama for the
Llama-exact ones, remote code that runs without ShardLoom installed, sharded weights, the import side
(our exports, Llama, Argonne's own layout, hf://) and export -> import -> export byte stability."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.tools import hf
from trainer.checkpoint import find_weights, load_model, load_model_weights
from trainer.tools.export import export, main as export_main
from trainer.tools.generate import GenerationConfig, generate
from trainer.models import build_model
from trainhelp import ARCHS, make_run

transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

def greedy_hf(model, prompt: list[int], n: int, eos: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos)[0, len(prompt):].tolist()
    return out[:-1] if out and out[-1] == eos else out


@pytest.mark.parametrize("name", list(ARCHS))
def test_export_loads_in_transformers_with_equal_logits_and_greedy(name, tmp_path, chat_bpe_json):
    run, ours = make_run(tmp_path, name, chat_bpe_json)
    out = tmp_path / "export"
    assert export_main([str(run), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    llama = ARCHS[name][1]
    assert config["model_type"] == ("llama" if llama else "shardloom")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if llama:  # stock class, no remote code, no modeling files in the folder
        theirs = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert not list(out.glob("*.py"))
    else:
        theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
        assert type(theirs).__name__ == "ShardLoomForCausalLM"
    theirs.eval()
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("The class statement")["input_ids"]
    from shards.tokenizers import get_tokenizer
    assert prompt == get_tokenizer(str(chat_bpe_json)).encode("The class statement")
    eos = tok.eos_token_id
    assert eos == 0 and json.loads((out / "generation_config.json").read_text())["temperature"] == 0.7
    mine = generate(ours, prompt, GenerationConfig(max_new_tokens=24, greedy=True, stop_ids=(eos,)))
    assert greedy_hf(theirs, prompt, 24, eos) == mine and len(mine) > 0
    card = (out / "README.md").read_text()
    assert f"{ours.num_params():,} parameters" in card and ("trust_remote_code" in card) != llama


def test_remote_code_runs_without_shardloom(tmp_path, chat_bpe_json):
    """The export's modeling code is self-contained: a process that cannot import trainer/ or shards/
    loads it and computes the same logits."""
    run, ours = make_run(tmp_path, "hybrid", chat_bpe_json)
    out = tmp_path / "export"
    export(run, out)
    ids = torch.randint(0, 384, (1, 30), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("trainer", "shards", "pipelines"):
            raise ImportError("ShardLoom is not installed here: " + name)
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float32).eval()
assert not any(k.split(".")[0] in ("trainer", "shards") for k in sys.modules)
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ours(ids), rtol=0, atol=1e-5)


def test_sharded_export_loads(tmp_path, chat_bpe_json):
    run, ours = make_run(tmp_path, "atom-xsa", chat_bpe_json)
    out = tmp_path / "export"
    assert export_main([str(run), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files) and not (out / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 384, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-5)
        back, _, _ = load_model(out)  # our own reader takes the sharded folder too
        torch.testing.assert_close(back(ids), ours(ids), rtol=0, atol=0)
    # an export that fails part-way leaves the folder's previous weights whole
    import trainer.tools.hf as hf

    def half_written(sd, folder, *a):
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    before = _files(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf, "save_weights", half_written)
        with pytest.raises(OSError, match="disk full"):
            export(run, out)
    assert _files(out) == before and [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    # re-exported unsharded: no stray shards or index from the sharded export
    export(run, out)
    assert sorted(p.name for p in out.glob("model*.safetensors*")) == ["model.safetensors"]
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)[0](ids), ours(ids), rtol=0, atol=0)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name", ["axiom-interleaved", "hybrid"])
def test_export_import_export_is_byte_stable(name, tmp_path, chat_bpe_json):
    run, ours = make_run(tmp_path, name, chat_bpe_json)
    first, second = tmp_path / "e1", tmp_path / "e2"
    export(run, first, dtype="bfloat16")
    export(first, second, dtype="bfloat16")  # import (our loader) then export again
    assert _files(first) == _files(second)
    # init_from an export into the curriculum's own model: the interleaved q/k rows come back exactly
    fresh = build_model(json.loads((run / "checkpoints/step_0000003/config.json").read_text())["model"])
    export(run, tmp_path / "e32")
    load_model_weights(fresh, find_weights(tmp_path / "e32"))
    for (k, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(fresh.state_dict().items())):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_init_from_refuses_another_architecture(tmp_path, chat_bpe_json):
    run, _ = make_run(tmp_path, "atom-xsa", chat_bpe_json)
    export(run, tmp_path / "e")
    other = build_model({**ARCHS["atom-no-xsa"][0], "vocab_size": 384})
    with pytest.raises(ValueError, match="model.xsa_layers"):
        load_model_weights(other, tmp_path / "e")


def test_llama_and_argonne_layouts_and_hub_path(tmp_path, chat_bpe_json, monkeypatch):
    """Published checkpoints: an HF Llama folder (as Axiom's) and Argonne's own argonne2 layout
    import into our dense model; hf://org/name goes through the hub download (faked to a local dir)."""
    run, ours = make_run(tmp_path, "argonne", chat_bpe_json)
    arg = tmp_path / "argonne-release"
    arg.mkdir()
    c = ours.config
    sd = hf._rename(ours.state_dict(), c.n_layers, hf.ARGONNE_TOP, hf.ARGONNE_BLOCK, "blocks.{i}.")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(arg / "model.safetensors"))
    (arg / "config.json").write_text(json.dumps({
        "model_type": "argonne2", "vocab_size": 384, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "qk_norm": True,
        "v_norm": True, "sandwich_norm": True, "logit_softcap": 15.0, "tie_word_embeddings": True,
        "local_attention_window": 256, "interleaved_local_attention": True}))
    from shards.tokenizers import get_tokenizer, save_hf_tokenizer
    save_hf_tokenizer(get_tokenizer(str(chat_bpe_json)), arg)
    ids = torch.randint(0, 384, (1, 25), generator=torch.Generator().manual_seed(4))
    calls = []

    def fake_snapshot(repo, revision=None, allow_patterns=None):
        calls.append((repo, revision))
        return str(arg)
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model, cfg, _ = load_model("hf://PursuitOfDataScience/argonne-3.0-base@main")
    assert calls == [("PursuitOfDataScience/argonne-3.0-base", "main")]
    assert cfg["model"].get("sliding_window") is None  # the release was trained with full attention
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ours(ids), rtol=0, atol=1e-6)

    from transformers import LlamaConfig, LlamaForCausalLM
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
                                       tie_word_embeddings=True))
    ref.eval().save_pretrained(tmp_path / "llama")
    save_hf_tokenizer(get_tokenizer(str(chat_bpe_json)), tmp_path / "llama")
    mine, _, _ = load_model(tmp_path / "llama")
    with torch.no_grad():
        torch.testing.assert_close(mine(ids), ref(ids).logits, rtol=0, atol=1e-5)


def test_weights_only_checkpoint_and_bad_folders(tmp_path, chat_bpe_json):
    run, ours = make_run(tmp_path, "atom-xsa", chat_bpe_json)
    ck = run / "checkpoints" / "step_0000003"
    assert find_weights(run) == ck  # no train_state.pt: still a source of weights for init_from
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        load_model(bad)
    assert export_main([str(bad), "--out", str(tmp_path / "x")]) == 2


def test_model_card_carries_the_training_facts(tmp_path, chat_bpe_json):
    run, ours = make_run(tmp_path, "atom-no-xsa", chat_bpe_json)
    torch.save({"step": 3, "tokens_seen": 3072}, run / "checkpoints" / "step_0000003" / "train_state.pt")
    rows = [{"type": "train", "step": s, "loss": 5.0 - s, "tokens": 1024 * s} for s in (1, 2, 3, 4)]
    rows.append({"type": "eval", "step": 3, "loss": {"docs": 2.5, "overall": 2.5}})
    rows.append({"type": "eval", "step": 4, "loss": {"docs": 9.9, "overall": 9.9}})  # after the exported step
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "training.png").write_bytes(b"\x89PNG fake")
    cfg = json.loads((run / "checkpoints/step_0000003/config.json").read_text())
    cfg["data"]["schedule"] = [{"at": 0.0, "weights": {"docs": 1.0}}, {"at": 1.0, "weights": {"docs": 1.0}}]
    (run / "checkpoints/step_0000003/config.json").write_text(json.dumps(cfg))
    export(run, tmp_path / "e")
    card = (tmp_path / "e" / "README.md").read_text()
    for want in (f"{ours.num_params():,} parameters, 3 steps, 3,072 tokens", "sources: docs",
                 "mixture at 0% of the run: docs 1", "final train loss: 2.0000", "final val loss (docs): 2.5000",
                 "![loss, learning rate and mixture](training.png)", "Stock `LlamaForCausalLM`"):
        assert want in card, (want, card)
    assert (tmp_path / "e" / "training.png").read_bytes() == b"\x89PNG fake"


def test_untied_llama_without_the_tie_key_keeps_its_head(tmp_path, chat_bpe_json):
    """LlamaConfig's default is untied: a config.json without tie_word_embeddings must not drop lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shards.tokenizers import get_tokenizer, save_hf_tokenizer
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       tie_word_embeddings=False)).eval()
    ref.save_pretrained(tmp_path / "llama")
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    save_hf_tokenizer(get_tokenizer(str(chat_bpe_json)), tmp_path / "llama")
    mine, _, _ = load_model(tmp_path / "llama")
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(mine(ids), ref(ids).logits, rtol=0, atol=1e-5)


def test_generation_config_matches_our_sampling():
    g = hf.generation_config({"temperature": 0.0, "max_new_tokens": 8}, {"eos_token_id": 0}, [0])
    assert g["do_sample"] is False and "temperature" not in g and g["top_k"] == 0
    g = hf.generation_config({"temperature": 0.7, "top_p": 0.9}, {}, [0, 2])
    assert g["do_sample"] is True and g["temperature"] == 0.7 and g["top_k"] == 0 and g["eos_token_id"] == [0, 2]
    from transformers import GenerationConfig as HFGen
    HFGen(**g).validate()  # transformers accepts what we write
