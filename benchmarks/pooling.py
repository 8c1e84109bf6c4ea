"""Accuracy and wall time of the four padding x pooling choices, on a small random-init
GPT-2 (real SMS data and tokenizer): does reading the last *real* token instead of the
last position (usually a pad) matter, and what does per-batch padding save?

    python benchmarks/pooling.py [--epochs 3] [--width 64] [--layers 2] [--json]

Needs the SMS data and the tokenizer in $MINILORA_HOME (see the README).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import minilora as ml
from minilora.finetune import FinetuneOptions, run_finetune
from minilora.weights import save_pretrained


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[123, 124, 125])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = ml.GPTConfig(vocab_size=50257, context_length=128, emb_dim=args.width, n_heads=args.width // 16,
                       n_layers=args.layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ml.GPTModel(cfg, seed=0), Path(tmp) / "model")
        for pad in ("dataset", "longest_in_batch"):
            for pool in ("last", "last_real"):
                for seed in args.seeds:
                    t = time.perf_counter()
                    m = run_finetune(FinetuneOptions(model=str(Path(tmp) / "model"), epochs=args.epochs, pad=pad,
                                                     pool=pool, seed=seed, offline=True,
                                                     output_dir=str(Path(tmp) / f"{pad}-{pool}-{seed}")),
                                     log=lambda msg: None, progress=False)
                    rows.append({"pad": pad, "pool": pool, "seed": seed, "seconds": time.perf_counter() - t,
                                 **{k: m[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy")}})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"GPT-2 width {args.width}, {args.layers} layers, random init, {args.epochs} epochs, seeds {args.seeds}")
    print(f"{'pad':<18}{'pool':<11}{'test acc (mean)':>16}{'per seed':>26}{'seconds':>9}")
    for pad in ("dataset", "longest_in_batch"):
        for pool in ("last", "last_real"):
            sel = [r for r in rows if r["pad"] == pad and r["pool"] == pool]
            accs = [r["test_accuracy"] * 100 for r in sel]
            print(f"{pad:<18}{pool:<11}{sum(accs) / len(accs):>15.2f}%{' '.join(f'{a:.2f}' for a in accs):>26}"
                  f"{sum(r['seconds'] for r in sel) / len(sel):>9.1f}")


if __name__ == "__main__":
    main()
