"""One training loop for every task, with checkpoints: the loop of the book's appendix E.

The loop is ``train_classifier_simple`` of Raschka's chapter 6 / appendix E (and
``train_model_simple`` of chapters 5 and 7, which differ only in what they count and
what they do after an epoch): each step runs the task's forward and loss, backward and
AdamW; every ``eval_freq`` steps (starting at step 0, as the book's global_step starts
at -1) the mean loss over ``eval_iter`` training and validation batches is recorded;
after each epoch, what the task records (the classifier: accuracies over ``eval_iter``
batches). What differs between jobs lives in the task (minilora.tasks) and its batches.

Beyond the book:
- checkpoints (adapter + optimizer + loop state) written atomically after every
  epoch and on Ctrl-C, from which ``resume`` continues to the same result;
- a NaN/inf loss stops the run with TrainingDiverged, keeping the last good checkpoint.
Library code does not print: progress goes to the ``log`` callback and a tqdm bar
(on a terminal only).
"""

import csv
import io
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .adapters import load_adapter, write_adapter
from .backend import DTYPES, to_numpy
from .errors import CheckpointStateError, MiniloraError, OptionError, RunFolderError
from .files import atomic_folder, recover_folder, write_text
from .lora import SCALINGS
from .tasks import ClassificationTask, evaluate  # noqa: F401  (evaluate: examples/appendix_e.py imports it from here)


class TrainingDiverged(MiniloraError, RuntimeError):
    """The loss became NaN or infinite."""


class StoppedMidStep(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM while the first waited for the step to end: training
    stops at once, and no checkpoint is written over the last consistent one."""


def interrupts_between_steps():
    """Ctrl-C and SIGTERM take effect between two training steps; returns the pair
    (between_steps, restore): call the first where a step has ended, the second when
    training ends, to put the signal handlers back. A signal only marks
    itself; the step under way (its optimizer update, its evaluation, the loop's
    counters) completes, and then `between_steps()` raises what the signal's own handler
    raises (KeyboardInterrupt; the CLI's Terminated for SIGTERM). So the checkpoint
    written on the way out is a state the uninterrupted run also passes through, and
    --resume continues to the same result. A second signal stops at once. Signals reach
    only the main thread: elsewhere, and for handlers that are not Python functions,
    nothing changes."""
    pending, previous = [], {}

    def mark(signum, frame):
        if pending:
            raise StoppedMidStep
        pending.append((signum, frame))

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if callable(signal.getsignal(sig)):
                previous[sig] = signal.signal(sig, mark)

    def between_steps():
        if pending:
            signum, frame = pending.pop()
            previous[signum](signum, frame)

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return between_steps, restore


@dataclass
class TrainConfig:
    epochs: int = 5  # passes over the training batches
    eval_freq: int = 50  # evaluate losses every this many steps
    eval_iter: int = 5  # batches per evaluation (losses, and the task's end-of-epoch values)
    sync_every: int = None  # read losses back to the host every N steps (None: 1 on CPU, eval_freq on GPU)

    def __post_init__(self):
        for name in ("epochs", "eval_freq", "eval_iter"):
            if getattr(self, name) < 1:
                raise OptionError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class LoopState:
    """Where a run is: enough, with the adapter and the optimizer, to resume exactly."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimizer steps taken
    examples_seen: int = 0
    # token positions seen, padding included (the book's tokens_seen); None: not counted, as in
    # a checkpoint written before this field existed (its earlier steps cannot be recounted)
    tokens_seen: int = 0
    task: str = "classification"  # the task that wrote the state (older states: the classifier)
    history: list = field(default_factory=list)  # one dict per step (see train)
    evals: list = field(default_factory=list)  # {step, epoch, examples_seen, tokens_seen, train_loss, val_loss}
    epochs: list = field(default_factory=list)  # {epoch, examples_seen, tokens_seen, what the task's end_of_epoch records}
    done: bool = False
    seconds: float = 0.0  # training-loop wall time, summed over every segment of a resumed run
    segment_seconds: float = 0.0  # the part of `seconds` spent in the latest segment

    @classmethod
    def from_dict(cls, saved, source):
        """A LoopState from its saved dict; a field the dict lacks takes the value that a
        state written before the field existed means (tokens_seen: None, not counted)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise CheckpointStateError(f"{source}: unknown loop state field(s) {unknown}; it was written "
                                       f"by another version of minilora")
        return cls(**{"tokens_seen": None, **saved})


# ---------------------------------------------------------------------------- one step


def train_step(model, opt, task, batch):
    """forward and loss (the task's), backward, AdamW: one step. Returns the loss (0-d array)."""
    loss, dlogits = task.step(model, batch)
    opt.step(model.backward(dlogits))
    return loss


# ---------------------------------------------------------------------------- the loop


def train(model, opt, task, train_loader, val_loader, config=None, *, checkpoint_dir=None, state=None,
          log=None, progress=None):
    """The book's training loop for any task (see minilora.tasks); returns the final LoopState.

    Each step: the task's loss on one batch, backward, AdamW. Every eval_freq steps (from
    step 0, as the book's global_step starts at -1) the task's mean loss over eval_iter
    training and validation batches is recorded; after each epoch, what the task's
    end_of_epoch records from eval_iter batches of each.

    train_loader / val_loader: minilora.data.BatchLoader (train shuffled per epoch), or
    anything with len() and epoch_batches(epoch, start=0).
    checkpoint_dir: where to keep the latest checkpoint (None: no checkpoints).
    state: a LoopState to continue from (see load_checkpoint); None starts afresh.
    log: a function of one string (None: silent). progress: show a tqdm bar
    (None: only when stderr is a terminal).
    """
    config = config or TrainConfig()
    if len(train_loader) == 0:  # would "train" 0 steps and report NaN accuracies
        raise OptionError(f"the training loader has no batch: {len(train_loader.split)} examples, batch size "
                          f"{train_loader.batch_size}{', last incomplete batch dropped' if train_loader.drop_last else ''}")
    state = state or LoopState(task=task.name)
    if state.task != task.name:
        raise CheckpointStateError(f"the checkpoint was written by a {state.task} run; it cannot continue as "
                                   f"a {task.name} run")
    log = log or (lambda msg: None)
    bar = _progress_bar(config.epochs * len(train_loader), state.step, progress)
    t_start, seconds_before = time.perf_counter(), state.seconds

    def clock():  # keep the wall time current before every checkpoint
        state.segment_seconds = time.perf_counter() - t_start
        state.seconds = seconds_before + state.segment_seconds

    def seen():
        return {"examples_seen": state.examples_seen, "tokens_seen": state.tokens_seen}

    def first(loader, epoch):  # the eval_iter batches an evaluation reads
        return islice(loader.epoch_batches(epoch), config.eval_iter)

    # losses stay on the device until read back together: on a GPU that is the one host
    # round trip of training, made every eval_freq steps; on the CPU it is free, every step
    pending = []  # (history row, 0-d loss array)
    sync_every = config.sync_every or (1 if model.device == "cpu" else config.eval_freq)

    def flush():
        if not pending:
            return
        values = to_numpy(model.xp.stack([loss for _, loss in pending])).astype(float)
        for (row, _), value in zip(pending, values):
            if not math.isfinite(value):
                # name a checkpoint only when there is one (the first is written after epoch 1)
                kept = (f"The last good checkpoint is kept in {checkpoint_dir}" if checkpoint_dir and has_checkpoint(checkpoint_dir)
                        else "No checkpoint was written before it")
                raise TrainingDiverged(
                    f"loss became {value} at step {row['step']} (epoch {row['epoch']}); the parameters "
                    f"are no longer usable. {kept}; try a lower learning rate.")
            row["batch_loss"] = float(value)
        pending.clear()
        bar.set_postfix(loss=f"{values[-1]:.3f}", refresh=False)

    model.train()
    between_steps, restore_signals = interrupts_between_steps()
    try:
        while state.epoch < config.epochs:
            for batch in train_loader.epoch_batches(state.epoch, start=state.batch):
                loss = train_step(model, opt, task, batch)
                state.examples_seen += batch[0].shape[0]  # the token ids (B, T) come first
                if state.tokens_seen is not None:
                    state.tokens_seen += batch[0].size
                clock()
                row = {"step": state.step, "epoch": state.epoch + 1, **seen(), "lr": opt.last_lr,
                       "batch_loss": None, "seconds": round(state.seconds, 3)}
                state.history.append(row)
                pending.append((row, loss))
                if len(pending) >= sync_every:
                    flush()
                if state.step % config.eval_freq == 0:
                    flush()
                    train_loss = task.evaluate(model, first(train_loader, state.epoch))["loss"]
                    val_loss = task.evaluate(model, first(val_loader, 0))["loss"]
                    state.evals.append({"step": state.step, "epoch": state.epoch + 1, **seen(),
                                        "train_loss": train_loss, "val_loss": val_loss})
                    log(f"Ep {state.epoch + 1} (Step {state.step:06d}): "
                        f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
                state.step += 1
                state.batch += 1
                bar.update(1)
                between_steps()  # a Ctrl-C or SIGTERM received during the step stops here
            flush()
            values, line = task.end_of_epoch(model, first(train_loader, state.epoch), first(val_loader, 0))
            state.epochs.append({"epoch": state.epoch + 1, **seen(), **values})
            if line:
                log(line)
            state.epoch += 1
            state.batch = 0
            clock()
            if checkpoint_dir:
                save_checkpoint(checkpoint_dir, model, opt, state)
            between_steps()
        state.done = True
        clock()
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, model, opt, state)
    except StoppedMidStep:
        if checkpoint_dir:
            log(f"stopped in the middle of a step: the last checkpoint in {checkpoint_dir} is kept")
        raise
    except KeyboardInterrupt:
        flush()
        clock()
        if checkpoint_dir:
            save_checkpoint(checkpoint_dir, model, opt, state)
            log(f"interrupted: saved a checkpoint at step {state.step} in {checkpoint_dir}; "
                f"resume to continue")
        raise
    finally:
        restore_signals()
        bar.close()
    return state


def train_classifier(model, opt, train_loader, val_loader, config=None, *, pool="last", **kwargs):
    """`train` with the book's classification task (minilora.tasks.ClassificationTask):
    the entry point of examples/appendix_e.py."""
    return train(model, opt, ClassificationTask(pool), train_loader, val_loader, config, **kwargs)


def _progress_bar(total, initial, progress):
    from tqdm.auto import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not progress, unit="step", leave=False,
                desc="fine-tuning")


# ---------------------------------------------------------------------------- checkpoints

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_DIR = "adapter"
TRAINED_FILE = "trained.safetensors"  # full fine-tuning (no LoRA): the trained parameters themselves


def save_checkpoint(folder, model, opt, state):
    """Write adapter (or, for a model without LoRA, its trainable parameters) + optimizer
    + loop state to `folder`, atomically: everything goes to a sibling temporary folder
    that then replaces `folder` (minilora.files), so a crash or a full disk mid-save
    leaves the previous checkpoint intact."""
    with atomic_folder(folder) as tmp:
        if model.lora is not None:
            write_adapter(model, tmp / ADAPTER_DIR)  # the checkpoint folder itself is the atomic unit
        else:
            save_file({n: np.ascontiguousarray(to_numpy(model.params[n])) for n in model.trainable},
                      str(tmp / TRAINED_FILE))
        opt_state = opt.state_dict()
        tensors = {f"m/{n}": a for n, a in opt_state.pop("m").items()}
        tensors.update({f"v/{n}": a for n, a in opt_state.pop("v").items()})
        save_file({k: np.ascontiguousarray(a) for k, a in tensors.items()}, str(tmp / OPTIMIZER_FILE))
        meta = {"loop": asdict(state), "optimizer": opt_state,
                "dropout_rng": model._dropout_rng.bit_generator.state}
        (tmp / STATE_FILE).write_text(json.dumps(meta))


def has_checkpoint(folder):
    # a crash between atomic_folder's two renames leaves the previous checkpoint as <folder>.old
    return recover_folder(folder, lambda f: (f / STATE_FILE).is_file())


def load_checkpoint(folder, model, opt):
    """Restore adapter (into a model without LoRA), optimizer and dropout generator from
    `folder`; returns the LoopState to pass to train."""
    folder = Path(folder)
    meta = _read_state(folder)
    if (folder / TRAINED_FILE).is_file():
        _load_trained(model, folder / TRAINED_FILE)
    else:
        load_adapter(model, folder / ADAPTER_DIR)
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    opt_state = dict(meta["optimizer"])
    opt_state["m"] = {k[2:]: a for k, a in tensors.items() if k.startswith("m/")}
    opt_state["v"] = {k[2:]: a for k, a in tensors.items() if k.startswith("v/")}
    try:
        opt.load_state_dict(opt_state)
    except KeyError as e:  # moments for parameters the adapter lacks: a damaged checkpoint
        raise CheckpointStateError(f"{folder / OPTIMIZER_FILE}: {e.args[0]}") from e
    model._dropout_rng.bit_generator.state = meta["dropout_rng"]
    return LoopState.from_dict(meta["loop"], folder / STATE_FILE)


def _load_trained(model, path):
    """Copy a full fine-tuning checkpoint's parameters into the model, in place (the
    optimizer holds no copies), after checking that they are the model's trainable set."""
    tensors = load_file(str(path))
    if set(tensors) != set(model.trainable):
        missing, extra = sorted(set(model.trainable) - set(tensors)), sorted(set(tensors) - set(model.trainable))
        raise CheckpointStateError(f"{path}: not this model's trained parameters (missing {missing[:3]}, "
                                   f"unknown {extra[:3]})")
    for name, array in tensors.items():
        if array.shape != model.params[name].shape:
            raise CheckpointStateError(f"{path}: {name} has shape {array.shape}, the model's is "
                                       f"{model.params[name].shape}")
        model.params[name][...] = model.xp.asarray(array)


def read_loop_state(folder):
    """The LoopState of the checkpoint in `folder` alone (how far the run got), cheaply."""
    folder = Path(folder)
    return LoopState.from_dict(_read_state(folder)["loop"], folder / STATE_FILE)


STATE_KEYS = ("loop", "optimizer", "dropout_rng")


def _read_state(folder):
    """state.json, checked as a whole: valid JSON holding every key a resume reads."""
    if not has_checkpoint(folder):
        raise FileNotFoundError(f"no checkpoint in {folder}")
    path = folder / STATE_FILE
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointStateError(f"{path} is not valid JSON ({e}): the checkpoint is damaged") from e
    missing = [k for k in STATE_KEYS if not isinstance(meta, dict) or not isinstance(meta.get(k), dict)]
    if missing:
        raise CheckpointStateError(f"{path} lacks {', '.join(missing)}: the checkpoint is damaged")
    return meta


# ---------------------------------------------------------------------------- the options every job shares


def option_name(field_name):
    """The command-line option of an options field: batch_size -> --batch-size."""
    return "--" + field_name.replace("_", "-")


@dataclass
class JobOptions:
    """What every fine-tuning job takes (the model, the device, LoRA, the loop, the run
    folder), checked in one place. A job's options derive from this class, add their
    own fields and checks, and override a default by redefining its field."""

    model: str = "gpt2-small"  # preset name, model.safetensors file, or HF-layout folder
    device: str = None  # cpu or cuda (None: $MINILORA_DEVICE or cpu)
    dtype: str = "float32"
    seed: int = 123
    offline: bool = None  # None: $MINILORA_OFFLINE
    rank: int = 16
    alpha: float = 16
    scaling: str = "alpha_over_r"  # one of lora.SCALINGS
    targets: str = "all"  # all, attention, or comma-separated names/patterns
    lr: float = 5e-5
    weight_decay: float = 0.1
    epochs: int = 5
    batch_size: int = 8
    eval_freq: int = 50
    eval_iter: int = 5
    max_length: int = None  # pad/truncate texts to this many tokens (None: the job's rule)
    output_dir: str = "runs/job"
    resume: bool = False  # continue the run in output_dir from its checkpoint

    # what must match for --resume to continue the same run (epochs may grow: more epochs
    # extend a finished run); a job adds its own
    RESUME_KEYS = ("model", "rank", "alpha", "scaling", "targets", "lr", "weight_decay", "batch_size",
                   "eval_freq", "eval_iter", "max_length", "seed", "dtype")
    # what a run folder written before an option existed ran with
    RESUME_DEFAULTS = {}
    # the choices of the options that take one of a few names (the parser offers the same)
    CHOICES = {"dtype": DTYPES, "scaling": SCALINGS}

    def __post_init__(self):
        """Refuse, with the option's name and value, a run that cannot succeed or would
        learn nothing, before the data and the model load."""
        for name, choices in type(self).CHOICES.items():
            if getattr(self, name) not in choices:
                shown = sorted(c for c in choices if c is not None)
                raise OptionError(f"{option_name(name)} must be one of {shown}, got {getattr(self, name)!r}")
        for name, least in (("rank", 1), ("epochs", 1), ("batch_size", 1), ("eval_freq", 1),
                            ("eval_iter", 1), ("seed", 0), ("max_length", 1)):
            value = getattr(self, name)
            if value is None and name == "max_length":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise OptionError(f"{option_name(name)} must be an integer >= {least}, got {value!r}")
        # alpha 0 scales the adapters to nothing and lr <= 0 learns nothing or climbs the loss:
        # both used to run to the end and save an adapter that had learned nothing
        for name, least, strict in (("alpha", 0, True), ("lr", 0, True), ("weight_decay", 0, False)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float, np.number)) and math.isfinite(value) and (
                value > least if strict else value >= least)
            if not ok:
                raise OptionError(f"{option_name(name)} must be a finite number {'>' if strict else '>='} "
                                  f"{least}, got {value!r}")
        if isinstance(self.targets, str) and self.targets not in ("all", "attention"):
            targets = [t.strip() for t in self.targets.split(",") if t.strip()]
            if not targets:
                raise OptionError(f"--targets {self.targets!r} names no layer, so nothing would be trained: "
                                  f"use all, attention, or comma-separated names such as c_attn.q,out_head")
            self.targets = targets

    def train_config(self):
        return TrainConfig(epochs=self.epochs, eval_freq=self.eval_freq, eval_iter=self.eval_iter)


# ---------------------------------------------------------------------------- the run folder

RUN_CONFIG_FILE = "run_config.json"
CHECKPOINT_DIR = "checkpoint"


def start_training(model, opts, checkpoint_dir, resume, log, full=False):
    """The optimizer and loop state a job starts from (state None: a fresh run): the
    checkpoint's when resuming (its adapter or trained weights included), else LoRA applied
    as `opts` says, or nothing frozen when `full` (full fine-tuning)."""
    from .lora import apply_lora
    from .optim import AdamW

    opt = AdamW(model, lr=opts.lr, weight_decay=opts.weight_decay)
    state = None
    if resume:
        state = load_checkpoint(checkpoint_dir, model, opt)
        log(f"Resuming from {checkpoint_dir}: epoch {state.epoch + 1}, step {state.step}")
        state.done = state.epoch >= opts.epochs  # more --epochs than before extend a finished run
    elif not full:
        apply_lora(model, rank=opts.rank, alpha=opts.alpha, scaling=opts.scaling, targets=opts.targets,
                   seed=opts.seed)
    if full:
        log(f"Full fine-tuning: every parameter trained, lr {opts.lr:g}")
    else:
        log(f"LoRA rank {opts.rank}, alpha {opts.alpha:g}, scaling {opts.scaling}, lr {opts.lr:g}")
    log(model.summary())
    return opt, state


def write_run_record(out, state, task, examples_per_epoch, metrics, seen="examples_seen"):
    """A finished run's history.csv, plots (against `seen`: examples_seen or tokens_seen) and
    metrics.json, each written whole (files.write_text)."""
    from .plots import plot_run  # matplotlib loads only for a run that writes its plots

    write_text(out / "history.csv", history_csv(state, task.epoch_metrics))
    plot_run(state, examples_per_epoch, out, task.epoch_metrics, seen=seen)
    write_text(out / "metrics.json", strict_json(metrics))


def run_seconds(state, t0):
    """Wall time of this process since t0, plus the training time of earlier segments of a resumed run."""
    return time.perf_counter() - t0 + state.seconds - state.segment_seconds


def prepare_run_folder(out, opts, log):
    """Make the run folder `out` ready for the job of `opts` (a JobOptions); returns True
    when a checkpoint there is to be resumed.

    A fresh run needs an empty or new folder; --resume needs the same options as the
    run it continues (type(opts).RESUME_KEYS; it starts afresh, saying so, when no
    checkpoint was written yet), except --epochs, which may grow to extend the run.
    """
    out = Path(out)
    cfg_path = out / RUN_CONFIG_FILE
    wanted = {k: getattr(opts, k) for k in type(opts).RESUME_KEYS}
    if opts.resume and cfg_path.exists():
        try:
            saved = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise RunFolderError(f"{cfg_path} is not valid JSON ({e}); it is not a run folder minilora wrote") from e
        saved = {**type(opts).RESUME_DEFAULTS, **saved}
        diff = [f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
        if diff:
            raise RunFolderError(f"{out} holds a run with other options; resume with the same ones "
                                 f"or use another --output-dir:\n  " + "\n  ".join(diff))
        if has_checkpoint(out / CHECKPOINT_DIR):
            state = read_loop_state(out / CHECKPOINT_DIR)
            started = state.epoch + (1 if state.batch else 0)  # epochs done or under way
            if started > opts.epochs:
                raise OptionError(f"--epochs {opts.epochs}: the run in {out} has already trained "
                                  f"{started} epoch(s); resume with --epochs {started} or more")
            if opts.epochs > saved.get("epochs", opts.epochs):
                log(f"Extending the run in {out} from {saved['epochs']} to {opts.epochs} epochs")
            write_text(cfg_path, json.dumps({**wanted, "epochs": opts.epochs}, indent=2))
            return True
        log(f"{out} has no checkpoint yet: starting the run afresh")
        return False
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--output-dir {out} is a file, not a folder")
    if out.exists() and any(p.name != RUN_CONFIG_FILE for p in out.iterdir()):  # a run got under way
        raise RunFolderError(f"{out} already holds a run: pass --resume to continue it, or choose "
                             f"another --output-dir")
    write_text(cfg_path, json.dumps({**wanted, "epochs": opts.epochs}, indent=2))
    return False


def history_csv(state, epoch_metrics=("accuracy",)):
    """The per-step history as CSV text: step, epoch, examples_seen, seconds (training wall
    time at the end of the step), lr, batch_loss, and train_loss / val_loss / train_m /
    val_m for each m of epoch_metrics (a task's) where they were measured."""
    evals = {e["step"]: e for e in state.evals}
    epoch_end = {}
    for e in state.epochs:
        last = max((h["step"] for h in state.history if h["epoch"] == e["epoch"]), default=None)
        epoch_end[last] = e
    buf = io.StringIO()
    cols = ["step", "epoch", "examples_seen", "seconds", "lr", "batch_loss", "train_loss", "val_loss"]
    cols += [f"{split}_{m}" for m in epoch_metrics for split in ("train", "val")]
    writer = csv.DictWriter(buf, cols, extrasaction="ignore")
    writer.writeheader()
    for h in state.history:
        writer.writerow({**h, **evals.get(h["step"], {}), **epoch_end.get(h["step"], {})})
    return buf.getvalue()


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
