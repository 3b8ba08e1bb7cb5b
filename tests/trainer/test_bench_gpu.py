"""bench.gpu --smoke: the GPU benchmark's code at tiny shapes on CPU, so it cannot rot between GPU runs."""
from __future__ import annotations

import json
import math

from bench import gpu


def test_smoke_every_row(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--inline", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == [r.name for r in gpu.ROWS]
    assert res["meta"]["smoke"] is True
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        if name == gpu.FLA_ROW:
            cmp = r["chunked_vs_recurrent_fp32"]
            assert r["fla"] is False and set(cmp) == {"out", "grad_q", "grad_k", "grad_v", "grad_g", "grad_beta"}
            scale = {"out": r["max_abs_out"], **{f"grad_{n}": v for n, v in r["max_abs_grad"].items()}}
            # chunked == the recurrence: the fp32 output to rounding; q/k/v/beta grads are bf16 (their inputs' dtype)
            assert cmp["out"] <= 1e-5 * scale["out"] and cmp["grad_g"] <= 1e-5 * scale["grad_g"], cmp
            assert all(cmp[k] <= scale[k] / 128 for k in cmp), (cmp, scale)
            continue
        assert r["fla"] is False and r["steps_timed"] >= 3
        for k in ("tokens_per_s", "mfu", "step_ms", "compile_s", "loader_share_sync", "loader_wait_share"):
            assert math.isfinite(r[k]) and r[k] >= 0, (name, k, r[k])
        assert r["tokens_per_s"] > 0 and 0 <= r["loader_wait_share"] <= 1
        assert math.isfinite(r["loss_last"])
    assert rows["axiom-380m (curriculum)"]["activation_checkpointing"] is True
    assert rows["argonne-3.0"]["optimizer"] == "adamw" and rows["llama-think-95m"]["optimizer"] == "muon"


def test_capped_child_process(tmp_path):
    killed = gpu.run_capped("atom", 0.5, smoke=True)  # torch alone takes longer to import
    assert killed["model"] == "atom" and "timed out" in killed["error"]
    row = gpu.run_capped("atom", 120, smoke=True)
    assert "error" not in row and row["tokens_per_s"] > 0 and row["params"] > 0
