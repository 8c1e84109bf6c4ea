"""Text generation with a GPT-2 language model: greedy, or temperature / top-k sampling.

The book's ``generate`` (chapter 5): crop the context to the model's window, read
the logits of the last position, optionally keep the top k, then take the argmax
(temperature 0) or sample from softmax(logits / temperature).
"""

import numpy as np

from .backend import to_numpy


def sample_next(logits, temperature=0.0, top_k=None, rng=None):
    """Next token ids (B,) from last-position logits (B, V) given as a NumPy array."""
    logits = np.asarray(logits, dtype=np.float64)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if temperature <= 0.0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    rng = rng if rng is not None else np.random.default_rng()
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, seed=None, eos_id=None):
    """Append up to max_new_tokens tokens to idx (B, T) and return the longer (B, T') array.

    Greedy by default; temperature > 0 samples (reproducibly with `seed`). Stops early
    when every sequence has produced eos_id (None: never).
    """
    if model.n_out != model.cfg.vocab_size:
        raise ValueError("generate needs a language-model head (this model has a replaced head)")
    idx = np.array(to_numpy(idx), dtype=np.int64, ndmin=2)
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            ctx = idx[:, -model.cfg.context_length:]  # crop to the window GPT-2 supports
            last = np.full(ctx.shape[0], ctx.shape[1] - 1)
            logits = to_numpy(model.forward(ctx, keep_cache=False, positions=last))  # [B, V]
            nxt = sample_next(logits, temperature, top_k, rng)
            idx = np.concatenate([idx, nxt[:, None]], axis=1)
            if eos_id is not None and (nxt == eos_id).all():
                break
    finally:
        model.training = was_training
    return idx


def generate_text(model, tokenizer, prompt, max_new_tokens=25, **kwargs):
    """Decode generate() on one prompt string: the prompt plus its continuation."""
    idx = np.array([tokenizer.encode(prompt)], dtype=np.int64)
    out = generate(model, idx, max_new_tokens, **kwargs)
    return tokenizer.decode(out[0].tolist())
