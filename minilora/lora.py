"""LoRA: low-rank adapters on GPT-2's linear layers, forward and backward by hand.

A LoRA-adapted linear computes

    y = x @ W + b + s * (x @ A) @ B        A: (in, r), B: (r, out), s the scaling

with W and b frozen and only A and B trained (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models"; Raschka, appendix E). On GPT-2's fused
``c_attn`` (C -> 3C = [Q | K | V]) the book puts three separate adapters, one per
column block; here every adapter names the columns of its linear it writes into,
so the fused and the plain case are one mechanism. The site "h.{i}.attn.c_attn"
itself is one adapter over all 3C columns (Hugging Face PEFT's default on GPT-2):
never part of "all", chosen only by naming it (see select_targets). The model runs the
Q/K/V adapters of one rank and scale as one stacked pair (lora_stack_forward): two
products where three adapters take six.

GPT-2's LM head is tied to the token table (logits = x @ wte^T, wte also the
embedding), so its adapter "lm_head" goes beside wte, never into it:

    logits = x @ wte^T + s * (x @ A) @ B      A: (C, r), B: (r, V)

wte stays frozen and shared; merge_lora gives the head a weight of its own
(see merge_lora for why). A classifier's head (replace_head) is "out_head" instead.

Scaling conventions (alpha, r):
  "alpha_over_r"  s = alpha / r        the paper, PEFT, the book's current notebook
  "alpha"         s = alpha            the book's print edition
  "rslora"        s = alpha / sqrt(r)  rank-stabilized LoRA (Kalajdzievski 2023)
"""

import fnmatch
import math
from dataclasses import dataclass

import numpy as np

from .backend import get_array_module
from .layers import dropout_backward, dropout_forward, linear_backward, linear_forward

SCALINGS = ("alpha_over_r", "alpha", "rslora")
HEADS = ("out_head", "lm_head")  # the adapter sites outside the blocks

# ---------------------------------------------------------------------------- layer pair


def lora_forward(x, A, B, scale, dropout_p=0.0, rng=None):
    """The low-rank path alone: delta = s * (dropout(x) @ A) @ B.

    x: (..., in); A: (in, r); B: (r, out); scale: float s.
    Returns delta (..., out) and cache (x_d, A, B, s xa, s, dropout mask), where
    xa = x_d @ A is (..., r): tiny, so it is kept rather than recomputed. The scale
    rides on xa, the thin (N, r) bottleneck, rather than on the (N, out) delta: the same
    product, one pass over r columns instead of out, and the backward's dB = (s xa)^T dout
    then needs no multiply of its own.
    """
    x_d, drop_cache = dropout_forward(x, dropout_p, rng)
    lead = x.shape[:-1]
    xa_s = x_d.reshape(-1, A.shape[0]) @ A  # [N, in] @ [in, r] -> [N, r], N = prod(lead)
    if scale != 1:  # s = alpha / r is 1 in the book's recipe (r = alpha = 16): x * 1 changes no bit
        xa_s *= xa_s.dtype.type(scale)  # s xa
    delta = xa_s @ B  # [N, r] @ [r, out] -> [N, out]
    return delta.reshape(*lead, B.shape[1]), (x_d, A, B, xa_s, scale, drop_cache)


def lora_backward(dout, cache, need_dx=True):
    """Gradients of delta = s * (x_d @ A) @ B, with g = s * dout @ B^T of shape (..., r),
    the gradient at the bottleneck x_d A (the scale s is folded into g, as the code does):

      dB = s * (x_d A)^T dout        (r, out)   summed over every row; s xa is in the cache
      dA = x_d^T g                   (in, r)
      dx = g A^T                     (..., in)  then through the dropout mask
    Going through the rank-r bottleneck first (g, then g A^T) keeps every product
    thin: no (in, out) matrix is ever formed. need_dx=False skips dx (None).
    Derivation: docs/derivations.md#lora.
    """
    x_d, A, B, xa_s, scale, drop_cache = cache
    n_in, r = A.shape
    n_out = B.shape[1]
    d2 = dout.reshape(-1, n_out)  # [N, out]
    dB = xa_s.T @ d2  # [r, N] @ [N, out] -> [r, out]
    g = d2 @ B.T  # [N, out] @ [out, r] -> [N, r]
    if scale != 1:  # as in the forward: no pass that multiplies by 1
        g *= g.dtype.type(scale)
    dA = x_d.reshape(-1, n_in).T @ g  # [in, N] @ [N, r] -> [in, r]
    if not need_dx:  # nothing upstream trains: skip dx (returned as None)
        return None, dA, dB
    dx = (g @ A.T).reshape(*dout.shape[:-1], n_in)  # [N, r] @ [r, in] -> [..., in]
    (dx,) = dropout_backward(dx, drop_cache)
    return dx, dA, dB


def lora_linear_forward(x, w, b, A, B, scale):
    """A whole LoRA linear, y = x @ w + b + s * (x @ A) @ B (used by gradcheck; the model
    composes linear_forward and lora_forward the same way, and reference.py writes it as
    reference.lora_linear_forward)."""
    y, c_lin = linear_forward(x, w, b)
    delta, c_lora = lora_forward(x, A, B, scale)
    return y + delta, (c_lin, c_lora)


def lora_linear_backward(dout, cache):
    """dx = dout W^T + s * (dout B^T) A^T; dA, dB as in lora_backward; the frozen W and b
    get no gradient work at all. Returns (dx, dA, dB). Derivation: docs/derivations.md#lora."""
    c_lin, c_lora = cache
    dx, _, _ = linear_backward(dout, c_lin, need_dw=False, need_db=False)
    dx_lora, dA, dB = lora_backward(dout, c_lora)
    return dx + dx_lora, dA, dB


# ---------------------------------------------------------------------------- stacked adapters


def lora_stack_forward(x, As, Bs, scale):
    """k adapters of one rank r and one scale s on the same input, each adding into its own
    block of w output columns (a block's Q, K and V adapters over c_attn), as two products
    where k separate lora_forward calls take 2k, and no dropout:

        xa    = x @ [A_1 | ... | A_k]         (N, k r)    one (in, k r) product
        delta = (s xa_j) @ B_j for every j    (k, N, w)   one batched (k, r, w) product

    delta[j] is adapter j's s * (x @ A_j) @ B_j, what lora_forward gives. The batched
    product wants xa as (k, N, r), a copy; the scale rides on that copy (lora_forward
    multiplies its xa in place, having no copy to ride on), and delta and, in the backward,
    dB = (s xa)^T dout carry it with no multiply of their own.
    x: (..., in); As: k arrays (in, r); Bs: k arrays (r, w); scale: float s.
    Returns delta (..., k, w), a view, to be added into the linear's output seen as blocks
    of w columns (AdapterStack.blocks_of), and cache (x, A_cat, B_stack, s xa, s).
    """
    xp = get_array_module(x)
    k, (r, w) = len(Bs), Bs[0].shape
    A_cat = xp.concatenate(As, axis=1)  # k x [in, r] -> [in, k r]
    B_stack = xp.stack(Bs)  # k x [r, w] -> [k, r, w]
    xa = x.reshape(-1, A_cat.shape[0]) @ A_cat  # [N, in] @ [in, k r] -> [N, k r]
    N = xa.shape[0]
    xa_s = xp.empty((k, N, r), dtype=xa.dtype)
    xp.multiply(xa.reshape(N, k, r).transpose(1, 0, 2), xa.dtype.type(scale), out=xa_s)  # [N, k r] -> [k, N, r]
    # one batched product (NumPy: k BLAS calls; CuPy: one batched GEMM call), rather than
    # the block-diagonal xa @ diag(B_1, ..., B_k), (N, k r) @ (k r, k w): k times the
    # arithmetic, and an operand to build. Measured with the add into the linear's output, at
    # C = 768, r = 16, k = 3, one shard's N = 480 rows on one core (best of 9): 0.77-0.91 ms
    # batched, 1.36-1.52 ms block-diagonal, 1.05-1.14 ms as three lora_forward products
    delta = xa_s @ B_stack  # [k, N, r] @ [k, r, w] -> [k, N, w]
    return delta.transpose(1, 0, 2).reshape(*x.shape[:-1], k, w), (x, A_cat, B_stack, xa_s, scale)


def lora_stack_backward(dout, cache, need_dx=True):
    """Gradients of lora_stack_forward: for each adapter j, lora_backward's on its block
    dout_j = dout[..., j, :], the k adapters' products batched as in the forward:

      dB_j = (s xa_j)^T dout_j             (k, r, w)   one batched product (s is in the cache)
      g_j  = s * dout_j B_j^T              (N, k, r)   one batched product, s on its copy
      dA_j = x^T g_j                       (k, in, r)  one batched product
      dx   = sum_j g_j A_j^T = g A_cat^T   (..., in)   one product: the k adapters' dx summed
    dx needs g as (N, k r), beside A_cat's columns: the batched product gives (k, N, r), so
    g is a copy, and s rides on it. dout: (..., k, w), the gradient of the linear's output
    on the adapters' blocks (AdapterStack.blocks_of). need_dx=False skips dx (None).
    Returns dx, dAs (k arrays (in, r)), dBs (k arrays (r, w)): views of one stacked array
    each. Derivation: docs/derivations.md#lora, once per block.
    """
    x, A_cat, B_stack, xa_s, scale = cache
    xp = get_array_module(xa_s)
    k, N, r = xa_s.shape
    w = B_stack.shape[2]
    d = dout.reshape(N, k, w).transpose(1, 0, 2)  # [k, N, w], a view of the blocks
    dB = xa_s.transpose(0, 2, 1) @ d  # [k, r, N] @ [k, N, w] -> [k, r, w]
    g_k = d @ B_stack.transpose(0, 2, 1)  # [k, N, w] @ [k, w, r] -> [k, N, r]
    g = xp.empty((N, k, r), dtype=g_k.dtype)
    xp.multiply(g_k.transpose(1, 0, 2), g_k.dtype.type(scale), out=g)  # [k, N, r] -> [N, k, r]
    dA = x.reshape(N, -1).T @ g.transpose(1, 0, 2)  # [in, N] @ [k, N, r] -> [k, in, r]
    dx = None
    if need_dx:
        dx = (g.reshape(N, k * r) @ A_cat.T).reshape(x.shape)  # [N, k r] @ [k r, in] -> [..., in]
    return dx, list(dA), list(dB)


@dataclass(frozen=True)
class AdapterStack:
    """The Q, K and V adapters of one c_attn (two or three of them) that share a rank and
    a scale: the forward runs them as one (lora_stack_forward) where no LoRA dropout is drawn."""

    adapters: tuple  # of Adapter, in Q, K, V order
    blocks: slice  # which of the linear's three C-column blocks they write: 0 = Q, 1 = K, 2 = V
    scale: float

    def blocks_of(self, y):
        """The adapters' column blocks of y (..., 3C) as a view (..., k, C). y must be
        C-contiguous (a linear's output or its gradient) for the view to be y's own memory."""
        return y.reshape(*y.shape[:-1], 3, -1)[..., self.blocks, :]


def qkv_stack(linear, adapters, rank_of):
    """The AdapterStack of the Q/K/V adapters among `adapters` (those on `linear`), or None:
    the largest set of two or three of them with one rank (rank_of(prefix)) and one scale;
    the others run one by one, as every adapter elsewhere."""
    parts = {linear + "." + part: j for j, part in enumerate("qkv")}
    qkv = [ad for ad in adapters if ad.prefix in parts]
    groups = {}
    for ad in qkv:
        groups.setdefault((rank_of(ad.prefix), ad.scale), []).append(ad)
    best = max(groups.values(), key=len, default=[])
    if len(best) < 2:
        return None
    first, second, last = (parts[ad.prefix] for ad in (best[0], best[1], best[-1]))
    return AdapterStack(tuple(best), slice(first, last + 1, second - first), best[0].scale)


# ---------------------------------------------------------------------------- on a model


def lora_scale(alpha, rank, scaling):
    """The factor s for a scaling convention (see the module docstring)."""
    if scaling == "alpha_over_r":
        return alpha / rank
    if scaling == "alpha":
        return float(alpha)
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    raise ValueError(f"unknown LoRA scaling {scaling!r}: expected one of {SCALINGS}")


@dataclass(frozen=True)
class Adapter:
    """One adapter: parameters `prefix`.lora_A/.lora_B, adding into columns `cols` of `linear`."""

    prefix: str  # e.g. "h.0.attn.c_attn.q"
    linear: str  # e.g. "h.0.attn.c_attn"
    cols: slice  # the output columns of `linear` it writes into
    scale: float


def adapter_sites(model):
    """Every place an adapter can go on `model`, in a fixed order: prefix -> (linear, cols, in, out)."""
    return config_sites(model.cfg, model.n_out if "out_head.weight" in model.params else None)


def config_sites(cfg, head_outputs=None):
    """The adapter sites of a model of GPTConfig `cfg`, without building it (what a caller
    needs to check --targets before loading anything). head_outputs: the width of the
    model's own out_head (a classifier: site "out_head"), or None when it has none: then
    the site is "lm_head", GPT-2's LM head tied to wte, C -> vocab_size."""
    C = cfg.emb_dim
    sites = {}
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        for j, part in enumerate("qkv"):  # three adapters over the fused Q|K|V columns
            sites[f"{h}attn.c_attn.{part}"] = (h + "attn.c_attn", slice(j * C, (j + 1) * C), C, C)
        sites[h + "attn.c_proj"] = (h + "attn.c_proj", slice(None), C, C)
        sites[h + "mlp.c_fc"] = (h + "mlp.c_fc", slice(None), C, 4 * C)
        sites[h + "mlp.c_proj"] = (h + "mlp.c_proj", slice(None), 4 * C, C)
        # one adapter over all of Q|K|V (PEFT's); last in the block, so the sites listed
        # before it (and in error messages) are those of the book
        sites[h + "attn.c_attn"] = (h + "attn.c_attn", slice(None), C, 3 * C)
    if head_outputs is not None:
        sites["out_head"] = ("out_head", slice(None), C, head_outputs)
    else:
        sites["lm_head"] = ("lm_head", slice(None), C, cfg.vocab_size)
    return sites


def is_whole_c_attn(prefix):
    """Whether `prefix` is the site of one adapter over all of a block's fused Q|K|V."""
    return prefix.endswith(".attn.c_attn")


def resolve_targets(model, targets="all", layers=None):
    """The adapter prefixes of `model` selected by `targets` and `layers` (see select_targets)."""
    return select_targets(adapter_sites(model), model.cfg.n_layers, targets, layers)


def select_targets(sites, n_layers, targets="all", layers=None):
    """The prefixes of `sites` (from adapter_sites or config_sites, of a model with
    `n_layers` blocks) selected by `targets` and `layers`.

    targets: "all" (every linear, Q/K/V separately, and the head: out_head on a
    classifier, lm_head on a language model), "attention" (Q and V, as in the LoRA
    paper), or a list of names / glob patterns matched against full prefixes
    ("h.*.mlp.c_fc") or their trailing part ("c_attn.q", "mlp.c_proj", "out_head",
    "lm_head"). "c_attn" (or "h.0.attn.c_attn") is the one adapter over all of Q|K|V;
    a pattern that also matches Q, K or V of a block ("*c_attn*") keeps those alone,
    as it did before that site existed. layers: block indices to keep (None = all; the
    head is no block's and stays).
    """
    if targets == "all":
        chosen = [p for p in sites if not is_whole_c_attn(p)]
    elif targets == "attention":
        chosen = [p for p in sites if p.endswith(("c_attn.q", "c_attn.v"))]
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        chosen = []
        for pat in patterns:
            hits = [p for p in sites if fnmatch.fnmatchcase(p, pat) or p.endswith("." + pat)]
            if not hits:
                raise ValueError(f"LoRA target {pat!r} matches no linear layer; e.g. {list(sites)[:6]}")
            hits = [p for p in hits if not (is_whole_c_attn(p) and any(p + "." + q in hits for q in "qkv"))]
            chosen += [p for p in hits if p not in chosen]
        chosen.sort(key=list(sites).index)
    if layers is not None:
        keep = {f"h.{i}." for i in layers}
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"LoRA layers {bad} out of range [0, {n_layers})")
        chosen = [p for p in chosen if p in HEADS or p[: p.index(".", 2) + 1] in keep]
    return chosen


class LoraState:
    """What apply_lora attached to a model: settings, adapters per linear, mode flags.

    rank and alpha are every adapter's, except where ranks / alphas (prefix -> value)
    say otherwise: what an imported PEFT adapter's rank_pattern / alpha_pattern give."""

    def __init__(self, rank, alpha, scaling, dropout, adapters, base_trainable, ranks=None, alphas=None):
        self.rank, self.alpha, self.scaling, self.dropout = rank, alpha, scaling, dropout
        self.ranks, self.alphas = dict(ranks or {}), dict(alphas or {})
        self.adapters = adapters  # list of Adapter, in site order
        self.by_linear = {}
        for ad in adapters:
            self.by_linear.setdefault(ad.linear, []).append(ad)
        self.stacks = {}  # linear -> AdapterStack: its Q/K/V adapters run as one pair
        for linear, ads in self.by_linear.items():
            stack = qkv_stack(linear, ads, self.rank_of)
            if stack is not None:
                self.stacks[linear] = stack
        self.base_trainable = base_trainable  # model.trainable before apply_lora, for remove_lora
        self.enabled = True
        self.merged = False
        self.own_head = False  # the model had an untied lm_head.weight of its own before any merge

    @property
    def scale(self):
        """The scale of an adapter of the common rank and alpha (each Adapter has its own)."""
        return lora_scale(self.alpha, self.rank, self.scaling)

    @property
    def targets(self):
        return [ad.prefix for ad in self.adapters]

    @property
    def param_names(self):
        return [ad.prefix + s for ad in self.adapters for s in (".lora_A", ".lora_B")]

    def rank_of(self, prefix):
        return self.ranks.get(prefix, self.rank)

    def alpha_of(self, prefix):
        return self.alphas.get(prefix, self.alpha)

    def active(self, linear):
        """The adapters the forward must run on `linear` (none when disabled or merged)."""
        if not self.enabled or self.merged:
            return ()
        return self.by_linear.get(linear, ())

    def config(self):
        """The settings to save; ranks / alphas only when some adapter has its own, so
        that an adapter of one rank keeps the keys it always had."""
        config = dict(rank=self.rank, alpha=self.alpha, scaling=self.scaling,
                      dropout=self.dropout, targets=self.targets)
        if self.ranks:
            config["ranks"] = dict(self.ranks)
        if self.alphas:
            config["alphas"] = dict(self.alphas)
        return config


def apply_lora(model, rank=16, alpha=16, scaling="alpha_over_r", targets="all", seed=123,
               dropout=0.0, layers=None, ranks=None, alphas=None):
    """Attach LoRA adapters to `model` and freeze every base parameter.

    A is drawn uniform in +-1/sqrt(rank) (what torch's kaiming_uniform_(a=sqrt(5))
    gives on an (in, r) tensor), B is zero: the adapted model starts equal to the
    base model. Afterwards model.trainable is the LoRA parameters alone.
    ranks / alphas: {target prefix: value} for adapters whose rank or alpha differs
    from `rank` / `alpha` (an imported PEFT adapter's rank_pattern / alpha_pattern);
    each such adapter's scale is lora_scale(its alpha, its rank, scaling).
    """
    if model.lora is not None:
        raise ValueError("the model already has LoRA adapters; remove_lora(model) first")
    ranks, alphas = dict(ranks or {}), dict(alphas or {})
    for r in [rank, *ranks.values()]:
        if not (isinstance(r, (int, np.integer)) and r > 0):
            raise ValueError(f"LoRA rank must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    for a in [alpha, *alphas.values()]:
        # alpha 0 makes the scale 0: the adapters would train without ever changing the output
        if not (isinstance(a, (int, float, np.number)) and math.isfinite(a) and a > 0):
            raise ValueError(f"LoRA alpha must be a positive finite number, got {a!r}")
    lora_scale(alpha, rank, scaling)  # an unknown scaling is refused before anything changes
    width = model.cfg.emb_dim
    for r in [rank, *ranks.values()]:
        if r > width:  # every adapted layer has emb_dim inputs or outputs
            raise ValueError(f"LoRA rank {r} exceeds the model width {width}: the update A @ B of a layer "
                             f"with {width} inputs or outputs has rank at most {width}")
    sites = adapter_sites(model)
    if targets is None or (not isinstance(targets, str) and len(targets) == 0) or targets == "":
        raise ValueError(f"LoRA targets {targets!r} select no layer: nothing would be trained; use "
                         f"'all', 'attention' or names such as {list(sites)[:3]}")
    prefixes = select_targets(sites, model.cfg.n_layers, targets, layers)
    if not prefixes:  # e.g. layers=[] : nothing left to train either
        raise ValueError(f"LoRA targets {targets!r} with layers {layers!r} select no layer: nothing "
                         f"would be trained")
    for what, given in (("ranks", ranks), ("alphas", alphas)):
        stray = [p for p in given if p not in prefixes]
        if stray:
            raise ValueError(f"LoRA {what} name {stray[0]!r}, which is not among the targets {prefixes[:4]}...")
    ranks = {p: r for p, r in ranks.items() if r != rank}  # only what differs is kept and saved
    alphas = {p: a for p, a in alphas.items() if a != alpha}
    rng = np.random.default_rng(seed)
    adapters = []
    for prefix in prefixes:
        linear, cols, n_in, n_out = sites[prefix]
        r = ranks.get(prefix, rank)
        bound = 1.0 / math.sqrt(r)
        model.params[prefix + ".lora_A"] = model._to_model(rng.uniform(-bound, bound, (n_in, r)))
        model.params[prefix + ".lora_B"] = model._to_model(np.zeros((r, n_out)))
        adapters.append(Adapter(prefix, linear, cols, lora_scale(alphas.get(prefix, alpha), r, scaling)))
    model.lora = LoraState(rank, alpha, scaling, dropout, adapters, list(model.trainable), ranks, alphas)
    model.lora.own_head = "lm_head.weight" in model.params  # untied before any merge: see _fold_tied_head
    model.trainable = model.lora.param_names
    return model


def _require_lora(model):
    if model.lora is None:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    return model.lora


def _fold(model, sign):
    """W[:, cols] += sign * s * A @ B for every adapter; the tied LM head's adapter gets a
    weight of its own instead (merge) or loses it again (unmerge): see merge_lora."""
    p = model.params
    for ad in model.lora.adapters:
        if ad.linear == "lm_head":
            _fold_tied_head(model, ad, sign)
            continue
        w = p[ad.linear + ".weight"]
        w[:, ad.cols] += w.dtype.type(sign * ad.scale) * (p[ad.prefix + ".lora_A"] @ p[ad.prefix + ".lora_B"])


def _fold_tied_head(model, ad, sign):
    """Merge: lm_head.weight (C, V) = wte^T + s * A @ B, a new untied head weight.
    Unmerge: delete it; the head is wte^T again, bit for bit (nothing was subtracted).
    A model whose head was untied already (an untied checkpoint, e.g. a merged export
    read back) folds into its own lm_head.weight like any linear."""
    p = model.params
    if model.lora.own_head:
        w = p["lm_head.weight"]  # [C, V]
        w += w.dtype.type(sign * ad.scale) * (p[ad.prefix + ".lora_A"] @ p[ad.prefix + ".lora_B"])
        return
    if sign > 0:
        wte = p["wte.weight"]  # [V, C]
        delta = wte.dtype.type(ad.scale) * (p[ad.prefix + ".lora_A"] @ p[ad.prefix + ".lora_B"])  # [C, V]
        p["lm_head.weight"] = wte.T + delta  # a fresh (C, V) array: wte itself is untouched
    else:
        del p["lm_head.weight"]


def merge_lora(model):
    """Fold s * A @ B into the base weights; the forward then runs no adapter work.
    Same outputs within rounding. Training needs unmerge_lora first.

    The tied LM head is the exception. Its weight is wte^T, and wte is also the token
    embedding (x0 = wte[idx] + wpe): folding s * A @ B into wte would change every
    token's embedding as well as the logits, i.e. a different model. So a merged
    language model keeps an untied head weight lm_head.weight (C, V) = wte^T + s A B,
    read by the head alone (model.params gains C * V values while merged, 51.5 M for
    gpt2-medium); unmerge_lora deletes it."""
    state = _require_lora(model)
    if not state.merged:
        _fold(model, +1.0)
        state.merged = True
    return model


def unmerge_lora(model):
    """Undo merge_lora (exact inverse up to rounding)."""
    state = _require_lora(model)
    if state.merged:
        _fold(model, -1.0)
        state.merged = False
    return model


def disable_lora(model):
    """Run the base model: adapters are kept but skipped (no effect when merged)."""
    _require_lora(model).enabled = False
    return model


def enable_lora(model):
    _require_lora(model).enabled = True
    return model


def remove_lora(model):
    """Back to the plain model: unmerge, delete the adapters, restore what was trainable."""
    state = _require_lora(model)
    unmerge_lora(model)
    for name in state.param_names:
        del model.params[name]
    model.trainable = [n for n in state.base_trainable if n in model.params]
    model.lora = None
    return model

