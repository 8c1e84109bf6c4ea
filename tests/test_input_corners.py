"""Input corners, as a user meets them (issue 22): data that is probably misread, AdamW and
generate() called with what cannot give a useful update or continuation, and commands that
would print NaN. Each is refused with one line naming the file, option or argument, before
anything changes, or now does the right thing. Tiny GPT-2 (real vocabulary, context 128),
small files, offline: about a second a test."""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minilora as ml
from minilora import cli
from minilora.adapters import CONFIG_FILE, WEIGHTS_FILE
from minilora.data import DataError, load_text_label_file, read_text_label_file
from minilora.generate import GenerationError, generate, generate_text
from minilora.optim import OptimizerError

from fixtures_weights import TINY_REAL_VOCAB
from cli_helpers import error_line

WORDS = {"food": "pizza pasta bread cheese soup", "sport": "goal match team score ball"}


@pytest.fixture
def offline(minilora_home, monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    return minilora_home


def text_label_rows(rows=30):
    """`rows` distinct texts with their labels, cycling through the classes of WORDS."""
    rng = np.random.default_rng(0)
    labels = [list(WORDS)[i % len(WORDS)] for i in range(rows)]
    return [(" ".join(rng.permutation(WORDS[label].split())) + f" number {i}", label)
            for i, label in enumerate(labels)]


def write_rows(path, rows, header="text,label", sep=","):
    path.write_text("\n".join([header] + [sep.join(row) for row in rows]) + "\n")
    return path


def finetune(model, data, out):
    """`minilora finetune` of a tiny model on `data`, one short epoch."""
    return cli.main(["finetune", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                     "--epochs", "1", "--rank", "2", "--alpha", "2", "--batch-size", "4",
                     "--eval-freq", "2", "--eval-iter", "1", "--offline"])


def nothing_trained(run):
    """No run got under way in the folder `run`: no checkpoint, adapter or metrics. (Whether
    the folder itself is made before the data is read is the run folder's rule, tested in
    tests/test_bad_input.py.)"""
    return not any((run / name).exists() for name in ("checkpoint", "adapter", "metrics.json"))



# ----------------------------------------------------------------------------- data probably misread


def test_a_header_naming_a_column_twice_is_refused(offline, tiny_checkpoint, tmp_path, capsys):
    # read as before, the first 'label' column (row ids) made every row a class of its own
    rows = [(f"row{i}", label, text) for i, (text, label) in enumerate(text_label_rows())]
    data = write_rows(tmp_path / "twice.csv", rows, header="label,label,text")
    assert finetune(tiny_checkpoint, data, tmp_path / "run") == 1
    line = error_line(capsys)
    assert f"{data}: the header names the column 'label' 2 times (columns [1, 2])" in line
    assert nothing_trained(tmp_path / "run")


def test_the_raw_sms_file_given_as_data_is_refused(offline, tiny_checkpoint, shared_data_dir, tmp_path, capsys):
    # label<TAB>text without a header: read as text,label, every distinct SMS became a class
    data = shutil.copy(shared_data_dir / "sms_spam" / "SMSSpamCollection", tmp_path / "SMSSpamCollection")
    assert finetune(tiny_checkpoint, data, tmp_path / "run") == 1
    line = error_line(capsys)
    assert line.startswith(f"minilora finetune: error: {data}: ")
    assert "is the header missing, or is the label column the text?" in line
    counted = re.search(r": ([\d,]+) of the ([\d,]+) classes have a single example \(e\.g\. ", line)
    single, classes = (int(n.replace(",", "")) for n in counted.groups())
    distinct_texts = {row.split("\t", 1)[1] for row in data.read_text(encoding="utf-8").splitlines() if row}
    assert classes > len(distinct_texts) / 2 and single > classes / 2  # the rule: most classes, once each
    assert nothing_trained(tmp_path / "run")


@pytest.mark.parametrize("counts", [
    {"a": 5, "b": 5},             # the smallest file that splits 70/10/20: 10 rows
    {"a": 20, "b": 20, "c": 1},   # one rare class
    {"a": 9, "b": 1},             # half the classes single: not most
])
def test_small_real_datasets_pass_the_single_example_rule(tmp_path, gpt2_tokenizer, counts):
    rows = [(f"text {label} {i}", label) for label, n in counts.items() for i in range(n)]
    data = load_text_label_file(write_rows(tmp_path / "small.csv", rows), tokenizer=gpt2_tokenizer)
    assert data.class_names == tuple(sorted(counts))


def test_most_classes_with_a_single_example_are_refused_in_the_api(tmp_path, gpt2_tokenizer):
    rows = [(f"text a {i}", "a") for i in range(10)] + [("text b", "b"), ("text c", "c")]
    path = write_rows(tmp_path / "mostly_single.csv", rows)
    with pytest.raises(DataError, match=rf"^{path}: 2 of the 3 classes have a single example \(e.g. 'b'\)"):
        load_text_label_file(path, tokenizer=gpt2_tokenizer)


def test_a_tsv_named_csv_says_it_holds_tabs(offline, tiny_checkpoint, tmp_path, capsys):
    rows = text_label_rows()
    data = write_rows(tmp_path / "reviews.csv", rows, header="text\tlabel", sep="\t")
    assert finetune(tiny_checkpoint, data, tmp_path / "run") == 1
    line = error_line(capsys)
    assert line.startswith(f"minilora finetune: error: {data}")
    assert line.endswith("its lines hold tabs, but a file named reviews.csv is read as comma-separated: "
                         "name it reviews.tsv to read it as tab-separated")
    assert nothing_trained(tmp_path / "run")
    # doing what it says reads the file
    df, names = read_text_label_file(data.rename(tmp_path / "reviews.tsv"))
    assert df["Text"].tolist() == [text for text, _ in rows] and names == tuple(sorted(WORDS))


def test_a_tsv_named_csv_that_pandas_cannot_parse_is_one_line(tmp_path):
    # tabs and commas: pandas fails on a later line, with a message that ends in a newline
    path = tmp_path / "sms.csv"
    path.write_text("ham\tGo until jurong point, crazy..\nham\tOk lar...\nspam\tFree, entry, in, 2\n")
    with pytest.raises(DataError) as info:
        read_text_label_file(path)
    message = str(info.value)
    assert message.startswith(f"{path} is malformed: ") and "\n" not in message
    assert message.endswith("its lines hold tabs, but a file named sms.csv is read as comma-separated: "
                            "name it sms.tsv to read it as tab-separated")


# ----------------------------------------------------------------------------- AdamW


def test_adamw_on_a_model_with_nothing_to_train_is_refused(tiny_cfg):
    model = ml.GPTModel(tiny_cfg, seed=0)
    model.freeze()
    with pytest.raises(OptimizerError, match=r"^AdamW: the model has nothing to train \(model.trainable is empty"):
        ml.AdamW(model)


def lora_model(tiny_cfg):
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    ml.apply_lora(model, rank=2, alpha=2, seed=1)
    return model


def grads_of(model, seed):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(model.params[n].shape) for n in model.trainable}


@pytest.mark.parametrize("wrong", ["another size", "transposed", "None"])
def test_a_wrong_gradient_is_refused_before_anything_changes(tiny_cfg, wrong):
    model, straight = lora_model(tiny_cfg), lora_model(tiny_cfg)
    opt, straight_opt = ml.AdamW(model, lr=1e-2), ml.AdamW(straight, lr=1e-2)
    opt.step(grads_of(model, 0))  # moments that a wrong step could spoil
    straight_opt.step(grads_of(straight, 0))
    bad = grads_of(model, 1)
    name = model.trainable[-1]  # updated last: the old flat update had changed every other one first
    shape = model.params[name].shape
    bad[name] = {"another size": np.ones((shape[0] + 1, shape[1])), "transposed": np.ones(shape[::-1]),
                 "None": None}[wrong]
    got = "is NoneType, not an array" if wrong == "None" else f"has shape {bad[name].shape}"
    says = f"AdamW.step: the gradient of {name} {got}, the parameter has shape {shape}; nothing was updated"
    with pytest.raises(OptimizerError, match=f"^{re.escape(says)}$"):
        opt.step(bad)
    assert opt.step_count == 1
    # the refused step left no trace: the next steps follow the run that never saw it, bit for bit
    for seed in (2, 3):
        opt.step(grads_of(model, seed))
        straight_opt.step(grads_of(straight, seed))
    for n in model.trainable:
        np.testing.assert_array_equal(model.params[n], straight.params[n], err_msg=n)


# ----------------------------------------------------------------------------- generation


@pytest.fixture
def lm():
    cfg = ml.GPTConfig(vocab_size=23, context_length=12, emb_dim=8, n_heads=2, n_layers=2)
    return ml.GPTModel(cfg, seed=3, dtype="float64")


@pytest.mark.parametrize("kwargs, says", [
    ({"max_new_tokens": -5}, "max_new_tokens must be an integer >= 0, got -5"),
    ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer >= 0, got 2.0"),
    ({"temperature": -1}, r"temperature must be a finite number >= 0 \(0: greedy\), got -1"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0 \(0: greedy\), got nan"),
    ({"top_k": 2.5}, "top_k must be an integer >= 1 or None, got 2.5"),
    ({"top_k": 0}, "top_k must be an integer >= 1 or None, got 0"),
])
def test_generate_refuses_arguments_it_would_misread(lm, kwargs, says):
    # before: -5 returned the prompt, -1 ran greedy, 2.5 ended in an IndexError
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(GenerationError, match=rf"^generate: {says}$"):
        generate(lm, np.array([[1, 2]]), **kwargs)


def test_generate_with_no_new_tokens_returns_the_prompt(lm):
    prompt = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(generate(lm, prompt, 0), prompt)


def test_generate_takes_an_endoftext_in_the_prompt_as_classify_does(offline, tiny_checkpoint, adapter, capsys):
    # before: tiktoken's 5-line refusal about allowed_special, while classify took the same text
    prompt = "a <|endoftext|> b"
    assert cli.main(["classify", "--adapter", str(adapter[1]), prompt]) == 0
    assert capsys.readouterr().out.rstrip("\n").endswith(f"\t{prompt}")
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--offline", "--max-new-tokens", "3", prompt]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(prompt) and len(captured.out) > len(prompt) + 1
    assert captured.err == ""


def test_an_empty_prompt_is_one_line(offline, tiny_checkpoint, capsys, gpt2_tokenizer):
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--offline", ""]) == 1
    assert error_line(capsys) == "minilora generate: error: generate: the prompt '' has no tokens to continue; " \
                                 "give some text"
    model = ml.GPTModel.from_pretrained(tiny_checkpoint)
    with pytest.raises(GenerationError, match="the prompt '' has no tokens to continue"):
        generate_text(model, gpt2_tokenizer, "")


# ----------------------------------------------------------------------------- classify and evaluate


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_checkpoint, minilora_home):
    """(data file, adapter folder) of a tiny classifier trained on WORDS."""
    root = tmp_path_factory.mktemp("corners")
    data = write_rows(root / "d.csv", text_label_rows())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILORA_OFFLINE", "1")
        assert finetune(tiny_checkpoint, data, root / "run") == 0
    return data, root / "run" / "adapter"


@pytest.fixture
def overflowing_adapter(adapter, tmp_path):
    """A copy of the adapter whose head's LoRA factors are finite but so large (1e30 each) that
    x @ A @ B overflows float32 (max ~3.4e38) to infinity: the scores become inf or NaN
    although every stored tensor is finite."""
    folder = shutil.copytree(adapter[1], tmp_path / "overflowing")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    for name in ("out_head.lora_A", "out_head.lora_B"):
        assert name in tensors
        tensors[name] = np.full_like(tensors[name], 1e30)
    assert all(np.isfinite(t).all() for t in tensors.values())
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def test_classify_max_length_beyond_the_context_is_refused_before_the_model_loads(
        offline, adapter, tiny_checkpoint, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(ml.GPTModel, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    for command in (["classify", "--max-length", "100000", "pizza"], ["evaluate", "--max-length", "100000"]):
        assert cli.main([command[0], "--adapter", str(adapter[1]), "--model", str(tiny_checkpoint),
                         *command[1:]]) == 1
        assert error_line(capsys) == (f"minilora {command[0]}: error: --max-length 100000 is longer than the "
                                      f"model's context length ({TINY_REAL_VOCAB.context_length} tokens)")
    assert loaded == []


def strict_json_load(text):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_evaluate_json_never_prints_nan(offline, adapter, overflowing_adapter, capsys):
    assert cli.main(["evaluate", "--adapter", str(overflowing_adapter), "--data", str(adapter[0]),
                     "--split", "train", "--json"]) == 0
    captured = capsys.readouterr()
    result = strict_json_load(captured.out)["train"]
    assert result["loss"] is None and result["examples"] > 0
    assert "NaN" not in captured.out and "Infinity" not in captured.out
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("minilora: warning: the train loss is ")
    assert f"the adapter {overflowing_adapter} or the model produced non-finite scores" in warning[0]


def test_classify_refuses_non_finite_scores(offline, overflowing_adapter, capsys):
    assert cli.main(["classify", "--adapter", str(overflowing_adapter), "pizza cheese"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no class printed with probability nan
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(f"minilora classify: error: the adapter {overflowing_adapter} or the model "
                                   f"produced non-finite scores (")
    assert captured.err.rstrip().endswith("for text 1 ('pizza cheese'): no class can be read from them")


def test_a_base_model_that_moved_is_one_line_naming_the_adapter(offline, adapter, tmp_path, capsys):
    folder = shutil.copytree(adapter[1], tmp_path / "moved")
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["base_model"] = str(tmp_path / "gone")
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    assert cli.main(["classify", "--adapter", str(folder), "pizza"]) == 1
    line = error_line(capsys)  # was two lines, the second one saying where the name came from
    assert str(tmp_path / "gone") in line
    assert line.endswith(f"(the base model recorded in {folder}; pass --model to say where it is)")


# ----------------------------------------------------------------------------- a model of the wrong kind


@pytest.fixture(scope="module")
def lm_adapters(tmp_path_factory, tiny_checkpoint):
    """{"minilora": ..., "peft": ...}: a language model's adapter of the tiny model in both formats
    (what `minilora instruct` saves, and its `minilora export`), each naming its base model."""
    root = tmp_path_factory.mktemp("lm-adapters")
    model = ml.GPTModel.from_pretrained(tiny_checkpoint)
    ml.apply_lora(model, rank=2, alpha=2)
    return {"minilora": ml.save_adapter(model, root / "lm", base_model=str(tiny_checkpoint)),
            "peft": ml.export_peft(model, root / "peft")}


@pytest.mark.parametrize("kind", ["minilora", "peft"])
@pytest.mark.parametrize("command", ["classify", "evaluate"])
def test_classify_and_evaluate_refuse_a_language_model_s_adapter(offline, lm_adapters, adapter, kind, command,
                                                                  capsys):
    """Once: exit 0, printing vocabulary ids as classes ("48180 0.0000 win money now"), or
    an accuracy of 0.00%."""
    folder = lm_adapters[kind]
    args = ["win money now"] if command == "classify" else ["--data", str(adapter[0])]
    assert cli.main([command, "--adapter", str(folder), *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"minilora {command}: error: --adapter {folder}: a language model's "
                                         f"adapter (no classifier head); use minilora generate --adapter {folder}"]


@pytest.fixture(scope="module")
def merged_models(tmp_path_factory, tiny_checkpoint):
    """{"language model": ..., "classifier": ...}: merged exports (minilora export --merged) of
    the tiny model with LoRA on every linear: the language model's head untied (its own
    lm_head.weight, tie_word_embeddings false), the classifier's head out_head.*."""
    from minilora.export import export_merged

    root = tmp_path_factory.mktemp("merged")
    lm = ml.GPTModel.from_pretrained(tiny_checkpoint)
    ml.apply_lora(lm, rank=2, alpha=2)
    classifier = ml.GPTModel.from_pretrained(tiny_checkpoint).replace_head(2)
    ml.apply_lora(classifier, rank=2, alpha=2)
    return {"language model": export_merged(lm, root / "lm"), "classifier": export_merged(classifier, root / "cls")}


@pytest.fixture
def instruction_file(tmp_path):
    entries = [{"instruction": f"Name the number {i}.", "input": "", "output": f"It is {i}."} for i in range(40)]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(entries))
    return path


def instruct(model, data, out, *more):
    return cli.main(["instruct", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                     "--epochs", "1", "--batch-size", "4", "--max-length", "64", "--offline", *more])


def test_full_instruction_fine_tuning_of_an_untied_head_is_refused_before_the_run_folder(
        offline, merged_models, instruction_file, tmp_path, capsys):
    """Once: a RuntimeError traceback from model.backward at step 0, the run folder written."""
    model = merged_models["language model"]
    assert instruct(model, instruction_file, tmp_path / "run", "--full") == 1
    line = error_line(capsys)
    assert line.startswith(f"minilora instruct: error: --model {model}: ") and "tie_word_embeddings false" in line
    assert "LoRA" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_instruction_fine_tuning_of_a_classifier_is_refused_before_the_run_folder(
        offline, merged_models, instruction_file, tmp_path, capsys, full):
    """Once: "targets must be in [0, 2) or ignore_index (-100)" after the run folder was written."""
    model = merged_models["classifier"]
    assert instruct(model, instruction_file, tmp_path / "run", *(["--full"] if full else ["--rank", "2"])) == 1
    assert error_line(capsys).startswith(f"minilora instruct: error: --model {model}: a classifier")
    assert not (tmp_path / "run").exists()


def test_finetune_of_a_merged_classifier_is_refused_before_the_run_folder(offline, merged_models, adapter,
                                                                          tmp_path, capsys):
    """Once: trained under a new random head over the merged one, and with other classes an
    adapter that its own base model refused ("adapter has 3 classes, model has 2")."""
    model = merged_models["classifier"]
    assert finetune(model, adapter[0], tmp_path / "run") == 1
    assert error_line(capsys).startswith(f"minilora finetune: error: --model {model}: a classifier already")
    assert not (tmp_path / "run").exists()
