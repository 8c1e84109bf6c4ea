"""Every field of every JSON file kind minilora reads, corrupted in turn, is refused in one line
naming the file and that key (issue 22's property test).

The corruptions are generated from each kind's Schema (minilora.schema), so a field added to a
schema is covered without touching this file: for each field, wherever it sits (nested objects,
the first item of a list), the key removed (when it is required), a value of the wrong type,
null (when not allowed), NaN (where a number belongs), a value just outside each limit, a value
outside the choices, and an unknown key beside it (for kinds that refuse unknown keys). The valid
starting point of each kind is a file minilora itself wrote, so the test also shows that what
minilora writes passes its own checks.
"""

import json
import math

import numpy as np
import pytest

import minilora as ml
from minilora import adapters, checkpoint, peft, run_folder, run_lock, weights
from minilora.finetune import FinetuneOptions
from minilora.schema import FileCheckError, read_json

CFG = ml.GPTConfig(vocab_size=32, context_length=8, emb_dim=8, n_heads=2, n_layers=1)
MISSING = object()
WRONG_TYPE = {"int": "1", "number": "1.5", "str": 5, "bool": "yes", "list": {"not": "a list"}, "dict": ["not an object"]}


def corruptions(schema, doc, prefix=""):
    """(key path, what, corrupted copy of doc) for every field of `schema` present in `doc`."""
    if schema.extra == "refuse":
        yield prefix + "not_a_key", "unknown key", {**doc, "not_a_key": 1}
    for key, field in schema.fields.items():
        path = prefix + key
        if key not in doc:
            continue
        bad = []
        if field.required:
            bad.append(("missing", MISSING))
        if field.kind in WRONG_TYPE:
            bad.append(("wrong type", WRONG_TYPE[field.kind]))
        if not field.nullable:
            bad.append(("null", None))
        if field.kind in ("int", "number"):
            bad.append(("NaN", math.nan))
            for limit, outside in ((field.least, -1), (field.above, 0), (field.most, +1)):  # above: > it
                if limit is not None:
                    bad.append(("out of range", limit + outside))
        if field.choices is not None:
            bad.append(("not a choice", "not-one-of-the-choices"))
        for what, value in bad:
            changed = {k: v for k, v in doc.items() if k != key} if value is MISSING else {**doc, key: value}
            yield path, what, changed
        value = doc[key]
        if field.kind == "dict" and field.schema is not None and isinstance(value, dict):
            for sub, what, inner in corruptions(field.schema, value, path + "."):
                yield sub, what, {**doc, key: inner}
        if field.kind == "list" and field.items is not None and value:
            item, item_path = field.items, f"{path}[0]"
            if item.kind == "dict" and item.schema is not None:
                for sub, what, inner in corruptions(item.schema, value[0], item_path + "."):
                    yield sub, what, {**doc, key: [inner] + value[1:]}
            elif item.kind in WRONG_TYPE:
                yield item_path, "wrong type", {**doc, key: [WRONG_TYPE[item.kind]] + value[1:]}


def lora_model(head=None):
    model = ml.GPTModel(CFG, seed=0)
    if head:
        model.replace_head(head)
    ml.apply_lora(model, rank=2, alpha=4, targets="all")
    return model


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{kind: (schema, the JSON minilora wrote)} for every file kind it reads."""
    tmp = tmp_path_factory.mktemp("written")
    files = {}
    files["config.json"] = (weights.HF_CONFIG_SCHEMA, weights.config_to_hf(CFG))

    adapters.save_adapter(lora_model(head=2), tmp / "adapter", base_model="gpt2-small", class_names=["ham", "spam"],
                          max_length=8, pool="last", pad="dataset", batching="shuffled")
    files["minilora_adapter.json"] = (adapters.adapter_schema(), tmp / "adapter" / adapters.CONFIG_FILE)

    model = lora_model(head=2)
    opt = ml.AdamW(model)
    row = {"step": 1, "epoch": 1, "examples_seen": 4, "tokens_seen": 32}
    state = checkpoint.LoopState(step=1, examples_seen=4, tokens_seen=32,
                                 history=[{**row, "lr": 1e-3, "batch_loss": 0.7, "seconds": 0.1}],
                                 evals=[{**row, "train_loss": 0.7, "val_loss": 0.8}],
                                 epochs=[{"epoch": 1, "examples_seen": 4, "tokens_seen": 32, "val_accuracy": 0.5}])
    checkpoint.save_checkpoint(tmp / "checkpoint", model, opt, state)
    files["state.json"] = (checkpoint.STATE_SCHEMA, tmp / "checkpoint" / checkpoint.STATE_FILE)
    files["manifest.json"] = (checkpoint.MANIFEST_SCHEMA, tmp / "checkpoint" / checkpoint.MANIFEST_FILE)

    data = tmp / "data.csv"
    data.write_text("text,label\na,ham\nb,spam\n")
    opts = FinetuneOptions(output_dir=str(tmp / "run"))
    with run_folder.hold_run_folder(tmp / "run", opts, lambda line: None, "minilora finetune", data_file=data,
                                    class_names=["ham", "spam"]):
        files["run_config.json"] = (run_folder.run_config_schema(FinetuneOptions),
                                    json.loads((tmp / "run" / run_folder.RUN_CONFIG_FILE).read_text()))
        files[".lock"] = (run_lock.HOLDER, json.loads((tmp / "run" / run_lock.LOCK_FILE).read_text()))

    peft.export_peft(lora_model(), tmp / "peft", base_model="gpt2-small")
    files["adapter_config.json (PEFT)"] = (peft.PEFT_CONFIG_SCHEMA, tmp / "peft" / peft.CONFIG_FILE)
    return {kind: (schema, json.loads(doc.read_text()) if not isinstance(doc, dict) else doc)
            for kind, (schema, doc) in files.items()}


KINDS = ["config.json", "minilora_adapter.json", "state.json", "manifest.json", "run_config.json", ".lock",
         "adapter_config.json (PEFT)"]


@pytest.mark.parametrize("kind", KINDS)
def test_what_minilora_writes_passes_its_own_checks(written, kind, tmp_path):
    schema, doc = written[kind]
    path = tmp_path / "file.json"
    path.write_text(json.dumps(doc))
    read_json(path, schema)


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_corrupted_in_turn_is_refused_naming_it(written, kind, tmp_path):
    schema, doc = written[kind]
    path = tmp_path / "file.json"
    cases = list(corruptions(schema, doc))
    assert len(cases) >= 3 * len(schema.fields) // 2, len(cases)  # the generator reached the fields
    accepted = []
    for key, what, changed in cases:
        path.write_text(json.dumps(changed, allow_nan=True))
        try:
            read_json(path, schema)
        except FileCheckError as e:
            message = str(e)
            assert "\n" not in message and message.startswith(f"{path}: {key}"), (what, message)
        else:
            accepted.append((key, what))
    assert accepted == [], accepted


def test_the_generator_finds_a_nested_list_item(written):
    """The corruptions reach into lists of objects: the manifest's first file entry."""
    schema, doc = written["manifest.json"]
    keys = {key for key, _, _ in corruptions(schema, doc)}
    assert {"files[0].size", "files[0].sha256", "format"} <= keys
    assert np.isnan([c[2]["files"][0]["size"] for c in corruptions(schema, doc)
                     if c[0] == "files[0].size" and c[1] == "NaN"][0])
