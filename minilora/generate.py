"""Text generation with a GPT-2 language model: greedy, or temperature / top-k sampling.

The book's ``generate`` (chapter 5): crop the context to the model's window, read
the logits of the last position, optionally keep the top k, then take the argmax
(temperature 0) or sample from softmax(logits / temperature).

With ``kv_cache=True`` (the default) each block keeps the keys and values of the
tokens already seen, so a new token costs one row of work instead of a forward over
the whole context. ``forward_incremental`` is that inference-only forward; a test
pins that it gives the same logits as ``GPTModel.forward``.
"""

import math

import numpy as np

from .backend import to_numpy
from .errors import MiniloraError
from .layers import gelu_forward, layernorm_forward
from .model import LN_EPS
from .tokenizer import encode_text


class GenerationError(MiniloraError, ValueError):
    """An argument of generate() (or a model) that cannot give a continuation, named
    with its value: refused before the first token."""


def _is_integer(value):
    # bool is an int to Python, but top_k=True is a slip, not a 1
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_sampling(temperature=0.0, top_k=None, max_new_tokens=0):
    """Refuse what would otherwise run silently wrong: a negative temperature (greedy, as
    if 0), a negative max_new_tokens (the prompt back, as if 0), a fractional top_k (an
    IndexError deep in the sort). One line naming the argument and its value."""
    if not _is_integer(max_new_tokens) or max_new_tokens < 0:
        raise GenerationError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    real = isinstance(temperature, (int, float, np.integer, np.floating)) and not isinstance(temperature, bool)
    if not (real and math.isfinite(temperature) and temperature >= 0):
        raise GenerationError(f"generate: temperature must be a finite number >= 0 (0: greedy), "
                              f"got {temperature!r}")
    if top_k is not None and not (_is_integer(top_k) and top_k >= 1):
        raise GenerationError(f"generate: top_k must be an integer >= 1 or None, got {top_k!r}")


def forward_incremental(model, idx, kv):
    """Logits (B, V) of the last position of idx (B, T_new), the tokens that follow
    the kv.length already cached; appends their keys/values to kv. No backward."""
    xp, p, cfg = model.xp, model.params, model.cfg
    idx = model.check_idx(idx)
    B, T = idx.shape
    t0 = kv.length
    if t0 + T > cfg.context_length:
        raise ValueError(f"{t0 + T} tokens exceed the context length {cfg.context_length}")
    NH, C = cfg.n_heads, cfg.emb_dim
    hs = C // NH
    x = p["wte.weight"][idx] + p["wpe.weight"][t0:t0 + T]  # [B, T, C]
    # new token i (absolute position t0 + i) sees every cached key and new keys <= i
    future = xp.triu(xp.ones((T, t0 + T), dtype=bool), k=t0 + 1)
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        a, _ = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], LN_EPS)
        qkv, _ = model._linear_forward(h + "attn.c_attn", a)  # [B, T, 3C]
        q, k, v = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # [B, NH, T, hs] each
        k, v = kv.append(i, k, v)  # [B, NH, t0 + T, hs]
        att = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))  # [B, NH, T, t0 + T]
        att[..., future] = -xp.inf
        att = xp.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        a = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        a, _ = model._linear_forward(h + "attn.c_proj", a)
        x = x + a
        m, _ = layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], LN_EPS)
        m, _ = model._linear_forward(h + "mlp.c_fc", m)
        m, _ = gelu_forward(m)
        m, _ = model._linear_forward(h + "mlp.c_proj", m)
        x = x + m
    kv.length += T
    x, _ = layernorm_forward(x[:, -1], p["ln_f.weight"], p["ln_f.bias"], LN_EPS)  # [B, C]
    logits, _ = model._head_forward(x)  # the model's one head, its adapter included: [B, V]
    return logits


class KVCache:
    """Keys and values per block, preallocated for the whole context window."""

    def __init__(self, model, batch):
        cfg = model.cfg
        shape = (batch, cfg.n_heads, cfg.context_length, cfg.emb_dim // cfg.n_heads)
        self.k = [model.xp.empty(shape, dtype=model.dtype) for _ in range(cfg.n_layers)]
        self.v = [model.xp.empty(shape, dtype=model.dtype) for _ in range(cfg.n_layers)]
        self.length = 0

    def append(self, layer, k, v):
        """Store k, v (B, NH, T, hs) after the cached ones; return all of them so far."""
        t0, t1 = self.length, self.length + k.shape[2]
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]


def sample_next(logits, temperature=0.0, top_k=None, rng=None):
    """Next token ids (B,) from last-position logits (B, V) given as a NumPy array."""
    check_sampling(temperature, top_k)
    logits = np.asarray(logits, dtype=np.float64)
    # a NaN or +inf logit would pick a token silently (argmax takes the first NaN) or fail
    # inside rng.choice; -inf is a token ruled out, fine while one other is finite
    broken = np.isnan(logits).any(axis=-1) | np.isposinf(logits).any(axis=-1) | ~np.isfinite(logits).any(axis=-1)
    if broken.any():
        rows = np.flatnonzero(broken).tolist()
        raise GenerationError(f"generate: the model's next-token logits are not finite (NaN, +inf or all -inf) "
                              f"for sequence(s) {rows}: its weights hold NaN or inf, or training diverged")
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if temperature <= 0.0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    rng = rng if rng is not None else np.random.default_rng()
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, seed=None, eos_id=None,
             kv_cache=True):
    """Append up to max_new_tokens tokens to idx (B, T) and return the longer (B, T') array.

    Greedy by default; temperature > 0 samples (reproducibly with `seed`). Stops early
    when every sequence has produced eos_id (None: never). kv_cache=False recomputes
    the whole context for every token (the book's way); once the context window is
    full, the cache cannot slide, so generation falls back to that. max_new_tokens 0
    returns idx as it is.
    """
    check_sampling(temperature, top_k, max_new_tokens)
    if model.n_out != model.cfg.vocab_size:
        raise GenerationError("generate needs a language-model head (this model has a replaced head)")
    idx = np.array(to_numpy(idx), dtype=np.int64, ndmin=2)
    rng = np.random.default_rng(seed)
    window = model.cfg.context_length
    kv = KVCache(model, idx.shape[0]) if kv_cache and idx.shape[1] < window else None
    was_training = model.training
    model.eval()
    try:
        fresh = idx  # the tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if kv is not None and kv.length + fresh.shape[1] <= window:
                logits = forward_incremental(model, fresh, kv)  # [B, V]
            else:
                ctx = idx[:, -window:]  # crop to the window GPT-2 supports
                last = np.full(ctx.shape[0], ctx.shape[1] - 1)
                logits = model.forward(ctx, keep_cache=False, positions=last)  # [B, V]
            nxt = sample_next(to_numpy(logits), temperature, top_k, rng)
            idx = np.concatenate([idx, nxt[:, None]], axis=1)
            fresh = nxt[:, None]
            if eos_id is not None and (nxt == eos_id).all():
                break
    finally:
        model.training = was_training
    return idx


def generate_text(model, tokenizer, prompt, max_new_tokens=25, **kwargs):
    """Decode generate() on one prompt string: the prompt plus its continuation. The
    prompt is encoded as classify encodes a text (`tokenizer.encode_text`: a literal
    "<|endoftext|>" is text)."""
    ids = encode_text(tokenizer, prompt)
    if not ids:  # nothing to continue from: say so rather than "token ids must be non-empty"
        raise GenerationError(f"generate: the prompt {prompt!r} has no tokens to continue; give some text")
    idx = np.array([ids], dtype=np.int64)
    out = generate(model, idx, max_new_tokens, **kwargs)
    return tokenizer.decode(out[0].tolist())
