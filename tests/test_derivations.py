"""docs/derivations.md stays true: its worked numbers are recomputed with minilora's code
(float64) and must agree to the printed precision, a changed printed number fails, the
code it quotes word for word is still the code, and the section headings other files link
to exist."""

import ast
import importlib
import inspect
import math
import re
from pathlib import Path

import numpy as np
import pytest

import minilora as ml
from minilora import reference
from minilora.layers import (
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    masked_cross_entropy_backward,
    masked_cross_entropy_forward,
)
from minilora.lora import SCALINGS, lora_linear_backward, lora_linear_forward, lora_scale

DOC = Path(__file__).resolve().parent.parent / "docs" / "derivations.md"

HEADINGS = [
    "Notation", "Linear", "Embedding", "LayerNorm", "GELU", "Softmax", "Attention",
    "Cross-entropy", "Dropout", "Residual connections and the tied head", "LoRA", "AdamW",
    "The whole model", "Checking it: finite differences",
]

# The numbers are printed with 6 significant digits: rounding to 6 digits leaves a relative
# error of at most 5e-6, under RTOL. ATOL only lets an exact printed 0 match a computed
# float64 zero (or -0, or a rounding residue ~1e-17).
RTOL, ATOL = 1e-5, 1e-12
# Two float64 evaluations of the same formula in a different order (the doc's form and the
# code's): each of the few operations rounds by eps ~1.1e-16 relative, so 1e-12 is
# thousands of roundings away and still far below any real mistake.
SAME_FORMULA_RTOL, SAME_FORMULA_ATOL = 1e-12, 1e-15


class Example(dict):
    """The `key = value` lines of one example; remembers which keys a check read and which
    it compared with a computed value."""

    def __init__(self, values):
        super().__init__(values)
        self.read, self.compared = set(), set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def parse_examples(text):
    """{name: Example} from the ```text blocks that start with 'example: name'.
    Every other line is 'key = literal' (a number or a nested list of numbers)."""
    examples = {}
    for block in re.findall(r"^```text\n(.*?)^```", text, re.S | re.M):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        head = re.fullmatch(r"example:\s*(\w+)", lines[0]) if lines else None
        if head is None:
            continue
        values = {}
        for ln in lines[1:]:
            key, sep, literal = ln.partition("=")
            assert sep, f"example {head.group(1)}: cannot parse line {ln!r}"
            values[key.strip()] = np.array(ast.literal_eval(literal.strip()), dtype=np.float64)
        examples[head.group(1)] = values
    return examples


@pytest.fixture(scope="module")
def doc():
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def examples(doc):
    return parse_examples(doc)


def assert_printed(ex, key, computed):
    ex.compared.add(key)
    np.testing.assert_allclose(ex[key], computed, rtol=RTOL, atol=ATOL, err_msg=f"docs value {key!r}")


def assert_same_formula(a, b, what):
    np.testing.assert_allclose(a, b, rtol=SAME_FORMULA_RTOL, atol=SAME_FORMULA_ATOL, err_msg=what)


# ------------------------------------------------------------------ one check per example


def check_layernorm(ex):
    x, w, b, dout = ex["x"], ex["w"], ex["b"], ex["dout"]
    y, cache = layernorm_forward(x, w, b, eps=float(ex["eps"]))
    _, _, mean, rstd = cache
    n = (x - mean) * rstd
    dn = dout * w
    dx, dw, db = layernorm_backward(dout, cache)
    assert_printed(ex, "mean", mean[0])
    assert_printed(ex, "var", ((x - mean) ** 2).mean())
    assert_printed(ex, "rstd", rstd[0])
    assert_printed(ex, "n", n)
    assert_printed(ex, "y", y)
    assert_printed(ex, "dn", dn)
    assert_printed(ex, "mean_dn", dn.mean())
    assert_printed(ex, "mean_dn_n", (dn * n).mean())
    assert_printed(ex, "dx", dx)
    assert_printed(ex, "dw", dw)
    assert_printed(ex, "db", db)
    # the printed Jacobian J[i][j] = dn_i/dx_j, against central differences of n(x)
    # (h = 1e-5: truncation h^2/6 |n'''| ~ 1e-11 for |n'''| ~ rstd^3 ~ 1, rounding
    # eps |n| / h ~ 4e-11, so atol 1e-9 has a 25x margin; the printed 6 digits are the rtol),
    # and dx = J^T dn as the derivation says
    C, h = x.size, 1e-5
    ones, zeros = np.ones(C), np.zeros(C)
    J = np.empty((C, C))
    for j in range(C):
        e = np.zeros(C)
        e[j] = h
        J[:, j] = (layernorm_forward(x + e, ones, zeros, float(ex["eps"]))[0]
                   - layernorm_forward(x - e, ones, zeros, float(ex["eps"]))[0]) / (2 * h)
    ex.compared.add("J")
    np.testing.assert_allclose(ex["J"], J, rtol=RTOL, atol=1e-9, err_msg="docs value 'J'")
    np.testing.assert_allclose(ex["J"].T @ ex["dn"], ex["dx"], rtol=RTOL)


def check_gelu(ex):
    y, cache = gelu_forward(ex["x"])
    (dydx,) = gelu_backward(np.ones_like(ex["x"]), cache)
    q = cache[1]  # the cache keeps q = 0.5 (1 + t)
    assert_printed(ex, "t", 2 * q - 1)
    assert_printed(ex, "q", q)
    assert_printed(ex, "y", y)
    assert_printed(ex, "dydx", dydx)


def softmax_of(pre):
    """minilora's softmax of one row: the probabilities cross_entropy_forward caches."""
    return cross_entropy_forward(pre[None], np.array([0]))[1][0][0]


def check_softmax(ex):
    pre, datt = ex["pre"], ex["datt"]
    a = softmax_of(pre)
    row_sum = (datt * a).sum()
    dpre = a * (datt - row_sum)
    assert_printed(ex, "a", a)
    assert_printed(ex, "sum_datt_a", row_sum)
    assert_printed(ex, "dpre", dpre)
    # the row-sum form against central differences of L(pre) = sum(datt * softmax(pre)):
    # h = 1e-5, truncation h^2/6 |L'''| ~ 1e-11, rounding eps |L| / h ~ 1e-11
    h = 1e-5
    numeric = np.array([(datt * softmax_of(pre + h * e)).sum() - (datt * softmax_of(pre - h * e)).sum()
                        for e in np.eye(pre.size)]) / (2 * h)
    np.testing.assert_allclose(dpre, numeric, rtol=0, atol=1e-9)


def check_attention(ex):
    q, k, v, dout = ex["q"], ex["k"], ex["v"], ex["dout"]  # one sequence, one head: (T, hs)
    qkv = np.concatenate([q, k, v], axis=-1)[None]  # [1, T, 3C], C = hs
    y, cache = attention_forward(qkv, 1)
    att, scale = cache[3][0, 0], cache[6]
    (dqkv,) = attention_backward(dout[None], cache)
    dq, dk, dv = np.split(dqkv[0], 3, axis=-1)
    # the steps of the derivation, each tied to what the code returns
    datt = dout @ v.T
    dpre = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dqk = scale * dpre
    assert_same_formula(dqk @ k, dq, "dq = dqk k")
    assert_same_formula(dqk.T @ q, dk, "dk = dqk^T q")
    assert_same_formula(att.T @ dout, dv, "dv = att^T dy")
    # the quoted reference lines give the same numbers
    y_ref, att_ref = reference.attention_forward(qkv, 1)
    assert_same_formula(reference.attention_backward(dout[None], qkv, att_ref, 1), dqkv, "reference dqkv")
    assert_printed(ex, "scale", scale)
    assert_printed(ex, "pre", q @ k.T * scale)
    assert_printed(ex, "att", att)
    assert_printed(ex, "y", y[0])
    assert_printed(ex, "datt", datt)
    assert_printed(ex, "dpre", dpre)
    assert_printed(ex, "dqk", dqk)
    assert_printed(ex, "dq", dq)
    assert_printed(ex, "dk", dk)
    assert_printed(ex, "dv", dv)
    assert not att[np.triu_indices(3, 1)].any()  # the text: att is exactly 0 above the diagonal


def check_embedding(ex):
    idx = ex["idx"].astype(np.int64)
    assert np.bincount(idx.ravel()).max() > 1, "the example is about a repeated id"
    out, cache = embedding_forward(idx, ex["wte"], ex["wpe"])
    dwte, dwpe = embedding_backward(ex["dout"], cache)
    assert_printed(ex, "out", out)
    assert_printed(ex, "dwte", dwte)
    assert_printed(ex, "dwpe", dwpe)


class ParamsOnly:
    """The one thing AdamW needs from a model: a params dict (plus device and dtype)."""

    def __init__(self, params):
        self.params = params
        self.device, self.dtype = "cpu", np.float64


def check_adamw(ex):
    lr, wd, b1, b2, eps = (float(ex[k]) for k in ("lr", "wd", "b1", "b2", "eps"))
    model = ParamsOnly({"p": ex["p0"].copy()})
    opt = ml.AdamW(model, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p_prev = ex["p0"]
    for t, g in ((1, ex["g1"]), (2, ex["g2"])):
        opt.step({"p": g.copy()})
        m, v, p = opt.m["p"], opt.v["p"], model.params["p"]
        decayed = p_prev * (1 - lr * wd)
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        # the textbook update of the doc, from the code's moments, is the code's update
        assert_same_formula(decayed - lr * m_hat / (np.sqrt(v_hat) + eps), p, f"step {t}")
        assert_printed(ex, f"p{t - 1}_decayed", decayed)
        assert_printed(ex, f"m{t}", m)
        assert_printed(ex, f"v{t}", v)
        assert_printed(ex, f"m{t}_hat", m_hat)
        assert_printed(ex, f"v{t}_hat", v_hat)
        assert_printed(ex, f"p{t}", p)
        p_prev = p.copy()


def check_lora_scalings(ex):
    alpha, r = float(ex["alpha"]), int(ex["r"])
    cfg = ml.GPTConfig(vocab_size=11, context_length=5, emb_dim=16, n_heads=2, n_layers=1)
    for scaling in SCALINGS:
        model = ml.GPTModel(cfg, seed=0)
        ml.apply_lora(model, rank=r, alpha=alpha, scaling=scaling, targets="all")
        assert model.lora.scale == lora_scale(alpha, r, scaling)  # the scale the adapters run with
        assert_printed(ex, f"s_{scaling}", model.lora.scale)


def check_lora_first_step(ex):
    x, W, b, A, B, s, dout = (ex[k] for k in ("x", "W", "b", "A", "B", "s", "dout"))
    assert not B.any(), "the example is about B = 0 at init"
    y, cache = lora_linear_forward(x, W, b, A, B, float(s))
    dx, dA, dB = lora_linear_backward(dout, cache)
    assert_printed(ex, "xa", x @ A)
    assert_printed(ex, "y", y)
    assert_printed(ex, "g", float(s) * dout @ B.T)
    assert_printed(ex, "dA", dA)
    assert_printed(ex, "dB", dB)
    assert_printed(ex, "dx", dx)
    assert not dA.any() and dB.any()  # the claim of the section: only B moves on step one


def check_cross_entropy(ex):
    z, y = ex["z"], ex["y"].astype(np.int64)
    loss, cache = cross_entropy_forward(z, y)
    (dlogits,) = cross_entropy_backward(float(ex["dloss"]), cache)
    assert_printed(ex, "lse", np.log(np.exp(z).sum(axis=-1)))
    assert_printed(ex, "probs", cache[0])
    assert_printed(ex, "loss", loss)
    assert_printed(ex, "dlogits", dlogits)



def check_masked_cross_entropy(ex):
    z, y = ex["z"], ex["y"].astype(np.int64)
    loss, cache = masked_cross_entropy_forward(z, y)
    assert_printed(ex, "M", cache[3])
    assert_printed(ex, "loss", loss)
    (dlogits,) = masked_cross_entropy_backward(float(ex["dloss"]), cache)
    assert_printed(ex, "dlogits", dlogits)


CHECKS = {
    "embedding": check_embedding, "layernorm": check_layernorm, "gelu": check_gelu,
    "softmax": check_softmax, "attention": check_attention, "cross_entropy": check_cross_entropy,
    "lora_first_step": check_lora_first_step, "lora_scalings": check_lora_scalings,
    "adamw": check_adamw, "masked_cross_entropy": check_masked_cross_entropy,
}


# ------------------------------------------------------------------------------ the tests


def test_every_linked_heading_exists(doc):
    present = set(re.findall(r"^## (.+?)\s*$", doc, re.M))
    missing = [h for h in HEADINGS if h not in present]
    assert not missing, f"docs/derivations.md lacks the sections {missing}"


def test_the_worked_examples_are_all_there(examples):
    assert set(examples) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_worked_example(examples, name):
    """The printed numbers are what the code computes, and every printed line is used:
    an input the check feeds in, or a value it compares."""
    ex = Example(examples[name])
    CHECKS[name](ex)
    assert ex.read == set(ex), f"example {name}: lines no check reads: {sorted(set(ex) - ex.read)}"


def nudged(value):
    """value with its largest entry changed in the 5th significant digit (relative 1e-4,
    ten times RTOL), or an exact 0 made 1e-6: the smallest edit a reader could notice."""
    value = value.copy()
    flat = value.reshape(-1)
    i = int(np.argmax(np.abs(flat)))
    flat[i] = flat[i] * (1 + 1e-4) if flat[i] != 0 else 1e-6
    return value


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_a_changed_printed_number_fails(examples, name):
    """The checks can fail: every compared value, nudged, makes its example's check fail."""
    ex = Example(examples[name])
    CHECKS[name](ex)
    assert ex.compared, name
    for key in sorted(ex.compared):
        wrong = Example({**examples[name], key: nudged(examples[name][key])})
        with pytest.raises(AssertionError):
            CHECKS[name](wrong)


QUOTE = re.compile(r"^```python\n# minilora/(\w+)\.py, (\w+)\n(.*?)^```", re.S | re.M)


def quote_mismatches(module, function, body):
    """The lines of a quoted block that are not, in order, lines of minilora.<module>.<function>."""
    source = [ln.strip() for ln in inspect.getsource(getattr(importlib.import_module(f"minilora.{module}"),
                                                             function)).splitlines()]
    missing, at = [], 0
    for line in (ln.strip() for ln in body.splitlines() if ln.strip()):
        if line in source[at:]:
            at = source.index(line, at) + 1
        else:
            missing.append(line)
    return missing


def test_quoted_code_is_the_code(doc):
    """A python block whose first line is '# minilora/<file>.py, <function>' quotes that
    function word for word: each of its lines is a line of the function, in order."""
    quotes = QUOTE.findall(doc)
    assert {(m, f) for m, f, _ in quotes} >= {("reference", "layernorm_backward"),
                                                ("reference", "attention_backward"),
                                                ("layers", "attention_backward")}
    for module, function, body in quotes:
        assert not quote_mismatches(module, function, body), (module, function)


def test_the_quote_check_catches_a_changed_line(doc):
    """The quote check can fail: one name changed in a quoted line, or two lines swapped."""
    module, function, body = QUOTE.findall(doc)[0]
    lines = body.splitlines()
    assert quote_mismatches(module, function, body.replace("dn", "dm", 1))
    assert quote_mismatches(module, function, "\n".join([lines[1], lines[0], *lines[2:]]))


def test_lora_scale_is_what_the_table_says():
    """The table's column (alpha = 16, r = 16) is the code's."""
    assert [lora_scale(16, 16, s) for s in ("alpha_over_r", "alpha", "rslora")] == [1.0, 16.0, math.sqrt(16)]
