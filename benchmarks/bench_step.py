"""The appendix E LoRA step benchmark with everything measured, saved as JSON.

    python benchmarks/bench_step.py [--device cuda] [--out benchmarks/results/NAME.json]

Same numbers as `minilora bench --memory --json`: median step, the matmul floor measured in
the same process (alternating rounds), PyTorch eager when installed, peak memory over
batch 1..16, fresh-process peak RSS for minilora and PyTorch, per-layer breakdown, and
greedy generation with and without the key/value cache.
"""

import argparse
import json
import platform
from pathlib import Path

from minilora.bench import memory_by_batch, peak_rss, run_benchmark


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="JSON file to write (default: print)")
    args = parser.parse_args()
    report = run_benchmark(device=args.device, repeats=args.repeats)
    report["memory_by_batch"] = memory_by_batch(device=args.device)
    if args.device == "cpu":
        report["peak_rss_bytes"] = peak_rss("minilora")
        if report.get("torch"):
            report["torch_peak_rss_bytes"] = peak_rss("torch")
    report["machine"] = {"processor": platform.processor() or platform.machine(), "python": platform.python_version()}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
