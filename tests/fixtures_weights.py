"""A tiny GPT-2 checkpoint for the tests that run the command line end to end.

Imported by tests/conftest.py with ``from fixtures_weights import *``. The model has
GPT-2's real vocabulary (so the real tokenizer's ids fit it) and a context of 128
tokens, and is saved in the Hugging Face layout: what `minilora finetune --model` loads
in place of the 548 MB gpt2-small, in about a second a run.
"""

import minilora as ml
import pytest
from minilora.tokenizer import END_OF_TEXT_ID
from minilora.weights import save_pretrained

__all__ = ["TINY_REAL_VOCAB", "always_eot_model", "eot_checkpoint", "tiny_checkpoint"]

TINY_REAL_VOCAB = ml.GPTConfig(vocab_size=50257, context_length=128, emb_dim=16, n_heads=2, n_layers=2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The folder of a TINY_REAL_VOCAB model (seed 0): model.safetensors + config.json."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    save_pretrained(ml.GPTModel(TINY_REAL_VOCAB, seed=0), folder)
    return folder


def always_eot_model(context_length=1024):
    """A TINY_REAL_VOCAB-shaped model (context 1024 by default, the chapter 7 job's
    --max-length) whose greedy next token is always <|endoftext|>: ln_f's bias puts 5 in
    channel 0 and only wte[50256] reads it, so answering stops at the first new token and
    the job's 110 answers cost one forward each."""
    model = ml.GPTModel(ml.GPTConfig(**{**TINY_REAL_VOCAB.to_dict(), "context_length": context_length}), seed=0)
    model.params["ln_f.bias"][:] = 0
    model.params["ln_f.bias"][0] = 5.0
    model.params["wte.weight"][END_OF_TEXT_ID] = 0
    model.params["wte.weight"][END_OF_TEXT_ID, 0] = 5.0
    return model


@pytest.fixture(scope="session")
def eot_checkpoint(tmp_path_factory):
    """The folder of always_eot_model() in the Hugging Face layout."""
    folder = tmp_path_factory.mktemp("tiny-eot-gpt2")
    save_pretrained(always_eot_model(), folder)
    return folder
