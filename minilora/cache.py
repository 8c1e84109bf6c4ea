"""Where minilora keeps what it downloads, and whether it may download at all.

Everything minilora fetches (GPT-2 checkpoints, the tokenizer files, the SMS Spam
Collection) lives under one folder, so that a user can see, copy or delete it in
one place and can prepare an offline machine by filling that one folder:

    $MINILORA_HOME              default ~/.cache/minilora
      tiktoken/                 tiktoken's cache ($TIKTOKEN_CACHE_DIR unless the user set it)
      sms_spam/SMSSpamCollection

``MINILORA_OFFLINE=1`` forbids every network access (the same idea as
``HF_HUB_OFFLINE=1`` in Hugging Face's libraries): code then uses only what the
cache already holds and says which file is missing and where to put it.
"""

import os
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")


def cache_dir(*parts):
    """Return $MINILORA_HOME (default ~/.cache/minilora) joined with `parts`.

    Read from the environment on every call, so that tests and users can point it
    elsewhere at any time. Nothing is created here: the code that writes a file
    creates its folder, so merely asking for a path never touches the disk.
    """
    home = os.environ.get("MINILORA_HOME") or os.path.join("~", ".cache", "minilora")
    return Path(home).expanduser().joinpath(*parts)


def is_offline():
    """True when $MINILORA_OFFLINE is set to 1 (or true/yes/on): no network access."""
    return os.environ.get("MINILORA_OFFLINE", "").strip().lower() in _TRUE
