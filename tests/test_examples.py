"""The example scripts run as a user runs them (on a tiny checkpoint, one epoch)."""

import os
import subprocess
import sys
from pathlib import Path

import minilora as ml
from minilora.weights import save_pretrained

ROOT = Path(__file__).resolve().parent.parent


def test_appendix_e_example(minilora_home, tmp_path):
    cfg = ml.GPTConfig(vocab_size=50257, context_length=128, emb_dim=16, n_heads=2, n_layers=2)
    save_pretrained(ml.GPTModel(cfg, seed=0), tmp_path / "tiny")
    env = {**os.environ, "MINILORA_HOME": str(minilora_home), "MINILORA_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "appendix_e.py"), "--model", str(tmp_path / "tiny"),
                          "--epochs", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "130 training batches, 19 validation, 38 test" in out.stdout
    assert "Ep 1 (Step 000100)" in out.stdout and "Test accuracy:" in out.stdout
