"""LoRA against full fine-tuning on the same engine (`minilora bench --compare`): what
each saving the LoRA paper claims is worth for GPT-2.

The paper (Hu et al. 2021, section 4.2), for GPT-3 175B trained with Adam:
  memory      up to 2/3 less (1.2 TB -> 350 GB): frozen weights keep no optimizer state
  checkpoint  ~10,000x smaller (350 GB -> 35 MB) with r=4 on W_q and W_v
  speed       25% faster: frozen weights need no weight gradients

Four setups of the appendix E classifier step (random weights, a new 2-class head,
AdamW, batch 8 x 120, float32), built in one process and timed in alternating rounds:

  full          every parameter trains: both embeddings, every block, the final
                layernorm and the new head (nothing is frozen)
  lora_all_r16  appendix E: r=16 on Q, K, V, attn.c_proj, both MLP linears and the head
  lora_qv_r4    r=4 on W_q and W_v alone, the paper's GPT-3 setting (targets="attention")
  lora_attn_r8  r=8 on every attention linear, W_q, W_k, W_v and W_o (attn.c_proj), the
                weights the paper's section 7.1 chooses among; no MLP
The LoRA setups train nothing else: the new head stays frozen (appendix E freezes it
too), but it is saved with the adapter, since it is random.

Each is measured with bench's machinery: trainable parameters; bytes of the parameters,
of the gradients dict backward returns and of AdamW's m and v; the allocation peak of a
training step beyond those (bench.peak_step_memory) and the peak RSS of a fresh process
training the setup (bench.peak_rss); the step time next to its own matmul floor
(bench.matmul_floor_fn); and the bytes on disk of what must be kept after training.
"""

import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backend
from .adapters import save_adapter
from .bench import build_step, matmul_floor_fn, matmul_flops, peak_rss, peak_step_memory, time_calls
from .config import GPTConfig, param_shapes
from .lora import adapter_sites
from .weights import save_pretrained


@dataclass(frozen=True)
class Setup:
    name: str
    rank: int | None  # None: full fine-tuning
    targets: object  # LoRA targets (lora.resolve_targets); None: full fine-tuning
    about: str


ATTENTION_LINEARS = ["c_attn.q", "c_attn.k", "c_attn.v", "attn.c_proj"]  # W_q, W_k, W_v, W_o
SETUPS = (
    Setup("full", None, None, "full fine-tuning: every parameter, embeddings and new head included"),
    Setup("lora_all_r16", 16, "all", "LoRA r=16 on every linear and the head (appendix E)"),
    Setup("lora_qv_r4", 4, "attention", "LoRA r=4 on W_q, W_v (the paper's GPT-3 setting)"),
    Setup("lora_attn_r8", 8, ATTENTION_LINEARS, "LoRA r=8 on W_q, W_k, W_v, W_o"),
)

# A shape small enough for a test to run the whole comparison in seconds.
SHAPES = {"tiny": dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=4, n_layers=2)}

# The LoRA paper's figures, and what its checkpoint formula takes for GPT-3 175B.
PAPER = {"memory_saving": 2 / 3, "checkpoint_factor": 10_000, "speedup": 1.25,
         "gpt3": {"params": 175e9, "n_layers": 96, "d_model": 12288, "rank": 4}}
HEAD = ("out_head.weight", "out_head.bias")


def bench_config(name):
    """A GPT-2 preset ("gpt2-small" ... "gpt2-xl") or one of SHAPES."""
    return GPTConfig(**SHAPES[name]) if name in SHAPES else GPTConfig.from_preset(name)


def qv_checkpoint_factor(n_params, n_layers, d_model, rank=4):
    """The paper's checkpoint ratio: all weights over the LoRA values of r on W_q and W_v,
    n_layers * 2 adapters * (d_model + d_model) * r ((m + n) r each, both d_model square)."""
    return n_params / (n_layers * 2 * 2 * d_model * rank)


def rank_formula(model):
    """(values an adapter folder holds for its LoRA, (m + n) r per adapter; values a dense
    update of the same weight blocks would hold, m n each)."""
    if model.lora is None:
        return None, None
    sites = adapter_sites(model)
    shapes = [sites[ad.prefix][2:] for ad in model.lora.adapters]  # (in, out)
    return (sum((m + n) * model.lora.rank for m, n in shapes), sum(m * n for m, n in shapes))


def save_finetune(model, folder):
    """Write what must be kept of a fine-tune, return {file name: bytes}: under LoRA the
    adapter folder (adapters.save_adapter: A, B and the random frozen head); under full
    fine-tuning the whole model with its new head (weights.save_pretrained writes out_head.*
    in model.safetensors)."""
    folder = Path(folder)
    if model.lora is not None:
        save_adapter(model, folder)
    else:
        save_pretrained(model, folder)
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


def machine_info():
    """What the figures were measured on: CPU, cores used, memory, Python, NumPy and its BLAS."""
    info = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "cpu_threads": backend.cpu_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["memory_bytes"] = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [f"{d.get('internal_api')} {d.get('version')}" for d in threadpool_info()
                        if d.get("user_api") == "blas"]
    except ImportError:
        pass
    return info


def loadavg():
    """The 1, 5 and 15 minute load averages (None where the OS has none): on a shared
    machine they say how quiet the run was."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def run_compare(preset="gpt2-small", batch=8, seq=120, device=None, dtype="float32", repeats=5, timing=True,
                floor=True, rss=True, setups=SETUPS, log=None):
    """The comparison as a dict: per setup (in `setups` order) its counts, bytes and
    times, then `savings` (each LoRA setup against full fine-tuning) and `paper`.

    timing=False skips the step times (memory and sizes only); floor=False the matmul
    floors; rss=False the fresh-process peak RSS (one process per setup)."""
    log = log or (lambda msg: None)
    device = backend.resolve_device(device)
    cfg = bench_config(preset)
    report = {"device": device, "model": preset, "config": cfg.to_dict(), "batch": batch, "seq": seq,
              "dtype": dtype, "batch_shards": len(backend.batch_shards(batch, device)), "repeats": repeats,
              "machine": machine_info(), "loadavg_before": loadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    rss_bytes = {}
    if rss and device == "cpu":  # first, while this process holds no model
        for s in setups:
            log(f"peak RSS of a fresh process training {s.name}")
            rss_bytes[s.name] = peak_rss("minilora", cfg, batch, seq, s.rank or 0, targets=s.targets)
    steps, base = {}, None
    for s in setups:  # the LoRA setups share one set of frozen GPT-2 weights
        log(f"building {s.name}")
        model, step = build_step(cfg, batch, seq, s.rank or 0, device, dtype, targets=s.targets,
                                 base=None if s.targets is None else base)
        if s.targets is not None and base is None:
            base = model
        steps[s.name] = step
    rows = {}
    for s in setups:
        step = steps[s.name]
        model = step.model
        step()
        step()  # warm-up; the first step also allocates AdamW's m and v
        lora_values, dense_values = rank_formula(model)
        rows[s.name] = {
            "setup": s.name, "about": s.about, "rank": s.rank, "targets": s.targets,
            "trainable_params": model.num_params(trainable_only=True), "total_params": model.num_params(),
            "param_bytes": sum(int(p.nbytes) for p in model.params.values()),
            "gradient_bytes": step.grad_bytes,
            "optimizer_state_bytes": sum(int(a.nbytes) for d in (step.opt.m, step.opt.v) for a in d.values()),
            "lora_values_formula": lora_values, "dense_values_same_weights": dense_values,
            "matmul_gflop": matmul_flops(model, batch, seq) / 1e9,
        }
    if timing:
        _time_rounds(steps, rows, setups, repeats, floor, log)
    for s in setups:
        log(f"step peak memory of {s.name}")
        step, row = steps[s.name], rows[s.name]
        row["step_peak_bytes"] = peak_step_memory(step, step.model.xp)
        row["training_bytes"] = row["param_bytes"] + row["optimizer_state_bytes"] + row["step_peak_bytes"]
        with tempfile.TemporaryDirectory() as tmp:
            files = save_finetune(step.model, Path(tmp) / s.name)
        row["saved_files"] = files
        row["saved_bytes"] = sum(files.values())
        head = sum(step.model.params[n].size for n in HEAD)
        row["saved_values"] = row["total_params"] if s.targets is None else row["trainable_params"] + head
        row["saved_metadata_bytes"] = row["saved_bytes"] - step.model.dtype.itemsize * row["saved_values"]
        if s.name in rss_bytes:
            row["peak_rss_bytes"] = rss_bytes[s.name]
    report["setups"] = [rows[s.name] for s in setups]
    report["loadavg_after"] = loadavg()
    report["savings"] = savings(report["setups"])
    n_base = sum(math.prod(shape) for shape in param_shapes(cfg).values())  # GPT-2 without the head
    g3 = PAPER["gpt3"]
    report["paper"] = {**PAPER, "gpt3_qv_r4_checkpoint_factor":
                       qv_checkpoint_factor(g3["params"], g3["n_layers"], g3["d_model"], g3["rank"]),
                       "this_shape_qv_r4_checkpoint_factor":
                       qv_checkpoint_factor(n_base, cfg.n_layers, cfg.emb_dim, 4)}
    return report


def _time_rounds(steps, rows, setups, repeats, floor, log):
    """Step (and floor) times in `repeats` rounds, every setup once a round, the order
    rotating so that no setup always follows the same one; the medians, and the
    per-round ratios' medians (step / floor; full's step / this step)."""
    xp = next(iter(steps.values())).model.xp
    # each floor returns its products' seconds and holds one product's operands at a time
    floors = {s.name: matmul_floor_fn(steps[s.name]) for s in setups} if floor else {}
    for fn in floors.values():  # warm-up
        fn()
    times = {s.name: [] for s in setups}
    for k in range(repeats):
        log(f"round {k + 1}/{repeats}")
        order = list(setups[k % len(setups):]) + list(setups[:k % len(setups)])
        for s in order:
            step_s = time_calls(steps[s.name], xp, 1, warmup=0)
            floor_s = floors[s.name]() if floor else None
            times[s.name].append((step_s, floor_s, steps[s.name].optimizer_seconds))
    full = setups[0].name if setups[0].targets is None else None
    for s in setups:
        t = times[s.name]
        row = rows[s.name]
        row["step_seconds_rounds"] = [x[0] for x in t]
        row["step_seconds"] = float(np.median([x[0] for x in t]))
        row["optimizer_seconds"] = float(np.median([x[2] for x in t]))
        if floor:
            row["floor_seconds"] = float(np.median([x[1] for x in t]))
            row["step_over_floor"] = float(np.median([x[0] / x[1] for x in t]))
        if full is not None:
            row["full_step_over_this_step"] = float(np.median([f[0] / x[0] for f, x in zip(times[full], t)]))
            if floor:
                row["full_floor_over_this_floor"] = float(np.median([f[1] / x[1] for f, x in zip(times[full], t)]))


def savings(rows):
    """Each LoRA setup against full fine-tuning (the first row, when it is full): the
    memory saved (1 - LoRA / full, of the training allocation and of the peak RSS), the
    checkpoint factor (full / LoRA bytes on disk) and the speedup (full / LoRA step time,
    the median of the per-round ratios)."""
    full = rows[0]
    if full["targets"] is not None:
        return {}
    out = {}
    for row in rows[1:]:
        s = {"trainable_fraction": row["trainable_params"] / full["trainable_params"],
             "memory_saving": 1 - row["training_bytes"] / full["training_bytes"],
             "checkpoint_factor": full["saved_bytes"] / row["saved_bytes"],
             "optimizer_state_factor": full["optimizer_state_bytes"] / row["optimizer_state_bytes"]}
        if "peak_rss_bytes" in row and "peak_rss_bytes" in full:
            s["rss_saving"] = 1 - row["peak_rss_bytes"] / full["peak_rss_bytes"]
        if "full_step_over_this_step" in row:
            s["speedup"] = row["full_step_over_this_step"]
            s["speedup_without_adamw"] = ((full["step_seconds"] - full["optimizer_seconds"]) /
                                          (row["step_seconds"] - row["optimizer_seconds"]))
        out[row["setup"]] = s
    return out


def explain(report):
    """One line per paper claim: the measured factor for the paper's own setting
    (r=4 on W_q, W_v) and for appendix E, and why they differ from the paper's."""
    rows = {r["setup"]: r for r in report["setups"]}
    sv, paper = report["savings"], report["paper"]
    if "full" not in rows or not sv:
        return []
    full = rows["full"]
    qv, ae = sv.get("lora_qv_r4"), sv.get("lora_all_r16")
    lines = []
    pick = qv or ae
    which = "lora_qv_r4" if qv else "lora_all_r16"
    lo = rows[which]
    act = lo["step_peak_bytes"] / lo["training_bytes"]
    state = (full["optimizer_state_bytes"] + full["gradient_bytes"]) / full["training_bytes"]
    lines.append(
        f"memory: {pick['memory_saving']:.0%} saved ({which}; paper: up to 2/3). LoRA removes full fine-tuning's "
        f"gradients and AdamW m, v ({state:.0%} of its {full['training_bytes'] / 2**30:.2f} GiB); what stays is "
        f"the frozen float32 weights and the step's activations ({act:.0%} of LoRA's "
        f"{lo['training_bytes'] / 2**30:.2f} GiB, {lo['step_peak_bytes'] / lo['param_bytes']:.1f}x the weights), "
        f"which LoRA does not shrink. The paper's 2/3 is GPT-3 175B, where weights and optimizer state dwarf "
        f"the activations.")
    lines.append(
        f"checkpoint: {pick['checkpoint_factor']:,.0f}x smaller ({which}; paper: ~10,000x). The paper's "
        f"factor is GPT-3's 175B weights over 96 layers x 2 x (12288 + 12288) x 4 LoRA values = "
        f"{paper['gpt3_qv_r4_checkpoint_factor']:,.0f}x; the same formula gives "
        f"{paper['this_shape_qv_r4_checkpoint_factor']:,.0f}x for this shape (width {report['config']['emb_dim']}: "
        f"the factor grows with width / r), less the random head saved with the adapter and the file metadata.")
    if "speedup" in pick:
        extra = full["matmul_gflop"] / lo["matmul_gflop"]
        lines.append(
            f"speed: {pick['speedup']:.2f}x the full fine-tuning step ({which}; paper: 1.25x), "
            f"{pick['speedup_without_adamw']:.2f}x with AdamW's time left out of both. Skipping every dW leaves "
            f"{1 / extra:.0%} of full fine-tuning's matmul FLOPs (forward, dx and dW cost about the same each: "
            f"at most 1.5x), and the paper measured 1.25x for GPT-3 on GPUs; here full fine-tuning also runs "
            f"AdamW over {full['trainable_params'] / 1e6:.0f}M values, NumPy elementwise passes on one core "
            f"({full['optimizer_seconds']:.2f} s a step, against {lo['optimizer_seconds'] * 1e3:.0f} ms), and the "
            f"embedding scatter-add.")
    return lines


def format_table(report):
    """The comparison as plain-text lines."""
    rows = report["setups"]
    gib, mib = 2**30, 2**20
    cols = [("trainable params", lambda r: f"{r['trainable_params']:,}"),
            ("gradients (MiB)", lambda r: f"{r['gradient_bytes'] / mib:,.1f}"),
            ("AdamW m+v (MiB)", lambda r: f"{r['optimizer_state_bytes'] / mib:,.1f}"),
            ("weights (MiB)", lambda r: f"{r['param_bytes'] / mib:,.0f}"),
            ("step peak (MiB)", lambda r: f"{r['step_peak_bytes'] / mib:,.0f}"),
            ("training total (GiB)", lambda r: f"{r['training_bytes'] / gib:.2f}"),
            ("peak RSS (GiB)", lambda r: f"{r['peak_rss_bytes'] / gib:.2f}" if "peak_rss_bytes" in r else "-"),
            ("step (s)", lambda r: f"{r['step_seconds']:.2f}" if "step_seconds" in r else "-"),
            ("step / floor", lambda r: f"{r['step_over_floor']:.2f}" if "step_over_floor" in r else "-"),
            ("AdamW (s)", lambda r: f"{r['optimizer_seconds']:.3f}" if "optimizer_seconds" in r else "-"),
            ("saved (bytes)", lambda r: f"{r['saved_bytes']:,}")]
    width = max(len(c) for c, _ in cols) + 2
    lines = [f"{'':<{width}}" + "".join(f"{r['setup']:>16}" for r in rows)]
    lines += [f"{name:<{width}}" + "".join(f"{fmt(r):>16}" for r in rows) for name, fmt in cols]
    sv = report["savings"]
    if sv:
        lines.append("")
        lines.append(f"{'against full fine-tuning':<{width}}" + f"{'paper':>16}" +
                     "".join(f"{name:>16}" for name in sv))
        for key, label, fmt, paper in (("memory_saving", "memory saved", "{:.0%}", "2/3"),
                                       ("rss_saving", "peak RSS saved", "{:.0%}", ""),
                                       ("checkpoint_factor", "checkpoint factor", "{:,.0f}x", "~10,000x"),
                                       ("speedup", "speedup", "{:.2f}x", "1.25x"),
                                       ("speedup_without_adamw", "speedup, AdamW left out", "{:.2f}x", "")):
            if all(key in s for s in sv.values()):
                lines.append(f"{label:<{width}}{paper:>16}" + "".join(f"{fmt.format(s[key]):>16}" for s in sv.values()))
    return lines
