"""Save and load a LoRA adapter on its own: the small trained part of a fine-tune.

An adapter folder holds two files:

    adapter.safetensors     every lora_A / lora_B, and out_head.weight/.bias when the
                            head was replaced (it is random and frozen, so the adapter
                            is useless without the exact head it was trained with)
    adapter_config.json     rank, alpha, scaling, dropout, targets, base model name and
                            config, number of classes and their names, and how the
                            texts were fed in training (max length, padding, batching,
                            pooling)

save_adapter writes both into a temporary folder that then replaces the adapter folder
whole (minilora.files.atomic_folder), so an interrupted save leaves the previous adapter
or the new one, never new weights beside an old config or one file without the other;
a crash between atomic_folder's two renames leaves ``<folder>.old``, which reading the
adapter puts back. Because the folder is replaced whole, it must hold nothing but an
adapter. A caller whose bigger folder is already written atomically (a checkpoint)
can write the two files into it with write_adapter instead.

Loading checks everything against the model before changing anything: on any
mismatch the model is left exactly as it was.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .backend import to_numpy
from .errors import MiniloraError
from .files import atomic_folder, recover_folder
from .lora import adapter_sites, apply_lora

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "minilora-lora/1"


class AdapterError(MiniloraError, ValueError):
    """An adapter that is malformed or does not fit the model it is loaded into."""


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
    if folder.is_dir():  # replacing the folder would delete whatever else it holds
        others = sorted(p.name for p in folder.iterdir() if p.name not in (WEIGHTS_FILE, CONFIG_FILE))
        if others:
            raise AdapterError(f"{folder} holds other files than an adapter ({', '.join(others[:3])}"
                               f"{', ...' if len(others) > 3 else ''}); saving replaces the folder whole: "
                               f"save the adapter to a folder of its own")
    with atomic_folder(folder) as tmp:
        _write_files(tmp, tensors, config)
    return folder


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
    return tensors, config


def _write_files(folder, tensors, config):
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "np"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")


def _is_adapter(folder):
    return (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def read_adapter(folder):
    """(config dict, tensors dict of NumPy arrays) from an adapter folder, with clear errors."""
    folder = Path(folder)
    # a crash between save_adapter's two renames leaves the previous adapter as <folder>.old
    recover_folder(folder, _is_adapter)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterError(f"not an adapter folder: {p} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path} is not valid JSON ({e})") from e
    if config.get("format") != FORMAT:
        raise AdapterError(f"{cfg_path}: unknown adapter format {config.get('format')!r}, expected {FORMAT!r}")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{w_path} is not a readable safetensors file ({e})") from e
    return config, tensors


def load_adapter(model, folder):
    """Attach the adapter saved in `folder` to `model` (which must not have LoRA yet),
    replacing the head with the saved one when there is one. Returns the config."""
    config, tensors = read_adapter(folder)
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
        raise AdapterError(f"adapter {folder} does not fit this model:\n  " + "\n  ".join(problems))
    # everything checked: now change the model
    if num_classes is not None:
        if "out_head.weight" not in model.params:
            model.replace_head(num_classes)
        for n in ("out_head.weight", "out_head.bias"):
            model.params[n] = model._to_model(tensors[n])
    apply_lora(model, rank=config["rank"], alpha=config["alpha"], scaling=config["scaling"],
               targets=config["targets"], dropout=config.get("dropout", 0.0))
    for n in model.lora.param_names:
        model.params[n][...] = model._to_model(tensors[n])
    return config


def _check_tensors(model, config, tensors):
    """Every problem (missing, unexpected, wrong shape) between the saved tensors and
    what the model would create for this adapter config."""
    C, r = model.cfg.emb_dim, config["rank"]
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
        expected[prefix + ".lora_A"] = (n_in, r)
        expected[prefix + ".lora_B"] = (r, n_out)
    problems = [f"missing tensor {n}" for n in expected if n not in tensors]
    problems += [f"unexpected tensor {n}" for n in tensors if n not in expected]
    problems += [f"{n}: shape {tuple(tensors[n].shape)} in the adapter, {shape} in the model"
                 for n, shape in expected.items() if n in tensors and tuple(tensors[n].shape) != shape]
    return problems
