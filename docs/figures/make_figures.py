"""Draw the figures of docs/diagrams.md and the notebooks: layernorm's computational graph
and the attention pattern of a real (tiny, trained) GPT-2.

    python docs/figures/make_figures.py                  # writes docs/figures/*.svg
    python docs/figures/make_figures.py --out DIR --fast  # fewer training steps (the test)
    python docs/figures/make_figures.py --model gpt2-small --text "Every effort moves you"

Needs only minilora's own dependencies (numpy, matplotlib; the Agg backend, no display).

- layernorm_graph.svg: one node per line of the forward (x -> mean -> xc -> var -> rstd
  -> n -> y), black arrows forward, and beside each a red arrow back labelled with that
  edge's local backward (docs/derivations.md#layernorm). Where a value feeds two nodes
  (x, xc) the two gradients coming back add.
- attention_contains_7.svg: no pretrained GPT-2 ships with the repository, so the script
  trains one in a few seconds: a 2-layer GPT-2 (width 32, 4 heads, vocabulary 16, random
  init, every parameter trained) on examples/03's task, "does the sequence contain token
  7?", read at the last position. It draws every head's attention matrix att[t, j] (query
  t attends to key j) on one test sequence, with its tokens on both axes. Measured on the
  test set (printed): how much of the last query's attention lands on the 7s.
- attention_<model>.svg with --model gpt2-small: the pretrained model's layer-0..L-1 heads
  on --text, when its weights are in the cache (minilora's cache folder, see README).
  Nothing is downloaded unless --download is given.

The SVGs keep their text as text (svg.fonttype none) and carry no date, so rerunning the
script changes a committed file only when the picture changes.
"""

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import minilora as ml  # noqa: E402
from minilora.errors import MiniloraError  # noqa: E402
from minilora.layers import cross_entropy_backward, cross_entropy_forward  # noqa: E402

HERE = Path(__file__).resolve().parent
plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "minilora", "font.size": 10})
SVG_METADATA = {"Date": None, "Creator": "docs/figures/make_figures.py"}

# ------------------------------------------------------------------ layernorm's graph

# one node per forward line of reference.layernorm_forward, written out: (x, y) centre, label
LN_NODES = {
    "x": ((0.0, 0.0), "x\n[B, T, C]"),
    "mean": ((3.2, 2.4), "mean = mean_C(x)\n[B, T, 1]"),
    "xc": ((6.4, 0.0), "xc = x - mean\n[B, T, C]"),
    "var": ((9.8, 2.4), "var = mean_C(xc²)\n[B, T, 1]"),
    "rstd": ((14.2, 2.4), "rstd = 1/√(var + eps)\n[B, T, 1]"),
    "n": ((17.6, 0.0), "n = xc · rstd\n[B, T, C]"),
    "wb": ((21.4, 2.4), "w, b\n[C]"),
    "y": ((21.4, 0.0), "y = n · w + b\n[B, T, C]"),
}
BOX_HALF_HEIGHT = 0.45  # data units (the axes are equal-aspect); two lines of 9.5 pt text and padding


def box_half_width(label):
    """Half the width of a node's box, from its longest line (9.5 pt text: about 0.13 units a character)."""
    return 0.065 * max(len(line) for line in label.split("\n")) + 0.1


# forward edge (from, to), the local backward the gradient takes back along it, and where
# its label goes: the distance from the pair of arrows, > 0 on the right of the forward
# direction, < 0 on the left
LN_EDGES = [
    ("x", "mean", "dx += dmean / C", -0.25),
    ("x", "xc", "dx += dxc", 0.25),
    ("mean", "xc", "dmean = -Σ_C dxc", 0.25),
    ("xc", "var", "dxc += dvar · 2 xc / C", 0.25),
    ("var", "rstd", "dvar = -½ rstd³ · drstd", -0.6),
    ("xc", "n", "dxc += dn · rstd", 0.25),
    ("rstd", "n", "drstd = Σ_C dn · xc", -0.25),
    ("wb", "y", "dw = Σ_BT dy · n\ndb = Σ_BT dy", -0.25),
    ("n", "y", "dn = dy · w", -0.25),
]


def box_exit(node, direction, gap=0.12):
    """Where a ray from a node's centre along the unit vector direction leaves its box (plus a gap)."""
    centre, label = np.asarray(LN_NODES[node][0]), LN_NODES[node][1]
    hw, hh = box_half_width(label), BOX_HALF_HEIGHT
    t = min(hw / abs(direction[0]) if direction[0] else np.inf, hh / abs(direction[1]) if direction[1] else np.inf)
    return centre + direction * (t + gap)


def draw_edge(ax, start, end, label, label_at, offset=0.09):
    """A black forward arrow from node start to node end and, beside it, a red dashed
    arrow back carrying the local backward as its label."""
    along = np.subtract(LN_NODES[end][0], LN_NODES[start][0])
    along = along / np.linalg.norm(along)
    right = np.array([along[1], -along[0]])  # perpendicular, to the right of the forward direction
    a, b = box_exit(start, along), box_exit(end, -along)
    fwd, back = a - right * offset, b + right * offset  # forward on the left, backward on the right
    ax.annotate("", b - right * offset, fwd, arrowprops=dict(arrowstyle="-|>", color="black", lw=1.3))
    ax.annotate("", a + right * offset, back, arrowprops=dict(arrowstyle="-|>", color="#c0392b", lw=1.1, ls="--"))
    away = right * np.sign(label_at)  # the label sits off the pair of arrows, on its own side
    x, y = (a + b) / 2 + away * abs(label_at)
    ha = "left" if away[0] > 0.3 else "right" if away[0] < -0.3 else "center"
    va = "bottom" if away[1] > 0.3 else "top" if away[1] < -0.3 else "center"
    ax.text(x, y, label, color="#c0392b", ha=ha, va=va, fontsize=8.5)


def layernorm_graph(path):
    """Write layernorm's computational graph, forward and backward, to path (svg or png)."""
    fig, ax = plt.subplots(figsize=(15, 4.2))
    for start, end, label, label_at in LN_EDGES:
        draw_edge(ax, start, end, label, label_at)
    for name, ((cx, cy), label) in LN_NODES.items():
        face = "#f4f4f4" if name in ("x", "wb") else "#eaf2fb"  # inputs grey, computed nodes blue
        ax.text(cx, cy, label, ha="center", va="center", fontsize=9.5,
                bbox=dict(boxstyle="round,pad=0.4", fc=face, ec="#34495e"))
    ax.annotate("dy (upstream)", (21.4 + 0.09, -0.57), (21.4, -1.4), color="#c0392b", ha="center", fontsize=9,
                arrowprops=dict(arrowstyle="-|>", color="#c0392b", lw=1.1, ls="--"))
    ax.text(-1.0, -1.25, "forward: black, left to right.   backward: red, dashed, right to left, each edge's local "
            "derivative;\nwhere two arrows leave a node (x, xc) the gradients coming back add.\n"
            "Collected: dx = rstd · (dn - mean_C(dn) - n · mean_C(dn · n))   (docs/derivations.md#layernorm)",
            fontsize=8.5, va="top", color="#333333")
    ax.set_xlim(-1.2, 22.8)
    ax.set_ylim(-2.3, 3.5)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(path, bbox_inches="tight", metadata=SVG_METADATA if str(path).endswith(".svg") else None)
    plt.close(fig)


# ------------------------------------------------------------------ attention pattern

V, T, X = 16, 10, 7  # examples/03's task: does a sequence of 10 tokens (vocabulary 16) contain 7?


def contains_token_data(rng, n):
    idx = rng.integers(0, V, size=(n, T))  # [n, T]
    return idx, (idx == X).any(axis=1).astype(np.int64)  # [n, T], [n]


def train_contains_token(steps, seed=0):
    """A 2-layer GPT-2 trained from random init, every parameter, on the contains-7 task.
    Returns the model (in eval mode) and the test sequences with their labels."""
    rng = np.random.default_rng(seed)
    train_idx, train_y = contains_token_data(rng, 2048)
    cfg = ml.GPTConfig(vocab_size=V, context_length=T, emb_dim=32, n_heads=4, n_layers=2)
    model = ml.GPTModel(cfg, seed=seed).replace_head(num_classes=2, seed=123)
    opt = ml.AdamW(model, lr=3e-3, weight_decay=0.1)
    last = np.full(64, T - 1)  # classify from the last position
    for _ in range(steps):
        rows = rng.integers(0, len(train_idx), size=64)
        loss, cache = cross_entropy_forward(model.forward(train_idx[rows], positions=last), train_y[rows])
        opt.step(model.backward(cross_entropy_backward(1.0, cache)[0]))
    return model.eval(), contains_token_data(rng, 512)


def attention_maps(model, idx):
    """att (L, B, NH, T, T) of every block, from the reference forward in float64
    (it keeps every activation, attention included: acts['h.{i}.attn.att'])."""
    params = {name: np.asarray(ml.to_numpy(a), dtype=np.float64) for name, a in model.params.items()}
    _, acts = ml.reference.forward(params, idx, model.cfg.n_heads)
    return np.stack([acts[f"h.{i}.attn.att"] for i in range(model.cfg.n_layers)])


def attention_on_target(att, idx):
    """Per layer and head, the mean share of the last query's attention that falls on
    the target tokens, over the sequences that contain one: (L, NH)."""
    has = idx == X  # [B, T]
    rows = has.any(axis=1)
    last = att[:, :, :, -1, :]  # [L, B, NH, T]: what the last position looks at
    share = (last * has[None, :, None, :]).sum(axis=-1)  # [L, B, NH]
    return share[:, rows].mean(axis=1)  # [L, NH]


def draw_attention(path, att, tokens, title, layers=None):
    """One T x T heat map per (layer, head): row t is query t's softmax over the keys j <= t.
    att (L, NH, T, T); tokens: the T labels of both axes."""
    L, NH = att.shape[:2]
    layers = range(L) if layers is None else layers
    fig, axes = plt.subplots(len(layers), NH, figsize=(2.35 * NH + 0.8, 2.45 * len(layers) + 0.7), squeeze=False)
    for row, i in enumerate(layers):
        for h in range(NH):
            ax = axes[row, h]
            im = ax.imshow(att[i, h], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {i}, head {h}", fontsize=9)
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
            ax.set_yticks(range(len(tokens)), tokens if h == 0 else [], fontsize=7)
            if row == len(layers) - 1:
                ax.set_xlabel("key j", fontsize=8)
            if h == 0:
                ax.set_ylabel("query t", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="att[t, j]")
    fig.suptitle(title, fontsize=9.5)
    fig.savefig(path, bbox_inches="tight", metadata=SVG_METADATA if str(path).endswith(".svg") else None)
    plt.close(fig)


def contains_7_figure(path, steps):
    """Train the tiny classifier, draw its attention on one test sequence holding two 7s,
    and return the numbers the caption quotes."""
    start = time.perf_counter()
    model, (test_idx, test_y) = train_contains_token(steps)
    seconds = time.perf_counter() - start
    logits = model.forward(test_idx, keep_cache=False, positions=np.full(len(test_idx), T - 1))
    accuracy = float((ml.to_numpy(logits).argmax(axis=-1) == test_y).mean())
    share = attention_on_target(attention_maps(model, test_idx), test_idx)  # [L, NH]
    uniform = float(((test_idx == X).sum(axis=1) / T)[test_y == 1].mean())  # equal weight on all T keys
    seq = np.array([[3, 7, 12, 5, 0, 9, 7, 14, 2, 11]])  # two 7s, at positions 1 and 6
    att = attention_maps(model, seq)[:, 0]  # [L, NH, T, T]
    # no seconds in the title: a rerun then rewrites the committed SVG only if the picture changed
    title = (f"A tiny GPT-2 (2 layers, width 32, 4 heads; random init, every parameter trained {steps} steps)\n"
             f"on 'does the sequence contain 7?', read at the last position: test accuracy {accuracy:.1%}.\n"
             f"On the test set the last query puts {share[0].min():.0%}-{share[0].max():.0%} of layer 0's attention "
             f"on the 7s (equal weights: {uniform:.0%}). Not pretrained GPT-2.")
    draw_attention(path, att, [str(t) for t in seq[0]], title)
    return {"steps": steps, "seconds": seconds, "accuracy": accuracy, "share_on_7": share.round(3).tolist(),
            "uniform_share": uniform}


def pretrained_figure(path, name, text, download):
    """The pretrained model's attention on text (every layer, heads 0-3), from the cache."""
    from minilora.tokenizer import get_tokenizer

    model = ml.GPTModel.from_pretrained(name, dtype="float64", offline=not download)
    enc = get_tokenizer(offline=not download)
    ids = np.array([enc.encode(text)])
    att = attention_maps(model, ids)[:, 0, :4]  # [L, 4, T, T]
    tokens = [enc.decode([t]) for t in ids[0]]
    draw_attention(path, att, tokens, f"Pretrained {name} (OpenAI's weights), heads 0-3 of every layer, on {text!r}")
    return {"model": name, "tokens": tokens}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the figures (default docs/figures)")
    parser.add_argument("--fast", action="store_true", help="60 training steps instead of 400 (a smoke test)")
    parser.add_argument("--model", default="tiny", help="tiny (trained here) or a preset, e.g. gpt2-small")
    parser.add_argument("--text", default="Every effort moves you forward, one step at a time")
    parser.add_argument("--download", action="store_true", help="with --model: download the weights if missing")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    layernorm_graph(args.out / "layernorm_graph.svg")
    print(f"wrote {args.out / 'layernorm_graph.svg'}")
    if args.model == "tiny":
        numbers = contains_7_figure(args.out / "attention_contains_7.svg", steps=60 if args.fast else 400)
        print(f"wrote {args.out / 'attention_contains_7.svg'}: {numbers}")
    else:
        try:
            numbers = pretrained_figure(args.out / f"attention_{args.model}.svg", args.model, args.text, args.download)
        except MiniloraError as exc:  # no weights in the cache: one line, not a traceback
            sys.exit(f"make_figures: {exc}")
        print(f"wrote {args.out / f'attention_{args.model}.svg'}: {numbers}")


if __name__ == "__main__":
    main()
