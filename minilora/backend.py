"""Array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module that imports CuPy, and it does so lazily, so a CPU-only
install never needs it. Everything else writes its math once against
``xp = get_array_module(x)`` (the CuPy idiom, see CuPy's user guide
``basic.rst`` / ``difference.rst``).

Random numbers always come from NumPy's seeded generator and are then moved to
the device, so that a CPU run and a GPU run start from the same values.
"""

import cProfile
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import numpy as np

from .errors import MiniloraError

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")

_cupy = None  # the cupy module once imported


class BackendError(MiniloraError, RuntimeError):
    """The requested device cannot be used (no CuPy, no GPU, unknown name)."""


def resolve_device(device=None):
    """Return "cpu" or "cuda": the argument, else $MINILORA_DEVICE, else "cpu"."""
    if device is None:
        device = os.environ.get("MINILORA_DEVICE") or "cpu"
    device = str(device).lower()
    if device == "gpu":
        device = "cuda"
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}: expected one of {DEVICES}")
    if device == "cuda":
        _import_cupy()
    return device


def resolve_dtype(dtype):
    """Return a NumPy dtype for "float32"/"float64" (or the dtypes themselves)."""
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}: expected one of {DTYPES}")
    return np.dtype(name)


def _import_cupy():
    global _cupy
    if _cupy is None:
        if os.environ.get("MINILORA_ALLOW_TF32") == "1":
            # float32 matmuls on tensor cores (TF32, ~10-bit mantissa): faster, less exact.
            # Off by default, which is CuPy's default too; CuPy reads this when it first
            # multiplies float32 matrices.
            os.environ.setdefault("CUPY_TF32", "1")
        try:
            import cupy
        except ImportError as e:
            raise BackendError(
                "device 'cuda' needs CuPy, which is not installed; install the extra that "
                "matches your CUDA major version: pip install 'minilora[cuda12]' or "
                "'minilora[cuda13]'") from e
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDA driver missing or broken
            raise BackendError(f"device 'cuda': CuPy is installed but CUDA is not usable ({e})") from e
        if n == 0:
            raise BackendError("device 'cuda': CuPy is installed but no GPU is visible")
        _cupy = cupy
    return _cupy


def cuda_available():
    """True when CuPy imports and sees at least one GPU."""
    try:
        _import_cupy()
        return True
    except BackendError:
        return False


def get_xp(device):
    """The array module for a device: numpy for "cpu", cupy for "cuda"."""
    if resolve_device(device) == "cuda":
        return _import_cupy()
    keep_freed_memory()
    return np


_malloc_tuned = False


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees about a gigabyte of activations. By default glibc
    hands large freed blocks back to the kernel (munmap, or trimming the heap top), so the
    next step page-faults the same gigabyte in again, zeroed: measured here, 0.7 s of a
    2.8 s GPT-2 small step. Serving blocks up to 32 MB from the heap and never trimming it
    keeps the pages mapped (CuPy's and PyTorch's caching allocators exist for the same
    reason). Linux/glibc only, once per process; MINILORA_MALLOC_DEFAULTS=1 opts out.
    """
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("MINILORA_MALLOC_DEFAULTS") == "1":
        return
    _malloc_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's largest allowed value
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


# ndarray subclasses that compute with an array module of their own: opcount.Counted, the
# benchmark's counted arrays, whose module makes new arrays counted too (register_array_module)
_subclass_modules = {}


def get_array_module(x):
    """numpy or cupy, whichever owns array ``x`` (for an ndarray subclass registered with
    register_array_module, its module)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    return _subclass_modules.get(type(x), np)


def register_array_module(cls, xp):
    """Make get_array_module answer `xp` for arrays of the ndarray subclass `cls`. Only the
    benchmark's operation count (minilora.opcount) uses it: its arrays must make their new
    arrays (xp.arange, xp.zeros) counted as well; plain arrays still get numpy."""
    if not (isinstance(cls, type) and issubclass(cls, np.ndarray)) or cls is np.ndarray:
        raise TypeError(f"register_array_module takes an ndarray subclass, got {cls!r}")
    _subclass_modules[cls] = xp


def device_of(x):
    """"cuda" for a CuPy array, "cpu" otherwise."""
    return "cuda" if _cupy is not None and isinstance(x, _cupy.ndarray) else "cpu"


def to_device(x, device, dtype=None):
    """Copy (only if needed) array ``x`` to ``device``, optionally casting to ``dtype``."""
    xp = get_xp(device)
    if xp is np:
        x = to_numpy(x)
        return x if dtype is None else x.astype(dtype, copy=False)
    return xp.asarray(x, dtype=dtype)


def to_numpy(x):
    """A NumPy array (or Python scalar passthrough) from a NumPy or CuPy array."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


# ---------------------------------------------------------------- CPU threads

_pool = None  # the thread pool of run_parallel, made on first use
_pool_size = None  # its number of threads
_worker = threading.local()  # .busy: this thread is one of the pool's
_blas = None  # threadpoolctl's handle on the BLAS libraries NumPy loaded
_lock = threading.Lock()  # one run_parallel at a time: the BLAS thread limit is process-wide


def cpu_threads():
    """Cores this process may use: $MINILORA_NUM_THREADS, else its CPU affinity, capped
    by a container's CPU quota (cgroup v2 cpu.max) when there is one."""
    env = os.environ.get("MINILORA_NUM_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"MINILORA_NUM_THREADS must be a positive integer, got {env!r}")
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))  # ceil(quota / period)
    except (OSError, ValueError):
        pass  # no cgroup v2 quota
    return n


def batch_shards(batch, device="cpu"):
    """Slices that split a batch of `batch` sequences into one shard per core.

    On the CPU, BLAS already spreads a big matrix product over the cores, but NumPy's
    elementwise work (softmax, GELU, layernorm, the adds) runs on one core, and the
    attention products are too small for BLAS to split. Running shards of the batch
    side by side in threads (NumPy releases the GIL inside its loops) puts every core
    on all of it. On a GPU, one shard.
    """
    n = 1 if device == "cuda" else max(1, min(batch, cpu_threads()))
    bounds = [batch * i // n for i in range(n + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def run_parallel(fn, items):
    """[fn(*item) for item in items], the items in parallel threads when there are
    several; results in order. If any raise, all are let finish (no thread is left
    running past the call) and the exception of the first failing item is re-raised.

    While the threads run, BLAS gets cpu_threads() // len(items) threads of its own
    (one each on 2 cores): left at its default, every thread's matrix product would
    start a full team of BLAS threads and the cores would be oversubscribed (measured:
    the sharded GPT-2 small step 3.7 s instead of 2.1 s). The BLAS setting is the
    process's, so calls from several threads take turns (a lock) and other threads'
    products see it until the items are done. A call made from inside an item runs
    its own items one after another: the pool is busy with its caller.
    """
    if (len(items) == 1 and _profiles is None) or getattr(_worker, "busy", False):
        return [fn(*item) for item in items]
    global _pool, _pool_size, _blas
    threads = cpu_threads()
    with _lock:
        if _pool_size != threads:  # first use, or $MINILORA_NUM_THREADS changed
            from threadpoolctl import ThreadpoolController

            if _pool is not None:
                _pool.shutdown()
            _pool_size = threads
            _pool = ThreadPoolExecutor(threads, "minilora", initializer=_mark_worker)
            _blas = ThreadpoolController()
        with _blas.limit(limits=max(1, threads // len(items)), user_api="blas"):
            if _profiles is not None:  # one profiler at a time (Python 3.12+): one item after another
                return [_profiled(fn)(item) for item in items]
            futures = [_pool.submit(fn, *item) for item in items]
            wait(futures)
            return [future.result() for future in futures]


def _mark_worker():
    _worker.busy = True


_profiles = None  # while profile_threads() is on: one cProfile.Profile per call run_parallel makes


@contextmanager
def profile_threads():
    """Profile every call run_parallel makes, each with its own profiler. Since Python
    3.12 only one profiler may run at a time, so meanwhile the items run one after
    another in the calling thread, with BLAS limited as when they run side by side.
    Yields the list the profiles are added to."""
    global _profiles
    _profiles = profiles = []
    try:
        yield profiles
    finally:
        _profiles = None


def _profiled(fn):
    def call(item):
        profile = cProfile.Profile()
        _profiles.append(profile)
        profile.enable()
        try:
            return fn(*item)
        finally:
            profile.disable()

    return call
