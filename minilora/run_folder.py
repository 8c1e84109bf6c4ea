"""The run folder (``--output-dir``) of a fine-tuning job: one job at a time, what may
start there, and what ``--resume`` may continue.

    .lock             while a job runs there: which job, its process and host (minilora.run_lock)
    run_config.json   the options of the run (a resumed run must use the same ones, but
                      may ask for more epochs), the sha256 of its data file and, for a
                      classifier, its class names (a resumed run must train on the same data)
    checkpoint/       the latest checkpoint (minilora.checkpoint)

A job holds its folder with `hold_run_folder` from the moment it prepares it until it
ends. Whether a folder may be used at all (new, empty, or a run's: it holds
run_config.json) is decided before the lock is taken or anything is removed, so a folder
of other files is refused as it is. Everything --resume refuses (no such folder, no run
there, other options, other data, other classes, fewer epochs than already trained, and
then a checkpoint or base model that does not load) is refused before anything in the
run changes: a new --epochs is written only once the checkpoint has loaded
(PreparedRun.commit).
"""

import dataclasses
import json
import typing
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from .checkpoint import has_checkpoint, read_loop_state
from .errors import OptionError, RunFolderError
from .files import TEMPORARY_NAME, clean_stale_temporaries, file_sha256, write_text
from .run_lock import LOCK_FILE, RunFolderLock
from .schema import Field, Schema, read_json

RUN_CONFIG_FILE = "run_config.json"
CHECKPOINT_DIR = "checkpoint"

# What run_config.json records of the data besides the options. A run folder written
# before these keys existed lacks them: it keeps resuming, without the check they allow.
DATA_KEYS = {
    "data_sha256": Field("str", required=False),  # of the file the data was read from (the cached default too)
    "class_names": Field("list", items=Field("str"), required=False),  # a classifier's, in label order
}
# JSON kinds of the options' declared types
_KINDS = {str: "str", int: "int", float: "number", bool: "bool"}
# options declared as a string that __post_init__ may turn into a list of names
# ("c_attn.q,out_head" -> ["c_attn.q", "out_head"]): a string or a list of strings in the file
_NAMES_OR_WORD = ("targets",)


@dataclasses.dataclass
class PreparedRun:
    """What prepare_run_folder decided for a job: `resume` (True: continue the checkpoint
    in the folder), and what the job's start still has to write in run_config.json.

    A resumed run whose --epochs differs from the run's records it only with `commit`,
    which the job calls once the checkpoint has loaded (the base model and every file of
    the checkpoint checked): a run refused until then keeps the run_config.json its
    checkpoint was written with.
    """

    resume: bool
    config_path: Path = None
    pending: dict = None  # the run_config.json to write on commit (None: nothing to write)
    note: str = None  # what commit logs when it writes

    def commit(self, log):
        """Write the pending run_config.json, once (nothing when there is none)."""
        if self.pending is None:
            return
        write_text(self.config_path, json.dumps(self.pending, indent=2))
        if self.note:
            log(self.note)
        self.pending = self.note = None


@contextmanager
def hold_run_folder(out, opts, log, job, data_file=None, class_names=None):
    """Hold the run folder `out` for the whole of a job: `with` it around the job's work.

    Yields what prepare_run_folder returns (a PreparedRun: its `resume`, and its `commit`
    for the job to call once training has started from the checkpoint), holding the
    folder's lock (minilora.run_lock) until the block ends, by an error or Ctrl-C too; a
    second job on the folder meanwhile is refused with one line naming this one.
    `job` names the job in that line ("minilora finetune"); `data_file` and `class_names`
    are what prepare_run_folder records and checks.
    """
    out = Path(out)
    # before the lock, which makes the folder and its lock file, and before the cleaning,
    # which removes files: a folder minilora may not use is refused as it is
    _check_output_dir(out, opts)
    with RunFolderLock(out, job, log):
        # holding the lock of a folder that is new, empty or a run's, this job is the
        # folder's one writer: every temporary left in it (.run_config.json.<random>.part,
        # .adapter.<random>.part/, ...) is a killed run's
        for path in clean_stale_temporaries(out):
            log(f"Removed {path.name}, left in {out} by a run that was killed while writing it")
        yield prepare_run_folder(out, opts, log, data_file=data_file, class_names=class_names)


def prepare_run_folder(out, opts, log, data_file=None, class_names=None):
    """Make the run folder `out` ready for the job of `opts` (a JobOptions); returns a
    PreparedRun (its `resume`: True when a checkpoint there is to be resumed). Call it
    holding the folder (hold_run_folder).

    A fresh run needs an empty or new folder, and records its options, the sha256 of
    `data_file` and `class_names` in run_config.json. --resume needs a run there with the
    same options (type(opts).RESUME_KEYS), the same data (the file's sha256) and the same
    class names, except --epochs, which may grow to extend the run (written by the
    PreparedRun's commit); it starts afresh, saying so, when the run wrote no checkpoint
    yet. A refusal changes nothing on disk.
    """
    out = Path(out)
    _check_output_dir(out, opts)
    data = {"data_sha256": file_sha256(data_file) if data_file is not None else None,
            "class_names": list(class_names) if class_names is not None else None}
    if opts.resume:
        return _prepare_resume(out, opts, log, data, data_file)
    cfg_path = out / RUN_CONFIG_FILE
    if cfg_path.exists() and _other_entries(out):  # a run got under way
        raise RunFolderError(f"{out} already holds a run: pass --resume to continue it, or choose "
                             f"another --output-dir")
    recorded = {k: v for k, v in data.items() if v is not None}
    write_text(cfg_path, json.dumps({**_options(opts), "epochs": opts.epochs, **recorded}, indent=2))
    return PreparedRun(resume=False)


def _other_entries(out):
    """The names in `out` other than run_config.json and the lock file (sorted)."""
    return sorted(p.name for p in out.iterdir() if p.name not in (RUN_CONFIG_FILE, LOCK_FILE))


def _check_output_dir(out, opts):
    """Refuse, reading only, an --output-dir the job may not use: a file; for --resume, no
    folder or no run in it; for a fresh run, a folder that is neither empty nor a run's.

    Empty means holding nothing but what a fresh run killed before its run_config.json
    was in place can have left: the lock file (RunFolderLock refuses one that is not a
    minilora job's) and temporaries of run_config.json. A folder holding run_config.json
    is a run's: what else it holds is decided holding its lock (prepare_run_folder).
    """
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--output-dir {out} is a file, not a folder")
    if opts.resume and not out.exists():
        raise RunFolderError(f"--resume: {out} does not exist; to start a run there, drop --resume")
    cfg_path = out / RUN_CONFIG_FILE
    if not out.exists() or cfg_path.is_file():
        return
    others = [name for name in _other_entries(out) if not _run_config_temporary(name)]
    if opts.resume:
        raise RunFolderError(f"--resume: {out} holds no run to continue ({cfg_path} is missing); "
                             + ("give the folder of a run, or drop --resume and choose an empty --output-dir"
                                if others else "to start a run there, drop --resume"))
    if others:
        raise RunFolderError(f"{out} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) "
                             f"and holds no run ({cfg_path} is missing): choose an empty or new --output-dir")


def _run_config_temporary(name):
    match = TEMPORARY_NAME.fullmatch(name)
    return match is not None and match["name"] == RUN_CONFIG_FILE


def _options(opts):
    return {k: getattr(opts, k) for k in type(opts).RESUME_KEYS}


def _prepare_resume(out, opts, log, data, data_file):
    """prepare_run_folder's --resume: every check, and the one change (a new --epochs) left
    pending for the PreparedRun's commit. _check_output_dir has seen run_config.json."""
    cfg_path = out / RUN_CONFIG_FILE
    saved = read_json(cfg_path, run_config_schema(type(opts)))
    wanted = _options(opts)
    diff = [f"{k}: {saved[k]!r} -> {wanted[k]!r}" for k in wanted if saved[k] != wanted[k]]
    if diff:
        raise RunFolderError(f"--resume: {out} holds a run with other options ({'; '.join(diff)}); resume "
                             f"with the same ones or use another --output-dir")
    _check_same_data(out, saved, data, data_file)
    ckpt = out / CHECKPOINT_DIR
    resume = has_checkpoint(ckpt)
    note = None
    if resume:
        state = read_loop_state(ckpt)
        started = state.epoch + (1 if state.batch else 0)  # epochs done or under way
        if started > opts.epochs:
            raise OptionError(f"--epochs {opts.epochs}: the run in {out} has already trained "
                              f"{started} epoch(s); resume with --epochs {started} or more")
        if opts.epochs > saved["epochs"]:
            note = f"Extending the run in {out} from {saved['epochs']} to {opts.epochs} epochs"
    else:
        log(f"{out} has no checkpoint yet (none in {ckpt}): starting the run afresh")
    if opts.epochs == saved["epochs"]:
        return PreparedRun(resume=resume)
    # absent data keys stay absent: the data an older run started with is not known
    kept = {k: v for k, v in saved.items() if not (k in DATA_KEYS and v is None)}
    return PreparedRun(resume=resume, config_path=cfg_path, pending={**kept, "epochs": opts.epochs}, note=note)


def _check_same_data(out, saved, data, data_file):
    """Refuse to continue on data other than the run's (when the run recorded it)."""
    had, has = saved["class_names"], data["class_names"]
    if had is not None and has is not None and had != has:
        raise RunFolderError(f"--resume: the run in {out} classifies {had}, the data ({data_file}) now holds "
                             f"the classes {has}; resume with the data the run started with, or start a new "
                             f"run in another --output-dir")
    had, has = saved["data_sha256"], data["data_sha256"]
    if had is not None and has is not None and had != has:
        raise RunFolderError(f"--resume: {data_file} changed since the run in {out} started (sha256 "
                             f"{has[:12]}..., the run's {had[:12]}...); resume with the data the run started "
                             f"with, or start a new run in another --output-dir")


@lru_cache(maxsize=None)
def run_config_schema(job_class):
    """The Schema of a job's run_config.json, derived from its options class: each of
    RESUME_KEYS with its field's declared type (nullable where the default is None) and
    CHOICES, absent only where RESUME_DEFAULTS says what an older folder ran with; the
    epochs; and DATA_KEYS. Any other key is refused."""
    types = typing.get_type_hints(job_class)
    defaults = {f.name: f.default for f in dataclasses.fields(job_class)}
    fields = {}
    for key in job_class.RESUME_KEYS:
        kind = "any" if key in _NAMES_OR_WORD else _KINDS[types[key]]
        fields[key] = Field(kind, required=key not in job_class.RESUME_DEFAULTS, nullable=defaults[key] is None,
                            choices=job_class.CHOICES.get(key))
    fields["epochs"] = Field("int", least=1)
    fields.update(DATA_KEYS)
    relations = tuple(_names_or_word(key) for key in job_class.RESUME_KEYS if key in _NAMES_OR_WORD)
    return Schema(f"run config ({job_class.__name__})", fields, relations=relations,
                  defaults={**job_class.RESUME_DEFAULTS, **dict.fromkeys(DATA_KEYS)})


def _names_or_word(key):
    def check(data):
        value = data[key]
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return None
        return key, f"expected a string or a list of strings, found {json.dumps(value)[:60]}"
    return check

