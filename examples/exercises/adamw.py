"""Exercise: one AdamW step, by hand.

Write adamw_step below, then check it (from the repository root):

    minilora gradcheck --module examples/exercises/adamw.py

The check runs your step for 4 steps on every parameter of a tiny GPT-2, with the real
gradients of a cross-entropy loss and weight decay on, next to minilora.optim.AdamW
(which is torch.optim.AdamW's update exactly), and compares m, v and the parameters
after each step (to 1e-12, float64). When your run equals that of a usual mistake it
says which: a bias correction missing, L2 decay instead of decoupled, eps inside the
square root, and a few more.

Read first: docs/derivations.md#adamw (the update, and why the bias correction).
"""

import numpy as np  # noqa: F401  (you will need it)


def adamw_step(param, grad, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """One AdamW step on one tensor. Return (param, m, v), the updated arrays.

    param, grad, m, v: float arrays of one shape (m and v start at zero before step 1);
    t: the step number, counted from 1; lr, eps, weight_decay: floats; betas: (b1, b2).

    Hint: in this order, each a line: decay the parameter (decoupled: it shrinks by
    lr * weight_decay and the decay never enters m or v); update m (running mean of
    grad) and v (of grad squared); undo the bias of m and v towards their zero start
    (they need a factor that depends on t); step by lr * m_hat / (sqrt(v_hat) + eps).
    """
    raise NotImplementedError("adamw_step")
