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
    n, w, mean, rstd = cache
    dn = dout * w
    dx = rstd * (dn - n * (dn * n).mean(axis=-1, keepdims=True))  # dropped: - mean(dn)
    return dx, (dout * n).reshape(-1, n.shape[-1]).sum(0), dout.reshape(-1, n.shape[-1]).sum(0)


def _embedding_backward_without_accumulation(dout, cache):
    idx, V, Tmax = cache
    B, T, C = dout.shape
    dwte = np.zeros((V, C))
    dwte[idx.reshape(-1)] = dout.reshape(-1, C)  # repeated ids keep one write: wrong
    dwpe = np.zeros((Tmax, C))
    dwpe[:T] = dout.sum(0)
    return dwte, dwpe


def _softmax_backward_without_row_sum(dout, cache):
    q_s, k, v, att, att_d, drop_cache, scale, _ = cache  # q_s = scale * q
    B, NH, T, hs = q_s.shape
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    datt = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    dpre = att * datt  # dropped: - sum_j(datt * att)
    dq, dk = scale * (dpre @ k), dpre.transpose(0, 1, 3, 2) @ q_s
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
        x, q = cache  # q = 0.5 (1 + t)
        return (dout * q,)  # dropped: the x * sech^2 term

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


# ---------------------------------------------------------------- what the fast layers keep


def test_the_causal_mask_is_one_shared_read_only_constant():
    """Built once per length, dtype and array module and handed out read-only; the query
    rows are its rows; only the last 8 lengths are kept."""
    full = layers.causal_mask(6, np.float32, np)
    want = np.triu(np.full((6, 6), -np.inf, np.float32), k=1)[None, None]
    np.testing.assert_array_equal(full, want)
    assert full.dtype == np.float32 and full.shape == (1, 1, 6, 6) and full.flags.c_contiguous
    assert layers.causal_mask(6, np.float32, np) is full  # not rebuilt
    assert not full.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        full[0, 0, 0, 1] = 0.0
    rows = layers.causal_mask(6, np.float32, np, query_pos=np.array([5, 0, 2]))
    np.testing.assert_array_equal(rows, want[0, 0][[5, 0, 2]][:, None, None])
    assert rows.shape == (3, 1, 1, 6) and layers.causal_mask(6, np.float64, np).dtype == np.float64
    for T in range(100, 108):  # 8 other lengths: the mask of 6 is dropped, and made again
        np.testing.assert_array_equal(layers.causal_mask(T, np.float32, np)[0, 0],
                                      np.triu(np.full((T, T), -np.inf, np.float32), k=1))
    assert sum(1 for key in layers._CONSTANTS if key[0] == "causal_mask") <= 8
    again = layers.causal_mask(6, np.float32, np)
    assert again is not full
    np.testing.assert_array_equal(again, want)


def test_backwards_leave_their_caches_alone(xp, rng):
    """A backward never writes into its cache or its dout: the same backward twice gives the
    same gradients (layernorm's n, gelu's q, attention's q_s and att, LoRA's s xa are read,
    never reused as buffers)."""
    from minilora.lora import lora_backward, lora_forward, lora_stack_backward, lora_stack_forward

    a = lambda *s: xp.asarray(rng.standard_normal(s))  # noqa: E731
    cases = [
        (lora_forward(a(2, 5, 8), a(8, 3), a(3, 6), 1.5)[1], lora_backward, (2, 5, 6)),
        (lora_stack_forward(a(2, 5, 8), [a(8, 3), a(8, 3)], [a(3, 6), a(3, 6)], 1.5)[1], lora_stack_backward,
         (2, 5, 2, 6)),
        (layers.layernorm_forward(a(2, 5, 8), a(8), a(8))[1], layers.layernorm_backward, (2, 5, 8)),
        (layers.gelu_forward(a(2, 5, 8))[1], layers.gelu_backward, (2, 5, 8)),
        (layers.attention_forward(a(2, 5, 24), 2)[1], layers.attention_backward, (2, 5, 8)),
        (layers.attention_forward(a(2, 5, 24), 2, query_pos=xp.asarray(np.array([4, 1])))[1],
         layers.attention_backward, (2, 8)),
    ]
    for cache, backward, shape in cases:
        before = [to_numpy(c).copy() if hasattr(c, "shape") else c for c in cache]
        dout = a(*shape)
        dout_before = to_numpy(dout).copy()
        first = [to_numpy(g) for g in _flat(backward(dout, cache))]
        np.testing.assert_array_equal(to_numpy(dout), dout_before)
        for b, c in zip(before, cache):
            if hasattr(c, "shape"):
                np.testing.assert_array_equal(to_numpy(c), b)
        for g, h in zip(first, (to_numpy(g) for g in _flat(backward(dout, cache))), strict=True):
            np.testing.assert_array_equal(g, h)


def _flat(grads):
    """A backward's gradients as one list (the stacked LoRA's dAs, dBs are lists), Nones left out."""
    return [g for item in grads for g in (item if isinstance(item, list) else [item]) if g is not None]


def test_attention_caches_q_scaled(rng):
    """q is kept as scale * q: the scale rode on the copy of q, not on the scores."""
    qkv = rng.standard_normal((2, 5, 24))
    _, (q_s, k, v, *_, scale, _) = layers.attention_forward(qkv, 2)
    heads = lambda a: a.reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)  # noqa: E731
    assert scale == 0.5
    np.testing.assert_array_equal(q_s, scale * heads(qkv[..., :8]))
    np.testing.assert_array_equal(k, heads(qkv[..., 8:16]))
    np.testing.assert_array_equal(v, heads(qkv[..., 16:]))


def test_gelu_agrees_with_the_reference_in_float32():
    """The folded constants and the cached q = 0.5 (1 + t) round differently from
    reference.gelu_forward / gelu_backward: within 32 float32 eps of the exact value's scale
    max(|value|, 1), |x| up to 10 (measured: y 1.3, dy/dx 16.4, near x = 5 where q is near
    1 and 1 - q keeps fewer bits than 1 - t; the reference in float32: 1.3 and 10.3)."""
    from minilora import reference

    x32 = np.linspace(-10, 10, 20001).astype(np.float32)
    x = x32.astype(np.float64)  # the same inputs, exactly
    y, cache = layers.gelu_forward(x32)
    (d,) = layers.gelu_backward(np.ones_like(x32), cache)
    assert y.dtype == d.dtype == np.float32
    eps = np.finfo(np.float32).eps
    # the scale of a value: 1 near the kink, |x| where y ~ x
    for got, want in ((y, reference.gelu_forward(x)), (d, reference.gelu_backward(np.ones_like(x), x))):
        err = np.abs(got - want) / np.maximum(np.abs(want), 1.0)
        assert err.max() < 32 * eps, err.max() / eps


def _steady_counts():
    """Operations per call of each layer function, with every shared constant made."""
    from minilora.opcount import Counted, OpCounter

    r = np.random.default_rng(0)
    c = lambda *s: r.standard_normal(s).view(Counted)  # noqa: E731
    qkv, query_pos = c(2, 5, 24), np.array([3, 1])
    layers.attention_forward(qkv, 2), layers.attention_forward(qkv, 2, query_pos=query_pos)  # the constants
    counts = {}

    def count(name, fn):
        with OpCounter() as ops:
            out = fn()
        counts[name] = ops.total
        return out

    _, cache = count("layernorm_forward", lambda: layers.layernorm_forward(c(2, 5, 8), c(8), c(8)))
    count("layernorm_backward", lambda: layers.layernorm_backward(c(2, 5, 8), cache, need_dparams=False))
    _, cache = count("gelu_forward", lambda: layers.gelu_forward(c(2, 5, 32)))
    count("gelu_backward", lambda: layers.gelu_backward(c(2, 5, 32), cache))
    _, cache = count("attention_forward", lambda: layers.attention_forward(qkv, 2))
    count("attention_backward", lambda: layers.attention_backward(c(2, 5, 8), cache))
    _, cache = count("attention_forward(query_pos)", lambda: layers.attention_forward(qkv, 2, query_pos=query_pos))
    count("attention_backward(query_pos)", lambda: layers.attention_backward(c(2, 8), cache))
    from minilora.lora import lora_backward, lora_forward

    for s in (1, 1.5):  # s = 1 (the book's alpha = r) multiplies nothing
        _, cache = count(f"lora_forward(s={s})", lambda: lora_forward(c(2, 5, 8), c(8, 3), c(3, 6), s))
        count(f"lora_backward(s={s})", lambda: lora_backward(c(2, 5, 6), cache))
    return counts


def test_the_layers_operation_counts_per_call():
    """The kernels a GPU launches per call (issue 21): a change that adds one shows here.
    The causal mask and the q/k/v scale are shared constants, no operation of a steady step."""
    assert _steady_counts() == {
        "layernorm_forward": 9, "layernorm_backward": 8, "gelu_forward": 8, "gelu_backward": 9,
        "attention_forward": 10, "attention_backward": 10,
        "attention_forward(query_pos)": 12, "attention_backward(query_pos)": 12,
        "lora_forward(s=1)": 2, "lora_backward(s=1)": 4, "lora_forward(s=1.5)": 3, "lora_backward(s=1.5)": 5,
    }
