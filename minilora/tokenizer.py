"""GPT-2's byte-level BPE tokenizer (tiktoken's "gpt2" encoding), usable offline.

tiktoken builds the "gpt2" encoding from two files published by OpenAI,
vocab.bpe (the merges) and encoder.json (token -> id), which it downloads once and
caches as ``$TIKTOKEN_CACHE_DIR/<sha1 of the URL>`` (see tiktoken/load.py,
``read_file_cached``, and tiktoken_ext/openai_public.py, ``gpt2``). We fill that
cache ourselves, with our atomic, checksummed download or from a folder the user
already has, and then let tiktoken build the encoding from its cache. So:

- ``get_tokenizer()`` works online (downloads into the cache) and offline once the
  cache holds the two files;
- ``get_tokenizer(folder)`` or ``seed_tiktoken_cache(folder)`` takes them from a
  folder holding vocab.bpe and encoder.json (e.g. copied from another machine);
- unless the user set $TIKTOKEN_CACHE_DIR, it is set to $MINILORA_HOME/tiktoken,
  so one folder holds everything minilora downloads.

Reference: Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners" (the BPE); the book's chapter 2 uses the same tiktoken encoding.
"""

import hashlib
import os
import shutil
from pathlib import Path

import tiktoken

from .cache import cache_dir as minilora_home, is_offline
from .download import DownloadError, download, sha256_of
from .errors import MiniloraError
from .files import WriteError, atomic_path

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256  # also the padding id of the book's SpamDataset
VOCAB_SIZE = 50257

_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# file name -> (URL tiktoken reads, sha256 tiktoken pins in tiktoken_ext/openai_public.py)
TOKENIZER_FILES = {
    "vocab.bpe": (_BASE_URL + "vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": (_BASE_URL + "encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


class TokenizerError(MiniloraError, RuntimeError):
    """The GPT-2 tokenizer files cannot be had (offline, missing or corrupt)."""


def tiktoken_cache_dir():
    """The folder tiktoken caches into: $TIKTOKEN_CACHE_DIR, else $MINILORA_HOME/tiktoken.

    An empty $TIKTOKEN_CACHE_DIR (tiktoken's way to switch its cache off) counts as
    unset: without a cache there would be no offline use.
    """
    return Path(os.environ.get("TIKTOKEN_CACHE_DIR") or minilora_home("tiktoken")).expanduser()


def cache_file_name(url):
    """The name tiktoken gives a cached download: the sha1 of its URL (tiktoken/load.py)."""
    return hashlib.sha1(url.encode()).hexdigest()


def _where_to_put_files(folder):
    files = TOKENIZER_FILES.items()
    sources = " and ".join(f"{name} ({url})" for name, (url, _) in files)
    cache_names = " and ".join(f"{cache_file_name(url)} ({name})" for name, (url, _) in files)
    return (f"Get {sources} on a machine with internet and either call "
            f"minilora.tokenizer.seed_tiktoken_cache(folder) or get_tokenizer(folder), or copy "
            f"them into {folder} under the names {cache_names}")


def seed_tiktoken_cache(folder, cache_dir=None):
    """Copy vocab.bpe and encoder.json from `folder` into tiktoken's cache; return the cache dir.

    Each file is checked against the sha256 that tiktoken pins for "gpt2" and copied
    atomically (temporary file + os.replace) under the name tiktoken looks for.
    cache_dir defaults to `tiktoken_cache_dir()`. Raises TokenizerError if a file is
    missing or is not GPT-2's.
    """
    folder = Path(folder)
    target = Path(cache_dir) if cache_dir is not None else tiktoken_cache_dir()
    for name, (url, sha256) in TOKENIZER_FILES.items():
        source = folder / name
        if not source.is_file():
            raise TokenizerError(f"{source} is missing: a tokenizer folder must hold vocab.bpe and "
                                 f"encoder.json, GPT-2's BPE files ({_BASE_URL}).")
        actual = sha256_of(source)
        if actual != sha256:
            raise TokenizerError(f"{source} is not GPT-2's {name}: its sha256 is {actual}, "
                                 f"expected {sha256}.")
        dest = target / cache_file_name(url)
        if dest.is_file() and sha256_of(dest) == sha256:
            continue
        with atomic_path(dest) as tmp:
            shutil.copyfile(source, tmp)
    return target


def get_tokenizer(path=None, *, offline=None, progress=None):
    """Return tiktoken's "gpt2" Encoding (a `tiktoken.Encoding`).

    path:     None: take the files from tiktoken's cache, downloading them into it if
              needed and allowed; a folder holding vocab.bpe and encoder.json: seed
              the cache from it first (so later calls work offline too).
    offline:  never download (default: $MINILORA_OFFLINE).
    progress: progress bar for a download (None: only on a terminal).

    Sets $TIKTOKEN_CACHE_DIR to $MINILORA_HOME/tiktoken if the user left it unset,
    so that tiktoken reads the cache we filled. Raises TokenizerError, naming the
    files and where to put them, when they cannot be had.

        >>> get_tokenizer().encode("Every effort moves you")
        [6109, 3626, 6100, 345]
    """
    folder = tiktoken_cache_dir()
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    if path is not None:
        try:
            seed_tiktoken_cache(path, folder)
        except (OSError, WriteError) as exc:
            raise TokenizerError(f"cannot copy the tokenizer files from {path} into tiktoken's "
                                 f"cache {folder}: {exc}. Set TIKTOKEN_CACHE_DIR to a writable "
                                 f"folder.") from exc
    offline = is_offline() if offline is None else offline
    # Make sure both files are in the cache before tiktoken looks: tiktoken itself
    # would try the network (with `requests`) and fail with a bare connection error.
    for name, (url, sha256) in TOKENIZER_FILES.items():
        try:
            download(url, folder / cache_file_name(url), sha256=sha256, offline=offline,
                     progress=progress)
        except DownloadError as exc:
            cached = folder / cache_file_name(url)
            if cached.is_file():  # there, but not GPT-2's: say so, rather than "not in the cache"
                problem = f"holds {cached}, which is not GPT-2's {name} (its sha256 is {sha256_of(cached)}, " \
                          f"expected {sha256}), and"
            else:
                problem = f"has no {name} ({cached.name}) and"
            reason = "offline mode (MINILORA_OFFLINE=1 or offline=True)" if offline else str(exc)
            raise TokenizerError(f"tiktoken's cache {folder} {problem} it cannot be downloaded: {reason}\n"
                                 f"{_where_to_put_files(folder)}.") from exc
    # tiktoken verifies the sha256 of both cached files and keeps the Encoding for
    # the rest of the process.
    return tiktoken.get_encoding("gpt2")


def encode_text(tokenizer, text):
    """The GPT-2 ids of a user's text (a list of ints), every character of it read as text.

    Every command encodes what a user types or feeds it this way (classify, generate,
    the training data; `encode_texts` for many): a literal "<|endoftext|>" in it becomes
    the ids of those 13 characters, never the special token 50256, so no input can
    insert a document boundary or a pad. tiktoken's encode() would instead refuse it with
    a 5-line ValueError; the book's text_to_token_ids (chapter 5) allows it as the special
    token. Text without that literal gets the same ids all three ways.

        >>> encode_text(get_tokenizer(), "a <|endoftext|> b")[:3]
        [64, 1279, 91]
    """
    return tokenizer.encode_ordinary(text)


def encode_texts(tokenizer, texts):
    """`encode_text` of each of `texts` (a list of lists), in tiktoken's threads."""
    return tokenizer.encode_ordinary_batch(list(texts))
