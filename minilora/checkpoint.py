"""Training checkpoints: where a run is (LoopState), its adapter or trained weights, and
its optimizer, written as one folder and read back to resume bit for bit.

A checkpoint folder (``<run>/checkpoint/``) holds:

    state.json              the loop state, the optimizer's step count and settings, the
                            dropout generator's state
    optimizer.safetensors   AdamW's first and second moments, ``m/<name>`` and ``v/<name>``
    adapter/                the LoRA adapter (minilora.adapters), or for full fine-tuning
    trained.safetensors     the trained parameters themselves

save_checkpoint writes it into a temporary sibling folder that then replaces the old
one whole (minilora.files.atomic_folder), so a crash mid-save leaves the previous
checkpoint intact.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .adapters import load_adapter, write_adapter
from .backend import to_numpy
from .errors import CheckpointStateError
from .files import atomic_folder, recover_folder

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
