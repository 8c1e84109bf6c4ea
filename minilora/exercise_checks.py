"""Checks of the model-level exercises: the whole GPT-2 backward, and AdamW.

examples/exercises/model.py asks a learner for the backward of the whole model (with
the LoRA linear and the tied head as two smaller pieces of it), examples/exercises/adamw.py
for one AdamW step. These checks compare the learner's functions with minilora's own:

- the model pieces against minilora/reference.py, which `minilora gradcheck` itself
  checks against finite differences (reference_checks). Comparing to it is therefore the
  finite-difference check, one step removed, and needs no differencing of its own: the
  learner's gradients must equal the reference's to EXERCISE_TOL.
- adamw_step against minilora.optim.AdamW, which is torch's update exactly.

A wrong answer is named where it first goes wrong: the first activation, reading the
backward from the loss down to the embedding, whose gradient differs from the
reference's (everything before it is right, so the mistake is in the one step that
made it), then the first parameter. Where the wrong value matches a known mistake it
is said in words (result.hint): "residual fan-in missing its branch" when the
gradient equals the skip path alone, "missing the tied head's contribution" when
dwte equals the embedding's part alone, "no bias correction" when the AdamW run
equals that variant's run.

    checks = model_exercise_checks(gradcheck.load_layers("examples/exercises/model.py"))
    results = [gradcheck.run_check(c) for c in checks]
"""

import copy
import types
from functools import partial

import numpy as np

from . import reference as ref
from .gradcheck import Check, CheckResult, rel_error, tiny_config, undefined

# The functions a learner's module may define for these exercises.
MODEL_FUNCTIONS = ["linear_with_adapters_backward", "tied_head_backward", "model_backward"]
ADAMW_FUNCTIONS = ["adamw_step"]
MODEL_EXERCISE_FUNCTIONS = MODEL_FUNCTIONS + ADAMW_FUNCTIONS

# Tolerance of the model pieces against the reference. Both sides compute the same
# sums in float64, possibly in another order (einsum vs reshape-and-matmul, one
# adapter at a time or fused): each order's rounding error is ~ k * eps_machine
# relative for a sum of k terms, k <= 4C = 32 here, compounded over the ~25 steps of
# the tiny model's backward: ~ 25 * 32 * 1.1e-16 ~ 1e-13. 1e-10 leaves a factor
# 1000 for other orders, while a dropped term (a missing residual path, a missing
# scale) is a relative error of order 0.1 to 1.
EXERCISE_TOL = 1e-10

# Tolerance of AdamW against ml.AdamW. An AdamW step is ~10 elementwise float64
# operations per entry, each rounded to within eps_machine = 1.1e-16 relative; written
# in the textbook order (m_hat / (sqrt(v_hat) + eps)) instead of torch's (the same
# expression rearranged) it may differ by ~10 eps per step, ~40 eps ~ 5e-15 after 4
# steps. 1e-12 leaves a factor 200; the subtlest mistake checked (the decay applied
# after the update instead of before) differs by 8e-5 on these gradients (measured),
# eps inside the square root by 3e-2, a missing bias correction by 0.07 to 0.7.
ADAMW_TOL = 1e-12

IDX = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3]])  # B=2, T=5, repeated ids on purpose
POSITIONS = np.array([4, 2])  # one position per sequence, for the classifier
BLOCK_TARGETS = ["c_attn.q", "c_attn.k", "c_attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


# ------------------------------------------------------------------------------ helpers


def random_params(head=None, lora_targets=None, seed=0):
    """The tiny GPT-2 (gradcheck.tiny_config) as a params dict, float64, with random
    values in every parameter (so no layernorm weight is 1 and no bias or LoRA B is 0:
    every term of every gradient is exercised), and its LoRA scale (1.0 without LoRA)."""
    from .lora import apply_lora
    from .model import GPTModel

    model = GPTModel(tiny_config(), seed=seed, dtype="float64")
    if head:
        model.replace_head(head)
    if lora_targets:
        apply_lora(model, rank=2, alpha=3, targets=lora_targets, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, value in model.params.items():
        noise = rng.standard_normal(value.shape) * 0.3
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            noise += 1.0
        value[...] = noise
    return dict(model.params), (model.lora.scale if model.lora is not None else 1.0)


def activation_order(n_layers):
    """The activations of reference.forward in backward order, from the loss down to the
    embedding: the order in which a backward computes their gradients."""
    names = ["ln_f", "x_final"]
    for i in reversed(range(n_layers)):
        h = f"h.{i}."
        names += [h + a for a in ("mlp.c_proj", "mlp.gelu", "mlp.c_fc", "ln_2", "x_mid",
                                  "attn.c_proj", "attn.y", "attn.c_attn", "ln_1", "x")]
    return names + ["embedding"]


def close(a, b, tol):
    return a is not None and np.shape(a) == np.shape(b) and rel_error(a, b) < tol


def scale_factor(a, b):
    """The c that makes c * b closest to a (least squares), or None when b is zero."""
    bb = float((b * b).sum())
    return None if bb == 0 else float((a * b).sum()) / bb


def scaled_hint(key, a, b, tol, s):
    """A hint when a is a multiple (not 1) of b: a missing or doubled factor."""
    c = scale_factor(a, b)
    if c is None or abs(c - 1.0) < 1e-6 or not close(a, c * b, tol):
        return None
    known = {s: f"the LoRA scale s = {s:g}", 1 / s: f"1 / s (s = {s:g}, the LoRA scale)", -1.0: "-1: a sign"}
    why = next((text for value, text in known.items() if abs(c - value) < 1e-9 and value != 1.0), None)
    return f"{key}: yours is the reference's times {c:.6g}" + (f", which is {why}" if why else "")


def compare_in_order(pairs, tol):
    """Compare (key, yours, expected) in order. Returns errors (key -> relative error;
    inf for a missing or misshapen one), the first wrong key (or None), and a problem
    line when that one is missing or misshapen."""
    errors, first, problem = {}, None, None
    for key, a, n in pairs:
        if a is None or np.shape(a) != np.shape(n):
            errors[key] = float("inf")
            why = "missing" if a is None else f"has shape {tuple(np.shape(a))}, expected {tuple(np.shape(n))}"
        else:
            errors[key] = rel_error(a, n)
            why = None
        if first is None and not errors[key] < tol:
            first, problem = key, (f"{key}: {why}" if why else None)
    return errors, first, problem


def result(name, pairs, tol, hint_for):
    """The CheckResult of comparing `pairs` (see compare_in_order). worst is the entry
    that differs most in the first wrong array, in gradcheck's form ("numeric" holds
    the expected value there); result.hint is hint_for(key, yours, expected) of that
    first wrong one, or None when all are right."""
    errors, first, problem = compare_in_order(pairs, tol)
    worst_error = max(errors.values(), key=lambda e: np.inf if np.isnan(e) else e)  # a NaN counts as worst
    out = CheckResult(name, worst_error, errors, tol, problem=problem)
    if first is None:
        return out
    yours, expected = next((a, n) for key, a, n in pairs if key == first)
    if problem is None:
        diff = np.abs(np.asarray(yours, dtype=np.float64) - expected)
        i = np.unravel_index(np.argmax(np.where(np.isnan(diff), np.inf, diff)), diff.shape)
        out.worst = {"input": first, "index": [int(j) for j in i],
                     "analytic": float(np.asarray(yours)[i]), "numeric": float(expected[i])}
    out.hint = hint_for(first, yours, expected)
    return out


def functions(fns, names):
    """The learner's functions `names` from fns (a module); one it does not define
    stands in as not implemented."""
    return types.SimpleNamespace(**{n: getattr(fns, n, None) or undefined(n) for n in names})


def no_extra_gradients(yours, expected, who):
    """A gradient under a name that has none expected is an error: it would be applied
    to a parameter that does not exist, or should not move."""
    extra = sorted(set(yours) - set(expected))
    if extra:
        raise ValueError(f"{who} returned gradients for {', '.join(extra[:4])}, which it should not "
                         f"(expected only {', '.join(list(expected)[:4])}, ...)")


def shaped_like(yours, expected):
    return yours is not None and np.shape(yours) == np.shape(expected)


# ------------------------------------------------------------ the linear with its adapters

LINEAR_HINTS = {
    "dx": "dx has two paths that add: dy @ w^T, and per adapter s * (dy[..., cols] @ B^T) @ A^T",
    "weight": "the frozen linear: dw = x^T dy, summed over batch and time",
    "bias": "the frozen linear: db = dy summed over batch and time",
    "lora_A": "with d = dy[..., cols] (the columns the adapter wrote) and g = s * d @ B^T: dA = x^T g",
    "lora_B": "with d = dy[..., cols] (the columns the adapter wrote): dB = s * (x A)^T d",
}


def check_linear_with_adapters(fns, seed=0):
    """linear_with_adapters_backward against reference.lora_linear_backward at four
    linears: c_attn with its three Q/K/V adapters, mlp.c_fc with one, the classifier head
    with one, and a linear without adapters. Compared: dx, then every gradient in grads."""
    f = functions(fns, MODEL_FUNCTIONS)
    lora_params, s = random_params(head=3, lora_targets="all", seed=seed)
    plain_params, _ = random_params(seed=seed)
    rng = np.random.default_rng(seed + 2)
    pairs, frozen_dx = [], {}
    for params, name in ((lora_params, "h.0.attn.c_attn"), (lora_params, "h.1.mlp.c_fc"),
                         (lora_params, "out_head"), (plain_params, "h.1.attn.c_proj")):
        n_in, n_out = params[name + ".weight"].shape
        x = rng.standard_normal((*IDX.shape, n_in))  # [B, T, in]
        dy = rng.standard_normal((*IDX.shape, n_out))  # [B, T, out]
        expected = {}
        dx = ref.lora_linear_backward(dy, params, name, x, s, expected)
        yours = {}
        your_dx = f.linear_with_adapters_backward(dy.copy(), copy.deepcopy(params), name, x.copy(), s, yours)
        no_extra_gradients(yours, expected, f"linear_with_adapters_backward at {name}")
        pairs.append((f"{name}: dx", your_dx, dx))
        pairs += [(f"{name}: {k}", yours.get(k), g) for k, g in expected.items()]
        frozen_dx[name] = dy @ params[name + ".weight"].T  # [B, T, in]: the path through w alone

    def hint(key, yours, expected):
        name, what = key.split(": ", 1)
        if what == "dx" and shaped_like(yours, expected):
            if close(yours, frozen_dx[name], EXERCISE_TOL):
                return f"{name}: dx misses the adapters' path: each adapter adds s * (dy[..., cols] @ B^T) @ A^T"
            if close(yours, expected - frozen_dx[name], EXERCISE_TOL):
                return f"{name}: dx misses the frozen weight's path dy @ w^T"
        if yours is None and name.endswith("c_attn") and "lora" in what:
            return (f"{key} missing: c_attn carries up to three adapters, over the Q, K and V column "
                    f"blocks; loop over reference.adapters(params, name)")
        if yours is None:
            return f"{key} missing: every parameter of the linear gets its gradient, the frozen ones too"
        scaled = shaped_like(yours, expected) and scaled_hint(key, yours, expected, EXERCISE_TOL, s)
        return scaled or f"{key}: {LINEAR_HINTS[what.rsplit('.', 1)[-1]]}"

    return result("model_lora_linear", pairs, EXERCISE_TOL, hint)


# ------------------------------------------------------------------------ the tied head


def check_tied_head(fns, seed=0):
    """tied_head_backward(dlogits, x, wte) -> (dx, dwte) of logits = x wte^T, against
    reference.linear_backward of that linear (weight wte^T, no bias)."""
    f = functions(fns, MODEL_FUNCTIONS)
    cfg = tiny_config()
    rng = np.random.default_rng(seed + 3)
    x = rng.standard_normal((*IDX.shape, cfg.emb_dim))  # [B, T, C]
    wte = rng.standard_normal((cfg.vocab_size, cfg.emb_dim))  # [V, C]
    dlogits = rng.standard_normal((*IDX.shape, cfg.vocab_size))  # [B, T, V]
    dx, dw, _ = ref.linear_backward(dlogits, x, wte.T)  # dw is d(wte^T): [C, V]
    your_dx, your_dwte = f.tied_head_backward(dlogits.copy(), x.copy(), wte.copy())
    pairs = [("dx", your_dx, dx), ("dwte", your_dwte, dw.T)]

    def hint(key, yours, expected):
        if yours is not None and np.shape(yours) == expected.T.shape:
            return f"{key} has the transposed shape {np.shape(yours)}: wte is (V, C), and so is its gradient"
        scaled = shaped_like(yours, expected) and scaled_hint(key, yours, expected, EXERCISE_TOL, 1.0)
        return scaled or {"dx": "logits = x wte^T is a linear layer with weight wte^T: dx = dlogits @ wte",
                          "dwte": "dwte = dlogits^T x, summed over batch and time: (V, C)"}[key]

    return result("model_tied_head", pairs, EXERCISE_TOL, hint)


# ------------------------------------------------------------------------ the whole model


def step_into(name, head, positions):
    """In words: the step of the backward that computes the gradient of activation
    `name` from the ones before it (backward order)."""
    if name == "ln_f":
        step = ("the classifier head out_head (linear_with_adapters_backward: does model_lora_linear pass?)"
                if head else "the tied LM head: logits = ln_f wte^T, so d ln_f = dlogits @ wte "
                             "(tied_head_backward: does model_tied_head pass?)")
        if positions is not None:
            step += ("; the logits were read at one position per sequence, so scatter dlogits into "
                     "zeros of shape (B, T, classes) first")
        return step
    if name == "x_final":
        return "layernorm_backward of ln_f, at x_final"
    if name == "embedding":
        return "nothing: the stream entering block 0 is the embedding's output, so its gradient is h.0.x's"
    h, part = name[: name.index(".", 2) + 1], name[name.index(".", 2) + 1:]
    i = int(h.split(".")[1])
    steps = {
        "mlp.c_proj": "x = x_mid + mlp: the MLP's output gets the residual stream's gradient unchanged "
                      f"(that of {'x_final' if i == tiny_config().n_layers - 1 else f'h.{i + 1}.x'})",
        "mlp.gelu": f"the linear {h}mlp.c_proj (linear_with_adapters_backward: does model_lora_linear pass?)",
        "mlp.c_fc": f"gelu_backward, at acts['{h}mlp.c_fc']",
        "ln_2": f"the linear {h}mlp.c_fc (linear_with_adapters_backward: does model_lora_linear pass?)",
        "x_mid": "layernorm_backward of ln_2 at x_mid, plus the skip: dx = dx + dm",
        "attn.c_proj": "x_mid = x + attn: the attention's output gets x_mid's gradient unchanged",
        "attn.y": f"the linear {h}attn.c_proj (linear_with_adapters_backward: does model_lora_linear pass?)",
        "attn.c_attn": f"attention_backward, at acts['{h}attn.c_attn'] and acts['{h}attn.att']",
        "ln_1": f"the linear {h}attn.c_attn with its Q/K/V adapters "
                "(linear_with_adapters_backward: does model_lora_linear pass?)",
        "x": "layernorm_backward of ln_1 at x, plus the skip: dx = dx + da",
    }
    return steps[part]


def fan_in_hint(name, yours, expected, dacts):
    """At a residual fork (h.i.x_mid, h.i.x) the gradient is skip + branch: say which of
    the two alone the learner's equals, if one does."""
    h = name[: name.index(".", 2) + 1]
    if name.endswith("x_mid"):
        skip, branch = dacts[h + "mlp.c_proj"], "ln_2 -> MLP"  # the stream's gradient from above
    else:
        skip, branch = dacts[h + "attn.c_proj"], "ln_1 -> attention"
    if close(yours, skip, EXERCISE_TOL):
        return (f"{name}: residual fan-in missing its branch: {name} feeds both the skip connection and "
                f"the {branch} branch, so its gradient is the sum of both paths; yours is the skip's alone")
    if close(yours, expected - skip, EXERCISE_TOL):
        return (f"{name}: residual fan-in missing the skip path: {name} feeds both the skip connection "
                f"and the {branch} branch; yours is the branch's gradient alone, add the stream's (dx + ...)")
    return None


def check_model_backward(fns, name, head=None, lora_targets=None, positions=None, seed=0):
    """model_backward against reference.backward on the tiny model: the gradient of
    every activation in backward order, then of every parameter (in the order the
    reference's backward computes them, also from the loss down)."""
    f = functions(fns, MODEL_FUNCTIONS)
    cfg = tiny_config()
    params, s = random_params(head, lora_targets, seed)
    logits, acts = ref.forward(params, IDX, cfg.n_heads, s, positions)
    dlogits = np.random.default_rng(seed + 4).standard_normal(logits.shape)
    grads, dacts = ref.backward(dlogits, params, acts, cfg.n_heads, s)
    answer = f.model_backward(dlogits.copy(), copy.deepcopy(params), copy.deepcopy(acts), cfg.n_heads, s)
    if not (isinstance(answer, tuple) and len(answer) == 2 and all(isinstance(d, dict) for d in answer)):
        raise TypeError(f"model_backward must return (grads, dacts), two dicts; it returned {type(answer).__name__}")
    your_grads, your_dacts = answer
    no_extra_gradients(your_grads, grads, "model_backward")
    order = activation_order(cfg.n_layers)
    pairs = [(a, your_dacts.get(a), dacts[a]) for a in order]
    pairs += [(p, your_grads.get(p), g) for p, g in grads.items()]

    def hint(key, yours, expected):
        if yours is None:
            where = "dacts" if key in dacts else "grads"
            return f"{where}['{key}'] missing: the backward returns the gradient of every activation and parameter"
        if not shaped_like(yours, expected):
            return f"{key}: its gradient has the shape of what it is the gradient of"
        if key in dacts:
            before = order[order.index(key) - 1] if key != order[0] else None
            special = (fan_in_hint(key, yours, expected, dacts) if key.endswith((".x_mid", ".x")) else None)
            if special is None and before and close(yours, dacts[before], EXERCISE_TOL):
                special = f"{key}: yours equals the gradient of {before}: the step between them was skipped"
            right = f", and {before} before it is right" if before else ""
            return special or scaled_hint(key, yours, expected, EXERCISE_TOL, s) or (
                f"{key} is the first wrong gradient going backward{right}: look at the step that makes it, "
                f"{step_into(key, head, positions)}")
        if key == "wte.weight" and not head:
            embedding_part = ref.embedding_backward(dacts["embedding"], IDX, params["wte.weight"],
                                                    params["wpe.weight"])[0]  # [V, C]
            if close(yours, embedding_part, EXERCISE_TOL):
                return ("wte.weight: missing the tied head's contribution: the LM head reuses the token "
                        "table (logits = ln_f wte^T), so wte's gradient is the embedding's scatter-add "
                        "plus the head's dwte (tied_head_backward)")
            if close(yours, expected - embedding_part, EXERCISE_TOL):
                return ("wte.weight: missing the embedding's contribution: the token table is used by the "
                        "embedding and by the tied head, and the two gradients add")
        return scaled_hint(key, yours, expected, EXERCISE_TOL, s) or (
            f"{key}: every activation's gradient is right, so look at this parameter's own formula")

    return result(name, pairs, EXERCISE_TOL, hint)


# ------------------------------------------------------------------------------- AdamW


def adamw_variant(param, grad, m, v, t, lr, betas, eps, weight_decay, correct_m=True, correct_v=True,
                  decay="decoupled", eps_inside=False):
    """One AdamW step, right by default, or with one of the usual mistakes: a bias
    correction left out, decay as L2 ("l2": wd * p added to the gradient), not scaled by
    lr ("no_lr"), applied after the step ("after") or missing ("none"), eps inside the
    square root. Returns (param, m, v), new arrays."""
    b1, b2 = betas
    if decay == "l2":
        grad = grad + weight_decay * param
    elif decay == "decoupled":
        param = param * (1.0 - lr * weight_decay)
    elif decay == "no_lr":
        param = param * (1.0 - weight_decay)
    m = b1 * m + (1.0 - b1) * grad
    v = b2 * v + (1.0 - b2) * grad**2
    m_hat = m / (1.0 - b1**t) if correct_m else m
    v_hat = v / (1.0 - b2**t) if correct_v else v
    denom = np.sqrt(v_hat + eps) if eps_inside else np.sqrt(v_hat) + eps
    param = param - lr * m_hat / denom
    if decay == "after":
        param = param * (1.0 - lr * weight_decay)
    return param, m, v


ADAMW_MISTAKES = [  # (the mistake in words, the variant's arguments)
    ("no bias correction: m_hat = m / (1 - b1^t) and v_hat = v / (1 - b2^t) are missing",
     dict(correct_m=False, correct_v=False)),
    ("no bias correction of m: m_hat = m / (1 - b1^t) is missing", dict(correct_m=False)),
    ("no bias correction of v: v_hat = v / (1 - b2^t) is missing", dict(correct_v=False)),
    ("L2 decay instead of decoupled: wd * p was added to the gradient (that is Adam with L2, not AdamW); "
     "AdamW shrinks the parameter directly, p <- p (1 - lr wd)", dict(decay="l2")),
    ("the weight decay is not scaled by lr: p <- p (1 - lr wd), not p (1 - wd)", dict(decay="no_lr")),
    ("the weight decay is applied after the update; torch decays the parameter before it", dict(decay="after")),
    ("no weight decay", dict(decay="none")),
    ("eps inside the square root: the denominator is sqrt(v_hat) + eps", dict(eps_inside=True)),
]


def run_adamw(step, start, grads_seq, hyper):
    """Steps t = 1, 2, ... of `step` (adamw_step's signature) on every tensor of start,
    moments from zero, with the gradients grads_seq[t-1]. Returns, per step, the param,
    m and v of all tensors, each flattened and side by side."""
    state = {n: (p.copy(), np.zeros_like(p), np.zeros_like(p)) for n, p in start.items()}
    history = []
    for t, grads in enumerate(grads_seq, start=1):
        for n in state:
            p, m, v = state[n]
            answer = step(p.copy(), grads[n].copy(), m.copy(), v.copy(), t, **hyper)
            if not (isinstance(answer, tuple) and len(answer) == 3):
                raise TypeError(f"adamw_step must return (param, m, v); it returned {type(answer).__name__}")
            state[n] = tuple(np.asarray(a) for a in answer)
        history.append([np.concatenate([state[n][j].reshape(-1) for n in state]) for j in range(3)])
    return history


def check_adamw(fns, seed=0, steps=4):
    """adamw_step against ml.AdamW over `steps` steps of the tiny model (every parameter
    trained), with the real gradients of a cross-entropy loss and weight decay on:
    param, m and v of all tensors after each step. When the learner's run equals one of
    ADAMW_MISTAKES' runs, the hint names that mistake."""
    from .model import GPTModel
    from .optim import AdamW

    f = functions(fns, ADAMW_FUNCTIONS)
    model = GPTModel(tiny_config(), seed=seed, dtype="float64")
    # lr 1e-2 so that each step moves the parameters visibly; wd 0.1, the book's value
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    optimizer = AdamW(model, **hyper)
    targets = np.random.default_rng(seed + 5).integers(0, model.cfg.vocab_size, IDX.size)
    start = {n: model.params[n].copy() for n in model.trainable}
    grads_seq, expected = [], []
    for _ in range(steps):
        logits = model.forward(IDX)  # [B, T, V]
        dlogits = ref.cross_entropy_backward(logits.reshape(IDX.size, -1), targets).reshape(logits.shape)
        grads = model.backward(dlogits)
        grads_seq.append({n: g.copy() for n, g in grads.items()})
        optimizer.step(grads)
        expected.append([np.concatenate([arrays[n].reshape(-1) for n in start])
                         for arrays in (model.params, optimizer.m, optimizer.v)])
    yours = run_adamw(f.adamw_step, start, grads_seq, hyper)
    # m and v first: the parameter's update is made from them, so a wrong m or v is the cause
    pairs = [(f"step {t}: {what}", yours[t - 1][j], expected[t - 1][j])
             for t in range(1, steps + 1) for j, what in ((1, "m"), (2, "v"), (0, "param"))]

    def matches(run):
        return all(close(a, b, ADAMW_TOL) for a_step, b_step in zip(yours, run) for a, b in zip(a_step, b_step))

    def hint(key, got, want):
        for mistake, variant in ADAMW_MISTAKES:
            if matches(run_adamw(partial(adamw_variant, **variant), start, grads_seq, hyper)):
                return f"adamw: {mistake}"
        return {"param": "p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t), "
                         "v_hat = v / (1 - b2^t), t counted from 1",
                "m": "m <- b1 m + (1 - b1) g", "v": "v <- b2 v + (1 - b2) g^2"}[key.split(": ")[1]]

    return result("adamw", pairs, ADAMW_TOL, hint)


# ------------------------------------------------------------------------------ the list


def model_exercise_checks(fns, seed=0):
    """The checks of the model exercises that fns (a learner's module) attempts, not yet
    run: the model's (model_lora_linear, model_tied_head, model_backward and its _lora and
    _class variants) if it defines any of MODEL_FUNCTIONS, AdamW's if it defines
    adamw_step; all of them if it defines none. Run each with gradcheck.run_check."""
    attempts_model = any(getattr(fns, n, None) for n in MODEL_FUNCTIONS)
    attempts_adamw = any(getattr(fns, n, None) for n in ADAMW_FUNCTIONS)
    if not (attempts_model or attempts_adamw):
        attempts_model = attempts_adamw = True
    checks = []
    if attempts_model:
        checks += [
            Check("model_lora_linear", partial(check_linear_with_adapters, fns, seed), EXERCISE_TOL),
            Check("model_tied_head", partial(check_tied_head, fns, seed), EXERCISE_TOL),
            Check("model_backward", partial(check_model_backward, fns, "model_backward", seed=seed), EXERCISE_TOL),
            Check("model_backward_lora", partial(check_model_backward, fns, "model_backward_lora",
                                                 lora_targets=BLOCK_TARGETS, seed=seed), EXERCISE_TOL),
            Check("model_backward_class", partial(check_model_backward, fns, "model_backward_class",
                                                       head=3, lora_targets="all", positions=POSITIONS,
                                                       seed=seed), EXERCISE_TOL),
        ]
    if attempts_adamw:
        checks.append(Check("adamw", partial(check_adamw, fns, seed), ADAMW_TOL))
    return checks
