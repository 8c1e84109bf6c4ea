"""Counting the array operations of a training step: the kernels a GPU would launch.

Under CuPy every array operation is a kernel launch that costs the host ~10 us whatever
its size, so a small step's time is its number of operations (issue 21). The number
does not depend on the device: counted here with NumPy, it is what the same code issues
under CuPy. Used only by the benchmark (`minilora bench`); the training path never sees it.

What counts as one operation, by kind:

  matmul            a @ b, np.matmul, .dot, einsum
  elementwise       a ufunc making a new array, operators included (a + b, -a, a > b,
                    np.exp(a), np.where)
  in_place          a ufunc writing into an existing array (a += b, np.exp(a, out=a))
  reduction         sum, mean, max, argmax, ... (one each: NumPy's mean is a reduce and
                    a divide, CuPy's one kernel)
  copy              .copy(), .astype() to another dtype, asarray / ascontiguousarray that
                    copy, a reshape that has to copy (of a transposed array), concatenate,
                    stack
  indexing          fancy indexing x[idx], x[mask], take, nonzero
  index_assignment  x[...] = v with any index (a fill or strided copy on a GPU), ufunc.at
                    (np.add.at), .fill(), .put()
  creation          arange, zeros, ones, full and their _like forms (a fill kernel each)

Not counted, because they copy nothing: views (reshape of a contiguous array, transpose,
.T, swapaxes, basic slicing, x[None]), np.empty / empty_like (an allocation, no
kernel), shapes and dtypes, and arithmetic on Python numbers. A reduction over every
axis returns a 0-d array, as under CuPy, so arithmetic on a loss still counts.

How: the arrays of the counted model are `Counted`, an ndarray subclass whose
__array_ufunc__, __array_function__, __getitem__, __setitem__ and copying methods report
each operation to the active OpCounter and then run NumPy's own on the plain arrays
(so the numbers are NumPy's, bit for bit); every result is Counted in turn. Arrays
made from nothing (xp.arange, xp.zeros) come from CountingNumPy, which
backend.get_array_module hands out for Counted arrays in place of numpy. An operation
is attributed to the nearest function on the Python stack that is in layers.py or
lora.py (by its name: "linear_forward", "causal_mask", ...), in model.py ("model
glue") or in optim.py ("AdamW"); anything else is "other". The operations an operation
is made of (NumPy's mean runs a sum and a divide) are not counted again.

Two things differ from the CPU's own step, both as a GPU runs it: the batch is one
shard (one_shard(); on the CPU each shard repeats every layer's operations), and
AdamW's update runs on whole flat buffers (optim takes cache-sized pieces only for
numpy arrays themselves). Neither changes a number: a counted step's loss, gradients
and parameters equal the uncounted step's exactly (tests/test_opcount.py).
"""

import functools
import os
import sys
import threading
from collections import Counter
from contextlib import contextmanager

import numpy as np

from . import backend

KINDS = ("matmul", "elementwise", "in_place", "reduction", "copy", "indexing", "index_assignment", "creation")

_HERE = os.path.dirname(os.path.abspath(__file__))
# files whose functions an operation is attributed to: path -> the name of the file's part
_PLACES = {os.path.join(_HERE, name + ".py"): name for name in ("layers", "lora", "model", "optim")}


@functools.lru_cache(maxsize=None)
def _place(filename):
    """The part ("layers", ...) a code object's file is, or None (a file path as the
    import recorded it, made absolute: a relative sys.path entry records it relative)."""
    return _PLACES.get(os.path.abspath(filename))

_active = None  # the OpCounter counting now: one per process, seen by the shards' threads too
_state = threading.local()  # .depth > 0 while an operation runs: its own parts are not counted
_lock = threading.Lock()


def _plain(x):
    """x as a plain ndarray (a view, no copy) when it is Counted; anything else as is."""
    return x.view(np.ndarray) if isinstance(x, Counted) else x


def _counted(x):
    """Results as Counted: arrays viewed (no copy), NumPy scalars as 0-d arrays (what a
    CuPy reduction returns), tuples item by item; anything else as is."""
    if type(x) is np.ndarray:
        return x.view(Counted)
    if isinstance(x, np.generic):
        return np.asarray(x).view(Counted)
    if isinstance(x, tuple):
        return tuple(_counted(item) for item in x)
    return x


def _shares(a, b):
    """Whether arrays a and b may share memory (bounds only: enough to tell a view from a
    new array)."""
    return np.may_share_memory(_plain(a), _plain(b))


def _arrays_in(args, kwargs):
    """The arrays among a call's arguments, and inside its lists and tuples (concatenate)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, np.ndarray):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, np.ndarray))


def _is_view(result, sources):
    """Whether every array in `result` is a view of one of `sources` (nothing was computed)."""
    arrays = [r for r in (result if isinstance(result, tuple) else (result,)) if isinstance(r, np.ndarray)]
    return bool(arrays) and all(any(_shares(r, s) for s in sources) for r in arrays)


def _caller():
    """(place, function): the nearest frame on the stack in layers.py, lora.py, model.py or
    optim.py, as ("layers", "linear_forward"); ("other", name) when there is none."""
    frame, outside = sys._getframe(2), None
    while frame is not None:
        filename = frame.f_code.co_filename
        place = _place(filename)
        if place is not None:
            return place, frame.f_code.co_name
        if outside is None and filename != __file__ and f"{os.sep}numpy{os.sep}" not in filename:
            outside = frame.f_code.co_name  # the nearest caller that is neither this file nor NumPy
        frame = frame.f_back
    return "other", outside or "?"


def _call(kind, fn, *args, **kwargs):
    """fn(*args, **kwargs), counted as one operation when a counter is active and no
    operation is running already. kind: one of KINDS, or a function of the result giving
    one (or None: nothing was computed, a view)."""
    counter = _active
    if counter is None or getattr(_state, "depth", 0):
        return fn(*args, **kwargs)
    _state.depth = 1
    try:
        result = fn(*args, **kwargs)
    finally:
        _state.depth = 0
    kind = kind(result) if callable(kind) else kind
    if kind is not None:
        counter.record(kind, *_caller())
    return result


def _ufunc_kind(ufunc, method, out):
    if method in ("reduce", "accumulate", "reduceat"):
        return "reduction"
    if method == "at":
        return "index_assignment"
    if ufunc is np.matmul:
        return "matmul"
    return "in_place" if out is not None else "elementwise"


# NumPy functions (reached through __array_function__) whose new array is of a known
# kind; any other function making a new array counts as "other"
_FUNCTION_KINDS = {
    "concatenate": "copy", "stack": "copy", "hstack": "copy", "vstack": "copy", "copy": "copy",
    "reshape": "copy", "ravel": "copy", "repeat": "copy", "tile": "copy", "pad": "copy",
    "dot": "matmul", "matmul": "matmul", "tensordot": "matmul", "einsum": "matmul", "inner": "matmul",
    "outer": "matmul",
    "where": "elementwise", "clip": "elementwise",
    "take": "indexing", "nonzero": "indexing", "argwhere": "indexing", "compress": "indexing",
    "take_along_axis": "indexing",
    "copyto": "index_assignment", "put": "index_assignment", "place": "index_assignment",
    "put_along_axis": "index_assignment", "fill_diagonal": "index_assignment",
    "zeros_like": "creation", "ones_like": "creation", "full_like": "creation",
    "sum": "reduction", "mean": "reduction", "max": "reduction", "min": "reduction", "amax": "reduction",
    "amin": "reduction", "prod": "reduction", "any": "reduction", "all": "reduction", "argmax": "reduction",
    "argmin": "reduction", "var": "reduction", "std": "reduction", "cumsum": "reduction",
}
_NO_KERNEL = {"empty_like"}  # a new array, but only an allocation


def _function_kind(func, sources):
    def kind(result):
        name = func.__name__
        if name in _NO_KERNEL:
            return None
        if result is None:  # it wrote into an argument: copyto, put, place
            return _FUNCTION_KINDS.get(name, "index_assignment")
        if not isinstance(result, (np.ndarray, np.generic, tuple)) or (
                isinstance(result, tuple) and not any(isinstance(r, np.ndarray) for r in result)):
            return None  # shapes, dtypes, flags: no array was computed
        if _is_view(result, sources):
            return None  # reshape of a contiguous array, transpose, squeeze, ...
        return _FUNCTION_KINDS.get(name, "other")
    return kind


def _copy_if_new(source):
    """Kind "copy" when the result is not a view of `source` (reshape, ravel, asarray)."""
    return lambda result: None if result is source or _is_view(result, [source]) else "copy"


class Counted(np.ndarray):
    """An ndarray that reports each operation on it to the active OpCounter (with none
    active it only passes through), computes it with NumPy on the plain arrays, and
    returns its results as Counted arrays. See the module docstring for what counts."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        kwargs = {k: tuple(_plain(o) for o in v) if k == "out" else _plain(v) for k, v in kwargs.items()}
        inputs = tuple(_plain(x) for x in inputs)
        result = _call(_ufunc_kind(ufunc, method, out), getattr(ufunc, method), *inputs, **kwargs)
        if method == "at":
            return None
        if out is None:
            return _counted(result)
        # the caller's own out arrays, as NumPy returns them; outputs not given are new
        results = result if isinstance(result, tuple) else (result,)
        given = tuple(o if o is not None else _counted(r) for o, r in zip(out, results))
        return given[0] if len(given) == 1 else given

    def __array_function__(self, func, types, args, kwargs):
        sources = list(_arrays_in(args, kwargs))
        result = _call(_function_kind(func, sources), super().__array_function__, func, types, args, kwargs)
        return _counted(result)

    def __getitem__(self, index):
        index = tuple(_plain(i) for i in index) if isinstance(index, tuple) else _plain(index)
        plain = self.view(np.ndarray)
        result = _call(lambda r: "indexing" if isinstance(r, np.ndarray) and not _shares(r, plain) else None,
                       plain.__getitem__, index)
        return result.view(Counted) if type(result) is np.ndarray else result

    def __setitem__(self, index, value):
        index = tuple(_plain(i) for i in index) if isinstance(index, tuple) else _plain(index)
        _call("index_assignment", self.view(np.ndarray).__setitem__, index, _plain(value))

    def astype(self, dtype, *args, **kwargs):
        plain = self.view(np.ndarray)
        result = _call(lambda r: None if r is plain else "copy", plain.astype, dtype, *args, **kwargs)
        return self if result is plain else result.view(Counted)

    def reshape(self, *shape, **kwargs):
        plain = self.view(np.ndarray)
        return _call(_copy_if_new(plain), plain.reshape, *shape, **kwargs).view(Counted)

    def ravel(self, *args, **kwargs):
        plain = self.view(np.ndarray)
        return _call(_copy_if_new(plain), plain.ravel, *args, **kwargs).view(Counted)


def _method(name, kind):
    """A Counted method that runs ndarray's `name` on the plain array as one `kind`."""
    base = getattr(np.ndarray, name)

    def method(self, *args, **kwargs):
        return _counted(_call(kind, base, self.view(np.ndarray), *args, **kwargs))

    method.__name__ = name
    return method


for _name, _kind in (("copy", "copy"), ("flatten", "copy"), ("repeat", "copy"), ("dot", "matmul"),
                     ("take", "indexing"), ("nonzero", "indexing"), ("compress", "indexing"),
                     ("fill", "index_assignment"), ("put", "index_assignment"),
                     *((r, "reduction") for r in ("sum", "mean", "max", "min", "prod", "any", "all", "argmax",
                                                  "argmin", "var", "std", "cumsum", "cumprod"))):
    setattr(Counted, _name, _method(_name, _kind))


class CountingNumPy:
    """numpy as the functions of a counted model see it: backend.get_array_module answers
    it for Counted arrays. Every attribute is numpy's, except that the functions making
    arrays from nothing or from other data return Counted arrays (so that what is computed
    from them is counted too), each counted as the kernel CuPy would launch."""

    def __getattr__(self, name):
        return getattr(np, name)

    def __repr__(self):
        return "<numpy, counting (minilora.opcount)>"

    @staticmethod
    def _made(kind, fn, *args, **kwargs):
        return _call(kind, fn, *args, **kwargs).view(Counted)

    def arange(self, *args, **kwargs):
        return self._made("creation", np.arange, *args, **kwargs)

    def zeros(self, *args, **kwargs):
        return self._made("creation", np.zeros, *args, **kwargs)

    def ones(self, *args, **kwargs):
        return self._made("creation", np.ones, *args, **kwargs)

    def full(self, *args, **kwargs):
        return self._made("creation", np.full, *args, **kwargs)

    def eye(self, *args, **kwargs):
        return self._made("creation", np.eye, *args, **kwargs)

    def empty(self, *args, **kwargs):
        return np.empty(*args, **kwargs).view(Counted)  # an allocation: no kernel

    def asarray(self, a, *args, **kwargs):
        return self._made(_copy_if_new(_plain(a)), np.asarray, _plain(a), *args, **kwargs)

    def ascontiguousarray(self, a, *args, **kwargs):
        return self._made(_copy_if_new(_plain(a)), np.ascontiguousarray, _plain(a), *args, **kwargs)

    def array(self, a, *args, **kwargs):
        return self._made(_copy_if_new(_plain(a)), np.array, _plain(a), *args, **kwargs)


counting_numpy = CountingNumPy()
backend.register_array_module(Counted, counting_numpy)


class OpCounter:
    """Counts the operations on Counted arrays while it is active::

        with OpCounter() as ops:
            step()
        ops.total, ops.by_function(), ops.by_kind()

    counts: Counter {(place, function, kind): n}, place "layers", "lora", "model",
    "optim" or "other" (see the module docstring). One counter at a time: the shards'
    threads all count into it."""

    def __init__(self):
        self.counts = Counter()

    def __enter__(self):
        global _active
        if _active is not None:
            raise RuntimeError("an OpCounter is counting already: one at a time")
        _active = self
        return self

    def __exit__(self, *exc):
        global _active
        _active = None

    def record(self, kind, place, function):
        with _lock:
            self.counts[place, function, kind] += 1

    @property
    def total(self):
        return sum(self.counts.values())

    @staticmethod
    def label(place, function):
        """The breakdown's name for operations in `function` of `place`."""
        return {"model": "model glue", "optim": "AdamW", "other": "other"}.get(place, function)

    def by_function(self):
        """{layer function, "model glue", "AdamW" or "other": operations}, most first."""
        rows = Counter()
        for (place, function, _), n in self.counts.items():
            rows[self.label(place, function)] += n
        return dict(rows.most_common())

    def by_kind(self):
        """{kind: operations} in the order of KINDS (and "other" last, if any)."""
        rows = Counter()
        for (_, _, kind), n in self.counts.items():
            rows[kind] += n
        return {k: rows[k] for k in (*KINDS, "other") if rows[k]}

    def by_function_and_kind(self):
        """{label: {kind: operations}}, the labels as by_function orders them."""
        rows = {label: Counter() for label in self.by_function()}
        for (place, function, kind), n in self.counts.items():
            rows[self.label(place, function)][kind] += n
        return {label: {k: c[k] for k in (*KINDS, "other") if c[k]} for label, c in rows.items()}

    def glue(self):
        """{function of model.py: operations}: what "model glue" is made of."""
        rows = Counter()
        for (place, function, _), n in self.counts.items():
            if place == "model":
                rows[function] += n
        return dict(rows.most_common())

    def report(self):
        return {"total": self.total, "by_function": self.by_function(), "by_kind": self.by_kind(),
                "by_function_and_kind": self.by_function_and_kind(), "model_glue": self.glue()}


def count_model(model):
    """Make `model` a counted one, in place: its parameters viewed as Counted (no copy) and
    its array module CountingNumPy. Do it before the model's first AdamW step, which puts
    views of its flat buffers in model.params: those are then Counted too. CPU only."""
    if model.device != "cpu":
        raise ValueError(f"operations are counted on the CPU (the count is the device's too); "
                         f"this model is on {model.device}")
    model.params = {name: p.view(Counted) for name, p in model.params.items()}
    model.xp = counting_numpy
    return model


@contextmanager
def one_shard():
    """Run the batch as one shard, as a GPU does (backend.batch_shards reads
    $MINILORA_NUM_THREADS at each forward): on the CPU each shard repeats every layer's
    operations on its rows."""
    before = os.environ.get("MINILORA_NUM_THREADS")
    os.environ["MINILORA_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MINILORA_NUM_THREADS"]
        else:
            os.environ["MINILORA_NUM_THREADS"] = before
