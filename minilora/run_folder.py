"""The run folder (``--output-dir``) of a fine-tuning job: what may start there, and what
``--resume`` may continue.

    run_config.json   the options of the run (a resumed run must use the same ones, but
                      may ask for more epochs)
    checkpoint/       the latest checkpoint (minilora.checkpoint)
"""

import json
from pathlib import Path

from .checkpoint import has_checkpoint, read_loop_state
from .errors import OptionError, RunFolderError
from .files import write_text

RUN_CONFIG_FILE = "run_config.json"
CHECKPOINT_DIR = "checkpoint"


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
