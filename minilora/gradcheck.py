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
"""

from dataclasses import dataclass

import numpy as np

from . import backend
from .layers import (
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from .lora import lora_linear_backward, lora_linear_forward

LAYER_TOL = 1e-7
MODEL_TOL = 1e-6


@dataclass
class CheckResult:
    name: str
    max_rel_error: float  # worst over the checked inputs
    errors: dict  # input name -> relative error
    tol: float

    @property
    def passed(self):
        return bool(np.isfinite(self.max_rel_error) and self.max_rel_error < self.tol)

    def to_dict(self):
        return {"name": self.name, "max_rel_error": self.max_rel_error, "passed": self.passed,
                "tolerance": self.tol, "errors": self.errors}


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

    errors = {k: rel_error(grads[pos], numerical_gradient(loss, inputs[k], h)) for k, pos in wrt.items()}
    return CheckResult(name, max(errors.values()), errors, tol)


def _fixed_rng_dropout(p, seed=7):
    """A dropout layer whose mask is the same on every call, so it can be differenced."""

    def forward(x):
        return dropout_forward(x, p, np.random.default_rng(seed))

    return forward


def layer_checks(xp, seed=0):
    """Every layer's check on odd, non-square float64 shapes (B=2, T=5, ...)."""
    rng = np.random.default_rng(seed)

    def arr(*shape, scale=1.0):
        return xp.asarray(rng.standard_normal(shape) * scale)

    idx = xp.asarray(np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]]))  # repeated ids on purpose
    query_pos = xp.asarray(np.array([3, 0]))
    results = [
        check_layer("embedding", lambda wte, wpe: embedding_forward(idx, wte, wpe), embedding_backward,
                    dict(wte=arr(11, 6), wpe=arr(7, 6)), dict(wte=0, wpe=1)),
        check_layer("linear", linear_forward, linear_backward,
                    dict(x=arr(2, 5, 7), w=arr(7, 3), b=arr(3)), dict(x=0, w=1, b=2)),
        check_layer("layernorm", layernorm_forward, layernorm_backward,
                    dict(x=arr(2, 5, 8, scale=3.0) + 1.5, w=arr(8), b=arr(8)), dict(x=0, w=1, b=2)),
        check_layer("gelu", gelu_forward, gelu_backward, dict(x=arr(2, 5, 7, scale=2.0)), dict(x=0)),
        check_layer("dropout", _fixed_rng_dropout(0.3), dropout_backward, dict(x=arr(2, 5, 7)), dict(x=0)),
        check_layer("attention", lambda qkv: attention_forward(qkv, 2), attention_backward,
                    dict(qkv=arr(2, 5, 3 * 8)), dict(qkv=0)),
        check_layer("attention_dropout",
                    lambda qkv: attention_forward(qkv, 2, 0.25, np.random.default_rng(3)), attention_backward,
                    dict(qkv=arr(2, 5, 3 * 8)), dict(qkv=0)),
        check_layer("attention_one_query",  # one query per sequence, as the last block of a classifier
                    lambda qkv: attention_forward(qkv, 2, 0.25, np.random.default_rng(3), query_pos),
                    attention_backward, dict(qkv=arr(2, 5, 3 * 8)), dict(qkv=0)),
    ]
    targets = xp.asarray(np.array([0, 4, 4, 1, 2, 4]))  # repeated classes
    results.append(check_layer(
        "cross_entropy", lambda logits: cross_entropy_forward(logits, targets),
        lambda G, cache: cross_entropy_backward(float(G), cache),
        dict(logits=arr(6, 5, scale=2.0)), dict(logits=0)))
    w, b = arr(7, 9), arr(9)  # frozen: the LoRA linear returns no gradient for them
    results.append(check_layer(
        "lora_linear", lambda x, A, B: lora_linear_forward(x, w, b, A, B, 1.7), lora_linear_backward,
        dict(x=arr(2, 5, 7), A=arr(7, 3), B=arr(3, 9)), dict(x=0, A=1, B=2)))
    return results


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

    errors = {n: rel_error(grads[n], numerical_gradient(loss, model.params[n], h)) for n in model.trainable}
    return CheckResult(name, max(errors.values()), errors, tol)


def model_checks(device="cpu", seed=0):
    """The whole tiny GPT-2 (all parameters) and the same with LoRA on every target and a
    replaced 3-class head, with B set non-zero so that every LoRA gradient is exercised."""
    from .lora import apply_lora
    from .model import GPTModel

    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])  # repeated ids
    model = GPTModel(tiny_config(), seed=seed, dtype="float64", device=device)
    results = [check_model(model, idx, "gpt2", seed)]
    model = GPTModel(tiny_config(), seed=seed, dtype="float64", device=device).replace_head(3)
    apply_lora(model, rank=2, alpha=3, targets="all", seed=seed)
    rng = np.random.default_rng(seed + 1)
    for n in model.trainable:
        if n.endswith("lora_B"):
            model.params[n][...] = model.xp.asarray(rng.standard_normal(model.params[n].shape) * 0.5)
    results.append(check_model(model, idx, "gpt2_lora", seed))
    return results


def check_reference(params, idx, n_heads, lora_scale, positions, name, seed=0, tol=MODEL_TOL, h=1e-5):
    """Finite-difference check of every parameter of the reference model
    (minilora/reference.py), with the loss sum(logits * G) for a random G."""
    from . import reference

    logits, acts = reference.forward(params, idx, n_heads, lora_scale, positions)
    G = np.random.default_rng(seed).standard_normal(logits.shape)
    grads, _ = reference.backward(G, params, acts, n_heads, lora_scale)

    def loss():
        return float((reference.forward(params, idx, n_heads, lora_scale, positions)[0] * G).sum())

    errors = {n: rel_error(grads[n], numerical_gradient(loss, params[n], h)) for n in params}
    return CheckResult(name, max(errors.values()), errors, tol)


def reference_checks(seed=0):
    """The reference model (always NumPy): the plain GPT-2 with its tied LM head, and
    with LoRA on every linear, a 3-class head read at one position per sequence."""
    from .lora import apply_lora
    from .model import GPTModel

    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])  # repeated ids
    cfg = tiny_config()
    plain = GPTModel(cfg, seed=seed, dtype="float64").params
    results = [check_reference(plain, idx, cfg.n_heads, 1.0, None, "reference", seed)]
    model = apply_lora(GPTModel(cfg, seed=seed, dtype="float64").replace_head(3), rank=2, alpha=3, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for n in model.trainable:  # B non-zero, so that every LoRA gradient is exercised
        if n.endswith("lora_B"):
            model.params[n][...] = rng.standard_normal(model.params[n].shape) * 0.5
    results.append(check_reference(model.params, idx, cfg.n_heads, model.lora.scale, np.array([4, 2]),
                                   "reference_lora", seed))
    return results


def run_gradchecks(device="cpu", seed=0):
    """All checks: each layer, the whole model with and without LoRA, and the reference model."""
    xp = backend.get_xp(device)
    return layer_checks(xp, seed) + model_checks(device, seed) + reference_checks(seed)


def format_table(results):
    """A plain-text table of the results, one line per check."""
    lines = [f"{'check':<20} {'max rel error':>14} {'tolerance':>10}  result", "-" * 56]
    for r in results:
        lines.append(f"{r.name:<20} {r.max_rel_error:>14.3e} {r.tol:>10.0e}  {'ok' if r.passed else 'FAIL'}")
    return "\n".join(lines)
