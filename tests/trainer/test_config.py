"""Curriculum loading: typed overrides, errors naming file and field, stages, derived batch sizes,
and `--dry-run --json` on every shipped curriculum giving the cards' exact parameter counts."""
import json
from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, load_curriculum, resolve
from trainhelp import run, train

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "model": {"arch": "dense", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64},
    "tokenizer": {"name": "x"},
    "data": {
        "sources": [{"name": "a", "path": "A"}, {"name": "b", "path": "B"}],
        "schedule": [{"at": 0.0, "weights": {"a": 1, "b": 0}}, {"at": 1.0, "weights": {"a": 0, "b": 1}}],
    },
    "batch": {"seq_len": 32, "micro_batch": 2, "grad_accum": 2},
    "train": {"steps": 10},
}


def write(tmp_path, d, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


def test_overrides_are_typed_by_the_dataclass(tmp_path):
    p = write(tmp_path, BASE)
    (cfg,) = load_curriculum(p, ["optim.lr=1e-3", "train.compile=true", "batch.micro_batch=4", "model.n_layers=3"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.compile is True and cfg.batch.micro_batch == 4 and cfg.model.n_layers == 3
    assert cfg.tokens_per_step() == 32 * 4 * 2
    assert cfg.tokens_per_step(world_size=2) == 32 * 4 * 2 * 2
    # model values are typed by the family's config like any section: a list, a float written 1e4, null
    (m,) = load_curriculum(p, ["model.xsa_layers=[0, 1]", "model.rope_theta=1e4", "model.head_dim=null"])
    assert m.model.xsa_layers == [0, 1] and m.model.rope_theta == 10000.0 and isinstance(m.model.rope_theta, float)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
        ("optim.lrr=1", "optim.lrr: unknown key (did you mean 'lr'?)"),
        ("train.compile=maybe", "train.compile: expected true/false"),
        ("batch.seq_len=1.5", "batch.seq_len: expected an integer"),
        ("optim.name=sgd", "optim.name: expected adamw | adamw8bit | muon"),
        ("schedule.kind=linear", "schedule.kind:"),
        ("data.schedule.0.weights.c=1", "data.schedule.0.weights.c: not a source"),
    ],
)
def test_errors_name_file_and_field(tmp_path, override, needle):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as e:
        load_curriculum(p, [override])
    assert str(e.value).startswith(str(p) + ": ") and needle in str(e.value), str(e.value)


def test_yaml_field_error(tmp_path):
    bad = {**BASE, "optim": {"lr": "fast"}}
    p = write(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"c\.yaml: optim\.lr: expected a number, got 'fast'"):
        load_curriculum(p)
    bad = {**BASE, "trian": {}}
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_curriculum(write(tmp_path, bad))


def test_tokens_per_step_target_derives_grad_accum_and_steps_from_tokens():
    d = {**BASE, "batch": {"seq_len": 1024, "micro_batch": 38, "tokens_per_step": 233472}, "train": {"tokens": 20.84e9}}
    (cfg,) = resolve(d, "argonne.yaml", world_size=3)
    assert cfg.grad_accum(3) == 2 and cfg.grad_accum(1) == 6
    assert cfg.tokens_per_step(3) == cfg.tokens_per_step(1) == 233472
    assert cfg.total_steps(3) == int(20.84e9 // 233472)
    with pytest.raises(ConfigError, match="tokens_per_step"):
        cfg.grad_accum(5)


def test_stages_merge_and_mixture_points():
    d = dict(BASE)
    d["stages"] = [
        {"name": "pretrain"},
        {"name": "continued", "train": {"init_from": "@previous", "reset_data_cursor": True, "steps": 4},
         "data": {"schedule": [{"tokens": 0, "weights": {"b": 1}}]}},
    ]
    a, b = resolve(d, "s.yaml", ["optim.lr=0.01"])
    assert (a.name, b.name) == ("pretrain", "continued")
    assert a.train.steps == 10 and b.train.steps == 4 and b.train.reset_data_cursor
    assert a.optim.lr == b.optim.lr == 0.01  # CLI overrides apply to every stage
    assert a.mixture_points() == [(0.0, {"a": 1.0, "b": 0.0}), (1.0, {"a": 0.0, "b": 1.0})]
    assert b.mixture_points() == [(0.0, {"b": 1.0})]
    assert b.model == a.model


CARDS = {
    "atom.yaml": 3_412_800,
    "demo-atom.yaml": 3_412_800,
    "axiom-380m.yaml": 385_849_344,
    "axiom-380m-sft.yaml": 385_849_344,
    "argonne-3.0.yaml": 2_882_162_688,
    "llama-think-95m.yaml": 95_715_408,
}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_dry_run_json_every_curriculum(name, capsys):
    path = ROOT / "curricula" / name
    assert path.exists(), path
    rc, out, _ = train([path, "--dry-run", "--json", "--skip-data"], capsys)  # shards not built here
    assert rc == 0
    lines = out.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["parameters"] == CARDS[name] and isinstance(out["parameters"], int)
    assert out["tokens_per_step"] > 0 and out["steps"] > 0
    assert any("mixture schedule" in l for l in lines)


def test_dry_run_cli_json_last_line():
    r = run(["curricula/axiom-380m.yaml", "--dry-run", "--json", "--skip-data"], timeout=120)  # a real process, exit 0
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # the card's recipe: 327,680 tokens/step (1 x 1024 x 320), 24,414 steps for 8B tokens
    assert (out["parameters"], out["tokens_per_step"], out["steps"]) == (385_849_344, 327_680, 24_414)


def test_model_section_error_names_file_and_field(tmp_path, capsys):
    p = write(tmp_path, {**BASE, "model": {**BASE["model"], "n_layer": 2}})
    rc, _, err = train([p, "--dry-run"], capsys)
    assert rc == 2
    assert str(p) in err and "model.n_layer" in err and "n_layers" in err, err


def test_model_section_is_typed_and_checked_at_load(tmp_path):
    """YAML 1.1 reads `1e4` as a string: the model section is typed by its family's dataclass like
    every other section (it reached the first forward as '1e4'), and a bad shape fails at load."""
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**BASE, "model": {}}).replace("model: {}", "model: {arch: dense, vocab_size: 64, "
                 "d_model: 32, n_layers: 2, n_heads: 2, ffn_dim: 64, rope_theta: 1e4, window_layers: odd}"))
    m = load_curriculum(p)[0].model
    assert m.rope_theta == 10000.0 and isinstance(m.rope_theta, float) and m.window_layers == "odd"
    bad = write(tmp_path, {**BASE, "model": {**BASE["model"], "n_kv_heads": 3}}, "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml: model: n_heads=2 must be a multiple of n_kv_heads=3"):
        load_curriculum(bad)
    with pytest.raises(ConfigError, match=r"model.d_model: expected an integer"):
        load_curriculum(write(tmp_path, {**BASE, "model": {**BASE["model"], "d_model": "wide"}}, "w.yaml"))
    # activation checkpointing has one home, the train section: the model config gets it from there
    clash = {**BASE, "model": {**BASE["model"], "activation_checkpointing": False}}
    with pytest.raises(ConfigError, match="model.activation_checkpointing: .*set train.activation_checkpointing"):
        load_curriculum(write(tmp_path, clash, "clash.yaml"))
    (ckpt,) = load_curriculum(write(tmp_path, BASE, "ok.yaml"), ["train.activation_checkpointing=true"])
    assert ckpt.model.activation_checkpointing is True and "activation_checkpointing" not in ckpt.to_dict()["model"]


def test_multi_stage_dry_run_json_counts_all_stages(capsys):
    rc, out, _ = train([ROOT / "curricula" / "argonne-3.0.yaml", "--dry-run", "--json", "--skip-data"], capsys)
    assert rc == 0
    out = json.loads(out.strip().splitlines()[-1])
    s1, s2 = out["stages"]
    assert (s1["stage"], s2["stage"]) == ("pretrain", "continued")
    assert s1["steps"] == 20_839_021_454 // 233_472 and s2["steps"] == 55_211_688_156 // 233_472
    assert out["steps"] == s1["steps"] + s2["steps"] and out["tokens_per_step"] == 233_472


def test_card_recipes():
    (arg1, arg2) = load_curriculum(ROOT / "curricula" / "argonne-3.0.yaml", world_size=3)
    assert arg1.grad_accum(3) == 2 and arg1.tokens_per_step(3) == 233_472 and arg1.train.seed == 444
    assert arg2.train.init_from == "@previous" and arg2.train.reset_data_cursor and arg2.schedule.warmup == 0
    assert (arg1.schedule.kind, arg1.schedule.warmup, arg1.schedule.cooldown) == ("wsd", 1000, 0)
    (lt,) = load_curriculum(ROOT / "curricula" / "llama-think-95m.yaml", world_size=4)
    assert lt.grad_accum(4) == 8 and lt.tokens_per_step(4) == 2_097_152 and lt.optim.name == "muon"
    assert lt.optim.lr == 0.02 and lt.optim.muon.adamw_lr is None  # every group on the Muon schedule
    (sft,) = load_curriculum(ROOT / "curricula" / "axiom-380m-sft.yaml")
    assert (sft.total_steps(), sft.tokens_per_step(), sft.schedule.warmup, sft.schedule.decay) == (641, 319_488, 51, 102)
    assert sft.data.packing == "document"


def test_atom_mixture_integrates_to_the_cards_proportions():
    """Time-integrated share of each source under the piecewise-linear schedule == 39/31/12/12/6."""
    (cfg,) = load_curriculum(ROOT / "curricula" / "atom.yaml")
    pts = cfg.mixture_points()
    assert pts[0][0] == 0.0 and pts[-1][0] == 1.0
    share = {}
    for (a0, w0), (a1, w1) in zip(pts, pts[1:]):
        for k in w0:
            share[k] = share.get(k, 0.0) + (a1 - a0) * (w0[k] + w1[k]) / 2
    want = {"fineweb-edu": 0.39, "ultra-fineweb": 0.31, "finemath-3plus": 0.12, "cosmopedia-v2": 0.12, "ultradata-math": 0.06}
    assert share == pytest.approx(want, abs=1e-9)
    # web text early, edu/synthetic/math later
    first, last = pts[0][1], pts[-1][1]
    assert first["ultra-fineweb"] > last["ultra-fineweb"]
    for k in ("finemath-3plus", "cosmopedia-v2", "ultradata-math", "fineweb-edu"):
        assert last[k] >= first[k]


def test_overrides_may_follow_the_flags():
    # `make demo` and users write `--run-dir X --overwrite key=value`; argparse's plain parse rejects that order.
    from trainer.run import parse_args

    a = parse_args(["curricula/atom.yaml", "--run-dir", "r", "--overwrite", "optim.lr=1e-3", "train.steps=5"])
    b = parse_args(["curricula/atom.yaml", "optim.lr=1e-3", "--run-dir", "r", "train.steps=5", "--overwrite"])
    assert a.overrides == b.overrides == ["optim.lr=1e-3", "train.steps=5"]
    assert (a.run_dir, a.overwrite) == (b.run_dir, b.overwrite) == ("r", True)
