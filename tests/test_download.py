"""minilora.cache and minilora.download, against a real HTTP server on 127.0.0.1."""

import hashlib
import os
from pathlib import Path

import pytest

import minilora.download as download_module
from minilora.cache import cache_dir, is_offline
from minilora.download import DownloadError, download, fetch_bytes, sha256_of

BODY = os.urandom(3 * download_module.CHUNK_BYTES + 12345)  # several chunks, an odd tail
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()


def files_in(folder):
    """Every file under `folder`, hidden temporary files included."""
    return sorted(p.relative_to(folder) for p in Path(folder).rglob("*") if p.is_file())


class InterruptingBar:
    """Stands in for tqdm; subclasses raise from update(), i.e. after a chunk is written."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- cache.py


def test_cache_dir_defaults_to_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MINILORA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "minilora"
    assert cache_dir("sms_spam", "x") == tmp_path / ".cache" / "minilora" / "sms_spam" / "x"
    assert not (tmp_path / ".cache").exists()  # asking for a path creates nothing


def test_cache_dir_follows_minilora_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILORA_HOME", str(tmp_path / "home"))
    assert cache_dir("tiktoken") == tmp_path / "home" / "tiktoken"


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("YES", True),
                                             ("0", False), ("", False), (None, False)])
def test_is_offline_reads_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("MINILORA_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("MINILORA_OFFLINE", value)
    assert is_offline() is expected


# ----------------------------------------------------------------------------- download()


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """These tests decide about offline mode themselves."""
    monkeypatch.delenv("MINILORA_OFFLINE", raising=False)


def test_download_with_sha256(local_http_server, tmp_path):
    url = local_http_server.add("/model.bin", BODY)
    dest = tmp_path / "new" / "folder" / "model.bin"
    result = download(url, dest, expected_size=len(BODY), sha256=BODY_SHA256)
    assert result == dest and isinstance(result, Path)
    assert dest.read_bytes() == BODY
    assert sha256_of(dest) == BODY_SHA256
    assert files_in(tmp_path) == [Path("new/folder/model.bin")]  # no temporary file left


def test_existing_verified_file_is_not_downloaded_again(local_http_server, tmp_path):
    url = local_http_server.add("/model.bin", BODY)
    dest = download(url, tmp_path / "model.bin", sha256=BODY_SHA256)
    assert download(url, dest, sha256=BODY_SHA256) == dest
    assert download(url, dest) == dest  # no checksum known: existing means done
    assert local_http_server.requests == ["/model.bin"]


def test_existing_corrupt_file_is_replaced(local_http_server, tmp_path):
    url = local_http_server.add("/model.bin", BODY)
    dest = tmp_path / "model.bin"
    dest.write_bytes(BODY[:-1] + b"!")
    download(url, dest, sha256=BODY_SHA256)
    assert dest.read_bytes() == BODY
    assert local_http_server.requests == ["/model.bin"]


def test_wrong_checksum_leaves_nothing(local_http_server, tmp_path):
    url = local_http_server.add("/model.bin", BODY)
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError) as info:
        download(url, dest, sha256="0" * 64)
    message = str(info.value)
    assert url in message and str(dest) in message
    assert BODY_SHA256 in message and "0" * 64 in message
    assert files_in(tmp_path) == []


def test_wrong_size_leaves_nothing(local_http_server, tmp_path):
    url = local_http_server.add("/model.bin", BODY)
    with pytest.raises(DownloadError, match="expected 7"):
        download(url, tmp_path / "model.bin", expected_size=7)
    assert files_in(tmp_path) == []


def test_truncated_download_leaves_nothing(local_http_server, tmp_path):
    # The server announces 1000 more bytes than it sends, then closes the connection.
    url = local_http_server.add("/model.bin", BODY, content_length=len(BODY) + 1000)
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError) as info:
        download(url, dest)  # no size or checksum given: Content-Length alone must catch it
    assert f"{len(BODY):,} of {len(BODY) + 1000:,} bytes" in str(info.value)
    assert url in str(info.value) and str(dest) in str(info.value)
    assert files_in(tmp_path) == []


def test_http_404(local_http_server, tmp_path):
    url = local_http_server.url("/missing.bin")
    dest = tmp_path / "missing.bin"
    with pytest.raises(DownloadError) as info:
        download(url, dest)
    message = str(info.value)
    assert "HTTP 404" in message and url in message
    assert f"save it as {dest}" in message
    assert isinstance(info.value, RuntimeError)
    assert files_in(tmp_path) == []


def test_connection_refused(refused_url, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="cannot reach the server") as info:
        download(refused_url, dest, sha256=BODY_SHA256)
    assert str(dest) in str(info.value) and BODY_SHA256 in str(info.value)
    assert files_in(tmp_path) == []


def test_timeout(local_http_server, tmp_path):
    url = local_http_server.add("/slow.bin", BODY, stall=1.0)
    with pytest.raises(DownloadError, match="did not answer in time|timed out"):
        download(url, tmp_path / "slow.bin", timeout=0.2)
    assert files_in(tmp_path) == []


def test_offline_argument_never_touches_network(local_http_server, tmp_path):
    url = local_http_server.add("/model.bin", BODY)
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError, match="offline") as info:
        download(url, dest, offline=True)
    assert str(dest) in str(info.value) and url in str(info.value)
    assert local_http_server.requests == []
    dest.write_bytes(BODY)
    assert download(url, dest, sha256=BODY_SHA256, offline=True) == dest
    assert local_http_server.requests == []


def test_offline_environment_variable(local_http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    url = local_http_server.add("/model.bin", BODY)
    with pytest.raises(DownloadError, match="MINILORA_OFFLINE"):
        download(url, tmp_path / "model.bin")
    with pytest.raises(DownloadError, match="offline"):
        fetch_bytes(url)
    assert local_http_server.requests == []


def test_offline_existing_corrupt_file_is_an_error(local_http_server, tmp_path):
    url = local_http_server.add("/model.bin", BODY)
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"not the model")
    with pytest.raises(DownloadError, match="exists but its sha256 is"):
        download(url, dest, sha256=BODY_SHA256, offline=True)
    assert dest.read_bytes() == b"not the model"  # the user's file is not deleted
    assert local_http_server.requests == []


def test_keyboard_interrupt_removes_temporary_file(local_http_server, tmp_path, monkeypatch):
    written = []

    class Bar(InterruptingBar):
        def update(self, n):
            written.extend(p.name for p in tmp_path.iterdir())
            raise KeyboardInterrupt

    monkeypatch.setattr(download_module, "tqdm", Bar)
    url = local_http_server.add("/model.bin", BODY)
    with pytest.raises(KeyboardInterrupt):
        download(url, tmp_path / "model.bin", progress=True)
    assert len(written) == 1 and written[0].endswith(".part")  # it was mid-download
    assert files_in(tmp_path) == []


def test_full_disk_removes_temporary_file(local_http_server, tmp_path, monkeypatch):
    class FullDiskBar(InterruptingBar):
        def update(self, n):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(download_module, "tqdm", FullDiskBar)
    url = local_http_server.add("/model.bin", BODY)
    with pytest.raises(DownloadError, match="No space left on device"):
        download(url, tmp_path / "model.bin")
    assert files_in(tmp_path) == []


def test_progress_bar_only_on_a_terminal(local_http_server, tmp_path, capsys):
    url = local_http_server.add("/model.bin", BODY)
    download(url, tmp_path / "a.bin")  # progress=None and stderr is pytest's pipe
    assert capsys.readouterr().err == ""
    download(url, tmp_path / "b.bin", progress=True)
    assert capsys.readouterr().err != ""
    assert capsys.readouterr().out == ""  # library code never prints


# ----------------------------------------------------------------------------- fetch_bytes()


def test_fetch_bytes(local_http_server):
    url = local_http_server.add("/config.json", b'{"n_embd": 768}')
    assert fetch_bytes(url, timeout=5) == b'{"n_embd": 768}'


def test_fetch_bytes_errors(local_http_server, refused_url):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_bytes(local_http_server.url("/nope.json"))
    with pytest.raises(DownloadError, match="cannot reach"):
        fetch_bytes(refused_url)
    slow = local_http_server.add("/slow.json", b"{}", stall=1.0)
    with pytest.raises(DownloadError):
        fetch_bytes(slow, timeout=0.2)
    short = local_http_server.add("/short.json", b"{}", content_length=10)
    with pytest.raises(DownloadError):
        fetch_bytes(short)
