"""CPU and GPU agree: the same weights give the same logits and gradients in float32
within documented tolerances (skipped without CuPy and a GPU).

Tolerances (float32): logits rtol 1e-4 / atol 1e-5, LoRA gradients rtol 1e-3 / atol 1e-6
relative to each gradient's scale. cuBLAS and OpenBLAS sum in different orders, and
float32 keeps about 7 digits; TF32 is off (CuPy's default), or these would be ~1e-3.
"""

import numpy as np
import pytest

import minilora as ml
from minilora.backend import to_numpy

pytestmark = pytest.mark.skipif(not ml.cuda_available(), reason="needs CuPy and an NVIDIA GPU")


def pair(cfg, **lora):
    models = []
    for device in ("cpu", "cuda"):
        m = ml.GPTModel(cfg, seed=0, dtype="float32", device=device).replace_head(2)
        ml.apply_lora(m, rank=4, alpha=4, **lora)
        rng = np.random.default_rng(1)
        for n in m.lora.param_names:
            if n.endswith("lora_B"):
                m.params[n][...] = m.xp.asarray(rng.standard_normal(m.params[n].shape).astype(np.float32) * 0.1)
        models.append(m)
    return models


def test_cpu_and_gpu_agree_in_float32():
    cfg = ml.GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2)
    cpu, gpu = pair(cfg)
    idx = np.random.default_rng(0).integers(0, 50257, (4, 100))
    pos = np.array([99, 50, 10, 0])
    lc, lg = cpu.forward(idx, positions=pos), gpu.forward(idx, positions=pos)
    np.testing.assert_allclose(to_numpy(lg), lc, rtol=1e-4, atol=1e-5)
    G = np.random.default_rng(2).standard_normal(lc.shape).astype(np.float32)
    gc, gg = cpu.backward(G), gpu.backward(gpu.xp.asarray(G))
    for n in cpu.trainable:
        scale = np.abs(gc[n]).max()
        np.testing.assert_allclose(to_numpy(gg[n]), gc[n], rtol=1e-3, atol=1e-6 * max(scale, 1.0), err_msg=n)


def test_gradcheck_on_the_gpu_in_float64():
    from minilora.gradcheck import run_gradchecks

    results = run_gradchecks(device="cuda")
    assert all(r.passed for r in results), [(r.name, r.max_rel_error) for r in results if not r.passed]
