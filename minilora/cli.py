"""The `minilora` command line. Library modules never print; this one does.

Every expected failure (bad input, a missing or broken file, no network, a full disk)
ends with one line on stderr naming the problem and exit status 1 (2 for a malformed
command line, as argparse does); SIGTERM is handled like Ctrl-C.
"""

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
from .errors import OptionError
from .schema import strict_json


def _int_at_least(least):
    """An argparse type: an integer >= least (argparse names the option in its error)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value}")
        return value
    return parse


def _float_at_least(least):
    """An argparse type: a finite number >= least."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and value >= least):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {least:g}, got {text}")
        return value
    return parse


def cmd_gradcheck(args):
    from .gradcheck import format_table, load_layers, run_gradchecks

    only = [name for arg in args.only or [] for name in arg.split(",") if name]
    fns = load_layers(args.module) if args.module else None
    results = run_gradchecks(device=args.device, seed=args.seed, only=only, fns=fns)
    passed = all(r.passed for r in results)
    if args.json:
        print(strict_json({"passed": passed, "checks": [r.to_dict() for r in results]}))
    else:
        if args.module:
            print(f"Functions from {args.module}:")
        print(format_table(results))
        against = "central differences, h=1e-5"
        if args.module:  # a learner's model-level exercises are compared with the project's own code
            against = f"layers: {against}; model exercises: minilora.reference; AdamW: ml.AdamW"
        print(f"\n{sum(r.passed for r in results)}/{len(results)} checks passed (float64, {against})")
    return 0 if passed else 1


def _job_options(cls, args):
    """A JobOptions subclass from the parsed arguments: each field from the option of its
    name (the parser defines them from the same fields; see _add_job_options)."""
    from dataclasses import fields

    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values["offline"] = args.offline or None  # None: $MINILORA_OFFLINE decides
    return cls(**values)


def cmd_finetune(args):
    from .finetune import FinetuneOptions, run_finetune

    run_finetune(_job_options(FinetuneOptions, args), log=lambda msg: print(msg, flush=True))
    return 0


def cmd_instruct(args):
    from .instruct import InstructOptions, run_instruct

    run_instruct(_job_options(InstructOptions, args), log=lambda msg: print(msg, flush=True))
    return 0


def _read_adapter_settings(args):
    """(adapter config, settings) of a classifier's adapter: how it was trained to be used
    (pool, pad, batching, max_length; its own record, else the book's), each overridden by
    its option. A language model's adapter is refused: its "classes" would be the
    vocabulary's token ids (and every accuracy 0)."""
    from .adapters import read_adapter

    config, _ = read_adapter(args.adapter)
    if config.get("num_classes") is None:
        raise OptionError(f"--adapter {args.adapter}: a language model's adapter (no classifier head); use "
                          f"minilora generate --adapter {args.adapter}")
    settings = {"pool": args.pool or config.get("pool") or "last",
                "pad": getattr(args, "pad", None) or config.get("pad") or "dataset",
                "batching": getattr(args, "batching", None) or config.get("batching") or "shuffled",
                "max_length": args.max_length or config.get("max_length")}
    return config, settings


@contextlib.contextmanager
def _overflow_unannounced():
    """Hide NumPy's "overflow / invalid value encountered" warnings, where the caller checks
    the result for NaN and infinities and says what they mean (NumPy's words name no file).
    A warnings filter rather than np.errstate, which holds for one thread only and would
    miss the threads that run the batch's shards."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(overflow|invalid value) encountered", RuntimeWarning)
        yield


def read_base_model(args, config, read):
    """read(name) for the base model named by --model, else by the adapter's config, else
    gpt2-small; a failure with the adapter's name says where that name came from."""
    name = args.model or config.get("base_model") or "gpt2-small"
    try:
        return read(name)
    except ValueError as e:
        if args.model:
            raise
        raise ValueError(f"{e} (the base model recorded in {args.adapter}; pass --model to say where it is)") from e


def _load_classifier(args, config):
    """The base model named by --model (or the adapter's config) with the adapter loaded."""
    from .adapters import load_adapter
    from .model import GPTModel

    model = read_base_model(args, config, lambda name: GPTModel.from_pretrained(
        name, dtype=args.dtype, device=args.device, offline=args.offline or None))
    load_adapter(model, args.adapter)
    return model.eval()


def _context_length(args, config, settings):
    """The base model's context length, from its config alone (no weights read), with the
    max_length texts are padded to checked against it: before the model loads, rather than
    a shape error from inside it afterwards."""
    from .weights import read_config

    cfg = read_base_model(args, config, lambda name: read_config(name, offline=args.offline or None))
    context = cfg.context_length
    max_length = settings["max_length"]
    if max_length is None or max_length <= context:
        return context
    if args.max_length:
        raise OptionError(f"--max-length {max_length} is longer than the model's context length ({context} tokens)")
    # the adapter's own max_length, with a --model of a shorter context than the one it was trained on
    raise OptionError(f"the adapter {args.adapter} pads texts to {max_length} tokens, more than the model's "
                      f"context length ({context} tokens); pass --max-length {context} or less")


def _match_labels(data, config, n_out):
    """Give the data's labels the adapter's class ids, or refuse data with other labels.

    The data's ids come from its own sorted label names; the head's from the training
    data's. A subset of the adapter's classes is fine (e.g. a file of spam only)."""
    import numpy as np

    known = config.get("class_names")
    if known is None:  # an adapter saved without names: only the count can be checked
        if data.num_classes > n_out:
            raise ValueError(f"{data.source} has {data.num_classes} classes {list(data.class_names)}, the "
                             f"adapter's head has {n_out}")
        return
    unknown = [c for c in data.class_names if c not in known]
    if unknown:
        raise ValueError(f"{data.source} has labels the adapter was not trained on: {unknown}; the "
                         f"adapter's classes are {known}, the data's {list(data.class_names)}")
    ids = np.array([known.index(c) for c in data.class_names], dtype=np.int64)
    for split in (data.train, data.val, data.test):
        split.labels = ids[split.labels]


def cmd_evaluate(args):
    from .data import BatchLoader, load_sms_spam, load_text_label_file
    from .tasks import evaluate

    config, settings = _read_adapter_settings(args)
    # the data first: it is quicker to load than the model and more often wrong
    kwargs = dict(max_length=settings["max_length"], offline=args.offline or None,
                  context_length=_context_length(args, config, settings))
    data = load_text_label_file(args.data, **kwargs) if args.data else load_sms_spam(**kwargs)
    model = _load_classifier(args, config)
    _match_labels(data, config, model.n_out)
    results = {}
    for name in args.split:
        split = getattr(data, name)
        # every example: no shuffling and no drop_last, unlike training; in order, or grouped
        # by length as the training run's evaluation was (data.make_loaders says why)
        loader = BatchLoader(split, args.batch_size, pad_to=settings["pad"], batching=settings["batching"])
        with _overflow_unannounced():
            loss, acc = evaluate(model, loader.epoch_batches(0), pool=settings["pool"])
        if not math.isfinite(loss):  # the accuracy of NaN scores (argmax picks the first NaN) means nothing
            warnings.warn(f"the {name} loss is {loss}: the adapter {args.adapter} or the model produced "
                          f"non-finite scores, so the accuracy is meaningless")
        results[name] = {"loss": loss, "accuracy": acc, "examples": len(split)}
        if not args.json:
            print(f"{name:>5}: accuracy {acc * 100:.2f}%  loss {loss:.4f}  ({len(split)} examples)")
    if args.json:
        print(strict_json(results))
    return 0


def cmd_classify(args):
    import numpy as np

    from .backend import to_numpy
    from .errors import MiniloraError
    from .tokenizer import END_OF_TEXT_ID, encode_text, get_tokenizer

    config, settings = _read_adapter_settings(args)
    context = _context_length(args, config, settings)
    tok = get_tokenizer(offline=args.offline or None)
    model = _load_classifier(args, config)
    classes = config.get("class_names") or [str(k) for k in range(model.n_out)]
    max_length, pool = settings["max_length"], settings["pool"]
    # the book pads every text to the training length and reads the last position
    pad_to_max = max_length and pool == "last" and settings["pad"] == "dataset"
    for number, text in enumerate(args.text, start=1):
        ids = encode_text(tok, text)[: min(max_length or context, context)]
        real = max(len(ids), 1)
        if pad_to_max:
            ids = ids + [END_OF_TEXT_ID] * (max_length - len(ids))
        idx = np.array([ids or [END_OF_TEXT_ID]])
        pos = np.array([idx.shape[1] - 1 if pool == "last" else real - 1])
        with _overflow_unannounced():
            logits = to_numpy(model.forward(idx, keep_cache=False, positions=pos))[0].astype(np.float64)
        if not np.isfinite(logits).all():  # a NaN would print as a class with probability nan
            found = ", ".join(sorted({str(v) for v in logits[~np.isfinite(logits)]}))
            raise MiniloraError(f"the adapter {args.adapter} or the model produced non-finite scores ({found}) "
                                f"for text {number} ({text[:40]!r}): no class can be read from them")
        p = np.exp(logits - logits.max())
        p /= p.sum()
        k = int(p.argmax())
        print(f"{classes[k]}\t{p[k]:.4f}\t{text}")
    return 0


def cmd_generate(args):
    from .generate import generate_text
    from .instruct import ANSWER_MAX_NEW_TOKENS, answer
    from .model import GPTModel
    from .tokenizer import get_tokenizer

    if (args.prompt is None) == (args.instruction is None):
        raise OptionError("give a prompt or --instruction (one of them)")
    if args.input is not None and args.instruction is None:
        raise OptionError("--input goes with --instruction")
    config = _read_language_adapter(args.adapter) if args.adapter else {}
    tok = get_tokenizer(offline=args.offline or None)  # the small file first: a missing one is reported sooner
    name = args.model or config.get("base_model") or "gpt2-small"
    model = GPTModel.from_pretrained(name, dtype=args.dtype, device=args.device, offline=args.offline or None)
    if args.adapter:
        from .adapters import load_adapter
        from .lora import merge_lora

        load_adapter(model, args.adapter)
        merge_lora(model)  # inference only: the merged weights run no adapter work at all
    if args.instruction is not None:  # the Alpaca prompt; print only the answer, as the book extracts it
        entry = {"instruction": args.instruction, "input": args.input or "", "output": ""}
        print(answer(model, tok, entry, args.max_new_tokens or ANSWER_MAX_NEW_TOKENS))
    else:
        print(generate_text(model, tok, args.prompt, args.max_new_tokens or 15, temperature=args.temperature,
                            top_k=args.top_k, seed=args.seed))
    return 0


def _read_language_adapter(folder):
    """The config of a language model's adapter (what `minilora instruct` saves); a
    classifier's adapter is refused here, since its head answers classes, not tokens."""
    from .adapters import read_adapter

    config, _ = read_adapter(folder)
    if config.get("num_classes") is not None:
        raise OptionError(f"--adapter {folder}: a {config['num_classes']}-class classifier's adapter; "
                          f"use minilora classify with it")
    return config


def cmd_bench_compare(args):
    from .bench_compare import explain, format_table, run_compare

    log = None if args.json else (lambda msg: print(f"  ... {msg}", file=sys.stderr, flush=True))
    report = run_compare(args.model, args.batch_size, args.seq, args.device, args.dtype, repeats=args.repeats,
                         timing=not args.no_timing, floor=not args.no_floor, rss=not args.no_rss, log=log)
    if args.out:
        from .files import write_text

        write_text(args.out, strict_json(report))
    if args.json:
        print(strict_json(report))
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
                           repeats=args.repeats, generation=not args.no_generation, torch=not args.no_torch,
                           ops=not args.no_ops)
    if args.memory:
        report["memory_by_batch"] = memory_by_batch(args.model, seq=args.seq, rank=args.rank, device=args.device)
        if report["device"] == "cpu":
            report["peak_rss_bytes"] = peak_rss("minilora", args.model, args.batch_size, args.seq, args.rank)
            if report.get("torch"):
                report["torch_peak_rss_bytes"] = peak_rss("torch", args.model, args.batch_size, args.seq, args.rank)
    if args.json:
        print(strict_json(report))
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
              f"step / torch = {r['step_over_torch']:.2f}   (alternated with the step, {r['torch']['torch_device']})")
    print(f"  evaluation batch:     {r['eval_batch_seconds']:.3f} s; whole appendix E run (5 epochs, book "
          f"padding) projected at {r['appendix_e_projected_seconds'] / 60:.1f} min")
    print(f"  dispatch step:        {r['dispatch_step_seconds']:.3f} s   (the same step at width "
          f"{r['dispatch_width']}, {r['dispatch_heads']} heads: its fixed cost)")
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
    if "op_count" in r:
        ops = r["op_count"]
        print(f"  array operations per step: {ops['total']:,} (the kernels a GPU would launch: the batch as one "
              f"shard, AdamW on whole buffers; counted in {ops['seconds']:.1f} s)")
        print("    by kind: " + ", ".join(f"{kind} {n:,}" for kind, n in ops["by_kind"].items()))
        print("    by layer function (model glue: model.py outside a layer function):")
        for name, n in ops["by_function"].items():
            print(f"    {name:<24} {n:7,}")
    return 0


def _common(p, model_default="gpt2-small"):
    from .backend import DTYPES

    p.add_argument("--model", default=model_default,
                   help="preset name (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl; downloaded and cached), "
                        "a model.safetensors file, or a folder with model.safetensors + config.json")
    p.add_argument("--device", default=None, help="cpu or cuda (default: $MINILORA_DEVICE or cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--offline", action="store_true", help="never touch the network (also MINILORA_OFFLINE=1)")


def _add_job_options(p, cls, help_for=None):
    """The options every fine-tuning job shares (minilora.train.JobOptions), with the
    defaults and choices of the job's options class `cls`; help_for: {field: help} where a
    job says more. The values are checked when the options object is made (exit 1, naming
    the option), not here."""
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(cls)}
    help_for = help_for or {}

    def add(name, **kwargs):
        p.add_argument("--" + name.replace("_", "-"), default=defaults[name], help=help_for.get(name),
                       choices=cls.CHOICES.get(name), **kwargs)

    _common(p, model_default=defaults["model"])
    add("rank", type=int)
    add("alpha", type=float)
    add("scaling")
    p.add_argument("--targets", default=defaults["targets"], help=help_for.get(
        "targets", "all, attention, or comma-separated names/patterns (e.g. c_attn.q,c_attn.v,out_head)"))
    add("lr", type=float)
    add("weight_decay", type=float)
    add("epochs", type=int)
    add("batch_size", type=int)
    add("eval_freq", type=int)
    add("eval_iter", type=int)
    add("max_length", type=int)
    add("seed", type=int)
    add("output_dir")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")


def build_parser():
    from .backend import DTYPES
    from .data import BATCHINGS, PAD_MODES, SPLITS
    from .finetune import FinetuneOptions
    from .instruct import InstructOptions
    from .tasks import POOLS

    parser = argparse.ArgumentParser(
        prog="minilora",
        description="GPT-2 with LoRA fine-tuning in NumPy/CuPy, every backward pass by hand.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("finetune", help="the appendix E job: LoRA spam classifier on GPT-2",
                       description="Fine-tune GPT-2 with LoRA as a classifier (appendix E of 'Build a Large "
                                   "Language Model (From Scratch)'); defaults reproduce the book's current notebook.")
    _add_job_options(p, FinetuneOptions, help_for={
        "scaling": "LoRA scaling (default: the recipe's)",
        "lr": "learning rate (default: the recipe's)",
        "eval_freq": "evaluate losses every N steps",
        "eval_iter": "batches per evaluation",
        "max_length": "pad and truncate texts to this many tokens (default: the longest training text, "
                      "at most the model's context length; longer texts are truncated and counted)",
        "output_dir": "run folder (default runs/appendix-e)"})
    p.add_argument("--data", default=None, help="a CSV/TSV of text,label rows (default: the SMS Spam Collection)")
    p.add_argument("--recipe", default="notebook", choices=FinetuneOptions.CHOICES["recipe"],
                   help="notebook: scaling alpha/r, lr 8e-4 (default); print: scaling alpha, lr 5e-5")
    p.add_argument("--pad", default=None, choices=PAD_MODES,
                   help="pad to the longest training text (the book; the default) or per batch "
                        "(the default with --batching by_length)")
    p.add_argument("--batching", default="shuffled", choices=BATCHINGS,
                   help="shuffled (the book) or by_length: texts of similar length batched together and "
                        "padded per batch (about 1.7x fewer tokens than --pad longest_in_batch on SMS), "
                        "the training batches in a new order every epoch, evaluation batches grouped too")
    p.add_argument("--pool", default="last", choices=POOLS,
                   help="classify from the last position (the book) or the last real token")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("instruct", help="the chapter 7 job: instruction fine-tuning with LoRA, and its answers",
                       description="Instruction fine-tuning of GPT-2 (chapter 7 of 'Build a Large Language Model "
                                   "(From Scratch)'; LoRA on every linear and the tied LM head, its exercise 7.4), "
                                   "then greedy answers to the test entries in instruction-data-with-response.json.")
    _add_job_options(p, InstructOptions, help_for={
        "scaling": "LoRA scaling (default alpha, exercise 7.4's: no /r)",
        "eval_freq": "evaluate losses every N steps",
        "eval_iter": "batches per evaluation",
        "max_length": "the book's allowed_max_length: truncate inputs and targets to this many tokens "
                      "(default 1024, GPT-2's context; texts truncated are counted)",
        "output_dir": "run folder (default runs/chapter-7)"})
    p.add_argument("--data", default=None, help="a JSON list (or JSONL) of {instruction, input, output} objects "
                                                "(default: the book's instruction-data.json, downloaded and cached)")
    p.add_argument("--mask-instructions", action="store_true",
                   help="exercise 7.2: no loss on the prompt's tokens, only on the response's")
    p.add_argument("--full", action="store_true",
                   help="train every parameter (the chapter's main run) instead of LoRA; minilora keeps GPT-2's "
                        "tied head")
    p.set_defaults(func=cmd_instruct)

    for name, helptext in (("evaluate", "accuracy of a trained adapter on data splits"),
                           ("classify", "classify texts with a trained adapter (prints class and probability)")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        _common(p, model_default=None)
        p.add_argument("--adapter", default="runs/appendix-e/adapter", help="adapter folder")
        p.add_argument("--pool", default=None, choices=POOLS,
                       help="where to read the logits (default: as the adapter was trained)")
        p.add_argument("--max-length", type=_int_at_least(1), default=None,
                       help="pad / truncate texts to this many tokens (default: the adapter's training length)")
        if name == "evaluate":
            p.add_argument("--data", default=None, help="CSV/TSV of text,label rows (default: SMS spam)")
            p.add_argument("--split", nargs="+", default=["test"], choices=SPLITS)
            p.add_argument("--batch-size", type=_int_at_least(1), default=8)
            p.add_argument("--pad", default=None, choices=PAD_MODES,
                           help="padding (default: as the adapter was trained)")
            p.add_argument("--batching", default=None, choices=BATCHINGS,
                           help="in order (shuffled training) or grouped by length (default: as the adapter "
                                "was trained)")
            p.add_argument("--json", action="store_true")
            p.set_defaults(func=cmd_evaluate)
        else:
            p.add_argument("text", nargs="+", help="the text(s) to classify")
            p.set_defaults(func=cmd_classify)

    p = sub.add_parser("generate", help="continue a prompt with GPT-2, or answer an instruction with an adapter",
                       description="Continue a prompt (a sanity check of the pretrained weights), or with "
                                   "--instruction answer it in the Alpaca prompt of chapter 7 and print only the "
                                   "answer; --adapter applies a language model's adapter (minilora instruct's), "
                                   "merged for inference.")
    _common(p, model_default=None)
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--adapter", default=None, help="a language model's adapter folder (e.g. runs/chapter-7/adapter); "
                                                   "its base model unless --model is given")
    p.add_argument("--instruction", default=None, help="answer this instruction (the book's prompt format)")
    p.add_argument("--input", default=None, help="the instruction's input, if it has one")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=None,
                   help="default 15 for a prompt, 256 for an instruction (the book's)")
    p.add_argument("--temperature", type=_float_at_least(0.0), default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=_int_at_least(1), default=None)
    p.add_argument("--seed", type=_int_at_least(0), default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="time a LoRA training step against its matmul floor (and PyTorch)",
                       description="Benchmark the appendix E LoRA training step (random weights): median step "
                                   "time, the matmul floor measured in the same process, PyTorch eager when it "
                                   "is installed, peak memory, a per-layer breakdown and generation speed.")
    p.add_argument("--model", default="gpt2-small", help="preset whose shape to use (random weights)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: $MINILORA_DEVICE or cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--seq", type=_int_at_least(1), default=120)
    p.add_argument("--rank", type=_int_at_least(1), default=None, help="LoRA rank (default 16; not with --compare, "
                                                                       "which sets its own)")
    p.add_argument("--repeats", type=_int_at_least(1), default=5, help="timed steps after 2 warm-up steps")
    p.add_argument("--memory", action="store_true", help="also peak memory over batch 1..16 and peak RSS")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--no-generation", action="store_true", help="skip the generation timing")
    p.add_argument("--no-ops", action="store_true", help="skip counting the step's array operations (two more "
                                                         "steps, run on one core)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--compare", action="store_true",
                   help="LoRA against full fine-tuning: memory, optimizer state, gradients, checkpoint size and "
                        "step time of full fine-tuning, LoRA r=16 on every linear, r=4 on W_q/W_v, r=8 on "
                        "W_q/W_k/W_v/W_o (--model also takes 'tiny', a shape for quick checks)")
    p.add_argument("--no-timing", action="store_true", help="--compare: memory and sizes only")
    p.add_argument("--no-floor", action="store_true", help="--compare: skip the matmul floors")
    p.add_argument("--no-rss", action="store_true", help="--compare: skip the fresh-process peak RSS")
    p.add_argument("--out", default=None, help="--compare: also write the JSON report to this file")
    p.set_defaults(func=cmd_bench, parser=p)  # the parser: its usage and name in _check_bench_options' errors

    p = sub.add_parser("gradcheck", help="check every backward pass against finite differences (offline)",
                       description="Check every layer's backward and the whole model (with and without "
                                   "LoRA) in float64 against central finite differences.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--device", default=None, help="cpu or cuda (default: $MINILORA_DEVICE or cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this check (repeatable or comma-separated; a layer name also runs its "
                        "variants, e.g. attention -> attention_dropout, attention_one_query)")
    p.add_argument("--module", metavar="FILE",
                   help="check the *_forward/*_backward functions of this Python file instead of minilora's "
                        "(e.g. examples/exercises/layers.py); reports each passed / failed / not implemented / needs NAME (it calls a function still to write)")
    p.set_defaults(func=cmd_gradcheck)

    from .export import add_export_parser  # `minilora export`: a PEFT folder or a merged checkpoint

    add_export_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, job schedulers and containers send), raised in the main
    thread so that it takes Ctrl-C's path: the training loop saves its checkpoint."""


def _on_sigterm(signum, frame):
    raise Terminated


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # a warning is for the user: one line, without the library's file and source line
    print(f"minilora: warning: {message}", file=sys.stderr)


def _where(path, args):
    """Which option or setting chose `path` (for a write error), or ''."""
    from .cache import cache_dir

    path = Path(path).resolve()
    for option, folder in (("--output-dir", getattr(args, "output_dir", None)), ("$MINILORA_HOME", cache_dir())):
        if folder is not None and path.is_relative_to(Path(folder).resolve()):
            return f" (check {option} {folder})"
    return ""


# bench options that only one mode reads: given to the other, they would be silently ignored
BENCH_ONLY = ("--rank", "--memory", "--no-torch", "--no-generation", "--no-ops")
COMPARE_ONLY = ("--no-timing", "--no-floor", "--no-rss", "--out")


def _check_bench_options(parser, args):
    """Refuse (exit 2, as argparse does) a bench option its mode ignores, and an --out that
    cannot be written, before the benchmark runs for minutes."""
    ignored = [o for o in (BENCH_ONLY if args.compare else COMPARE_ONLY)
               if getattr(args, o[2:].replace("-", "_")) not in (None, False)]  # given on the command line
    if ignored and args.compare:
        parser.error(f"{', '.join(ignored)} cannot be used with --compare (it sets its own ranks and "
                     f"runs no PyTorch comparison, memory sweep or generation timing)")
    if ignored:
        parser.error(f"{', '.join(ignored)} only apply to --compare")
    if args.rank is None:
        args.rank = 16
    if args.out is not None:
        out = Path(args.out)
        folder = out.parent
        if out.is_dir():
            parser.error(f"argument --out: {out} is a folder; give a file name")
        if not folder.is_dir():
            parser.error(f"argument --out: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            parser.error(f"argument --out: the folder {folder} is not writable")


def _user_errors():
    """What a command reports as one line (anything else is a bug and keeps its traceback):
    minilora's own errors; OSError (a file that cannot be read, a folder that cannot be
    made); and ValueError, which lora.py, model.py, config.py and weights.py still raise
    for bad input, until those derive from MiniloraError."""
    from .errors import MiniloraError

    return (MiniloraError, ValueError, OSError)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command == "bench":
        _check_bench_options(args.parser, args)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals need it
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except KeyboardInterrupt as e:
        print("terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except _user_errors() as e:
        # every expected failure (bad input, download, checkpoint, data, a full disk) ends with one clear line
        from .files import WriteError

        where = _where(e.path, args) if isinstance(e, WriteError) else ""
        print(f"minilora {args.command}: error: {e}{where}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
