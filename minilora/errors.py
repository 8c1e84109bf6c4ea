"""The one base class of minilora's own errors, and the few kinds shared by many modules.

An error derived from `MiniloraError` is a problem the user can fix (a bad option, a
missing or damaged file, no network, a full disk, a run that diverged): the command
line prints its message as one line and exits with status 1. Anything else that escapes
a command is a bug, and keeps its traceback.

Each subclass also keeps the built-in class it had before this base existed (a
DataError is still a RuntimeError, a CheckpointError still a ValueError), so code
that caught the built-in class keeps working.
"""


class MiniloraError(Exception):
    """A problem the user can fix; its message says what and where, in one line."""


class OptionError(MiniloraError, ValueError):
    """An option (command line or its dataclass field) that cannot give a useful run,
    named with its value: refused before any work is done."""


class RunFolderError(MiniloraError, ValueError):
    """A run folder (--output-dir) that cannot hold this run: it holds another run, or
    was not written by minilora, or cannot be a folder."""


class CheckpointStateError(MiniloraError, ValueError):
    """A training checkpoint that is missing, damaged, or written by another task."""
