"""Downloads that never leave a half-written file behind.

`download` streams a URL into a temporary file next to the destination, checks its
size and sha256, and only then renames it into place with `os.replace` (atomic on
POSIX and Windows when both paths are on one file system). So the destination
either does not exist or is complete: an interrupted, truncated or corrupt
download, a 404 or no network leaves nothing behind and raises `DownloadError`,
whose message says where to put the file by hand to work offline.

Only the standard library's urllib is used (no `requests`). The pattern is the
one of huggingface_hub's `http_get` and torch.hub's `download_url_to_file`:
temporary file + checksum + rename.
"""

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .cache import is_offline
from .errors import MiniloraError
from .files import WriteError, atomic_path

CHUNK_BYTES = 1 << 20  # 1 MiB: few Python-level iterations, little memory
DEFAULT_TIMEOUT = 30.0  # seconds without a byte from the server before giving up
_USER_AGENT = "minilora/0.1 (Python urllib)"


class DownloadError(MiniloraError, RuntimeError):
    """A file could not be downloaded (or, offline, is not in the cache)."""


# What a request can fail with: URLError, HTTPError, timeouts and a full disk are
# OSErrors; http.client raises HTTPException subclasses (IncompleteRead, a bad
# status line); ValueError covers a malformed URL or Content-Length.
_REQUEST_ERRORS = (OSError, http.client.HTTPException, ValueError)


def sha256_of(path, chunk_bytes=CHUNK_BYTES):
    """Hex sha256 of a file, read in chunks so a 500 MB checkpoint needs no 500 MB buffer."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _by_hand_hint(url, dest, sha256):
    hint = f"To work offline, download {url} by hand and save it as {dest}"
    if sha256:
        hint += f" (sha256 {sha256})"
    return hint + "; then set MINILORA_OFFLINE=1 or pass offline=True."


def _error(url, dest, reason, sha256=None):
    return DownloadError(f"could not download {url}: {reason}. {_by_hand_hint(url, dest, sha256)}")


def _check_file(path, expected_size, sha256):
    """Return None if the file at `path` matches the expectations, else why not."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"it has {size:,} bytes, expected {expected_size:,}"
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256.lower():
            return f"its sha256 is {actual}, expected {sha256.lower()}"
    return None


def _open(url, timeout):
    """urlopen with our User-Agent (some servers refuse urllib's default one)."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    return urllib.request.urlopen(request, timeout=timeout)


def _reason(exc):
    """A short, human reason for a failed request."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach the server ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return "the server did not answer in time"
    return f"{type(exc).__name__}: {exc}"


def fetch_bytes(url, *, timeout=DEFAULT_TIMEOUT, offline=False):
    """Return the body of a small file (a config.json, a checksum list) as bytes.

    `timeout` is in seconds and bounds every wait for the server, not the whole
    transfer. Raises `DownloadError` on any failure and, offline (argument or
    MINILORA_OFFLINE=1), without touching the network.
    """
    if offline or is_offline():
        raise DownloadError(f"cannot fetch {url}: offline mode "
                            f"(MINILORA_OFFLINE=1 or offline=True)")
    try:
        with _open(url, timeout) as response:
            body = response.read()
            declared = response.headers.get("Content-Length")
    except _REQUEST_ERRORS as exc:
        raise DownloadError(f"could not fetch {url}: {_reason(exc)}") from exc
    if declared is not None and len(body) != int(declared):
        raise DownloadError(f"could not fetch {url}: got {len(body):,} of {int(declared):,} bytes")
    return body


def download(url, dest, *, expected_size=None, sha256=None, offline=False, progress=None,
             timeout=DEFAULT_TIMEOUT):
    """Download `url` to the file `dest` (str or Path) atomically; return `dest` as a Path.

    expected_size: byte count the file must have (None: not checked).
    sha256:        hex digest the file must have (None: not checked).
    offline:       never touch the network (also when $MINILORA_OFFLINE=1).
    progress:      True/False shows/hides a tqdm bar on stderr; None shows it only
                   when stderr is a terminal, so logs and CI output stay clean.
    timeout:       seconds to wait for the server at each step.

    A `dest` that already exists and passes the given checks is returned as is,
    without any request. Online, one that fails them is downloaded again; offline
    that is an error. Every failure raises `DownloadError` naming the URL, the
    reason and the path where the file can be put by hand.
    """
    dest = Path(dest)
    offline = offline or is_offline()
    if dest.exists():
        problem = _check_file(dest, expected_size, sha256)
        if problem is None:
            return dest
        if offline:
            raise DownloadError(f"{dest} exists but {problem}, and offline mode forbids "
                                f"downloading it again. {_by_hand_hint(url, dest, sha256)}")
    elif offline:
        raise DownloadError(f"{dest} is not there and offline mode (MINILORA_OFFLINE=1 or "
                            f"offline=True) forbids downloading it. "
                            f"{_by_hand_hint(url, dest, sha256)}")
    if progress is None:
        progress = sys.stderr.isatty()

    try:
        # minilora.files: a temporary beside dest, renamed into place only when complete
        # and removed on any failure (KeyboardInterrupt too)
        with atomic_path(dest) as tmp:
            try:
                with open(tmp, "wb") as out:
                    received, declared = _stream(url, out, timeout=timeout, progress=progress,
                                                 desc=dest.name, expected_size=expected_size)
                    out.flush()
                    os.fsync(out.fileno())  # the bytes are on disk before the name points at them
            # HTTP errors, refused connections, timeouts, a full disk: say what and where.
            except _REQUEST_ERRORS as exc:
                raise _error(url, dest, _reason(exc), sha256) from exc
            # http.client returns b"" (not an error) when the server closes the connection
            # early, so a truncated body is caught by comparing with Content-Length.
            if declared is not None and received != declared:
                raise _error(url, dest, f"the connection closed after {received:,} of "
                                        f"{declared:,} bytes", sha256)
            problem = _check_file(tmp, expected_size, sha256)
            if problem is not None:
                raise _error(url, dest, f"the downloaded file is corrupt: {problem}", sha256)
    except WriteError as exc:  # no folder, no space, read-only: when making or renaming the temporary
        raise _error(url, dest, str(exc), sha256) from exc
    return dest


def _stream(url, out, *, timeout, progress, desc, expected_size):
    """Copy the body of `url` into the binary file `out`, with an optional progress bar.

    Returns (bytes received, Content-Length or None).
    """
    with _open(url, timeout) as response:
        declared = response.headers.get("Content-Length")
        declared = int(declared) if declared is not None else None
        received = 0
        with tqdm(total=declared or expected_size, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc, disable=not progress, file=sys.stderr, leave=False) as bar:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    return received, declared
