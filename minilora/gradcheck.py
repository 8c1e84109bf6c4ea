"""Gradient checks: every hand-written backward against central finite differences.

For a function out = f(inputs) we pick a random upstream gradient G of out's shape
and check the scalar L = sum(out * G): its exact gradient is what the backward
returns when fed G, and its numerical gradient is, entry by entry,

    dL/dx[i] ~ (L(x + h e_i) - L(x - h e_i)) / (2h)          (h = 1e-5, float64)

compared with the norm relative error ||a - n|| / (||a|| + ||n||). Central
differences are exact to O(h^2) ~ 1e-10, so a correct backward lands far below
1e-7, and a wrong one lands far above it: the dropped terms the tests try give
errors from about 0.1 to 0.7 (CS231n ``gradient_check.py``; HIPS/autograd
``test_util.py``). docs/derivations.md#checking-it-finite-differences explains it.

A check that fails says where, and when it can, why:

- the input (or model parameter) whose gradient is furthest off, and in it the entry
  where the analytic and numerical values differ most, with both values (CS231n's
  ``grad_check_sparse`` prints the same pair). A packed input is judged by its parts:
  a check may declare that an input is equal column blocks with names (attention's
  qkv is q | k | v), and then each part has its own error, so a wrong dk shows as k.
- a constant factor: when analytic / numeric is one number over an input's entries
  (a scale left out, a mean's 1/N forgotten, a sign flipped), ``result.hint`` prints
  it and names it among the factors the layer has (sqrt(hs), 1/N, the LoRA scale,
  1/(1-p), ...).
- a broken invariant: layernorm's dx and cross-entropy's dlogits have rows that sum
  to zero; a learner's gradient whose rows do not is failed with a line saying so.
- the function a check is waiting for: a backward that is finished but calls another
  that still raises NotImplementedError (attention_backward calling a stubbed
  dropout_backward) is reported "needs dropout_backward", not "not implemented".
- an exception raised inside a layer function (a NumPy shape error, a TypeError)
  becomes one line: the function, the shapes it was called with, the file, line and
  source text where it was raised. One broken layer never hides the report on the others.

The checks are a list of named, not yet run ``Check``s, so ``minilora gradcheck --only
NAME`` runs only what it names, and the layer checks take their functions from a
namespace: minilora's own layers, or a learner's file (``--module``, see
examples/exercises/), which then goes through exactly the same checks.
"""

import importlib.util
import inspect
import traceback
import types
from dataclasses import dataclass
from functools import partial, wraps
from pathlib import Path
from typing import Callable

import numpy as np

from . import backend, layers, lora

# Tolerances from the error analysis of a central difference at h = 1e-5 (float64):
# rounding ~ eps |L| / h ~ 2e-16 * 10 / 1e-5 = 2e-10 per entry, whatever the BLAS kernel's
# summation order; truncation ~ h^2 |L'''| / 6, the same on every machine. A layer's L''' is
# of order 1: measured errors 1e-11 to 1e-10, 1000x under LAYER_TOL. The whole tiny model's
# layernorms (rstd ~ 1/0.05 at init) make |L'''| ~ 1e3-1e4: measured 2e-9 to 3e-8, which
# is truncation (it scales as h^2), still 40x under MODEL_TOL. A dropped term costs 1e-1.
LAYER_TOL = 1e-7
MODEL_TOL = 1e-6

# The functions the layer checks call, by name. The project's own live in minilora.layers
# and minilora.lora; `minilora gradcheck --module FILE` takes them from a learner's file
# instead (examples/exercises/layers.py), so both go through exactly the same checks.
LAYER_FUNCTIONS = [f"{layer}_{half}" for layer in ("embedding", "linear", "layernorm", "gelu", "dropout",
                                                   "attention", "cross_entropy", "masked_cross_entropy",
                                                   "lora_linear")
                   for half in ("forward", "backward")]
PROJECT_LAYERS = types.SimpleNamespace(**{name: getattr(layers, name, None) or getattr(lora, name)
                                           for name in LAYER_FUNCTIONS})


@dataclass
class CheckResult:
    name: str
    max_rel_error: float  # worst over the checked inputs (nan when the check could not run)
    errors: dict  # input name (or the name of a part of a packed input) -> relative error
    tol: float
    worst: dict = None  # the entry that differs most: input, index, analytic, numeric (see compare)
    problem: str = None  # why the check could not run: "not implemented", "needs NAME", or the error's line
    needs: str = None  # the function, not the check's own, whose NotImplementedError stopped it
    hint: str = None  # a diagnosis in words (a constant factor, ...); any check may set it
    violations: list = None  # the invariants the gradient breaks, one line each (see rows_sum_to_zero)

    @property
    def passed(self):
        return bool(self.problem is None and not self.violations and np.isfinite(self.max_rel_error)
                    and self.max_rel_error < self.tol)

    @property
    def status(self):
        """"passed", "failed", "not implemented" (the check's own function raises
        NotImplementedError) or "needs" (another function it calls does: see self.needs)."""
        if self.problem == "not implemented":
            return self.problem
        if self.needs is not None:
            return "needs"
        return "passed" if self.passed else "failed"

    def to_dict(self):
        err = self.max_rel_error
        return {"name": self.name, "max_rel_error": float(err) if np.isfinite(err) else None,
                "passed": self.passed, "status": self.status, "tolerance": self.tol,
                "errors": self.errors, "worst": self.worst, "problem": self.problem,
                "needs": self.needs, "hint": self.hint, "violations": self.violations or []}


def rel_error(a, n):
    """||a - n|| / (||a|| + ||n||); 0 when both are exactly zero."""
    a, n = backend.to_numpy(a).astype(np.float64), backend.to_numpy(n).astype(np.float64)
    denom = np.linalg.norm(a) + np.linalg.norm(n)
    return 0.0 if denom == 0 else float(np.linalg.norm(a - n) / denom)


def numerical_gradient(loss_fn, x, h=1e-5):
    """Central-difference gradient of the scalar loss_fn() with respect to array x,
    which is perturbed in place one entry at a time (and restored)."""
    flat = x.reshape(-1)
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient perturbs x in place: x must be C-contiguous")
    grad = np.zeros(x.size, dtype=np.float64)
    for i in range(x.size):
        old = flat[i].item()
        flat[i] = old + h
        plus = loss_fn()
        flat[i] = old - h
        minus = loss_fn()
        flat[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad.reshape(x.shape)


def split_parts(grads, parts):
    """grads (input name -> array) with each packed input replaced by its named parts:
    parts[k] = names of the equal column blocks that make up input k along its last axis,
    e.g. {"qkv": ("q", "k", "v")} turns qkv (B, T, 3C) into q, k, v, each (B, T, C)."""
    out = {}
    for k, g in grads.items():
        if k in parts:
            out.update(zip(parts[k], np.split(g, len(parts[k]), axis=-1)))
        else:
            out[k] = g
    return out


def compare(name, analytic, numeric, tol, parts=None, factors=None):
    """The CheckResult of gradients analytic[k] against numeric[k] (dicts keyed by input name).

    parts: optional {input: names of its equal last-axis blocks} (see split_parts); each
    part is then judged apart, so errors and the worst entry name q, k or v, not qkv,
    and the worst entry's index is within its part.
    factors: optional {name: value} of the constant factors this check's layer has
    (e.g. {"sqrt(hs)": 2.0}); they name a constant analytic/numeric ratio (see ratio_hint).

    Besides each input's relative error it names the worst entry, as CS231n's
    ``grad_check_sparse`` prints "numerical: ... analytic: ...": in the input with the
    largest error, the index where the two gradients differ most, with both values.
    That is where to start looking when a backward is wrong.
    """
    checked = {}
    for k, n in numeric.items():
        a = analytic[k]
        if a is None or tuple(np.shape(a)) != n.shape:
            raise ValueError(f"the gradient of {k} has shape {None if a is None else tuple(np.shape(a))}, "
                             f"expected {n.shape}")
        checked[k] = backend.to_numpy(a).astype(np.float64)
    checked, numeric = split_parts(checked, parts or {}), split_parts(numeric, parts or {})
    errors = {k: rel_error(checked[k], n) for k, n in numeric.items()}
    key = max(errors, key=lambda k: errors[k] if np.isfinite(errors[k]) else np.inf)
    a, n = checked[key], numeric[key]
    diff = np.abs(a - n)
    i = np.unravel_index(np.argmax(np.where(np.isnan(diff), np.inf, diff)), n.shape)
    worst = {"input": key, "index": [int(j) for j in i], "analytic": float(a[i]), "numeric": float(n[i])}
    wrong = [k for k, e in errors.items() if not e < tol]
    hint = ratio_hint({k: (checked[k], numeric[k]) for k in wrong}, factors or {})
    return CheckResult(name, errors[key], errors, tol, worst, hint=hint)


# A constant analytic/numeric ratio. Only entries with |numeric| >= RATIO_FLOOR * max|numeric|
# are compared: near-zero entries are all finite-difference noise. That noise is, per entry,
# truncation h^2 |f'''| / 6 ~ 1e-11 plus rounding eps * |L| / h ~ 2e-11 * |L| (L = sum(out * G):
# |L| is 0.27 to 69 in the layer checks), so <= ~1.5e-9 absolute; the smallest max|numeric| of
# the layer checks is cross-entropy's, 0.02 (its 1/N and a scalar G), so an entry compared is
# >= 2e-5 and its ratio is off by <= 7.5e-5 relative at the very worst (both extremes at once).
# RATIO_SPREAD = 1e-4 is above that bound; measured, a constant-factor fault spreads by 4.3e-8
# at most (the scale left out of attention, the 1/N out of cross-entropy:
# tests/test_checker_hints.py), while gradients wrong in any other way (a dropped term, a
# transpose, GELU without its sech^2 term) spread by 3 to 900.
RATIO_FLOOR = 1e-3
RATIO_SPREAD = 1e-4
RATIO_MATCH = 1e-4  # a ratio equal to a named factor to this relative difference is that factor
ALWAYS_FACTORS = {"2": 2.0, "1/2": 0.5, "-1 (a flipped sign)": -1.0}


def constant_ratio(a, n):
    """(c, count) when analytic a = c * numeric n on every entry where n is not negligible
    (|n| >= RATIO_FLOOR max|n|; count of them, at least 3), else None. c = 0 means a is
    zero wherever n is not."""
    big = np.abs(n) >= RATIO_FLOOR * np.abs(n).max() if n.size else np.zeros(0, bool)
    if big.sum() < 3 or not np.all(np.isfinite(a[big])):
        return None
    ratios = a[big] / n[big]
    c = float(np.median(ratios))
    if np.max(np.abs(ratios - c)) > RATIO_SPREAD * abs(c):  # c = 0 needs every ratio exactly 0
        return None
    return c, int(big.sum())


def ratio_hint(pairs, factors):
    """A line naming the constant factor by which each wrong gradient is off, or None.

    pairs: input name -> (analytic, numeric) of the inputs over the tolerance; factors:
    the check's named factors {name: value}, to which ALWAYS_FACTORS are added. Inputs
    off by the same factor share one clause: "q, k: analytic/numeric = 2 on all 142 entries
    not near zero: yours is the right gradient times sqrt(hs) = 2 (or 2)".
    """
    found = {}  # the ratio, rounded for grouping -> [ratio, input names, entries compared]
    for k, (a, n) in pairs.items():
        r = constant_ratio(a, n)
        if r is None:
            continue
        group = found.setdefault(f"{r[0]:.6g}", [r[0], [], 0])
        group[1].append(k)
        group[2] += r[1]
    named = {**factors, **ALWAYS_FACTORS}
    clauses = []
    for c, keys, count in found.values():
        what = f"{', '.join(keys)}: analytic/numeric = {c:.7g} on all {count} entries not near zero"
        if c == 0.0:
            clauses.append(f"{what}: yours is zero where the gradient is not (never written?)")
            continue
        same = [name if name in ALWAYS_FACTORS else f"{name} = {value:.6g}"
                for name, value in named.items() if abs(c - value) <= RATIO_MATCH * abs(value)]
        if same:
            also = f" (or {', '.join(same[1:])})" if len(same) > 1 else ""
            clauses.append(f"{what}: yours is the right gradient times {same[0]}{also}")
        else:
            known = ", ".join(f"{name} = {value:.4g}" for name, value in factors.items()) or "none"
            clauses.append(f"{what}: a constant factor, but none this layer has ({known})")
    return "; ".join(clauses) or None


# Invariants of a gradient, checked on the learner's answer, with a tolerance from the rounding
# of a C-term float64 sum. A row's computed entries g_c carry rounding errors of a few eps times
# the terms they are made of (up to ~3, e.g. layernorm's rstd * (dn - mean(dn) - n mean(dn n)),
# each within a small factor of max|g| on these inputs), and summing C of them adds
# ~C * eps * max|g|: |sum_c g_c| <~ 4 C eps max_c |g_c|. ROW_SUM_SLACK = 16 allows 4 times that;
# measured with minilora's backwards on the checks' inputs (seeds 0 to 9), the row sums reach
# 0.67 (layernorm) and 1.5 (cross-entropy) C eps max|g|. A real violation (a dropped mean term)
# is a row sum of the order of max|g| itself, ~1e13 times the allowance.
ROW_SUM_SLACK = 16


def rows_sum_to_zero(input, grad_name, why):
    """An invariant: every row (last axis) of the gradient of `input` sums to zero.
    Returns a function grads -> None, or a line saying which rows break it and by how much."""

    def violation(grads):
        g = backend.to_numpy(grads[input]).astype(np.float64)
        rows = g.reshape(-1, g.shape[-1])  # [rows, C]
        sums = np.abs(rows.sum(axis=-1))  # [rows]
        allowed = ROW_SUM_SLACK * rows.shape[-1] * np.finfo(np.float64).eps * np.abs(rows).max(axis=-1)
        bad = sums > allowed
        if not bad.any():
            return None
        i = int(np.argmax(np.where(bad, sums, -1.0)))
        row = ", ".join(map(str, np.unravel_index(i, g.shape[:-1])))
        return (f"each row of {grad_name} must sum to zero ({why}); yours does not in "
                f"{int(bad.sum())} of {len(sums)} rows: row [{row}] sums to {rows[i].sum():.3e} "
                f"(rounding allows {allowed[i]:.1e})")

    return violation


def rows_are_zero(input, grad_name, rows, why):
    """An invariant: the gradient of `input` is exactly zero in `rows` (a boolean mask over
    its leading axes). Returns a function grads -> None, or a line naming the first row
    that is not."""

    def violation(grads):
        g = backend.to_numpy(grads[input]).astype(np.float64)
        flat = g.reshape(-1, g.shape[-1])[np.asarray(backend.to_numpy(rows)).reshape(-1)]  # [ignored rows, V]
        bad = np.abs(flat).max(axis=-1) > 0
        if not bad.any():
            return None
        which = np.nonzero(np.asarray(backend.to_numpy(rows)).reshape(-1))[0][int(np.argmax(bad))]
        return (f"{grad_name} must be exactly 0 in the ignored rows ({why}); yours is not in {int(bad.sum())} "
                f"of {len(bad)}: row {which} has max |{grad_name}| {np.abs(flat[int(np.argmax(bad))]).max():.3e}")

    return violation


def check_layer(name, forward, backward, inputs, wrt, seed=0, tol=LAYER_TOL, h=1e-5,
                parts=None, factors=None, invariants=(), backward_name="the backward"):
    """Check backward(G, cache) against finite differences of sum(forward(**inputs) * G).

    inputs: dict of keyword arguments to forward (arrays are perturbed in place);
    wrt: dict input name -> position of its gradient in backward's returned tuple.
    parts, factors: see compare. invariants: functions of the analytic gradients
    (input name -> array) returning None or the line that says what they break (see
    rows_sum_to_zero); a broken one fails the check. backward_name: how an error about
    what the backward returned names it.
    """
    xp = backend.get_array_module(next(v for v in inputs.values() if hasattr(v, "shape")))
    out, cache = forward(**inputs)
    G = xp.asarray(np.random.default_rng(seed).standard_normal(np.shape(out)))
    grads = backward(G, cache)
    if not isinstance(grads, (tuple, list)) or len(grads) <= max(wrt.values()):
        got = f"a tuple of {len(grads)}" if isinstance(grads, (tuple, list)) else type(grads).__name__
        count = max(wrt.values()) + 1
        raise ValueError(f"{backward_name} returned {got}; expected a tuple of {count} gradient{'s' * (count > 1)} "
                         f"in the order of the forward's inputs (one array: return (dx,))")
    analytic = {k: grads[pos] for k, pos in wrt.items()}

    def loss():
        return float((forward(**inputs)[0] * G).sum())

    numeric = {k: numerical_gradient(loss, inputs[k], h) for k in wrt}
    result = compare(name, analytic, numeric, tol, parts, factors)
    result.violations = [line for line in (broken(analytic) for broken in invariants) if line]
    return result


@dataclass
class Check:
    """One named gradient check, not yet run: run() does the finite differences and
    returns its CheckResult. Kept lazy so that ``--only`` pays only for what it names.
    own: the names of the functions the check is about (a layer's forward and backward);
    a NotImplementedError from any other function it calls is reported as "needs" it
    (see run_check). Empty: every NotImplementedError is "not implemented"."""

    name: str
    run: Callable
    tol: float = LAYER_TOL
    own: tuple = ()


def undefined(name):
    """Stands in for a function a learner's file does not define: reported as not implemented."""

    def missing(*args, **kwargs):
        error = NotImplementedError(f"{name} is not defined")
        error.function = name  # what run_check names as missing; the frame's own name is "missing"
        raise error

    return missing


class LayerFunctionError(Exception):
    """An exception raised inside a layer function, described in one line (see describe_failure)."""


def describe_value(value):
    """A short description of one argument: an array's shape, a nested cache's, a number, a type."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return str(tuple(value.shape)) if value.ndim else f"{value.item():.4g}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(describe_value, value)) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    return type(value).__name__


def describe_failure(name, fn, args, kwargs, error):
    """One line for an exception raised inside layer function `name` called with args:
    'name(dout (2, 8), cache [(2, 2, 1, 4), ...]) raised ValueError at layers.py:192
    "dk = dqk @ q": <the message>'. The line is the innermost one of the traceback in
    fn's own file (where the learner's code went wrong, not NumPy's), and when that is
    in another function of the file (a helper the layer calls), that one is named too."""
    try:
        named = inspect.signature(fn).bind(*args, **kwargs).arguments.items()
    except (TypeError, ValueError):  # a signature that does not fit the call: show the call as made
        named = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    call = f"{name}({', '.join(f'{k} {describe_value(v)}' for k, v in named)})"
    inside = traceback.extract_tb(error.__traceback__)[1:]  # [0] is reporting's own frame, the call
    source = getattr(getattr(fn, "__code__", None), "co_filename", None)
    message = " ".join(str(error).split())  # one line, whatever NumPy's message looks like
    if not inside:  # the call itself failed: a signature that does not take these arguments
        return f"{call} raised {type(error).__name__} when called: {message}"
    frame = ([f for f in inside if f.filename == source] or inside)[-1]
    helper = f" in {frame.name}" if frame.name not in (name, getattr(fn, "__name__", name)) else ""
    return (f"{call} raised {type(error).__name__}{helper} at {Path(frame.filename).name}:{frame.lineno} "
            f'"{frame.line}": {message}')


def reporting(name, fn):
    """fn, with any exception it raises (but NotImplementedError, a stub's, which run_check
    reads) turned into a LayerFunctionError that says in one line where (describe_failure)."""

    @wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (NotImplementedError, LayerFunctionError):
            raise
        except Exception as e:
            raise LayerFunctionError(describe_failure(name, fn, args, kwargs, e)) from e

    return call


def layer_checks(xp, seed=0, fns=PROJECT_LAYERS):
    """Every layer's check on odd, non-square float64 shapes (B=2, T=5, ...), not yet run.

    fns: where the ``*_forward`` / ``*_backward`` functions come from (any object with
    those attributes: the project's by default, or a learner's module). The inputs are
    drawn here, in a fixed order, so each check sees the same numbers whichever run.
    Each check also declares what helps name a fault: the packed input's parts
    (attention's qkv is q | k | v, C columns each), the constant factors the layer has
    (its scale 1/sqrt(hs), cross-entropy's 1/N, dropout's 1/(1-p), the LoRA scale s),
    and the invariants its gradient obeys (rows that sum to zero).
    """
    f = types.SimpleNamespace(**{name: reporting(name, getattr(fns, name, None) or undefined(name))
                                 for name in LAYER_FUNCTIONS})
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return xp.asarray(rng.standard_normal(shape) * scale)

    def case(name, layer, forward, backward, inputs, wrt, **options):
        own = (f"{layer}_forward", f"{layer}_backward")
        return Check(name, partial(check_layer, name, forward, backward, inputs, wrt, backward_name=own[1],
                                   **options), own=own)

    idx = xp.asarray(np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]]))  # repeated ids on purpose
    query_pos = xp.asarray(np.array([3, 0]))
    targets = xp.asarray(np.array([0, 4, 4, 1, 2, 4]))  # repeated classes
    masked_targets = xp.asarray(np.array([0, -100, 4, 4, -100, 1]))  # 2 of 6 ignored
    hs, p_drop, p_att, s = 4, 0.3, 0.25, 1.7  # C=8 over 2 heads; the dropout rates; the LoRA scale
    heads = {"sqrt(hs)": hs ** 0.5, "1/sqrt(hs)": hs ** -0.5, "hs": float(hs), "1/hs": 1.0 / hs}
    dropped = {"1/(1-p)": 1 / (1 - p_att), "1-p": 1 - p_att}
    qkv = {"qkv": ("q", "k", "v")}
    checks = [
        case("embedding", "embedding", lambda wte, wpe: f.embedding_forward(idx, wte, wpe), f.embedding_backward,
             dict(wte=arr(11, 6), wpe=arr(7, 6)), dict(wte=0, wpe=1)),
        case("linear", "linear", f.linear_forward, f.linear_backward,
             dict(x=arr(2, 5, 7), w=arr(7, 3), b=arr(3)), dict(x=0, w=1, b=2)),
        case("layernorm", "layernorm", f.layernorm_forward, f.layernorm_backward,
             dict(x=arr(2, 5, 8, scale=3.0) + 1.5, w=arr(8), b=arr(8)), dict(x=0, w=1, b=2),
             invariants=[rows_sum_to_zero("x", "dx", "the output does not change when a constant is added "
                                                      "to a row of x, so dx is orthogonal to all-ones")]),
        case("gelu", "gelu", f.gelu_forward, f.gelu_backward, dict(x=arr(2, 5, 7, scale=2.0)), dict(x=0)),
        # a fresh generator with the same seed on every call: the same mask, so it can be differenced
        case("dropout", "dropout", lambda x: f.dropout_forward(x, p_drop, np.random.default_rng(7)),
             f.dropout_backward, dict(x=arr(2, 5, 7)), dict(x=0),
             factors={"1/(1-p)": 1 / (1 - p_drop), "1-p": 1 - p_drop}),
        case("attention", "attention", lambda qkv: f.attention_forward(qkv, 2), f.attention_backward,
             dict(qkv=arr(2, 5, 3 * 8)), dict(qkv=0), parts=qkv, factors=heads),
        case("attention_dropout", "attention",
             lambda qkv: f.attention_forward(qkv, 2, p_att, np.random.default_rng(3)),
             f.attention_backward, dict(qkv=arr(2, 5, 3 * 8)), dict(qkv=0), parts=qkv, factors={**heads, **dropped}),
        case("attention_one_query", "attention",  # one query per sequence, as the last block of a classifier
             lambda qkv: f.attention_forward(qkv, 2, p_att, np.random.default_rng(3), query_pos),
             f.attention_backward, dict(qkv=arr(2, 5, 3 * 8)), dict(qkv=0), parts=qkv, factors={**heads, **dropped}),
        case("cross_entropy", "cross_entropy", lambda logits: f.cross_entropy_forward(logits, targets),
             lambda G, cache: f.cross_entropy_backward(float(G), cache),
             dict(logits=arr(6, 5, scale=2.0)), dict(logits=0),
             factors={"N (the rows of the mean)": 6.0, "1/N": 1 / 6},
             invariants=[rows_sum_to_zero("logits", "dlogits", "the softmax of a row sums to 1 whatever the "
                                                               "logits, so its gradient is orthogonal to all-ones")]),
        # a language model's loss: rows whose target is -100 (padding, a masked prompt) do not count,
        # and the mean is over the M = 4 counted rows, not the N = 6 rows
        case("masked_cross_entropy", "masked_cross_entropy",
             lambda logits: f.masked_cross_entropy_forward(logits, masked_targets),
             lambda G, cache: f.masked_cross_entropy_backward(float(G), cache),
             dict(logits=arr(6, 5, scale=2.0)), dict(logits=0),
             factors={"M/N (the mean over all N = 6 rows, not the M = 4 counted)": 4 / 6,
                      "M (the counted rows of the mean)": 4.0, "1/M": 1 / 4},
             invariants=[rows_sum_to_zero("logits", "dlogits", "the softmax of a row sums to 1 whatever the "
                                                               "logits, so its gradient is orthogonal to all-ones"),
                         rows_are_zero("logits", "dlogits", masked_targets == -100,
                                       "an ignored row has no term in the loss")]),
    ]
    w, b = arr(7, 9), arr(9)  # frozen: the LoRA linear returns no gradient for them
    checks.append(case("lora_linear", "lora_linear", lambda x, A, B: f.lora_linear_forward(x, w, b, A, B, s),
                       f.lora_linear_backward, dict(x=arr(2, 5, 7), A=arr(7, 3), B=arr(3, 9)), dict(x=0, A=1, B=2),
                       factors={"s (the LoRA scale)": s, "1/s": 1 / s}))
    return checks


def tiny_config():
    """The tiny GPT-2 the model checks use: V=11, T<=7, C=8, NH=2, L=2."""
    from .config import GPTConfig

    return GPTConfig(vocab_size=11, context_length=7, emb_dim=8, n_heads=2, n_layers=2, drop_rate=0.0)


def check_model(model, idx, name, seed=0, tol=MODEL_TOL, h=1e-5):
    """Finite-difference check of every trainable parameter of a whole model, with the
    loss sum(logits * G) for a random G."""
    xp = model.xp
    logits = model.forward(idx)
    G = xp.asarray(np.random.default_rng(seed).standard_normal(logits.shape))
    grads = model.backward(G)

    def loss():
        return float((model.forward(idx, keep_cache=False) * G).sum())

    numeric = {n: numerical_gradient(loss, model.params[n], h) for n in model.trainable}
    return compare(name, grads, numeric, tol)


def model_checks(device="cpu", seed=0):
    """The whole tiny GPT-2 (all parameters), and the same with LoRA on every target and a
    replaced 3-class head, with B set non-zero so that every LoRA gradient is exercised;
    not yet run."""
    from .lora import apply_lora
    from .model import GPTModel

    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])  # repeated ids

    def gpt2():
        model = GPTModel(tiny_config(), seed=seed, dtype="float64", device=device)
        return check_model(model, idx, "gpt2", seed)

    def gpt2_lora():
        model = GPTModel(tiny_config(), seed=seed, dtype="float64", device=device).replace_head(3)
        apply_lora(model, rank=2, alpha=3, targets="all", seed=seed)
        rng = np.random.default_rng(seed + 1)
        for n in model.trainable:
            if n.endswith("lora_B"):
                model.params[n][...] = model.xp.asarray(rng.standard_normal(model.params[n].shape) * 0.5)
        return check_model(model, idx, "gpt2_lora", seed)

    return [Check("gpt2", gpt2, MODEL_TOL), Check("gpt2_lora", gpt2_lora, MODEL_TOL)]


def check_reference(params, idx, n_heads, lora_scale, positions, name, seed=0, tol=MODEL_TOL, h=1e-5):
    """Finite-difference check of every parameter of the reference model
    (minilora/reference.py), with the loss sum(logits * G) for a random G."""
    from . import reference

    logits, acts = reference.forward(params, idx, n_heads, lora_scale, positions)
    G = np.random.default_rng(seed).standard_normal(logits.shape)
    grads, _ = reference.backward(G, params, acts, n_heads, lora_scale)

    def loss():
        return float((reference.forward(params, idx, n_heads, lora_scale, positions)[0] * G).sum())

    numeric = {n: numerical_gradient(loss, params[n], h) for n in params}
    return compare(name, grads, numeric, tol)


def reference_checks(seed=0):
    """The reference model (always NumPy): the plain GPT-2 with its tied LM head, and
    with LoRA on every linear, a 3-class head read at one position per sequence; not yet run."""
    from .lora import apply_lora
    from .model import GPTModel

    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])  # repeated ids
    cfg = tiny_config()

    def plain():
        params = GPTModel(cfg, seed=seed, dtype="float64").params
        return check_reference(params, idx, cfg.n_heads, 1.0, None, "reference", seed)

    def with_lora():
        model = apply_lora(GPTModel(cfg, seed=seed, dtype="float64").replace_head(3), rank=2, alpha=3, seed=seed)
        rng = np.random.default_rng(seed + 1)
        for n in model.trainable:  # B non-zero, so that every LoRA gradient is exercised
            if n.endswith("lora_B"):
                model.params[n][...] = rng.standard_normal(model.params[n].shape) * 0.5
        return check_reference(model.params, idx, cfg.n_heads, model.lora.scale, np.array([4, 2]),
                               "reference_lora", seed)

    return [Check("reference", plain, MODEL_TOL), Check("reference_lora", with_lora, MODEL_TOL)]


def missing_function(error):
    """The function a NotImplementedError stands for. undefined() says which; an exercise
    stub names itself in the message (NotImplementedError("dropout_backward")); a bare
    `raise NotImplementedError` (or one whose message names no function) is read off the
    traceback: the innermost frame is the stub that raised it."""
    if getattr(error, "function", None):
        return error.function
    frames = traceback.extract_tb(error.__traceback__)
    words = str(error).split()
    if words and (words[0] in LAYER_FUNCTIONS or words[0] in {f.name for f in frames}):
        return words[0]
    return frames[-1].name if frames else None


def run_check(check):
    """Run one check; whatever goes wrong comes back as its result, so one broken layer
    never hides the report on the others:

    - a NotImplementedError from one of the check's own functions (its layer's stub) is
      "not implemented"; from another function it calls (attention_backward calling a
      stubbed dropout_backward) it is "needs dropout_backward", problem "needs NAME";
    - an exception inside a layer function is the one line reporting() made of it;
    - any other exception, its type and message."""
    try:
        return check.run()
    except NotImplementedError as e:
        name = missing_function(e)
        if check.own and name and name not in check.own:
            return CheckResult(check.name, float("nan"), {}, check.tol, problem=f"needs {name}", needs=name)
        return CheckResult(check.name, float("nan"), {}, check.tol, problem="not implemented")
    except LayerFunctionError as e:
        return CheckResult(check.name, float("nan"), {}, check.tol, problem=str(e))
    except Exception as e:
        return CheckResult(check.name, float("nan"), {}, check.tol, problem=f"{type(e).__name__}: {e}")


def select(checks, only):
    """The checks named in `only` (None: all). A name also selects its variants, so
    "attention" runs attention, attention_dropout and attention_one_query, and "gpt2"
    runs gpt2 and gpt2_lora. A name that selects nothing is an error listing the valid ones."""
    if not only:
        return checks
    unknown = [n for n in only if not any(c.name == n or c.name.startswith(n + "_") for c in checks)]
    if unknown:
        raise ValueError(f"unknown check {', '.join(map(repr, unknown))}; "
                         f"valid names: {', '.join(c.name for c in checks)}")
    return [c for c in checks if any(c.name == n or c.name.startswith(n + "_") for n in only)]


def load_layers(path):
    """A learner's layers file (e.g. examples/exercises/layers.py), loaded by path as a module."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"minilora_learner_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a learner's syntax error or failed import: one line, not a traceback
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        raise ValueError(f"cannot load {path}{where}: {type(e).__name__}: {e}") from e
    return module


def run_gradchecks(device="cpu", seed=0, only=None, fns=None):
    """Run the checks and return their CheckResults: each layer, the whole model with and
    without LoRA, and the reference model. only: names to run (see select). fns: a learner's layer functions
    (see layer_checks) or model-level exercises (minilora/exercise_checks.py); then only the
    checks of what the learner's file defines run (the layer checks for a file that defines
    neither), since the model and reference checks exercise the project's models."""
    from .exercise_checks import MODEL_EXERCISE_FUNCTIONS, model_exercise_checks

    xp = backend.get_xp(device)
    if fns is None:
        checks = layer_checks(xp, seed) + model_checks(device, seed) + reference_checks(seed)
    else:
        defines = lambda names: any(getattr(fns, n, None) for n in names)  # noqa: E731
        exercises = defines(MODEL_EXERCISE_FUNCTIONS)
        checks = layer_checks(xp, seed, fns) if defines(LAYER_FUNCTIONS) or not exercises else []
        checks += model_exercise_checks(fns, seed) if exercises else []
    return [run_check(c) for c in select(checks, only)]


def format_table(results):
    """A plain-text table, one line per check, then what the learner should know: the
    checks not implemented yet, those waiting for another function, and for every
    check that did not pass what went wrong: the worst entry with both values and the
    error of each input (or part), the invariants broken, or why it could not run;
    and every hint (a constant factor named, ...), whichever check set it."""
    lines = [f"{'check':<20} {'max rel error':>14} {'tolerance':>10}  result", "-" * 56]
    for r in results:
        err = f"{r.max_rel_error:>14.3e}" if np.isfinite(r.max_rel_error) else f"{'-':>14}"
        result = {"passed": "ok", "failed": "FAIL", "needs": f"needs {r.needs}"}.get(r.status, r.status)
        lines.append(f"{r.name:<20} {err} {r.tol:>10.0e}  {result}")
    todo = [r.name for r in results if r.status == "not implemented"]
    if todo:
        lines.append(f"\nnot implemented yet (the backward raises NotImplementedError): {', '.join(todo)}")
    waiting = {}
    for r in results:
        if r.status == "needs":
            waiting.setdefault(r.needs, []).append(r.name)
    for needed, names in waiting.items():
        one = len(names) == 1
        lines.append(f"\n{', '.join(names)}: {'needs' if one else 'need'} {needed} (not defined yet, or still "
                     f"raising NotImplementedError); write it first, then "
                     f"{'this check runs' if one else 'these checks run'}")
    for r in results:
        if r.status in ("not implemented", "needs") or r.passed:  # a passing check carries no hint
            continue
        if r.problem is not None:
            lines.append(f"\n{r.name}: {r.problem}")
        else:
            lines += failure_lines(r)
        if r.hint:
            lines.append(f"  hint: {r.hint}")
    return "\n".join(lines)


def failure_lines(r):
    """The lines of one failed check's report: its worst entry, each input's error, and
    the invariants it breaks."""
    w = r.worst
    entry_error = abs(w["analytic"] - w["numeric"]) / (abs(w["analytic"]) + abs(w["numeric"]) or 1.0)
    lines = [f"\n{r.name}: worst entry {w['input']}[{', '.join(map(str, w['index']))}]: "
             f"analytic {w['analytic']:.6e}, numeric {w['numeric']:.6e} (relative error {entry_error:.2e})"]
    if len(r.errors) <= 4:
        lines.append("  relative error per input: " + ", ".join(f"{k} {e:.1e}" for k, e in r.errors.items()))
    else:  # a whole model: the parameters still right show where, going backward, it goes wrong
        right = [k for k, e in r.errors.items() if e < r.tol]
        shown = ", ".join(right[:8]) + (", ..." if len(right) > 8 else "")
        lines.append(f"  {len(r.errors) - len(right)} of {len(r.errors)} parameters over the tolerance; "
                     f"within it: {shown or 'none'}")
    lines += [f"  violated: {line}" for line in r.violations or []]
    return lines
