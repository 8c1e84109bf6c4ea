"""Benchmarks: a LoRA training step of GPT-2 small next to its own matmul floor.

The step is appendix E's: GPT-2 small (random weights), a 2-class head, rank-16 LoRA
on every linear, AdamW, batch 8 x 120 tokens, float32. Reported, all from one process
so that the ratios are meaningful on a noisy machine:

- the median step time after a warm-up, and tokens per second;
- the matmul floor: the step's own matrix products (the same shapes and layouts, in
  the same batch shards side by side), timed alone; step / floor says how much time
  goes elsewhere;
- the peak memory the step allocates (tracemalloc sees every NumPy buffer) and the
  process's peak resident set;
- a breakdown of the step's time by layer function (cProfile);
- greedy generation speed of GPT-2 small.
"""

import json
import pstats
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from . import backend
from .layers import cross_entropy_backward, cross_entropy_forward
from .lora import apply_lora
from .model import GPTConfig, GPTModel
from .optim import AdamW


def build_step(cfg, batch=8, seq=120, rank=16, device=None, dtype="float32", seed=0):
    """(model, step function) for the appendix E LoRA step at this shape; the step
    function takes train=False to run the evaluation forward (no cache, no update)."""
    model = GPTModel(cfg, seed=seed, dtype=dtype, device=device).replace_head(2)
    apply_lora(model, rank=rank, alpha=rank)
    opt = AdamW(model, lr=8e-4, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (batch, seq))
    labels = model.xp.asarray(rng.integers(0, 2, batch))
    positions = np.full(batch, seq - 1)

    def step(train=True):
        if not train:
            return model.forward(idx, keep_cache=False, positions=positions)
        logits = model.forward(idx, positions=positions)  # [B, 2]
        loss, cache = cross_entropy_forward(logits, labels)
        opt.step(model.backward(cross_entropy_backward(1.0, cache)[0]))
        return loss

    return model, step


def _sync(xp):
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


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


def step_matmuls(cfg, batch, seq, rank, n_classes=2):
    """Every matrix product of one LoRA step as (a_shape, b_shape, a_transposed,
    b_transposed): logical shapes, and whether the step multiplies a transposed view
    (dx = dout @ W^T, dW-like products x^T @ dout) rather than a contiguous array.
    The step classifies from one position, so its last block runs one query per
    sequence and the layers after its attention on `batch` rows; the embeddings are
    frozen, so block 0 computes no dx under its attention."""
    N, C, NH, r, T = batch * seq, cfg.emb_dim, cfg.n_heads, rank, seq
    hs = C // NH

    def linear(rows, i, o, adapters, need_dx=True):
        """x @ W; dx = dout @ W^T; each adapter: x A, (xA) B; dB, g = dout B^T, dA, dx += g A^T."""
        prods = [((rows, i), (i, o), False, False)] + [((rows, o), (o, i), False, True)] * need_dx
        for a_in, a_out in adapters:
            prods += [((rows, a_in), (a_in, r), False, False), ((rows, r), (r, a_out), False, False),
                      ((r, rows), (rows, a_out), True, False), ((rows, a_out), (a_out, r), False, True),
                      ((a_in, rows), (rows, r), True, False)] + [((rows, r), (r, a_in), False, True)] * need_dx
        return prods

    def attention(Tq):  # forward q k^T, att v; backward dy v^T, att^T dy, dpre k, dpre^T q
        q, kT = (batch, NH, Tq, hs), (batch, NH, hs, T)
        att, kv = (batch, NH, Tq, T), (batch, NH, T, hs)
        attT, dy = (batch, NH, T, Tq), (batch, NH, Tq, hs)
        return [(q, kT, False, True), (att, kv, False, False), (dy, kT, False, True),
                (attT, dy, True, False), (att, kv, False, False), (attT, q, True, False)]

    prods = []
    for layer in range(cfg.n_layers):
        rows, Tq = (batch, 1) if layer == cfg.n_layers - 1 else (N, T)
        # c_attn with LoRA on q, k, v; under block 0 everything is frozen: no dx
        prods += linear(N, C, 3 * C, [(C, C)] * 3, need_dx=layer > 0)
        prods += attention(Tq)
        prods += linear(rows, C, C, [(C, C)])  # attn.c_proj
        prods += linear(rows, C, 4 * C, [(C, 4 * C)])  # mlp.c_fc
        prods += linear(rows, 4 * C, C, [(4 * C, C)])  # mlp.c_proj
    prods += linear(batch, C, n_classes, [(C, n_classes)])  # the classifier head, with its LoRA
    return prods


def matmul_floor_fn(cfg, batch, seq, rank, xp, dtype, device="cpu"):
    """A function running the step's matrix products alone, on operands made once, the
    way the step runs them: split into the model's batch shards, side by side."""
    rng = np.random.default_rng(0)

    def operand(shape, transposed):
        stored = shape[:-2] + shape[-2:][::-1] if transposed else shape
        a = xp.asarray(rng.standard_normal(stored, dtype=np.float32).astype(dtype))
        return xp.swapaxes(a, -1, -2) if transposed else a

    shards = [[(operand(a, ta), operand(b, tb)) for a, b, ta, tb in step_matmuls(cfg, s.stop - s.start, seq, rank)]
              for s in backend.batch_shards(batch, device)]

    def run_shard(operands):
        for a, b in operands:
            a @ b

    def run():
        backend.run_parallel(run_shard, [(operands,) for operands in shards])

    return run


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
framework, preset, batch, seq, rank, steps = sys.argv[1:]
batch, seq, rank, steps = int(batch), int(seq), int(rank), int(steps)
from minilora.model import GPTConfig
cfg = GPTConfig.from_preset(preset)
if framework == "minilora":
    from minilora.bench import build_step
    step = build_step(cfg, batch, seq, rank)[1]
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


def peak_rss(framework="minilora", preset="gpt2-small", batch=8, seq=120, rank=16, steps=2):
    """Peak resident memory (bytes) of a fresh process that builds the model and runs
    `steps` training steps: the number to compare between minilora and "torch"."""
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, framework, preset, str(batch), str(seq),
                          str(rank), str(steps)], capture_output=True, text=True, check=True)
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


def run_benchmark(preset="gpt2-small", batch=8, seq=120, rank=16, device=None, dtype="float32",
                  repeats=5, breakdown=True, generation=True, torch=True):
    """The full report as a dict (see the module docstring)."""
    device = backend.resolve_device(device)
    cfg = GPTConfig.from_preset(preset)
    model, step = build_step(cfg, batch, seq, rank, device, dtype)
    xp = model.xp
    # step and floor alternate, round by round, so that a slow spell of a noisy machine
    # hits both; the ratio is the median of the per-round ratios
    floor_fn = matmul_floor_fn(cfg, batch, seq, rank, xp, dtype, device)
    shards = len(backend.batch_shards(batch, device))
    for fn in (step, step, floor_fn):  # warm-up
        fn()
    rounds = [(time_calls(step, xp, 1, warmup=0), time_calls(floor_fn, xp, 1, warmup=0)) for _ in range(repeats)]
    step_s = float(np.median([s for s, _ in rounds]))
    floor_s = float(np.median([f for _, f in rounds]))
    eval_s = time_calls(lambda: step(train=False), xp, repeats)
    report = {
        "device": device, "model": preset, "batch": batch, "seq": seq, "rank": rank, "dtype": dtype,
        "batch_shards": shards, "cpu_threads": backend.cpu_threads(),
        "trainable_params": model.num_params(trainable_only=True), "total_params": model.num_params(),
        "step_seconds": step_s, "tokens_per_second": batch * seq / step_s,
        "matmul_floor_seconds": floor_s,
        "step_over_floor": float(np.median([s / f for s, f in rounds])),
        "eval_batch_seconds": eval_s,
        "appendix_e_projected_seconds": appendix_e_seconds(step_s, eval_s),
        "step_peak_bytes": peak_step_memory(step, xp),
        "process_peak_rss_bytes": own_peak_rss(),
    }
    if breakdown:
        report["breakdown_seconds"] = layer_breakdown(step, shards)
    if generation:
        del model, step
        report["generate_tokens_per_second"] = generation_speed(cfg, device)
        report["generate_tokens_per_second_no_kv_cache"] = generation_speed(cfg, device, kv_cache=False)
    if torch and device == "cpu" and dtype == "float32":
        try:
            from .bench_torch import time_torch_step
        except ImportError:
            report["torch"] = None
        else:
            report["torch"] = time_torch_step(cfg, batch, seq, rank, repeats)
            report["step_over_torch"] = step_s / report["torch"]["torch_step_seconds"]
    return report
