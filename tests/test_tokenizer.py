"""minilora.tokenizer: tiktoken's gpt2 encoding from the real BPE files, offline."""

import os
import shutil

import pytest
import tiktoken

from minilora.tokenizer import (
    END_OF_TEXT_ID,
    TOKENIZER_FILES,
    VOCAB_SIZE,
    TokenizerError,
    get_tokenizer,
    seed_tiktoken_cache,
    tiktoken_cache_dir,
)

EVERY_EFFORT_IDS = [6109, 3626, 6100, 345]  # the book's chapter 4/5 prompt
# tiktoken's cache names: the sha1 of each URL (pinned here, not recomputed like the code does)
CACHE_NAMES = {"vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
               "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"}


def test_gpt2_ids(gpt2_tokenizer):
    assert gpt2_tokenizer.encode("Every effort moves you") == EVERY_EFFORT_IDS
    # The seeded cache is what tiktoken itself reads, so its own entry point agrees.
    assert tiktoken.get_encoding("gpt2").encode("Every effort moves you") == EVERY_EFFORT_IDS
    assert gpt2_tokenizer.decode(EVERY_EFFORT_IDS) == "Every effort moves you"
    assert gpt2_tokenizer.n_vocab == VOCAB_SIZE == 50257
    assert gpt2_tokenizer.eot_token == END_OF_TEXT_ID == 50256
    assert gpt2_tokenizer.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_seed_uses_tiktoken_cache_names(shared_data_dir, tmp_path):
    target = seed_tiktoken_cache(shared_data_dir / "gpt2_tokenizer", tmp_path / "cache")
    assert target == tmp_path / "cache"
    assert sorted(p.name for p in target.iterdir()) == sorted(CACHE_NAMES.values())
    for name, cached in CACHE_NAMES.items():
        source = shared_data_dir / "gpt2_tokenizer" / name
        assert (target / cached).read_bytes() == source.read_bytes()
    seed_tiktoken_cache(shared_data_dir / "gpt2_tokenizer", target)  # again: nothing changes
    assert sorted(p.name for p in target.iterdir()) == sorted(CACHE_NAMES.values())


def test_tiktoken_cache_defaults_to_minilora_home(empty_minilora_home, monkeypatch):
    assert tiktoken_cache_dir() == empty_minilora_home / "tiktoken"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty_minilora_home / "elsewhere"))
    assert tiktoken_cache_dir() == empty_minilora_home / "elsewhere"  # the user's choice wins


def test_get_tokenizer_from_a_folder_seeds_the_cache(empty_minilora_home, shared_data_dir):
    tokenizer = get_tokenizer(shared_data_dir / "gpt2_tokenizer", offline=True)
    assert tokenizer.encode("Every effort moves you") == EVERY_EFFORT_IDS
    cache = empty_minilora_home / "tiktoken"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)  # one folder holds everything
    assert sorted(p.name for p in cache.iterdir()) == sorted(CACHE_NAMES.values())
    # From now on the cache alone is enough, offline.
    assert get_tokenizer(offline=True).encode("Every effort moves you") == EVERY_EFFORT_IDS


def test_offline_without_files_names_them_and_where_to_put_them(empty_minilora_home, monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    with pytest.raises(TokenizerError) as info:
        get_tokenizer()
    message = str(info.value)
    assert "vocab.bpe" in message and "encoder.json" in message
    assert str(empty_minilora_home / "tiktoken") in message
    assert TOKENIZER_FILES["vocab.bpe"][0] in message
    assert not (empty_minilora_home / "tiktoken").exists() or not any(
        (empty_minilora_home / "tiktoken").iterdir())


def test_folder_missing_a_file(shared_data_dir, tmp_path):
    shutil.copy(shared_data_dir / "gpt2_tokenizer" / "vocab.bpe", tmp_path)
    with pytest.raises(TokenizerError, match="encoder.json is missing"):
        seed_tiktoken_cache(tmp_path, tmp_path / "cache")


def test_folder_with_a_foreign_file(empty_minilora_home, shared_data_dir, tmp_path):
    shutil.copy(shared_data_dir / "gpt2_tokenizer" / "vocab.bpe", tmp_path)
    (tmp_path / "encoder.json").write_text('{"!": 0}')
    with pytest.raises(TokenizerError, match="is not GPT-2's encoder.json"):
        get_tokenizer(tmp_path, offline=True)


def test_online_downloads_into_the_cache(empty_minilora_home, shared_data_dir, local_http_server,
                                        monkeypatch):
    import minilora.tokenizer as tokenizer_module

    # Serve the real files locally and send the tokenizer's requests there.
    for name in CACHE_NAMES:
        local_http_server.add("/" + name, (shared_data_dir / "gpt2_tokenizer" / name).read_bytes())
    real_download = tokenizer_module.download

    def local_download(url, dest, **kwargs):
        return real_download(local_http_server.url(url.rsplit("/", 1)[1]), dest, **kwargs)

    monkeypatch.setattr(tokenizer_module, "download", local_download)
    tokenizer = get_tokenizer()
    assert tokenizer.encode("Every effort moves you") == EVERY_EFFORT_IDS
    cache = empty_minilora_home / "tiktoken"
    assert sorted(p.name for p in cache.iterdir()) == sorted(CACHE_NAMES.values())
    assert sorted(local_http_server.requests) == ["/encoder.json", "/vocab.bpe"]
    get_tokenizer()  # cached now: no second download
    assert len(local_http_server.requests) == 2
