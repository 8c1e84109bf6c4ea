"""The masked token-level cross-entropy (ignore_index -100, mean over the counted rows):
finite differences, a broken variant, the unmasked loss on the counted rows, the
reference, torch when installed, and the clear errors."""

import numpy as np
import pytest

from minilora import reference
from minilora.backend import to_numpy
from minilora.gradcheck import LAYER_TOL, check_layer
from minilora.layers import (cross_entropy_backward, cross_entropy_forward, masked_cross_entropy_backward,
                             masked_cross_entropy_forward)

IGNORE = -100


def batch(xp, seed=0):
    """Logits (2, 5, 7) and targets with ignored positions and repeated classes."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((2, 5, 7)) * 2.0
    targets = np.array([[3, 3, 0, IGNORE, IGNORE], [6, IGNORE, 2, 2, 3]])
    return xp.asarray(logits), xp.asarray(targets)


def test_gradient_matches_finite_differences(xp):
    logits, targets = batch(xp)
    r = check_layer("masked_cross_entropy", lambda logits: masked_cross_entropy_forward(logits, targets),
                    lambda G, cache: masked_cross_entropy_backward(float(G), cache),
                    dict(logits=logits), dict(logits=0))
    assert r.passed and r.max_rel_error < LAYER_TOL, r.max_rel_error


def test_dividing_by_n_instead_of_the_count_fails_the_check(xp):
    logits, targets = batch(xp)

    def by_n(dloss, cache):  # the mean over all N rows: 10 where the loss divides by 7
        (d,) = masked_cross_entropy_backward(dloss, cache)
        return (d * (cache[3] / targets.size),)

    r = check_layer("masked_cross_entropy_by_n", lambda logits: masked_cross_entropy_forward(logits, targets),
                    lambda G, cache: by_n(float(G), cache), dict(logits=logits), dict(logits=0))
    assert not r.passed and r.max_rel_error > 1e-2


def test_a_gradient_on_the_ignored_rows_fails_the_check(xp):
    logits, targets = batch(xp)
    ignored = (targets.reshape(-1) == IGNORE)[:, None]

    def leaky(dloss, cache):  # the ignored rows given the softmax / M they would have as counted rows
        probs, M = cache[0].copy(), cache[3]
        (d,) = masked_cross_entropy_backward(dloss, cache)
        return (d + (ignored * probs * (dloss / M)).reshape(d.shape),)

    r = check_layer("masked_cross_entropy_leaky", lambda logits: masked_cross_entropy_forward(logits, targets),
                    lambda G, cache: leaky(float(G), cache), dict(logits=logits), dict(logits=0))
    assert not r.passed and r.max_rel_error > 1e-2


def test_equals_the_unmasked_loss_on_the_counted_rows_alone(xp):
    logits, targets = batch(xp)
    loss, cache = masked_cross_entropy_forward(logits, targets)
    (d,) = masked_cross_entropy_backward(1.0, cache)
    flat, y = to_numpy(logits).reshape(-1, 7), to_numpy(targets).reshape(-1)
    keep = y != IGNORE
    ref_loss, ref_cache = cross_entropy_forward(flat[keep], y[keep])
    (ref_d,) = cross_entropy_backward(1.0, ref_cache)
    # The softmax is the same float64 operations row by row (measured: bitwise equal); the
    # loss sums log-sum-exp and target logit in another order, ~eps * |terms| / loss ~ 3e-16.
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-14)
    d = to_numpy(d).reshape(-1, 7)
    np.testing.assert_allclose(d[keep], ref_d, rtol=1e-14, atol=0)
    assert np.all(d[~keep] == 0.0)  # exactly zero: no loss term, no gradient
    assert d.shape == (10, 7)


def test_equals_the_reference():
    logits, targets = batch(np)
    flat, y = logits.reshape(-1, 7), targets.reshape(-1)
    loss, cache = masked_cross_entropy_forward(flat, y)
    assert float(loss) == pytest.approx(float(reference.masked_cross_entropy_forward(flat, y)), rel=1e-14)
    np.testing.assert_allclose(masked_cross_entropy_backward(1.0, cache)[0],
                               reference.masked_cross_entropy_backward(flat, y), rtol=1e-13, atol=1e-16)


def test_equals_torch_ignore_index():
    torch = pytest.importorskip("torch")
    logits, targets = batch(np, seed=3)
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(z.flatten(0, 1), torch.tensor(targets).flatten(), ignore_index=IGNORE)
    t_loss.backward()
    loss, cache = masked_cross_entropy_forward(logits, targets)
    (d,) = masked_cross_entropy_backward(1.0, cache)
    assert float(loss) == pytest.approx(t_loss.item(), rel=1e-12)
    np.testing.assert_allclose(d, z.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_float32_stays_float32(xp):
    logits, targets = batch(xp)
    loss, cache = masked_cross_entropy_forward(logits.astype(xp.float32), targets)
    (d,) = masked_cross_entropy_backward(1.0, cache)
    assert loss.dtype == np.float32 and d.dtype == np.float32


def test_nothing_counted_or_a_target_out_of_range_is_a_clear_error(xp):
    logits, targets = batch(xp)
    with pytest.raises(ValueError, match="no position to count"):
        masked_cross_entropy_forward(logits, xp.full_like(targets, IGNORE))
    bad = targets.copy()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match=r"targets must be in \[0, 7\)"):
        masked_cross_entropy_forward(logits, bad)


def test_the_cache_is_consumed_by_one_backward(xp):
    logits, targets = batch(xp)
    before = to_numpy(logits).copy()
    _, cache = masked_cross_entropy_forward(logits, targets)
    masked_cross_entropy_backward(1.0, cache)
    np.testing.assert_array_equal(to_numpy(logits), before)  # the logits are never written
    with pytest.raises(RuntimeError, match="consumes its cache"):
        masked_cross_entropy_backward(1.0, cache)


def test_the_pair_allocates_one_logits_sized_array():
    # The docstring's memory claim: softmax and then dlogits live in one [N, V] buffer. A
    # second logits-sized array (a copy for dlogits, exp kept beside probs) would read 2x or
    # more; the small [N] arrays (mask, row indices, log-sum-exp) add N * 8 bytes each,
    # under 1% of N * V * 4 at V = 1001, hence the bound 1.25.
    tracemalloc = pytest.importorskip("tracemalloc")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 32, 1001), dtype=np.float32)
    targets = rng.integers(0, 1001, (4, 32))
    targets[:, 24:] = IGNORE
    tracemalloc.start()
    tracemalloc.reset_peak()
    _, cache = masked_cross_entropy_forward(logits, targets)
    (d,) = masked_cross_entropy_backward(1.0, cache)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert logits.nbytes <= peak < 1.25 * logits.nbytes, peak / logits.nbytes
