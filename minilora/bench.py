"""Benchmarks: a LoRA training step of GPT-2 small next to its own matmul floor.

The step is appendix E's: GPT-2 small (random weights), a 2-class head, rank-16 LoRA
on every linear, AdamW, batch 8 x 120 tokens, float32. Reported, all from one process
so that the ratios are meaningful on a noisy machine:

- the median step time after a warm-up, and tokens per second;
- the matmul floor: the step's own matrix products (the same shapes and layouts, in
  the same batch shards side by side), timed alone, one product's operands held at a
  time (matmul_floor_fn); step / floor says how much time goes elsewhere;
- where PyTorch is installed, the same step in PyTorch eager on the same device
  (bench_torch), its turn taken in every round beside the step and the floor;
- the peak memory the step allocates (tracemalloc sees every NumPy buffer) and the
  process's peak resident set;
- a breakdown of the step's time by layer function (cProfile);
- the number of array operations of the step (the kernels a GPU would launch: its fixed
  cost there), in all, by layer function and by kind (step_op_count, minilora.opcount);
- greedy generation speed of GPT-2 small.
"""

import json
import math
import pstats
import resource
import subprocess
import sys
import time
import tracemalloc
from collections import Counter

import numpy as np

from . import backend, opcount
from .config import GPTConfig, param_shapes
from .errors import MiniloraError
from .layers import cross_entropy_backward, cross_entropy_forward
from .lora import apply_lora
from .model import GPTModel, backward_extent
from .optim import AdamW


class BenchmarkError(MiniloraError, RuntimeError):
    """A measurement could not be made (its helper process failed)."""


class TrainStep:
    """One classifier training step of `model` at a fixed batch: forward, loss, backward,
    AdamW. Called with train=False it runs the evaluation forward (no cache, no update).
    Keeps the optimizer (`opt`, whose m and v are the optimizer state) and the bytes of
    the latest gradients dict (`grad_bytes`) and the seconds its AdamW update took
    (`optimizer_seconds`) for the reports."""

    def __init__(self, model, batch, seq, seed=0):
        cfg = model.cfg
        self.model = model
        self.opt = AdamW(model, lr=8e-4, weight_decay=0.1)
        rng = np.random.default_rng(seed)
        self.idx = rng.integers(0, cfg.vocab_size, (batch, seq))
        self.labels = model.xp.asarray(rng.integers(0, 2, batch))
        self.positions = np.full(batch, seq - 1)
        self.grad_bytes = self.optimizer_seconds = None

    def __call__(self, train=True):
        model = self.model
        if not train:
            return model.forward(self.idx, keep_cache=False, positions=self.positions)
        logits = model.forward(self.idx, positions=self.positions)  # [B, 2]
        loss, cache = cross_entropy_forward(logits, self.labels)
        grads = model.backward(cross_entropy_backward(1.0, cache)[0])
        self.grad_bytes = sum(int(g.nbytes) for g in grads.values())
        _sync(model.xp)
        t = time.perf_counter()
        self.opt.step(grads)
        _sync(model.xp)
        self.optimizer_seconds = time.perf_counter() - t
        return loss


def build_step(cfg, batch=8, seq=120, rank=16, device=None, dtype="float32", seed=0, targets="all", base=None):
    """(model, step) for a classifier step at this shape: GPT-2 `cfg` with random
    weights and a new 2-class head, then LoRA of this rank on `targets` (appendix E by
    default; see lora.resolve_targets), or, with targets=None, full fine-tuning: no
    adapters, every parameter trains (embeddings and the new head included).

    base: a model of the same config whose GPT-2 weights to share rather than make
    anew (LoRA only: it never writes them), to fit several setups in memory at once."""
    if base is not None:
        if targets is None:
            raise ValueError("full fine-tuning writes its weights: it cannot share another model's")
        model = GPTModel(cfg, dtype=dtype, device=device, init=False)
        model.params = {n: base.params[n] for n in param_shapes(cfg)}
        model.trainable = list(model.params)
    else:
        model = GPTModel(cfg, seed=seed, dtype=dtype, device=device)
    model.replace_head(2)
    if targets is not None:
        apply_lora(model, rank=rank, alpha=rank, targets=targets)
    return model, TrainStep(model, batch, seq, seed)


def _sync(xp):
    if xp is not np and hasattr(xp, "cuda"):  # cupy (not opcount's counting numpy)
        xp.cuda.Stream.null.synchronize()


def step_op_count(cfg, batch=8, seq=120, rank=16, dtype="float32", seed=0, targets="all", base=None):
    """The array operations of one training step of build_step's classifier (opcount: the
    kernels a GPU would launch), as opcount.OpCounter.report() plus "shards" (1) and
    "seconds" (what counting took).

    Counted on the CPU whatever the benchmark's device, the batch as one shard and AdamW on
    whole buffers, as a GPU runs the step (opcount says why); BLAS on one thread, so that
    the one shard does not contend with a busy machine's other work. AdamW's first step
    also packs the trained tensors into its flat buffers, copies no later step makes: an
    update with zero gradients (a weight decay of the adapters, nothing a count sees)
    does that first, and the step counted is a steady one.
    base: a CPU model of the same config whose GPT-2 weights to share (build_step)."""
    from threadpoolctl import ThreadpoolController

    t = time.perf_counter()
    with opcount.one_shard(), ThreadpoolController().limit(limits=1, user_api="blas"):
        model, step = build_step(cfg, batch, seq, rank, "cpu", dtype, seed, targets, base)
        opcount.count_model(model)  # before AdamW packs: its flat buffers are then Counted too
        step.labels = step.labels.view(opcount.Counted)
        step.opt.step({name: model.xp.zeros_like(model.params[name]) for name in model.trainable})
        with opcount.OpCounter() as ops:
            step()
    return {**ops.report(), "shards": 1, "seconds": time.perf_counter() - t}


def time_calls(fn, xp, repeats, warmup=1):
    """Median seconds of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(xp)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(xp)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def step_matmuls(model, batch, seq):
    """Every matrix product of one training step of `model` (a TrainStep: a classifier
    reading one position per sequence) as (a_shape, b_shape, a_transposed, b_transposed):
    logical shapes, and whether the step multiplies a transposed view (dx = dout @ W^T,
    dW-like products x^T @ dout) rather than a contiguous array.

    What is trained decides the list, as in GPTModel._backward_shard: a dW product only
    for a trained weight, the adapters' products for each LoRA adapter, and no backward
    at all under the lowest block that trains something (no dx under its attention
    unless the embeddings or its ln_1 train). The last block runs one query per sequence
    and the layers after its attention on `batch` rows."""
    cfg, p, train = model.cfg, model.params, set(model.trainable)
    N, C, NH, T = batch * seq, cfg.emb_dim, cfg.n_heads, seq
    hs = C // NH

    def linear_forward(rows, name):
        """x @ W, and the adapters' products."""
        i, o = p[name + ".weight"].shape
        return [((rows, i), (i, o), False, False)] + adapter_products(model, name, rows)

    def linear_backward(rows, name, need_dx=True):
        """dx = dout @ W^T; dW = x^T dout when W trains; the adapters' products."""
        i, o = p[name + ".weight"].shape
        prods = [((rows, o), (o, i), False, True)] * need_dx
        prods += [((i, rows), (rows, o), True, False)] * (name + ".weight" in train)
        return prods + adapter_products(model, name, rows, backward=True, need_dx=need_dx)

    def attention(Tq, backward):  # forward q k^T, att v; backward dy v^T, att^T dy, dqk k, dqk^T q
        q, kT = (batch, NH, Tq, hs), (batch, NH, hs, T)
        att, kv = (batch, NH, Tq, T), (batch, NH, T, hs)
        attT, dy = (batch, NH, T, Tq), (batch, NH, Tq, hs)
        if backward:
            return [(dy, kT, False, True), (attT, dy, True, False), (att, kv, False, False), (attT, q, True, False)]
        return [(q, kT, False, True), (att, kv, False, False)]

    embeddings_train, lowest = backward_extent(train, cfg.n_layers)  # where the backward stops
    prods = []
    for layer in range(cfg.n_layers):
        h = f"h.{layer}."
        rows, Tq = (batch, 1) if layer == cfg.n_layers - 1 else (N, T)
        mlp = [(rows, h + "attn.c_proj"), (rows, h + "mlp.c_fc"), (rows, h + "mlp.c_proj")]
        prods += linear_forward(N, h + "attn.c_attn") + attention(Tq, backward=False)
        for r_, name in mlp:
            prods += linear_forward(r_, name)
        if layer < lowest:
            continue  # frozen and nothing under it trains: no backward
        below = layer > lowest or embeddings_train
        ln1_trains = h + "ln_1.weight" in train or h + "ln_1.bias" in train
        prods += linear_backward(rows, h + "mlp.c_proj") + linear_backward(rows, h + "mlp.c_fc")
        if below or ln1_trains or any(n.startswith(h + "attn.") for n in train):
            prods += linear_backward(rows, h + "attn.c_proj") + attention(Tq, backward=True)
            prods += linear_backward(N, h + "attn.c_attn", need_dx=below or ln1_trains)
    # the classifier head; its dx only when something under it trains (GPTModel._backward_shard)
    lnf_trains = "ln_f.weight" in train or "ln_f.bias" in train
    prods += linear_forward(batch, "out_head")
    prods += linear_backward(batch, "out_head", need_dx=lnf_trains or lowest < cfg.n_layers)
    return prods


def adapter_products(model, name, rows, backward=False, need_dx=True):
    """The LoRA products on the linear `name` for `rows` rows, as GPTModel runs them, in
    step_matmuls' form. A block's stacked Q/K/V adapters (k of rank r, lora.lora_stack_forward,
    the bench draws no LoRA dropout): forward x A_cat, (s xa) @ B_stack batched; backward dB,
    g, dA batched (dA = x^T g broadcasts x^T over the k adapters: listed as k products, its
    arithmetic) and dx = g A_cat^T. Every other adapter (lora_forward / lora_backward):
    forward x A, (xA) B; backward dB, g = dout B^T, dA, dx += g A^T."""
    if model.lora is None:
        return []
    p, stack = model.params, model.lora.stacks.get(name)
    prods = []
    if stack is not None:
        k = len(stack.adapters)
        a_in, r = p[stack.adapters[0].prefix + ".lora_A"].shape
        w = p[stack.adapters[0].prefix + ".lora_B"].shape[1]
        if backward:
            prods += [((k, r, rows), (k, rows, w), True, False), ((k, rows, w), (k, w, r), False, True),
                      ((k, a_in, rows), (k, rows, r), True, False)]
            prods += [((rows, k * r), (k * r, a_in), False, True)] * need_dx
        else:
            prods += [((rows, a_in), (a_in, k * r), False, False), ((k, rows, r), (k, r, w), False, False)]
    for ad in model.lora.active(name):
        if stack is not None and ad in stack.adapters:
            continue
        (a_in, r), a_out = p[ad.prefix + ".lora_A"].shape, p[ad.prefix + ".lora_B"].shape[1]
        if backward:
            prods += [((r, rows), (rows, a_out), True, False), ((rows, a_out), (a_out, r), False, True),
                      ((a_in, rows), (rows, r), True, False)] + [((rows, r), (r, a_in), False, True)] * need_dx
        else:
            prods += [((rows, a_in), (a_in, r), False, False), ((rows, r), (r, a_out), False, False)]
    return prods


def matmul_floor_fn(step):
    """A function that runs the matrix products of `step` (a TrainStep) alone and returns
    their seconds: one step's worth, split into the model's batch shards side by side,
    as the step runs them.

    One operand set at a time. For each distinct product (the same shapes and layouts in
    every shard): operands are made, transposed ones stored transposed as the step's views
    are; the product is called as many times as one step calls it, the shards side by
    side (backend.run_parallel); the operands are freed before the next product's. Only
    the calls are timed. The floor so holds one product's operands at a time, a few MB,
    where one operand set per product (1,208 arrays for gpt2-small) took ~5 GB, ~17 GB
    for gpt2-medium's shape, and gpt2-large's could not be measured in 24 GB
    (benchmarks/lm_step.py's floor goes through the same products_floor_fn).

    What that changes: a product called n times runs n times on the same operands, which
    may sit in cache between the calls (small ones do), where before each call had
    operands of its own. The floor is, if anything, lower: still a lower bound on the
    time the step's products take. And the shards meet once per distinct product (a few
    dozen hand-overs a step, timed) rather than once for all."""
    model = step.model
    xp, dtype, (batch, seq) = model.xp, model.dtype, step.idx.shape
    per_shard = [step_matmuls(model, s.stop - s.start, seq) for s in backend.batch_shards(batch, model.device)]
    return products_floor_fn(per_shard, xp, dtype)


def products_floor_fn(per_shard, xp=np, dtype="float32", repeats=1):
    """The function matmul_floor_fn describes, for any step's products: per_shard holds each
    batch shard's product list (step_matmuls' form, the same products in the same order,
    on each shard's rows). Each distinct product is timed `repeats` times and the shortest
    kept (noise only adds time). Returns the seconds of one step's worth."""
    rng = np.random.default_rng(0)
    # the k-th product of each shard is the same product on that shard's rows: count them
    # across shards together, in the order the step first runs them
    products = Counter(zip(*per_shard))

    def operand(shape, transposed):
        stored = shape[:-2] + shape[-2:][::-1] if transposed else shape
        a = xp.asarray(rng.standard_normal(stored, dtype=np.float32).astype(dtype, copy=False))
        return xp.swapaxes(a, -1, -2) if transposed else a

    def run_shard(a, b, calls):
        for _ in range(calls):
            a @ b

    def run():
        seconds = 0.0
        for shards, calls in products.items():
            items = [(operand(a, ta), operand(b, tb), calls) for a, b, ta, tb in shards]
            best = math.inf
            for _ in range(repeats):
                _sync(xp)
                t = time.perf_counter()
                backend.run_parallel(run_shard, items)
                _sync(xp)
                best = min(best, time.perf_counter() - t)
            seconds += best
            del items  # freed before the next product's operands are made
        return seconds

    return run


def matmul_flops(model, batch, seq):
    """2 * m * k * n summed over the products of one step (its floor's FLOPs)."""
    return sum(2 * math.prod(a) * b[-1] for a, b, _, _ in step_matmuls(model, batch, seq))


def peak_step_memory(step, xp):
    """Bytes the step allocates at its peak beyond what was already allocated (CPU:
    tracemalloc, which NumPy reports every buffer to; CUDA: the memory pool)."""
    if xp is not np:  # a freshly emptied pool grows to the step's peak and keeps it
        pool = xp.get_default_memory_pool()
        _sync(xp)
        pool.free_all_blocks()
        before = pool.used_bytes()
        step()
        _sync(xp)
        return int(pool.total_bytes() - before)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return int(peak - base)


_RSS_CHILD = """
import json, resource, sys
framework, config, batch, seq, rank, targets, steps = sys.argv[1:]
batch, seq, rank, steps, targets = int(batch), int(seq), int(rank), int(steps), json.loads(targets)
from minilora.config import GPTConfig
cfg = GPTConfig.from_dict(json.loads(config))
if framework == "minilora":
    from minilora.bench import build_step
    step = build_step(cfg, batch, seq, rank, targets=targets)[1]
    for _ in range(steps):
        step()
else:
    from minilora.bench_torch import time_torch_step
    time_torch_step(cfg, batch, seq, rank, repeats=steps - 1, warmup=1)
from minilora.bench import own_peak_rss
print(json.dumps(own_peak_rss()))
"""


def own_peak_rss():
    """This process's peak resident memory in bytes. Linux: VmHWM, the high-water mark of
    this very address space (ru_maxrss would also count the parent's memory at fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss(framework="minilora", preset="gpt2-small", batch=8, seq=120, rank=16, steps=2, targets="all"):
    """Peak resident memory (bytes) of a fresh process that builds the model and runs
    `steps` training steps: the number to compare between minilora and "torch", or
    between minilora's LoRA `targets` and full fine-tuning (targets=None; build_step).
    preset: a preset name or a GPTConfig."""
    cfg = preset if isinstance(preset, GPTConfig) else GPTConfig.from_preset(preset)
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, framework, json.dumps(cfg.to_dict()), str(batch),
                          str(seq), str(rank), json.dumps(targets), str(steps)], capture_output=True, text=True)
    if out.returncode:
        raise BenchmarkError(f"the peak-RSS process failed:\n{out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def memory_by_batch(preset="gpt2-small", batches=(1, 2, 4, 8, 16), seq=120, rank=16, device=None):
    """Peak bytes allocated by one step at each batch size (fixed length): linear, not
    quadratic, growth is what to look for."""
    cfg = GPTConfig.from_preset(preset)
    rows = []
    for b in batches:
        model, step = build_step(cfg, b, seq, rank, device)
        step()
        rows.append({"batch": b, "step_peak_bytes": peak_step_memory(step, model.xp)})
        del model, step
    return rows


def layer_breakdown(step, shards=1):
    """Seconds per layer function (forward and backward separately) in one step.

    Each batch shard is profiled on its own (one after another while profiling, with
    BLAS limited as when they run side by side); a layer function's time is its mean
    over the shards, the share of the step's wall time it takes. Only the shards are
    profiled: the loss and the optimizer, outside them, are not listed."""
    with backend.profile_threads():  # warm-up: the shards now run in this thread, whose
        step()  # memory arena is cold the first time (forward layers would show page faults)
    with backend.profile_threads() as profiles:
        step()
    rows = {}
    for prof in profiles:
        for (filename, _, func), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
            if filename.endswith(("layers.py", "lora.py")) and "_" in func:
                rows[func] = rows.get(func, 0.0) + tottime / shards
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def generation_speed(cfg, device=None, prompt_len=4, new_tokens=30, seed=0, kv_cache=True):
    """Greedy tokens per second for a random-weight model of this config."""
    from .generate import generate

    model = GPTModel(cfg, seed=seed, device=device)
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, prompt_len))
    generate(model, prompt, 2, kv_cache=kv_cache)  # warm-up
    t = time.perf_counter()
    generate(model, prompt, new_tokens, kv_cache=kv_cache)
    return new_tokens / (time.perf_counter() - t)


def appendix_e_seconds(step_s, eval_s, epochs=5, train_batches=130, val_batches=19, test_batches=38,
                      eval_freq=50, eval_iter=5):
    """Projected wall time of the whole appendix E run (book padding) from the time of one
    training step and one evaluation batch: every step, the loss evaluations every
    eval_freq steps (eval_iter train + val batches), the epoch accuracies, and the final
    accuracy over the full train (drop_last), validation and test splits."""
    steps = epochs * train_batches
    evals = len(range(0, steps, eval_freq))
    eval_batches = 2 * eval_iter * (evals + epochs) + train_batches + val_batches + test_batches
    return steps * step_s + eval_batches * eval_s


DISPATCH_WIDTH, DISPATCH_HEADS = 64, 4  # the fixed-cost step: same layers and operations, tiny width


def run_benchmark(preset="gpt2-small", batch=8, seq=120, rank=16, device=None, dtype="float32",
                  repeats=5, breakdown=True, generation=True, torch=True, ops=True):
    """The full report as a dict (see the module docstring); ops=False skips the
    operation count."""
    device = backend.resolve_device(device)
    cfg = GPTConfig.from_preset(preset)
    model, step = build_step(cfg, batch, seq, rank, device, dtype)
    xp = model.xp
    # step and floor alternate, round by round, so that a slow spell of a noisy machine
    # hits both; the ratio is the median of the per-round ratios
    floor_fn = matmul_floor_fn(step)  # returns the seconds of its products
    shards = len(backend.batch_shards(batch, device))
    torch_step, torch_info = _torch_step(cfg, batch, seq, rank, device, dtype) if torch else (None, None)
    for fn in filter(None, (step, step, floor_fn, torch_step, torch_step)):  # warm-up; no torch_step: None
        fn()
    # PyTorch eager, when it is installed, takes its turn in every round too
    rounds = [(time_calls(step, xp, 1, warmup=0), floor_fn(), _torch_turn(torch_step)) for _ in range(repeats)]
    step_s = float(np.median([s for s, _, _ in rounds]))
    floor_s = float(np.median([f for _, f, _ in rounds]))
    del torch_step  # its model and activations: not held through the rest of the report
    eval_s = time_calls(lambda: step(train=False), xp, repeats)
    # the same step, every operation in the same order, at width 64: its time is what a
    # step costs whatever the arithmetic (Python, dispatch, kernel launches on a GPU)
    dispatch_cfg = GPTConfig(**{**cfg.to_dict(), "emb_dim": DISPATCH_WIDTH, "n_heads": DISPATCH_HEADS})
    _, dispatch_step = build_step(dispatch_cfg, batch, seq, rank, device, dtype)
    dispatch_s = time_calls(dispatch_step, xp, repeats, warmup=2)
    del dispatch_step
    report = {
        "device": device, "model": preset, "batch": batch, "seq": seq, "rank": rank, "dtype": dtype,
        "batch_shards": shards, "cpu_threads": backend.cpu_threads(),
        "trainable_params": model.num_params(trainable_only=True), "total_params": model.num_params(),
        "step_seconds": step_s, "tokens_per_second": batch * seq / step_s,
        "matmul_floor_seconds": floor_s,
        "step_over_floor": float(np.median([s / f for s, f, _ in rounds])),
        "eval_batch_seconds": eval_s,
        "dispatch_step_seconds": dispatch_s, "dispatch_width": DISPATCH_WIDTH, "dispatch_heads": DISPATCH_HEADS,
        "appendix_e_projected_seconds": appendix_e_seconds(step_s, eval_s),
        "step_peak_bytes": peak_step_memory(step, xp),
        "process_peak_rss_bytes": own_peak_rss(),
    }
    if breakdown:
        report["breakdown_seconds"] = layer_breakdown(step, shards)
    if ops:  # the same step counted, its frozen weights shared (a CPU model's only)
        report["op_count"] = step_op_count(cfg, batch, seq, rank, dtype, base=model if device == "cpu" else None)
    if generation:
        del model, step
        report["generate_tokens_per_second"] = generation_speed(cfg, device)
        report["generate_tokens_per_second_no_kv_cache"] = generation_speed(cfg, device, kv_cache=False)
    if torch_info is not None:
        report["torch"] = {**torch_info, "torch_step_seconds": float(np.median([t for _, _, t in rounds]))}
        report["step_over_torch"] = float(np.median([s / t for s, _, t in rounds]))
    elif torch:
        report["torch"] = None
    return report


TORCH_PAUSE = 0.5  # seconds after each PyTorch step of the rounds (_torch_turn)


def _torch_turn(torch_step):
    """Seconds of one PyTorch step (None without one), then a pause before the next round's
    minilora step: PyTorch's OpenMP threads keep spinning on the cores a while after its
    last parallel region. Measured on 2 cores (GPT-2 small, two runs each): with no pause
    step / floor came out 1.31 and 1.44, against 1.19 and 1.18 with no PyTorch in the
    rounds; with the pause 1.26 and 1.27, against 1.20 and 1.32."""
    if torch_step is None:
        return None
    seconds = time_calls(torch_step, np, 1, warmup=0)
    time.sleep(TORCH_PAUSE)
    return seconds


def _torch_step(cfg, batch, seq, rank, device, dtype):
    """(step, info) of the same step in PyTorch eager on the same device (bench_torch), or
    (None, None) where PyTorch is not installed, lacks CUDA for a cuda bench, or the dtype
    is not float32 (the PyTorch model's)."""
    if dtype != "float32":
        return None, None
    try:
        import torch

        from .bench_torch import build_torch_step
    except ImportError:
        return None, None
    if device == "cuda" and not torch.cuda.is_available():
        return None, None
    return build_torch_step(cfg, batch, seq, rank, device)
