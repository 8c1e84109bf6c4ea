"""The learner's examples (examples/0*.py) run as a learner runs them: a fresh process,
offline, from another folder, and print what they claim to show."""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name, tmp_path):
    """stdout of `python examples/<name>` run offline from tmp_path, with minilora importable
    as `pip install -e .` makes it; fails the test on a non-zero exit or a run over a minute."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINILORA_OFFLINE": "1", "MINILORA_HOME": str(tmp_path / "home")}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - start < 60
    return out.stdout


def numbers_after(label, text):
    """Every number printed right after `label` (e.g. 'relative error')."""
    return [float(x) for x in re.findall(re.escape(label) + r"\s*([-+0-9.e]+)", text)]


def test_exercise_cross_entropy_is_stable():
    """The stub's forward takes the log-softmax as z - logsumexp(z), as the derivation says:
    a target with a probability that underflows to 0 (e^-1000) still has a finite loss, 1000."""
    spec = importlib.util.spec_from_file_location("exercise_layers", ROOT / "examples" / "exercises" / "layers.py")
    exercise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exercise)
    loss, (probs, _) = exercise.cross_entropy_forward(np.array([[1000.0, 0.0]]), np.array([1]))
    assert probs[0, 1] == 0.0  # the probability itself underflowed: log(probs) would be -inf
    assert float(loss) == 1000.0  # exact: z - max = [0, -1000], logsumexp = log(1 + e^-1000) = 0 in float64


def test_01_gradcheck_one_layer(tmp_path):
    out = run_example("01_gradcheck_one_layer.py", tmp_path)
    full, dropped = numbers_after("relative error", out)
    assert full < 1e-7 and dropped > 1e-2  # the dropped term makes the error jump
    assert "the full backward" in out and "without the n * mean(dn * n) term" in out


def test_02_backprop_by_hand(tmp_path):
    out = run_example("02_backprop_by_hand.py", tmp_path)
    # every activation gradient, from the loss down to the embeddings, with shape and norm
    for what, shape in [("logits", "(2, 6, 13)"), ("ln_f output", "(2, 6, 16)"),
                        ("h.1.mlp.c_fc output (gelu input)", "(2, 6, 64)"),
                        ("h.0.attn.c_attn output (q | k | v)", "(2, 6, 48)"),
                        ("residual stream between attn and mlp of h.0 (sum)", "(2, 6, 16)"),
                        ("embedding output (sum)", "(2, 6, 16)"), ("wte (head + embedding)", "(13, 16)")]:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(what)), None)
        assert line is not None and shape in line, what
    lines = out.splitlines()
    order = [i for i, ln in enumerate(lines) if ln.strip().startswith(("logits", "h.1.ln_1", "h.0.ln_1", "embedding"))]
    assert order == sorted(order) and len(order) == 6  # top down: loss first, embeddings last
    (diff,) = numbers_after("max abs difference", out)
    assert diff < 1e-12 and "28 parameter gradients" in out


def test_03_train_tiny_classifier(tmp_path):
    out = run_example("03_train_tiny_classifier.py", tmp_path)
    assert "LoRA: 4,744 trainable of 31,114 parameters" in out
    assert "full fine-tuning: 26,370 trainable of 26,370 parameters" in out
    lora, full = out.split("full fine-tuning:", 1)
    for part in (lora, full):
        losses = numbers_after("loss", part)
        assert len(losses) == 9 and losses[-1] < 0.1 * losses[0]  # the loss falls
        before = numbers_after("test accuracy before training", part)[0]
        after = float(re.search(r"test accuracy ([0-9.]+)% after", part).group(1))
        assert before < 70 and after > 95


def test_04_lora_merge(tmp_path):
    out = run_example("04_lora_merge.py", tmp_path)
    diffs = dict(re.findall(r"^(\w+):\s+max \|logits - .*?\| = ([-+0-9.e]+)", out, flags=re.M))
    assert set(diffs) == {"merged", "unmerged", "disabled", "enabled", "loaded"}
    assert all(float(d) < 1e-5 for d in diffs.values()), diffs  # float32 rounding only
    # the printed reason: merge + unmerge move W by rounding, not 0 and not more than a few
    # roundings (each at most eps32/2 relative, on values of about max|W + s A B|)
    (back,) = numbers_after("back to within", out)
    (rounding,) = numbers_after("max|W + s A B| =", out)
    assert 0 < back <= 2 * rounding
    assert numbers_after("the adapter moved the logits by max", out)[0] > 0.1  # so the equalities mean something
    (on_disk,) = numbers_after("adapter folder on disk:", out.replace(",", ""))
    (model_bytes,) = numbers_after("the model's own parameters in float32:", out.replace(",", ""))
    assert on_disk < 0.25 * model_bytes
    assert "2,666,528 LoRA parameters" in out and "124,441,346" in out


@pytest.mark.parametrize("name", ["01_gradcheck_one_layer.py", "02_backprop_by_hand.py",
                                  "03_train_tiny_classifier.py", "04_lora_merge.py"])
def test_examples_are_offline_and_self_contained(name):
    """No downloads, no data files: they import only minilora and what it depends on."""
    text = (ROOT / "examples" / name).read_text()
    assert "from_pretrained" not in text and "load_sms_spam" not in text and "urllib" not in text
    imports = set(re.findall(r"^(?:from|import) (\w+)", text, flags=re.M))
    assert imports <= {"numpy", "minilora", "time", "tempfile", "pathlib", "math"}, imports
