"""Exercises: write the backward pass of every GPT-2 layer, then prove it.

Each layer is a pair, as in minilora/layers.py:

    out, cache = name_forward(x, *params)          # given: the forward, and what it keeps
    dx, *dparams = name_backward(dout, cache)      # yours: the gradients, in the order of
                                                   # the forward's inputs

Every forward is complete. Every backward raises NotImplementedError: replace that
line with your code. Check your work at any time (from the repository root):

    minilora gradcheck --module examples/exercises/layers.py
    minilora gradcheck --module examples/exercises/layers.py --only layernorm

It runs the same finite-difference checks as `minilora gradcheck` on your functions and
says, per layer, passed / failed / not implemented; on a failure it names the entry
where your gradient and the numerical one differ most, with both values. The math of
each layer is derived in docs/derivations.md (the hint under each backward names the
section); the answers are in examples/exercises/solutions/layers.py (no peeking until the
checker says passed!; minilora/layers.py computes the same gradients from caches of its own). Plain NumPy: shapes B batch, T time, C channels,
NH heads, hs = C // NH, V vocabulary.
"""

import math

import numpy as np

# ---------------------------------------------------------------------------- embedding


def embedding_forward(idx, wte, wpe):
    """out[b, t] = wte[idx[b, t]] + wpe[t].

    idx: int (B, T); wte: (V, C) token table; wpe: (Tmax, C) position table.
    Returns out (B, T, C) and cache (idx, V, Tmax).
    """
    T = idx.shape[1]
    out = wte[idx] + wpe[:T]  # [B, T, C] + [T, C] -> [B, T, C]
    return out, (idx, wte.shape[0], wpe.shape[0])


def embedding_backward(dout, cache):
    """Return (dwte (V, C), dwpe (Tmax, C)) from dout (B, T, C).

    Hint: each row of a table gets the sum of dout over every place it was used. A token
    id can appear several times in idx: `dwte[idx] += ...` keeps only one of the writes;
    np.add.at adds them all. Rows of wpe past T get zero. See docs/derivations.md#embedding.
    """
    idx, V, Tmax = cache
    raise NotImplementedError("embedding_backward")


# ---------------------------------------------------------------------------- linear


def linear_forward(x, w, b=None):
    """y = x @ w + b, w stored (in, out). x: (..., in); b: (out,) or None.
    Returns y (..., out) and cache (x, w)."""
    y = x @ w  # [..., in] @ [in, out] -> [..., out]
    if b is not None:
        y = y + b
    return y, (x, w)


def linear_backward(dout, cache):
    """Return (dx (..., in), dw (in, out), db (out,)) from dout (..., out).

    Hint: x may have several leading axes (B, T, in); dw and db sum over all of them
    (reshape to 2-D rows first). Check each gradient has its parameter's shape.
    See docs/derivations.md#linear.
    """
    x, w = cache
    raise NotImplementedError("linear_backward")


# ---------------------------------------------------------------------------- layernorm


def layernorm_forward(x, w, b, eps=1e-5):
    """y = (x - mean) * rstd * w + b over the last axis, rstd = 1 / sqrt(var + eps).

    x: (..., C); w, b: (C,). Returns y and cache (x, w, mean, rstd), with mean and
    rstd of shape (..., 1): recompute n = (x - mean) * rstd in the backward.
    """
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # [..., 1], the biased variance
    rstd = 1.0 / np.sqrt(var + eps)  # [..., 1]
    n = (x - mean) * rstd  # [..., C], normalized
    return n * w + b, (x, w, mean, rstd)


def layernorm_backward(dout, cache):
    """Return (dx (..., C), dw (C,), db (C,)) from dout (..., C).

    Hint: with dn = dout * w, dx has three terms: the direct one (rstd * dn), one
    through the mean and one through rstd, because both depend on every x of the row.
    See docs/derivations.md#layernorm.
    """
    x, w, mean, rstd = cache
    raise NotImplementedError("layernorm_backward")


# ---------------------------------------------------------------------------- GELU

GELU_K = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    """GELU, tanh form: y = 0.5 x (1 + t), t = tanh(k (x + 0.044715 x^3)), k = sqrt(2/pi).
    Returns y and cache (x, t)."""
    t = np.tanh(GELU_K * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dout, cache):
    """Return (dx,) — a tuple of one array — from dout, same shape as x.

    Hint: product rule on 0.5 x (1 + t), and d tanh(u) / du = 1 - tanh(u)^2.
    See docs/derivations.md#gelu.
    """
    x, t = cache
    raise NotImplementedError("gelu_backward")


# ---------------------------------------------------------------------------- dropout


def dropout_forward(x, p, rng=None):
    """Inverted dropout: keep each entry with probability 1 - p, scaled by 1/(1 - p).
    rng: a numpy Generator; p == 0 or rng None is the identity. Returns y and cache:
    the scaled mask (same shape as x), or None for the identity."""
    if p == 0.0 or rng is None:
        return x, None
    mask = (rng.random(x.shape) >= p) / (1.0 - p)
    return x * mask, mask


def dropout_backward(dout, cache):
    """Return (dx,) from dout.

    Hint: y = x * mask elementwise; remember the identity case (cache None).
    See docs/derivations.md#dropout.
    """
    mask = cache
    raise NotImplementedError("dropout_backward")


# ---------------------------------------------------------------------------- attention


def attention_forward(qkv, n_heads, dropout_p=0.0, rng=None, query_pos=None):
    """Causal multi-head self-attention on qkv = [q | k | v] (B, T, 3C). Per head:

      pre = q k^T * scale + mask       scale = 1/sqrt(hs); mask -inf where key j > query
      att = softmax(pre)               over the keys (last axis)
      y   = dropout(att) v             heads concatenated back to (B, T, C)

    query_pos: optional int (B,): one query per sequence at that position (what a
    classifier reads); y is then (B, C). Cache: q (B, NH, Tq, hs), k, v (B, NH, T, hs),
    att and att_d = dropout(att) (B, NH, Tq, T), the dropout cache, scale, query_pos.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_heads
    q, k, v = qkv.reshape(B, T, 3, n_heads, hs).transpose(2, 0, 3, 1, 4)  # 3 x [B, NH, T, hs]
    positions = np.arange(T)[None, :] if query_pos is None else query_pos[:, None]  # [1 or B, Tq]
    if query_pos is not None:
        q = q[np.arange(B), :, query_pos][:, :, None]  # [B, NH, 1, hs]
    scale = 1.0 / math.sqrt(hs)
    pre = q @ k.transpose(0, 1, 3, 2) * scale  # [B, NH, Tq, T]
    future = np.arange(T) > positions[:, :, None]  # [1 or B, Tq, T]: key after its query
    pre = np.where(future[:, None], -np.inf, pre)
    pre = pre - pre.max(axis=-1, keepdims=True)  # for a stable exp; a query always sees itself
    att = np.exp(pre) / np.exp(pre).sum(axis=-1, keepdims=True)  # [B, NH, Tq, T]
    att_d, drop_cache = dropout_forward(att, dropout_p, rng)
    y = (att_d @ v).transpose(0, 2, 1, 3).reshape(B, -1, C)  # [B, NH, Tq, hs] -> [B, Tq, C]
    return (y if query_pos is None else y[:, 0]), (q, k, v, att, att_d, drop_cache, scale, query_pos)


def attention_backward(dout, cache):
    """Return (dqkv,) with dqkv (B, T, 3C), dq | dk | dv side by side as in qkv, from
    dout (B, T, C), or (B, C) when the forward had query_pos.

    Hint: read the forward bottom-up, one line at a time: y = att_d v gives datt_d and
    dv; dropout_backward gives datt; the softmax backward gives dpre, the gradient at
    the scaled scores pre: dpre = att * (datt - sum_j(datt * att)). Then pre = scale * qk
    with qk = q k^T: dqk = scale * dpre, and qk is a product of two inputs, so treat it
    as a linear layer in q (weight k^T), then in k: dq = dqk k, dk = dqk^T q. Masked
    entries have att = 0, so they need no special case. With query_pos, dq is zero
    except at the query rows. See docs/derivations.md#softmax and #attention.
    """
    q, k, v, att, att_d, drop_cache, scale, query_pos = cache
    raise NotImplementedError("attention_backward")


# ---------------------------------------------------------------------------- loss


def cross_entropy_forward(logits, targets):
    """loss = mean over rows of (logsumexp(z_i) - z_i[y_i]). logits: (N, V); targets:
    int (N,). Returns the loss (a 0-d array) and cache (probs (N, V), targets)."""
    N = logits.shape[0]
    z = logits - logits.max(axis=-1, keepdims=True)  # for a stable exp
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    # log-softmax as z - logsumexp(z), not log(probs): a target whose probability
    # underflows to 0 would give log(0) = -inf (docs/derivations.md#cross-entropy)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # [N, V]
    return -logp[np.arange(N), targets].mean(), (probs, targets)


def cross_entropy_backward(dloss, cache):
    """Return (dlogits,) (N, K) from dloss, a float (1.0 when the loss is the end).

    Hint: softmax and log cancel into something short; do not forget the mean.
    See docs/derivations.md#cross-entropy.
    """
    probs, targets = cache
    raise NotImplementedError("cross_entropy_backward")


# ---------------------------------------------------------------------------- masked cross-entropy


def masked_cross_entropy_forward(logits, targets, ignore_index=-100):
    """A language model's loss: cross_entropy over the rows whose target is not
    ignore_index (padding, or a masked prompt, marked -100 by the data), the mean over
    the M counted rows, not all N. logits: (N, V); targets: int (N,). Returns the loss
    and cache [probs (N, V), targets, counted (N,) bool, M, the logits' shape] (a list,
    as minilora.layers keeps it: its backward reuses probs' memory for dlogits)."""
    counted = targets != ignore_index
    if not counted.any():
        raise ValueError("no position to count: every target is ignore_index")
    z = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # [N, V]
    rows = np.nonzero(counted)[0]
    return -logp[rows, targets[rows]].mean(), [probs, targets, counted, len(rows), logits.shape]


def masked_cross_entropy_backward(dloss, cache):
    """Return (dlogits,) (N, V) from dloss.

    Hint: an ignored row has no term in the loss; and count what the mean divides by.
    See docs/derivations.md#the-masked-mean-ignored-positions.
    """
    probs, targets, counted, M, shape = cache
    raise NotImplementedError("masked_cross_entropy_backward")


# ---------------------------------------------------------------------------- LoRA linear


def lora_linear_forward(x, w, b, A, B, scale):
    """y = x @ w + b + scale * (x @ A) @ B, with w, b frozen and A (in, r), B (r, out)
    trained. Cache: (the linear's cache, (x, A, B, xa, scale, None)), where xa = x @ A
    with the leading axes flattened, (N, r), N = B*T; the None is where minilora keeps a
    LoRA dropout mask (none here)."""
    y, linear_cache = linear_forward(x, w, b)
    xa = x.reshape(-1, A.shape[0]) @ A  # [N, in] @ [in, r] -> [N, r]
    delta = (xa @ B).reshape(y.shape)  # [N, r] @ [r, out] -> [..., out]
    return y + scale * delta, (linear_cache, (x, A, B, xa, scale, None))


def lora_linear_backward(dout, cache):
    """Return (dx (..., in), dA (in, r), dB (r, out)) from dout (..., out); w and b are
    frozen and get no gradient.

    Hint: dx has two paths that add, through w and through A and B. Go through the
    rank-r bottleneck (dout @ B^T first) so no (in, out) matrix is ever formed.
    See docs/derivations.md#lora.
    """
    linear_cache, (x, A, B, xa, scale, _) = cache
    raise NotImplementedError("lora_linear_backward")
