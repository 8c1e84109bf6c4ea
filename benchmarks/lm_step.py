"""The LoRA language-model step at chapter 7's shape, next to its matmul floor and PyTorch.

    python benchmarks/lm_step.py [--model gpt2-medium] [--batch-size 8] [--seq 70]
        [--repeats 3] [--out results/lm-step-cpu-2core.json] [--no-rss]

The step (issue 19, item 7): GPT-2 (random weights, float32), LoRA r=16, alpha 16,
scaling "alpha" (scale = alpha = 16, the book's appendix E LinearWithLoRA) on every
linear and on the tied LM head (logits = x wte^T + s (x A) B), targets random with about
20% set to -100, the full-vocabulary masked token loss, AdamW lr 5e-5, weight decay 0.1.

Reported, from one process, the engines alternating round by round so that a slow spell
of a shared machine hits all of them (the ratios are medians of per-round ratios):

- minilora's median step time;
- its matmul floor: the step's own matrix products, (m, k) x (k, n) with the same shapes
  and layouts and the same batch shards side by side, timed alone. Products of one shape
  share one operand set, made, timed (as many calls as the step makes) and freed before
  the next shape's: only one operand set is held at a time, so the floor costs little
  memory, at the price of weights that may sit in cache between the repeated calls (the
  floor is then, if anything, optimistic: a lower bound still);
- PyTorch eager running the same model (torch.set_num_threads(2));
- the peak resident memory of each engine, each in a fresh process that builds the model
  and runs two steps (VmHWM: minilora.bench.own_peak_rss).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import minilora as ml
from minilora import backend
from minilora.bench import adapter_products, own_peak_rss, products_floor_fn
from minilora.layers import masked_cross_entropy_backward, masked_cross_entropy_forward
from minilora.optim import AdamW

RESULTS = Path(__file__).resolve().parent / "results"
RANK, ALPHA, LR, WEIGHT_DECAY, IGNORED_SHARE, IGNORE = 16, 16, 5e-5, 0.1, 0.2, -100


def batch_data(cfg, batch, seq, seed=0):
    """(idx, targets), int64 (batch, seq): random tokens, random targets with about
    IGNORED_SHARE of them set to IGNORE (the masked prompt and padding of chapter 7)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (batch, seq))
    targets = rng.integers(0, cfg.vocab_size, (batch, seq))
    targets[rng.random((batch, seq)) < IGNORED_SHARE] = IGNORE
    return idx, targets


class LMStep:
    """One minilora LoRA LM training step: forward (every position), masked loss,
    backward, AdamW."""

    def __init__(self, cfg, batch, seq, seed=0):
        self.model = ml.GPTModel(cfg, seed=seed)
        ml.apply_lora(self.model, rank=RANK, alpha=ALPHA, scaling="alpha", targets="all")
        self.opt = AdamW(self.model, lr=LR, weight_decay=WEIGHT_DECAY)
        self.idx, self.targets = batch_data(cfg, batch, seq, seed)

    def __call__(self):
        logits = self.model.forward(self.idx)  # [B, T, V]
        loss, cache = masked_cross_entropy_forward(logits, self.targets)
        del logits  # the cache's probs is the one logits-sized array the backward needs
        self.opt.step(self.model.backward(masked_cross_entropy_backward(1.0, cache)[0]))
        return float(loss)


def lm_step_matmuls(model, batch, seq):
    """Every matrix product of one LMStep on `batch` sequences, as (a_shape, b_shape,
    a_transposed, b_transposed), logical shapes (see minilora.bench.step_matmuls, the
    classifier's list, which this follows). Every base weight is frozen: no dW, only
    dx = dout W^T; the adapters add their products as the model runs them
    (minilora.bench.adapter_products: a block's Q/K/V stacked). No last-block trim: every
    position is scored. The head is the tied x wte^T with its adapter, and its dx,
    dlogits wte, is a (N, V) x (V, C) product. The lowest block's c_attn needs no dx
    (nothing under it trains)."""
    cfg, p = model.cfg, model.params
    N, C, NH, T = batch * seq, cfg.emb_dim, cfg.n_heads, seq
    hs = C // NH

    def shape(name):  # (in, out) of the linear `name`; the tied head reads wte^T
        return (C, cfg.vocab_size) if name == "lm_head" else p[name + ".weight"].shape

    def forward(name):
        i, o = shape(name)
        return [((N, i), (i, o), False, False)] + adapter_products(model, name, N)

    def backward(name, need_dx=True):
        i, o = shape(name)
        prods = [((N, o), (o, i), False, name != "lm_head")] * need_dx  # wte is already (V, C)
        return prods + adapter_products(model, name, N, backward=True, need_dx=need_dx)

    q, kT, att, v = (batch, NH, T, hs), (batch, NH, hs, T), (batch, NH, T, T), (batch, NH, T, hs)
    attention_fwd = [(q, kT, False, True), (att, v, False, False)]
    attention_bwd = [(q, kT, False, True), (att, v, True, False), (att, v, False, False), (att, q, True, False)]
    prods = []
    for layer in range(cfg.n_layers):
        h = f"h.{layer}."
        prods += forward(h + "attn.c_attn") + attention_fwd
        for name in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            prods += forward(h + name)
        prods += backward(h + "mlp.c_proj") + backward(h + "mlp.c_fc") + backward(h + "attn.c_proj")
        prods += attention_bwd + backward(h + "attn.c_attn", need_dx=layer > 0)
    return prods + forward("lm_head") + backward("lm_head")


def matmul_flops(prods):
    """2 m k n summed over the products (batched ones counted per batch element)."""
    return sum(2 * math.prod(a) * b[-1] for a, b, _, _ in prods)


def floor_fn(model, batch, seq, repeats=1):
    """A function timing the step's products alone: seconds of one step's worth, as
    minilora.bench times the classifier's (bench.products_floor_fn: one operand set per
    distinct product at a time, the shards side by side, the shortest of `repeats`)."""
    per_shard = [lm_step_matmuls(model, s.stop - s.start, seq) for s in backend.batch_shards(batch, model.device)]
    return products_floor_fn(per_shard, repeats=repeats)


def torch_step(cfg, batch, seq, seed=0):
    """The same step in PyTorch eager: minilora.bench_torch's Block (LoRA on Q, K, V
    apart, c_proj and both MLP linears), a tied head x wte^T plus a head adapter,
    F.cross_entropy(ignore_index=-100), torch.optim.AdamW. Returns (step, trainable)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from minilora.bench_torch import Block, LoRALinear

    class GPT2LoRALM(nn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.emb_dim
            self.wte, self.wpe = nn.Embedding(cfg.vocab_size, C), nn.Embedding(cfg.context_length, C)
            self.blocks = nn.ModuleList([Block(C, cfg.n_heads, RANK) for _ in range(cfg.n_layers)])
            self.ln_f = nn.LayerNorm(C)
            # the head adapter alone (its weight is wte, read transposed: tied, frozen)
            head = LoRALinear(C, cfg.vocab_size, RANK, ALPHA, bias=False)
            self.head_A, self.head_B = head.A[0], head.B[0]
            for p in self.parameters():
                p.requires_grad = False
            for m in self.modules():
                if isinstance(m, LoRALinear):
                    m.scale = ALPHA  # scaling "alpha": delta = alpha (x A) B, as minilora here
                    for p in [*m.A, *m.B]:
                        p.requires_grad = True
            for p in (self.head_A, self.head_B):
                p.requires_grad = True

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            x = self.ln_f(x)
            return x @ self.wte.weight.T + ALPHA * ((x @ self.head_A) @ self.head_B)

    torch.manual_seed(seed)
    model = GPT2LoRALM()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    idx, targets = (torch.tensor(a) for a in batch_data(cfg, batch, seq, seed))

    def step():
        opt.zero_grad()
        logits = model(idx)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=IGNORE)
        loss.backward()
        opt.step()
        return loss.item()

    return step, sum(p.numel() for p in params)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rss_child(engine, preset, batch, seq, steps=2):
    """Peak RSS (bytes) of a fresh process that builds `engine`'s step and runs `steps`."""
    cfg = ml.GPTConfig.from_preset(preset)
    if engine == "torch":
        import torch

        torch.set_num_threads(2)
        step = torch_step(cfg, batch, seq)[0]
    else:
        step = LMStep(cfg, batch, seq)
    for _ in range(steps):
        step()
    return own_peak_rss()


def peak_rss(engine, args):
    out = subprocess.run([sys.executable, __file__, "--rss-child", engine, "--model", args.model,
                          "--batch-size", str(args.batch_size), "--seq", str(args.seq)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the {engine} peak-RSS process failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def loadavg():
    return list(os.getloadavg())


def run(args):
    import torch

    torch.set_num_threads(2)
    cfg = ml.GPTConfig.from_preset(args.model)
    report = {"model": args.model, "batch": args.batch_size, "seq": args.seq, "rank": RANK, "alpha": ALPHA,
              "scaling": "alpha", "dtype": "float32", "lr": LR, "weight_decay": WEIGHT_DECAY,
              "cpu_threads": backend.cpu_threads(), "torch_version": torch.__version__,
              "torch_threads": torch.get_num_threads(), "loadavg_before": loadavg()}
    step = LMStep(cfg, args.batch_size, args.seq)
    report["trainable_params"] = step.model.num_params(trainable_only=True)
    report["ignored_targets"] = int((step.targets == IGNORE).sum())
    prods = lm_step_matmuls(step.model, args.batch_size, args.seq)
    report["matmul_products"], report["matmul_flops"] = len(prods), matmul_flops(prods)
    floor = floor_fn(step.model, args.batch_size, args.seq)
    tstep, report["torch_trainable_params"] = torch_step(cfg, args.batch_size, args.seq)
    for fn in (step, tstep, floor):  # warm-up: first-touch page faults, thread pools
        fn()
    rounds = []
    for _ in range(args.repeats):
        s, t = timed(step), timed(tstep)
        rounds.append((s, floor(), t))
    s, f, t = (float(np.median(col)) for col in zip(*rounds))
    report.update({
        "rounds_seconds": [{"minilora": a, "floor": b, "torch": c} for a, b, c in rounds],
        "step_seconds": s, "matmul_floor_seconds": f, "torch_step_seconds": t,
        "tokens_per_second": args.batch_size * args.seq / s,
        "floor_gflops": report["matmul_flops"] / f / 1e9,
        "step_over_floor": float(np.median([a / b for a, b, _ in rounds])),
        "minilora_over_torch": float(np.median([a / c for a, _, c in rounds])),
        "loadavg_after_timing": loadavg(),
    })
    del step, tstep, floor
    if args.rss:
        report["peak_rss_bytes"] = {e: peak_rss(e, args) for e in ("minilora", "torch")}
        report["peak_rss_minilora_over_torch"] = report["peak_rss_bytes"]["minilora"] / report["peak_rss_bytes"]["torch"]
    report["loadavg_after"] = loadavg()
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-medium")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=70)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "lm-step-cpu-2core.json")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the two peak-RSS processes")
    ap.add_argument("--rss-child", choices=("minilora", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        print(rss_child(args.rss_child, args.model, args.batch_size, args.seq))
        return
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    keys = ("trainable_params", "step_seconds", "matmul_floor_seconds", "torch_step_seconds", "step_over_floor",
            "minilora_over_torch", "peak_rss_bytes")
    print(json.dumps({k: report.get(k) for k in keys}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
