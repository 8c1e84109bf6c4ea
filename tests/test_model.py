"""The whole GPT-2: gradients, dtypes, input checks, presets and the tied/replaced head."""

import numpy as np
import pytest

import minilora as ml
from minilora.backend import to_numpy
from minilora.gradcheck import MODEL_TOL, check_model
from minilora.config import param_shapes


def test_whole_model_gradients_match_finite_differences(device, tiny_cfg, tiny_idx):
    model = ml.GPTModel(tiny_cfg, seed=3, dtype="float64", device=device)
    r = check_model(model, tiny_idx, "gpt2")
    assert set(r.errors) == set(model.params)  # every parameter was checked
    assert r.max_rel_error < MODEL_TOL, {k: v for k, v in r.errors.items() if v > MODEL_TOL}


def test_classifier_head_and_partial_freezing_gradients(device, tiny_cfg, tiny_idx):
    """A replaced head, some parameters frozen: the others still get exact gradients."""
    model = ml.GPTModel(tiny_cfg, seed=4, dtype="float64", device=device).replace_head(3)
    model.freeze(["wte.weight", "h.0.attn.c_attn.weight", "h.1.mlp.c_fc.bias"])
    r = check_model(model, tiny_idx, "gpt2_head")
    assert "wte.weight" not in r.errors and "out_head.weight" in r.errors
    assert r.max_rel_error < MODEL_TOL


def test_only_the_head_trains(tiny_cfg, tiny_idx):
    """Nothing under the head trains: the backward does no block work and is still exact."""
    model = ml.GPTModel(tiny_cfg, seed=4, dtype="float64").replace_head(3)
    model.trainable = ["out_head.weight", "out_head.bias", "ln_f.weight"]
    r = check_model(model, tiny_idx, "head_only")
    assert r.max_rel_error < MODEL_TOL and set(r.errors) == set(model.trainable)


def test_a_head_alone_gets_no_dx(monkeypatch, tiny_cfg, tiny_idx):
    """Only the head trains (a LoRA adapter on it, or its weights): the backward stops at the
    head, with no dx product and no final-layernorm backward, and is still exact."""
    import minilora.model

    model = ml.GPTModel(tiny_cfg, seed=4, dtype="float64").replace_head(3)
    ml.apply_lora(model, rank=2, alpha=3, targets=["out_head"])
    calls = []
    real = minilora.model.layernorm_backward
    monkeypatch.setattr(minilora.model, "layernorm_backward", lambda *a: calls.append(1) or real(*a))
    r = check_model(model, tiny_idx, "head_adapter_only")
    assert r.max_rel_error < MODEL_TOL and set(r.errors) == {"out_head.lora_A", "out_head.lora_B"}
    assert calls == []
    model.trainable.append("ln_f.bias")  # now the final layernorm trains: dx goes through the head again
    r = check_model(model, tiny_idx, "head_adapter_and_ln_f")
    assert r.max_rel_error < MODEL_TOL and calls


def test_backward_returns_only_trainable_names(tiny_cfg, tiny_idx):
    model = ml.GPTModel(tiny_cfg, dtype="float64")
    model.freeze()
    model.trainable = ["h.1.ln_2.weight", "ln_f.bias"]
    logits = model.forward(tiny_idx)
    assert set(model.backward(np.ones_like(logits))) == {"h.1.ln_2.weight", "ln_f.bias"}


def test_tied_head_gradient_is_the_sum_of_both_uses(tiny_cfg, tiny_idx):
    """wte is both the embedding and the LM head: its gradient is the sum of the two,
    checked by untying into two copies and adding their separate gradients."""
    model = ml.GPTModel(tiny_cfg, seed=5, dtype="float64")
    G = np.random.default_rng(0).standard_normal((2, 5, tiny_cfg.vocab_size))
    model.forward(tiny_idx)
    tied = model.backward(G)["wte.weight"]
    untied = ml.GPTModel(tiny_cfg, seed=5, dtype="float64").replace_head(tiny_cfg.vocab_size)
    untied.params["out_head.weight"] = model.params["wte.weight"].T.copy()
    untied.params["out_head.bias"][:] = 0
    untied.forward(tiny_idx)
    g = untied.backward(G)
    np.testing.assert_allclose(tied, g["wte.weight"] + g["out_head.weight"].T, rtol=1e-12, atol=1e-15)


def test_float32_end_to_end_never_upcasts(device, tiny_cfg, tiny_idx):
    model = ml.GPTModel(tiny_cfg, dtype="float32", device=device).replace_head(2)
    assert all(p.dtype == np.float32 for p in model.params.values())
    logits = model.forward(tiny_idx)
    assert logits.dtype == np.float32
    grads = model.backward(model.xp.ones_like(logits))
    assert grads and all(g.dtype == np.float32 for g in grads.values())


def test_float32_and_float64_agree(tiny_cfg, tiny_idx):
    l32 = ml.GPTModel(tiny_cfg, seed=2, dtype="float32").forward(tiny_idx)
    l64 = ml.GPTModel(tiny_cfg, seed=2, dtype="float64").forward(tiny_idx)
    np.testing.assert_allclose(l32, l64, rtol=1e-4, atol=1e-5)


def test_same_seed_same_model_different_seed_different_model(tiny_cfg):
    a, b, c = (ml.GPTModel(tiny_cfg, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(a.params[n], b.params[n]) for n in a.params)
    assert not np.array_equal(a.params["wte.weight"], c.params["wte.weight"])


def test_dropout_only_in_training(tiny_cfg, tiny_idx):
    from dataclasses import replace

    model = ml.GPTModel(replace(tiny_cfg, drop_rate=0.5), seed=0, dtype="float64")
    model.eval()
    e1, e2 = model.forward(tiny_idx), model.forward(tiny_idx)
    np.testing.assert_array_equal(e1, e2)
    model.train()
    assert not np.allclose(model.forward(tiny_idx), e1)


@pytest.mark.parametrize("idx, error, match", [
    (np.array([[1, 2, 11]]), ValueError, "outside the vocabulary"),
    (np.array([[1, -1, 2]]), ValueError, "outside the vocabulary"),
    (np.zeros((1, 8), dtype=np.int64), ValueError, "exceeds the context length 7"),
    (np.array([[1.0, 2.0]]), TypeError, "integer"),
    (np.array([1, 2, 3]), ValueError, r"shape \(batch, time\)"),
    (np.zeros((2, 0), dtype=np.int64), ValueError, "non-empty"),
])
def test_bad_token_ids_get_clear_errors(device, tiny_cfg, idx, error, match):
    model = ml.GPTModel(tiny_cfg, device=device)
    with pytest.raises(error, match=match):
        model.forward(idx)


def test_token_ids_on_the_device_are_checked_too(device, xp, tiny_cfg):
    model = ml.GPTModel(tiny_cfg, device=device)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward(xp.asarray(np.array([[3, 11]])))


def test_backward_before_forward_is_an_error(tiny_cfg, tiny_idx):
    model = ml.GPTModel(tiny_cfg)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(np.zeros((2, 5, 11)))
    model.forward(tiny_idx, keep_cache=False)
    with pytest.raises(RuntimeError, match="keep_cache"):
        model.backward(np.zeros((2, 5, 11)))


def test_bad_configs_and_options():
    with pytest.raises(ValueError, match="divisible"):
        ml.GPTConfig(emb_dim=10, n_heads=3)
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        ml.GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="dtype"):
        ml.GPTModel(ml.GPTConfig(vocab_size=5, context_length=4, emb_dim=4, n_heads=1, n_layers=1), dtype="float16")
    with pytest.raises(Exception, match="unknown device"):
        ml.GPTModel(ml.GPTConfig(vocab_size=5, context_length=4, emb_dim=4, n_heads=1, n_layers=1), device="tpu")


def _count(cfg):
    return sum(int(np.prod(s)) for s in param_shapes(cfg).values())


@pytest.mark.parametrize("name, count", [
    ("gpt2-small", 124_439_808), ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_preset_parameter_counts(name, count):
    """The published GPT-2 sizes (Hugging Face checkpoints, LM head tied to wte)."""
    cfg = ml.GPTConfig.from_preset(name)
    assert _count(cfg) == count
    assert (cfg.vocab_size, cfg.context_length, cfg.qkv_bias, cfg.drop_rate) == (50257, 1024, True, 0.0)


def test_gpt2_small_with_two_class_head_has_124_441_346_parameters():
    model = ml.GPTModel(ml.GPTConfig.from_preset("gpt2-small"), seed=0)
    model.replace_head(2, seed=123)
    assert model.num_params() == 124_441_346
    assert model.params["h.0.attn.c_attn.weight"].shape == (768, 2304)
    assert model.n_out == 2
    logits = model.forward(np.array([[6109, 3626, 6100, 345]]), keep_cache=False)
    assert logits.shape == (1, 4, 2) and logits.dtype == np.float32


def test_positions_select_rows_and_keep_exact_gradients(device, tiny_cfg, tiny_idx):
    """forward(idx, positions=p) equals the full logits at p; its gradients are exact."""
    from minilora.gradcheck import numerical_gradient, rel_error

    model = ml.GPTModel(tiny_cfg, seed=1, dtype="float64", device=device).replace_head(3)
    positions = np.array([4, 2])
    full = to_numpy(model.forward(tiny_idx))
    picked = to_numpy(model.forward(tiny_idx, positions=positions))
    np.testing.assert_allclose(picked, full[[0, 1], positions], rtol=1e-13, atol=1e-14)
    G = model.xp.asarray(np.random.default_rng(0).standard_normal((2, 3)))
    grads = model.backward(G)

    def loss():
        return float((model.forward(tiny_idx, keep_cache=False, positions=positions) * G).sum())

    for n in ["wte.weight", "h.0.attn.c_attn.weight", "h.1.ln_1.weight", "h.1.attn.c_attn.weight",
              "h.1.attn.c_proj.bias", "h.1.mlp.c_fc.weight", "ln_f.weight", "out_head.bias"]:
        assert rel_error(grads[n], numerical_gradient(loss, model.params[n])) < 1e-7, n
    # the same gradients as the full forward with G placed at the positions
    model.forward(tiny_idx)
    G_full = np.zeros((2, 5, 3))
    G_full[[0, 1], positions] = to_numpy(G)
    full_grads = model.backward(model.xp.asarray(G_full))
    for n in grads:
        np.testing.assert_allclose(to_numpy(grads[n]), to_numpy(full_grads[n]), rtol=1e-10, atol=1e-13, err_msg=n)
    with pytest.raises(ValueError, match="positions"):
        model.forward(tiny_idx, positions=np.array([5, 0]))


def test_evaluation_forward_keeps_no_activations():
    """keep_cache=False frees each block's activations as the next block runs, so its peak
    memory stays near one block's, while training keeps every block's for backward."""
    import tracemalloc

    cfg = ml.GPTConfig(vocab_size=50, context_length=64, emb_dim=64, n_heads=4, n_layers=8)
    model = ml.GPTModel(cfg, seed=0)
    idx = np.random.default_rng(0).integers(0, 50, (4, 64))
    peaks = {}
    for keep in (True, False):
        model._cache = None
        tracemalloc.start()
        model.forward(idx, keep_cache=keep)
        peaks[keep] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[False] < peaks[True] / 3, peaks
