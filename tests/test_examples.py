"""The example scripts run as a user runs them (on a tiny checkpoint, one epoch)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_appendix_e_example(minilora_home, tiny_checkpoint):
    env = {**os.environ, "MINILORA_HOME": str(minilora_home), "MINILORA_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "appendix_e.py"), "--model", str(tiny_checkpoint),
                          "--epochs", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "130 training batches, 19 validation, 38 test" in out.stdout
    assert "Ep 1 (Step 000100)" in out.stdout and "Test accuracy:" in out.stdout
