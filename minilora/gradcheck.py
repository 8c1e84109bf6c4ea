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

A check that fails says where: the input (or model parameter) whose gradient is
furthest off, and in it the entry where the analytic and numerical values differ
most, with both values (CS231n's ``grad_check_sparse`` prints the same pair). The
checks are a list of named, not yet run ``Check``s, so ``minilora gradcheck --only
NAME`` runs only what it names, and the layer checks take their functions from a
namespace: minilora's own layers, or a learner's file (``--module``, see
examples/exercises/), which then goes through exactly the same checks.
"""

import importlib.util
import types
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from . import backend, layers, lora

LAYER_TOL = 1e-7
MODEL_TOL = 1e-6

# The functions the layer checks call, by name. The project's own live in minilora.layers
# and minilora.lora; `minilora gradcheck --module FILE` takes them from a learner's file
# instead (examples/exercises/layers.py), so both go through exactly the same checks.
LAYER_FUNCTIONS = [f"{layer}_{half}" for layer in ("embedding", "linear", "layernorm", "gelu", "dropout",
                                                   "attention", "cross_entropy", "lora_linear")
                   for half in ("forward", "backward")]
PROJECT_LAYERS = types.SimpleNamespace(**{name: getattr(layers, name, None) or getattr(lora, name)
                                           for name in LAYER_FUNCTIONS})


@dataclass
class CheckResult:
    name: str
    max_rel_error: float  # worst over the checked inputs (nan when the check could not run)
    errors: dict  # input name -> relative error
    tol: float
    worst: dict = None  # the entry that differs most: input, index, analytic, numeric (see compare)
    problem: str = None  # why the check could not run: "not implemented", or the exception raised

    @property
    def passed(self):
        return bool(self.problem is None and np.isfinite(self.max_rel_error) and self.max_rel_error < self.tol)

    @property
    def status(self):
        """"passed", "failed" or "not implemented" (a backward that raises NotImplementedError)."""
        if self.problem == "not implemented":
            return self.problem
        return "passed" if self.passed else "failed"

    def to_dict(self):
        err = self.max_rel_error
        return {"name": self.name, "max_rel_error": float(err) if np.isfinite(err) else None,
                "passed": self.passed, "status": self.status, "tolerance": self.tol,
                "errors": self.errors, "worst": self.worst, "problem": self.problem}


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


def compare(name, analytic, numeric, tol):
    """The CheckResult of gradients analytic[k] against numeric[k] (dicts keyed by input name).

    Besides each input's relative error it names the worst entry, as CS231n's
    ``grad_check_sparse`` prints "numerical: ... analytic: ...": in the input with the
    largest error, the index where the two gradients differ most, with both values.
    That is where to start looking when a backward is wrong.
    """
    errors = {}
    for k, n in numeric.items():
        a = analytic[k]
        if a is None or tuple(np.shape(a)) != n.shape:
            raise ValueError(f"the gradient of {k} has shape {None if a is None else tuple(np.shape(a))}, "
                             f"expected {n.shape}")
        errors[k] = rel_error(a, n)
    key = max(errors, key=lambda k: errors[k] if np.isfinite(errors[k]) else np.inf)
    a = backend.to_numpy(analytic[key]).astype(np.float64)
    n = numeric[key]
    diff = np.abs(a - n)
    i = np.unravel_index(np.argmax(np.where(np.isnan(diff), np.inf, diff)), n.shape)
    worst = {"input": key, "index": [int(j) for j in i], "analytic": float(a[i]), "numeric": float(n[i])}
    return CheckResult(name, errors[key], errors, tol, worst)


def check_layer(name, forward, backward, inputs, wrt, seed=0, tol=LAYER_TOL, h=1e-5):
    """Check backward(G, cache) against finite differences of sum(forward(**inputs) * G).

    inputs: dict of keyword arguments to forward (arrays are perturbed in place);
    wrt: dict input name -> position of its gradient in backward's returned tuple.
    """
    xp = backend.get_array_module(next(v for v in inputs.values() if hasattr(v, "shape")))
    out, cache = forward(**inputs)
    G = xp.asarray(np.random.default_rng(seed).standard_normal(np.shape(out)))
    grads = backward(G, cache)

    def loss():
        return float((forward(**inputs)[0] * G).sum())

    numeric = {k: numerical_gradient(loss, inputs[k], h) for k in wrt}
    return compare(name, {k: grads[pos] for k, pos in wrt.items()}, numeric, tol)


@dataclass
class Check:
    """One named gradient check, not yet run: run() does the finite differences and
    returns its CheckResult. Kept lazy so that ``--only`` pays only for what it names."""

    name: str
    run: Callable
    tol: float = LAYER_TOL


def undefined(name):
    """Stands in for a function a learner's file does not define: reported as not implemented."""

    def missing(*args, **kwargs):
        raise NotImplementedError(f"{name} is not defined")

    return missing


def layer_checks(xp, seed=0, fns=PROJECT_LAYERS):
    """Every layer's check on odd, non-square float64 shapes (B=2, T=5, ...), not yet run.

    fns: where the ``*_forward`` / ``*_backward`` functions come from (any object with
    those attributes: the project's by default, or a learner's module). The inputs are
    drawn here, in a fixed order, so each check sees the same numbers whichever run.
    """
    f = types.SimpleNamespace(**{name: getattr(fns, name, None) or undefined(name) for name in LAYER_FUNCTIONS})
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return xp.asarray(rng.standard_normal(shape) * scale)

    idx = xp.asarray(np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]]))  # repeated ids on purpose
    query_pos = xp.asarray(np.array([3, 0]))
    targets = xp.asarray(np.array([0, 4, 4, 1, 2, 4]))  # repeated classes
    cases = [  # name, forward, backward, inputs (perturbed in place), input -> position of its gradient
        ("embedding", lambda wte, wpe: f.embedding_forward(idx, wte, wpe), f.embedding_backward,
         dict(wte=arr(11, 6), wpe=arr(7, 6)), dict(wte=0, wpe=1)),
        ("linear", f.linear_forward, f.linear_backward,
         dict(x=arr(2, 5, 7), w=arr(7, 3), b=arr(3)), dict(x=0, w=1, b=2)),
        ("layernorm", f.layernorm_forward, f.layernorm_backward,
         dict(x=arr(2, 5, 8, scale=3.0) + 1.5, w=arr(8), b=arr(8)), dict(x=0, w=1, b=2)),
        ("gelu", f.gelu_forward, f.gelu_backward, dict(x=arr(2, 5, 7, scale=2.0)), dict(x=0)),
        # a fresh generator with the same seed on every call: the same mask, so it can be differenced
        ("dropout", lambda x: f.dropout_forward(x, 0.3, np.random.default_rng(7)), f.dropout_backward,
         dict(x=arr(2, 5, 7)), dict(x=0)),
        ("attention", lambda qkv: f.attention_forward(qkv, 2), f.attention_backward,
         dict(qkv=arr(2, 5, 3 * 8)), dict(qkv=0)),
        ("attention_dropout", lambda qkv: f.attention_forward(qkv, 2, 0.25, np.random.default_rng(3)),
         f.attention_backward, dict(qkv=arr(2, 5, 3 * 8)), dict(qkv=0)),
        ("attention_one_query",  # one query per sequence, as the last block of a classifier
         lambda qkv: f.attention_forward(qkv, 2, 0.25, np.random.default_rng(3), query_pos),
         f.attention_backward, dict(qkv=arr(2, 5, 3 * 8)), dict(qkv=0)),
        ("cross_entropy", lambda logits: f.cross_entropy_forward(logits, targets),
         lambda G, cache: f.cross_entropy_backward(float(G), cache),
         dict(logits=arr(6, 5, scale=2.0)), dict(logits=0)),
    ]
    w, b = arr(7, 9), arr(9)  # frozen: the LoRA linear returns no gradient for them
    cases.append(("lora_linear", lambda x, A, B: f.lora_linear_forward(x, w, b, A, B, 1.7), f.lora_linear_backward,
                  dict(x=arr(2, 5, 7), A=arr(7, 3), B=arr(3, 9)), dict(x=0, A=1, B=2)))
    return [Check(case[0], partial(check_layer, *case)) for case in cases]


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


def run_check(check):
    """Run one check. A backward that raises NotImplementedError (an exercise stub) comes
    back "not implemented", any other exception as a failure that names it: one broken
    layer never hides the report on the others."""
    try:
        return check.run()
    except NotImplementedError:
        return CheckResult(check.name, float("nan"), {}, check.tol, problem="not implemented")
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
    (see layer_checks); then only the layer checks run, since the model and reference
    checks exercise the project's models, not those functions."""
    xp = backend.get_xp(device)
    if fns is None:
        checks = layer_checks(xp, seed) + model_checks(device, seed) + reference_checks(seed)
    else:
        checks = layer_checks(xp, seed, fns)
    return [run_check(c) for c in select(checks, only)]


def format_table(results):
    """A plain-text table, one line per check, then for every check that did not pass
    what went wrong: the worst entry with both values, or why it could not run."""
    lines = [f"{'check':<20} {'max rel error':>14} {'tolerance':>10}  result", "-" * 56]
    for r in results:
        err = f"{r.max_rel_error:>14.3e}" if np.isfinite(r.max_rel_error) else f"{'-':>14}"
        result = {"passed": "ok", "failed": "FAIL"}.get(r.status, r.status)
        lines.append(f"{r.name:<20} {err} {r.tol:>10.0e}  {result}")
    todo = [r.name for r in results if r.status == "not implemented"]
    if todo:
        lines.append(f"\nnot implemented yet (the backward raises NotImplementedError): {', '.join(todo)}")
    for r in results:
        if r.passed or r.status == "not implemented":
            continue
        if r.problem is not None:
            lines.append(f"\n{r.name}: {r.problem}")
            continue
        w = r.worst
        entry_error = abs(w["analytic"] - w["numeric"]) / (abs(w["analytic"]) + abs(w["numeric"]) or 1.0)
        lines.append(f"\n{r.name}: worst entry {w['input']}[{', '.join(map(str, w['index']))}]: "
                     f"analytic {w['analytic']:.6e}, numeric {w['numeric']:.6e} "
                     f"(relative error {entry_error:.2e})")
        if len(r.errors) <= 4:
            lines.append("  relative error per input: " + ", ".join(f"{k} {e:.1e}" for k, e in r.errors.items()))
        else:  # a whole model: the parameters still right show where, going backward, it goes wrong
            right = [k for k, e in r.errors.items() if e < r.tol]
            shown = ", ".join(right[:8]) + (", ..." if len(right) > 8 else "")
            lines.append(f"  {len(r.errors) - len(right)} of {len(r.errors)} parameters over the tolerance; "
                         f"within it: {shown or 'none'}")
    return "\n".join(lines)
