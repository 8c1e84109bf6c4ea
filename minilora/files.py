"""The one way minilora writes a file or a folder: whole, or not at all.

Everything the project writes (checkpoints, adapters, metrics, history, plots,
downloads, the tokenizer cache, saved models) goes through `atomic_path` or
`atomic_folder`. The content is written under a temporary name in the destination's
own folder (``.<name>.<random>.part``) and renamed into place with ``os.replace``
only when it is complete; a rename within one file system is atomic on POSIX and
Windows, so a reader sees the old file or the new one, never half of one.

On any failure (an exception, Ctrl-C) the temporary is removed. An OSError from
the file system (no space left, a read-only disk, a file where a folder should be,
no permission) becomes a `WriteError`: one line naming the path, which the command
line prints as is, with the option that chose the path.
"""

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import MiniloraError

# What a write can fail with: the file system's OSError, and safetensors' own error type,
# which it raises for I/O failures too ("I/O error: No space left on device (os error 28)").
WRITE_FAILURES = (OSError, SafetensorError)


class WriteError(MiniloraError, RuntimeError):
    """A file or folder could not be written; `path` is where, `errno` why (or None)."""

    def __init__(self, path, exc):
        self.path, self.errno = Path(path), getattr(exc, "errno", None)
        os_error = re.search(r"os error (\d+)", str(exc)) if isinstance(exc, SafetensorError) else None
        if isinstance(exc, WriteError):
            self.reason = exc.reason
        elif os_error:  # safetensors' I/O error: the errno's own words, as an OSError says them
            self.errno = int(os_error.group(1))
            self.reason = os.strerror(self.errno)
        else:
            self.reason = getattr(exc, "strerror", None) or str(exc)
        super().__init__(f"cannot write {path}: {self.reason}")


def _temporary(path, folder=False):
    """A new temporary file (or folder) beside `path`: the same file system, so the
    rename is atomic, and a name no other writer can have."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = dict(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    if folder:
        return Path(tempfile.mkdtemp(**names))
    fd, name = tempfile.mkstemp(**names)
    os.close(fd)  # the caller's writer opens it by name
    return Path(name)


@contextmanager
def atomic_path(path):
    """Yield a temporary file path beside `path`; when the block ends without an error
    it is renamed to `path`. The block writes the temporary in whatever way it likes
    (``save_file(tensors, tmp)``, ``fig.savefig(tmp)``, ``open(tmp, "wb")``).

        with atomic_path("run/metrics.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = None
    try:
        tmp = _temporary(path)
        yield tmp
        os.replace(tmp, path)
    except WRITE_FAILURES as exc:
        raise WriteError(path, exc) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # already renamed unless something failed


def write_text(path, text):
    """Write a text file (UTF-8) atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_folder(folder):
    """Yield an empty temporary folder beside `folder`; when the block ends without an
    error it takes the place of `folder` (replacing a previous one).

    Two renames are needed to replace a folder: the previous one first becomes
    ``<folder>.old`` and is deleted once the new one is in place. A crash between the
    two leaves ``<folder>.old`` complete; `recover_folder` puts it back.
    """
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    tmp = None
    try:
        tmp = _temporary(folder, folder=True)
        yield tmp
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except (*WRITE_FAILURES, WriteError) as exc:  # name the folder, not a file inside its temporary
        raise WriteError(folder, exc) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # already renamed unless something failed


def recover_folder(folder, complete):
    """Put `<folder>.old` back when a crash in `atomic_folder` left no `folder`.
    `complete(path)` says whether a folder holds a whole copy."""
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    if not complete(folder) and complete(old):
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(old, folder)
    return complete(folder)
