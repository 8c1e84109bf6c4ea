"""The whole appendix E job, timed: `minilora finetune` on the real SMS Spam Collection with
random gpt2-small weights, the book's recipe (LoRA r=16 alpha 16 on every linear, 5 epochs,
batch 8), batches grouped by length by default.

    python benchmarks/appendix_e_job.py [--batching by_length] [--runs 1]
        [--out results/appendix-e-by-length-cpu-2core.json]

A gpt2-small checkpoint with random weights (seed 0) is written in the Hugging Face layout to
a temporary folder, and the real command line runs on it, offline, in a fresh process per run:
`minilora finetune --model FOLDER --offline --batching by_length --output-dir RUN`. Each
printed line is stamped as it arrives, so the report splits the wall time into loading, the
training loop (its evaluations included) and the final accuracies; the peak RSS is the child's
(getrusage). The load average beside the run says what else shared the cores.

Needs the SMS data and the tokenizer in $MINILORA_HOME (see the README).
"""

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from instruct_job import first_time, stamped_run

import minilora as ml
from minilora.weights import save_pretrained


def one_run(folder, batching, tmp, k):
    run = Path(tmp) / f"run{k}"
    cmd = [sys.executable, "-m", "minilora", "finetune", "--model", str(folder), "--offline",
           "--batching", batching, "--output-dir", str(run)]
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    lines, loads = stamped_run(cmd, dict(os.environ, MINILORA_OFFLINE="1"))
    wall = time.perf_counter() - t0
    metrics = json.loads((run / "metrics.json").read_text())
    loop_end = max(t for t, line in lines if "| Validation accuracy" in line)  # the epoch-end lines
    return {
        "start": start, "wall_seconds": round(wall, 2), "wall_minutes": round(wall / 60, 2),
        # ru_maxrss of the largest child so far, in KiB on Linux: one child per run, the runs in order
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "metrics_seconds": metrics["seconds"],
        # the loop: from the first loss line (step 0's evaluation) to the last epoch's accuracies
        "training_loop_seconds": round(loop_end - first_time(lines, "Ep 1"), 2),
        "final_accuracies_seconds": round(first_time(lines, "Test accuracy") - loop_end, 2),
        "steps": metrics["steps"], "train_batches": metrics["train_batches"],
        "accuracy": {k: metrics[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy")},
        "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
        "load_average_1min_median": sorted(loads)[len(loads) // 2],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batching", default="by_length", choices=("by_length", "shuffled"))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-small"
        save_pretrained(ml.GPTModel(ml.GPTConfig.from_preset("gpt2-small"), seed=0), folder)
        runs = [one_run(folder, args.batching, tmp, k) for k in range(args.runs)]
    report = {
        "what": f"the whole appendix E job: minilora finetune --batching {args.batching}, GPT-2 small shape with "
                "random weights (seed 0), 5 epochs, every other option the default",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "numpy": __import__("numpy").__version__,
        "wall_minutes": [r["wall_minutes"] for r in runs], "runs": runs,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
