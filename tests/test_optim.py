"""AdamW against the published update rule (and torch.optim.AdamW when installed),
clipping, schedules, and exact resume from a state_dict."""

import math

import numpy as np
import pytest

import minilora as ml


class ParamsOnly:
    """The one thing AdamW needs from a model: a params dict (plus device and dtype)."""

    def __init__(self, params, device="cpu"):
        self.params = params
        self.device, self.dtype = device, next(iter(params.values())).dtype


def hand_adamw(p, grads, lr, b1, b2, eps, wd):
    """Loshchilov & Hutter's AdamW as torch documents it, one loop, plain floats."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    p = p.copy()
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_matches_the_published_rule(rng):
    p0 = rng.standard_normal((5, 3))
    grads = [rng.standard_normal((5, 3)) * 10 ** k for k in (-3, 0, 1, -1, 2)]
    model = ParamsOnly({"w": p0.copy()})
    opt = ml.AdamW(model, lr=8e-4, weight_decay=0.1)
    for g in grads:
        opt.step({"w": g.copy()})
    expected = hand_adamw(p0, grads, 8e-4, 0.9, 0.999, 1e-8, 0.1)
    np.testing.assert_allclose(model.params["w"], expected, rtol=1e-14, atol=1e-15)


def test_adamw_matches_torch(rng):
    torch = pytest.importorskip("torch")
    p0 = rng.standard_normal((7, 4))
    q0 = rng.standard_normal(3)
    model = ParamsOnly({"a": p0.copy(), "b": q0.copy()})
    opt = ml.AdamW(model, lr=5e-2, weight_decay=0.1)
    ta, tb = torch.tensor(p0, requires_grad=True), torch.tensor(q0, requires_grad=True)
    topt = torch.optim.AdamW([ta, tb], lr=5e-2, weight_decay=0.1)
    for _ in range(6):
        ga, gb = rng.standard_normal((7, 4)), rng.standard_normal(3)
        opt.step({"a": ga, "b": gb})
        ta.grad, tb.grad = torch.tensor(ga), torch.tensor(gb)
        topt.step()
    np.testing.assert_allclose(model.params["a"], ta.detach().numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(model.params["b"], tb.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_float32_parameters_stay_float32(rng):
    model = ParamsOnly({"w": rng.standard_normal((4, 4)).astype(np.float32)})
    opt = ml.AdamW(model, lr=1e-3)
    opt.step({"w": rng.standard_normal((4, 4)).astype(np.float32)})
    assert model.params["w"].dtype == np.float32 and opt.m["w"].dtype == np.float32


def test_clip_grad_norm_matches_torch_rule(rng):
    grads = {"a": rng.standard_normal((3, 3)) * 5, "b": rng.standard_normal(4) * 5}
    norm = math.sqrt(sum((g ** 2).sum() for g in grads.values()))
    expected = {n: g * (1.0 / (norm + 1e-6)) for n, g in grads.items()}
    assert float(ml.clip_grad_norm(grads, 1.0)) == pytest.approx(norm)
    for n in grads:
        np.testing.assert_allclose(grads[n], expected[n], rtol=1e-14)
    small = {"a": np.full(3, 1e-3)}
    ml.clip_grad_norm(small, 1.0)
    np.testing.assert_array_equal(small["a"], np.full(3, 1e-3))  # below the max: untouched


def test_schedules():
    s = ml.warmup_cosine_schedule(1.0, warmup_steps=4, total_steps=14, min_lr=0.1)
    assert [s(t) for t in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert s(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    assert ml.constant_schedule(3e-4)(1000) == 3e-4
    opt = ml.AdamW(ParamsOnly({"w": np.zeros(2)}), lr=s)
    assert opt.lr == 0.25


def test_state_dict_resumes_exactly(rng):
    p0 = rng.standard_normal((6, 2))
    grads = [rng.standard_normal((6, 2)) for _ in range(6)]
    straight = ParamsOnly({"w": p0.copy()})
    opt = ml.AdamW(straight, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    for g in grads:
        opt.step({"w": g.copy()})
    first = ParamsOnly({"w": p0.copy()})
    opt1 = ml.AdamW(first, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    for g in grads[:3]:
        opt1.step({"w": g.copy()})
    state = opt1.state_dict()
    resumed = ParamsOnly({"w": first.params["w"].copy()})
    opt2 = ml.AdamW(resumed, lr=1e-2)
    opt2.load_state_dict(state)
    for g in grads[3:]:
        opt2.step({"w": g.copy()})
    np.testing.assert_array_equal(resumed.params["w"], straight.params["w"])


def test_bad_state_and_grads_are_clear_errors():
    opt = ml.AdamW(ParamsOnly({"w": np.zeros(2)}))
    with pytest.raises(KeyError, match="unknown parameters"):
        opt.step({"v": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({"step": 1, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                             "max_grad_norm": None, "m": {"w": np.zeros(3)}, "v": {"w": np.zeros(3)}})
