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


# ---------------------------------------------------------------- flat buffers


def per_tensor_adamw(params, steps, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, fresh_moments=None):
    """The update tensor by tensor, as the optimizer ran it before its flat buffers:
    each step updates the tensors its gradient dict names. fresh_moments: {step index:
    names whose moments restart from zero before that step}."""
    params = {n: p.copy() for n, p in params.items()}
    m = {n: np.zeros_like(p) for n, p in params.items()}
    v = {n: np.zeros_like(p) for n, p in params.items()}
    for t, grads in enumerate(steps, start=1):
        for n in (fresh_moments or {}).get(t - 1, ()):
            m[n][...] = v[n][...] = 0.0
        for n, g in grads.items():
            p = params[n]
            p *= 1.0 - lr * wd
            m[n] *= b1
            m[n] += (1.0 - b1) * g
            v[n] *= b2
            v[n] += (1.0 - b2) * (g * g)
            denom = np.sqrt(v[n])
            denom /= math.sqrt(1.0 - b2 ** t)
            denom += eps
            p -= lr / (1.0 - b1 ** t) * (m[n] / denom)
    return params


@pytest.mark.parametrize("chunk", [4, 1 << 16])  # the CPU's pieces of the flat buffer: many, or one
def test_flat_update_is_the_per_tensor_update_bit_for_bit(rng, monkeypatch, chunk):
    """Tensors of several shapes and two dtypes; the set of trained names changes between
    steps (repacking), and one parameter is replaced by a new array (as load_adapter or
    replace_head do): the optimizer follows the new array, whose moments start from zero."""
    monkeypatch.setattr(ml.optim, "CPU_CHUNK", chunk)
    start = {"a": rng.standard_normal((5, 3)), "b": rng.standard_normal(7), "c": rng.standard_normal((2, 2, 3)),
             "h": rng.standard_normal((4, 2)).astype(np.float32)}
    names = [["a", "b", "c", "h"], ["a", "b", "c", "h"], ["a", "c"], ["a", "b", "c", "h"], ["b", "h"]]
    steps = [{n: rng.standard_normal(start[n].shape).astype(start[n].dtype) for n in ns} for ns in names]
    model = ParamsOnly({n: p.copy() for n, p in start.items()})
    opt = ml.AdamW(model, lr=1e-2, weight_decay=0.1)
    for k, grads in enumerate(steps):
        if k == 1:
            model.params["c"] = model.params["c"].copy()  # a new array: the optimizer must follow it
        opt.step({n: g.copy() for n, g in grads.items()})
    expected = per_tensor_adamw(start, steps, lr=1e-2, fresh_moments={1: ["c"]})
    for n in start:
        np.testing.assert_array_equal(model.params[n], expected[n], err_msg=n)
        assert model.params[n].dtype == start[n].dtype


def test_a_new_tensor_of_another_shape_under_a_trained_name(rng):
    """replace_head with another class count, or a new adapter of another rank, after
    steps: the new tensor trains from fresh moments."""
    model = ParamsOnly({"head": rng.standard_normal((4, 2))})
    opt = ml.AdamW(model, lr=1e-2)
    opt.step({"head": rng.standard_normal((4, 2))})
    model.params["head"] = start = rng.standard_normal((4, 3))
    g = rng.standard_normal((4, 3))
    opt.step({"head": g})
    assert opt.m["head"].shape == (4, 3)
    np.testing.assert_allclose(opt.m["head"], 0.1 * g, rtol=1e-15)  # (1 - b1) g: it started from zero
    assert not np.array_equal(model.params["head"], start)


def test_trained_tensors_are_views_of_one_buffer_per_dtype(rng):
    model = ParamsOnly({"a": rng.standard_normal((5, 3)), "b": rng.standard_normal(7), "frozen": np.zeros(2)})
    opt = ml.AdamW(model, lr=1e-3)
    opt.step({"a": rng.standard_normal((5, 3)), "b": rng.standard_normal(7)})
    a, b = model.params["a"], model.params["b"]
    assert a.shape == (5, 3) and b.shape == (7,) and a.base is not None and a.base is b.base
    assert a.base.size == 15 + 7 and model.params["frozen"].base is None  # only what trains is packed
    assert opt.m["a"].base is opt.m["b"].base and opt.m["a"].shape == (5, 3)
    assert set(opt.state_dict()["m"]) == {"a", "b"}


def test_step_leaves_the_callers_gradients_alone(rng):
    model = ParamsOnly({"a": rng.standard_normal((5, 3))})
    grads = {"a": rng.standard_normal((5, 3)) * 100}
    before = grads["a"].copy()
    norm = ml.AdamW(model, lr=1e-3, max_grad_norm=1.0).step(grads)
    assert float(norm) == pytest.approx(np.linalg.norm(before))
    np.testing.assert_array_equal(grads["a"], before)


def test_clipped_flat_update_matches_clipping_tensor_by_tensor(rng):
    start = {"a": rng.standard_normal((5, 3)), "b": rng.standard_normal(7)}
    steps = [{n: rng.standard_normal(p.shape) * 10 for n, p in start.items()} for _ in range(4)]
    model = ParamsOnly({n: p.copy() for n, p in start.items()})
    opt = ml.AdamW(model, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    clipped = []
    for grads in steps:
        opt.step({n: g.copy() for n, g in grads.items()})
        copy = {n: g.copy() for n, g in grads.items()}
        ml.clip_grad_norm(copy, 1.0)
        clipped.append(copy)
    expected = per_tensor_adamw(start, clipped, lr=1e-2)
    for n in start:
        np.testing.assert_allclose(model.params[n], expected[n], rtol=1e-14, atol=1e-16)


def test_loading_a_state_into_an_optimizer_that_has_stepped(rng):
    """load_state_dict replaces the moments the flat buffers hold: the next steps use the loaded ones."""
    start = {"a": rng.standard_normal((5, 3)), "b": rng.standard_normal(7)}
    steps = [{n: rng.standard_normal(p.shape) for n, p in start.items()} for _ in range(5)]
    model = ParamsOnly({n: p.copy() for n, p in start.items()})
    opt = ml.AdamW(model, lr=1e-2)
    opt.step(steps[0])
    saved_state, saved_params = opt.state_dict(), {n: p.copy() for n, p in model.params.items()}
    for g in steps[1:3]:  # wander off, then go back to the saved point
        opt.step(g)
    opt.load_state_dict(saved_state)
    for n, p in saved_params.items():
        model.params[n][...] = p
    for g in steps[1:]:
        opt.step(g)
    straight = ParamsOnly({n: p.copy() for n, p in start.items()})
    opt2 = ml.AdamW(straight, lr=1e-2)
    for g in steps:
        opt2.step(g)
    for n in start:
        np.testing.assert_array_equal(model.params[n], straight.params[n])
