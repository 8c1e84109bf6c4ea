"""The whole chapter 7 job, timed: `minilora instruct` on the real instruction data with
random gpt2-medium weights, answers to the 110 test entries included.

    python benchmarks/instruct_job.py [--model gpt2-medium] [--full] [--epochs 2]
        [--out results/instruct-job-cpu-2core.json]

A gpt2-medium checkpoint with random weights (seed 0) is written in the Hugging Face
layout to a temporary folder, and the real command line runs on it, offline, in a fresh
process: `minilora instruct --model FOLDER --offline --output-dir RUN` with the book's
defaults (LoRA r=16 alpha 16 on every linear and the head, batch 8, 2 epochs, losses
every 5 steps over 5 batches, a sample answer per epoch, greedy answers up to 256 new
tokens). Each printed line is stamped as it arrives, so the report splits the wall time
into loading, the training loop (its evaluations and samples included), the final
losses and the answers.

Random weights never emit <|endoftext|>, so every one of the 110 answers runs the full
256 tokens: the answers phase is an upper bound of what trained weights take. The book's
published time (15.78 min on an M3 Air CPU) is for full fine-tuning; --full times that.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import minilora as ml
from minilora.weights import save_pretrained

RESULTS = Path(__file__).resolve().parent / "results"
BOOK_MINUTES = {"full, M3 Air CPU": 15.78, "full, A100": 0.86, "LoRA, L4": 1.30}  # chapter 7 / exercise 7.4


def stamped_run(cmd, env):
    """Run cmd, echo its output, and return [(seconds since start, line)] and the machine's
    1-minute load average read at each line (what else ran beside the job)."""
    t0 = time.perf_counter()
    lines, loads = [], []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
        for line in p.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            loads.append(os.getloadavg()[0])
            print(f"[{lines[-1][0]:8.1f} s] {line}", end="", flush=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed ({p.returncode})")
    return lines, loads


def first_time(lines, prefix):
    return next(t for t, line in lines if line.startswith(prefix))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-medium")
    ap.add_argument("--full", action="store_true", help="train every parameter (the book's timed run)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.model
        t = time.perf_counter()
        save_pretrained(ml.GPTModel(ml.GPTConfig.from_preset(args.model), seed=0), folder)
        print(f"random {args.model} written in {time.perf_counter() - t:.1f} s", flush=True)
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "minilora", "instruct", "--model", str(folder), "--offline",
               "--output-dir", str(run), "--epochs", str(args.epochs)] + (["--full"] if args.full else [])
        t_start = time.perf_counter()
        lines, loads = stamped_run(cmd, dict(os.environ, MINILORA_OFFLINE="1"))
        wall = time.perf_counter() - t_start
        metrics = json.loads((run / "metrics.json").read_text())
        answers = json.loads((run / "instruction-data-with-response.json").read_text())

    t_answers = first_time(lines, "Answering the")
    t_done = first_time(lines, "Done in")
    report = {
        "what": f"minilora instruct, random {args.model} weights, {'full fine-tuning' if args.full else 'LoRA'}, "
                f"{args.epochs} epochs, answers to the test set included",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "numpy": __import__("numpy").__version__,
        "wall_seconds": wall,
        "job_seconds": metrics["seconds"],  # as the job reports it: model load to answers written
        "training_loop_seconds": metrics["training_seconds"],  # steps, evaluations, sample answers
        "answers_seconds": t_done - t_answers,
        "steps": metrics["steps"], "tokens_seen": metrics["tokens_seen"],
        "seconds_per_step_in_loop": metrics["training_seconds"] / metrics["steps"],
        "answers": len(answers),
        "answer_tokens_max": 256,
        "trainable_params": metrics["trainable_params"],
        "book_minutes": BOOK_MINUTES,
        # the job itself keeps both cores busy (load ~2): more means other work shared them
        "load_average_1min_median": sorted(loads)[len(loads) // 2],
        "load_average_1min_max": max(loads),
    }
    print(json.dumps(report, indent=2))
    print(f"whole job {wall / 60:.2f} min (training loop {metrics['training_seconds'] / 60:.2f} min, answers "
          f"{report['answers_seconds'] / 60:.2f} min); the book: 15.78 min full fine-tuning on an M3 Air CPU")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
