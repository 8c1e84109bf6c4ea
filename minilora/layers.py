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
done in place, a statistic recomputed or kept, a constant made once), a comment says which
and why.

References: karpathy/llm.c ``train_gpt2.c`` and ``doc/layernorm``, CS231n ``layers.py``,
jaymody/picoGPT ``gpt2.py``. Shapes: B batch, T time, C channels, NH heads,
hs = C // NH head size, V vocabulary.
"""

import math
import threading

import numpy as np

from .backend import get_array_module, to_numpy

# ---------------------------------------------------------------------------- constants

# Small constant arrays (the causal mask, the q/k/v scale) made once and shared by every
# later call: {(name, ..., dtype, array module, device): array}. A GPU would otherwise
# launch the kernels that build them in every block of every step.
_CONSTANTS = {}
_CONSTANTS_LOCK = threading.Lock()  # the shards' threads look constants up at once


def _device_key(xp):
    """Which device xp's new arrays go to: CuPy's current device id, "cpu" for NumPy."""
    cuda = getattr(xp, "cuda", None)
    return "cpu" if cuda is None else cuda.Device().id


def _shared(xp, host):
    """The host array `host` as xp's array (moved to the device under CuPy, once), made
    read-only on NumPy so that no caller can write into a constant others share."""
    value = xp.asarray(host)
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    return value


def _constant(key, xp, make, keep=None):
    """The shared constant `key` (a tuple, its name first) for xp and its current device:
    make() (a host NumPy array) the first time, the same array after. Built on the host,
    so under opcount a steady step counts no operation for it (a GPU's first step copies
    it over once). keep: at most this many constants of that name stay, the oldest made
    dropped first (masks of many sequence lengths would otherwise pile up)."""
    key = (*key, xp, _device_key(xp))
    value = _CONSTANTS.get(key)
    if value is None:
        with _CONSTANTS_LOCK:
            value = _CONSTANTS.get(key)
            if value is None:
                value = _CONSTANTS[key] = _shared(xp, make())
                same_name = [k for k in _CONSTANTS if k[0] == key[0]]  # oldest first
                for old in same_name[:-keep] if keep else ():
                    del _CONSTANTS[old]
    return value

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

    x: (..., C); w, b: (C,). rstd = (var + eps) ** -0.5, var the biased variance.
    Returns y and cache (n, w, mean, rstd): n = (x - mean) * rstd (..., C), mean and
    rstd (..., 1).

    Departures from reference.layernorm_forward (the one line (x - mean) * rstd * w + b):
    the steps run in two (..., C) buffers, n and y, instead of making a new array at each
    operator; rstd is one power (var + eps) ** -0.5 rather than 1 / sqrt(var + eps), one
    operation fewer. And the cache holds n, not x as reference.layernorm_backward(dy, x, w,
    mean, rstd) takes it, so the backward does not recompute n (two operations fewer).
    That costs no memory: n and x are both (..., C), and nothing else keeps this x alive
    (each residual x = x + a is a new array that only the next LayerNorm reads), so x is
    freed where its cache used to keep it. (llm.c recomputes n because its activation
    buffer keeps every x anyway.) mean is not needed by the backward; it stays in the
    cache, one number per row, as the statistic docs/derivations.md#layernorm prints.
    """
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    n = x - mean  # [..., C], centred; normalized in place below
    var = (n * n).mean(axis=-1, keepdims=True)  # [..., 1]
    rstd = (var + eps) ** -0.5  # [..., 1], stays in x's dtype
    n *= rstd
    y = n * w
    y += b
    return y, (n, w, mean, rstd)


def layernorm_backward(dout, cache, need_dparams=True):
    """Gradients of y = n * w + b with n = (x - mean) * rstd.

      dn = dout * w
      dx = rstd * (dn - mean(dn) - n * mean(dn * n))     (means over the last axis)
      dw = sum over rows of dout * n
      db = sum over rows of dout
    The two mean terms come from mean and rstd depending on every x in the row
    (derivation: docs/derivations.md#layernorm). n comes from the cache (the forward's);
    the steps of dx run in dn's buffer and one more, n * mean(dn * n), a new array so that
    the cached n stays as it is: four (..., C) arrays in all (dn, dn * n, that product and
    dout * n for dw), where the one expression of reference.layernorm_backward makes nine.
    need_dparams=False (frozen w, b) returns None for dw and db without computing them.
    """
    n, w, _, rstd = cache
    C = n.shape[-1]
    dn = dout * w
    dw = db = None
    if need_dparams:
        dw = (dout * n).reshape(-1, C).sum(axis=0)
        db = dout.reshape(-1, C).sum(axis=0)
    # dx = rstd * (dn - mean(dn) - n * mean(dn * n)), in dn's buffer
    n_term = n * (dn * n).mean(axis=-1, keepdims=True)  # a new array: n is the cache's
    dn -= dn.mean(axis=-1, keepdims=True)
    dn -= n_term
    dn *= rstd
    return dn, dw, db


# ---------------------------------------------------------------------------- GELU

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def gelu_forward(x):
    """GELU, tanh form (GPT-2's): y = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi).

    Cache: x and q = 0.5 (1 + t), t = tanh(u), u = k (x + 0.044715 x^3), so y = x q.
    Departures from reference.gelu_forward, for speed: u is built as
    x (k + k 0.044715 x^2) with the constants multiplied together beforehand (four
    operations, x*x*x not x**3: a float power is a slow path), and the steps run in place
    in two buffers, q and y: these arrays are the biggest of a block (B, T, 4C). tanh is
    the costly part of both passes, so its result is kept (reference.gelu_backward
    recomputes it); kept as q rather than t because both y and the derivative read it
    (1 - t^2 = 4 q (1 - q)): an operation fewer in each pass.
    """
    xp = get_array_module(x)
    q = x * x
    q *= _GELU_K * _GELU_C
    q += _GELU_K
    q *= x  # u = k x + k 0.044715 x^3
    xp.tanh(q, out=q)  # t
    q *= 0.5
    q += 0.5  # q = 0.5 (1 + t)
    y = x * q
    return y, (x, q)


def gelu_backward(dout, cache):
    """Derivative of y = 0.5 x (1 + t), t = tanh(u), u = k (x + 0.044715 x^3):

      dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 * 0.044715 x^2)
            = q + q (1 - q) x (2k + 6 * 0.044715 k x^2)     with q = 0.5 (1 + t)
      dx = dout * dy/dx
    The second line is the first with the cache's q: 0.5 (1 - t^2) = 2 q (1 - q), and the
    factor 2 and k folded into the constants (one operation each fewer than the first
    line). Derivation: docs/derivations.md#gelu.
    """
    x, q = cache
    g = x * x
    g *= 6 * _GELU_C * _GELU_K
    g += 2 * _GELU_K
    g *= x  # x (2k + 6 * 0.044715 k x^2)
    q_1mq = 1.0 - q
    q_1mq *= q  # q (1 - q) = (1 - t^2) / 4
    g *= q_1mq
    g += q  # dy/dx
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


def causal_mask(T, dtype, xp, query_pos=None):
    """Additive causal mask: -inf where key j lies after its query's position, 0 elsewhere.

    query_pos None (every position 0..T-1 queries): the upper triangle (1, 1, T, T), a
    shared constant made once per T, dtype, array module and device (the last 8 lengths
    are kept; read-only on NumPy) instead of in every block of every step. query_pos int
    (B,): each sequence's one query, (B, 1, 1, T): the constant's rows at those positions
    (a new array, one indexing per call).
    """
    mask = _constant(("causal_mask", T, np.dtype(dtype)), xp,
                     lambda: np.triu(np.full((1, 1, T, T), -np.inf, dtype=dtype), k=1), keep=8)  # -inf where j > i
    if query_pos is None:
        return mask  # [1, 1, T, T]
    return mask[0, 0][query_pos][:, None, None]  # [B, 1, 1, T]


def _qkv_scale(hs, dtype, xp):
    """[scale, 1, 1] as a shared (3, 1, 1, 1, 1) constant of dtype, scale = 1/sqrt(hs): the
    factor of q, k and v along the axis that stacks them."""
    scale = np.dtype(dtype).type(1.0 / math.sqrt(hs))
    return _constant(("qkv_scale", hs, np.dtype(dtype)), xp,
                     lambda: np.array([scale, 1, 1], dtype=dtype).reshape(3, 1, 1, 1, 1))


def attention_forward(qkv, n_heads, dropout_p=0.0, rng=None, query_pos=None):
    """Causal multi-head self-attention on the fused projection qkv = [q | k | v].

    qkv: (B, T, 3C) as produced by the c_attn linear. Per head:
      att = softmax(q k^T / sqrt(hs) + mask)     mask = -inf where a key is after its query
      y   = att v
    and the heads are concatenated back to (B, T, C).
    query_pos: optional int (B,): attend from one query per sequence, at that position
    (what a classifier reads from the last block), against all keys up to it; y is
    then (B, C). Every key and value is still used, so its gradient is still complete.
    Cache: q_s = scale * q (B, NH, Tq, hs), k, v (B, NH, T, hs), att (after dropout, and
    before it when p > 0), scale = 1/sqrt(hs), the query positions.

    Departures from reference.attention_forward, for speed: the scale multiplies q, in
    the one pass that copies q, k, v out of qkv into contiguous arrays, rather than the
    (B, NH, Tq, T) scores (q_s k^T = scale * q k^T, up to rounding; exactly when hs is a
    power of 4, as GPT-2's 64); the causal mask is added (-inf above the diagonal) rather
    than selected with where, and built once, not per call (causal_mask); the softmax
    runs in place in the scores' buffer. query_pos is the classifier's last-block trim:
    the reference computes every query and keeps one row at the end.
    """
    xp = get_array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    NH = n_heads
    hs = C // NH
    scale = qkv.dtype.type(1.0 / math.sqrt(hs))
    # [B, T, 3C] -> [3, B, NH, T, hs] times [scale, 1, 1]: contiguous, so the batched
    # matmuls are fast, and q scaled on the way (the scores need no pass of their own)
    qkv_s = xp.empty((3, B, NH, T, hs), dtype=qkv.dtype)
    xp.multiply(qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4), _qkv_scale(hs, qkv.dtype, xp), out=qkv_s)
    q, k, v = qkv_s  # q is scale * q
    if query_pos is not None:
        q = q[xp.arange(B), :, query_pos][:, :, None]  # [B, NH, 1, hs]
    Tq = q.shape[2]
    pre = q @ k.transpose(0, 1, 3, 2)  # [B, NH, Tq, hs] @ [B, NH, hs, T] -> [B, NH, Tq, T], the scaled scores
    pre += causal_mask(T, qkv.dtype, xp, query_pos)  # a token never sees the future
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
      forward: pre = q_s k^T, q_s = scale * q   so  dq_s = dpre k,  dk = dpre^T q_s,
                                                    dq = scale * dq_s
    (pre is the scaled scores and dpre its gradient. The reference scales the product,
    pre = scale * qk with qk = q k^T, and so its dqk = scale * dpre, dq = dqk k,
    dk = dqk^T q: the same gradients, with the scale on the (B, NH, Tq, hs) dq instead of
    the (B, NH, Tq, T) dqk.) dout: (B, T, C), or (B, C) with query_pos. Returns dqkv
    (B, T, 3C) with dq, dk, dv side by side as in the input; with query_pos, dq is zero
    off the query positions. The three products write into one (3, B, NH, T, hs) buffer,
    and one multiply by [scale, 1, 1] lays it out as (B, T, 3, NH, hs) (the inverse of
    the forward's copy), rather than three strided assignments and a scale pass.
    Derivation: docs/derivations.md#attention (and #softmax).
    """
    q, k, v, att, att_d, drop_cache, scale, query_pos = cache  # q is scale * q
    xp = get_array_module(dout)
    B, NH, Tq, hs = q.shape
    T, C = k.shape[2], NH * hs
    dy = xp.ascontiguousarray(dout.reshape(B, Tq, NH, hs).transpose(0, 2, 1, 3))  # [B, NH, Tq, hs]
    grads = xp.empty((3, B, NH, T, hs), dtype=dout.dtype)  # [dq_s | dk | dv], as the forward's q, k, v
    datt = dy @ v.transpose(0, 1, 3, 2)  # [B, NH, Tq, T]
    xp.matmul(att_d.transpose(0, 1, 3, 2), dy, out=grads[2])  # dv [B, NH, T, hs]
    (datt,) = dropout_backward(datt, drop_cache)
    # softmax backward, in place in datt's buffer (the biggest of the attention, (B, NH, Tq, T)):
    # dpre = att * (datt - rowsum(datt * att))
    datt -= (datt * att).sum(axis=-1, keepdims=True)
    datt *= att
    dpre = datt  # the gradient at the scaled scores pre = q_s k^T
    xp.matmul(dpre.transpose(0, 1, 3, 2), q, out=grads[1])  # dk = dpre^T q_s [B, NH, T, hs]
    if query_pos is None:
        xp.matmul(dpre, k, out=grads[0])  # dq_s = dpre k [B, NH, T, hs]
    else:  # only the query rows got a gradient
        grads[0] = 0.0
        grads[0][xp.arange(B), :, query_pos] = (dpre @ k)[:, :, 0]  # [B, NH, hs]
    dqkv = xp.empty((B, T, 3, NH, hs), dtype=dout.dtype)
    # dq = scale * dq_s, written through dqkv's [3, B, NH, T, hs] view: dqkv is [B, T, 3, NH, hs],
    # the layout of qkv (on NumPy, iterating the contiguous grads is the faster of the two spellings)
    xp.multiply(grads, _qkv_scale(hs, dout.dtype, xp), out=dqkv.transpose(2, 0, 3, 1, 4))
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

    logits: (N, V) or (B, T, V); targets: int (N,) or (B, T), in [0, V) or ignore_index,
    best given on the host (a NumPy array) even when the logits are on a GPU: which rows
    count, how many there are and whether their targets are in range are facts about the
    targets alone, read on the host, so the step never waits for the device to answer them
    (from device targets they are copied back once). Returns the loss (0-d) and cache
    [probs (N, V), rows (M,) the counted rows, their targets (M,), M, shape, the (N, 1)
    0/1 column of counted rows], the index arrays on the logits' device.
    Memory: one logits-sized array besides the logits, probs, which the backward turns
    into dlogits in place (at batch 8 x 1024 x 50257 a logits-sized float32 array is 1.6 GB).
    """
    xp = get_array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # a view: [N, V]
    y = to_numpy(targets).reshape(-1)  # [N], on the host
    counted = y != ignore_index  # [N]
    M = int(counted.sum())
    if M == 0:
        raise ValueError(f"no position to count: every target is ignore_index ({ignore_index})")
    if ((y[counted] < 0) | (y[counted] >= V)).any():
        raise ValueError(f"targets must be in [0, {V}) or ignore_index ({ignore_index})")
    rows, y_rows = xp.asarray(np.flatnonzero(counted)), xp.asarray(y[counted])  # [M], [M]: to the device
    zmax = z.max(axis=-1, keepdims=True)  # [N, 1]
    probs = z - zmax  # the one [N, V] array, shifted for a stable exp
    xp.exp(probs, out=probs)
    sum_e = probs.sum(axis=-1, keepdims=True)  # [N, 1]
    probs /= sum_e  # softmax, in place
    lse = xp.log(sum_e[rows, 0]) + zmax[rows, 0]  # [M]: log-sum-exp of the counted rows
    loss = (lse - z[rows, y_rows]).sum() / z.dtype.type(M)  # never the log of an underflowed prob
    column = xp.asarray(counted[:, None].astype(logits.dtype))  # [N, 1]: 1 on counted rows, 0 on ignored
    return loss, [probs, rows, y_rows, M, logits.shape, column]


def masked_cross_entropy_backward(dloss, cache):
    """dlogits_i = dloss * (softmax(z_i) - onehot(y_i)) / M on counted rows, exactly 0 on
    ignored ones (their loss term does not exist). Shape of the forward's logits.
    Derivation: docs/derivations.md#the-masked-mean-ignored-positions.

    Departure from the other backwards, for memory: dlogits is written into the cache's
    probs (no second logits-sized array), so the cache is consumed; a second backward
    from it is refused."""
    if cache[0] is None:
        raise RuntimeError("masked_cross_entropy_backward consumes its cache: one backward per forward")
    probs, rows, y_rows, M, shape, column = cache
    cache[0] = None
    probs[rows, y_rows] -= 1.0
    probs *= column * probs.dtype.type(dloss / M)  # [N, 1]: dloss / M on counted rows, 0 on ignored ones
    return (probs.reshape(shape),)
