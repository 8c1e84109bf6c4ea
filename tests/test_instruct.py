"""`minilora instruct` end to end, as a user runs it: the book's real instruction data
(seeded from the shared copy, offline), the real tokenizer, a tiny GPT-2 with the real
vocabulary and GPT-2's 1024-token context, one epoch; the run folder, the answers file
in the book's format, resume bit for bit after a real SIGINT, and bad inputs refused
before training.

The tiny model is built so that its greedy next token is always <|endoftext|> (50256):
ln_f's bias and the token table's row 50256 both point along the first axis, so the
head's logit for 50256 is about 5 * 5 = 25 at every position, where every other logit
is of order 0.02 * 5 (GPT-2's init scale). Answering then stops at the first new token
(the book's eos_id rule): the 110 answers cost 110 short forwards, not 110 x 256, and
each must be "" (format_answer of the prompt alone). The answer extraction of a model
that does not stop is checked on its own against a greedy loop written out here.
"""

import contextlib
import io
import json
import os
import shutil
import signal

import numpy as np
import pytest
from safetensors.numpy import load_file

import minilora as ml
from minilora import cli
from minilora import checkpoint
from minilora import train as train_mod
from minilora.instructions import INSTRUCTION_DATA_FILE, RESPONSES_FILE, format_input

from fixtures_data import SHARED_DATA
from fixtures_weights import always_eot_model

EOT = 50256
SHARED_FILE = SHARED_DATA / "instructions" / INSTRUCTION_DATA_FILE
TINY = ml.GPTConfig(vocab_size=50257, context_length=1024, emb_dim=16, n_heads=2, n_layers=2)
RANK = 2


@pytest.fixture(scope="module")
def book_file(minilora_home):
    """The book's instruction-data.json seeded into the session cache (as --offline reads it)."""
    if not SHARED_FILE.is_file():
        pytest.skip(f"reference data not found: {SHARED_FILE}")
    folder = minilora_home / "instructions"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(SHARED_FILE, folder / INSTRUCTION_DATA_FILE)
    with open(SHARED_FILE, encoding="utf-8") as f:
        return json.load(f)  # the 1,100 entries as the book reads them


@pytest.fixture(scope="module")
def small_file(book_file, tmp_path_factory):
    """The book's first 100 entries as a user's file (85 train / 10 test / 5 validation): quick runs."""
    path = tmp_path_factory.mktemp("data") / "first100.json"
    path.write_text(json.dumps(book_file[:100]))
    return path


def instruct(*args):
    return cli.main(["instruct", "--offline", "--epochs", "1", "--rank", str(RANK), "--alpha", "2",
                     *map(str, args)])


@pytest.fixture(scope="module")
def book_run(book_file, eot_checkpoint, tmp_path_factory):
    """One run of the recipe on the book's data (1 epoch, rank 2, losses every 100 steps over 2 batches)."""
    out = tmp_path_factory.mktemp("chapter-7") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = instruct("--model", eot_checkpoint, "--output-dir", out, "--eval-freq", 100, "--eval-iter", 2)
    return rc, printed.getvalue(), out


def test_the_model_always_predicts_end_of_text():
    """The premise of the answers below, checked on real prompts' token ids."""
    model = always_eot_model()
    idx = np.array([[464, 3290, 373, 257, 1110, 13, 198, 198, 21017]])
    assert (ml.to_numpy(model.forward(idx, keep_cache=False)).argmax(axis=-1) == EOT).all()


def test_book_data_end_to_end(book_run, book_file):
    rc, printed, out = book_run
    assert rc == 0
    for line in ("Training set length: 935", "Validation set length: 55", "Test set length: 110",
                 "batches 116 / 7 / 14 of 8", "Ep 1 (Step 000000): Train loss", "Ep 1 (Step 000100): Train loss"):
        assert line in printed, line
    # the answers file: the 110 test entries (the book's split: the 110 after the first 935), in
    # file order, each with model_response; "" from a model whose first new token is 50256
    answers = json.loads((out / RESPONSES_FILE).read_text())
    assert len(answers) == 110
    assert [{k: a[k] for k in ("instruction", "input", "output")} for a in answers] == book_file[935:1045]
    assert all(set(a) == {"instruction", "input", "output", "model_response"} for a in answers)
    assert all(a["model_response"] == "" for a in answers)
    assert (out / RESPONSES_FILE).read_text().startswith('[\n    {\n        "instruction": ')  # indent=4

    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["train_examples"], metrics["val_examples"], metrics["test_examples"]) == (935, 110 // 2, 110)
    assert metrics["steps"] == 116 and metrics["examples_seen"] == 116 * 8
    for key in ("train_loss", "val_loss", "test_loss", "seconds", "tokens_per_second"):
        assert metrics[key] > 0, key
    assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens_seen"] / metrics["training_seconds"])
    # LoRA on every linear and on the tied head: per block Q, K, V and c_proj C -> C, c_fc
    # C -> 4C, mlp.c_proj 4C -> C, each r (in + out); the head C -> V
    C, L, V, r = TINY.emb_dim, TINY.n_layers, TINY.vocab_size, RANK
    block = 4 * r * (C + C) + r * (C + 4 * C) + r * (4 * C + C)
    assert metrics["trainable_params"] == L * block + r * (C + V)
    base = sum(int(np.prod(s)) for s in ml.config.param_shapes(TINY).values())
    assert metrics["total_params"] == base + metrics["trainable_params"]

    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,epoch,examples_seen,seconds,lr,batch_loss,train_loss,val_loss")
    assert len(history) == 1 + 116
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tensors = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert tensors["lm_head.lora_A"].shape == (C, r) and tensors["lm_head.lora_B"].shape == (r, V)
    assert np.abs(tensors["lm_head.lora_B"]).max() > 0  # B starts at 0: the head's adapter trained
    assert (out / "checkpoint" / "state.json").is_file()


def greedy_by_full_forwards(model, ids, max_new_tokens):
    """The book's generate with eos_id, without a KV cache: new ids, the 50256 not appended."""
    ids, new = list(ids), []
    for _ in range(max_new_tokens):
        nxt = int(ml.to_numpy(model.forward(np.array([ids]), keep_cache=False))[0, -1].argmax())
        if nxt == EOT:
            break
        ids.append(nxt)
        new.append(nxt)
    return new


def test_an_answer_is_the_greedy_continuation_after_the_prompt(book_file, gpt2_tokenizer):
    from minilora.instruct import answer

    entry = book_file[935]
    model = ml.GPTModel(TINY, seed=3)
    new = greedy_by_full_forwards(model, gpt2_tokenizer.encode_ordinary(format_input(entry)), 6)
    assert len(new) == 6  # a random model does not stop: the answer is all six tokens
    expected = gpt2_tokenizer.decode(new).replace("### Response:", "").strip()
    assert answer(model, gpt2_tokenizer, entry, max_new_tokens=6) == expected
    assert answer(always_eot_model(), gpt2_tokenizer, entry) == ""


def test_resume_after_a_real_sigint_is_bit_for_bit(small_file, eot_checkpoint, tmp_path, monkeypatch, capsys):
    """A SIGINT during step 6 of 10 (0-based): the step completes, a checkpoint is written, exit 130;
    --resume finishes the run to the uninterrupted one's losses, evaluations, adapter and
    answers, bit for bit."""
    common = ("--model", eot_checkpoint, "--data", small_file, "--lr", "1e-3", "--eval-freq", "3")
    assert instruct(*common, "--output-dir", tmp_path / "straight") == 0
    real_step, calls = train_mod.train_step, []

    def sigint_during_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)  # marked by the loop's handler until the step ends
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", sigint_during_step)
    assert instruct(*common, "--output-dir", tmp_path / "run") == 130
    assert "saved a checkpoint at step 7" in capsys.readouterr().out
    assert not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert instruct(*common, "--output-dir", tmp_path / "run", "--resume") == 0

    import pandas as pd

    ha, hb = (pd.read_csv(tmp_path / d / "history.csv").drop(columns="seconds") for d in ("straight", "run"))
    pd.testing.assert_frame_equal(ha, hb)  # every step's loss and evaluation, wall time aside
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "run"))
    for key in ("train_loss", "val_loss", "test_loss", "steps", "tokens_seen", "trainable_params"):
        assert a[key] == b[key], key
    assert (a["train_examples"], a["val_examples"], a["test_examples"]) == (85, 5, 10)
    ta, tb = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("straight", "run"))
    assert set(ta) == set(tb)
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    assert (tmp_path / "straight" / RESPONSES_FILE).read_text() == (tmp_path / "run" / RESPONSES_FILE).read_text()


def test_bad_inputs_fail_before_training_with_one_line(small_file, eot_checkpoint, tmp_path, capsys):
    def fails(*args, expect):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert instruct("--model", eot_checkpoint, "--output-dir", out, *args) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(e in err for e in expect), err
        assert not out.exists()  # refused before the run folder, the model or the training

    entries = json.loads(small_file.read_text())
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text(json.dumps({"instruction": "x", "output": "y"}))
    fails("--data", not_a_list, expect=[str(not_a_list), "expected a JSON list"])
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(entries[:3] + [{"instruction": "x"}] + entries[4:]))
    fails("--data", missing, expect=[str(missing), "entry 3", "missing key 'output'"])
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(entries[:5] + [{**entries[5], "output": " "}] + entries[6:]))
    fails("--data", empty, expect=[str(empty), "entry 5", "empty output"])
    fails("--data", small_file, "--max-length", 2048, expect=["--max-length 2048", "context length", "1024"])
    # the shortest prompt of these entries is longer than 20 tokens: masked, nothing is left to learn
    fails("--data", small_file, "--max-length", 20, "--mask-instructions",
          expect=[str(small_file), "entry 0", "mask_instructions", "allowed_max_length 20"])
    fails("--data", small_file, "--batch-size", 86, expect=["--batch-size 86", "85 training"])
    fails("--data", small_file, "--rank", 0, expect=["--rank must be an integer >= 1"])
    fails("--data", small_file, "--targets", "c_attn.z", expect=["--targets 'c_attn.z'"])


def test_full_finetuning_trains_every_parameter_and_saves_the_model(small_file, eot_checkpoint, tmp_path):
    """--full: no adapter, every parameter trainable (the tied wte included), the checkpoint
    holds the trained parameters and the run folder the whole model, loadable as a base."""
    out = tmp_path / "run"
    assert instruct("--model", eot_checkpoint, "--data", small_file, "--full", "--eval-freq", 100,
                    "--output-dir", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == metrics["total_params"] == sum(
        int(np.prod(s)) for s in ml.config.param_shapes(TINY).values())
    assert not (out / "adapter").exists()
    assert set(load_file(str(out / "checkpoint" / checkpoint.TRAINED_FILE))) == set(ml.config.param_shapes(TINY))
    trained = ml.GPTModel.from_pretrained(str(out / "model"))
    before = ml.GPTModel.from_pretrained(str(eot_checkpoint))
    assert not np.array_equal(trained.params["wte.weight"], before.params["wte.weight"])


def test_a_full_finetuning_checkpoint_restores_the_parameters_exactly(tiny_cfg, tmp_path):
    trained = ml.GPTModel(tiny_cfg, seed=1)
    opt = ml.AdamW(trained)
    checkpoint.save_checkpoint(tmp_path / "ckpt", trained, opt, checkpoint.LoopState(task="instruction", step=3))
    fresh = ml.GPTModel(tiny_cfg, seed=2)
    state = checkpoint.load_checkpoint(tmp_path / "ckpt", fresh, ml.AdamW(fresh))
    assert state.step == 3
    for name in trained.params:
        np.testing.assert_array_equal(fresh.params[name], trained.params[name], err_msg=name)
    frozen = ml.GPTModel(tiny_cfg, seed=2)
    frozen.freeze(["wte.weight"])  # another trainable set: the checkpoint is not this model's
    with pytest.raises(checkpoint.CheckpointStateError, match="not this model's trained parameters"):
        checkpoint.load_checkpoint(tmp_path / "ckpt", frozen, ml.AdamW(frozen))
