"""`minilora finetune` end to end, as a user runs it: a tiny GPT-2 (real vocabulary)
written in the Hugging Face layout and served from 127.0.0.1, the real SMS data and
tokenizer, one epoch, the run folder, resume after an interruption, and the other
commands on the trained adapter."""

import json

import numpy as np
import pytest

import minilora as ml
from minilora import cli
from minilora import train as train_mod

from fixtures_weights import TINY_REAL_VOCAB

KEYS = ["train_examples", "val_examples", "test_examples", "max_length", "train_batches", "val_batches",
        "test_batches", "total_params", "trainable_params", "train_accuracy", "val_accuracy",
        "test_accuracy", "seconds"]


@pytest.fixture
def served_model(tiny_checkpoint, local_http_server):
    for name in ("model.safetensors", "config.json"):
        local_http_server.add(f"/tiny-gpt2/{name}", (tiny_checkpoint / name).read_bytes())
    return local_http_server.url("/tiny-gpt2/model.safetensors")


def finetune(*args):
    return cli.main(["finetune", "--epochs", "1", "--rank", "4", "--alpha", "4", "--lr", "2e-3", *map(str, args)])


def test_finetune_end_to_end(minilora_home, served_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune("--model", served_model, "--output-dir", out) == 0
    printed = capsys.readouterr().out
    assert "examples train 1,045 / val 149 / test 300; max length 120; batches 130 / 19 / 38" in printed
    assert "Trainable parameters:" in printed and "Test accuracy:" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(k in metrics for k in KEYS)
    assert (metrics["train_examples"], metrics["val_examples"], metrics["test_examples"]) == (1045, 149, 300)
    assert (metrics["train_batches"], metrics["val_batches"], metrics["test_batches"]) == (130, 19, 38)
    assert metrics["max_length"] == 120 and metrics["steps"] == 130
    head = TINY_REAL_VOCAB.emb_dim * 2 + 2
    base = sum(int(np.prod(s)) for s in ml.config.param_shapes(TINY_REAL_VOCAB).values())
    lora = 2 * (3 * (16 * 4 + 4 * 16) + (16 * 4 + 4 * 16) + (16 * 4 + 4 * 64) + (64 * 4 + 4 * 16)) + (16 * 4 + 4 * 2)
    assert metrics["trainable_params"] == lora and metrics["total_params"] == base + head + lora
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,epoch,examples_seen,seconds,lr,batch_loss") and len(history) == 131
    for png in ("loss.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter = json.loads((out / "adapter" / ml.adapters.CONFIG_FILE).read_text())
    assert adapter["class_names"] == ["ham", "spam"] and adapter["max_length"] == 120

    # the trained adapter, used by the other commands from the cached download, offline
    capsys.readouterr()
    assert cli.main(["evaluate", "--adapter", str(out / "adapter"), "--split", "test", "--json", "--offline"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert cli.main(["classify", "--adapter", str(out / "adapter"), "--offline", "WIN a FREE prize now!!!"]) == 0
    label, prob, _ = capsys.readouterr().out.strip().split("\t")
    assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0


def test_finetune_with_batches_grouped_by_length(minilora_home, served_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune("--model", served_model, "--output-dir", out, "--batching", "by_length") == 0
    printed = capsys.readouterr().out
    assert "batches 130 / 19 / 38" in printed  # the book's count: the same examples dropped
    assert "training batches by_length, padded per batch: 31.7 tokens on average (texts: 30.4)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 130 and metrics["options"]["pad"] == "longest_in_batch"
    # `evaluate` groups the texts by length, as the adapter records and the run's evaluation did
    config = json.loads((out / "adapter" / ml.adapters.CONFIG_FILE).read_text())
    assert (config["batching"], config["pad"]) == ("by_length", "longest_in_batch")
    assert cli.main(["evaluate", "--adapter", str(out / "adapter"), "--split", "test", "--json", "--offline"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_resume_after_interruption_gives_the_same_metrics(minilora_home, served_model, tmp_path, monkeypatch, capsys):
    assert finetune("--model", served_model, "--output-dir", tmp_path / "straight", "--epochs", 2) == 0
    real_step, calls = train_mod.train_step, []

    def interrupted(*args, **kwargs):
        if len(calls) == 170:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    assert finetune("--model", served_model, "--output-dir", tmp_path / "run", "--epochs", 2) == 130
    assert "saved a checkpoint at step 170" in capsys.readouterr().out
    assert not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.setattr(train_mod, "train_step", real_step)
    # without --resume the folder is protected; with other options resume is refused
    assert finetune("--model", served_model, "--output-dir", tmp_path / "run", "--epochs", 2) == 1
    assert finetune("--model", served_model, "--output-dir", tmp_path / "run", "--epochs", 2,
                    "--resume", "--rank", "8") == 1
    assert "other options" in capsys.readouterr().err
    assert finetune("--model", served_model, "--output-dir", tmp_path / "run", "--epochs", 2, "--resume") == 0
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for k in KEYS + ["steps", "final_train_loss"]:
        if k != "seconds":
            assert a[k] == b[k], k
    assert b["resumed"] is True
    import pandas as pd

    ha, hb = (pd.read_csv(tmp_path / d / "history.csv").drop(columns="seconds") for d in ("straight", "run"))
    pd.testing.assert_frame_equal(ha, hb)  # every step's loss and evaluation, wall time aside


def test_clear_errors(minilora_home, tmp_path, capsys, refused_url):
    assert finetune("--model", "gpt5", "--output-dir", tmp_path / "a") == 1
    assert "unknown model 'gpt5'" in capsys.readouterr().err
    assert finetune("--model", refused_url + "/model.safetensors", "--output-dir", tmp_path / "b") == 1
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "by hand" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("just one column\n")
    assert finetune("--data", bad, "--output-dir", tmp_path / "c") == 1
    assert str(bad) in capsys.readouterr().err


def test_finetune_on_a_users_three_class_csv(minilora_home, tiny_checkpoint, tmp_path, capsys):
    rows = ["text,label"]
    words = {"sport": "goal match team score", "food": "pizza pasta bread cheese", "tech": "laptop code chip cloud"}
    rng = np.random.default_rng(0)
    for i in range(60):
        label = list(words)[i % 3]
        rows.append(f"\"{' '.join(rng.permutation(words[label].split()))} number {i}\",{label}")
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    assert finetune("--model", tiny_checkpoint, "--data", tmp_path / "mine.csv", "--output-dir", tmp_path / "run",
                    "--pad", "longest_in_batch", "--pool", "last_real", "--offline") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["classes"] == ["food", "sport", "tech"]
    assert (metrics["train_examples"], metrics["val_examples"], metrics["test_examples"]) == (42, 6, 12)
    assert "classes ['food', 'sport', 'tech']" in capsys.readouterr().out
    capsys.readouterr()
    assert cli.main(["classify", "--adapter", str(tmp_path / "run" / "adapter"), "--model", str(tiny_checkpoint),
                     "--pool", "last_real", "--offline", "pizza cheese"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("food", "sport", "tech")


def test_generate_command(minilora_home, tiny_checkpoint, capsys):
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--offline", "--max-new-tokens", "5",
                     "Every effort moves you"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--offline", "--temperature", "1.0",
                     "--top-k", "5", "--seed", "1", "Hello"]) == 0


@pytest.mark.skipif(ml.cuda_available(), reason="a GPU is present")
def test_cuda_without_cupy_fails_before_any_work(tmp_path, capsys):
    assert finetune("--device", "cuda", "--output-dir", tmp_path / "run") == 1
    assert "minilora[cuda12]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
