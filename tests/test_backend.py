"""The backend: device choice, clear errors, and the CPU allocator setting."""

import platform
import resource

import numpy as np
import pytest

from minilora import backend


def test_device_resolution(monkeypatch):
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    assert backend.resolve_device(None) == "cpu"
    monkeypatch.setenv("MINILORA_DEVICE", "cpu")
    assert backend.resolve_device(None) == "cpu"
    with pytest.raises(backend.BackendError, match="unknown device 'tpu'"):
        backend.resolve_device("tpu")


@pytest.mark.skipif(backend.cuda_available(), reason="a GPU is present")
def test_cuda_without_cupy_or_gpu_is_a_clear_error():
    with pytest.raises(backend.BackendError, match="cuda"):
        backend.resolve_device("cuda")


def test_moving_arrays(xp):
    a = np.arange(6.0).reshape(2, 3)
    d = backend.to_device(a, "cuda" if xp is not np else "cpu", np.float32)
    assert backend.get_array_module(d) is xp and d.dtype == np.float32
    np.testing.assert_array_equal(backend.to_numpy(d), a)


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    """After keep_freed_memory, a freed 24 MB buffer comes back without faulting its pages
    in again (the default glibc setting munmaps it and faults it back in)."""
    backend.keep_freed_memory()
    n = 24 * 2**20 // 8
    a = np.ones(n)
    del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(n)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert b.sum() == n
    assert faults < 50, faults  # glibc defaults: about 500 here (huge pages), 6,000 without
