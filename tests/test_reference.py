"""The fast GPTModel equals the plain reference model (minilora/reference.py), the spec.

float64, random values in every parameter (so that no layernorm weight is 1 and no bias
or LoRA B is 0), odd shapes, repeated token ids; logits and every gradient compared with
the norm relative error, which must stay below 1e-12. Both sides are then broken on
purpose, to show that the comparison notices.
"""

import numpy as np
import pytest

import minilora as ml
from minilora import reference
from minilora.backend import to_numpy
from minilora.gradcheck import MODEL_TOL, check_reference, rel_error

TOL = 1e-12


def random_model(cfg, device, head=None, lora=None, seed=0):
    """A float64 GPTModel with every parameter random and every parameter trainable."""
    model = ml.GPTModel(cfg, seed=seed, dtype="float64", device=device)
    if head:
        model.replace_head(head)
    if lora:
        ml.apply_lora(model, rank=2, alpha=3, targets=lora, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, value in model.params.items():
        noise = rng.standard_normal(value.shape) * 0.3
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            noise += 1.0
        value[...] = model.xp.asarray(noise)
    model.trainable = list(model.params)  # base weights too, under LoRA: compare every gradient
    return model


def compare(model, idx, positions=None, seed=2):
    """The worst relative error between the fast model and the reference, over the logits
    and every gradient (and the names the two sides disagree on, which must be none)."""
    params = {n: to_numpy(v) for n, v in model.params.items()}
    scale = model.lora.scale if model.lora is not None else 1.0
    logits = to_numpy(model.forward(idx, positions=positions))
    ref_logits, acts = reference.forward(params, idx, model.cfg.n_heads, scale, positions)
    G = np.random.default_rng(seed).standard_normal(ref_logits.shape)
    grads = {n: to_numpy(g) for n, g in model.backward(model.xp.asarray(G)).items()}
    ref_grads, _ = reference.backward(G, params, acts, model.cfg.n_heads, scale)
    assert set(grads) == set(ref_grads) == set(model.params)
    errors = {"logits": rel_error(logits, ref_logits)}
    errors.update({n: rel_error(grads[n], ref_grads[n]) for n in grads})
    return max(errors.values()), errors


CASES = {  # name: (head classes, LoRA targets)
    "lm_head": (None, None),
    "classifier": (2, None),
    "classifier_lora_all": (2, "all"),
    "lm_head_lora_attention": (None, "attention"),
    "lm_head_lora_all": (None, "all"),  # the adapter on the tied head included
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_positions", [False, True])
def test_fast_model_equals_reference(device, tiny_cfg, case, with_positions):
    head, lora = CASES[case]
    model = random_model(tiny_cfg, device, head, lora)
    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3], [9, 9, 2, 5, 0]])  # 3 sequences: uneven shards
    positions = np.array([4, 1, 2]) if with_positions else None
    worst, errors = compare(model, idx, positions)
    assert worst < TOL, {n: e for n, e in errors.items() if e >= TOL}


def test_equal_in_one_shard_and_in_three(monkeypatch, tiny_cfg):
    """The CPU shards split the batch; the reference never does. Both splits equal it."""
    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3], [9, 9, 2, 5, 0]])
    for threads in ("1", "3"):
        monkeypatch.setenv("MINILORA_NUM_THREADS", threads)
        worst, _ = compare(random_model(tiny_cfg, "cpu", 2, "all"), idx, np.array([4, 1, 2]))
        assert worst < TOL, threads


def test_without_qkv_bias(tiny_cfg):
    cfg = ml.GPTConfig(**{**tiny_cfg.to_dict(), "qkv_bias": False})
    model = random_model(cfg, "cpu", 2, "all")
    assert "h.0.attn.c_attn.bias" not in model.params
    worst, _ = compare(model, np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]]))
    assert worst < TOL


def test_a_broken_fast_backward_no_longer_equals_the_reference(monkeypatch, tiny_cfg):
    import minilora.model

    def gelu_backward_without_the_tanh_derivative(dout, cache):
        x, t = cache
        return (dout * 0.5 * (1.0 + t),)

    model = random_model(tiny_cfg, "cpu", 2, "all")
    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])
    monkeypatch.setattr(minilora.model, "gelu_backward", gelu_backward_without_the_tanh_derivative)
    worst, errors = compare(model, idx)
    assert worst > 1e-3
    assert errors["logits"] < TOL  # the forward is untouched: only the gradients moved


def test_a_broken_reference_no_longer_equals_the_fast_model(monkeypatch, tiny_cfg):
    def layernorm_backward_without_the_mean_term(dy, x, w, mean, rstd):
        n = (x - mean) * rstd
        dn = dy * w
        dx = rstd * (dn - n * (dn * n).mean(axis=-1, keepdims=True))
        return dx, (dy * n).sum(axis=(0, 1)), dy.sum(axis=(0, 1))

    model = random_model(tiny_cfg, "cpu", 2, "all")
    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])
    monkeypatch.setattr(reference, "layernorm_backward", layernorm_backward_without_the_mean_term)
    worst, _ = compare(model, idx)
    assert worst > 1e-3


@pytest.mark.parametrize("case", ["lm_head", "classifier_lora_all"])
def test_reference_matches_finite_differences(tiny_cfg, case):
    head, lora = CASES[case]
    params = {n: to_numpy(v).copy() for n, v in random_model(tiny_cfg, "cpu", head, lora).params.items()}
    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])
    positions = np.array([4, 2]) if head else None
    result = check_reference(params, idx, tiny_cfg.n_heads, 1.5, positions, case)
    assert set(result.errors) == set(params)
    assert result.max_rel_error < MODEL_TOL, result.errors


def test_activation_gradients(tiny_cfg):
    """dacts holds the gradient of each activation: checked against the parameter
    gradients they imply (the position table's gradient is the embedding output's,
    summed over the batch) and against finite differences of one activation."""
    model = random_model(tiny_cfg, "cpu", 2, "all")
    params = {n: to_numpy(v) for n, v in model.params.items()}
    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])
    logits, acts = reference.forward(params, idx, tiny_cfg.n_heads, 1.5)
    G = np.random.default_rng(0).standard_normal(logits.shape)
    grads, dacts = reference.backward(G, params, acts, tiny_cfg.n_heads, 1.5)
    np.testing.assert_allclose(grads["wpe.weight"][:5], dacts["embedding"].sum(axis=0), rtol=1e-12)
    assert np.all(grads["wpe.weight"][5:] == 0)
    # the gradient of block 1's attention output y: perturb y by eps*u and run the rest
    # of the forward by hand from there; the change of sum(logits * G) is eps * <dy, u>
    u = np.random.default_rng(1).standard_normal(acts["h.1.attn.y"].shape)

    def loss_with_y(y):
        p, h = params, "h.1."
        x = acts[h + "x"] + reference.lora_linear_forward(p, h + "attn.c_proj", y, 1.5)
        m, _, _ = reference.layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        m = reference.gelu_forward(reference.lora_linear_forward(p, h + "mlp.c_fc", m, 1.5))
        x = x + reference.lora_linear_forward(p, h + "mlp.c_proj", m, 1.5)
        x, _, _ = reference.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])
        return float((reference.lora_linear_forward(p, "out_head", x, 1.5) * G).sum())

    # Error analysis of the central difference D(h) = (L(y + h u) - L(y - h u)) / 2h:
    # truncation h^2/6 |L'''|, measured to scale as h^2 (4e-7 relative at h = 1e-3), so ~4e-11
    # at h = 1e-5; rounding: each L = sum(logits * G) carries ~eps * S of rounding, with
    # S = sum|logits * G| ~ 18 here, and the summation order (hence the error) depends on the
    # BLAS kernel, so D(h) carries up to ~eps * S / h. At the old h = 1e-6 that is ~4e-9 against
    # |<dy, u>| ~ 0.27, i.e. 1.5e-8 relative: over a 1e-8 bound on some machines. At h = 1e-5
    # the bound below allows 100 times the rounding estimate plus the truncation, and a wrong
    # gradient (a dropped term) is off by more than 1e-2.
    h = 1e-5
    y = acts["h.1.attn.y"]
    numeric = (loss_with_y(y + h * u) - loss_with_y(y - h * u)) / (2 * h)
    assert loss_with_y(y) == pytest.approx(float((logits * G).sum()), rel=1e-12)
    S = float(np.abs(logits * G).sum())
    rounding, truncation = 100 * np.finfo(np.float64).eps * S / h, 1e-9
    analytic = float((dacts["h.1.attn.y"] * u).sum())
    assert abs(analytic - numeric) <= rounding + truncation * abs(numeric), (analytic, numeric)


def test_reference_cross_entropy_equals_the_layer():
    from minilora.layers import cross_entropy_backward, cross_entropy_forward

    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((6, 5)) * 3, np.array([0, 4, 4, 1, 2, 4])
    loss, cache = cross_entropy_forward(logits, targets)
    assert float(reference.cross_entropy_forward(logits, targets)) == pytest.approx(float(loss), rel=1e-14)
    np.testing.assert_allclose(reference.cross_entropy_backward(logits, targets),
                               cross_entropy_backward(1.0, cache)[0], rtol=1e-13, atol=1e-16)


def test_lora_on_some_linears_with_the_base_frozen(tiny_cfg):
    """The appendix E situation for a subset: only the adapters train. The gradients are
    the reference's, and the frozen linears without an adapter keep no input for a dW
    they never compute (less memory held between forward and backward)."""
    import tracemalloc

    model = random_model(tiny_cfg, "cpu", 2, "attention")  # adapters on Q and V only
    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])
    params = {n: to_numpy(v) for n, v in model.params.items()}
    model.trainable = model.lora.param_names
    logits = model.forward(idx)
    G = np.random.default_rng(0).standard_normal(logits.shape)
    grads = model.backward(G)
    ref_logits, acts = reference.forward(params, idx, tiny_cfg.n_heads, model.lora.scale)
    ref_grads, _ = reference.backward(G, params, acts, tiny_cfg.n_heads, model.lora.scale)
    assert set(grads) == set(model.lora.param_names)
    assert max(rel_error(grads[n], ref_grads[n]) for n in grads) < TOL

    def held_after_forward(trainable):
        model.trainable = trainable
        model._cache = None
        tracemalloc.start()
        model.forward(idx)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        model._cache = None
        return held

    # inputs let go per block: attn.c_proj's and mlp.c_fc's (B, T, C), mlp.c_proj's (B, T, 4C);
    # and the frozen head's (B, T, C)
    B, T, C = *idx.shape, tiny_cfg.emb_dim
    let_go = (tiny_cfg.n_layers * 6 + 1) * B * T * C * 8
    held_after_forward(list(model.params))  # warm: the first forward allocates for good
    assert held_after_forward(list(model.params)) - held_after_forward(model.lora.param_names) >= let_go


def test_changing_what_trains_between_forward_and_backward_is_an_error(tiny_cfg):
    model = random_model(tiny_cfg, "cpu", 2, "attention")
    model.trainable = model.lora.param_names
    logits = model.forward(np.array([[1, 3, 3, 0, 10]]))
    model.trainable = list(model.params)
    with pytest.raises(RuntimeError, match="changed between forward and backward"):
        model.backward(np.ones_like(logits))
