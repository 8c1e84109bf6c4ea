"""GPT-2: parameters under the Hugging Face names, forward and backward, fast.

The forward keeps what the backward needs; the backward is the forward read in
reverse, one call per line (karpathy/llm.c ``train_gpt2.c``). Parameters live in
one flat dict ``model.params`` under the names of the Hugging Face GPT-2
checkpoint ("wte.weight", "h.0.attn.c_attn.weight", ..., "ln_f.bias"), weights
stored (in, out) so every linear is ``x @ w + b`` (jaymody/picoGPT).

This is the fast path. Read ``minilora/reference.py`` first: the same forward and
backward with nothing but the math (tests/test_reference.py holds the two equal to
1e-12 in float64). What this file adds, each marked where it happens:
  - shards: on the CPU the batch runs as one shard per core, in threads (forward);
  - frozen means no work: no dW, no layernorm dw/db, no scatter-add for frozen
    parameters, and the backward stops under the lowest block that trains anything;
    a frozen linear's cache lets its input go (only a dW would read it);
  - the last-block trim: with ``positions`` the last block after its attention, the
    final layernorm and the head (with its adapter) run on the rows the loss reads, not
    on every row;
  - one head, ``_head_forward``, for the forward and for generation's KV-cache path:
    the tied LM head x @ wte^T with its LoRA adapter "lm_head", or the classifier's
    out_head; a frozen wte gets no head dW;
  - activations freed as the backward consumes them, residual gradients added in place;
  - stacked Q/K/V adapters: a block's Q, K and V adapters of one rank and scale run as one
    (lora.lora_stack_forward: two products forward where one by one they take six), except
    while LoRA dropout draws a mask per adapter; reference.py runs each on its own columns.

References: Radford et al. 2019 (GPT-2); Raschka, "Build a Large Language Model
(From Scratch)", ch. 4 and appendix E; karpathy/nanoGPT ``model.py``.
"""

import math

import numpy as np

from . import backend
from .config import GPTConfig, param_shapes
from .layers import (
    SequenceRNG,
    attention_backward,
    attention_forward,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from .lora import (
    AdapterStack,
    lora_backward,
    lora_forward,
    lora_stack_backward,
    lora_stack_forward,
)
from .weights import load_pretrained

LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon
_INIT_CHUNK = 1 << 22  # random init draws this many float64 values at a time (32 MB)


def backward_extent(trainable, n_layers):
    """(embeddings_train, lowest): whether a position or token table trains, and the
    lowest block the backward must reach (0 when the embeddings train, n_layers when no
    block trains anything). Under it nothing needs a gradient, so the backward stops."""
    embeddings_train = "wte.weight" in trainable or "wpe.weight" in trainable
    trained_blocks = [int(n.split(".")[1]) for n in trainable if n.startswith("h.")]
    return embeddings_train, 0 if embeddings_train else min(trained_blocks, default=n_layers)


class GPTModel:
    """GPT-2 with hand-written forward and backward.

    params: dict name -> array (on the model's device, in its dtype).
    trainable: list of the names backward returns gradients for; all parameters
        until LoRA (or the user) freezes some. Frozen weights cost no gradient work.
    lora: the adapters' state once ``minilora.apply_lora`` has run, else None.
    """

    def __init__(self, cfg, seed=0, dtype="float32", device=None, init=True):
        if isinstance(cfg, str):
            cfg = GPTConfig.from_preset(cfg)
        self.cfg = cfg
        self.dtype = backend.resolve_dtype(dtype)
        self.device = backend.resolve_device(device)
        self.xp = backend.get_xp(self.device)
        self.params = {}
        self.trainable = []
        self.lora = None
        self.name = None  # the checkpoint the weights came from, when loaded
        self.training = True
        self._dropout_rng = np.random.default_rng(seed + 1)
        self._cache = None
        self._forward_trainable = frozenset()  # the trainable names of the last forward
        if init:
            self._init_params(seed)
            self.trainable = list(self.params)

    def _init_params(self, seed):
        """GPT-2 initialization: weights N(0, 0.02), the residual projections scaled by
        1/sqrt(2 n_layers), biases 0, LayerNorm weights 1. Drawn from NumPy's generator
        in float64 and cast, so float32/float64 and CPU/GPU models start equal."""
        rng = np.random.default_rng(seed)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, shape in param_shapes(self.cfg).items():
            value = np.empty(shape, dtype=self.dtype)
            if name.endswith("bias"):
                value[...] = 0.0
            elif ".ln_" in name or name.startswith("ln_f"):
                value[...] = 1.0
            else:
                std = resid_std if name.endswith("c_proj.weight") else 0.02
                flat = value.reshape(-1)
                for i in range(0, flat.size, _INIT_CHUNK):  # float64 draws, a chunk at a time:
                    n = min(_INIT_CHUNK, flat.size - i)  # the same stream as one big draw
                    flat[i:i + n] = rng.normal(0.0, std, size=n)
            self.params[name] = self._to_model(value)

    def _to_model(self, array):
        return backend.to_device(np.asarray(array), self.device, self.dtype)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype="float32", device=None, **download_kwargs):
        """Load GPT-2 weights from a preset name (downloaded and cached), a
        model.safetensors file, or a folder holding model.safetensors + config.json."""
        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, **download_kwargs)

    # ------------------------------------------------------------------ bookkeeping

    def train(self):
        """Dropout on (when drop_rate > 0)."""
        self.training = True
        return self

    def eval(self):
        """Dropout off."""
        self.training = False
        return self

    @property
    def n_out(self):
        """Width of the logits: the vocabulary, or the classes after replace_head."""
        w = self.params.get("out_head.weight")
        return self.cfg.vocab_size if w is None else w.shape[1]

    def num_params(self, trainable_only=False):
        names = self.trainable if trainable_only else self.params
        return int(sum(self.params[n].size for n in names))

    def summary(self):
        """Multi-line text: total, trainable and frozen parameter counts (as the book prints)."""
        total, trainable = self.num_params(), self.num_params(trainable_only=True)
        return (f"Total parameters:     {total:>13,}\n"
                f"Trainable parameters: {trainable:>13,}\n"
                f"Frozen parameters:    {total - trainable:>13,}")

    def replace_head(self, num_classes, seed=123):
        """Replace the tied LM head with a classifier Linear(emb_dim, num_classes) with bias.

        Initialized as torch's nn.Linear does: weight and bias uniform in
        +-1/sqrt(emb_dim). The new parameters are trainable like every other one
        (apply_lora then freezes them, as the book does).
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            # one class has nothing to tell apart, and its adapter would not load back (the
            # adapter config asks for 2 or more)
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.cfg.emb_dim)
        self.params["out_head.weight"] = self._to_model(rng.uniform(-bound, bound, (self.cfg.emb_dim, num_classes)))
        self.params["out_head.bias"] = self._to_model(rng.uniform(-bound, bound, (num_classes,)))
        for name in ("out_head.weight", "out_head.bias"):
            if name not in self.trainable:
                self.trainable.append(name)
        return self

    def freeze(self, names=None):
        """Stop training the given parameter names (all when None)."""
        drop = set(self.params if names is None else names)
        self.trainable = [n for n in self.trainable if n not in drop]

    # ------------------------------------------------------------------ input checks

    def check_idx(self, idx):
        """Validate token ids on the host and return them as an int64 array on the
        model's device. CuPy would silently wrap an out-of-range id, so this is the
        one place that stands between a bad id and a wrong answer."""
        host = backend.to_numpy(idx)
        if host.dtype.kind not in "iu":
            raise TypeError(f"token ids must be an integer array, got dtype {host.dtype}")
        if host.ndim != 2:
            raise ValueError(f"token ids must have shape (batch, time), got shape {host.shape}")
        B, T = host.shape
        if B == 0 or T == 0:
            raise ValueError(f"token ids must be non-empty, got shape {host.shape}")
        if T > self.cfg.context_length:
            raise ValueError(f"sequence length {T} exceeds the context length {self.cfg.context_length}")
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return backend.to_device(host.astype(np.int64, copy=False), self.device)

    def _check_positions(self, positions, shape):
        """positions (B,) in [0, T), checked on the host, as int64 on the model's device."""
        B, T = shape
        pos = backend.to_numpy(positions)
        if pos.dtype.kind not in "iu" or pos.shape != (B,):
            raise ValueError(f"positions must be an integer array of shape ({B},), got {pos.dtype} {pos.shape}")
        if pos.min() < 0 or pos.max() >= T:
            raise ValueError(f"positions must lie in [0, {T}), got {pos.min()}..{pos.max()}")
        return backend.to_device(pos.astype(np.int64), self.device)

    # ------------------------------------------------------------------ linears (+ LoRA)

    def _weight(self, name):
        """(parameter name, weight (in, out)) of the linear `name`. The tied LM head
        "lm_head" reads the token table transposed, W = wte^T (a view, no copy), unless
        merge_lora gave it an untied lm_head.weight (lora.merge_lora says why)."""
        if name == "lm_head" and "lm_head.weight" not in self.params:
            return "wte.weight", self.params["wte.weight"].T  # [V, C] -> [C, V]
        return name + ".weight", self.params[name + ".weight"]

    def _head_name(self):
        """The head the logits come from: "out_head" after replace_head, else "lm_head"."""
        return "out_head" if "out_head.weight" in self.params else "lm_head"

    def _head_forward(self, x, rng=None):
        """logits = x @ W_head (+ b) + the head's active adapter: (logits, cache).

        x: (..., C), the final layernorm's output. The one head of the model: forward
        and generate.forward_incremental both run it, so an adapter on the tied LM head
        (logits = x @ wte^T + s * (x @ A) @ B) acts in generation too."""
        return self._linear_forward(self._head_name(), x, rng)

    def _linear_forward(self, name, x, rng=None):
        """x @ W + b for the linear `name`, plus every active LoRA adapter on it
        (rng: the LoRA dropout generator, None for no dropout). The cache records the
        weight's parameter name (wte.weight for the tied head) for the backward."""
        p = self.params
        w_name, w = self._weight(name)
        y, cache = linear_forward(x, w, p.get(name + ".bias"))
        if w_name not in self._forward_trainable:
            # Frozen W: its backward needs only W (dx = dout W^T), so the cache lets x go
            # (reference.forward keeps every activation). An adapter's cache still keeps x.
            cache = (None, cache[1])
        adapters = self.lora.active(name) if self.lora is not None else ()
        lora_caches = []  # (Adapter or AdapterStack, its cache)
        # Stacked Q/K/V adapters read one input, so not while LoRA dropout draws a mask per
        # adapter: then each sees its own dropped x, one by one below
        stack = self.lora.stacks.get(name) if adapters and (rng is None or not self.lora.dropout) else None
        if stack is not None:
            delta, c = lora_stack_forward(x, [p[ad.prefix + ".lora_A"] for ad in stack.adapters],
                                          [p[ad.prefix + ".lora_B"] for ad in stack.adapters], stack.scale)
            y_blocks = stack.blocks_of(y)  # [..., k, C], a view: y is the linear's fresh output
            y_blocks += delta
            lora_caches.append((stack, c))
        for ad in adapters:
            if stack is not None and ad in stack.adapters:
                continue
            delta, c = lora_forward(x, p[ad.prefix + ".lora_A"], p[ad.prefix + ".lora_B"], ad.scale,
                                    self.lora.dropout, rng)
            y_cols = y[..., ad.cols]  # a view (basic slicing): `y[..., cols] += delta` would also
            y_cols += delta  # write the sum back through __setitem__, a second pass
            lora_caches.append((ad, c))
        return y, (w_name, cache, lora_caches)

    def _linear_backward(self, name, dout, cache, grads, need_dx=True):
        """dx for the linear `name` (None when need_dx is False); its weight/bias/LoRA
        gradients go into `grads`."""
        w_name, base_cache, lora_caches = cache
        train = self._forward_trainable
        dx, dw, db = linear_backward(dout, base_cache, need_dx=need_dx, need_dw=w_name in train,
                                     need_db=name + ".bias" in train and name + ".bias" in self.params)
        if dw is not None and w_name == "wte.weight":
            dw = dw.T  # the tied head used W = wte^T: wte's share is dW^T, [C, V] -> [V, C]
        self._accumulate(grads, w_name, dw)
        self._accumulate(grads, name + ".bias", db)
        for group, c in lora_caches:
            if isinstance(group, AdapterStack):
                dx_lora, dAs, dBs = lora_stack_backward(group.blocks_of(dout), c, need_dx=need_dx)
                ads = group.adapters
            else:
                dx_lora, dA, dB = lora_backward(dout[..., group.cols], c, need_dx=need_dx)
                ads, dAs, dBs = (group,), (dA,), (dB,)
            if need_dx:
                dx += dx_lora
            for ad, dA, dB in zip(ads, dAs, dBs):
                self._accumulate(grads, ad.prefix + ".lora_A", dA)
                self._accumulate(grads, ad.prefix + ".lora_B", dB)
        return dx

    @staticmethod
    def _accumulate(grads, name, g):
        if g is not None:
            grads[name] = grads[name] + g if name in grads else g

    def _rng(self):
        """The dropout generator while training with dropout, else None (dropout off)."""
        return self._dropout_rng if self.training else None

    # ------------------------------------------------------------------ forward / backward

    def forward(self, idx, keep_cache=True, positions=None):
        """Logits (B, T, n_out) for token ids idx (B, T).

        positions: optional int (B,): one position per sequence (e.g. the last token a
            classifier reads); then the last block (after its attention has read every
            position's key and value), the final layernorm and the head run on those
            rows alone and the logits are (B, n_out). backward then takes dlogits (B, n_out).
        keep_cache=False skips keeping the activations backward needs (evaluation).

        Shards (not in reference.forward): on the CPU the batch is split into one shard
        per core (``backend.batch_shards``), run in parallel threads: NumPy's elementwise
        work is single-threaded, so this is what puts every core to work on it. Each shard is the same computation on fewer
        rows; the result is the same up to float rounding of the summed gradients.
        Dropout masks are drawn sequence by sequence, so they do not depend on the split.
        """
        self._cache = None  # drop the previous step's activations before making new ones
        self._forward_trainable = frozenset(self.trainable)  # what this forward keeps caches for
        idx = self.check_idx(idx)
        pos = None if positions is None else self._check_positions(positions, idx.shape)
        shards = backend.batch_shards(idx.shape[0], self.device)
        rngs = self._dropout_rngs(idx.shape[0], shards)
        outs = backend.run_parallel(
            lambda s, rng: self._forward_shard(idx[s], None if pos is None else pos[s], keep_cache, rng),
            list(zip(shards, rngs)))
        logits = outs[0][0] if len(outs) == 1 else self.xp.concatenate([out for out, _ in outs])
        self._cache = [(s, cache) for s, (_, cache) in zip(shards, outs)] if keep_cache else None
        self._logits_shape = tuple(logits.shape)  # what backward's dlogits must be
        return logits

    def _dropout_rngs(self, batch, shards):
        """Each shard's dropout generator (None while dropout is off): one generator per
        sequence, seeded from the model's own, so that the masks depend neither on the
        number of shards nor on which thread runs first."""
        rng = self._rng()
        if rng is None:
            return [None] * len(shards)
        per_sequence = SequenceRNG.from_seeds(rng.integers(2**63, size=batch))
        return [per_sequence[s] for s in shards]

    def _forward_shard(self, idx, pos, keep_cache, rng):
        """(logits, cache) of one shard: idx (b, T) on the device, pos (b,) or None."""
        cfg, p = self.cfg, self.params
        drop = cfg.drop_rate if rng is not None else 0.0
        x, c_emb = embedding_forward(idx, p["wte.weight"], p["wpe.weight"])  # [B, T, C]
        x, c_drop = dropout_forward(x, drop, rng)
        rows = None if pos is None else (self.xp.arange(idx.shape[0]), pos)
        blocks = []
        for i in range(cfg.n_layers):
            h = f"h.{i}."
            # The last-block trim: with positions, the last block computes only the rows the
            # loss reads, once its attention has used the keys and values of every
            # position (reference.forward computes every row and picks them from the
            # logits; by causality the chosen rows are the same numbers).
            query_pos = pos if i == cfg.n_layers - 1 else None
            a, c_ln1 = layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], LN_EPS)
            a, c_qkv = self._linear_forward(h + "attn.c_attn", a, rng)  # [B, T, 3C]
            a, c_att = attention_forward(a, cfg.n_heads, drop, rng, query_pos)  # [B, T, C] or [B, C]
            a, c_proj = self._linear_forward(h + "attn.c_proj", a, rng)
            a, c_drop1 = dropout_forward(a, drop, rng)
            if query_pos is not None:
                x = x[rows]  # [B, T, C] -> [B, C]
            x = x + a  # residual
            m, c_ln2 = layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], LN_EPS)
            m, c_fc = self._linear_forward(h + "mlp.c_fc", m, rng)  # [B, T, 4C]
            m, c_gelu = gelu_forward(m)
            m, c_mproj = self._linear_forward(h + "mlp.c_proj", m, rng)  # [B, T, C]
            m, c_drop2 = dropout_forward(m, drop, rng)
            x = x + m  # residual
            if keep_cache:  # else each block's activations are freed as soon as the next one runs
                blocks.append((c_ln1, c_qkv, c_att, c_proj, c_drop1, c_ln2, c_fc, c_gelu, c_mproj, c_drop2))
        x, c_lnf = layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], LN_EPS)
        logits, c_head = self._head_forward(x, rng)  # [B, T, n_out], or [B, n_out] with positions
        return logits, ((c_emb, c_drop, blocks, rows, c_lnf, c_head) if keep_cache else None)

    __call__ = forward

    def backward(self, dlogits):
        """Gradients (dict name -> array) of every trainable parameter, given dL/dlogits.

        Consumes the activations the forward kept: one backward per forward. Each shard
        of the forward runs its own backward on its rows of dlogits; the parameter
        gradients of the shards add up (the loss is a sum over the batch)."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward(idx) with keep_cache=True first "
                               "(and one forward per backward)")
        if self.lora is not None and self.lora.merged and set(self.lora.param_names) & set(self.trainable):
            raise RuntimeError("LoRA adapters are merged into the weights: unmerge_lora(model) before training")
        if "lm_head.weight" in self.params and "wte.weight" in self._forward_trainable:
            # the head read lm_head.weight, not wte: wte's head gradient would be missing
            raise RuntimeError("the LM head has a weight of its own, lm_head.weight (a merged LoRA head, or a "
                               "checkpoint with tie_word_embeddings false), and minilora trains wte only as "
                               "the tied head: unmerge_lora(model) first, or train LoRA adapters instead")
        if tuple(dlogits.shape) != self._logits_shape:  # else it fails deep inside a layer
            raise ValueError(f"dlogits has shape {tuple(dlogits.shape)}, the logits of the last "
                             f"forward have shape {self._logits_shape}")
        if set(self.trainable) != self._forward_trainable:  # the forward kept what those needed
            raise RuntimeError("model.trainable changed between forward and backward: run the forward again")
        shards, self._cache = self._cache, None  # backward consumes the activations
        parts = backend.run_parallel(lambda s, cache: self._backward_shard(dlogits[s], cache), shards)
        grads = parts[0]
        for part in parts[1:]:
            for name, g in part.items():
                grads[name] += g
        return {n: grads[n] for n in self.trainable if n in grads}

    def _backward_shard(self, dlogits, cache):
        """Gradients (dict) of one shard, from its dlogits rows and its forward's cache."""
        c_emb, c_drop, blocks, rows, c_lnf, c_head = cache
        train = self._forward_trainable
        grads = {}
        # Frozen means no work: below the lowest block that trains anything, and under a
        # frozen embedding, no gradient is needed, so the backward stops there
        # (reference.backward runs every block down to the embedding, always).
        embeddings_train, lowest = backward_extent(train, self.cfg.n_layers)
        lnf_trains = self._trains("ln_f.")
        # only the head trains (its adapter, say): no dx through it, a (N, n_out) @ (n_out, C) product
        dx = self._linear_backward(self._head_name(), dlogits, c_head, grads,
                                   need_dx=lnf_trains or lowest < self.cfg.n_layers)
        if dx is None:
            return grads
        dx, dw, db = layernorm_backward(dx, c_lnf, lnf_trains)
        self._accumulate_pair(grads, "ln_f.", dw, db)
        for i in reversed(range(lowest, self.cfg.n_layers)):
            h = f"h.{i}."
            below = i > lowest or embeddings_train  # does anything under block i train?
            # pop: a block's activations are freed once its backward is done
            c_ln1, c_qkv, c_att, c_proj, c_drop1, c_ln2, c_fc, c_gelu, c_mproj, c_drop2 = blocks.pop()
            # x = x + m: the residual passes dx straight through and into the MLP branch
            (dm,) = dropout_backward(dx, c_drop2)
            dm = self._linear_backward(h + "mlp.c_proj", dm, c_mproj, grads)
            (dm,) = gelu_backward(dm, c_gelu)
            dm = self._linear_backward(h + "mlp.c_fc", dm, c_fc, grads)
            dm, dw, db = layernorm_backward(dm, c_ln2, self._trains(h + "ln_2."))
            self._accumulate_pair(grads, h + "ln_2.", dw, db)
            # reference: dx = dx + dm; in place here, since dx is this backward's own array,
            # held by no cache
            dx += dm
            if not below and not any(n.startswith((h + "attn.", h + "ln_1.")) for n in train):
                break  # the attention branch and everything under it are frozen
            # x = x + a: likewise for the attention branch
            (da,) = dropout_backward(dx, c_drop1)
            da = self._linear_backward(h + "attn.c_proj", da, c_proj, grads)
            (da,) = attention_backward(da, c_att)
            ln1_trains = self._trains(h + "ln_1.")
            da = self._linear_backward(h + "attn.c_attn", da, c_qkv, grads, need_dx=below or ln1_trains)
            if da is None:
                break  # the bottom of what trains: nothing below needs dx
            da, dw, db = layernorm_backward(da, c_ln1, ln1_trains)
            self._accumulate_pair(grads, h + "ln_1.", dw, db)
            if rows is not None and i == self.cfg.n_layers - 1:  # forward: x = x[rows] + a
                da[rows] += dx  # [B, T, C]: only the selected rows received gradient
                dx = da
            else:
                dx += da
        if embeddings_train:  # frozen embeddings: no scatter-add
            (dx,) = dropout_backward(dx, c_drop)
            dwte, dwpe = embedding_backward(dx, c_emb)
            if "wte.weight" in train:
                self._accumulate(grads, "wte.weight", dwte)
            if "wpe.weight" in train:
                self._accumulate(grads, "wpe.weight", dwpe)
        return grads

    def _trains(self, prefix):
        """Whether the weight or bias of a layernorm `prefix` is trained."""
        return prefix + "weight" in self._forward_trainable or prefix + "bias" in self._forward_trainable

    def _accumulate_pair(self, grads, prefix, dw, db):
        """Add a weight/bias gradient pair (layernorm) for the trainable ones."""
        if prefix + "weight" in self._forward_trainable:
            self._accumulate(grads, prefix + "weight", dw)
        if prefix + "bias" in self._forward_trainable:
            self._accumulate(grads, prefix + "bias", db)
