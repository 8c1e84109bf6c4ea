"""docs/derivations.md stays true: its worked numbers are recomputed with the layers
(float64) and must agree to the printed precision, and the section headings other files
link to must exist."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest

from minilora.layers import (
    cross_entropy_backward,
    cross_entropy_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
)
from minilora.lora import lora_linear_backward, lora_linear_forward

DOC = Path(__file__).resolve().parent.parent / "docs" / "derivations.md"

HEADINGS = [
    "Notation", "Linear", "Embedding", "LayerNorm", "GELU", "Softmax", "Attention",
    "Cross-entropy", "Dropout", "Residual connections and the tied head", "LoRA", "AdamW",
    "The whole model", "Checking it: finite differences",
]

# the numbers are printed with 6 significant digits: a relative rounding error below 5e-6
RTOL, ATOL = 1e-5, 1e-12


def parse_examples(text):
    """{name: {key: value}} from the ```text blocks that start with 'example: name'.
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
    np.testing.assert_allclose(ex[key], computed, rtol=RTOL, atol=ATOL, err_msg=f"docs value {key!r}")


def test_every_linked_heading_exists(doc):
    present = set(re.findall(r"^## (.+?)\s*$", doc, re.M))
    missing = [h for h in HEADINGS if h not in present]
    assert not missing, f"docs/derivations.md lacks the sections {missing}"


def test_the_worked_examples_are_all_there(examples):
    assert {"layernorm", "gelu", "cross_entropy", "lora_first_step"} <= set(examples)


def test_layernorm_example(examples):
    ex = examples["layernorm"]
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
    # the printed Jacobian J[i][j] = dn_i/dx_j, against central differences of n(x),
    # and dx = J^T dn as the derivation says
    C, h = x.size, 1e-6
    ones, zeros = np.ones(C), np.zeros(C)
    J = np.empty((C, C))
    for j in range(C):
        e = np.zeros(C)
        e[j] = h
        J[:, j] = (layernorm_forward(x + e, ones, zeros, float(ex["eps"]))[0]
                   - layernorm_forward(x - e, ones, zeros, float(ex["eps"]))[0]) / (2 * h)
    np.testing.assert_allclose(ex["J"], J, rtol=RTOL, atol=1e-9, err_msg="docs value 'J'")
    np.testing.assert_allclose(ex["J"].T @ ex["dn"], ex["dx"], rtol=RTOL)


def test_gelu_example(examples):
    ex = examples["gelu"]
    y, cache = gelu_forward(ex["x"])
    (dydx,) = gelu_backward(np.ones_like(ex["x"]), cache)
    assert_printed(ex, "t", cache[1])
    assert_printed(ex, "y", y)
    assert_printed(ex, "dydx", dydx)


def test_cross_entropy_example(examples):
    ex = examples["cross_entropy"]
    z, y = ex["z"], ex["y"].astype(np.int64)
    loss, cache = cross_entropy_forward(z, y)
    (dlogits,) = cross_entropy_backward(float(ex["dloss"]), cache)
    assert_printed(ex, "lse", np.log(np.exp(z).sum(axis=-1)))
    assert_printed(ex, "probs", cache[0])
    assert_printed(ex, "loss", loss)
    assert_printed(ex, "dlogits", dlogits)


def test_lora_first_step_example(examples):
    ex = examples["lora_first_step"]
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
