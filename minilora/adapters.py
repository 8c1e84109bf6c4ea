"""Save and load a LoRA adapter on its own: the small trained part of a fine-tune.

An adapter folder holds two files:

    adapter.safetensors     every lora_A / lora_B, and out_head.weight/.bias when the
                            head was replaced (it is random and frozen, so the adapter
                            is useless without the exact head it was trained with)
    minilora_adapter.json   rank, alpha, scaling, dropout, targets, base model name and
                            config, number of classes and their names, and how the
                            texts were fed in training (max length, padding, batching,
                            pooling), checked on reading by adapter_schema()

Older minilora versions named the config ``adapter_config.json``, which is Hugging Face
PEFT's file name for another schema (PEFT tools that met ours failed obscurely); it is
still read, and a folder that holds a PEFT adapter instead is named as one.

save_adapter writes both into a temporary folder that then replaces the adapter folder
whole (minilora.files.atomic_folder), so an interrupted save leaves the previous adapter
or the new one, never new weights beside an old config or one file without the other;
a crash between atomic_folder's two renames leaves the previous adapter set aside
(``.<folder>.<random>.old``), which reading the adapter puts back. Because the folder is replaced whole, it must hold nothing but an
adapter. A caller whose bigger folder is already written atomically (a checkpoint)
can write the two files into it with write_adapter instead.

Reading checks the whole config (minilora.schema) and every tensor (floating point,
finite) before anything uses them; loading then checks everything against the model
before changing anything: on any problem the model is left exactly as it was.
"""

import functools
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .backend import to_numpy
from .errors import MiniloraError
from .files import atomic_folder, recover_folder
from .lora import SCALINGS, adapter_sites, apply_lora
from .schema import Field, FileCheckError, Schema, load_json
from .tasks import POOLS
from .tensors import cast_finite, read_float_tensors

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "minilora_adapter.json"
OLD_CONFIG_FILE = "adapter_config.json"  # what minilora wrote before: PEFT's name, read still
PEFT_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT's save_pretrained writes
FORMAT = "minilora-lora/1"


class AdapterError(MiniloraError, ValueError):
    """An adapter that is malformed or does not fit the model it is loaded into."""


# ---------------------------------------------------------------------------- the config's schema


def below_one(key):
    """A relation: d[key] < 1 (the schema's limits are inclusive; a dropout of 1 drops all)."""
    def relation(d):
        return (key, f"expected a number in [0, 1), found {d[key]!r}") if d[key] >= 1 else None
    return relation


def _heads_divide_width(d):
    if d["emb_dim"] % d["n_heads"]:
        return "n_heads", f"expected a divisor of emb_dim ({d['emb_dim']}), found {d['n_heads']}"
    return None


# GPTConfig's fields with their types and limits (GPTConfig.__post_init__'s), every one
# required: every minilora version wrote all seven.
MODEL_CONFIG_SCHEMA = Schema("GPT-2 configuration", {
    "vocab_size": Field("int", least=1), "context_length": Field("int", least=1),
    "emb_dim": Field("int", least=1), "n_heads": Field("int", least=1), "n_layers": Field("int", least=1),
    "drop_rate": Field("number", least=0), "qkv_bias": Field("bool"),
}, relations=(below_one("drop_rate"), _heads_divide_width))


def _class_names_fit(d):
    names, n = d["class_names"], d["num_classes"]
    if names is None:
        return None
    if n is None:
        return "class_names", "expected null: the adapter has no classifier head (num_classes is null)"
    if len(names) != n:
        return "class_names", f"expected {n} names (num_classes), found {len(names)}"
    if len(set(names)) != n:
        return "class_names", f"expected {n} different names, found {sorted(names)}"
    return None


def _per_target(key, spec):
    """A relation: `key` is null or maps some of the targets each to a value that fits `spec`."""
    def relation(d):
        for target, value in (d[key] or {}).items():
            if target not in d["targets"]:
                return f"{key}.{target}", "not one of the targets"
            problem = spec.problem(value)
            if problem:
                return f"{key}.{target}", problem
        return None
    return relation


def _rank_fits_width(d):
    width = d["model_config"]["emb_dim"]
    for key, rank in [("rank", d["rank"]), *((f"ranks.{t}", r) for t, r in (d["ranks"] or {}).items())]:
        if rank > width:  # apply_lora's own limit: a layer's update has rank at most its width
            return key, f"expected at most model_config.emb_dim ({width}), found {rank}"
    return None


def _max_length_fits_context(d):
    context = d["model_config"]["context_length"]
    if d["max_length"] is not None and d["max_length"] > context:
        return "max_length", f"expected at most model_config.context_length ({context}), found {d['max_length']}"
    return None


@functools.cache
def adapter_schema():
    """The schema of minilora_adapter.json, built on first use: PAD_MODES and BATCHINGS
    live in minilora.data, whose pandas import would otherwise add half a second to
    `import minilora`."""
    from .data import BATCHINGS, PAD_MODES

    return Schema("minilora adapter config", {
        # the keys every minilora version wrote: required
        "format": Field("str", choices=(FORMAT,)),
        "rank": Field("int", least=1),
        "alpha": Field("number", above=0),
        "scaling": Field("str", choices=SCALINGS),
        "dropout": Field("number", least=0),
        "targets": Field("list", items=Field("str"), min_items=1),
        "base_model": Field("str", nullable=True),
        "model_config": Field("dict", schema=MODEL_CONFIG_SCHEMA),
        "num_classes": Field("int", least=2, nullable=True),
        # added later, so absent from older adapters: None, not recorded (readers then use the book's settings)
        "class_names": Field("list", items=Field("str"), required=False, nullable=True),
        "max_length": Field("int", least=1, required=False, nullable=True),
        "pool": Field("str", choices=POOLS, required=False, nullable=True),
        "pad": Field("str", choices=PAD_MODES, required=False, nullable=True),
        "batching": Field("str", choices=BATCHINGS, required=False, nullable=True),
        # {target: rank or alpha} for adapters with their own (lora.LoraState.config writes them only then)
        "ranks": Field("dict", required=False, nullable=True),
        "alphas": Field("dict", required=False, nullable=True),
    }, relations=(below_one("dropout"), _per_target("ranks", Field("int", least=1)),
                  _per_target("alphas", Field("number", above=0)), _class_names_fit, _rank_fits_width,
                  _max_length_fits_context))


def save_adapter(model, folder, base_model=None, class_names=None, max_length=None, pool=None, pad=None,
                 batching=None):
    """Write the model's LoRA adapter (and replaced head) to `folder`, atomically: the
    folder is replaced whole, so it must be new or hold an adapter alone. Returns the folder.

    Recorded in the config for whoever loads it, so that the adapter alone says how to
    use it: base_model (the base weights: a preset, a URL or an absolute path),
    class_names (the label of each class), max_length (the padded training length),
    pool ("last" or "last_real": where the logits were read), pad ("dataset" or
    "longest_in_batch") and batching ("shuffled" or "by_length": which texts shared a
    batch, in training and in the run's evaluation). Pool and pad change the logits the head was trained on; with
    pool "last" and per-batch padding, so does batching (how many pads followed a text).
    """
    tensors, config = _adapter_contents(model, base_model, class_names, max_length, pool, pad, batching)
    folder = Path(folder)
    # an older minilora's adapter (OLD_CONFIG_FILE) is replaced too
    check_replaceable(folder, (WEIGHTS_FILE, CONFIG_FILE, OLD_CONFIG_FILE), "an adapter")
    with atomic_folder(folder) as tmp:
        _write_files(tmp, tensors, config)
    return folder


def check_replaceable(folder, ours, what, error=AdapterError):
    """Refuse, as `error`, a `folder` that atomic_folder cannot replace whole without
    losing something: a file (it would be moved aside for good), or a folder holding
    files other than `ours` (replacing it would delete them). `what`: what is written
    ("an adapter", "a PEFT adapter", "a checkpoint"), for the message."""
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder} is a file, not a folder: {what} is a folder; write it to another path")
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in ours)
        if others:
            raise error(f"{folder} holds other files than {what} ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); writing replaces the folder whole: "
                        f"write it to a folder of its own")


def write_adapter(model, folder, **settings):
    """Write the adapter's two files into `folder` (made if missing), not atomically: for a
    caller that writes a bigger folder atomically itself (a checkpoint's temporary folder).
    `settings` as save_adapter's. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_files(folder, *_adapter_contents(model, **settings))
    return folder


def _adapter_contents(model, base_model=None, class_names=None, max_length=None, pool=None, pad=None,
                      batching=None):
    """(tensors, config) of the model's adapter, checked: what the two files hold."""
    if model.lora is None:
        raise AdapterError("the model has no LoRA adapters to save")
    if model.lora.merged:
        raise AdapterError("unmerge_lora(model) before saving: merged weights hide the adapter")
    names = model.lora.param_names + [n for n in ("out_head.weight", "out_head.bias") if n in model.params]
    tensors = {n: np.ascontiguousarray(to_numpy(model.params[n])) for n in names}
    config = {"format": FORMAT, **model.lora.config(), "base_model": base_model,
              "model_config": model.cfg.to_dict(),
              "num_classes": model.n_out if "out_head.weight" in model.params else None,
              "class_names": None if class_names is None else list(class_names), "max_length": max_length,
              "pool": pool, "pad": pad, "batching": batching}
    return tensors, json_ready(config)


def json_ready(value):
    """`value` with every NumPy scalar in it made the Python value json.dumps writes:
    apply_lora takes rank=np.int64(2) and alpha=np.float32(2.5), and a caller may pass a
    NumPy max_length or class names; np.float32(2.5).item() is 2.5, the same number."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _write_files(folder, tensors, config):
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "np"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")


def _is_adapter(folder):
    """Whether `folder` holds a whole minilora adapter (under either config name)."""
    return (folder / WEIGHTS_FILE).is_file() and any((folder / n).is_file() for n in (CONFIG_FILE, OLD_CONFIG_FILE))


def read_adapter(folder):
    """(config dict, tensors dict of NumPy arrays) from an adapter folder, every part
    checked: the config whole against adapter_schema() (absent later keys filled in
    with None), each tensor floating point and finite. Errors are one line naming the
    file, the key or tensor, and the format that was found."""
    folder = Path(folder)
    # a crash between save_adapter's two renames leaves the previous adapter set aside (files.ASIDE_NAME)
    recover_folder(folder, _is_adapter)
    cfg_path, data = _read_config_json(folder)
    if _peft_adapter(folder, cfg_path, data):
        from .peft import read_peft_adapter  # here, not at the top: peft imports this module

        return read_peft_adapter(folder)
    w_path = folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterError(f"not an adapter folder: {p} is missing")
    config = _check_config(cfg_path, data)
    return config, read_float_tensors(w_path, AdapterError, f"{w_path} ({FORMAT})")


def _read_config_json(folder):
    """(path, parsed JSON or None) of the folder's adapter config: minilora_adapter.json,
    else the adapter_config.json of older minilora versions (or of PEFT)."""
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file() and (folder / OLD_CONFIG_FILE).is_file():
        cfg_path = folder / OLD_CONFIG_FILE
    if not cfg_path.is_file():
        return cfg_path, None
    try:
        return cfg_path, load_json(cfg_path)
    except FileCheckError as e:
        raise AdapterError(str(e)) from None


def holds_peft_adapter(folder):
    """Whether `folder` holds a Hugging Face PEFT adapter and no minilora one."""
    folder = Path(folder)
    return bool(_peft_adapter(folder, *_read_config_json(folder)))


def _peft_adapter(folder, cfg_path, data):
    """What shows the folder holds a PEFT adapter and no minilora one (for the error
    line), or None: PEFT's config (its "peft_type" key) or PEFT's weights file."""
    if cfg_path.name == CONFIG_FILE and cfg_path.is_file():  # a minilora adapter, whatever else is there
        return None
    if isinstance(data, dict) and "peft_type" in data and "format" not in data:
        return f"{OLD_CONFIG_FILE} has peft_type {data['peft_type']!r}"
    ours = isinstance(data, dict) and data.get("format") == FORMAT
    weights = [n for n in PEFT_WEIGHTS_FILES if (folder / n).is_file()]
    if weights and not ours:
        return f"{weights[0]}, PEFT's weights file"
    return None


def _check_config(cfg_path, data):
    """The config checked whole against adapter_schema(), the format first: a file of
    another kind is named as such, not as a minilora adapter with odd keys."""
    if isinstance(data, dict) and data.get("format") != FORMAT:
        raise AdapterError(f"{cfg_path}: format: expected {FORMAT!r}, found {data.get('format')!r}: "
                           f"not a minilora adapter config")
    try:
        return adapter_schema().check(data, f"{cfg_path} ({FORMAT})")
    except FileCheckError as e:
        raise AdapterError(str(e)) from None


def load_adapter(model, folder, contents=None):
    """Attach the adapter saved in `folder` to `model` (which must not have LoRA yet),
    replacing the head with the saved one when there is one. Returns the config.
    A Hugging Face PEFT LoRA folder for GPT-2 is read too (minilora.peft.load_peft_adapter).
    contents: what read_adapter(folder) returned, for a caller that has read it already
    (a checkpoint, whose adapter minilora wrote), so the files are not read twice."""
    if contents is None and holds_peft_adapter(folder):
        from .peft import load_peft_adapter  # here, not at the top: peft imports this module

        return load_peft_adapter(model, folder)
    config, tensors = read_adapter(folder) if contents is None else contents
    if model.lora is not None:
        raise AdapterError("the model already has LoRA adapters; remove_lora(model) first")
    problems = []
    for key, want in config["model_config"].items():
        have = getattr(model.cfg, key, None)
        if have != want:
            problems.append(f"model config {key}: adapter was trained on {want}, model has {have}")
    num_classes = config.get("num_classes")
    if num_classes is not None and "out_head.weight" in model.params and model.n_out != num_classes:
        problems.append(f"out_head: adapter has {num_classes} classes, model has {model.n_out}")
    if num_classes is None and "out_head.weight" in model.params:
        problems.append("the model has a replaced head but the adapter was trained without one")
    if not problems:
        problems = _check_tensors(model, config, tensors)
    if problems:
        raise AdapterError(f"adapter {folder} does not fit this model: " + "; ".join(problems))
    source = f"{Path(folder) / WEIGHTS_FILE} ({FORMAT})"
    cast = {n: cast_finite(n, a, model.dtype, AdapterError, source) for n, a in tensors.items()}
    # everything checked: now change the model
    if num_classes is not None:
        if "out_head.weight" not in model.params:
            model.replace_head(num_classes)
        for n in ("out_head.weight", "out_head.bias"):
            model.params[n] = model._to_model(cast[n])
    own = {k: config[k] for k in ("ranks", "alphas") if config[k]}  # adapters with a rank or alpha of their own
    apply_lora(model, rank=config["rank"], alpha=config["alpha"], scaling=config["scaling"],
               targets=config["targets"], dropout=config["dropout"], **own)
    for n in model.lora.param_names:
        model.params[n][...] = model._to_model(cast[n])
    return config


def _check_tensors(model, config, tensors):
    """Every problem (missing, unexpected, wrong shape) between the saved tensors and
    what the model would create for this adapter config."""
    C, ranks = model.cfg.emb_dim, config["ranks"] or {}
    num_classes = config.get("num_classes")
    expected = {}
    if num_classes is not None:
        expected["out_head.weight"] = (C, num_classes)
        expected["out_head.bias"] = (num_classes,)
    sites = adapter_sites(model)
    for prefix in config["targets"]:
        if prefix == "out_head" and num_classes is not None:
            n_in, n_out = C, num_classes
        elif prefix in sites:
            _, _, n_in, n_out = sites[prefix]
        else:
            return [f"adapter target {prefix!r} does not exist in this model"]
        r = ranks.get(prefix, config["rank"])
        expected[prefix + ".lora_A"] = (n_in, r)
        expected[prefix + ".lora_B"] = (r, n_out)
    problems = [f"missing tensor {n}" for n in expected if n not in tensors]
    problems += [f"unexpected tensor {n}" for n in tensors if n not in expected]
    problems += [f"{n}: shape {tuple(tensors[n].shape)} in the adapter, {shape} in the model"
                 for n, shape in expected.items() if n in tensors and tuple(tensors[n].shape) != shape]
    return problems
