"""The one way minilora writes a file or a folder: whole, or not at all.

Everything the project writes (checkpoints, adapters, metrics, history, plots,
downloads, the tokenizer cache, saved models) goes through `atomic_path` or
`atomic_folder`. The content is written under a temporary name in the destination's
own folder (``.<name>.<random>.part``) and renamed into place with ``os.replace``
only when it is complete; a rename within one file system is atomic on POSIX and
Windows, so a reader sees the old file or the new one, never half of one.

On any failure (an exception, Ctrl-C) the temporary is removed. A writer killed
outright (kill -9, the out-of-memory killer, a power cut) cannot remove it: the next
writer that knows itself the folder's only one does (`clean_stale_temporaries`: a
checkpoint's own, a held run folder). Replacing a folder sets the previous one aside
under a name of the same kind (``.<name>.<random>.old``) until the new one is in
place, so minilora never removes a name a user could have chosen (``exp.old``).

An OSError from the file system (no space left, a read-only disk, a file where a
folder should be, no permission) becomes a `WriteError`: one line naming the path,
which the command line prints as is, with the option that chose the path.
"""

import hashlib
import os
import re
import secrets
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


# The name of a temporary: "." + the destination's name + "." + tempfile's 8 random
# characters + ".part" (what _temporary makes).
TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.part")
# The name a folder being replaced is set aside under (what _aside makes): the same shape,
# ending in ".old". Only minilora makes such a name, so only these are ever removed or put back.
ASIDE_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.old")

# The temporaries this process has made and not yet renamed or removed (real paths): the
# ones clean_stale_temporaries must leave alone.
_live_temporaries = set()


def _temporary(path, folder=False):
    """A new temporary file (or folder) beside `path`: the same file system, so the
    rename is atomic, and a name no other writer can have."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = dict(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    if folder:
        tmp = Path(tempfile.mkdtemp(**names))
    else:
        fd, name = tempfile.mkstemp(**names)
        os.close(fd)  # the caller's writer opens it by name
        tmp = Path(name)
    _live_temporaries.add(os.path.realpath(tmp))
    return tmp


def _done_with(tmp):
    """`tmp` is renamed into place or removed: no longer this process's."""
    if tmp is not None:
        _live_temporaries.discard(os.path.realpath(tmp))


def _aside(folder):
    """A free name beside `folder` to set it aside under while its replacement moves in
    (``.<name>.<8 random hex digits>.old``), counted as this process's temporary."""
    while True:
        old = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.old")
        if not os.path.lexists(old):
            _live_temporaries.add(os.path.realpath(old))
            return old


def _asides_of(folder):
    """The copies of `folder` set aside beside it that no write of this process is using:
    left by a write killed between atomic_folder's renames, or before it removed the copy."""
    try:
        entries = list(folder.parent.iterdir())
    except OSError:
        return []
    return [p for p in entries if (m := ASIDE_NAME.fullmatch(p.name)) and m["name"] == folder.name
            and os.path.realpath(p) not in _live_temporaries]


def _remove(path):
    """Remove a file or a folder (not what a link points at); False when it cannot be."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        return False
    return True


def clean_stale_temporaries(folder, names=None):
    """Remove the temporaries (``.<name>.<random>.part``) that killed writers left in
    `folder` (not in its subfolders), and the previous copies they set aside
    (``.<name>.<random>.old``) whose folder is back in place; returns the paths removed.
    names: only those of these destinations (e.g. ["checkpoint"]); None: every one.

    An aside whose folder is missing is kept: it is the folder's only copy (a kill between
    atomic_folder's two renames), which `recover_folder` puts back.

    Nothing in a temporary tells a dead writer's from a live one's: its age does not (a
    long download started before this process is still being written), nor its owner's
    process id (reused, and meaningless across containers that share a disk). So this
    relies on its caller: call it only where this process is the one writer, and then
    every temporary this process did not make is stale. That holds for a run folder
    (one run at a time: the run folder's lock) and for a checkpoint's own temporaries
    (whoever writes a checkpoint folder is its only writer). It does not hold for a
    folder that several processes write, such as the download cache: never call it there.
    Removal is best effort: a temporary that cannot be removed is left as it was.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no folder yet (nothing to clean), or one that cannot be listed
        return removed
    for path in entries:
        match = TEMPORARY_NAME.fullmatch(path.name)
        aside = ASIDE_NAME.fullmatch(path.name)
        if aside and os.path.lexists(path.with_name(aside["name"])):
            match = aside
        if not match or (names is not None and match["name"] not in names):
            continue
        if os.path.realpath(path) in _live_temporaries:  # this process is writing it
            continue
        if _remove(path):
            removed.append(path)
    return removed


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
        _done_with(tmp)


def write_text(path, text):
    """Write a text file (UTF-8) atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_folder(folder):
    """Yield an empty temporary folder beside `folder`; when the block ends without an
    error it takes the place of `folder` (replacing a previous one).

    Two renames are needed to replace a folder: the previous one is first set aside under
    a new name of minilora's own (``.<name>.<random>.old``, never a name a user could have
    given a folder of theirs), then deleted once the new one is in place, with any copy an
    earlier, killed write set aside: the new folder supersedes them. A crash between the
    two renames leaves the aside complete; `recover_folder` puts it back.
    """
    folder = Path(folder)
    tmp = old = None
    try:
        tmp = _temporary(folder, folder=True)
        yield tmp
        if folder.exists():
            old = _aside(folder)
            os.replace(folder, old)
        os.replace(tmp, folder)
        for superseded in ([old] if old else []) + _asides_of(folder):
            _remove(superseded)
    except (*WRITE_FAILURES, WriteError) as exc:  # name the folder, not a file inside its temporary
        raise WriteError(folder, exc) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # already renamed unless something failed
        _done_with(tmp)
        _done_with(old)


def file_sha256(path):
    """The sha256 (hex) of a file's bytes, read in 1 MiB pieces (any size, little memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def recover_folder(folder, complete):
    """Put back the copy of `folder` that a crash between atomic_folder's two renames set
    aside, when `folder` is not whole; returns whether `folder` is whole now.
    `complete(path)` says whether a folder holds a whole copy.

    The aside is ``.<name>.<random>.old`` (the newest whole one, should there be several).
    ``<folder>.old`` is where minilora versions before those names set a folder aside: it
    is put back only when no `folder` exists at all and it holds a whole copy, which is
    what a crash of such a version left; a user's ``exp.old`` that is not a whole copy of
    what is read, or beside an ``exp``, is never touched.
    """
    folder = Path(folder)
    if complete(folder):
        return True
    whole = [p for p in _asides_of(folder) if complete(p)]
    legacy = folder.with_name(folder.name + ".old")
    if not whole and not os.path.lexists(folder) and legacy.is_dir() and complete(legacy):
        whole = [legacy]
    if whole:
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(max(whole, key=lambda p: p.stat().st_mtime_ns), folder)
    return complete(folder)
