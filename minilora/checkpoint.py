"""Training checkpoints: where a run is (LoopState), its adapter or trained weights, and
its optimizer, written as one folder and read back to resume bit for bit.

A checkpoint folder (``<run>/checkpoint/``) holds:

    state.json              the loop state, the optimizer's step count and settings, the
                            dropout generator's state (STATE_SCHEMA)
    optimizer.safetensors   AdamW's first and second moments, ``m/<name>`` and ``v/<name>``
    adapter/                the LoRA adapter (minilora.adapters) with the job's settings
                            (base model, class names, max length, padding, batching,
                            pooling): after a crash it is usable on its own, as the final
                            adapter is; or, for full fine-tuning,
    trained.safetensors     the trained parameters themselves
    manifest.json           every other file with its size and sha256, written last

Writing: save_checkpoint refuses a state holding NaN or inf (NotFiniteError: nothing is
written, the previous checkpoint stays), removes what killed writes of this checkpoint
left behind, and writes everything into a temporary sibling folder, the manifest last,
that then replaces the old one whole (minilora.files.atomic_folder), so a crash mid-save
leaves the previous checkpoint intact.

Reading checks everything before the model or the optimizer changes: the manifest (each
file there with its size and hash, and no other that loading reads), state.json whole
(minilora.schema), the moments against the parameters the model will train once the
adapter is attached (one m and one v each, of its shape, floating point, finite), trained
weights alike. The first problem is one line naming the file (CheckpointStateError).
"""

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .adapters import load_adapter, read_adapter, write_adapter
from .backend import get_array_module, to_numpy
from .errors import CheckpointStateError, MiniloraError
from .files import atomic_folder, clean_stale_temporaries, file_sha256, recover_folder
from .schema import Field, FileCheckError, Schema, read_json, strict_json

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_DIR = "adapter"
TRAINED_FILE = "trained.safetensors"  # full fine-tuning (no LoRA): the trained parameters themselves
MANIFEST_FILE = "manifest.json"


class NotFiniteError(MiniloraError, ValueError):
    """A model or optimizer state holding NaN or inf, which save_checkpoint refuses to
    write: a checkpoint that could not be resumed must not replace one that can."""


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
        """A LoopState from its saved dict, checked whole against LOOP_SCHEMA; a field the
        dict lacks takes the value that a state written before the field existed means
        (tokens_seen: None, not counted; task: the classifier)."""
        try:
            return cls(**LOOP_SCHEMA.check(saved, source, prefix="loop."))
        except FileCheckError as e:
            raise CheckpointStateError(str(e)) from None


# ---------------------------------------------------------------------------- state.json, checked whole

_COUNT = Field("int", least=0)
_TOKENS = Field("int", least=0, nullable=True, required=False)  # absent from states older than tokens_seen
# losses and accuracies: a NaN (an evaluation over no batch) is written as null, which JSON can hold
_MEASURED = Field("number", nullable=True)

# a step's row; "seconds" (the training wall time at the end of the step) is absent from the
# rows of checkpoints written before it was recorded (bc371a2): not measured, None (null once
# such a run is saved again), an empty cell in history.csv
HISTORY_ROW = Schema("history row", {
    "step": _COUNT, "epoch": Field("int", least=1), "examples_seen": _COUNT, "tokens_seen": _TOKENS,
    "lr": Field("number", least=0), "batch_loss": _MEASURED,
    "seconds": Field("number", least=0, nullable=True, required=False),
}, defaults={"tokens_seen": None, "seconds": None})
EVAL_ROW = Schema("evaluation row", {
    "step": _COUNT, "epoch": Field("int", least=1), "examples_seen": _COUNT, "tokens_seen": _TOKENS,
    "train_loss": _MEASURED, "val_loss": _MEASURED})
# an epoch's row also holds what its task's end_of_epoch recorded (the classifier: accuracies),
# which only the task knows: those keys are kept as they are
EPOCH_ROW = Schema("epoch row", {"epoch": Field("int", least=1), "examples_seen": _COUNT, "tokens_seen": _TOKENS},
                   extra="ignore")

# LoopState's fields (a test holds the two equal). All but tokens_seen and task were in
# the first checkpoints minilora wrote (27f9966): only those two may be absent. Of the rows,
# a history row's seconds may be absent too (HISTORY_ROW), and tokens_seen of every row.
LOOP_SCHEMA = Schema("loop state", {
    "epoch": _COUNT, "batch": _COUNT, "step": _COUNT, "examples_seen": _COUNT, "tokens_seen": _TOKENS,
    "task": Field("str", required=False),
    "history": Field("list", items=Field("dict", schema=HISTORY_ROW)),
    "evals": Field("list", items=Field("dict", schema=EVAL_ROW)),
    "epochs": Field("list", items=Field("dict", schema=EPOCH_ROW)),
    "done": Field("bool"), "seconds": Field("number", least=0), "segment_seconds": Field("number", least=0),
}, defaults={"tokens_seen": None, "task": "classification"})


def _betas_below_one(d):
    betas = d["betas"]
    if len(betas) != 2 or not all(b < 1 for b in betas):  # AdamW's own limits
        return "betas", f"expected two numbers in [0, 1), found {json.dumps(betas)}"
    return None


# AdamW.state_dict() less the moments, which optimizer.safetensors holds
OPTIMIZER_SCHEMA = Schema("optimizer state", {
    "step": _COUNT, "betas": Field("list", items=Field("number", least=0)), "eps": Field("number", least=0),
    "weight_decay": Field("number", least=0), "max_grad_norm": Field("number", above=0, nullable=True),
}, relations=(_betas_below_one,))

# numpy's PCG64 (what default_rng makes) state: two 128-bit integers and a buffered 32-bit one
_U128 = Field("int", least=0, most=2 ** 128 - 1)
RNG_SCHEMA = Schema("dropout generator state", {
    "bit_generator": Field("str", choices=("PCG64",)),
    "state": Field("dict", schema=Schema("PCG64 state", {"state": _U128, "inc": _U128})),
    "has_uint32": Field("int", least=0, most=1), "uinteger": Field("int", least=0, most=2 ** 32 - 1)})

STATE_SCHEMA = Schema("checkpoint state", {
    "loop": Field("dict", schema=LOOP_SCHEMA), "optimizer": Field("dict", schema=OPTIMIZER_SCHEMA),
    "dropout_rng": Field("dict", schema=RNG_SCHEMA)})


# ---------------------------------------------------------------------------- manifest.json

MANIFEST_FORMAT = "minilora-checkpoint/1"


def _inside_the_folder(entry):
    path = entry["path"]
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or "\\" in path or ".." in parts or path == MANIFEST_FILE:
        return "path", f"expected the path of a file inside the checkpoint folder, found {json.dumps(path)}"
    if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        return "sha256", f"expected 64 hexadecimal digits, found {json.dumps(entry['sha256'])[:70]}"
    return None


def _each_path_once(d):
    paths = [e["path"] for e in d["files"]]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    return ("files", f"expected each file once, found {twice[0]} {paths.count(twice[0])} times") if twice else None


MANIFEST_SCHEMA = Schema("checkpoint manifest", {
    "format": Field("str", choices=(MANIFEST_FORMAT,)),
    "files": Field("list", min_items=1, items=Field("dict", schema=Schema("manifest entry", {
        "path": Field("str"), "size": _COUNT, "sha256": Field("str")}, relations=(_inside_the_folder,)))),
}, relations=(_each_path_once,))


# ---------------------------------------------------------------------------- writing


def save_checkpoint(folder, model, opt, state, adapter_settings=None):
    """Write adapter (or, for a model without LoRA, its trainable parameters) + optimizer
    + loop state + manifest to `folder`, atomically: everything goes to a sibling
    temporary folder that then replaces `folder` (minilora.files), so a crash or a full
    disk mid-save leaves the previous checkpoint intact.

    adapter_settings: what the job's final save_adapter records (base_model, class_names,
    max_length, pool, pad, batching), recorded in the checkpoint's adapter too.
    A parameter or moment holding NaN or inf raises NotFiniteError before anything is
    written. Temporaries of earlier writes of this checkpoint that were killed (kill -9)
    are removed first: a checkpoint folder has one writer, so none is in use."""
    folder = Path(folder)
    opt_state = opt.state_dict()
    moments = {f"m/{n}": a for n, a in opt_state.pop("m").items()}
    moments.update({f"v/{n}": a for n, a in opt_state.pop("v").items()})
    _refuse_non_finite(model, moments)
    clean_stale_temporaries(folder.parent, names=[folder.name])
    with atomic_folder(folder) as tmp:
        if model.lora is not None:
            # the checkpoint folder itself is the atomic unit
            write_adapter(model, tmp / ADAPTER_DIR, **(adapter_settings or {}))
        else:
            save_file({n: np.ascontiguousarray(to_numpy(model.params[n])) for n in model.trainable},
                      str(tmp / TRAINED_FILE))
        save_file({k: np.ascontiguousarray(a) for k, a in moments.items()}, str(tmp / OPTIMIZER_FILE))
        meta = {"loop": asdict(state), "optimizer": opt_state,
                "dropout_rng": model._dropout_rng.bit_generator.state}
        (tmp / STATE_FILE).write_text(strict_json(meta, indent=None))
        _write_manifest(tmp)  # last: a folder with a manifest is a whole checkpoint


def _refuse_non_finite(model, moments):
    """NotFiniteError naming the first trained parameter or moment holding NaN or inf.
    One pass over the trained values and their moments, on the model's device: about 10 ms
    for gpt2-small's LoRA adapters, once an epoch."""
    for name in model.trainable:
        array = model.params[name]
        if not bool(get_array_module(array).isfinite(array).all()):
            raise NotFiniteError(f"the parameter {name} holds NaN or inf")
    for key, array in moments.items():
        if not np.isfinite(array).all():
            raise NotFiniteError(f"the optimizer's moment {key} holds NaN or inf")


def _write_manifest(folder):
    """manifest.json in `folder`: every file below it (its path with "/", size, sha256).
    Hashing reads the files back once, from the page cache: 0.03 s for gpt2-small's LoRA
    checkpoint (32 MB: the adapter and its two moments) on the 2-core CPU, where writing
    them takes 0.05 s; about 1 s per GB (4 s a save for a full fine-tuning of gpt2-medium)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": file_sha256(p)}
               for p in files]
    text = json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1)
    (folder / MANIFEST_FILE).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------- is there a whole one?


def _looks_like_checkpoint(folder):
    """What atomic_folder's recovery needs: a folder that is a checkpoint (a manifest, or
    the state.json of one written before manifests existed)."""
    return (folder / MANIFEST_FILE).is_file() or (folder / STATE_FILE).is_file()


def has_checkpoint(folder):
    """Whether `folder` holds a checkpoint: False when it holds none (no such folder);
    True when it holds a whole one (every file as its manifest lists it); otherwise
    CheckpointStateError naming the first damaged file. A damaged checkpoint must not
    pass for none: --resume would then start afresh and replace it."""
    folder = Path(folder)
    # a crash between atomic_folder's two renames leaves the previous checkpoint set aside
    # (.<name>.<random>.old; <name>.old from older versions): put it back
    if not recover_folder(folder, _looks_like_checkpoint):
        if folder.exists():  # something is there, and minilora did not write it as a checkpoint
            raise CheckpointStateError(f"{folder} is not a checkpoint folder (no {MANIFEST_FILE} or {STATE_FILE} "
                                       f"in it): the checkpoint is damaged")
        return False
    if (folder / MANIFEST_FILE).is_file():
        _verify_manifest(folder)
    # else a checkpoint written before manifests existed: it still loads, its files checked
    # one by one as they are read (state.json's schema; the tensors' names, shapes, values)
    return True


# sha256 of the files verified in this process, by (path, device, inode, size, mtime): a
# resume verifies the checkpoint three times (the run folder's check, its loop state, the
# load), and a file that has not changed since need not be read again
_verified = {}


def _sha256_once(path):
    st = path.stat()
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _verified:
        _verified[key] = file_sha256(path)
    return _verified[key]


def _read_on_resume(relative):
    """Whether loading a checkpoint reads the file at `relative` (a path inside the
    checkpoint folder), or would read it were it there: state.json, the optimizer's moments,
    trained weights (whose presence alone switches to the full fine-tuning path), and the
    adapter's files, which read_adapter chooses among by name (its config, an older
    minilora's, PEFT's). Anything else (Finder's .DS_Store, Explorer's Thumbs.db) is never
    read; it goes with the folder when the next checkpoint replaces it whole."""
    parts = relative.parts
    if len(parts) == 1:
        return parts[0] in (STATE_FILE, OPTIMIZER_FILE, TRAINED_FILE)
    # in adapter/ only files read by name are read: a hidden one (.DS_Store) never is
    return parts[0] == ADAPTER_DIR and len(parts) == 2 and not parts[1].startswith(".")


def _verify_manifest(folder):
    """CheckpointStateError naming the first file of `folder` that is not as manifest.json
    lists it: missing, of another size (truncated), another content (altered), or one the
    manifest does not list that loading would read (_read_on_resume); a file loading never
    reads (Finder's .DS_Store) is no part of the checkpoint and is left alone. Sizes first
    (no reading), then the hashes."""
    manifest = _read_checked(folder / MANIFEST_FILE, MANIFEST_SCHEMA)
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            raise CheckpointStateError(f"{path}: missing, the manifest lists it: the checkpoint is damaged")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointStateError(f"{path}: {size:,} bytes, the manifest says {entry['size']:,}: "
                                       f"the checkpoint is damaged")
    listed = {e["path"] for e in manifest["files"]}
    unlisted = sorted(p for p in folder.rglob("*") if p.is_file() and _read_on_resume(p.relative_to(folder))
                      and p.relative_to(folder).as_posix() not in listed)
    if unlisted:
        raise CheckpointStateError(f"{unlisted[0]}: not in the manifest (minilora did not write it there): "
                                   f"the checkpoint is damaged")
    for entry in manifest["files"]:
        path = folder / entry["path"]
        digest = _sha256_once(path)
        if digest != entry["sha256"]:
            raise CheckpointStateError(f"{path}: sha256 {digest[:12]}..., the manifest says {entry['sha256'][:12]}...: "
                                       f"it changed after it was written: the checkpoint is damaged")


# ---------------------------------------------------------------------------- reading


def load_checkpoint(folder, model, opt):
    """Restore adapter (into a model without LoRA) or trained weights, optimizer and
    dropout generator from `folder`; returns the LoopState to pass to train.

    Every file is checked first (see the module docstring): on any problem, one line
    (CheckpointStateError, AdapterError) and the model, the optimizer and the generator
    are as they were."""
    folder = Path(folder)
    meta = _read_state(folder)
    trained = None
    if (folder / TRAINED_FILE).is_file():
        trained = _read_tensors(folder / TRAINED_FILE)
        shapes = _trained_shapes(model, trained, folder / TRAINED_FILE)
    else:
        # the parameters the model will train once the adapter is attached: the adapter's
        # lora_A / lora_B (load_adapter refuses an adapter that does not fit the model)
        adapter = read_adapter(folder / ADAPTER_DIR)
        shapes = {n: a.shape for n, a in adapter[1].items() if n.endswith((".lora_A", ".lora_B"))}
    moments = _read_moments(folder / OPTIMIZER_FILE, shapes, meta["optimizer"]["step"])
    generator = _checked_generator(model, meta["dropout_rng"], folder / STATE_FILE)
    # everything is checked: now the model, the optimizer and the generator change
    if trained is not None:
        for name, array in trained.items():
            model.params[name][...] = model.xp.asarray(array)  # in place: the optimizer holds no copies
    else:
        load_adapter(model, folder / ADAPTER_DIR, contents=adapter)
    opt.load_state_dict({**meta["optimizer"], **moments})
    model._dropout_rng.bit_generator.state = generator
    return LoopState(**meta["loop"])


def read_loop_state(folder):
    """The LoopState of the checkpoint in `folder` alone (how far the run got)."""
    return LoopState(**_read_state(Path(folder))["loop"])


def _read_state(folder):
    """state.json of the whole checkpoint in `folder`, checked against STATE_SCHEMA."""
    if not has_checkpoint(folder):
        raise FileNotFoundError(f"no checkpoint in {folder}")
    return _read_checked(folder / STATE_FILE, STATE_SCHEMA)


def _read_checked(path, schema):
    if not path.is_file():
        raise CheckpointStateError(f"{path} is missing: the checkpoint is damaged")
    try:
        return read_json(path, schema)
    except FileCheckError as e:
        raise CheckpointStateError(str(e)) from None


def _read_tensors(path):
    """A safetensors file of the checkpoint as NumPy arrays, or one line saying why not."""
    if not path.is_file():
        raise CheckpointStateError(f"{path} is missing: the checkpoint is damaged")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:  # what safetensors raises for a broken file
        raise CheckpointStateError(f"{path} is not a readable safetensors file ({e}): the checkpoint is "
                                   f"damaged") from None


def _check_tensor(path, key, array, shape):
    """One stored tensor against the parameter it belongs to: shape, floating point, finite."""
    if tuple(array.shape) != tuple(shape):
        raise CheckpointStateError(f"{path}: {key} has shape {tuple(array.shape)}, the parameter's is "
                                   f"{tuple(shape)}: the checkpoint is not this model's")
    if not np.issubdtype(array.dtype, np.floating):
        raise CheckpointStateError(f"{path}: {key} is {array.dtype}, expected floating point: the checkpoint "
                                   f"is damaged")
    if not np.isfinite(array).all():
        raise CheckpointStateError(f"{path}: {key} holds NaN or inf: the checkpoint is damaged")


def _trained_shapes(model, tensors, path):
    """The shapes of a full fine-tuning checkpoint's parameters, checked: exactly the
    model's trainable set, each of its parameter's shape, floating point, finite."""
    if set(tensors) != set(model.trainable):
        missing, extra = sorted(set(model.trainable) - set(tensors)), sorted(set(tensors) - set(model.trainable))
        raise CheckpointStateError(f"{path}: not this model's trained parameters (missing {missing[:3]}, "
                                   f"unknown {extra[:3]})")
    shapes = {n: model.params[n].shape for n in model.trainable}
    for name, array in tensors.items():
        _check_tensor(path, name, array, shapes[name])
    return shapes


def _read_moments(path, shapes, step):
    """AdamW's moments from optimizer.safetensors, checked against the parameters to train
    (`shapes`): exactly one m/<name> and one v/<name> for each, of its shape, floating
    point, finite. Returns {"m": {...}, "v": {...}} for load_state_dict."""
    tensors = _read_tensors(path)
    if step == 0 and not tensors:  # saved before the first step: AdamW has no moments yet
        return {"m": {}, "v": {}}
    expected = {f"{kind}/{name}": shape for kind in ("m", "v") for name, shape in shapes.items()}
    for key in expected:
        if key not in tensors:
            raise CheckpointStateError(f"{path}: {key} missing: the checkpoint is damaged")
    for key, array in tensors.items():
        if key not in expected:
            raise CheckpointStateError(f"{path}: {key} is not a moment of a parameter this model trains: "
                                       f"the checkpoint is not this model's")
        _check_tensor(path, key, array, expected[key])
    return {kind: {key[2:]: a for key, a in tensors.items() if key.startswith(kind + "/")} for kind in ("m", "v")}


def _checked_generator(model, state, path):
    """The dropout generator's saved state, tried on a scratch generator of the model's
    kind first (numpy checks what the schema cannot), so that a bad one changes nothing."""
    scratch = type(model._dropout_rng.bit_generator)()
    try:
        scratch.state = state
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointStateError(f"{path}: dropout_rng: not a state of the model's dropout generator ({e})") from None
    return state
