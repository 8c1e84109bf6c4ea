"""`minilora generate` with a language model's adapter: --instruction formats the book's
Alpaca prompt and prints only the answer, from the adapter merged for inference; the
same answer as the unmerged adapted model gives."""

import numpy as np
import pytest

import minilora as ml
from minilora import cli
from minilora.instruct import answer
from minilora.weights import save_pretrained
from fixtures_weights import TINY_REAL_VOCAB


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """A tiny real-vocabulary GPT-2 (float64) on disk, and an adapter on every linear and the
    LM head with B large enough that the adapter decides the answers."""
    root = tmp_path_factory.mktemp("adapted")
    base = ml.GPTModel(TINY_REAL_VOCAB, seed=0, dtype="float64")
    save_pretrained(base, root / "base")
    model = ml.GPTModel.from_pretrained(root / "base", dtype="float64")
    ml.apply_lora(model, rank=2, alpha=2, scaling="alpha", targets="all", seed=1)
    assert "lm_head" in model.lora.targets
    rng = np.random.default_rng(2)
    for name in model.lora.param_names:
        if name.endswith("lora_B"):
            model.params[name][...] = rng.standard_normal(model.params[name].shape) * 2.0
    ml.save_adapter(model, root / "adapter", base_model=str(root / "base"))
    return model, root


def test_an_instruction_is_answered_with_the_merged_adapter(minilora_home, gpt2_tokenizer, adapted, capsys):
    model, root = adapted
    entry = {"instruction": "Name a color.", "input": "", "output": ""}
    expected = answer(model, gpt2_tokenizer, entry, 12)  # the unmerged adapted model, KV cache
    assert cli.main(["generate", "--adapter", str(root / "adapter"), "--dtype", "float64", "--offline",
                     "--instruction", "Name a color.", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert expected.strip() and printed == expected + "\n" and "### Response" not in printed
    # the base model alone answers otherwise: the adapter was applied
    plain = ml.GPTModel.from_pretrained(root / "base", dtype="float64")
    assert answer(plain, gpt2_tokenizer, entry, 12) != expected


def test_the_input_goes_into_the_prompt(minilora_home, gpt2_tokenizer, adapted, capsys):
    model, root = adapted
    entry = {"instruction": "Rewrite.", "input": "The cat sat.", "output": ""}
    assert cli.main(["generate", "--adapter", str(root / "adapter"), "--dtype", "float64", "--offline",
                     "--instruction", "Rewrite.", "--input", "The cat sat.", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == answer(model, gpt2_tokenizer, entry, 8) + "\n"


def test_a_classifier_adapter_or_a_missing_prompt_is_one_line(minilora_home, tiny_checkpoint, tmp_path, capsys):
    model = ml.apply_lora(ml.GPTModel.from_pretrained(tiny_checkpoint).replace_head(2), rank=2, alpha=2)
    ml.save_adapter(model, tmp_path / "classifier", base_model=str(tiny_checkpoint))
    assert cli.main(["generate", "--adapter", str(tmp_path / "classifier"), "--offline", "--instruction", "Hi"]) == 1
    assert "classifier's adapter; use minilora classify" in capsys.readouterr().err
    assert cli.main(["generate", "--offline"]) == 1
    assert "give a prompt or --instruction" in capsys.readouterr().err
