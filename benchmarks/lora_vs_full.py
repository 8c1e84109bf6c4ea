"""LoRA against full fine-tuning (`minilora bench --compare`), saved as JSON with a bar chart.

    python benchmarks/lora_vs_full.py [--model gpt2-small] [--device cpu] [--repeats 5]
        [--no-timing] [--no-floor]           # writes results/lora-vs-full-<device>-<model>.json + .png
    python benchmarks/lora_vs_full.py --chart results/lora-vs-full-cpu-gpt2-small.json   # the chart alone

The JSON holds every figure of each setup, the savings against full fine-tuning, the
paper's figures, the machine and the load average before and after the run.
"""

import argparse
import json
from pathlib import Path

from minilora.bench_compare import explain, format_table, run_compare

RESULTS = Path(__file__).resolve().parent / "results"
COLORS = {"weights": "#9db4c0", "AdamW m + v": "#c2185b", "step peak (activations, gradients)": "#5c6b73"}


def chart(report, path):
    """Three panels, one bar per setup: training memory (weights, AdamW state, step peak,
    stacked), step time next to its matmul floor, and the bytes to save (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["setups"]
    names = [r["setup"].replace("_", "\n", 1) for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    bottom = [0.0] * len(rows)
    for label, key in (("weights", "param_bytes"), ("AdamW m + v", "optimizer_state_bytes"),
                       ("step peak (activations, gradients)", "step_peak_bytes")):
        vals = [r[key] / 2**30 for r in rows]
        ax.bar(x, vals, bottom=bottom, label=label, color=COLORS[label])
        bottom = [b + v for b, v in zip(bottom, vals)]
    if all("peak_rss_bytes" in r for r in rows):
        ax.plot(x, [r["peak_rss_bytes"] / 2**30 for r in rows], "k_", markersize=28, mew=2,
                label="peak RSS, fresh process")
    top = max(bottom + [r.get("peak_rss_bytes", 0) / 2**30 for r in rows])
    ax.set_ylim(0, top * 1.6)  # room for the legend above the bars
    ax.set_ylabel("GiB")
    ax.set_title("training memory")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1]
    if all("step_seconds" in r for r in rows):
        floors = all("floor_seconds" in r for r in rows)
        dx, w = (0.2, 0.4) if floors else (0.0, 0.6)
        ax.bar([i - dx for i in x], [r["step_seconds"] for r in rows], w, label="step (median)", color="#37474f")
        if floors:
            ax.bar([i + dx for i in x], [r["floor_seconds"] for r in rows], w, label="its matmul floor",
                   color="#90a4ae")
        ax.bar([i - dx for i in x], [r["optimizer_seconds"] for r in rows], w, label="of which AdamW",
               color=COLORS["AdamW m + v"])
        ax.set_ylim(0, max(r["step_seconds"] for r in rows) * 1.35)
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "not timed", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("training step")
    ax = axes[2]
    ax.bar(x, [r["saved_bytes"] for r in rows], color="#607d8b")
    ax.set_yscale("log")
    ax.set_ylabel("bytes")
    ax.set_title("what must be saved")
    for i, r in enumerate(rows):
        ax.text(i, r["saved_bytes"], f"{r['saved_bytes'] / 2**20:,.1f} MiB", ha="center", va="bottom", fontsize=7)
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, fontsize=8)
    fig.suptitle(f"LoRA against full fine-tuning: {report['model']} shape, batch {report['batch']} x {report['seq']}, "
                 f"{report['dtype']}, {report['device']} ({report['machine'].get('cpu_threads')} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file (default results/lora-vs-full-<device>-<model>.json)")
    parser.add_argument("--chart", default=None, help="only draw the chart of this JSON file")
    args = parser.parse_args()
    if args.chart:
        report = json.loads(Path(args.chart).read_text())
        print(chart(report, Path(args.chart).with_suffix(".png")))
        return
    report = run_compare(args.model, device=args.device, repeats=args.repeats, timing=not args.no_timing,
                         floor=not args.no_floor, log=lambda msg: print(f"  ... {msg}", flush=True))
    out = Path(args.out) if args.out else RESULTS / f"lora-vs-full-{report['device']}-{args.model}.json"
    out.write_text(json.dumps(report, indent=2))
    print("\n".join(format_table(report)))
    print()
    print("\n".join(explain(report)))
    print(f"load average {report['loadavg_before']} -> {report['loadavg_after']}")
    print(out, chart(report, out.with_suffix(".png")))


if __name__ == "__main__":
    main()
