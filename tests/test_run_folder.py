"""The run folder as a user meets it: one job at a time in a folder (a second one is
refused naming the first; a lock left by a killed run is taken over), and --resume
refusing, in one line and before anything in the folder changes, what does not match
the run there: no such folder, no run in it, other options, other data, other classes,
a run_config.json that minilora did not write. Tiny GPT-2 (real vocabulary) and small
files, offline: about a second a run."""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minilora import cli
from minilora import finetune as finetune_mod
from minilora import train as train_mod
from minilora.errors import RunFolderError
from minilora.finetune import FinetuneOptions, run_finetune
from minilora.instruct import InstructOptions, run_instruct
from minilora.run_folder import RUN_CONFIG_FILE
from minilora.run_lock import LOCK_FILE, RunFolderBusy, RunFolderLock
from cli_helpers import error_line

WORDS = {"food": "pizza pasta bread cheese soup", "sport": "goal match team score ball"}
THREE = {**WORDS, "tech": "laptop code chip cloud disk"}
EOT = 50256


@pytest.fixture
def offline(minilora_home, monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    return minilora_home


def write_csv(path, rows=30, words=WORDS, seed=0):
    """`rows` text,label rows cycling through the classes of `words` (21 training examples of 30)."""
    rng = np.random.default_rng(seed)
    lines = ["text,label"]
    for i in range(rows):
        label = list(words)[i % len(words)]
        lines.append(f"\"{' '.join(rng.permutation(words[label].split()))} number {i}\",{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


FINETUNE = ("--epochs", "1", "--rank", "4", "--alpha", "4", "--lr", "2e-3", "--batch-size", "4",
            "--eval-freq", "2", "--eval-iter", "1")


def finetune_args(model, data, out, *args):
    """`minilora finetune` on a tiny model and a small CSV (the arguments after the program name)."""
    return ["finetune", "--model", str(model), *(("--data", str(data)) if data else ()), "--output-dir", str(out),
            *FINETUNE, *map(str, args)]


def finetune(model, data, out, *args):
    return cli.main(finetune_args(model, data, out, *args))



def snapshot(folder):
    """Every file under `folder` with its bytes; None when the folder does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_run(model, tmp_path, words=WORDS, name="run"):
    """A finished one-epoch run on a CSV of its own: (data file, run folder)."""
    data, out = write_csv(tmp_path / f"{name}.csv", words=words), tmp_path / name
    assert finetune(model, data, out) == 0
    return data, out


def refused(capsys, rc, out, before, *says):
    """The command failed with exit 1 and one line saying `says`, and the folder is as it was."""
    assert rc == 1
    line = error_line(capsys)
    for words in says:
        assert words in line, line
    assert snapshot(out) == before
    return line


# ----------------------------------------------------------------------------- --resume refuses what does not match


def test_resume_of_a_folder_that_does_not_exist_makes_nothing(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "runs" / "x"
    rc = finetune(tiny_checkpoint, data, out, "--resume")
    refused(capsys, rc, out, None, f"--resume: {out} does not exist; to start a run there, drop --resume")
    assert not (tmp_path / "runs").exists()


def test_resume_of_an_empty_folder_says_where_it_looked(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "x"
    out.mkdir()
    rc = finetune(tiny_checkpoint, data, out, "--resume")
    refused(capsys, rc, out, {}, f"{out / RUN_CONFIG_FILE} is missing", "drop --resume")


def test_resume_of_a_folder_that_holds_no_run_says_where_it_looked(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    line = refused(capsys, finetune(tiny_checkpoint, data, out, "--resume"), out, before,
                   f"{out / RUN_CONFIG_FILE} is missing")
    assert "pass --resume" not in line  # what it used to say, although --resume was passed


def test_a_fresh_run_in_a_folder_of_other_files_is_refused(offline, tiny_checkpoint, tmp_path, capsys):
    """Another tool's lock file and a partial download (a name like minilora's temporaries)
    beside the user's notes: the folder is refused before anything in it is locked or
    cleaned (both files used to be deleted, 'Removed .video.mp4.abcd1234.part' printed)."""
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / LOCK_FILE).write_text('{"other": "tool lock"}\n')
    (out / ".video.mp4.abcd1234.part").write_text("partial")
    before = snapshot(out)
    line = refused(capsys, finetune(tiny_checkpoint, data, out), out, before, "notes.txt",
                   f"holds no run ({out / RUN_CONFIG_FILE} is missing)", "--output-dir")
    assert "pass --resume" not in line


def test_a_fresh_run_on_a_run_says_pass_resume(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = finished_run(tiny_checkpoint, tmp_path)
    before = snapshot(out)
    refused(capsys, finetune(tiny_checkpoint, data, out), out, before, f"{out} already holds a run: pass --resume")


def test_resume_without_a_checkpoint_starts_afresh_saying_where_it_looked(offline, tiny_checkpoint, tmp_path,
                                                                       monkeypatch, capsys):
    """A run stopped before its first checkpoint (a second Ctrl-C mid-step keeps none)."""
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"

    real_step = train_mod.train_step

    def stopped(*args, **kwargs):
        raise train_mod.StoppedMidStep

    monkeypatch.setattr(train_mod, "train_step", stopped)
    assert finetune(tiny_checkpoint, data, out) == 130
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert not (out / "checkpoint").exists() and (out / RUN_CONFIG_FILE).is_file()
    capsys.readouterr()
    assert finetune(tiny_checkpoint, data, out, "--resume") == 0
    assert f"{out} has no checkpoint yet (none in {out / 'checkpoint'}): starting the run afresh" \
        in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["resumed"] is False


def test_resume_with_other_options_is_one_line_and_changes_nothing(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = finished_run(tiny_checkpoint, tmp_path)
    before = snapshot(out)
    rc = finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume", "--rank", 8, "--pool", "last_real")
    refused(capsys, rc, out, before, f"{out} holds a run with other options", "rank: 4 -> 8",
            "pool: 'last' -> 'last_real'")


def test_resume_on_a_data_file_whose_rows_changed_is_refused(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = finished_run(tiny_checkpoint, tmp_path)
    recorded = json.loads((out / RUN_CONFIG_FILE).read_text())
    assert recorded["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    write_csv(data, seed=1)  # the same classes, other texts, at the same path
    before = snapshot(out)
    rc = finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume")  # would extend the run
    refused(capsys, rc, out, before, f"--resume: {data} changed since the run in {out} started", "sha256")


def test_resume_on_a_data_file_with_new_classes_is_refused(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = finished_run(tiny_checkpoint, tmp_path)
    write_csv(data, words=THREE)
    before = snapshot(out)
    rc = finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume")
    refused(capsys, rc, out, before, f"the run in {out} classifies ['food', 'sport']",
            "['food', 'sport', 'tech']")


def test_resume_on_a_changed_default_sms_file_is_refused(minilora_home, tiny_checkpoint, tmp_path, monkeypatch,
                                                         capsys):
    """The default data is a file in the cache too: its sha256 is recorded and checked."""
    home = tmp_path / "home"
    (home / "sms_spam").mkdir(parents=True)
    sms = home / "sms_spam" / "SMSSpamCollection"
    shutil.copyfile(minilora_home / "sms_spam" / "SMSSpamCollection", sms)
    monkeypatch.setenv("MINILORA_HOME", str(home))  # TIKTOKEN_CACHE_DIR stays the seeded one
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    out = tmp_path / "run"
    assert finetune(tiny_checkpoint, None, out, "--batch-size", 64, "--eval-freq", 100) == 0
    recorded = json.loads((out / RUN_CONFIG_FILE).read_text())
    assert recorded["data_sha256"] == hashlib.sha256(sms.read_bytes()).hexdigest()
    assert recorded["class_names"] == ["ham", "spam"]
    sms.write_bytes(b"".join(sms.read_bytes().splitlines(keepends=True)[:-1]))  # one message fewer
    before = snapshot(out)
    rc = finetune(tiny_checkpoint, None, out, "--batch-size", 64, "--eval-freq", 100, "--epochs", 2, "--resume")
    refused(capsys, rc, out, before, f"--resume: {sms} changed since the run in {out} started")


def test_a_run_folder_from_before_the_data_was_recorded_resumes_unchecked(offline, tiny_checkpoint, tmp_path,
                                                                       capsys):
    data, out = finished_run(tiny_checkpoint, tmp_path)
    cfg_path = out / RUN_CONFIG_FILE
    saved = json.loads(cfg_path.read_text())
    del saved["data_sha256"], saved["class_names"]
    cfg_path.write_text(json.dumps(saved))  # as minilora wrote it before it recorded the data
    write_csv(data, seed=1)
    assert finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume") == 0
    extended = json.loads(cfg_path.read_text())
    assert extended == {**saved, "epochs": 2}  # still nothing recorded: the run's first data is not known


def test_a_resume_refused_when_its_base_model_loads_leaves_the_run_as_it_was(offline, tiny_checkpoint, tmp_path,
                                                                           capsys):
    """The base model is read after the run folder's checks: --resume --epochs 3 on a run
    whose base model file now holds a NaN is refused then, and run_config.json keeps the
    run's 1 epoch (it used to say 3 already, while the checkpoint held 1)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    data, out = finished_run(model, tmp_path)
    weights_file = model / "model.safetensors"
    weights = load_file(str(weights_file))
    weights["h.0.attn.c_attn.bias"] = np.full_like(weights["h.0.attn.c_attn.bias"], np.nan)
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    before = snapshot(out)
    refused(capsys, finetune(model, data, out, "--epochs", 3, "--resume"), out, before,
            f"{weights_file}: h.0.attn.c_attn.bias holds NaN")
    assert json.loads((out / RUN_CONFIG_FILE).read_text())["epochs"] == 1


def test_a_resume_that_loads_records_its_new_epochs(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = finished_run(tiny_checkpoint, tmp_path)
    capsys.readouterr()
    assert finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume") == 0
    assert f"Extending the run in {out} from 1 to 2 epochs" in capsys.readouterr().out
    assert json.loads((out / RUN_CONFIG_FILE).read_text())["epochs"] == 2


def test_a_run_folder_from_before_max_length_resumes(offline, tiny_checkpoint, tmp_path):
    """run_config.json as minilora wrote it before e5b003d (git show e5b003d^:minilora/finetune.py):
    no max_length (texts were padded to the longest training text, what max_length None
    does now), no batching, no data_sha256 or class_names. It was refused as "max_length:
    missing"."""
    data, out = finished_run(tiny_checkpoint, tmp_path)
    cfg_path = out / RUN_CONFIG_FILE
    saved = json.loads(cfg_path.read_text())
    assert saved["max_length"] is None  # what the run ran with: the rule older versions had
    for key in ("max_length", "batching", "data_sha256", "class_names"):
        del saved[key]
    cfg_path.write_text(json.dumps(saved))
    assert finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume") == 0


@pytest.mark.parametrize("content, says", [
    ("[1, 2]", "the file: expected an object"),
    ('{"rank": "4"}', 'rank: expected an integer, found "4"'),
    ('{"rank": 4.5}', "rank: expected an integer, found 4.5"),
    ('{"learning_rate": 0.1}', "learning_rate: not a key of a run config"),
    ('{"targets": 3}', "targets: expected a string or a list of strings, found 3"),
    ('{"dtype": "float16"}', 'dtype: expected one of "float32", "float64"'),
    ('{"data_sha256": null}', "data_sha256: expected a string, found null"),
    ("{", "is not valid JSON"),
])
def test_a_run_config_minilora_did_not_write_is_one_line_naming_file_and_key(offline, tiny_checkpoint, tmp_path,
                                                                          capsys, content, says):
    data, out = finished_run(tiny_checkpoint, tmp_path)
    cfg_path = out / RUN_CONFIG_FILE
    if content.startswith("{") and content.endswith("}"):
        content = json.dumps({**json.loads(cfg_path.read_text()), **json.loads(content)})
    cfg_path.write_text(content)
    before = snapshot(out)
    rc = finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume")
    refused(capsys, rc, out, before, str(cfg_path), says)


def test_a_missing_option_in_run_config_is_named(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = finished_run(tiny_checkpoint, tmp_path)
    cfg_path = out / RUN_CONFIG_FILE
    saved = json.loads(cfg_path.read_text())
    del saved["rank"]
    cfg_path.write_text(json.dumps(saved))
    before = snapshot(out)
    refused(capsys, finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume"), out, before,
            f"{cfg_path}: rank: missing (expected an integer)")


# ----------------------------------------------------------------------------- the instruction job


def write_instructions(path, n=40, offset=0):
    path.write_text(json.dumps([{"instruction": f"Write the number {i + offset} in words.", "input": "",
                                 "output": f"It is {i + offset}."} for i in range(n)]))
    return path


def instruct_args(model, data, out, *args):
    return ["instruct", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--offline",
            "--epochs", "1", "--rank", "2", "--alpha", "2", "--batch-size", "4", "--max-length", "128",
            "--eval-freq", "100", "--eval-iter", "1", *map(str, args)]


def test_instruct_resume_on_changed_data_is_refused(offline, eot_checkpoint, tmp_path, capsys):
    data, out = write_instructions(tmp_path / "mine.json"), tmp_path / "run"
    assert cli.main(instruct_args(eot_checkpoint, data, out)) == 0
    recorded = json.loads((out / RUN_CONFIG_FILE).read_text())
    assert recorded["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert "class_names" not in recorded
    write_instructions(data, offset=1)
    before = snapshot(out)
    rc = cli.main(instruct_args(eot_checkpoint, data, out, "--epochs", 2, "--resume"))
    refused(capsys, rc, out, before, f"--resume: {data} changed since the run in {out} started")


def test_instruct_resume_records_its_new_epochs_once_it_loads(offline, eot_checkpoint, tmp_path, capsys):
    data, out = write_instructions(tmp_path / "mine.json", n=12), tmp_path / "run"  # 2 steps an epoch
    assert cli.main(instruct_args(eot_checkpoint, data, out)) == 0
    capsys.readouterr()
    assert cli.main(instruct_args(eot_checkpoint, data, out, "--epochs", 2, "--resume")) == 0
    assert f"Extending the run in {out} from 1 to 2 epochs" in capsys.readouterr().out
    assert json.loads((out / RUN_CONFIG_FILE).read_text())["epochs"] == 2


# ----------------------------------------------------------------------------- one job at a time


# The first run waits in its first training step until the test creates the gate file: it
# holds the run folder for as long as the test needs, and then trains exactly as a lone run.
GATED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from minilora import cli, train

    gate, real_step = Path(sys.argv[1]), train.train_step

    def gated_step(*args, **kwargs):
        gate.with_suffix(".reached").touch()  # everything before the first step is written
        while not gate.exists():
            time.sleep(0.01)
        return real_step(*args, **kwargs)

    train.train_step = gated_step
    sys.exit(cli.main(sys.argv[2:]))
""")


def wait_for_holder(lock, process, timeout=60):
    """The JSON the running `process` wrote into the lock file, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            return json.loads(lock.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.05)
    raise AssertionError(f"{lock} was not written within {timeout} s")


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_first(offline, tiny_checkpoint, tmp_path):
    data, out, gate = write_csv(tmp_path / "d.csv"), tmp_path / "run", tmp_path / "gate"
    args = finetune_args(tiny_checkpoint, data, out)
    first = subprocess.Popen([sys.executable, "-c", GATED_RUN, str(gate), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for_holder(out / LOCK_FILE, first)
        assert holder["pid"] == first.pid
        deadline = time.monotonic() + 60  # the first run writes run_config.json and more before its first step
        while not gate.with_suffix(".reached").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never reached its first step"
            time.sleep(0.05)
        before = snapshot(out)
        second = subprocess.run([sys.executable, "-m", "minilora", *args], capture_output=True, text=True,
                                timeout=120)
        assert first.poll() is None  # the first still holds the folder: the refusal came while it ran
        assert second.returncode == 1 and "Traceback" not in second.stderr
        line, = second.stderr.strip().splitlines()
        assert re.search(rf"{re.escape(str(out))} is in use by minilora finetune, pid {first.pid} on host "
                         rf"{re.escape(socket.gethostname())}, since [0-9: -]+; wait for it or choose another "
                         rf"--output-dir$", line), line
        assert snapshot(out) == before
        gate.touch()
        printed, err = first.communicate(timeout=120)
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert "Done in" in printed and not (out / LOCK_FILE).exists()
    # the first run is unharmed: its adapter is bit for bit a lone run's
    assert finetune(tiny_checkpoint, data, tmp_path / "lone") == 0
    assert snapshot(out / "adapter") == snapshot(tmp_path / "lone" / "adapter")


def test_the_python_api_takes_the_lock_too(offline, tiny_checkpoint, eot_checkpoint, tmp_path):
    out = tmp_path / "run"
    with RunFolderLock(out, "minilora finetune"):  # another job holds the folder
        before = snapshot(out)
        with pytest.raises(RunFolderBusy, match=rf"is in use by minilora finetune, pid {os.getpid()} on host"):
            run_finetune(FinetuneOptions(model=str(tiny_checkpoint), data=str(write_csv(tmp_path / "d.csv")),
                                         output_dir=str(out), epochs=1, rank=4, alpha=4, batch_size=4),
                         log=lambda msg: None, progress=False)
        with pytest.raises(RunFolderBusy, match=rf"pid {os.getpid()} on host"):
            run_instruct(InstructOptions(model=str(eot_checkpoint), max_length=128, output_dir=str(out),
                                         data=str(write_instructions(tmp_path / "i.json")), epochs=1, rank=2,
                                         batch_size=4), log=lambda msg: None, progress=False)
        assert snapshot(out) == before
    assert not (out / LOCK_FILE).exists()


def _dead_pid():
    """The process id of a process that has ended (not reused so soon)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(offline, tiny_checkpoint, tmp_path, capsys):
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK_FILE).write_text(json.dumps({"job": "minilora finetune", "pid": pid, "host": socket.gethostname(),
                                             "started": "2024-01-02T03:04:05+00:00"}))
    assert finetune(tiny_checkpoint, data, out) == 0
    printed = capsys.readouterr().out
    assert f"{out} was locked by minilora finetune, pid {pid} on host {socket.gethostname()}, since 2024-01-0" \
        in printed and "which is no longer running: taking the lock over" in printed
    assert not (out / LOCK_FILE).exists() and (out / "metrics.json").is_file()


def test_a_free_lock_naming_another_host_is_taken_over_and_said(offline, tiny_checkpoint, tmp_path, capsys):
    """Docker gives a container a new host name each time it starts: a run killed in one
    container and resumed in the next finds its lock under another name. The lock is free
    (no process holds it), so it is taken over, the line naming the host it came from; it
    used to say 'delete .lock' on every run although nothing held it."""
    data, out = finished_run(tiny_checkpoint, tmp_path)
    (out / LOCK_FILE).write_text(json.dumps({"job": "minilora finetune", "pid": 4321, "host": "3f2a9c1b7d0e",
                                             "started": "2024-01-02T03:04:05+00:00"}))
    capsys.readouterr()
    assert finetune(tiny_checkpoint, data, out, "--epochs", 2, "--resume") == 0
    printed = capsys.readouterr().out
    assert f"{out} was locked by minilora finetune, pid 4321 on host 3f2a9c1b7d0e, since 2024-01-0" in printed
    assert "the lock is free" in printed and "taking the lock over" in printed
    assert not (out / LOCK_FILE).exists() and json.loads((out / "metrics.json").read_text())["resumed"] is True


def test_a_lock_file_of_another_program_is_refused_and_left_as_it_is(offline, tiny_checkpoint, tmp_path, capsys):
    """An empty folder but for another tool's .lock: minilora used to overwrite it with its
    holder and then delete it when the run ended."""
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "proj"
    out.mkdir()
    (out / LOCK_FILE).write_text('{"other": "tool lock"}\n')
    before = snapshot(out)
    refused(capsys, finetune(tiny_checkpoint, data, out), out, before,
            f"{out / LOCK_FILE}: job: missing", "not the lock file of a minilora job",
            "choose another --output-dir")


def test_the_lock_goes_with_ctrl_c_and_the_run_resumes(offline, tiny_checkpoint, tmp_path, monkeypatch):
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"
    real_step, calls = train_mod.train_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, mid-epoch
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    assert finetune(tiny_checkpoint, data, out) == 130
    assert not (out / LOCK_FILE).exists() and (out / "checkpoint").is_dir()
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert finetune(tiny_checkpoint, data, out, "--resume") == 0


def test_the_lock_goes_with_a_bug(offline, tiny_checkpoint, tmp_path, monkeypatch):
    data, out = write_csv(tmp_path / "d.csv"), tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(finetune_mod, "build_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        finetune(tiny_checkpoint, data, out)
    assert (out / RUN_CONFIG_FILE).is_file() and not (out / LOCK_FILE).exists()


def test_a_refused_second_lock_leaves_the_holders_file(tmp_path):
    """The refusal path of the lock itself: the holder's file and lock stand."""
    with RunFolderLock(tmp_path / "run", "minilora instruct") as held:
        text = held.path.read_text()
        with pytest.raises(RunFolderBusy, match="in use by minilora instruct"):
            RunFolderLock(tmp_path / "run", "minilora finetune").acquire()
        assert held.path.read_text() == text
        with pytest.raises(RunFolderBusy):  # still held
            RunFolderLock(tmp_path / "run", "minilora finetune").acquire()
    assert not held.path.exists()
    assert issubclass(RunFolderBusy, RunFolderError)


def test_a_lock_file_removed_between_open_and_lock_is_not_held(tmp_path, monkeypatch):
    """The first job ends (removing the lock file) after the second opened the file but before
    it locked it: the second must not hold that removed file, which no later job would see."""
    from minilora import run_lock

    first = RunFolderLock(tmp_path / "run", "minilora finetune")
    first.acquire()
    real_try_lock, attempts = run_lock._try_lock, []

    def first_ends_meanwhile(fd, path):
        if not attempts:
            first.release()
        attempts.append(fd)
        return real_try_lock(fd, path)

    monkeypatch.setattr(run_lock, "_try_lock", first_ends_meanwhile)
    second = RunFolderLock(tmp_path / "run", "minilora instruct")
    second.acquire()
    monkeypatch.setattr(run_lock, "_try_lock", real_try_lock)
    assert len(attempts) == 2  # the file it locked first was gone: it opened the new one
    assert json.loads(second.path.read_text())["job"] == "minilora instruct"
    with pytest.raises(RunFolderBusy, match="in use by minilora instruct"):
        RunFolderLock(tmp_path / "run", "minilora finetune").acquire()
    second.release()
    assert not second.path.exists()
