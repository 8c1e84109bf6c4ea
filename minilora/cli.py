"""The `minilora` command line. Library modules never print; this one does."""

import argparse
import json
import sys


def cmd_gradcheck(args):
    from .gradcheck import format_table, run_gradchecks

    results = run_gradchecks(device=args.device, seed=args.seed)
    passed = all(r.passed for r in results)
    if args.json:
        print(json.dumps({"passed": passed, "checks": [r.to_dict() for r in results]}, indent=2))
    else:
        print(format_table(results))
        print(f"\n{sum(r.passed for r in results)}/{len(results)} checks passed"
              f" (float64, central differences, h=1e-5)")
    return 0 if passed else 1


def cmd_finetune(args):
    from .finetune import FinetuneOptions, run_finetune

    opts = FinetuneOptions(
        model=args.model, data=args.data, recipe=args.recipe, rank=args.rank, alpha=args.alpha,
        scaling=args.scaling, targets=args.targets, lr=args.lr, epochs=args.epochs,
        batch_size=args.batch_size, eval_freq=args.eval_freq, eval_iter=args.eval_iter, pad=args.pad,
        pool=args.pool, seed=args.seed, device=args.device, dtype=args.dtype,
        output_dir=args.output_dir, offline=args.offline or None, resume=args.resume)
    run_finetune(opts, log=lambda msg: print(msg, flush=True))
    return 0


def _load_classifier(args):
    """The base model named by --model (or the adapter's config) with the adapter loaded."""
    from .adapters import load_adapter, read_adapter
    from .model import GPTModel

    config, _ = read_adapter(args.adapter)
    name = args.model or config.get("base_model") or "gpt2-small"
    model = GPTModel.from_pretrained(name, dtype=args.dtype, device=args.device, offline=args.offline or None)
    config = load_adapter(model, args.adapter)
    return model.eval(), config


def cmd_evaluate(args):
    from .data import load_sms_spam, load_text_label_file, make_loaders
    from .train import evaluate

    model, config = _load_classifier(args)
    data = load_text_label_file(args.data) if args.data else load_sms_spam(offline=args.offline or None)
    loaders = dict(zip(("train", "val", "test"), make_loaders(data, args.batch_size, pad_to=args.pad)))
    results = {}
    for split in args.split:
        loss, acc = evaluate(model, loaders[split].epoch_batches(0), pool=args.pool)
        results[split] = {"loss": loss, "accuracy": acc, "examples": len(getattr(data, split))}
        if not args.json:
            print(f"{split:>5}: accuracy {acc * 100:.2f}%  loss {loss:.4f}  ({len(getattr(data, split))} examples)")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_classify(args):
    import numpy as np

    from .backend import to_numpy
    from .tokenizer import END_OF_TEXT_ID, get_tokenizer

    model, config = _load_classifier(args)
    classes = config.get("class_names") or [str(k) for k in range(model.n_out)]
    max_length = args.max_length or config.get("max_length")
    tok = get_tokenizer(offline=args.offline or None)
    for text in args.text:
        ids = tok.encode_ordinary(text)[: model.cfg.context_length]
        real = max(len(ids), 1)
        if max_length and args.pool == "last":  # the book pads to the training length and reads the last position
            ids = ids[:max_length] + [END_OF_TEXT_ID] * (max_length - len(ids))
        idx = np.array([ids or [END_OF_TEXT_ID]])
        pos = np.array([idx.shape[1] - 1 if args.pool == "last" else real - 1])
        logits = to_numpy(model.forward(idx, keep_cache=False, positions=pos))[0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        k = int(p.argmax())
        print(f"{classes[k]}\t{p[k]:.4f}\t{text}")
    return 0


def cmd_generate(args):
    from .generate import generate_text
    from .model import GPTModel
    from .tokenizer import get_tokenizer

    model = GPTModel.from_pretrained(args.model, dtype=args.dtype, device=args.device, offline=args.offline or None)
    tok = get_tokenizer(offline=args.offline or None)
    print(generate_text(model, tok, args.prompt, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed))
    return 0


def cmd_bench_compare(args):
    from .bench_compare import explain, format_table, run_compare

    log = None if args.json else (lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True))
    report = run_compare(args.model, args.batch_size, args.seq, args.device, args.dtype, repeats=args.repeats,
                         timing=not args.no_timing, floor=not args.no_floor, rss=not args.no_rss, log=log)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    r = report
    print(f"LoRA against full fine-tuning, {r['model']} shape (random weights), 2-class head, AdamW, "
          f"batch {r['batch']} x {r['seq']} tokens, {r['dtype']}, {r['device']} "
          f"({r['batch_shards']} shard(s)); load average {r['loadavg_before']} -> {r['loadavg_after']}")
    print("\n".join(format_table(r)))
    print()
    print("\n".join(explain(r)))
    return 0


def cmd_bench(args):
    from .bench import memory_by_batch, peak_rss, run_benchmark

    if args.compare:
        return cmd_bench_compare(args)
    report = run_benchmark(args.model, args.batch_size, args.seq, args.rank, args.device, args.dtype,
                           repeats=args.repeats, generation=not args.no_generation, torch=not args.no_torch)
    if args.memory:
        report["memory_by_batch"] = memory_by_batch(args.model, seq=args.seq, rank=args.rank, device=args.device)
        if report["device"] == "cpu":
            report["peak_rss_bytes"] = peak_rss("minilora", args.model, args.batch_size, args.seq, args.rank)
            if report.get("torch"):
                report["torch_peak_rss_bytes"] = peak_rss("torch", args.model, args.batch_size, args.seq, args.rank)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    r = report
    print(f"LoRA training step, {r['model']} (random weights), rank {r['rank']} on every linear, 2-class head, "
          f"AdamW, batch {r['batch']} x {r['seq']} tokens, {r['dtype']}, {r['device']}")
    if r["device"] == "cpu":
        print(f"  {r['cpu_threads']} CPU threads; the batch runs as {r['batch_shards']} shard(s) side by side")
    print(f"  step (median):        {r['step_seconds']:.3f} s   ({r['tokens_per_second']:.0f} tokens/s)")
    print(f"  matmul floor:         {r['matmul_floor_seconds']:.3f} s   step / floor = {r['step_over_floor']:.2f}")
    if r.get("torch"):
        print(f"  PyTorch {r['torch']['torch_version']} eager: {r['torch']['torch_step_seconds']:.3f} s   "
              f"step / torch = {r['step_over_torch']:.2f}")
    print(f"  evaluation batch:     {r['eval_batch_seconds']:.3f} s; whole appendix E run (5 epochs, book "
          f"padding) projected at {r['appendix_e_projected_seconds'] / 60:.1f} min")
    print(f"  step peak allocation: {r['step_peak_bytes'] / 2**20:.0f} MiB beyond the parameters")
    if "peak_rss_bytes" in r:
        torch_rss = f"   (PyTorch {r['torch_peak_rss_bytes'] / 2**30:.2f} GiB)" if "torch_peak_rss_bytes" in r else ""
        print(f"  peak RSS, fresh process: {r['peak_rss_bytes'] / 2**30:.2f} GiB{torch_rss}")
    for row in r.get("memory_by_batch", []):
        print(f"    batch {row['batch']:>2}: step peak {row['step_peak_bytes'] / 2**20:8.0f} MiB")
    if "generate_tokens_per_second" in r:
        print(f"  greedy generation:    {r['generate_tokens_per_second']:.1f} tokens/s with the KV cache, "
              f"{r['generate_tokens_per_second_no_kv_cache']:.1f} without")
    print("  time by layer function (one step; mean over the parallel shards):")
    for name, sec in list(r.get("breakdown_seconds", {}).items())[:12]:
        print(f"    {name:<24} {sec:7.3f} s")
    return 0


def _common(p, model_default="gpt2-small"):
    p.add_argument("--model", default=model_default,
                   help="preset name (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl; downloaded and cached), "
                        "a model.safetensors file, or a folder with model.safetensors + config.json")
    p.add_argument("--device", default=None, help="cpu or cuda (default: $MINILORA_DEVICE or cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--offline", action="store_true", help="never touch the network (also MINILORA_OFFLINE=1)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="minilora",
        description="GPT-2 with LoRA fine-tuning in NumPy/CuPy, every backward pass by hand.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("finetune", help="the appendix E job: LoRA spam classifier on GPT-2",
                       description="Fine-tune GPT-2 with LoRA as a classifier (appendix E of 'Build a Large "
                                   "Language Model (From Scratch)'); defaults reproduce the book's current notebook.")
    _common(p)
    p.add_argument("--data", default=None, help="a CSV/TSV of text,label rows (default: the SMS Spam Collection)")
    p.add_argument("--recipe", default="notebook", choices=["notebook", "print"],
                   help="notebook: scaling alpha/r, lr 8e-4 (default); print: scaling alpha, lr 5e-5")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--scaling", default=None, choices=["alpha_over_r", "alpha", "rslora"],
                   help="LoRA scaling (default: the recipe's)")
    p.add_argument("--targets", default="all",
                   help="all, attention, or comma-separated names/patterns (e.g. c_attn.q,c_attn.v,out_head)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-freq", type=int, default=50, help="evaluate losses every N steps")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation")
    p.add_argument("--pad", default="dataset", choices=["dataset", "longest_in_batch"],
                   help="pad to the longest training text (the book) or per batch")
    p.add_argument("--pool", default="last", choices=["last", "last_real"],
                   help="classify from the last position (the book) or the last real token")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--output-dir", default="runs/appendix-e", help="run folder (default runs/appendix-e)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    p.set_defaults(func=cmd_finetune)

    for name, helptext in (("evaluate", "accuracy of a trained adapter on data splits"),
                           ("classify", "classify texts with a trained adapter (prints class and probability)")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        _common(p, model_default=None)
        p.add_argument("--adapter", default="runs/appendix-e/adapter", help="adapter folder")
        p.add_argument("--pool", default="last", choices=["last", "last_real"])
        if name == "evaluate":
            p.add_argument("--data", default=None, help="CSV/TSV of text,label rows (default: SMS spam)")
            p.add_argument("--split", nargs="+", default=["test"], choices=["train", "val", "test"])
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--pad", default="dataset", choices=["dataset", "longest_in_batch"])
            p.add_argument("--json", action="store_true")
            p.set_defaults(func=cmd_evaluate)
        else:
            p.add_argument("text", nargs="+", help="the text(s) to classify")
            p.add_argument("--max-length", type=int, default=None,
                           help="pad to this length as in training (default: the adapter's training length)")
            p.set_defaults(func=cmd_classify)

    p = sub.add_parser("generate", help="continue a prompt with a pretrained GPT-2 (load sanity check)")
    _common(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=15)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="time a LoRA training step against its matmul floor (and PyTorch)",
                       description="Benchmark the appendix E LoRA training step (random weights): median step "
                                   "time, the matmul floor measured in the same process, PyTorch eager when it "
                                   "is installed, peak memory, a per-layer breakdown and generation speed.")
    p.add_argument("--model", default="gpt2-small", help="preset whose shape to use (random weights)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: $MINILORA_DEVICE or cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=120)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timed steps after 2 warm-up steps")
    p.add_argument("--memory", action="store_true", help="also peak memory over batch 1..16 and peak RSS")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--no-generation", action="store_true", help="skip the generation timing")
    p.add_argument("--json", action="store_true")
    p.add_argument("--compare", action="store_true",
                   help="LoRA against full fine-tuning: memory, optimizer state, gradients, checkpoint size and "
                        "step time of full fine-tuning, LoRA r=16 on every linear, r=4 on W_q/W_v, r=8 on "
                        "W_q/W_k/W_v/W_o (--model also takes 'tiny', a shape for quick checks)")
    p.add_argument("--no-timing", action="store_true", help="--compare: memory and sizes only")
    p.add_argument("--no-floor", action="store_true", help="--compare: skip the matmul floors")
    p.add_argument("--no-rss", action="store_true", help="--compare: skip the fresh-process peak RSS")
    p.add_argument("--out", default=None, help="--compare: also write the JSON report to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gradcheck", help="check every backward pass against finite differences (offline)",
                       description="Check every layer's backward and the whole model (with and without "
                                   "LoRA) in float64 against central finite differences.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--device", default=None, help="cpu or cuda (default: $MINILORA_DEVICE or cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        # every expected failure (bad input, download, checkpoint, data) ends with one clear line
        print(f"minilora {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
