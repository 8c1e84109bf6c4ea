"""Each layer: its backward against finite differences, its forward against the math,
and proof that the checker fails a deliberately broken backward."""

import math

import numpy as np
import pytest

from minilora import gradcheck, layers
from minilora.backend import to_numpy
from minilora.gradcheck import LAYER_TOL, check_layer, layer_checks

LAYER_NAMES = ["embedding", "linear", "layernorm", "gelu", "dropout", "attention",
               "attention_dropout", "cross_entropy", "lora_linear"]


@pytest.fixture
def results(xp):
    return {c.name: c.run() for c in layer_checks(xp, seed=0)}


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_backward_matches_finite_differences(results, name):
    r = results[name]
    assert r.max_rel_error < LAYER_TOL, r.errors


@pytest.mark.parametrize("seed", [1, 2])
def test_checks_hold_for_other_random_inputs(xp, seed):
    for r in (c.run() for c in layer_checks(xp, seed=seed)):
        assert r.passed, (r.name, r.errors)


# ---------------------------------------------------------------- broken backwards must fail


def _layernorm_backward_without_mean_term(dout, cache):
    x, w, mean, rstd = cache
    n = (x - mean) * rstd
    dn = dout * w
    dx = rstd * (dn - n * (dn * n).mean(axis=-1, keepdims=True))  # dropped: - mean(dn)
    return dx, (dout * n).reshape(-1, x.shape[-1]).sum(0), dout.reshape(-1, x.shape[-1]).sum(0)


def _embedding_backward_without_accumulation(dout, cache):
    idx, V, Tmax = cache
    B, T, C = dout.shape
    dwte = np.zeros((V, C))
    dwte[idx.reshape(-1)] = dout.reshape(-1, C)  # repeated ids keep one write: wrong
    dwpe = np.zeros((Tmax, C))
    dwpe[:T] = dout.sum(0)
    return dwte, dwpe


def _softmax_backward_without_row_sum(dout, cache):
    q, k, v, att, att_d, drop_cache, scale, _ = cache
    B, NH, T, hs = q.shape
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    datt = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    dqk = att * datt * scale  # dropped: - sum_j(datt * att)
    dq, dk = dqk @ k, dqk.transpose(0, 1, 3, 2) @ q
    d = np.stack([dq, dk, dv], axis=2).transpose(0, 3, 2, 1, 4)  # [B, T, 3, NH, hs]
    return (d.reshape(B, T, 3 * NH * hs),)


def test_checker_fails_broken_layernorm(rng):
    r = check_layer("layernorm", layers.layernorm_forward, _layernorm_backward_without_mean_term,
                    dict(x=rng.standard_normal((2, 5, 8)) + 1.0, w=rng.standard_normal(8), b=rng.standard_normal(8)),
                    dict(x=0))
    assert not r.passed and r.max_rel_error > 1e-3


def test_checker_fails_embedding_without_scatter_add(rng):
    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])
    r = check_layer("embedding", lambda wte, wpe: layers.embedding_forward(idx, wte, wpe),
                    _embedding_backward_without_accumulation,
                    dict(wte=rng.standard_normal((11, 6)), wpe=rng.standard_normal((7, 6))), dict(wte=0))
    assert not r.passed and r.max_rel_error > 1e-3


def test_checker_fails_softmax_without_row_sum(rng):
    r = check_layer("attention", lambda qkv: layers.attention_forward(qkv, 2), _softmax_backward_without_row_sum,
                    dict(qkv=rng.standard_normal((2, 5, 24))), dict(qkv=0))
    assert not r.passed and r.max_rel_error > 1e-3


def test_checker_fails_when_model_backward_is_broken(monkeypatch, tiny_cfg):
    """The whole-model check catches a broken layer too (gelu derivative missing a term)."""
    import minilora.model as model_mod

    def broken_gelu_backward(dout, cache):
        x, t = cache
        return (dout * 0.5 * (1.0 + t),)  # dropped: the x * sech^2 term

    monkeypatch.setattr(model_mod, "gelu_backward", broken_gelu_backward)
    r = gradcheck.model_checks("cpu")[0].run()
    assert r.name == "gpt2" and not r.passed


# ---------------------------------------------------------------- forwards against the math


def test_gelu_tanh_form_matches_formula(xp):
    x = np.linspace(-6, 6, 101)
    y, _ = layers.gelu_forward(xp.asarray(x))
    expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-14, atol=1e-15)


def test_layernorm_normalizes(xp, rng):
    x = xp.asarray(rng.standard_normal((3, 4, 10)) * 5 + 2)
    y, _ = layers.layernorm_forward(x, xp.ones(10), xp.zeros(10))
    y = to_numpy(y)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-5)  # eps 1e-5 against a variance ~25


def test_attention_is_causal(xp, rng):
    """Changing the token at position t changes no output before t."""
    qkv = rng.standard_normal((2, 6, 24))
    y1, _ = layers.attention_forward(xp.asarray(qkv), 2)
    qkv[:, 4] += 10.0
    y2, _ = layers.attention_forward(xp.asarray(qkv), 2)
    y1, y2 = to_numpy(y1), to_numpy(y2)
    np.testing.assert_array_equal(y1[:, :4], y2[:, :4])
    assert np.abs(y1[:, 4:] - y2[:, 4:]).max() > 1e-3


def test_attention_matches_plain_per_head_loop(rng):
    B, T, C, NH = 2, 5, 8, 2
    qkv = rng.standard_normal((B, T, 3 * C))
    y, _ = layers.attention_forward(qkv, NH)
    q, k, v = np.split(qkv, 3, axis=-1)
    hs = C // NH
    out = np.zeros((B, T, C))
    for b in range(B):
        for h in range(NH):
            sl = slice(h * hs, (h + 1) * hs)
            for t in range(T):
                s = q[b, t, sl] @ k[b, : t + 1, sl].T / math.sqrt(hs)
                w = np.exp(s - s.max())
                out[b, t, sl] = (w / w.sum()) @ v[b, : t + 1, sl]
    np.testing.assert_allclose(y, out, rtol=1e-12, atol=1e-14)


def test_one_query_attention_is_that_row_of_full_attention(xp, rng):
    qkv = xp.asarray(rng.standard_normal((3, 6, 24)))
    query_pos = xp.asarray(np.array([5, 0, 2]))
    full, _ = layers.attention_forward(qkv, 2)
    one, _ = layers.attention_forward(qkv, 2, query_pos=query_pos)
    np.testing.assert_allclose(to_numpy(one), to_numpy(full)[[0, 1, 2], [5, 0, 2]], rtol=1e-13, atol=1e-14)


def test_gradient_check_catches_a_misplaced_query_gradient(rng):
    """dq written at position 0 instead of the query's own row must fail the check."""

    def misplaced(dout, cache):
        (dqkv,) = layers.attention_backward(dout, cache)
        query_pos = cache[-1]
        B, C = dout.shape
        dq = dqkv[np.arange(B), query_pos, :C].copy()
        dqkv[np.arange(B), query_pos, :C] = 0.0
        dqkv[:, 0, :C] = dq
        return (dqkv,)

    query_pos = np.array([3, 2])
    forward = lambda qkv: layers.attention_forward(qkv, 2, query_pos=query_pos)  # noqa: E731
    qkv = dict(qkv=rng.standard_normal((2, 5, 24)))
    assert check_layer("attention_one_query", forward, layers.attention_backward, qkv, dict(qkv=0)).passed
    r = check_layer("attention_one_query", forward, misplaced, qkv, dict(qkv=0))
    assert not r.passed, r.max_rel_error


def test_softmax_and_cross_entropy_are_stable_for_huge_logits(xp):
    logits = xp.asarray(np.array([[1000.0, 0.0, -1000.0], [0.0, 1e4, 0.0]], dtype=np.float32))
    loss, cache = layers.cross_entropy_forward(logits, xp.asarray(np.array([0, 1])))
    assert float(loss) == 0.0
    (d,) = layers.cross_entropy_backward(1.0, cache)
    assert np.isfinite(to_numpy(d)).all()
    qkv = xp.asarray(np.full((1, 3, 6), 1e4, dtype=np.float32))
    y, _ = layers.attention_forward(qkv, 1)
    assert np.isfinite(to_numpy(y)).all()


def test_cross_entropy_is_mean_negative_log_softmax(rng):
    z = rng.standard_normal((7, 4))
    y = rng.integers(0, 4, 7)
    loss, _ = layers.cross_entropy_forward(z, y)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert float(loss) == pytest.approx(-logp[np.arange(7), y].mean(), rel=1e-14)


def test_linear_skips_frozen_gradients(rng):
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    _, cache = layers.linear_forward(x, w, b)
    dx, dw, db = layers.linear_backward(np.ones((2, 3, 5)), cache, need_dw=False, need_db=False)
    assert dw is None and db is None and dx.shape == x.shape


def test_dropout_is_identity_at_eval_and_unbiased_in_training(rng):
    x = np.ones((200, 300))
    y, cache = layers.dropout_forward(x, 0.3, None)
    assert y is x and cache is None
    y, mask = layers.dropout_forward(x, 0.3, np.random.default_rng(0))
    assert abs(y.mean() - 1.0) < 0.02 and abs((y == 0).mean() - 0.3) < 0.01


@pytest.mark.parametrize("name", ["linear", "layernorm", "gelu", "attention"])
def test_float32_stays_float32(xp, rng, name):
    f32 = lambda *s: xp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    fwd, bwd, args = {
        "linear": (layers.linear_forward, layers.linear_backward, (f32(2, 3, 4), f32(4, 5), f32(5))),
        "layernorm": (layers.layernorm_forward, layers.layernorm_backward, (f32(2, 3, 4), f32(4), f32(4))),
        "gelu": (layers.gelu_forward, layers.gelu_backward, (f32(2, 3, 4),)),
        "attention": (lambda q: layers.attention_forward(q, 2), layers.attention_backward, (f32(2, 3, 12),)),
    }[name]
    out, cache = fwd(*args)
    assert out.dtype == np.float32
    for g in bwd(xp.ones_like(out), cache):
        assert g.dtype == np.float32
