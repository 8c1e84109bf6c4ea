"""Fine-tuning a classifier: the loop of the book's appendix E, with checkpoints.

The loop is ``train_classifier_simple`` of Raschka's chapter 6 / appendix E:
each step runs forward, the cross-entropy of the logits at one position per text,
backward and AdamW; every ``eval_freq`` steps (starting at step 0, as the book's
global_step starts at -1) the mean loss over ``eval_iter`` training and validation
batches is recorded; after each epoch, the accuracy over ``eval_iter`` batches.

Beyond the book:
- checkpoints (adapter + optimizer + loop state) written atomically after every
  epoch and on Ctrl-C, from which ``resume`` continues to the same result;
- a NaN/inf loss stops the run with TrainingDiverged, keeping the last good checkpoint;
- ``pool="last_real"`` reads the last real token instead of the last position.
Library code does not print: progress goes to the ``log`` callback and a tqdm bar
(on a terminal only).
"""

import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .adapters import load_adapter, write_adapter
from .backend import to_numpy
from .files import atomic_folder, recover_folder
from .layers import cross_entropy_backward, cross_entropy_forward

POOLS = ("last", "last_real")


class TrainingDiverged(RuntimeError):
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
    eval_iter: int = 5  # batches per evaluation (losses and epoch accuracies)
    pool: str = "last"  # "last": position -1, as the book; "last_real": the last real token
    max_grad_norm: float = None  # clip gradients to this global norm (None: off, as the book)
    sync_every: int = None  # read losses back to the host every N steps (None: 1 on CPU, eval_freq on GPU)

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        for name in ("epochs", "eval_freq", "eval_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class LoopState:
    """Where a run is: enough, with the adapter and the optimizer, to resume exactly."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimizer steps taken
    examples_seen: int = 0
    history: list = field(default_factory=list)  # one dict per step (see train_classifier)
    evals: list = field(default_factory=list)  # {step, epoch, examples_seen, train_loss, val_loss}
    epochs: list = field(default_factory=list)  # {epoch, examples_seen, train_accuracy, val_accuracy}
    done: bool = False
    seconds: float = 0.0  # training-loop wall time, summed over every segment of a resumed run
    segment_seconds: float = 0.0  # the part of `seconds` spent in the latest segment


# ---------------------------------------------------------------------------- one batch


def _positions(idx, last_index, pool):
    return np.full(idx.shape[0], idx.shape[1] - 1) if pool == "last" else np.asarray(last_index)


def batch_logits(model, idx, last_index, pool="last", keep_cache=False):
    """Class logits (B, K) read at one position per text."""
    return model.forward(idx, keep_cache=keep_cache, positions=_positions(idx, last_index, pool))


def train_step(model, opt, idx, labels, last_index, pool="last"):
    """forward, loss, backward, AdamW: one step. Returns the loss as a 0-d array."""
    logits = batch_logits(model, idx, last_index, pool, keep_cache=True)  # [B, K]
    loss, cache = cross_entropy_forward(logits, model.xp.asarray(labels))
    (dlogits,) = cross_entropy_backward(1.0, cache)
    opt.step(model.backward(dlogits))
    return loss


def evaluate(model, batches, num_batches=None, pool="last"):
    """Mean loss and accuracy over the first num_batches of `batches` (all when None)."""
    model.eval()
    losses, correct, total = [], 0, 0
    try:
        for i, (idx, labels, last_index) in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            logits = batch_logits(model, idx, last_index, pool)
            loss, _ = cross_entropy_forward(logits, model.xp.asarray(labels))
            losses.append(float(loss))
            correct += int((to_numpy(logits.argmax(axis=-1)) == labels).sum())
            total += len(labels)
    finally:
        model.train()
    if not total:
        return float("nan"), float("nan")
    return float(np.mean(losses)), correct / total


# ---------------------------------------------------------------------------- the loop


def train_classifier(model, opt, train_loader, val_loader, config=None, *, checkpoint_dir=None,
                     state=None, log=None, progress=None):
    """The book's training loop; returns the final LoopState.

    train_loader / val_loader: minilora.data.BatchLoader (train shuffled per epoch).
    checkpoint_dir: where to keep the latest checkpoint (None: no checkpoints).
    state: a LoopState to continue from (see load_checkpoint); None starts afresh.
    log: a function of one string (None: silent). progress: show a tqdm bar
    (None: only when stderr is a terminal).
    """
    config = config or TrainConfig()
    if len(train_loader) == 0:  # would "train" 0 steps and report NaN accuracies
        raise ValueError(f"the training loader has no batch: {len(train_loader.split)} examples, batch size "
                         f"{train_loader.batch_size}{', last incomplete batch dropped' if train_loader.drop_last else ''}")
    state = state or LoopState()
    log = log or (lambda msg: None)
    bar = _progress_bar(config.epochs * len(train_loader), state.step, progress)
    t_start, seconds_before = time.perf_counter(), state.seconds

    def clock():  # keep the wall time current before every checkpoint
        state.segment_seconds = time.perf_counter() - t_start
        state.seconds = seconds_before + state.segment_seconds

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
            for idx, labels, last_index in train_loader.epoch_batches(state.epoch, start=state.batch):
                loss = train_step(model, opt, idx, labels, last_index, config.pool)
                state.examples_seen += len(labels)
                clock()
                row = {"step": state.step, "epoch": state.epoch + 1, "examples_seen": state.examples_seen,
                       "lr": opt.last_lr, "batch_loss": None, "seconds": round(state.seconds, 3)}
                state.history.append(row)
                pending.append((row, loss))
                if len(pending) >= sync_every:
                    flush()
                if state.step % config.eval_freq == 0:
                    flush()
                    tr = evaluate(model, train_loader.epoch_batches(state.epoch), config.eval_iter, config.pool)
                    va = evaluate(model, val_loader.epoch_batches(0), config.eval_iter, config.pool)
                    state.evals.append({"step": state.step, "epoch": state.epoch + 1,
                                        "examples_seen": state.examples_seen,
                                        "train_loss": tr[0], "val_loss": va[0]})
                    log(f"Ep {state.epoch + 1} (Step {state.step:06d}): "
                        f"Train loss {tr[0]:.3f}, Val loss {va[0]:.3f}")
                state.step += 1
                state.batch += 1
                bar.update(1)
                between_steps()  # a Ctrl-C or SIGTERM received during the step stops here
            flush()
            tr_acc = evaluate(model, train_loader.epoch_batches(state.epoch), config.eval_iter, config.pool)[1]
            va_acc = evaluate(model, val_loader.epoch_batches(0), config.eval_iter, config.pool)[1]
            state.epochs.append({"epoch": state.epoch + 1, "examples_seen": state.examples_seen,
                                 "train_accuracy": tr_acc, "val_accuracy": va_acc})
            log(f"Training accuracy: {tr_acc * 100:.2f}% | Validation accuracy: {va_acc * 100:.2f}%")
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


def save_checkpoint(folder, model, opt, state):
    """Write adapter + optimizer + loop state to `folder`, atomically: everything goes
    to a sibling temporary folder that then replaces `folder` (minilora.files), so a
    crash or a full disk mid-save leaves the previous checkpoint intact."""
    with atomic_folder(folder) as tmp:
        write_adapter(model, tmp / ADAPTER_DIR)  # the checkpoint folder itself is the atomic unit
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
    `folder`; returns the LoopState to pass to train_classifier."""
    folder = Path(folder)
    meta = _read_state(folder)
    load_adapter(model, folder / ADAPTER_DIR)
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    opt_state = dict(meta["optimizer"])
    opt_state["m"] = {k[2:]: a for k, a in tensors.items() if k.startswith("m/")}
    opt_state["v"] = {k[2:]: a for k, a in tensors.items() if k.startswith("v/")}
    opt.load_state_dict(opt_state)
    model._dropout_rng.bit_generator.state = meta["dropout_rng"]
    return LoopState(**meta["loop"])


def read_loop_state(folder):
    """The LoopState of the checkpoint in `folder` alone (how far the run got), cheaply."""
    return LoopState(**_read_state(Path(folder))["loop"])


def _read_state(folder):
    if not has_checkpoint(folder):
        raise FileNotFoundError(f"no checkpoint in {folder}")
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / STATE_FILE} is not valid JSON ({e}): the checkpoint is damaged") from e
