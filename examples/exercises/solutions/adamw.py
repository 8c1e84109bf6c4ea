"""Solution: one AdamW step (examples/exercises/adamw.py, answered).

    minilora gradcheck --module examples/exercises/solutions/adamw.py

The textbook form (Loshchilov & Hutter 2019); minilora/optim.py runs the same update
rearranged as torch does, on one flat buffer. docs/derivations.md#adamw derives it.
"""

import numpy as np


def adamw_step(param, grad, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """One AdamW step t (counted from 1) on one tensor. Returns (param, m, v), new arrays.

        p <- p (1 - lr wd)                        decoupled: the decay never enters m or v
        m <- b1 m + (1 - b1) g                    running mean of the gradient
        v <- b2 v + (1 - b2) g^2                  running mean of its square
        m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)    m, v start at 0: undo that bias
        p <- p - lr m_hat / (sqrt(v_hat) + eps)   eps after the square root

    param, grad, m, v: arrays of one shape; lr, eps, weight_decay: floats; betas (b1, b2).
    """
    b1, b2 = betas
    param = param * (1.0 - lr * weight_decay)
    m = b1 * m + (1.0 - b1) * grad
    v = b2 * v + (1.0 - b2) * grad**2
    m_hat = m / (1.0 - b1**t)
    v_hat = v / (1.0 - b2**t)
    param = param - lr * m_hat / (np.sqrt(v_hat) + eps)
    return param, m, v
