"""The reference GPT-2 with LoRA: the plainest forward and backward that work. Read this first.

This file is the spec. Every layer is a forward of one or a few lines and a backward
derived from it in docs/derivations.md (the section named in each backward). The model's
backward is its forward read from the bottom up, one line for one line. There are no
threads, no in-place tricks, no skipped work for frozen weights, no trimmed rows: every
parameter gets its gradient, and every activation's gradient is returned as well.

    logits, acts = forward(params, idx, n_heads)               # idx int (B, T)
    grads, dacts = backward(dlogits, params, acts, n_heads)    # dlogits like logits

params holds arrays under the Hugging Face GPT-2 names ("wte.weight", "h.0.ln_1.weight",
..., "ln_f.bias"; weights stored (in, out), so a linear is x @ w + b), plus, when present,
"out_head.weight"/"out_head.bias" (a classifier head replacing the tied LM head) and the
LoRA adapters "<linear>.lora_A" (in, r) / ".lora_B" (r, out), three of them over the fused
Q|K|V projection ("h.0.attn.c_attn.q", ".k", ".v") and one on the tied LM head
("lm_head": logits = x wte^T + s (x A) B). `model.params` of a GPTModel is exactly
such a dict. No dropout: this is the appendix E recipe (drop_rate 0) and evaluation.

The fast engine (layers.py, lora.py, model.py) computes the same numbers by other routes;
tests/test_reference.py holds it equal to this file to 1e-12 in float64, and
`minilora gradcheck` checks this file against finite differences.
Shapes: B batch, T time, C width, NH heads, hs = C / NH, V vocabulary (or classes), r rank.
"""

import math

import numpy as np

# ------------------------------------------------------------------------------ layers


def embedding_forward(idx, wte, wpe):
    return wte[idx] + wpe[: idx.shape[1]]  # [B, T, C]: a row of wte per token, plus its position's row


def embedding_backward(dx, idx, wte, wpe):  # docs/derivations.md#embedding
    dwte = np.zeros_like(wte)
    np.add.at(dwte, idx, dx)  # [V, C]: a token used twice receives both gradients (scatter-add)
    dwpe = np.zeros_like(wpe)
    dwpe[: idx.shape[1]] = dx.sum(axis=0)  # [T, C]: position t was used by every sequence
    return dwte, dwpe


def linear_forward(x, w, b):
    return x @ w + b  # [B, T, in] @ [in, out] + [out] -> [B, T, out]


def linear_backward(dy, x, w):  # docs/derivations.md#linear
    dx = dy @ w.T  # [B, T, out] @ [out, in] -> [B, T, in]
    dw = np.einsum("bti,bto->io", x, dy)  # x^T dy, summed over every row: [in, out]
    db = dy.sum(axis=(0, 1))  # [out]
    return dx, dw, db


def layernorm_forward(x, w, b, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)  # [B, T, 1]
    rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)  # [B, T, 1], biased variance
    return (x - mean) * rstd * w + b, mean, rstd  # [B, T, C]


def layernorm_backward(dy, x, w, mean, rstd):  # docs/derivations.md#layernorm
    n = (x - mean) * rstd  # [B, T, C], the normalized input
    dn = dy * w  # [B, T, C]
    dx = rstd * (dn - dn.mean(axis=-1, keepdims=True) - n * (dn * n).mean(axis=-1, keepdims=True))
    return dx, (dy * n).sum(axis=(0, 1)), dy.sum(axis=(0, 1))  # dx [B, T, C], dw [C], db [C]


GELU_K = math.sqrt(2.0 / math.pi)


def gelu_forward(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_K * (x + 0.044715 * x**3)))  # GPT-2's tanh form


def gelu_backward(dy, x):  # docs/derivations.md#gelu
    t = np.tanh(GELU_K * (x + 0.044715 * x**3))
    return dy * 0.5 * (1.0 + t + x * (1.0 - t**2) * GELU_K * (1.0 + 3 * 0.044715 * x**2))


def attention_forward(qkv, NH):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = np.split(qkv, 3, axis=-1)  # 3 x [B, T, C]
    q, k, v = (a.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, NH, T, hs]
    pre = q @ k.transpose(0, 1, 3, 2) / math.sqrt(C // NH)  # [B, NH, T, T], scaled scores
    pre = np.where(np.tri(T, dtype=bool), pre, -np.inf)  # causal: query t sees keys 0..t only
    att = np.exp(pre - pre.max(axis=-1, keepdims=True))
    att = att / att.sum(axis=-1, keepdims=True)  # softmax over the keys: [B, NH, T, T]
    y = att @ v  # [B, NH, T, hs]
    return y.transpose(0, 2, 1, 3).reshape(B, T, C), att  # heads side by side again: [B, T, C]


def attention_backward(dy, qkv, att, NH):  # docs/derivations.md#attention
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (a.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, axis=-1))
    dy = dy.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)  # [B, NH, T, hs]
    datt = dy @ v.transpose(0, 1, 3, 2)  # y = att v  ->  datt = dy v^T: [B, NH, T, T]
    dv = att.transpose(0, 1, 3, 2) @ dy  # and dv = att^T dy: [B, NH, T, hs]
    dpre = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # softmax: at pre; 0 where masked
    dqk = dpre / math.sqrt(C // NH)  # pre = qk / sqrt(hs): the gradient at the unscaled qk = q k^T
    dq = dqk @ k  # [B, NH, T, hs]
    dk = dqk.transpose(0, 1, 3, 2) @ q  # [B, NH, T, hs]
    merge = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, C)  # noqa: E731  [B, NH, T, hs] -> [B, T, C]
    return np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)  # [B, T, 3C]


def cross_entropy_forward(logits, targets):
    z = logits - logits.max(axis=-1, keepdims=True)  # same softmax, no overflow: [N, K]
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # log-softmax: [N, K]
    return -logp[np.arange(len(targets)), targets].mean()


def cross_entropy_backward(logits, targets):  # docs/derivations.md#cross-entropy
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)  # softmax: [N, K]
    return (p - np.eye(logits.shape[-1])[targets]) / len(targets)  # dloss/dlogits: [N, K]


def masked_cross_entropy_forward(logits, targets, ignore_index=-100):
    counted = targets != ignore_index  # [N]: the rows whose target is a real token
    return cross_entropy_forward(logits[counted], targets[counted])  # the mean over the M counted rows


def masked_cross_entropy_backward(logits, targets, ignore_index=-100):  # docs/derivations.md#the-masked-mean-ignored-positions
    counted = targets != ignore_index
    d = np.zeros_like(logits)  # an ignored row has no loss term, hence no gradient
    d[counted] = cross_entropy_backward(logits[counted], targets[counted])  # / M, not / N: [N, K]
    return d


# -------------------------------------------------------------- a linear with its LoRA adapters


def adapters(params, name):
    """The LoRA adapters on the linear `name`: (prefix, the output columns they write)."""
    if name.endswith("attn.c_attn"):  # three adapters over the fused [Q | K | V] columns
        C = params[name + ".weight"].shape[0]
        parts = [(f"{name}.{part}", slice(j * C, (j + 1) * C)) for j, part in enumerate("qkv")]
    else:
        parts = [(name, slice(None))]
    return [(prefix, cols) for prefix, cols in parts if prefix + ".lora_A" in params]


def lora_forward(params, prefix, x, s):
    return s * (x @ params[prefix + ".lora_A"]) @ params[prefix + ".lora_B"]  # [B, T, in] -> [B, T, out]


def lora_backward(d, params, prefix, x, s, grads):  # docs/derivations.md#lora
    """The adapter's share of dx, given d, the gradient at its output; dA, dB go into grads."""
    A, B = params[prefix + ".lora_A"], params[prefix + ".lora_B"]  # [in, r], [r, out]
    grads[prefix + ".lora_B"] = s * np.einsum("btr,bto->ro", x @ A, d)  # [r, out]
    g = s * d @ B.T  # [B, T, r]: the gradient at the bottleneck x A
    grads[prefix + ".lora_A"] = np.einsum("bti,btr->ir", x, g)  # [in, r]
    return g @ A.T  # [B, T, in]


def lora_linear_forward(params, name, x, s):
    y = linear_forward(x, params[name + ".weight"], params.get(name + ".bias", 0.0))  # [B, T, out]
    for prefix, cols in adapters(params, name):
        delta = np.zeros_like(y)
        delta[..., cols] = lora_forward(params, prefix, x, s)  # its columns only
        y = y + delta
    return y


def lora_linear_backward(dy, params, name, x, s, grads):  # docs/derivations.md#lora
    """dx; the gradients of the weight, bias and adapters go into `grads`."""
    dx, grads[name + ".weight"], db = linear_backward(dy, x, params[name + ".weight"])
    if name + ".bias" in params:
        grads[name + ".bias"] = db
    for prefix, cols in adapters(params, name):
        dx = dx + lora_backward(dy[..., cols], params, prefix, x, s, grads)  # the columns it wrote
    return dx


# ------------------------------------------------------------------------------ the model


def forward(params, idx, n_heads, lora_scale=1.0, positions=None):
    """Logits (B, T, V) of token ids idx (B, T), or (B, V) at one position per sequence
    when positions (B,) is given; and acts, every activation the backward reads."""
    p, s = params, lora_scale
    n_layers = sum(1 for name in p if name.endswith(".ln_1.weight"))
    B, T = idx.shape
    acts = {"idx": idx, "positions": positions}
    x = acts["embedding"] = embedding_forward(idx, p["wte.weight"], p["wpe.weight"])  # [B, T, C]
    for i in range(n_layers):
        h = f"h.{i}."
        acts[h + "x"] = x  # [B, T, C], the residual stream entering block i
        a, acts[h + "ln_1.mean"], acts[h + "ln_1.rstd"] = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        acts[h + "ln_1"] = a  # [B, T, C]
        a = acts[h + "attn.c_attn"] = lora_linear_forward(p, h + "attn.c_attn", a, s)  # [B, T, 3C]
        a, acts[h + "attn.att"] = attention_forward(a, n_heads)  # [B, T, C]; att [B, NH, T, T]
        acts[h + "attn.y"] = a
        a = acts[h + "attn.c_proj"] = lora_linear_forward(p, h + "attn.c_proj", a, s)  # [B, T, C]
        x = acts[h + "x_mid"] = x + a  # residual
        m, acts[h + "ln_2.mean"], acts[h + "ln_2.rstd"] = layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        acts[h + "ln_2"] = m  # [B, T, C]
        m = acts[h + "mlp.c_fc"] = lora_linear_forward(p, h + "mlp.c_fc", m, s)  # [B, T, 4C]
        m = acts[h + "mlp.gelu"] = gelu_forward(m)  # [B, T, 4C]
        m = acts[h + "mlp.c_proj"] = lora_linear_forward(p, h + "mlp.c_proj", m, s)  # [B, T, C]
        x = x + m  # residual
    acts["x_final"] = x  # [B, T, C]
    x, acts["ln_f.mean"], acts["ln_f.rstd"] = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])
    acts["ln_f"] = x  # [B, T, C]
    if "out_head.weight" in p:  # a classifier head
        logits = lora_linear_forward(p, "out_head", x, s)  # [B, T, classes]
    else:  # GPT-2's LM head is the token table, transposed ("tied")
        logits = x @ p["wte.weight"].T  # [B, T, V]
        if "lm_head.lora_A" in p:  # LoRA on the tied head: beside wte, never into it (wte is the embedding too)
            logits = logits + lora_forward(p, "lm_head", x, s)  # [B, T, V]
    if positions is not None:  # the loss reads one position per sequence
        logits = logits[np.arange(B), positions]  # [B, V]
    return logits, acts


def backward(dlogits, params, acts, n_heads, lora_scale=1.0):
    """grads (name -> gradient, for every parameter) and dacts (name -> gradient of the
    activation of that name in acts), given dlogits = dL/dlogits. The forward, read up."""
    p, s = params, lora_scale
    n_layers = sum(1 for name in p if name.endswith(".ln_1.weight"))
    idx, positions = acts["idx"], acts["positions"]
    grads, dacts = {}, {}
    if positions is not None:  # logits = logits[rows]: the other rows get zero gradient
        full = np.zeros((*idx.shape, dlogits.shape[-1]), dtype=dlogits.dtype)  # [B, T, V]
        full[np.arange(idx.shape[0]), positions] = dlogits
        dlogits = full
    x = acts["ln_f"]
    if "out_head.weight" in p:
        dx = lora_linear_backward(dlogits, p, "out_head", x, s, grads)  # [B, T, C]
    else:  # logits = x wte^T
        dx = dlogits @ p["wte.weight"]  # [B, T, C]
        dwte_head = np.einsum("btv,btc->vc", dlogits, x)  # [V, C]
        if "lm_head.lora_A" in p:
            dx = dx + lora_backward(dlogits, p, "lm_head", x, s, grads)  # [B, T, C]
    dacts["ln_f"] = dx
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(
        dx, acts["x_final"], p["ln_f.weight"], acts["ln_f.mean"], acts["ln_f.rstd"])
    dacts["x_final"] = dx
    for i in reversed(range(n_layers)):
        h = f"h.{i}."
        # x = x + m: the gradient reaches x directly and through the MLP branch
        dacts[h + "mlp.c_proj"] = dx  # [B, T, C]
        dm = dacts[h + "mlp.gelu"] = lora_linear_backward(dx, p, h + "mlp.c_proj", acts[h + "mlp.gelu"], s, grads)
        dm = dacts[h + "mlp.c_fc"] = gelu_backward(dm, acts[h + "mlp.c_fc"])  # [B, T, 4C]
        dm = dacts[h + "ln_2"] = lora_linear_backward(dm, p, h + "mlp.c_fc", acts[h + "ln_2"], s, grads)
        dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layernorm_backward(
            dm, acts[h + "x_mid"], p[h + "ln_2.weight"], acts[h + "ln_2.mean"], acts[h + "ln_2.rstd"])
        dx = dacts[h + "x_mid"] = dx + dm  # gradients add where the stream forked
        # x = x + a: likewise through the attention branch
        dacts[h + "attn.c_proj"] = dx  # [B, T, C]
        da = dacts[h + "attn.y"] = lora_linear_backward(dx, p, h + "attn.c_proj", acts[h + "attn.y"], s, grads)
        da = dacts[h + "attn.c_attn"] = attention_backward(da, acts[h + "attn.c_attn"], acts[h + "attn.att"], n_heads)
        da = dacts[h + "ln_1"] = lora_linear_backward(da, p, h + "attn.c_attn", acts[h + "ln_1"], s, grads)
        da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layernorm_backward(
            da, acts[h + "x"], p[h + "ln_1.weight"], acts[h + "ln_1.mean"], acts[h + "ln_1.rstd"])
        dx = dacts[h + "x"] = dx + da
    dacts["embedding"] = dx
    grads["wte.weight"], grads["wpe.weight"] = embedding_backward(dx, idx, p["wte.weight"], p["wpe.weight"])
    if "out_head.weight" not in p:  # the tied table was used twice: its gradients add
        grads["wte.weight"] = grads["wte.weight"] + dwte_head
    return grads, dacts
