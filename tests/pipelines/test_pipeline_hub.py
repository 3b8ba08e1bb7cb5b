"""The default input is the hub; without network it must fail fast with one clear line."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_signature_command_offline_is_one_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.fineweb", "tokenize", "--tokenizer", "qwen3", "--limit", "10",
         "--output", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hf://datasets/HuggingFaceFW/fineweb/sample/10BT" in proc.stderr
    assert "cannot reach the Hugging Face hub" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_smoltalk_default_input_offline_is_one_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.smoltalk", "tokenize", "--limit", "10", "--output", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hf://datasets/HuggingFaceTB/smol-smoltalk" in proc.stderr
    assert "cannot reach the Hugging Face hub" in proc.stderr
    assert "Traceback" not in proc.stderr
