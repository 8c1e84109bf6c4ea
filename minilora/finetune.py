"""The appendix E job end to end: data, pretrained GPT-2, 2-class head, LoRA, AdamW,
training, final accuracies, and a run folder.

Run folder layout (``output_dir``):

    run_config.json   the options of the run (a resumed run must use the same ones, but
                      may ask for more epochs)
    checkpoint/       the latest checkpoint (adapter + optimizer + loop state)
    adapter/          the trained adapter, loadable with minilora.load_adapter; it records
                      its base model, class names, max length, padding, batching and pooling
    history.csv       one row per step: loss, lr, and the evaluations where made
    metrics.json      dataset sizes, parameter counts, final accuracies, seconds (strict
                      JSON: never NaN)
    loss.png, accuracy.png

Every file is written through minilora.files (whole or not at all).
"""

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .adapters import save_adapter
from .backend import resolve_device
from .data import BATCHINGS, PAD_MODES
from .files import write_text
from .lora import SCALINGS, apply_lora, config_sites, select_targets
from .model import GPTModel
from .optim import AdamW
from .plots import plot_run
from .train import (POOLS, TrainConfig, evaluate, has_checkpoint, load_checkpoint, read_loop_state,
                    train_classifier)
from .weights import read_config

# The book's two published recipes: the current notebook (default) and the print edition.
RECIPES = {
    "notebook": {"scaling": "alpha_over_r", "lr": 8e-4},
    "print": {"scaling": "alpha", "lr": 5e-5},
}


@dataclass
class FinetuneOptions:
    model: str = "gpt2-small"  # preset name, model.safetensors file, or HF-layout folder
    data: str = None  # None: the SMS Spam Collection; else a CSV/TSV of text,label rows
    recipe: str = "notebook"
    rank: int = 16
    alpha: float = 16
    scaling: str = None  # None: the recipe's
    targets: str = "all"
    lr: float = None  # None: the recipe's
    weight_decay: float = 0.1
    epochs: int = 5
    batch_size: int = 8
    eval_freq: int = 50
    eval_iter: int = 5
    pad: str = None  # "dataset" (the book) or "longest_in_batch" (None: the batching's: by_length
    #                  pads per batch, shuffled to the longest training text as the book)
    batching: str = "shuffled"  # "shuffled" (the book) or "by_length": texts of similar length batched
    #                             together, in training (a new order every epoch) and evaluation
    pool: str = "last"  # "last" (the book) or "last_real"
    max_length: int = None  # pad/truncate texts to this many tokens (None: the longest training
    #                         text, at most the model's context length; longer texts are truncated)
    seed: int = 123
    device: str = None
    dtype: str = "float32"
    output_dir: str = "runs/appendix-e"
    offline: bool = None
    resume: bool = False  # continue the run in output_dir from its checkpoint

    def __post_init__(self):
        """Check every option before any work is done (the one place for the finetune
        job): a run that cannot succeed, or would learn nothing, is refused here, with
        the option's name and value, rather than after the data and the model loaded."""
        for name, choices in (("recipe", RECIPES), ("pad", PAD_MODES + (None,)), ("pool", POOLS),
                              ("batching", BATCHINGS), ("dtype", ("float32", "float64"))):
            if getattr(self, name) not in choices:
                shown = sorted(c for c in choices if c is not None)
                raise ValueError(f"{_option(name)} must be one of {shown}, got {getattr(self, name)!r}")
        # grouping by length saves work only when each batch is padded to its own longest text
        if self.batching == "by_length" and self.pad == "dataset":
            raise ValueError("--batching by_length pads each batch to its own longest text: it cannot be "
                             "combined with --pad dataset (every batch padded to the longest training "
                             "text); leave --pad out or use --pad longest_in_batch")
        self.pad = self.pad or ("longest_in_batch" if self.batching == "by_length" else "dataset")
        self.scaling = self.scaling or RECIPES[self.recipe]["scaling"]
        if self.scaling not in SCALINGS:
            raise ValueError(f"--scaling must be one of {list(SCALINGS)}, got {self.scaling!r}")
        self.lr = self.lr if self.lr is not None else RECIPES[self.recipe]["lr"]
        for name, least in (("rank", 1), ("epochs", 1), ("batch_size", 1), ("eval_freq", 1),
                            ("eval_iter", 1), ("seed", 0), ("max_length", 1)):
            value = getattr(self, name)
            if value is None and name == "max_length":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"{_option(name)} must be an integer >= {least}, got {value!r}")
        # alpha 0 scales the adapters to nothing and lr <= 0 learns nothing or climbs the loss:
        # both used to run to the end and save an adapter that had learned nothing
        for name, least, strict in (("alpha", 0, True), ("lr", 0, True), ("weight_decay", 0, False)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float, np.number)) and math.isfinite(value) and (
                value > least if strict else value >= least)
            if not ok:
                raise ValueError(f"{_option(name)} must be a finite number {'>' if strict else '>='} "
                                 f"{least}, got {value!r}")
        if isinstance(self.targets, str) and self.targets not in ("all", "attention"):
            targets = [t.strip() for t in self.targets.split(",") if t.strip()]
            if not targets:
                raise ValueError(f"--targets {self.targets!r} names no layer, so nothing would be "
                                 f"trained: use all, attention, or comma-separated names such as c_attn.q,out_head")
            self.targets = targets

    # what must match for --resume to continue the same run (epochs may grow: more epochs
    # extend a finished run)
    RESUME_KEYS = ("model", "data", "rank", "alpha", "scaling", "targets", "lr", "weight_decay",
                   "batch_size", "eval_freq", "eval_iter", "pad", "batching", "pool", "max_length", "seed",
                   "dtype")
    # what a run folder written before an option existed ran with
    RESUME_DEFAULTS = {"batching": "shuffled"}


def _check_targets(opts, model_cfg):
    """Refuse a --targets that names no layer of the model, from its config alone: the
    model is not built yet. The classifier head (out_head) is added once the data names
    its classes; its width does not change the names, so 0 stands in for it here."""
    try:
        select_targets(config_sites(model_cfg, head_outputs=0), model_cfg.n_layers, opts.targets)
    except ValueError as e:
        shown = opts.targets if isinstance(opts.targets, str) else ",".join(opts.targets)
        raise ValueError(f"--targets {shown!r}: {e}") from None


def _option(field_name):
    """The command-line option of a FinetuneOptions field: batch_size -> --batch-size."""
    return "--" + field_name.replace("_", "-")


def load_data(opts, context_length, log):
    """The data, tokenized and split, and its three loaders, checked against the batch
    size; texts longer than --max-length (default: the model's context) are truncated."""
    from .data import load_sms_spam, load_text_label_file, make_loaders

    if opts.max_length is not None and opts.max_length > context_length:
        raise ValueError(f"--max-length {opts.max_length} is longer than the model's context length "
                         f"({context_length} tokens)")
    kwargs = dict(max_length=opts.max_length, context_length=context_length, offline=opts.offline)
    if opts.data:
        data = load_text_label_file(opts.data, **kwargs)
    else:
        data = load_sms_spam(**kwargs)
    loaders = make_loaders(data, opts.batch_size, seed=opts.seed, pad_to=opts.pad, batching=opts.batching)
    if len(loaders[0]) == 0:  # training drops the last incomplete batch, as the book does
        raise ValueError(f"--batch-size {opts.batch_size} is larger than the {len(data.train)} training "
                         f"examples of {data.source}: not one full training batch; use a --batch-size "
                         f"of at most {len(data.train)}, or more data")
    log(f"Data: {data.source}")
    log(f"  classes {list(data.class_names)}; examples train {len(data.train):,} / val {len(data.val):,} / "
        f"test {len(data.test):,}; max length {data.max_length}; batches "
        f"{len(loaders[0])} / {len(loaders[1])} / {len(loaders[2])} of {opts.batch_size}")
    if opts.pad == "longest_in_batch":
        log(f"  training batches {opts.batching}, padded per batch: {loaders[0].batch_lengths(0).mean():.1f} "
            f"tokens on average (texts: {data.train.lengths.mean():.1f})")
    if data.truncated["train"]:
        why = "--max-length" if opts.max_length else "the model's context length; --max-length sets it"
        log(f"  truncated {data.truncated['train']:,} training text(s) to {data.max_length} tokens ({why})")
    return data, loaders


def build_model(opts, num_classes, log):
    model = GPTModel.from_pretrained(opts.model, dtype=opts.dtype, device=opts.device, offline=opts.offline)
    model.replace_head(num_classes, seed=opts.seed)
    log(f"Model: {opts.model} ({model.cfg.n_layers} layers, width {model.cfg.emb_dim}) on {model.device}, "
        f"{opts.dtype}; {model.num_params():,} parameters with the {num_classes}-class head")
    return model


def run_finetune(opts, log=print, progress=None):
    """Run (or resume) the job; returns the metrics dict. `log` receives the lines to print.

    Everything that can be checked is checked before the long work: the options (when
    `opts` was made), the device, the run folder, the model's configuration (from its
    header, not its weights), the data against the batch size and the context length."""
    resolve_device(opts.device)  # a missing CuPy or GPU is reported before any work is done
    out = Path(opts.output_dir)
    ckpt = out / "checkpoint"
    # the options that depend on the model, from its config alone, before the run folder is touched
    model_cfg = read_config(opts.model, offline=opts.offline)
    if opts.rank > model_cfg.emb_dim:
        raise ValueError(f"--rank {opts.rank} exceeds the width of {opts.model} ({model_cfg.emb_dim})")
    _check_targets(opts, model_cfg)
    resume = _prepare_run_folder(out, opts, log)
    t0 = time.perf_counter()
    data, (train_loader, val_loader, test_loader) = load_data(opts, model_cfg.context_length, log)
    model = build_model(opts, data.num_classes, log)
    opt = AdamW(model, lr=opts.lr, weight_decay=opts.weight_decay)
    if resume:
        state = load_checkpoint(ckpt, model, opt)
        log(f"Resuming from {ckpt}: epoch {state.epoch + 1}, step {state.step}")
        state.done = state.epoch >= opts.epochs  # more --epochs than before extend a finished run
    else:
        apply_lora(model, rank=opts.rank, alpha=opts.alpha, scaling=opts.scaling, targets=opts.targets,
                   seed=opts.seed)
        state = None
    log(f"LoRA rank {opts.rank}, alpha {opts.alpha:g}, scaling {opts.scaling}, lr {opts.lr:g}")
    log(model.summary())
    config = TrainConfig(epochs=opts.epochs, eval_freq=opts.eval_freq, eval_iter=opts.eval_iter, pool=opts.pool)
    state = train_classifier(model, opt, train_loader, val_loader, config, checkpoint_dir=ckpt, state=state,
                             log=log, progress=progress)
    accuracies = {}
    for name, loader, epoch in (("train", train_loader, opts.epochs - 1), ("val", val_loader, 0),
                                ("test", test_loader, 0)):
        accuracies[name] = evaluate(model, loader.epoch_batches(epoch), pool=opts.pool)[1]
    # wall time of this process, plus the training time of earlier segments of a resumed run
    seconds = time.perf_counter() - t0 + state.seconds - state.segment_seconds
    metrics = {
        "train_examples": len(data.train), "val_examples": len(data.val), "test_examples": len(data.test),
        "max_length": data.max_length, "train_batches": len(train_loader), "val_batches": len(val_loader),
        "test_batches": len(test_loader), "total_params": model.num_params(),
        "trainable_params": model.num_params(trainable_only=True),
        "train_accuracy": accuracies["train"], "val_accuracy": accuracies["val"],
        "test_accuracy": accuracies["test"], "seconds": seconds, "steps": state.step,
        "examples_seen": state.examples_seen, "classes": list(data.class_names),
        "truncated_texts": data.truncated,
        "final_train_loss": state.history[-1]["batch_loss"] if state.history else None,
        "options": asdict(opts), "device": model.device, "resumed": resume,
    }
    save_adapter(model, out / "adapter", base_model=model_reference(opts.model), class_names=data.class_names,
                 max_length=data.max_length, pool=opts.pool, pad=opts.pad, batching=opts.batching)
    write_text(out / "history.csv", history_csv(state))
    plot_run(state, len(train_loader) * opts.batch_size, out)
    write_text(out / "metrics.json", strict_json(metrics))
    log(f"Training accuracy: {accuracies['train'] * 100:.2f}%")
    log(f"Validation accuracy: {accuracies['val'] * 100:.2f}%")
    log(f"Test accuracy: {accuracies['test'] * 100:.2f}%")
    log(f"Done in {seconds / 60:.2f} minutes; results in {out}/")
    return metrics


def model_reference(name_or_path):
    """How an adapter names its base model so that it resolves from any folder: a preset
    or a URL as given, a path made absolute."""
    path = Path(name_or_path)
    if str(name_or_path).startswith(("http://", "https://")) or not path.exists():
        return str(name_or_path)
    return str(path.resolve())


def strict_json(obj):
    """JSON text with every NaN or infinity written as null: Python's json module writes
    them as the bare words NaN / Infinity, which are not JSON and most readers reject."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def _prepare_run_folder(out, opts, log):
    """Make `out` ready; returns True when a checkpoint there is to be resumed.

    A fresh run needs an empty or new folder; --resume needs the same options as the
    run it continues (it starts afresh, saying so, when no checkpoint was written yet),
    except --epochs, which may grow to extend the run.
    """
    cfg_path = out / "run_config.json"
    wanted = {k: getattr(opts, k) for k in FinetuneOptions.RESUME_KEYS}
    if opts.resume and cfg_path.exists():
        try:
            saved = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); it is not a run folder minilora wrote") from e
        saved = {**FinetuneOptions.RESUME_DEFAULTS, **saved}
        diff = [f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
        if diff:
            raise ValueError(f"{out} holds a run with other options; resume with the same ones "
                             f"or use another --output-dir:\n  " + "\n  ".join(diff))
        if has_checkpoint(out / "checkpoint"):
            state = read_loop_state(out / "checkpoint")
            started = state.epoch + (1 if state.batch else 0)  # epochs done or under way
            if started > opts.epochs:
                raise ValueError(f"--epochs {opts.epochs}: the run in {out} has already trained "
                                 f"{started} epoch(s); resume with --epochs {started} or more")
            if opts.epochs > saved.get("epochs", opts.epochs):
                log(f"Extending the run in {out} from {saved['epochs']} to {opts.epochs} epochs")
            write_text(cfg_path, json.dumps({**wanted, "epochs": opts.epochs}, indent=2))
            return True
        log(f"{out} has no checkpoint yet: starting the run afresh")
        return False
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file, not a folder")
    if out.exists() and any(p.name != "run_config.json" for p in out.iterdir()):  # a run got under way
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose "
                              f"another --output-dir")
    write_text(cfg_path, json.dumps({**wanted, "epochs": opts.epochs}, indent=2))
    return False


def history_csv(state):
    """The per-step history as CSV text: step, epoch, examples_seen, seconds (training wall
    time at the end of the step), lr, batch_loss, and train_loss / val_loss / train_accuracy /
    val_accuracy where they were measured."""
    evals = {e["step"]: e for e in state.evals}
    epoch_end = {}
    for e in state.epochs:
        last = max((h["step"] for h in state.history if h["epoch"] == e["epoch"]), default=None)
        epoch_end[last] = e
    buf = io.StringIO()
    cols = ["step", "epoch", "examples_seen", "seconds", "lr", "batch_loss", "train_loss", "val_loss",
            "train_accuracy", "val_accuracy"]
    writer = csv.DictWriter(buf, cols, extrasaction="ignore")
    writer.writeheader()
    for h in state.history:
        writer.writerow({**h, **evals.get(h["step"], {}), **epoch_end.get(h["step"], {})})
    return buf.getvalue()
