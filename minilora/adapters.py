"""Save and load a LoRA adapter on its own: the small trained part of a fine-tune.

An adapter folder holds two files:

    adapter.safetensors     every lora_A / lora_B, and out_head.weight/.bias when the
                            head was replaced (it is random and frozen, so the adapter
                            is useless without the exact head it was trained with)
    adapter_config.json     rank, alpha, scaling, dropout, targets, base model name and
                            config, number of classes and their names, and how the
                            texts were fed in training (max length, padding, batching,
                            pooling)

Both are written to temporary files and renamed into place, so an interrupted save
never leaves a half-written adapter. Loading checks everything against the model
before changing anything: on any mismatch the model is left exactly as it was.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .backend import to_numpy
from .files import atomic_path, write_text
from .lora import adapter_sites, apply_lora

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "minilora-lora/1"


class AdapterError(ValueError):
    """An adapter that is malformed or does not fit the model it is loaded into."""


def save_adapter(model, folder, base_model=None, class_names=None, max_length=None, pool=None, pad=None,
                 batching=None):
    """Write the model's LoRA adapter (and replaced head) to `folder`. Returns the folder.

    Recorded in the config for whoever loads it, so that the adapter alone says how to
    use it: base_model (the base weights: a preset, a URL or an absolute path),
    class_names (the label of each class), max_length (the padded training length),
    pool ("last" or "last_real": where the logits were read), pad ("dataset" or
    "longest_in_batch") and batching ("shuffled" or "by_length": which texts shared a
    batch, in training and in the run's evaluation). Pool and pad change the logits the head was trained on; with
    pool "last" and per-batch padding, so does batching (how many pads followed a text).
    """
    if model.lora is None:
        raise AdapterError("the model has no LoRA adapters to save")
    if model.lora.merged:
        raise AdapterError("unmerge_lora(model) before saving: merged weights hide the adapter")
    folder = Path(folder)
    names = model.lora.param_names + [n for n in ("out_head.weight", "out_head.bias") if n in model.params]
    tensors = {n: np.ascontiguousarray(to_numpy(model.params[n])) for n in names}
    config = {"format": FORMAT, **model.lora.config(), "base_model": base_model,
              "model_config": model.cfg.to_dict(),
              "num_classes": model.n_out if "out_head.weight" in model.params else None,
              "class_names": None if class_names is None else list(class_names), "max_length": max_length,
              "pool": pool, "pad": pad, "batching": batching}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "np"})
    write_text(folder / CONFIG_FILE, json.dumps(config, indent=2))
    return folder


def read_adapter(folder):
    """(config dict, tensors dict of NumPy arrays) from an adapter folder, with clear errors."""
    folder = Path(folder)
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
