"""The layers of GPT-2 as paired forward/backward functions.

Every layer is two functions::

    out, cache = name_forward(x, *params)
    dx, *dparams = name_backward(dout, cache)

with the gradients in the order of the forward's inputs. A backward never mutates
``dout`` or the cache; it returns new arrays, except where the layer is the identity
(dropout when off returns ``dout`` itself). The math is written once with
``xp = get_array_module(x)`` so it runs on NumPy and on CuPy.

This is the fast path. ``minilora/reference.py`` computes the same math in the plainest
NumPy (the spec), ``docs/derivations.md`` derives every backward step by step, and
tests/test_reference.py holds the model built from these layers equal to the reference.
Where a layer here departs from the reference's lines for speed (a 2-D product, work
done in place, a statistic recomputed or kept), a comment says which and why.

References: karpathy/llm.c ``train_gpt2.c`` and ``doc/layernorm``, CS231n ``layers.py``,
jaymody/picoGPT ``gpt2.py``. Shapes: B batch, T time, C channels, NH heads,
hs = C // NH head size, V vocabulary.
"""

import math

import numpy as np

from .backend import get_array_module

# ---------------------------------------------------------------------------- embedding


def embedding_forward(idx, wte, wpe):
    """Token plus position embedding: out[b, t] = wte[idx[b, t]] + wpe[t].

    idx: int (B, T), already validated to lie in [0, V) and T <= context length.
    wte: (V, C) token table; wpe: (Tmax, C) position table.
    Returns out (B, T, C) and cache (idx, V, Tmax).
    """
    T = idx.shape[1]
    out = wte[idx] + wpe[:T]  # [B, T, C] + [T, C] -> [B, T, C]
    return out, (idx, wte.shape[0], wpe.shape[0])


def embedding_backward(dout, cache):
    """Gradients of the two tables.

    Each table row receives the sum of dout over every place it was used:
      dwte[v] = sum over (b, t) with idx[b, t] == v of dout[b, t]
      dwpe[t] = sum over b of dout[b, t]        (rows t >= T stay zero)
    A token id repeated in the batch must accumulate, which plain fancy-index
    assignment would not do (it keeps one write): hence xp.add.at.
    Derivation: docs/derivations.md#embedding.
    """
    idx, V, Tmax = cache
    xp = get_array_module(dout)
    B, T, C = dout.shape
    dwte = xp.zeros((V, C), dtype=dout.dtype)
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))  # scatter-add, repeats accumulate
    dwpe = xp.zeros((Tmax, C), dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)  # [B, T, C] -> [T, C]
    return dwte, dwpe


# ---------------------------------------------------------------------------- linear


def linear_forward(x, w, b=None):
    """Affine map y = x @ w + b, with w stored (in, out) as in the GPT-2 checkpoint.

    x: (..., in); w: (in, out); b: (out,) or None. Returns y (..., out), cache (x, w).
    """
    n_in, n_out = w.shape
    # one 2-D product: NumPy runs a stacked (B, T, in) @ (in, out) as B separate small
    # GEMMs, measurably slower than a single (B*T, in) @ (in, out)
    y = (x.reshape(-1, n_in) @ w).reshape(*x.shape[:-1], n_out)  # [..., in] @ [in, out] -> [..., out]
    if b is not None:
        y += b
    return y, (x, w)


def linear_backward(dout, cache, need_dx=True, need_dw=True, need_db=True):
    """Gradients of y = x @ w + b.

      dx = dout @ w^T                         (..., in)
      dw = sum over rows of x^T dout          (in, out)
      db = sum over rows of dout              (out,)
    Derivation: docs/derivations.md#linear. Like the forward, each product runs on the
    rows flattened to 2-D (reference.linear_backward writes dw as an einsum over (b, t)).
    Frozen means no work: pass need_dw=False / need_db=False for frozen parameters
    and the matching gradient comes back as None without being computed.
    """
    x, w = cache
    n_in, n_out = w.shape
    dx = (dout.reshape(-1, n_out) @ w.T).reshape(*dout.shape[:-1], n_in) if need_dx else None  # [..., in]
    dw = x.reshape(-1, n_in).T @ dout.reshape(-1, n_out) if need_dw else None  # [in, out]
    db = dout.reshape(-1, n_out).sum(axis=0) if need_db else None  # [out]
    return dx, dw, db


# ---------------------------------------------------------------------------- layernorm


def layernorm_forward(x, w, b, eps=1e-5):
    """LayerNorm over the last axis: y = (x - mean) * rstd * w + b.

    x: (..., C); w, b: (C,). rstd = 1 / sqrt(var + eps), var the biased variance.
    reference.layernorm_forward is the one line (x - mean) * rstd * w + b; here the same
    arithmetic runs in place in the output's buffer, one (..., C) array instead of four.
    The cache holds x, w and the small statistics (mean, rstd), and the backward
    recomputes n = (x - mean) * rstd, as reference.layernorm_backward(dy, x, w, mean,
    rstd) does. The backward needs only n, w, rstd, so caching n instead of x would cost
    the same memory (both (..., C)); recomputing n saves memory only where x is kept
    alive anyway, as in llm.c. Here nothing else keeps x (each residual x = x + a is a
    new array), so the choice costs one elementwise pass and saves nothing: it keeps
    the cache the reference's (docs/derivations.md#layernorm).
    """
    xp = get_array_module(x)
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    y = x - mean  # [..., C], centred; becomes the output in place
    var = (y * y).mean(axis=-1, keepdims=True)  # [..., 1]
    rstd = 1.0 / xp.sqrt(var + eps)  # [..., 1], stays in x's dtype
    y *= rstd
    y *= w
    y += b
    return y, (x, w, mean, rstd)


def layernorm_backward(dout, cache, need_dparams=True):
    """Gradients of y = n * w + b with n = (x - mean) * rstd.

      dn = dout * w
      dx = rstd * (dn - mean(dn) - n * mean(dn * n))     (means over the last axis)
      dw = sum over rows of dout * n
      db = sum over rows of dout
    The two mean terms come from mean and rstd depending on every x in the row
    (derivation: docs/derivations.md#layernorm). The steps of dx reuse the buffers of dn
    and n: four (..., C) arrays in all (n, dn, dn * n and dout * n for dw), where the one
    expression of reference.layernorm_backward makes nine.
    need_dparams=False (frozen w, b) returns None for dw and db without computing them.
    """
    x, w, mean, rstd = cache
    C = x.shape[-1]
    n = x - mean
    n *= rstd  # recomputed from x, see the forward
    dn = dout * w
    dn_n = dn * n
    dw = db = None
    if need_dparams:
        dw = (dout * n).reshape(-1, C).sum(axis=0)
        db = dout.reshape(-1, C).sum(axis=0)
    # dx = rstd * (dn - mean(dn) - n * mean(dn * n)), in dn's and n's buffers
    n *= dn_n.mean(axis=-1, keepdims=True)
    dn -= dn.mean(axis=-1, keepdims=True)
    dn -= n
    dn *= rstd
    return dn, dw, db


# ---------------------------------------------------------------------------- GELU

_GELU_K = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    """GELU, tanh form (GPT-2's): y = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi).

    Cache: x and t = tanh(k (x + 0.044715 x^3)). tanh is the costly part of both
    passes, so it is kept rather than recomputed (reference.gelu_backward recomputes
    it). The arithmetic runs in place in two buffers: these arrays are the biggest of a
    block (B, T, 4C).
    """
    xp = get_array_module(x)
    t = x * x  # x*x*x, not x**3: a float power is a slow path
    t *= 0.044715
    t += 1.0
    t *= x
    t *= _GELU_K
    xp.tanh(t, out=t)  # t = tanh(k (x + 0.044715 x^3))
    y = t + 1.0
    y *= x
    y *= 0.5
    return y, (x, t)


def gelu_backward(dout, cache):
    """Derivative of y = 0.5 x (1 + t), t = tanh(u), u = k (x + 0.044715 x^3):

      dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2)
            = 0.5 (1 + t + x (1 - t^2) k (1 + 3 * 0.044715 x^2))
      dx = dout * dy/dx
    Derivation: docs/derivations.md#gelu.
    """
    x, t = cache
    xp = get_array_module(x)
    g = x * x
    g *= 3 * 0.044715 * _GELU_K
    g += _GELU_K
    g *= x  # x k (1 + 3 * 0.044715 x^2)
    one_minus_t2 = t * t
    xp.subtract(1.0, one_minus_t2, out=one_minus_t2)
    g *= one_minus_t2
    g += t
    g += 1.0
    g *= 0.5  # dy/dx
    g *= dout
    return (g,)


# ---------------------------------------------------------------------------- dropout


class SequenceRNG:
    """Dropout randomness drawn sequence by sequence: one numpy Generator per sequence
    of the batch, so that a sequence's masks do not depend on how the batch is split
    into shards (CPU cores) or on the device. ``rngs[lo:hi]`` is the generator of a
    shard holding sequences lo..hi-1; ``random(shape)`` (shape[0] the batch) is all
    dropout_forward asks of a generator."""

    def __init__(self, generators):
        self.generators = generators

    @classmethod
    def from_seeds(cls, seeds):
        return cls([np.random.default_rng(seed) for seed in seeds])

    def __getitem__(self, rows):
        return SequenceRNG(self.generators[rows])

    def random(self, shape):
        if shape[0] != len(self.generators):
            raise ValueError(f"array of {shape[0]} sequences for the generators of {len(self.generators)}")
        out = np.empty(shape)
        for generator, sequence in zip(self.generators, out):
            generator.random(out=sequence)
        return out


def dropout_forward(x, p, rng=None):
    """Inverted dropout: keep each entry with probability 1 - p and scale it by 1/(1 - p).

    p == 0 (or rng None, i.e. evaluation) is the identity and caches nothing.
    rng: a numpy Generator or a SequenceRNG; the mask is drawn on the host so CPU and
    GPU runs agree, then moved to x's device. Cache: the scaled mask (same shape as x)
    or None.
    """
    if p == 0.0 or rng is None:
        return x, None
    xp = get_array_module(x)
    keep = rng.random(x.shape) >= p
    mask = xp.asarray(keep, dtype=x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dout, cache):
    """dx = dout * mask (the same scaled mask as the forward); when there is no mask the
    layer was the identity and dout itself is returned. Derivation:
    docs/derivations.md#dropout."""
    mask = cache
    return (dout if mask is None else dout * mask,)


# ---------------------------------------------------------------------------- attention


def causal_mask(query_pos, T, dtype, xp):
    """Additive mask (B or 1, 1, Tq, T): -inf where key j lies after its query's position
    (query_pos (B or 1, Tq)), 0 elsewhere. For every query 0..T-1 it is the usual
    upper triangle."""
    after = xp.arange(T) > query_pos[:, :, None]  # [B, Tq, T]
    return xp.where(after, -xp.inf, 0.0).astype(dtype)[:, None]  # [B, 1, Tq, T]


def attention_forward(qkv, n_heads, dropout_p=0.0, rng=None, query_pos=None):
    """Causal multi-head self-attention on the fused projection qkv = [q | k | v].

    qkv: (B, T, 3C) as produced by the c_attn linear. Per head:
      att = softmax(q k^T / sqrt(hs) + mask)     mask = -inf where a key is after its query
      y   = att v
    and the heads are concatenated back to (B, T, C).
    query_pos: optional int (B,): attend from one query per sequence, at that position
    (what a classifier reads from the last block), against all keys up to it; y is
    then (B, C). Every key and value is still used, so its gradient is still complete.
    Cache: q (B, NH, Tq, hs), k, v (B, NH, T, hs), att (after dropout, and before it
    when p > 0), the query positions.

    Departures from reference.attention_forward, for speed: the causal mask is added
    (-inf above the diagonal) rather than selected with where, and the softmax runs in
    place in the scores' buffer; both give the same numbers. query_pos is the classifier's
    last-block trim: the reference computes every query and keeps one row at the end.
    """
    xp = get_array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    NH = n_heads
    hs = C // NH
    # [B, T, 3C] -> [3, B, NH, T, hs]; contiguous copies so the batched matmuls are fast
    q, k, v = xp.ascontiguousarray(qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4))
    if query_pos is None:
        positions = xp.arange(T)[None]  # [1, T]: every position queries
    else:
        positions = query_pos[:, None]  # [B, 1]
        q = q[xp.arange(B), :, query_pos][:, :, None]  # [B, NH, 1, hs]
    Tq = q.shape[2]
    scale = qkv.dtype.type(1.0 / math.sqrt(hs))
    pre = q @ k.transpose(0, 1, 3, 2)  # [B, NH, Tq, hs] @ [B, NH, hs, T] -> [B, NH, Tq, T]
    pre *= scale  # from here on pre is the scaled scores, in the buffer of the product q k^T
    pre += causal_mask(positions, T, qkv.dtype, xp)  # a token never sees the future
    # softmax, subtracting the row max so exp never overflows; a query always sees
    # itself, so every row has a finite max and a non-zero sum
    pre -= pre.max(axis=-1, keepdims=True)
    att = xp.exp(pre, out=pre)
    att /= att.sum(axis=-1, keepdims=True)
    att_d, drop_cache = dropout_forward(att, dropout_p, rng)
    y = att_d @ v  # [B, NH, Tq, T] @ [B, NH, T, hs] -> [B, NH, Tq, hs]
    y = y.transpose(0, 2, 1, 3).reshape(B, Tq, C)  # re-assemble the heads side by side
    return (y if query_pos is None else y[:, 0]), (q, k, v, att, att_d, drop_cache, scale, query_pos)


def attention_backward(dout, cache):
    """Gradient with respect to qkv, read off the forward in reverse.

      forward: y = att_d v                so  datt_d = dy v^T,      dv = att_d^T dy
      forward: att_d = dropout(att)       so  datt = datt_d * mask
      forward: att = softmax(pre + mask)  so  dpre = att * (datt - sum_j(datt * att))
               (masked entries have att = 0, so they get no gradient)
      forward: pre = scale * qk, qk = q k^T   so  dqk = scale * dpre,
                                              dq = dqk k,  dk = dqk^T q
    (pre is the scaled scores and dpre its gradient; dqk is the gradient at the unscaled
    product q k^T, the same names as in reference.attention_backward.) dout: (B, T, C), or (B, C)
    with query_pos. Returns dqkv (B, T, 3C) with dq, dk, dv side by side as in the input;
    with query_pos, dq is zero off the query positions. Derivation:
    docs/derivations.md#attention (and #softmax).
    """
    q, k, v, att, att_d, drop_cache, scale, query_pos = cache
    xp = get_array_module(dout)
    B, NH, Tq, hs = q.shape
    T, C = k.shape[2], NH * hs
    dy = xp.ascontiguousarray(dout.reshape(B, Tq, NH, hs).transpose(0, 2, 1, 3))  # [B, NH, Tq, hs]
    datt = dy @ v.transpose(0, 1, 3, 2)  # [B, NH, Tq, T]
    dv = att_d.transpose(0, 1, 3, 2) @ dy  # [B, NH, T, hs]
    (datt,) = dropout_backward(datt, drop_cache)
    # softmax backward, in place in datt's buffer (the biggest of the attention, (B, NH, Tq, T)):
    # dpre = att * (datt - rowsum(datt * att)), then dqk = scale * dpre, all in that one buffer
    datt -= (datt * att).sum(axis=-1, keepdims=True)
    datt *= att
    dpre = datt  # the gradient at the scaled scores pre
    dqk = dpre  # the same buffer, scaled in place: the gradient at the unscaled qk = q k^T
    dqk *= scale
    dq = dqk @ k  # [B, NH, Tq, hs]
    dk = dqk.transpose(0, 1, 3, 2) @ q  # [B, NH, T, hs]
    dqkv = xp.empty((B, T, 3, NH, hs), dtype=dout.dtype)
    if query_pos is None:
        dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)  # [B, NH, T, hs] -> [B, T, NH, hs]
    else:  # only the query rows got a gradient
        dqkv[:, :, 0] = 0.0
        dqkv[xp.arange(B), query_pos, 0] = dq[:, :, 0]  # [B, NH, hs]
    dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
    dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)
    return (dqkv.reshape(B, T, 3 * C),)


# ---------------------------------------------------------------------------- loss


def cross_entropy_forward(logits, targets):
    """Mean softmax cross-entropy: loss = mean_i(logsumexp(z_i) - z_i[y_i]).

    logits: (N, V) float; targets: int (N,) in [0, V). Returns the loss as a 0-d array
    (reading it as a float would force a device sync on the GPU) and cache
    (probs, targets). The row max is subtracted before exp for stability.
    """
    xp = get_array_module(logits)
    N = logits.shape[0]
    z = logits - logits.max(axis=-1, keepdims=True)
    e = xp.exp(z)
    sum_e = e.sum(axis=-1, keepdims=True)  # [N, 1]; log(sum_e) is the log-sum-exp of z
    logp_true = z[xp.arange(N), targets] - xp.log(sum_e[:, 0])  # never the log of an underflowed prob
    probs = e / sum_e
    return -logp_true.mean(), (probs, targets)


def cross_entropy_backward(dloss, cache):
    """dlogits = dloss * (softmax(z) - onehot(y)) / N   (dloss: a float, usually 1.0).
    Derivation: docs/derivations.md#cross-entropy."""
    probs, targets = cache
    xp = get_array_module(probs)
    N = probs.shape[0]
    dlogits = probs.copy()
    dlogits[xp.arange(N), targets] -= 1.0
    dlogits *= probs.dtype.type(dloss / N)
    return (dlogits,)


def masked_cross_entropy_forward(logits, targets, ignore_index=-100):
    """Token-level cross-entropy of a language model, ignored positions left out:
    loss = (1/M) sum over counted rows i of (logsumexp(z_i) - z_i[y_i]), where a row counts
    when y_i != ignore_index and M is the number of such rows (torch's
    cross_entropy(..., ignore_index=-100)). The divisor is M, not N: the padding of a batch
    must not dilute its loss.

    logits: (N, V) or (B, T, V); targets: int (N,) or (B, T), in [0, V) or ignore_index.
    Returns the loss (0-d) and cache [probs (N, V), targets, counted (N,) bool, M, shape].
    Memory: one logits-sized array besides the logits, probs, which the backward turns
    into dlogits in place (at batch 8 x 1024 x 50257 a logits-sized float32 array is 1.6 GB).
    """
    xp = get_array_module(logits)
    V = logits.shape[-1]
    z, y = logits.reshape(-1, V), targets.reshape(-1)  # views: [N, V], [N]
    counted = y != ignore_index  # [N]
    M = int(counted.sum())
    if M == 0:
        raise ValueError(f"no position to count: every target is ignore_index ({ignore_index})")
    y_counted = y[counted]
    if int(((y_counted < 0) | (y_counted >= V)).sum()):
        raise ValueError(f"targets must be in [0, {V}) or ignore_index ({ignore_index})")
    zmax = z.max(axis=-1, keepdims=True)  # [N, 1]
    probs = z - zmax  # the one [N, V] array, shifted for a stable exp
    xp.exp(probs, out=probs)
    sum_e = probs.sum(axis=-1, keepdims=True)  # [N, 1]
    probs /= sum_e  # softmax, in place
    rows = xp.nonzero(counted)[0]
    lse = xp.log(sum_e[rows, 0]) + zmax[rows, 0]  # [M]: log-sum-exp of the counted rows
    loss = (lse - z[rows, y_counted]).sum() / z.dtype.type(M)  # never the log of an underflowed prob
    return loss, [probs, y, counted, M, logits.shape]


def masked_cross_entropy_backward(dloss, cache):
    """dlogits_i = dloss * (softmax(z_i) - onehot(y_i)) / M on counted rows, exactly 0 on
    ignored ones (their loss term does not exist). Shape of the forward's logits.
    Derivation: docs/derivations.md#the-masked-mean-ignored-positions.

    Departure from the other backwards, for memory: dlogits is written into the cache's
    probs (no second logits-sized array), so the cache is consumed; a second backward
    from it is refused."""
    if cache[0] is None:
        raise RuntimeError("masked_cross_entropy_backward consumes its cache: one backward per forward")
    probs, y, counted, M, shape = cache
    cache[0] = None
    xp = get_array_module(probs)
    rows = xp.nonzero(counted)[0]
    probs[rows, y[rows]] -= 1.0
    probs *= (counted[:, None] * probs.dtype.type(dloss / M)).astype(probs.dtype)  # 0 on ignored rows
    return (probs.reshape(shape),)
