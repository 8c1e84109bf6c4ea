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


@pytest.fixture(autouse=True)
def python_signal_handlers():
    """Every test starts with Python's own Ctrl-C and SIGTERM handlers, and they are put back
    after it: the training loop marks a signal only where the handler in place is a Python
    function (train.interrupts_between_steps), so a handler a library or an earlier test left
    behind (SIG_IGN, or another loop's) would make the real-signal tests of a later test pass
    or fail by the order they run in."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
