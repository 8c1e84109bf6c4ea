"""Exercise: the backward of the whole GPT-2 (with LoRA), written by hand.

The layer exercises (layers.py) give you each layer's backward. This one asks for
what joins them: the model's backward, the forward of minilora/reference.py read from
the bottom up. Three functions, in this order:

1. linear_with_adapters_backward: a linear with its LoRA adapters (three of them over
   the fused Q | K | V columns of c_attn, one on any other linear);
2. tied_head_backward: GPT-2's LM head, the token table reused as logits = x wte^T;
3. model_backward: the whole model, through both residual connections of every block,
   using 1 and 2 at every linear and at the head.

The layers are given: minilora's reference layers, called as `ref.layernorm_backward`,
`ref.attention_backward` and so on (import nothing from them by name into this file:
the layer checks would take those for your layers). So you can do this exercise before
the layer ones. Check your work at any time (from the repository root):

    minilora gradcheck --module examples/exercises/model.py
    minilora gradcheck --module examples/exercises/model.py --only model_backward

Each check compares your gradients with reference.backward's, which `minilora gradcheck`
itself proves against finite differences; they must agree to 1e-10. For the model it
compares the gradient of every activation in backward order, from the loss down to the
embedding, and names the first one that is wrong (the step that made it is the one to
fix), with a diagnosis where one can be made ("h.1.x_mid: residual fan-in missing its
branch"); then every parameter's gradient.

Read first: reference.forward (the forward you are reversing, and what it keeps in
acts) and docs/derivations.md, sections "Residual connections and the tied head",
"LoRA" and "The whole model". Shapes: B batch, T time, C width, NH heads, V vocabulary
(or classes), r rank.
"""

import numpy as np  # noqa: F401  (you will need it)

from minilora import reference as ref  # noqa: F401  ref.linear_backward, ref.adapters, ...


def linear_with_adapters_backward(dy, params, name, x, s, grads):
    """Backward of the linear `name` with its LoRA adapters, the forward of
    reference.lora_linear_forward(params, name, x, s):

        y = x @ w + b,  then for every (prefix, cols) in ref.adapters(params, name):
        y[..., cols] += s * (x @ A) @ B        A = params[prefix + ".lora_A"] (in, r)
                                               B = params[prefix + ".lora_B"] (r, out)

    dy (B, T, out); x (B, T, in), the linear's input; s the LoRA scale. Return dx
    (B, T, in), and put into grads the gradient of every parameter of this linear:
    name + ".weight", name + ".bias" (when params has one) and each adapter's
    prefix + ".lora_A" and ".lora_B". The frozen weight gets its gradient too: the
    reference computes every gradient (minilora's fast model skips frozen ones).

    Hint: ref.linear_backward(dy, x, w) gives dx, dw, db of the plain linear. An
    adapter only wrote its columns cols, so only dy[..., cols] flows into it. Its path
    into x adds to the frozen one. Go through the rank-r bottleneck (dy @ B^T first).
    See docs/derivations.md#lora.
    """
    raise NotImplementedError("linear_with_adapters_backward")


def tied_head_backward(dlogits, x, wte):
    """Backward of GPT-2's LM head, logits = x @ wte^T: the token table (V, C) reused,
    transposed, as the output layer ("tied").

    dlogits (B, T, V); x (B, T, C), the final layernorm's output. Return (dx (B, T, C),
    dwte (V, C)), where dwte is this head's share of wte's gradient only (the embedding
    adds its own in model_backward).

    Hint: a linear layer with weight wte^T and no bias. Mind which way dwte is
    transposed. See docs/derivations.md, "Residual connections and the tied head".
    """
    raise NotImplementedError("tied_head_backward")


def model_backward(dlogits, params, acts, n_heads, lora_scale=1.0):
    """Return (grads, dacts) for the forward logits, acts = reference.forward(params, idx,
    n_heads, lora_scale, positions), given dlogits = dL/dlogits (like logits):

    grads: parameter name -> its gradient, for every name in params;
    dacts: activation name -> its gradient, for every array in acts ("ln_f", "x_final",
           "h.1.mlp.c_proj", ..., "h.0.x", "embedding"): the gradient of acts[name].

    Read reference.forward from the bottom up, one line for one line:
    - positions (acts["positions"]) not None: the logits were read at one position per
      sequence, so dlogits is (B, V): scatter it into zeros of shape (B, T, V) first;
    - the head: params has "out_head.weight" (a classifier): linear_with_adapters_backward
      at "out_head"; else the tied LM head: tied_head_backward;
    - ln_f, then the blocks from the last to the first; each block is two residual
      connections, x_mid = x + attn(ln_1(x)) and x_out = x_mid + mlp(ln_2(x_mid)): where
      the stream forked into the skip and a branch, the two gradients add;
    - the embedding: ref.embedding_backward gives dwte, dwpe. With the tied head the table
      wte was used twice, so its gradient is the sum of the embedding's and the head's.

    The layers: ref.layernorm_backward(dy, x, w, mean, rstd) -> dx, dw, db;
    ref.gelu_backward(dy, x) -> dx; ref.attention_backward(dy, qkv, att, n_heads) -> dqkv;
    ref.embedding_backward(dx, idx, wte, wpe) -> dwte, dwpe; each reads its inputs and
    statistics from acts (e.g. acts["h.0.ln_1.mean"], acts["h.0.attn.att"]).
    See docs/derivations.md#the-whole-model.
    """
    raise NotImplementedError("model_backward")
