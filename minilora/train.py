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
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from itertools import islice

import numpy as np

from .backend import DTYPES, to_numpy
from .checkpoint import LoopState, NotFiniteError, has_checkpoint, load_checkpoint, save_checkpoint  # noqa: F401
from .errors import CheckpointStateError, MiniloraError, OptionError
from .files import write_text
from .lora import SCALINGS
from .schema import strict_json  # noqa: F401  (the jobs, cli and tests import it from here)
from .run_folder import CHECKPOINT_DIR, RUN_CONFIG_FILE, prepare_run_folder  # noqa: F401  (the jobs import them from here)
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


# ---------------------------------------------------------------------------- one step


def train_step(model, opt, task, batch):
    """forward and loss (the task's), backward, AdamW: one step. Returns the loss (0-d array)."""
    loss, dlogits = task.step(model, batch)
    opt.step(model.backward(dlogits))
    return loss


# ---------------------------------------------------------------------------- the loop


def train(model, opt, task, train_loader, val_loader, config=None, *, checkpoint_dir=None, state=None,
          log=None, progress=None, adapter_settings=None):
    """The book's training loop for any task (see minilora.tasks); returns the final LoopState.

    Each step: the task's loss on one batch, backward, AdamW. Every eval_freq steps (from
    step 0, as the book's global_step starts at -1) the task's mean loss over eval_iter
    training and validation batches is recorded; after each epoch, what the task's
    end_of_epoch records from eval_iter batches of each.

    train_loader / val_loader: minilora.data.BatchLoader (train shuffled per epoch), or
    anything with len() and epoch_batches(epoch, start=0).
    checkpoint_dir: where to keep the latest checkpoint (None: no checkpoints).
    adapter_settings: what the job's final save_adapter records (base_model, class_names,
    max_length, pool, pad, batching), written into each checkpoint's adapter too, so
    that it can be used on its own after a crash (None: nothing recorded).
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

    def kept():  # what a run that must stop says of its checkpoint: "good" only of a whole one
        try:
            if checkpoint_dir and has_checkpoint(checkpoint_dir):  # the first is written after epoch 1
                return f"The last good checkpoint is kept in {checkpoint_dir}"
        except CheckpointStateError as e:
            return f"No good checkpoint is left ({e})"
        return "No checkpoint was written before it"

    def save():  # a state holding NaN or inf is not saved: the run has diverged
        try:
            save_checkpoint(checkpoint_dir, model, opt, state, adapter_settings=adapter_settings)
        except NotFiniteError as e:
            raise TrainingDiverged(f"{e} after {state.step} steps; the parameters are no longer usable. "
                                   f"{kept()}; try a lower learning rate.") from None

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
                raise TrainingDiverged(
                    f"loss became {value} at step {row['step']} (epoch {row['epoch']}); the parameters "
                    f"are no longer usable. {kept()}; try a lower learning rate.")
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
                save()
            between_steps()
        state.done = True
        clock()
        if checkpoint_dir:
            save()
    except StoppedMidStep:
        if checkpoint_dir:
            log(f"stopped in the middle of a step: the last checkpoint in {checkpoint_dir} is kept")
        raise
    except KeyboardInterrupt:
        flush()
        clock()
        if checkpoint_dir:
            save()
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
