"""Length-grouped training batches (`--batching by_length`) against the book's shuffled ones:
the padding on the real SMS data, and accuracy and time on a small random-init GPT-2.

    python benchmarks/batching.py [--epochs 3] [--width 64] [--layers 2] [--seeds ...] [--out FILE]

(a) Padding: the mean padded length of a training batch over 5 epochs, per-batch padding with
    shuffled batches against batches grouped by length, next to the book's 120 and the mean text;
    and how many batches hold one class only (SMS spam is longer than ham, so batches of similar
    length tend to hold one class).
(b) Accuracy: `run_finetune` on a GPT-2 of width 64 and 2 layers (real SMS data and tokenizer)
    for the book's batches (padded to 120), shuffled batches padded per batch, and batches grouped
    by length, each with last-position and last-real-token pooling, over several seeds, with the
    wall time of each run. Runs padded per batch are also scored on the test split with the other
    evaluation batches (in the book's order for a run grouped by length, grouped by length for a
    shuffled one): with last-position pooling a text's logits depend on how many pads follow it.

Needs the SMS data and the tokenizer in $MINILORA_HOME (see the README).
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import minilora as ml
from minilora.data import BatchLoader, load_sms_spam, make_loaders
from minilora.finetune import FinetuneOptions, run_finetune
from minilora.train import evaluate
from minilora.weights import save_pretrained

# (name, --pad, --batching); --pad None: the batching's own (by_length pads per batch)
SETTINGS = [("book", "dataset", "shuffled"), ("shuffled, padded per batch", "longest_in_batch", "shuffled"),
            ("by length", None, "by_length")]


def padding_figures(batch_size=8, seed=123, epochs=5):
    data = load_sms_spam()
    lengths, labels = data.train.lengths, data.train.labels
    out = {"texts": len(lengths), "mean_text_length": float(lengths.mean()), "book_length": data.max_length,
           "batch_size": batch_size, "epochs": epochs}
    for batching in ("shuffled", "by_length"):
        train, _, _ = make_loaders(data, batch_size, seed=seed, pad_to="longest_in_batch", batching=batching)
        padded, one_class = [], []
        for epoch in range(epochs):
            rows = train.order(epoch)[:len(train) * batch_size].reshape(-1, batch_size)  # [batches, B]
            padded.append(train.batch_lengths(epoch).mean())
            one_class.append(np.mean([len(set(labels[r].tolist())) == 1 for r in rows]))
        out[batching] = {"batches": len(train), "mean_padded_length": float(np.mean(padded)),
                         "pad_tokens_per_text": float(np.mean(padded) - lengths.mean()),
                         "one_class_batches": float(np.mean(one_class))}
    return out


def accuracy_runs(args, log):
    cfg = ml.GPTConfig(vocab_size=50257, context_length=128, emb_dim=args.width, n_heads=args.width // 16,
                       n_layers=args.layers)
    rows, data = [], load_sms_spam()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ml.GPTModel(cfg, seed=0), Path(tmp) / "model")
        for name, pad, batching in SETTINGS:
            for pool in ("last", "last_real"):
                for seed in args.seeds:
                    t = time.perf_counter()
                    opts = FinetuneOptions(model=str(Path(tmp) / "model"), epochs=args.epochs, pad=pad,
                                           batching=batching, pool=pool, seed=seed, offline=True,
                                           output_dir=str(Path(tmp) / f"{batching}-{pad}-{pool}-{seed}"))
                    m = run_finetune(opts, log=lambda msg: None, progress=False)
                    seconds = time.perf_counter() - t
                    other = None
                    if opts.pad == "longest_in_batch":
                        model = ml.GPTModel.from_pretrained(opts.model, offline=True)
                        ml.load_adapter(model, Path(opts.output_dir) / "adapter")
                        swapped = {"shuffled": "by_length", "by_length": "shuffled"}[batching]
                        loader = BatchLoader(data.test, 8, pad_to="longest_in_batch", batching=swapped)
                        other = evaluate(model, loader.epoch_batches(0), pool=pool)[1]
                    rows.append({"setting": name, "pad": opts.pad, "batching": batching, "pool": pool, "seed": seed,
                                 "seconds": seconds, "test_accuracy_other_eval_batches": other,
                                 **{k: m[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy")}})
                    log(f"  {name:<28}{pool:<10}seed {seed}: test {m['test_accuracy'] * 100:.2f}% "
                        + (f"(other evaluation batches {other * 100:.2f}%) " if other is not None else "")
                        + f"({seconds:.1f} s)")
    return rows


def summary(rows):
    table = []
    for name, _, _ in SETTINGS:
        for pool in ("last", "last_real"):
            sel = [r for r in rows if r["setting"] == name and r["pool"] == pool]
            accs = [r["test_accuracy"] * 100 for r in sel]
            table.append({"setting": name, "pool": pool, "mean_test_accuracy": float(np.mean(accs)),
                          "min": min(accs), "max": max(accs), "per_seed": accs,
                          "mean_val_accuracy": float(np.mean([r["val_accuracy"] * 100 for r in sel])),
                          "mean_test_accuracy_other_eval_batches": (
                              None if sel[0]["test_accuracy_other_eval_batches"] is None else
                              float(np.mean([r["test_accuracy_other_eval_batches"] * 100 for r in sel]))),
                          "seconds_per_run": float(np.mean([r["seconds"] for r in sel]))})
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[123, 124, 125, 126, 127])
    parser.add_argument("--out", default=None, help="JSON file to write the figures to")
    args = parser.parse_args()
    load_before = os.getloadavg()
    pads = padding_figures()
    print(f"Training texts: {pads['texts']}, {pads['mean_text_length']:.1f} tokens on average; the book pads "
          f"every batch to {pads['book_length']}")
    for batching in ("shuffled", "by_length"):
        p = pads[batching]
        print(f"  {batching:<10} padded per batch: {p['mean_padded_length']:.1f} tokens per batch on average "
              f"({p['pad_tokens_per_text']:.1f} pads per text), {p['one_class_batches'] * 100:.0f}% of the "
              f"batches hold one class")
    print(f"GPT-2 width {args.width}, {args.layers} layers, random init, {args.epochs} epochs, seeds {args.seeds}")
    rows = accuracy_runs(args, print)
    table = summary(rows)
    print(f"{'batches':<28}{'pool':<11}{'test acc (mean)':>16}{'min-max':>15}{'val (mean)':>12}"
          f"{'other eval':>12}{'seconds':>9}")
    for t in table:
        other = t["mean_test_accuracy_other_eval_batches"]
        print(f"{t['setting']:<28}{t['pool']:<11}{t['mean_test_accuracy']:>15.2f}%"
              f"{t['min']:>8.2f}-{t['max']:.2f}{t['mean_val_accuracy']:>11.2f}%"
              f"{'-' if other is None else f'{other:.2f}%':>12}{t['seconds_per_run']:>9.1f}")
    if args.out:
        report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "padding": pads,
                  "model": {"width": args.width, "layers": args.layers, "epochs": args.epochs, "init": "random"},
                  "seeds": args.seeds, "runs": rows, "summary": table,
                  "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "python": platform.python_version(), "numpy": np.__version__},
                  "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
