"""Shared fixtures: the array backends, seeds, and the real data seeded into a cache."""

import numpy as np
import pytest

import minilora as ml

try:  # fixtures owned by the data / weights test modules, when present
    from fixtures_data import *  # noqa: F401,F403
except ImportError:
    pass
try:
    from fixtures_weights import *  # noqa: F401,F403
except ImportError:
    pass

BACKENDS = ["cpu"] + (["cuda"] if ml.cuda_available() else [])


@pytest.fixture(params=BACKENDS)
def device(request):
    """Every available device: cpu always, cuda when CuPy sees a GPU."""
    return request.param


@pytest.fixture
def xp(device):
    """The array module of `device` (numpy or cupy)."""
    from minilora.backend import get_xp

    return get_xp(device)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_cfg():
    """B=2, T=5, C=8, NH=2, L=2, V=11: the odd little GPT-2 of the gradient checks."""
    return ml.GPTConfig(vocab_size=11, context_length=7, emb_dim=8, n_heads=2, n_layers=2)


@pytest.fixture
def tiny_idx():
    return np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])  # repeated ids on purpose
