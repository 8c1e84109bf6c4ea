"""Solutions: the whole GPT-2 backward (examples/exercises/model.py, answered).

    minilora gradcheck --module examples/exercises/solutions/model.py

The layers are minilora's reference layers (minilora/reference.py), used as `ref.NAME`
so that this file defines no layer function under the layer exercises' names. The
backward of the model is the forward of reference.forward read from the bottom up, one
line for one line; docs/derivations.md, "Residual connections and the tied head",
"LoRA" and "The whole model", derives each step.
Shapes: B batch, T time, C width, NH heads, V vocabulary (or classes), r rank.
"""

import numpy as np

from minilora import reference as ref


def linear_with_adapters_backward(dy, params, name, x, s, grads):
    """Backward of y = x @ w + b + sum over adapters of s * (x @ A) @ B, each adapter
    writing its own output columns cols (three over c_attn's Q | K | V, one elsewhere).

    dy (B, T, out); x (B, T, in), the linear's input. Returns dx (B, T, in) and puts the
    gradients of name.weight, name.bias (when there is one) and of every adapter's A, B
    into grads:

        dx = dy w^T + sum over adapters of s * (dy[..., cols] B^T) A^T
        dw = x^T dy,  db = sum dy,  dB = s (x A)^T dy[..., cols],  dA = x^T (s dy[..., cols] B^T)
    """
    dx, grads[name + ".weight"], db = ref.linear_backward(dy, x, params[name + ".weight"])
    if name + ".bias" in params:
        grads[name + ".bias"] = db
    for prefix, cols in ref.adapters(params, name):
        A, B = params[prefix + ".lora_A"], params[prefix + ".lora_B"]  # [in, r], [r, out]
        d = dy[..., cols]  # [B, T, out]: only the columns this adapter wrote
        grads[prefix + ".lora_B"] = s * np.einsum("btr,bto->ro", x @ A, d)  # [r, out]
        g = s * d @ B.T  # [B, T, r]: the gradient at the bottleneck x A; no (in, out) matrix
        grads[prefix + ".lora_A"] = np.einsum("bti,btr->ir", x, g)  # [in, r]
        dx = dx + g @ A.T  # the adapter's path into x adds to the frozen one: [B, T, in]
    return dx


def tied_head_backward(dlogits, x, wte):
    """Backward of GPT-2's LM head, logits = x wte^T, the token table reused transposed.

    dlogits (B, T, V); x (B, T, C), the final layernorm's output; wte (V, C). A linear
    layer with weight wte^T, so:

        dx = dlogits wte               (B, T, C)
        dwte = dlogits^T x             (V, C), summed over batch and time
    """
    dx = dlogits @ wte  # [B, T, V] @ [V, C] -> [B, T, C]
    dwte = np.einsum("btv,btc->vc", dlogits, x)  # [V, C]
    return dx, dwte


def model_backward(dlogits, params, acts, n_heads, lora_scale=1.0):
    """grads (name -> gradient, for every parameter) and dacts (name -> gradient of the
    activation of that name in acts), given dlogits = dL/dlogits of reference.forward."""
    p, s = params, lora_scale
    n_layers = sum(1 for name in p if name.endswith(".ln_1.weight"))
    idx, positions = acts["idx"], acts["positions"]
    grads, dacts = {}, {}
    if positions is not None:  # logits = logits[rows, positions]: the other rows get zero gradient
        full = np.zeros((*idx.shape, dlogits.shape[-1]), dtype=dlogits.dtype)  # [B, T, V]
        full[np.arange(idx.shape[0]), positions] = dlogits
        dlogits = full
    if "out_head.weight" in p:  # a classifier head
        dx = linear_with_adapters_backward(dlogits, p, "out_head", acts["ln_f"], s, grads)  # [B, T, C]
    else:  # the tied LM head: its share of dwte is added once the embedding's is known
        dx, dwte_head = tied_head_backward(dlogits, acts["ln_f"], p["wte.weight"])
    dacts["ln_f"] = dx
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = ref.layernorm_backward(
        dx, acts["x_final"], p["ln_f.weight"], acts["ln_f.mean"], acts["ln_f.rstd"])
    dacts["x_final"] = dx
    for i in reversed(range(n_layers)):
        h = f"h.{i}."
        # x = x_mid + m: the MLP's output gets the stream's gradient as it is
        dacts[h + "mlp.c_proj"] = dx  # [B, T, C]
        dm = dacts[h + "mlp.gelu"] = linear_with_adapters_backward(
            dx, p, h + "mlp.c_proj", acts[h + "mlp.gelu"], s, grads)  # [B, T, 4C]
        dm = dacts[h + "mlp.c_fc"] = ref.gelu_backward(dm, acts[h + "mlp.c_fc"])  # [B, T, 4C]
        dm = dacts[h + "ln_2"] = linear_with_adapters_backward(dm, p, h + "mlp.c_fc", acts[h + "ln_2"], s, grads)
        dm, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = ref.layernorm_backward(
            dm, acts[h + "x_mid"], p[h + "ln_2.weight"], acts[h + "ln_2.mean"], acts[h + "ln_2.rstd"])
        dx = dacts[h + "x_mid"] = dx + dm  # x_mid fed the skip and the MLP branch: the two add
        # x_mid = x + a: the attention's output gets x_mid's gradient as it is
        dacts[h + "attn.c_proj"] = dx  # [B, T, C]
        da = dacts[h + "attn.y"] = linear_with_adapters_backward(
            dx, p, h + "attn.c_proj", acts[h + "attn.y"], s, grads)  # [B, T, C]
        da = dacts[h + "attn.c_attn"] = ref.attention_backward(
            da, acts[h + "attn.c_attn"], acts[h + "attn.att"], n_heads)  # [B, T, 3C]
        da = dacts[h + "ln_1"] = linear_with_adapters_backward(da, p, h + "attn.c_attn", acts[h + "ln_1"], s, grads)
        da, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = ref.layernorm_backward(
            da, acts[h + "x"], p[h + "ln_1.weight"], acts[h + "ln_1.mean"], acts[h + "ln_1.rstd"])
        dx = dacts[h + "x"] = dx + da  # x fed the skip and the attention branch: the two add
    dacts["embedding"] = dx  # the stream entering block 0 is the embedding's output
    grads["wte.weight"], grads["wpe.weight"] = ref.embedding_backward(dx, idx, p["wte.weight"], p["wpe.weight"])
    if "out_head.weight" not in p:  # the tied table was used twice, by the embedding and the head
        grads["wte.weight"] = grads["wte.weight"] + dwte_head
    return grads, dacts
