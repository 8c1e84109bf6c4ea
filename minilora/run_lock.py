"""One job at a time in a run folder: a lock held from the moment a job prepares its
folder until the job ends, however it ends.

The lock is the file ``<run>/.lock``, held with the operating system's lock on an open
file (``fcntl.flock`` on Linux and macOS, ``msvcrt.locking`` on Windows) and holding, in
JSON, who holds it: the job, its process id, the host name and when it started, so that
a second job on the folder is refused with one line that names the first:

    runs/x is in use by minilora finetune, pid 1234 on host h, since 12:03; wait for it
    or choose another --output-dir

The operating system releases its lock when the process ends, even when it is killed
(SIGKILL, a power cut on a local disk), so a lock file left by a run that is gone is
recognised and taken over, with a line in the log. That holds when the file names
another host too: a container gets a new host name each time it starts (Docker), so a
run killed in one and resumed in the next finds its own lock under another name. A free
lock means that no process on this machine holds it, nor on another one that shares the
file system's locks, as NFS does (Linux sends flock to the NFS server as a lock on the
whole file); only a mount whose locks stay on each machine (NFS with ``nolock``) cannot
tell, and the log line names the host so that a user who runs jobs on two machines can
check. A lock file that is not a holder (another program's ``.lock``) is never taken
over, nor changed: the job is refused, naming the file.

The model is the `filelock` package (what huggingface_hub locks its cache with), with
two differences: the lock file says who holds it, and it is removed when the job ends,
so a finished run folder holds only the run. The tests run on Linux; the Windows branch
(msvcrt) follows the same steps but is not exercised by them.
"""

import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from .errors import RunFolderError
from .files import WriteError
from .schema import Field, FileCheckError, Schema, parse_json

LOCK_FILE = ".lock"

try:  # Linux, macOS
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# What the lock file holds, checked as a whole like every file minilora reads (keys a later
# version may add are ignored: a lock must be understood by every version that meets it).
HOLDER = Schema("run folder lock", {
    "job": Field("str"),  # "minilora finetune"
    "pid": Field("int", least=1),
    "host": Field("str"),
    "started": Field("str"),  # ISO 8601, local time with its UTC offset
}, extra="ignore")

# Windows locks a byte range, and nobody else may read a locked byte: the lock is taken on
# one byte far past the holder's JSON, which stays readable
_WINDOWS_LOCKED_BYTE = 1 << 30
# a job that has just taken the lock writes who it is a moment later: how long to wait for it
_HOLDER_WAIT_SECONDS = 1.0


class RunFolderBusy(RunFolderError):
    """The run folder is in use by another job."""


class RunFolderLock:
    """The lock of one run folder, for one job; a context manager:

        with RunFolderLock("runs/x", "minilora finetune", log):
            ...  # only this job writes runs/x

    `acquire` makes the folder when it does not exist (a fresh run writes there anyway),
    takes the lock or raises RunFolderBusy, and takes over a lock left by a job that is
    gone, saying so through `log`; a lock file another program wrote is refused
    (RunFolderError) and left as it is. `release` removes the lock file and lets the lock go.
    """

    def __init__(self, folder, job, log=None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.job = job
        self.log = log or (lambda msg: None)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(self.folder, e) from e
        fd = self._open_locked()
        try:
            left = _read_holder(fd, self.path, foreign_ok=False)
            if left is not None and left["host"] != socket.gethostname():
                # the lock is free: no process here holds it, nor one on a machine sharing its locks
                self.log(f"{self.folder} was locked by {_describe(left)}, another host name (a container "
                         f"started again gets a new one); the lock is free, so that job is no longer running "
                         f"unless this file system keeps each machine's locks apart (NFS mounted with nolock): "
                         f"taking the lock over")
            elif left is not None:
                self.log(f"{self.folder} was locked by {_describe(left)}, which is no longer running: "
                         f"taking the lock over")
            _write_holder(fd, {"job": self.job, "pid": os.getpid(), "host": socket.gethostname(),
                               "started": datetime.now().astimezone().isoformat(timespec="seconds")})
        except BaseException:
            _unlock_and_close(fd, self.path, remove=False)  # the file is the gone job's, or another program's
            raise
        self._fd = fd

    def _open_locked(self):
        """The lock file's descriptor, locked; RunFolderBusy when another job holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
            except OSError as e:
                raise WriteError(self.path, e) from e
            if not _try_lock(fd, self.path):
                holder = _wait_for_holder(fd, self.path)
                os.close(fd)
                who = _describe(holder) if holder else "another job that is starting"
                raise RunFolderBusy(f"{self.folder} is in use by {who}; wait for it or choose another "
                                    f"--output-dir")
            # the job that held it may have removed the file (release) between our open and our
            # lock: then we locked a file no other job will ever look at, and must try again
            if _same_file(fd, self.path):
                return fd
            _unlock_and_close(fd, self.path, remove=False)

    def release(self):
        """Remove the lock file and let the lock go (nothing when not held)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _unlock_and_close(fd, self.path, remove=True)


def _describe(holder):
    """'minilora finetune, pid 1234 on host h, since 12:03' (the date too when not today)."""
    try:
        started = datetime.fromisoformat(holder["started"]).astimezone()  # this machine's local time
        shown = started.strftime("%H:%M" if started.date() == datetime.now().date() else "%Y-%m-%d %H:%M")
    except ValueError:
        shown = holder["started"]
    return f"{holder['job']}, pid {holder['pid']} on host {holder['host']}, since {shown}"


def _read_holder(fd, path, foreign_ok=True):
    """Who the lock file at `path` says holds it, or None when it is empty (nobody). Text
    that is not a holder is another program's file: None too with `foreign_ok` (a holder
    being written, as seen by a job waiting for it), else RunFolderError naming the file."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64 * 1024).decode("utf-8", errors="replace").strip("\0 \n")
    if not text:
        return None
    try:
        return HOLDER.check(parse_json(text, path), path)
    except FileCheckError as e:
        if foreign_ok:
            return None
        raise RunFolderError(f"{e}: not the lock file of a minilora job, so another program may be using "
                             f"{path.parent}; choose another --output-dir (or delete {path} if nothing "
                             f"uses it)") from None


def _wait_for_holder(fd, path):
    """The holder of a lock we could not take; it writes itself a moment after locking."""
    deadline = time.monotonic() + _HOLDER_WAIT_SECONDS
    while (holder := _read_holder(fd, path)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return holder


def _write_holder(fd, holder):
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))


def _same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _try_lock(fd, path):
    """Take the operating system's lock on the open file `fd` without waiting: False when
    another open file holds it."""
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, _WINDOWS_LOCKED_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without locks cannot keep two jobs apart
        os.close(fd)
        raise RunFolderError(f"cannot lock {path}: {e.strerror or e}; this file system does not support "
                             f"file locks: choose an --output-dir on a local disk") from None


def _unlock_and_close(fd, path, remove):
    """Let the lock go; with `remove`, delete the lock file too.

    On POSIX the file is removed while still locked: a job that opened it meanwhile then
    locks a file that is no longer the lock file, sees so (`_same_file`) and opens it anew;
    removing it after the unlock could delete the lock file of the job that took it in
    between. Windows cannot remove an open file: there it is removed after closing, and a
    job that opened it meanwhile keeps it open, so the removal fails and its lock stands.
    """
    if fcntl:
        if remove:
            Path(path).unlink(missing_ok=True)
        os.close(fd)  # closing the last descriptor releases flock
        return
    try:
        os.lseek(fd, _WINDOWS_LOCKED_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass  # not locked (acquire failed before locking)
    os.close(fd)
    if remove:
        try:
            Path(path).unlink(missing_ok=True)
        except PermissionError:
            pass  # another job opened it meanwhile and holds it now
