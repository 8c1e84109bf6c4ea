"""The appendix E job end to end: data, pretrained GPT-2, 2-class head, LoRA, AdamW,
training, final accuracies, and a run folder.

Run folder layout (``output_dir``):

    run_config.json   the options of the run, the sha256 of the data file and the class
                      names (a resumed run must use the same ones, but may ask for more epochs)
    .lock             held while a job writes the folder: one job at a time (minilora.run_lock)
    checkpoint/       the latest checkpoint (adapter + optimizer + loop state + manifest.json;
                      minilora.checkpoint); its adapter/ records the same settings as adapter/
    adapter/          the trained adapter, loadable with minilora.load_adapter; it records
                      its base model, class names, max length, padding, batching and pooling
    history.csv       one row per step: loss, lr, and the evaluations where made
    metrics.json      dataset sizes, parameter counts, final accuracies, seconds (strict
                      JSON: never NaN)
    loss.png, accuracy.png

Every file is written through minilora.files (whole or not at all).
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .adapters import save_adapter
from .backend import resolve_device
from .data import BATCHINGS, PAD_MODES
from .errors import OptionError
from .lora import config_sites, select_targets
from .model import GPTModel
from .run_folder import hold_run_folder
from .tasks import POOLS, ClassificationTask, evaluate
from .train import CHECKPOINT_DIR, JobOptions, run_seconds, start_training, train, write_run_record
from .weights import read_config, read_heads

# The book's two published recipes: the current notebook (default) and the print edition.
RECIPES = {
    "notebook": {"scaling": "alpha_over_r", "lr": 8e-4},
    "print": {"scaling": "alpha", "lr": 5e-5},
}


@dataclass
class FinetuneOptions(JobOptions):
    """The appendix E job's options: JobOptions (model, device, LoRA, the loop, the run
    folder) and the classifier's data, recipe, padding, batching and pooling."""

    scaling: str = None  # None: the recipe's
    lr: float = None  # None: the recipe's
    max_length: int = None  # pad/truncate texts to this many tokens (None: the longest training
    #                         text, at most the model's context length; longer texts are truncated)
    output_dir: str = "runs/appendix-e"
    data: str = None  # None: the SMS Spam Collection; else a CSV/TSV of text,label rows
    recipe: str = "notebook"
    pad: str = None  # "dataset" (the book) or "longest_in_batch" (None: the batching's: by_length
    #                  pads per batch, shuffled to the longest training text as the book)
    batching: str = "shuffled"  # "shuffled" (the book) or "by_length": texts of similar length batched
    #                             together, in training (a new order every epoch) and evaluation
    pool: str = "last"  # "last" (the book) or "last_real"

    RESUME_KEYS = JobOptions.RESUME_KEYS + ("data", "pad", "batching", "pool")
    RESUME_DEFAULTS = {"batching": "shuffled", "max_length": None}  # what folders written before each option existed ran with
    CHOICES = {**JobOptions.CHOICES, "recipe": tuple(RECIPES), "pad": PAD_MODES + (None,), "pool": POOLS,
               "batching": BATCHINGS}

    def __post_init__(self):
        """The shared checks (JobOptions) once the recipe has filled in the scaling and the
        learning rate, and the padding its default; then the classifier's own."""
        if self.recipe in RECIPES:  # an unknown recipe is refused by the shared choice check
            self.scaling = self.scaling or RECIPES[self.recipe]["scaling"]
            self.lr = self.lr if self.lr is not None else RECIPES[self.recipe]["lr"]
        # grouping by length saves work only when each batch is padded to its own longest text
        if self.batching == "by_length" and self.pad == "dataset":
            raise OptionError("--batching by_length pads each batch to its own longest text: it cannot be "
                              "combined with --pad dataset (every batch padded to the longest training "
                              "text); leave --pad out or use --pad longest_in_batch")
        super().__post_init__()
        self.pad = self.pad or ("longest_in_batch" if self.batching == "by_length" else "dataset")


def _check_targets(opts, model_cfg):
    """Refuse a --targets that names no layer of the model, from its config alone: the
    model is not built yet. The classifier head (out_head) is added once the data names
    its classes; its width does not change the names, so 0 stands in for it here.

    A model that is a classifier already (out_head.* in its checkpoint: a merged minilora
    classifier) is refused from its header: build_model's new head would replace its head
    silently, and an adapter trained on other classes would not load back onto it."""
    if "out_head.weight" in read_heads(opts.model, offline=opts.offline):
        raise OptionError(f"--model {opts.model}: a classifier already (its head is out_head.*, e.g. a merged "
                          f"minilora classifier): finetune puts a new head on a language model; fine-tune the "
                          f"model it was fine-tuned from, or --resume its run")
    try:
        select_targets(config_sites(model_cfg, head_outputs=0), model_cfg.n_layers, opts.targets)
    except ValueError as e:
        shown = opts.targets if isinstance(opts.targets, str) else ",".join(opts.targets)
        raise OptionError(f"--targets {shown!r}: {e}") from None


def load_data(opts, context_length, log):
    """The data, tokenized and split, and its three loaders, checked against the batch
    size; texts longer than --max-length (default: the model's context) are truncated."""
    from .data import load_sms_spam, load_text_label_file, make_loaders

    if opts.max_length is not None and opts.max_length > context_length:
        raise OptionError(f"--max-length {opts.max_length} is longer than the model's context length "
                         f"({context_length} tokens)")
    kwargs = dict(max_length=opts.max_length, context_length=context_length, offline=opts.offline)
    if opts.data:
        data = load_text_label_file(opts.data, **kwargs)
    else:
        data = load_sms_spam(**kwargs)
    loaders = make_loaders(data, opts.batch_size, seed=opts.seed, pad_to=opts.pad, batching=opts.batching)
    if len(loaders[0]) == 0:  # training drops the last incomplete batch, as the book does
        raise OptionError(f"--batch-size {opts.batch_size} is larger than the {len(data.train)} training "
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
    `opts` was made), the device, the model's configuration (from its header, not its
    weights), the data against the batch size and the context length, the run folder
    (minilora.run_folder), which the job holds until it ends."""
    resolve_device(opts.device)  # a missing CuPy or GPU is reported before any work is done
    out = Path(opts.output_dir)
    # the options that depend on the model, from its config alone, before the run folder is touched
    model_cfg = read_config(opts.model, offline=opts.offline)
    if opts.rank > model_cfg.emb_dim:
        raise OptionError(f"--rank {opts.rank} exceeds the width of {opts.model} ({model_cfg.emb_dim})")
    _check_targets(opts, model_cfg)
    t0 = time.perf_counter()
    # the data before the run folder: a bad file leaves no run folder behind, and --resume
    # compares the data's file and class names with the run's before anything is written
    data, loaders = load_data(opts, model_cfg.context_length, log)
    with hold_run_folder(out, opts, log, "minilora finetune", data.source, data.class_names) as run:
        return _train_in_run_folder(opts, data, loaders, run, t0, log, progress)


def _train_in_run_folder(opts, data, loaders, run, t0, log, progress):
    """run_finetune's long part, while it holds the run folder (`run`: what
    minilora.run_folder prepared): the model, training, the final accuracies, the adapter
    and the run record; returns the metrics."""
    out = Path(opts.output_dir)
    ckpt = out / CHECKPOINT_DIR
    train_loader, val_loader, test_loader = loaders
    model = build_model(opts, data.num_classes, log)
    opt, state = start_training(model, opts, ckpt, run.resume, log)
    run.commit(log)  # the checkpoint has loaded: only now does run_config.json take a new --epochs
    task = ClassificationTask(opts.pool)
    state = train(model, opt, task, train_loader, val_loader, opts.train_config(), checkpoint_dir=ckpt,
                  state=state, log=log, progress=progress,
                  adapter_settings=dict(base_model=model_reference(opts.model), class_names=data.class_names,
                                        max_length=data.max_length, pool=opts.pool, pad=opts.pad,
                                        batching=opts.batching))  # the final save_adapter's, for checkpoint/adapter
    accuracies = {}
    for name, loader, epoch in (("train", train_loader, opts.epochs - 1), ("val", val_loader, 0),
                                ("test", test_loader, 0)):
        accuracies[name] = evaluate(model, loader.epoch_batches(epoch), pool=opts.pool)[1]
    seconds = run_seconds(state, t0)
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
        "options": asdict(opts), "device": model.device, "resumed": run.resume,
    }
    save_adapter(model, out / "adapter", base_model=model_reference(opts.model), class_names=data.class_names,
                 max_length=data.max_length, pool=opts.pool, pad=opts.pad, batching=opts.batching)
    write_run_record(out, state, task, len(train_loader) * opts.batch_size, metrics)
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
