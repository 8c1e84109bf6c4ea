"""Shared pytest fixtures for the data, tokenizer and download tests (and anyone else's).

Imported by tests/conftest.py with ``from fixtures_data import *`` (or loaded by a
test module with ``pytest_plugins = ["fixtures_data"]``).

Real data comes from the project's shared reference folder (see
shared/data/README.md): $MINILORA_SHARED_DATA, else <repo>/../shared/data. It is
copied into a temporary $MINILORA_HOME, never into the repository; tests that need
it are skipped, with the reason, where it is absent.

Downloads are tested against a real HTTP server on 127.0.0.1 (an ephemeral port,
in a thread): nothing here needs the internet.
"""

import http.server
import io
import os
import shutil
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

__all__ = [
    "SHARED_DATA",
    "LocalHTTPServer",
    "make_sms_zip",
    "shared_data_dir",
    "minilora_home",
    "gpt2_tokenizer",
    "sms_data",
    "empty_minilora_home",
    "local_http_server",
    "refused_url",
]

SHARED_DATA = Path(os.environ.get("MINILORA_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
_NEEDED = ("sms_spam/SMSSpamCollection", "gpt2_tokenizer/vocab.bpe", "gpt2_tokenizer/encoder.json")


@pytest.fixture(scope="session")
def shared_data_dir():
    """The shared reference data folder (Path); skips the test where it is absent."""
    missing = [name for name in _NEEDED if not (SHARED_DATA / name).is_file()]
    if missing:
        pytest.skip(f"reference data not found: {', '.join(missing)} missing under {SHARED_DATA} "
                    f"(set MINILORA_SHARED_DATA to the shared/data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilora_home(tmp_path_factory, shared_data_dir):
    """A temporary $MINILORA_HOME holding the real data, for the whole session.

    Sets MINILORA_HOME to it and TIKTOKEN_CACHE_DIR to its tiktoken/ folder, seeded
    with GPT-2's vocab.bpe and encoder.json under tiktoken's cache names; copies
    SMSSpamCollection to sms_spam/. MINILORA_OFFLINE is left alone, so that
    download tests elsewhere still reach their local server; the seeded files mean
    nothing here needs the network anyway.
    """
    from minilora.tokenizer import seed_tiktoken_cache

    home = tmp_path_factory.mktemp("minilora_home")
    (home / "sms_spam").mkdir()
    shutil.copyfile(shared_data_dir / "sms_spam" / "SMSSpamCollection",
                    home / "sms_spam" / "SMSSpamCollection")
    seed_tiktoken_cache(shared_data_dir / "gpt2_tokenizer", home / "tiktoken")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILORA_HOME", str(home))
        mp.setenv("TIKTOKEN_CACHE_DIR", str(home / "tiktoken"))
        yield home


@pytest.fixture(scope="session")
def gpt2_tokenizer(minilora_home):
    """tiktoken's "gpt2" Encoding, loaded offline from the seeded cache."""
    from minilora.tokenizer import get_tokenizer

    return get_tokenizer(offline=True)


@pytest.fixture(scope="session")
def sms_data(minilora_home, gpt2_tokenizer):
    """The appendix E data (minilora.data.ClassificationData): 1,045 / 149 / 300, max_length 120."""
    from minilora.data import load_sms_spam

    return load_sms_spam(tokenizer=gpt2_tokenizer, offline=True)


@pytest.fixture
def empty_minilora_home(tmp_path, monkeypatch):
    """An empty $MINILORA_HOME for one test (TIKTOKEN_CACHE_DIR unset, MINILORA_OFFLINE unset)."""
    home = tmp_path / "empty_minilora_home"
    monkeypatch.setenv("MINILORA_HOME", str(home))
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("MINILORA_OFFLINE", raising=False)
    return home


class _QuietServer(http.server.ThreadingHTTPServer):
    """Says nothing when a client hangs up early (the timeout and Ctrl-C tests do so on purpose)."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LocalHTTPServer:
    """A real HTTP/1.0 server on 127.0.0.1 that serves byte strings registered with `add`.

    Every GET is recorded in `requests` (the paths), so a test can prove that
    nothing was fetched. Unknown paths get a 404.
    """

    def __init__(self):
        self.routes = {}
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                body, status, content_length, stall = route
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(content_length))
                self.end_headers()
                self.wfile.flush()
                if stall:
                    time.sleep(stall)
                self.wfile.write(body)
                # HTTP/1.0: the connection closes now, even when Content-Length promised
                # more bytes, which is how a truncated download looks to the client.
                self.close_connection = True

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    @property
    def base_url(self):
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, path, body=b"", *, status=200, content_length=None, stall=0.0):
        """Serve `body` at `path`; return its URL.

        content_length: the Content-Length to announce (default len(body)); more than
                        len(body) makes a truncated download.
        stall:          seconds to wait after the headers before sending the body.
        """
        if not path.startswith("/"):
            path = "/" + path
        length = len(body) if content_length is None else content_length
        self.routes[path] = (body, status, length, stall)
        return self.base_url + path

    def url(self, path):
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def local_http_server():
    """A LocalHTTPServer on an ephemeral port, shut down after the test."""
    server = LocalHTTPServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def refused_url():
    """An http://127.0.0.1 URL on which nothing listens: the connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port was free a moment ago and nothing binds it again in a test run.
    return f"http://127.0.0.1:{port}/file.bin"


def make_sms_zip(shared_data_dir, *, folder_in_zip=""):
    """Bytes of a zip laid out like UCI's sms+spam+collection.zip (SMSSpamCollection, readme)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(folder_in_zip + "readme", "SMS Spam Collection v.1 (test copy)\n")
        archive.write(shared_data_dir / "sms_spam" / "SMSSpamCollection",
                      folder_in_zip + "SMSSpamCollection")
    return buffer.getvalue()
