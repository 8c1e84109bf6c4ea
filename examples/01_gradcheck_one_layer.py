"""One layer, forward and backward by hand, proven by finite differences (layernorm).

    python examples/01_gradcheck_one_layer.py

The derivation: docs/derivations.md#layernorm; the checker: docs/derivations.md#checking-it-finite-differences.
"""

import numpy as np


def layernorm_forward(x, w, b, eps=1e-5):  # x: (B, T, C); w, b: (C,)
    mean = x.mean(-1, keepdims=True)  # [B, T, 1]
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)  # [B, T, 1]
    n = (x - mean) * rstd  # [B, T, C], normalized
    # The backward needs only n, w and rstd, so this caches n: a (B, T, C) array, the
    # same memory as caching x would be, and the backward need not recompute n.
    # minilora/layers.py caches n too; reference.py keeps x and recomputes n (as llm.c
    # does, where x is kept alive anyway): docs/derivations.md#layernorm.
    return n * w + b, (n, w, rstd)


def layernorm_backward(dout, cache, drop_term=False):
    n, w, rstd = cache
    dn = dout * w  # y = n * w + b
    # n depends on x directly, through the mean, and through rstd (mean and rstd depend on the whole row)
    dx = rstd * (dn - dn.mean(-1, keepdims=True) - (0.0 if drop_term else n * (dn * n).mean(-1, keepdims=True)))
    return dx, (dout * n).sum((0, 1)), dout.sum((0, 1))  # dx, dw, db


rng = np.random.default_rng(0)
x, w, b = rng.standard_normal((2, 3, 8)) * 3 + 1, rng.standard_normal(8), rng.standard_normal(8)
G = rng.standard_normal((2, 3, 8))  # a random upstream gradient: the loss is L = sum(y * G)
for drop_term in (False, True):
    dx, dw, db = layernorm_backward(G, layernorm_forward(x, w, b)[1], drop_term)
    num = np.zeros_like(x)  # central differences, one entry of x at a time
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + 1e-5
        plus = (layernorm_forward(x, w, b)[0] * G).sum()
        x[i] = old - 1e-5
        minus = (layernorm_forward(x, w, b)[0] * G).sum()
        x[i] = old
        num[i] = (plus - minus) / 2e-5
    err = np.linalg.norm(dx - num) / (np.linalg.norm(dx) + np.linalg.norm(num))
    what = "without the n * mean(dn * n) term" if drop_term else "the full backward"
    print(f"layernorm dx, {what:<34}: relative error {err:.2e}  ({'ok' if err < 1e-7 else 'WRONG'})")
