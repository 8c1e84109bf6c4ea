"""Bad input and faults, as a user meets them: every run that cannot succeed says so up
front, with the option and the value, in one line and without a traceback; a full disk or
SIGTERM leaves nothing half-written, and the run resumes. Tiny GPT-2 (real vocabulary,
context 128) and small CSV files, so that each run takes about a second, offline."""

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import minilora as ml
from minilora import cli
from minilora import checkpoint
from minilora import train as train_mod

from fixtures_weights import TINY_REAL_VOCAB
from cli_helpers import error_line

ROOT = Path(__file__).resolve().parent.parent
WORDS = {"food": "pizza pasta bread cheese soup", "sport": "goal match team score ball"}


@pytest.fixture
def offline(minilora_home, monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    return minilora_home


def write_csv(path, rows=30, words=WORDS, long_every=0):
    """`rows` text,label rows cycling through the classes of `words`; every
    `long_every`-th text is 200 tokens long (longer than the tiny model's context)."""
    lines = ["text,label"]
    rng = np.random.default_rng(0)
    for i in range(rows):
        label = list(words)[i % len(words)]
        text = " ".join(rng.permutation(words[label].split())) + f" number {i}"
        if long_every and i % long_every == 0:
            text += " more" * 200
        lines.append(f"\"{text}\",{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def finetune(model, data, out, *args):
    """`minilora finetune` on a tiny model and a small CSV: 21 training examples, batches of 4."""
    return cli.main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                     "--epochs", "1", "--rank", "4", "--alpha", "4", "--lr", "2e-3", "--batch-size", "4",
                     "--eval-freq", "2", "--eval-iter", "1", *map(str, args)])



def leftovers(folder):
    """Temporaries a write could leave behind."""
    return [p for p in Path(folder).rglob("*") if p.name.endswith((".part", ".tmp", ".old"))]


# ----------------------------------------------------------------------------- options, up front


@pytest.mark.parametrize("option, value, says", [
    ("--epochs", "0", "--epochs must be an integer >= 1, got 0"),
    ("--eval-freq", "0", "--eval-freq must be an integer >= 1, got 0"),
    ("--eval-iter", "0", "--eval-iter must be an integer >= 1, got 0"),
    ("--seed", "-1", "--seed must be an integer >= 0, got -1"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("--rank", "0", "--rank must be an integer >= 1, got 0"),
    ("--max-length", "0", "--max-length must be an integer >= 1, got 0"),
    ("--lr", "-0.001", "--lr must be a finite number > 0, got -0.001"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--alpha", "0", "--alpha must be a finite number > 0, got 0.0"),
    ("--alpha", "-inf", "--alpha must be a finite number > 0, got -inf"),
    ("--targets", ",", "--targets ',' names no layer"),
])
def test_finetune_options_are_checked_before_any_work(tmp_path, capsys, option, value, says):
    # neither the model nor the data exist: the option is what gets reported, before anything loads
    rc = cli.main(["finetune", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.csv"),
                   "--output-dir", str(tmp_path / "run"), f"{option}={value}"])
    assert rc == 1
    assert says in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_finetune_options_in_the_python_api():
    from minilora.finetune import FinetuneOptions

    with pytest.raises(ValueError, match="--epochs must be an integer >= 1, got 0"):
        FinetuneOptions(epochs=0)
    with pytest.raises(ValueError, match="--weight-decay must be a finite number >= 0"):
        FinetuneOptions(weight_decay=float("nan"))
    with pytest.raises(ValueError, match="--pool must be one of"):
        FinetuneOptions(pool="first")
    with pytest.raises(ValueError, match="--batching must be one of"):
        FinetuneOptions(batching="sorted")
    with pytest.raises(ValueError, match="--batching by_length pads each batch to its own longest text"):
        FinetuneOptions(batching="by_length", pad="dataset")
    # by_length implies per-batch padding; the book's batching keeps the book's padding
    assert FinetuneOptions(batching="by_length").pad == "longest_in_batch"
    assert FinetuneOptions(batching="by_length", pad="longest_in_batch").pad == "longest_in_batch"
    assert (FinetuneOptions().pad, FinetuneOptions().batching) == ("dataset", "shuffled")


def test_by_length_with_book_padding_is_refused_before_any_work(tmp_path, capsys):
    rc = cli.main(["finetune", "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "run"),
                   "--batching", "by_length", "--pad", "dataset"])
    assert rc == 1
    assert "--batching by_length pads each batch to its own longest text: it cannot be combined with " \
           "--pad dataset" in error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, says", [
    (["generate", "--top-k", "0", "hi"], "argument --top-k: must be an integer >= 1, got 0"),
    (["generate", "--temperature", "nan", "hi"], "argument --temperature: must be a finite number >= 0"),
    (["evaluate", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["classify", "--max-length", "-3", "hi"], "argument --max-length: must be an integer >= 1, got -3"),
])
def test_other_commands_check_numbers_when_parsing(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_no_traceback_from_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINILORA_OFFLINE": "1"}
    for argv in (["finetune", "--lr", "nan", "--output-dir", str(tmp_path / "a")],
                 ["finetune", "--model", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "b")]):
        out = subprocess.run([sys.executable, "-m", "minilora", *argv], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_version():
    out = subprocess.run([sys.executable, "-m", "minilora", "--version"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"minilora {ml.__version__}"


# ----------------------------------------------------------------------------- data against the run


def test_batch_larger_than_the_training_set_is_refused(offline, tiny_checkpoint, tmp_path, capsys):
    data = write_csv(tmp_path / "small.csv")  # 21 training examples
    assert finetune(tiny_checkpoint, data, tmp_path / "run", "--batch-size", 32) == 1
    line = error_line(capsys)
    assert "--batch-size 32" in line and "21 training examples" in line
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "adapter").exists()


def test_texts_longer_than_the_context_are_truncated_and_counted(offline, tiny_checkpoint, tmp_path, capsys):
    data = write_csv(tmp_path / "long.csv", long_every=5)
    assert finetune(tiny_checkpoint, data, tmp_path / "run") == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["max_length"] == TINY_REAL_VOCAB.context_length  # the model's context, not 1024
    n = metrics["truncated_texts"]["train"]
    assert n > 0 and f"truncated {n} training text(s) to 128 tokens (the model's context length" in out
    # --max-length sets it, and the adapter records it
    assert finetune(tiny_checkpoint, data, tmp_path / "run20", "--max-length", 20) == 0
    assert "to 20 tokens (--max-length)" in capsys.readouterr().out
    assert json.loads((tmp_path / "run20" / "adapter" / ml.adapters.CONFIG_FILE).read_text())["max_length"] == 20
    assert finetune(tiny_checkpoint, data, tmp_path / "run500", "--max-length", 500) == 1
    assert "--max-length 500 is longer than the model's context length (128 tokens)" in error_line(capsys)


def test_rank_above_the_model_width_is_refused_before_the_data_loads(offline, tiny_checkpoint, tmp_path, capsys):
    assert finetune(tiny_checkpoint, tmp_path / "no.csv", tmp_path / "run", "--rank", 32) == 1
    assert "--rank 32 exceeds the width" in error_line(capsys)


@pytest.mark.parametrize("targets", ["bogus", "c_attn.q,bogus", "h.7.mlp.c_fc"])
def test_targets_naming_no_layer_are_refused_before_any_work(offline, tiny_checkpoint, tmp_path, capsys, targets):
    # the data file does not exist: reaching it would report that instead
    rc = finetune(tiny_checkpoint, tmp_path / "no.csv", tmp_path / "run", "--targets", targets)
    captured = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"minilora finetune: error: --targets '{targets}': "), captured.err
    assert "matches no linear layer" in lines[0]
    assert "Data:" not in captured.out
    assert not (tmp_path / "run").exists()


def test_finetune_targets_that_name_layers_pass_the_check():
    from minilora.finetune import FinetuneOptions, _check_targets

    for targets in ("all", "attention", "c_attn.q,out_head", "h.1.mlp.*"):
        _check_targets(FinetuneOptions(targets=targets), TINY_REAL_VOCAB)  # out_head: the classifier head finetune adds


def test_metrics_json_never_holds_nan():
    from minilora.schema import strict_json

    text = strict_json({"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": None}})
    assert json.loads(text) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


def test_divergence_names_no_checkpoint_that_does_not_exist(offline, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_mod, "train_step", lambda model, *a, **k: model.xp.asarray(np.nan))
    assert finetune(tiny_checkpoint, write_csv(tmp_path / "d.csv"), tmp_path / "run") == 1
    line = error_line(capsys)
    assert "loss became nan at step 0" in line and "No checkpoint was written before it" in line
    assert not (tmp_path / "run" / "checkpoint").exists()


# ----------------------------------------------------------------------------- faults: disk, SIGTERM


def _fill_disk_when(module, condition, monkeypatch):
    """Make `module.save_file` (safetensors) write half a file and then fail with ENOSPC
    where condition(path) holds, as a full disk does partway through a write (safetensors
    reports it with its own error type, not an OSError)."""
    from safetensors import SafetensorError

    real = module.save_file

    def save_file(tensors, path, *args, **kwargs):
        if condition(Path(path)):
            Path(path).write_bytes(b"\0" * 100)
            raise SafetensorError("I/O error: No space left on device (os error 28)")  # what it raises
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(module, "save_file", save_file)
    return real


def test_full_disk_during_the_checkpoint(offline, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    real = _fill_disk_when(checkpoint, lambda p: p.name == "optimizer.safetensors", monkeypatch)
    assert finetune(tiny_checkpoint, data, out) == 1
    line = error_line(capsys)
    assert line == (f"minilora finetune: error: cannot write {out / 'checkpoint'}: No space left on device "
                    f"(check --output-dir {out})")
    assert leftovers(out) == [] and not (out / "checkpoint").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)  # space is back
    assert finetune(tiny_checkpoint, data, out, "--resume") == 0
    assert (out / "metrics.json").is_file() and leftovers(out) == []


def test_full_disk_during_the_adapter_save(offline, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from minilora import adapters

    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    # the adapter is written in a temporary folder .adapter.<random>.part beside where it goes
    real = _fill_disk_when(adapters, lambda p: p.parent.parent == out and p.parent.name.startswith(".adapter."),
                           monkeypatch)
    assert finetune(tiny_checkpoint, data, out) == 1
    line = error_line(capsys)
    assert f"cannot write {out / 'adapter'}: No space left on device" in line
    assert leftovers(out) == [] and not (out / "adapter").exists()
    monkeypatch.setattr(adapters, "save_file", real)
    assert finetune(tiny_checkpoint, data, out, "--resume") == 0  # the finished checkpoint gives the adapter
    assert (out / "adapter" / "adapter.safetensors").is_file() and leftovers(out) == []


def _mount_tmpfs(folder, size):
    folder.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_real_full_file_system(offline, tiny_checkpoint, tmp_path, capsys):
    """A size-limited tmpfs where this machine lets us mount one (root), filled by the checkpoint."""
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    if shutil.which("mount") is None or not _mount_tmpfs(disk, "16k"):
        pytest.skip("cannot mount a tmpfs here (needs root); test_full_disk_during_* simulate ENOSPC")
    try:
        data, out = write_csv(tmp_path / "d.csv"), disk / "run"
        assert finetune(tiny_checkpoint, data, out) == 1
        line = error_line(capsys)
        assert f"cannot write {out / 'checkpoint'}: No space left on device (check --output-dir" in line
        assert leftovers(disk) == []
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space is back
        assert finetune(tiny_checkpoint, data, out, "--resume") == 0
        assert (out / "metrics.json").is_file() and leftovers(disk) == []
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_failed_checkpoint_keeps_the_previous_one(tiny_cfg, tmp_path, monkeypatch):
    from minilora.files import WriteError

    model = ml.GPTModel(tiny_cfg, seed=0)
    model.replace_head(2)
    ml.apply_lora(model, rank=2, alpha=2)
    opt, ckpt = ml.AdamW(model), tmp_path / "checkpoint"
    checkpoint.save_checkpoint(ckpt, model, opt, checkpoint.LoopState(step=1))
    _fill_disk_when(checkpoint, lambda p: True, monkeypatch)
    with pytest.raises(WriteError, match=f"cannot write {ckpt}: No space left on device"):
        checkpoint.save_checkpoint(ckpt, model, opt, checkpoint.LoopState(step=2))
    assert checkpoint.read_loop_state(ckpt).step == 1 and leftovers(tmp_path) == []
    os.replace(ckpt, tmp_path / "checkpoint.old")  # as a crash between the two renames of an older minilora left it
    assert checkpoint.has_checkpoint(ckpt) and checkpoint.read_loop_state(ckpt).step == 1


def test_output_dir_that_cannot_be_a_folder(offline, tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert finetune(tiny_checkpoint, write_csv(tmp_path / "d.csv"), tmp_path / "file" / "run") == 1
    line = error_line(capsys)
    assert f"cannot write {tmp_path / 'file' / 'run'}" in line and "--output-dir" in line


def test_sigterm_saves_a_checkpoint_like_ctrl_c(offline, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    real_step, calls = train_mod.train_step, []

    def terminated(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # what `timeout` or a scheduler sends, mid-epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", terminated)
    assert finetune(tiny_checkpoint, data, out) == 143
    captured = capsys.readouterr()
    # the step under way when the signal came (the third, step 2) completes first
    assert "saved a checkpoint at step 3" in captured.out and "terminated (SIGTERM)" in captured.err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI put the handler back
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert finetune(tiny_checkpoint, data, out, "--resume") == 0


def test_resume_extends_a_finished_run(offline, tiny_checkpoint, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv")
    assert finetune(tiny_checkpoint, data, tmp_path / "straight", "--epochs", 3) == 0
    assert finetune(tiny_checkpoint, data, tmp_path / "run", "--epochs", 2) == 0
    assert finetune(tiny_checkpoint, data, tmp_path / "run", "--epochs", 3, "--resume") == 0
    assert "Extending the run" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "run"))
    assert b["steps"] == a["steps"] == 15
    assert (tmp_path / "straight" / "history.csv").read_text().count("\n") == \
        (tmp_path / "run" / "history.csv").read_text().count("\n")
    assert a["test_accuracy"] == b["test_accuracy"] and a["final_train_loss"] == b["final_train_loss"]
    assert finetune(tiny_checkpoint, data, tmp_path / "run", "--epochs", 2, "--resume") == 1
    assert "has already trained 3 epoch(s); resume with --epochs 3 or more" in error_line(capsys)


def test_by_length_run_resumes_and_is_recorded(offline, tiny_checkpoint, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", rows=60)  # 42 training examples: 10 batches of 4
    assert finetune(tiny_checkpoint, data, tmp_path / "straight", "--epochs", 3, "--batching", "by_length") == 0
    assert "training batches by_length, padded per batch" in capsys.readouterr().out
    assert finetune(tiny_checkpoint, data, tmp_path / "run", "--epochs", 2, "--batching", "by_length") == 0
    # resuming needs the same batching; a run folder from before the option ran shuffled
    assert finetune(tiny_checkpoint, data, tmp_path / "run", "--epochs", 3, "--resume") == 1
    assert "batching: 'by_length' -> 'shuffled'" in capsys.readouterr().err
    assert finetune(tiny_checkpoint, data, tmp_path / "run", "--epochs", 3, "--resume", "--batching", "by_length") == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "run"))
    assert a["steps"] == b["steps"] == 30 and a["train_batches"] == 10
    assert a["test_accuracy"] == b["test_accuracy"] and a["final_train_loss"] == b["final_train_loss"]
    assert (a["options"]["batching"], a["options"]["pad"]) == ("by_length", "longest_in_batch")
    config = json.loads((tmp_path / "run" / "adapter" / ml.adapters.CONFIG_FILE).read_text())
    assert (config["batching"], config["pad"]) == ("by_length", "longest_in_batch")


def test_run_folder_from_before_batching_resumes(offline, tiny_checkpoint, tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv")
    assert finetune(tiny_checkpoint, data, tmp_path / "run") == 0
    cfg_path = tmp_path / "run" / "run_config.json"
    saved = json.loads(cfg_path.read_text())
    assert saved.pop("batching") == "shuffled"
    cfg_path.write_text(json.dumps(saved))  # as an older minilora wrote it
    assert finetune(tiny_checkpoint, data, tmp_path / "run", "--epochs", 2, "--resume") == 0


# ----------------------------------------------------------------------------- adapters


def test_adapter_is_self_describing(offline, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    data = write_csv(tmp_path / "d.csv")
    relative_model = shutil.copytree(tiny_checkpoint, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path / "models")
    assert finetune("tiny", data, tmp_path / "run", "--pool", "last_real", "--pad", "longest_in_batch",
                    "--max-length", 30) == 0
    config = json.loads((tmp_path / "run" / "adapter" / ml.adapters.CONFIG_FILE).read_text())
    assert config["base_model"] == str(relative_model.resolve())
    assert (config["pool"], config["pad"], config["max_length"]) == ("last_real", "longest_in_batch", 30)
    assert config["class_names"] == ["food", "sport"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # from another folder, without --model, --pool or --pad: the adapter says them all
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["evaluate", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(data),
                     "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert cli.main(["classify", "--adapter", str(tmp_path / "run" / "adapter"), "pizza cheese"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("food", "sport")


def test_evaluate_refuses_labels_the_adapter_does_not_know(offline, tiny_checkpoint, tmp_path, capsys):
    assert finetune(tiny_checkpoint, write_csv(tmp_path / "d.csv"), tmp_path / "run") == 0
    other = write_csv(tmp_path / "other.csv", words={"tech": "laptop code chip", "food": "pizza soup"})
    capsys.readouterr()
    assert cli.main(["evaluate", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(other)]) == 1
    line = error_line(capsys)
    assert "labels the adapter was not trained on: ['tech']" in line
    assert "the adapter's classes are ['food', 'sport'], the data's ['food', 'tech']" in line


def test_evaluate_train_scores_every_example(offline, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    data = write_csv(tmp_path / "d.csv")  # 21 training examples: 5 batches of 4 and one of 1
    assert finetune(tiny_checkpoint, data, tmp_path / "run") == 0
    from minilora import tasks as tasks_mod

    scored, real = [], tasks_mod.evaluate

    def counting(model, batches, *args, **kwargs):
        batches = list(batches)
        scored.append(sum(len(labels) for _, labels, _ in batches))
        return real(model, iter(batches), *args, **kwargs)

    monkeypatch.setattr(tasks_mod, "evaluate", counting)
    capsys.readouterr()
    assert cli.main(["evaluate", "--adapter", str(tmp_path / "run" / "adapter"), "--data", str(data),
                     "--split", "train", "--batch-size", "4", "--json"]) == 0
    assert scored == [21] and json.loads(capsys.readouterr().out)["train"]["examples"] == 21


# ----------------------------------------------------------------------------- silent guesses


def test_checkpoint_without_config_warns_of_the_guessed_heads(offline, tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "bare").mkdir()
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path / "bare")
    with pytest.warns(UserWarning, match=r"no config.json beside it: guessed n_heads = 1 \(width 16 / 64"):
        ml.GPTModel.from_pretrained(tmp_path / "bare")
    assert cli.main(["generate", "--model", str(tmp_path / "bare"), "--max-new-tokens", "1", "Hi"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("minilora: warning: ") and "guessed n_heads = 1" in err and "n_head" in err
    assert len(err.strip().splitlines()) == 1


def test_labels_that_look_missing_warn(tmp_path):
    from minilora.data import read_text_label_file

    path = write_csv(tmp_path / "nan.csv", words={"spam": "win prize now", "NaN": "see you soon"})
    with pytest.warns(UserWarning, match=r"label\(s\) \['NaN'\] look like missing values"):
        _, names = read_text_label_file(path)
    assert names == ("NaN", "spam")


def test_tokenizer_file_with_a_wrong_hash_is_reported_as_such(tmp_path, monkeypatch):
    from minilora.tokenizer import TOKENIZER_FILES, TokenizerError, cache_file_name, get_tokenizer

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    url = TOKENIZER_FILES["vocab.bpe"][0]
    (tmp_path / cache_file_name(url)).write_text("not the merges")
    with pytest.raises(TokenizerError, match=r"which is not GPT-2's vocab.bpe \(its sha256 is"):
        get_tokenizer(offline=True)


# ----------------------------------------------------------------------------- plots


def test_one_epoch_accuracy_plot_shows_its_point(tmp_path):
    import matplotlib.image

    from minilora.plots import plot_values

    plot_values([1.0], [84], [0.75], [0.5], tmp_path / "accuracy.png", "accuracy")
    rgb = (matplotlib.image.imread(tmp_path / "accuracy.png")[..., :3] * 255).round()
    blue = np.abs(rgb - [0x1F, 0x77, 0xB4]).max(axis=-1) < 8  # the training curve's colour (C0)
    assert blue.sum() > 30  # the marker; a line through one point draws nothing
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- the one write path


def test_atomic_write_removes_its_temporary_and_names_the_path(tmp_path):
    from minilora.files import WriteError, atomic_path, write_text

    with pytest.raises(ZeroDivisionError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            1 / 0
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'file' / 'a.json'}: ") as err:
        write_text(tmp_path / "file" / "a.json", "{}")
    assert err.value.path == tmp_path / "file" / "a.json" and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- API corners


def test_api_refuses_what_cannot_train(tiny_cfg, tiny_idx):
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    with pytest.raises(ValueError, match="alpha must be a positive finite number, got 0"):
        ml.apply_lora(model, rank=2, alpha=0)
    for targets in ([], ""):
        with pytest.raises(ValueError, match="select no layer"):
            ml.apply_lora(model, rank=2, targets=targets)
    with pytest.raises(ValueError, match="rank 9 exceeds the model width 8"):
        ml.apply_lora(model, rank=9)
    assert model.lora is None  # every refusal left the model as it was
    for lr in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning rate must be a finite number >= 0"):
            ml.AdamW(model, lr=lr)
    with pytest.raises(ValueError, match="learning rate must be a finite number >= 0"):
        ml.AdamW(model, lr=lambda step: -1.0).step({})
    opt = ml.AdamW(model, lr=1e-3)
    with pytest.raises(ValueError, match=r"no gradients \(an empty dict\).*no step was counted"):
        opt.step({})
    assert opt.step_count == 0


def test_backward_names_both_shapes(tiny_cfg, tiny_idx):
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    logits = model.forward(tiny_idx)  # (2, 5, 11)
    with pytest.raises(ValueError, match=r"dlogits has shape \(2, 11\), the logits of the last forward "
                                         r"have shape \(2, 5, 11\)"):
        model.backward(np.ones((2, 11)))
    model.backward(np.ones_like(logits))  # the right shape still works after the refusal


def test_optimizer_step_while_merged_is_refused(tiny_cfg, tiny_idx):
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    ml.apply_lora(model, rank=2, alpha=2)
    opt = ml.AdamW(model, lr=1e-2)
    model.params["h.0.mlp.c_fc.lora_B"][...] = 0.1
    base = model.params["h.0.mlp.c_fc.weight"].copy()
    grads = {n: np.ones_like(model.params[n]) for n in model.trainable}
    ml.merge_lora(model)
    with pytest.raises(RuntimeError, match="merged into the weights: unmerge_lora"):
        opt.step(grads)
    ml.unmerge_lora(model)
    np.testing.assert_allclose(model.params["h.0.mlp.c_fc.weight"], base, atol=1e-12)  # not corrupted


# ----------------------------------------------------------------------------- errors: the user's or a bug


def test_minilora_errors_share_one_base_and_keep_their_builtin_class():
    from minilora.bench import BenchmarkError
    from minilora.data import DataError
    from minilora.download import DownloadError
    from minilora.errors import CheckpointStateError, MiniloraError, OptionError, RunFolderError
    from minilora.files import WriteError
    from minilora.tokenizer import TokenizerError
    from minilora.train import TrainingDiverged
    from minilora.weights import CheckpointError

    for cls, builtin in ((DataError, RuntimeError), (DownloadError, RuntimeError), (WriteError, RuntimeError),
                         (TokenizerError, RuntimeError), (TrainingDiverged, RuntimeError),
                         (BenchmarkError, RuntimeError), (CheckpointError, ValueError), (OptionError, ValueError),
                         (RunFolderError, ValueError), (CheckpointStateError, ValueError)):
        assert issubclass(cls, MiniloraError) and issubclass(cls, builtin), cls


@pytest.mark.parametrize("bug", [KeyError("params"), RuntimeError("a bug"), TypeError("a bug")])
def test_a_bug_keeps_its_traceback(offline, tiny_checkpoint, tmp_path, monkeypatch, bug):
    """main() reports minilora's own errors in one line; a KeyError or RuntimeError from a
    bug (here raised where the data loads) is not swallowed into one."""
    from minilora import finetune as finetune_mod

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(finetune_mod, "load_data", broken)
    with pytest.raises(type(bug)):
        finetune(tiny_checkpoint, write_csv(tmp_path / "d.csv"), tmp_path / "run")


def test_a_damaged_checkpoint_is_one_line_naming_the_file(offline, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    real_step, calls = train_mod.train_step, []

    def interrupted(*args, **kwargs):
        if len(calls) == 7:  # after epoch 1 (5 steps) and its checkpoint
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    assert finetune(tiny_checkpoint, data, out, "--epochs", 2) == 130
    monkeypatch.setattr(train_mod, "train_step", real_step)
    state_file = out / "checkpoint" / "state.json"
    size = state_file.stat().st_size
    meta = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "dropout_rng"}))
    capsys.readouterr()
    assert finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume") == 1
    assert error_line(capsys) == (f"minilora finetune: error: {state_file}: {state_file.stat().st_size:,} bytes, "
                                  f"the manifest says {size:,}: the checkpoint is damaged")
    (out / "checkpoint" / "manifest.json").unlink()  # a checkpoint without one (older minilora): state.json's check
    assert finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume") == 1
    assert error_line(capsys) == (f"minilora finetune: error: {state_file}: dropout_rng: missing "
                                  f"(expected an object)")


def test_the_parser_offers_the_options_classes_defaults_and_choices():
    """The finetune command's options are FinetuneOptions' fields: the same defaults, and
    the choices of the same constants, so the two cannot drift apart."""
    from dataclasses import fields

    from minilora.backend import DTYPES
    from minilora.data import BATCHINGS, PAD_MODES
    from minilora.finetune import RECIPES, FinetuneOptions
    from minilora.lora import SCALINGS
    from minilora.tasks import POOLS

    parser = cli.build_parser()
    args = parser.parse_args(["finetune"])
    assert cli._job_options(FinetuneOptions, args) == FinetuneOptions()
    finetune_parser = next(a for a in parser._subparsers._group_actions[0].choices.values()
                           if a.prog.endswith("finetune"))
    offered = {a.dest: a.choices for a in finetune_parser._actions if a.choices}
    assert offered == {"dtype": DTYPES, "scaling": SCALINGS, "recipe": tuple(RECIPES), "pad": PAD_MODES,
                       "batching": BATCHINGS, "pool": POOLS}
    options = {a.dest for a in finetune_parser._actions} - {"help"}
    assert options == {f.name for f in fields(FinetuneOptions)}
