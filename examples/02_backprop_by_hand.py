"""Backpropagation through a whole (tiny) GPT-2, one layer at a time, by hand.

    python examples/02_backprop_by_hand.py

The forward is written out line by line from the layer pairs of minilora.layers,
keeping each layer's cache; the backward is the same lines read in reverse, and prints
the shape and norm of every activation gradient as it flows from the loss down to the
embeddings. Where the forward fans out, the backward adds: the two residual connections
of each block, and wte, used both by the embedding and by the (tied) LM head. At the end
the parameter gradients are compared with GPTModel.backward's. The picture:
docs/diagrams.md; the math: docs/derivations.md#the-whole-model. (minilora/reference.py
does the same for the whole model in one function, returning every activation's
gradient in a dict, dacts.)
"""

import numpy as np

import minilora as ml
from minilora.layers import (
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)

cfg = ml.GPTConfig(vocab_size=13, context_length=8, emb_dim=16, n_heads=2, n_layers=2)
model = ml.GPTModel(cfg, seed=0, dtype="float64")
p = model.params
rng = np.random.default_rng(0)
tokens = rng.integers(0, cfg.vocab_size, size=(2, 7))
idx, targets = tokens[:, :-1], tokens[:, 1:]  # predict each next token
B, T = idx.shape
C, V, L = cfg.emb_dim, cfg.vocab_size, cfg.n_layers

# ------------------------------------------------------------------ forward, keeping every cache
x, c_emb = embedding_forward(idx, p["wte.weight"], p["wpe.weight"])  # [B, T, C]
caches = []
for i in range(L):
    h = f"h.{i}."
    a, c_ln1 = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])  # [B, T, C]
    a, c_attn = linear_forward(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # [B, T, 3C]
    a, c_att = attention_forward(a, cfg.n_heads)  # [B, T, C]
    a, c_aproj = linear_forward(a, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])  # [B, T, C]
    x = x + a  # residual: x goes on unchanged and into the attention branch
    m, c_ln2 = layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])  # [B, T, C]
    m, c_fc = linear_forward(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])  # [B, T, 4C]
    m, c_gelu = gelu_forward(m)  # [B, T, 4C]
    m, c_mproj = linear_forward(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])  # [B, T, C]
    x = x + m  # residual again
    caches.append((c_ln1, c_attn, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj))
x, c_lnf = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"])  # [B, T, C]
logits, c_head = linear_forward(x, p["wte.weight"].T)  # tied LM head: [B, T, C] @ [C, V] -> [B, T, V]
loss, c_loss = cross_entropy_forward(logits.reshape(B * T, V), targets.reshape(B * T))
print(f"tiny GPT-2: V={V}, C={C}, {L} layers, {cfg.n_heads} heads; batch {B} x {T} tokens; loss {float(loss):.4f}")
print(f"\n{'gradient of the loss with respect to':<52} {'shape':<12} {'norm':>10}")


def show(what, g):
    print(f"  {what:<50} {str(g.shape):<12} {np.linalg.norm(g):>10.6f}")


# ------------------------------------------------------------------ backward: the forward in reverse
grads = {}
(dlogits,) = cross_entropy_backward(1.0, c_loss)  # dL/dloss = 1
dlogits = dlogits.reshape(B, T, V)
show("logits", dlogits)
dx, dwte_head, _ = linear_backward(dlogits, c_head, need_db=False)
grads["wte.weight"] = dwte_head.T  # the head used wte^T: the first of wte's two gradients
show("ln_f output", dx)
dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(dx, c_lnf)
show(f"residual stream out of h.{L - 1}", dx)
for i in reversed(range(L)):
    h = f"h.{i}."
    c_ln1, c_attn, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj = caches[i]
    # forward: x = x + m, so dx reaches both x (unchanged) and m
    dm, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = linear_backward(dx, c_mproj)
    show(h + "mlp.c_proj input (gelu output)", dm)
    (dm,) = gelu_backward(dm, c_gelu)
    show(h + "mlp.c_fc output (gelu input)", dm)
    dm, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = linear_backward(dm, c_fc)
    show(h + "ln_2 output", dm)
    dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layernorm_backward(dm, c_ln2)
    show(h + "ln_2 input, through the MLP branch", dm)
    dx = dx + dm  # the two paths add
    show(f"residual stream between attn and mlp of h.{i} (sum)", dx)
    # forward: x = x + a, the same again
    da, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = linear_backward(dx, c_aproj)
    show(h + "attn.c_proj input (attention output)", da)
    (da,) = attention_backward(da, c_att)
    show(h + "attn.c_attn output (q | k | v)", da)
    da, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = linear_backward(da, c_attn)
    show(h + "ln_1 output", da)
    da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layernorm_backward(da, c_ln1)
    show(h + "ln_1 input, through the attention branch", da)
    dx = dx + da
    show(f"residual stream into h.{i} (sum)" if i else "embedding output (sum)", dx)
dwte, grads["wpe.weight"] = embedding_backward(dx, c_emb)
grads["wte.weight"] = grads["wte.weight"] + dwte  # wte's second gradient, from the embedding
show("wte (head + embedding)", grads["wte.weight"])
show("wpe", grads["wpe.weight"])

# ------------------------------------------------------------------ the same as GPTModel.backward?
model.forward(idx)
model_grads = model.backward(dlogits)
diff = max(np.abs(grads[n] - model_grads[n]).max() for n in model_grads)
assert set(grads) == set(model_grads)
print(f"\n{len(grads)} parameter gradients by hand vs GPTModel.backward: max abs difference {diff:.1e}")
