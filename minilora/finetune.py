"""The appendix E job end to end: data, pretrained GPT-2, 2-class head, LoRA, AdamW,
training, final accuracies, and a run folder.

Run folder layout (``output_dir``):

    run_config.json   the options of the run (a resumed run must use the same ones)
    checkpoint/       the latest checkpoint (adapter + optimizer + loop state)
    adapter/          the trained adapter, loadable with minilora.load_adapter
    history.csv       one row per step: loss, lr, and the evaluations where made
    metrics.json      dataset sizes, parameter counts, final accuracies, seconds
    loss.png, accuracy.png
"""

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .adapters import save_adapter
from .backend import resolve_device
from .lora import apply_lora
from .model import GPTModel
from .optim import AdamW
from .plots import plot_run
from .train import TrainConfig, evaluate, has_checkpoint, load_checkpoint, train_classifier

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
    pad: str = "dataset"  # "dataset" (the book) or "longest_in_batch"
    pool: str = "last"  # "last" (the book) or "last_real"
    seed: int = 123
    device: str = None
    dtype: str = "float32"
    output_dir: str = "runs/appendix-e"
    offline: bool = None
    resume: bool = False  # continue the run in output_dir from its checkpoint

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}: expected one of {sorted(RECIPES)}")
        self.scaling = self.scaling or RECIPES[self.recipe]["scaling"]
        self.lr = self.lr if self.lr is not None else RECIPES[self.recipe]["lr"]
        if isinstance(self.targets, str) and self.targets not in ("all", "attention"):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]

    # what must match for --resume to continue the same run
    RESUME_KEYS = ("model", "data", "rank", "alpha", "scaling", "targets", "lr", "weight_decay",
                   "epochs", "batch_size", "eval_freq", "eval_iter", "pad", "pool", "seed", "dtype")


def load_data(opts, log):
    from .data import load_sms_spam, load_text_label_file, make_loaders

    if opts.data:
        data = load_text_label_file(opts.data, offline=opts.offline)
    else:
        data = load_sms_spam(offline=opts.offline)
    loaders = make_loaders(data, opts.batch_size, seed=opts.seed, pad_to=opts.pad)
    log(f"Data: {data.source}")
    log(f"  classes {list(data.class_names)}; examples train {len(data.train):,} / val {len(data.val):,} / "
        f"test {len(data.test):,}; max length {data.max_length}; batches "
        f"{len(loaders[0])} / {len(loaders[1])} / {len(loaders[2])} of {opts.batch_size}")
    return data, loaders


def build_model(opts, num_classes, log):
    model = GPTModel.from_pretrained(opts.model, dtype=opts.dtype, device=opts.device, offline=opts.offline)
    model.replace_head(num_classes, seed=opts.seed)
    log(f"Model: {opts.model} ({model.cfg.n_layers} layers, width {model.cfg.emb_dim}) on {model.device}, "
        f"{opts.dtype}; {model.num_params():,} parameters with the {num_classes}-class head")
    return model


def run_finetune(opts, log=print, progress=None):
    """Run (or resume) the job; returns the metrics dict. `log` receives the lines to print."""
    resolve_device(opts.device)  # a missing CuPy or GPU is reported before any work is done
    out = Path(opts.output_dir)
    ckpt = out / "checkpoint"
    resume = _prepare_run_folder(out, opts, log)
    t0 = time.perf_counter()
    data, (train_loader, val_loader, test_loader) = load_data(opts, log)
    model = build_model(opts, data.num_classes, log)
    opt = AdamW(model, lr=opts.lr, weight_decay=opts.weight_decay)
    if resume:
        state = load_checkpoint(ckpt, model, opt)
        log(f"Resuming from {ckpt}: epoch {state.epoch + 1}, step {state.step}")
    else:
        apply_lora(model, rank=opts.rank, alpha=opts.alpha, scaling=opts.scaling, targets=opts.targets,
                   seed=opts.seed)
        state = None
    log(f"LoRA rank {opts.rank}, alpha {opts.alpha}, scaling {opts.scaling}, lr {opts.lr:g}")
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
        "final_train_loss": state.history[-1]["batch_loss"] if state.history else None,
        "options": asdict(opts), "device": model.device, "resumed": resume,
    }
    save_adapter(model, out / "adapter", base_model=opts.model, class_names=data.class_names,
                 max_length=data.max_length)
    _write_text(out / "history.csv", history_csv(state))
    plot_run(state, len(train_loader) * opts.batch_size, out)
    _write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log(f"Training accuracy: {accuracies['train'] * 100:.2f}%")
    log(f"Validation accuracy: {accuracies['val'] * 100:.2f}%")
    log(f"Test accuracy: {accuracies['test'] * 100:.2f}%")
    log(f"Done in {seconds / 60:.2f} minutes; results in {out}/")
    return metrics


def _prepare_run_folder(out, opts, log):
    """Make `out` ready; returns True when a checkpoint there is to be resumed.

    A fresh run needs an empty or new folder; --resume needs the same options as the
    run it continues (it starts afresh, saying so, when no checkpoint was written yet).
    """
    cfg_path = out / "run_config.json"
    wanted = {k: getattr(opts, k) for k in FinetuneOptions.RESUME_KEYS}
    if opts.resume and cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        diff = [f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
        if diff:
            raise ValueError(f"{out} holds a run with other options; resume with the same ones "
                             f"or use another --output-dir:\n  " + "\n  ".join(diff))
        if has_checkpoint(out / "checkpoint"):
            return True
        log(f"{out} has no checkpoint yet: starting the run afresh")
        return False
    if out.exists() and any(p.name != "run_config.json" for p in out.iterdir()):  # a run got under way
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose "
                              f"another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    _write_text(cfg_path, json.dumps(wanted, indent=2))
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


def _write_text(path, text):
    """Write a text file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
