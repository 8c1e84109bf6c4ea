"""A tiny GPT-2 checkpoint for the tests that run the command line end to end.

Imported by tests/conftest.py with ``from fixtures_weights import *``. The model has
GPT-2's real vocabulary (so the real tokenizer's ids fit it) and a context of 128
tokens, and is saved in the Hugging Face layout: what `minilora finetune --model` loads
in place of the 548 MB gpt2-small, in about a second a run.
"""

import minilora as ml
import pytest
from minilora.weights import save_pretrained

__all__ = ["TINY_REAL_VOCAB", "tiny_checkpoint"]

TINY_REAL_VOCAB = ml.GPTConfig(vocab_size=50257, context_length=128, emb_dim=16, n_heads=2, n_layers=2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The folder of a TINY_REAL_VOCAB model (seed 0): model.safetensors + config.json."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    save_pretrained(ml.GPTModel(TINY_REAL_VOCAB, seed=0), folder)
    return folder
