"""GPT-2 weights in the Hugging Face layout: download, load and save ``model.safetensors``.

The Hugging Face GPT-2 checkpoints (openai-community/gpt2, -medium, -large, -xl) hold:
- names without the ``transformer.`` prefix (some exports add it: stripped);
- Conv1D weights stored (in, out), so ``y = x @ W + b`` with no transposes;
- ``h.{i}.attn.c_attn`` with Q | K | V side by side in its columns;
- ``h.{i}.attn.bias`` / ``h.{i}.attn.masked_bias``: causal-mask buffers, not
  parameters (skipped; careful, ``h.{i}.attn.c_attn.bias`` also ends in ``attn.bias``);
- no ``lm_head.weight`` (the LM head is ``wte`` transposed; skipped if present);
- float32 tensors.
Loading goes tensor by tensor (``safe_open``), so even gpt2-xl never needs two full
copies in memory, and every name and shape is checked before anything big is read.
"""

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .cache import cache_dir, is_offline
from .download import download
from .errors import MiniloraError
from .config import PRESET_ALIASES, PRESETS, GPTConfig, param_shapes
from .files import atomic_path, write_text
from .schema import Field, FileCheckError, Schema, read_json
from .tensors import cast_finite

HF_ENDPOINT = "https://huggingface.co"
HF_REPOS = {"gpt2-small": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
            "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
KNOWN_SIZES = {"gpt2-small": 548_105_171}  # bytes of model.safetensors, where we know them
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not c_attn.bias


class CheckpointError(MiniloraError, ValueError):
    """A checkpoint that is unreadable or does not describe a GPT-2 of the expected shape."""


# ---------------------------------------------------------------------------- names and configs


# Tensors a checkpoint may hold beside GPT-2's own (config.param_shapes):
# - lm_head.weight (V, C), nn.Linear's layout of the LM head. GPT-2's files leave it out (the
#   head is wte, tied) and some exports store that tied copy, which is skipped; with
#   "tie_word_embeddings": false in config.json it is a head of its own (what `minilora
#   export --merged` writes for an adapted head), read as minilora's untied lm_head.weight (C, V);
# - out_head.weight (C, n) and out_head.bias (n): a classifier's head (`minilora export
#   --merged` of a classifier, with a "minilora" note in config.json).
HEAD_TENSORS = ("lm_head.weight", "out_head.weight", "out_head.bias")
HEAD_NOTE = ("out_head.weight (emb_dim, num_classes) and out_head.bias (num_classes) are the classifier head "
             "of the book's appendix E: logits = x @ out_head.weight + out_head.bias, x the final layer norm's "
             "output at the position `pool` says ('last': the last position, pads included; 'last_real': the "
             "last real token). transformers' GPT2LMHeadModel does not read them; "
             "minilora.GPTModel.from_pretrained(folder) does.")


def hf_name(name):
    """Our name for a checkpoint tensor name, or None for what is skipped."""
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    if _BUFFER.match(name):
        return None
    return name


GPT2_LAYER_NORM_EPS = 1e-5  # GPT-2's, and the one minilora's layernorm uses (layers.layernorm_forward)


def _context_given(d):
    if d["n_positions"] is None and d["n_ctx"] is None:
        return "n_positions", "missing (expected an integer >= 1; n_ctx may stand for it)"
    return None


def _heads_divide_width(d):
    if d["n_embd"] % d["n_head"]:
        return "n_head", f"expected a divisor of n_embd ({d['n_embd']}), found {d['n_head']}"
    return None


def _gpt2_epsilon(d):
    # 1e-12: a file that stored the epsilon as float32 (1e-5 rounded to 24 bits, off by at most
    # 1e-5 * 2^-24 = 6e-13) still passes; any epsilon another model really uses (1e-6, 1e-12) does not
    if abs(d["layer_norm_epsilon"] - GPT2_LAYER_NORM_EPS) > 1e-12:
        return "layer_norm_epsilon", f"expected GPT-2's 1e-05, found {d['layer_norm_epsilon']!r}"
    return None


# The keys of Hugging Face's GPT2Config that decide the model's shape and arithmetic. The
# file holds dozens more (dropouts, task heads, generation settings) that minilora does not
# use, so other keys are ignored rather than refused.
HF_CONFIG_SCHEMA = Schema("Hugging Face GPT-2 config", {
    "model_type": Field("str", required=False, choices=("gpt2",)),
    "vocab_size": Field("int", least=1),
    "n_positions": Field("int", least=1, required=False),
    "n_ctx": Field("int", least=1, required=False),  # older exports' name for n_positions
    "n_embd": Field("int", least=1),
    "n_head": Field("int", least=1),
    "n_layer": Field("int", least=1),
    "layer_norm_epsilon": Field("number", required=False),  # absent: GPT2Config's default, 1e-5
    "tie_word_embeddings": Field("bool", required=False),  # absent: tied, as GPT-2's own files
    "minilora": Field("dict", required=False),  # minilora export --merged's note on a classifier head
}, relations=(_context_given, _heads_divide_width, _gpt2_epsilon), extra="ignore",
    defaults={"layer_norm_epsilon": GPT2_LAYER_NORM_EPS, "tie_word_embeddings": True})


def config_from_hf(d, source=CONFIG_NAME):
    """GPTConfig from a Hugging Face GPT-2 config.json dict, checked whole against
    HF_CONFIG_SCHEMA first: CheckpointError, one line naming `source` and the key."""
    try:
        return _config_from_checked(HF_CONFIG_SCHEMA.check(d, source))
    except FileCheckError as e:
        raise CheckpointError(str(e)) from None


def _config_from_checked(d):
    """GPTConfig from a config.json dict that HF_CONFIG_SCHEMA has checked (and filled in)."""
    context = d["n_positions"] if d["n_positions"] is not None else d["n_ctx"]
    return GPTConfig(vocab_size=d["vocab_size"], context_length=context, emb_dim=d["n_embd"],
                     n_heads=d["n_head"], n_layers=d["n_layer"])


def config_to_hf(cfg):
    """The Hugging Face config.json dict of a GPTConfig."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim,
            "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "layer_norm_epsilon": GPT2_LAYER_NORM_EPS,
            "activation_function": "gelu_new", "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate,
            "attn_pdrop": cfg.drop_rate}


def config_from_shapes(shapes, n_heads=None):
    """Infer a GPTConfig from tensor shapes (n_heads: given, else emb_dim // 64 as in GPT-2)."""
    try:
        V, C = shapes["wte.weight"]
        T = shapes["wpe.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"not a GPT-2 checkpoint: no {e.args[0]} tensor") from e
    layers = {int(m.group(1)) for n in shapes if (m := re.match(r"h\.(\d+)\.", n))}
    return GPTConfig(vocab_size=V, context_length=T, emb_dim=C, n_heads=n_heads or max(1, C // 64),
                     n_layers=len(layers), qkv_bias="h.0.attn.c_attn.bias" in shapes)


# ---------------------------------------------------------------------------- reading


def _open(path):
    """safe_open a checkpoint, turning every way a file can be broken into CheckpointError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    header_len = int.from_bytes(head, "little") if len(head) == 8 else None
    if header_len is None or header_len > size - 8 or header_len > 100_000_000:
        raise CheckpointError(f"{path} is not a safetensors file (or is truncated): its header does not fit "
                              f"in its {size:,} bytes")
    try:
        f = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                              f"or not a checkpoint at all") from e
    return f


def _check_data_size(path):
    """A truncated file can have an intact header: compare the data it promises with the size."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = Path(path).stat().st_size
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + header_len + end:,} bytes, "
                              f"the file has {size:,}")
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def read_header(path):
    """name -> (shape, dtype) of the GPT-2 tensors in a checkpoint (buffers skipped, names
    normalized), after checking the file is a complete safetensors file."""
    _open(path)
    entries = _check_data_size(path)
    out = {}
    for name, (shape, dtype) in entries.items():
        ours = hf_name(name)
        if ours is not None:
            out[ours] = (shape, dtype, name)
    return out


def check_tensors(header, cfg, path):
    """Raise one CheckpointError listing every missing, unexpected, misshapen or non-float tensor."""
    expected = param_shapes(cfg)
    problems = []

    def listed(title, items):
        if items:
            more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{title} ({len(items)}): {', '.join(items[:10])}{more}")

    C, V = cfg.emb_dim, cfg.vocab_size
    if "out_head.weight" in header:  # a classifier: its bias goes with it, of its width
        n = header["out_head.weight"][0][-1]
        expected = {**expected, "out_head.weight": (C, n), "out_head.bias": (n,)}
    if "lm_head.weight" in header:
        expected = {**expected, "lm_head.weight": (V, C)}
    listed("missing", [n for n in expected if n not in header])
    listed("unexpected", [n for n in header if n not in expected])
    listed("wrong shape", [f"{n} {header[n][0]} != {s}" for n, s in expected.items()
                           if n in header and header[n][0] != tuple(s)])
    listed("not float16/32/64 (NumPy has no bfloat16: convert the file first)",
           [f"{n} {header[n][1]}" for n in header if n in expected and header[n][1] not in ("F16", "F32", "F64")])
    if problems:
        raise CheckpointError(f"{path} does not match a GPT-2 with {cfg}: " + "; ".join(problems))


def _tied_head(weights_path):
    """Whether the LM head is wte (GPT-2's tie), as the config.json beside the weights says
    (no config.json: tied)."""
    path = Path(weights_path).parent / CONFIG_NAME
    if not path.is_file():
        return True
    try:
        return read_json(path, HF_CONFIG_SCHEMA)["tie_word_embeddings"]
    except FileCheckError as e:
        raise CheckpointError(str(e)) from None


def _heads(header, path):
    """The heads of HEAD_TENSORS that a checkpoint (its header, and the config.json beside
    it) gives the model: lm_head.weight only where the config unties it from wte."""
    untied = "lm_head.weight" in header and not _tied_head(path)
    return tuple(n for n in HEAD_TENSORS if n in header and (n != "lm_head.weight" or untied))


def read_heads(name_or_path, offline=None, progress=None):
    """The heads a checkpoint (a preset, a file or a folder) gives a model beside GPT-2's
    tied one, from its header and config.json alone, without reading the weights (a
    preset: none, and no download): "lm_head.weight" where the LM head is a weight of
    its own (tie_word_embeddings false: a merged language model), "out_head.weight" and
    "out_head.bias" for a classifier (a merged minilora classifier). What a job checks
    before it writes its run folder (the heads decide what can be trained)."""
    key = PRESET_ALIASES.get(str(name_or_path), str(name_or_path))
    if key in PRESETS:
        return ()
    path, _, _ = resolve_checkpoint(name_or_path, offline, progress)
    return _heads(read_header(path), path)


def _read_config(path):
    """GPTConfig from a config.json, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return _config_from_checked(read_json(path, HF_CONFIG_SCHEMA))
    except FileCheckError as e:  # one line from the schema; CheckpointError for the callers that catch it
        raise CheckpointError(str(e)) from None


def resolve_checkpoint(name_or_path, offline=None, progress=None):
    """(model.safetensors path, config or None, name) for a preset, a file or a folder.

    A preset is downloaded into $MINILORA_HOME/models/<preset>/ (the Hugging Face base
    URL can be changed with $MINILORA_HF_ENDPOINT, e.g. for a mirror)."""
    offline = is_offline() if offline is None else offline
    text = str(name_or_path)
    if text.startswith(("http://", "https://")):
        return _download_url(text, offline, progress)
    key = PRESET_ALIASES.get(text, text)
    if key in PRESETS:
        url = f"{os.environ.get('MINILORA_HF_ENDPOINT', HF_ENDPOINT).rstrip('/')}/{HF_REPOS[key]}/resolve/main/{WEIGHTS_NAME}"
        dest = cache_dir("models", key, WEIGHTS_NAME)
        path = download(url, dest, expected_size=KNOWN_SIZES.get(key), offline=offline, progress=progress)
        return Path(path), GPTConfig.from_preset(key), key
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{path} holds no {WEIGHTS_NAME}")
        path = path / WEIGHTS_NAME
    if path.is_file():  # a config.json beside the weights gives what shapes cannot (n_heads)
        return path, _read_config(path.parent / CONFIG_NAME), text
    raise ValueError(f"unknown model {name_or_path!r}: expected a preset ({', '.join(sorted(PRESETS))}), "
                     f"a {WEIGHTS_NAME} file, or a folder holding {WEIGHTS_NAME} + {CONFIG_NAME}")


def _download_url(url, offline, progress):
    """A model.safetensors URL (or the URL of a folder holding one): download it, and the
    config.json beside it when there is one, into $MINILORA_HOME/models/url-<hash>/."""
    import hashlib

    from .download import DownloadError

    base = url[: -len(WEIGHTS_NAME)] if url.endswith(WEIGHTS_NAME) else url.rstrip("/") + "/"
    folder = cache_dir("models", "url-" + hashlib.sha1(base.encode()).hexdigest()[:16])
    path = download(base + WEIGHTS_NAME, folder / WEIGHTS_NAME, offline=offline, progress=progress)
    cfg = None
    try:
        cfg = _read_config(Path(download(base + CONFIG_NAME, folder / CONFIG_NAME, offline=offline, progress=False)))
    except DownloadError:
        pass  # no config.json beside it: the tensors' shapes tell the configuration
    return Path(path), cfg, url


def read_config(name_or_path, offline=None, progress=None):
    """The GPTConfig of a checkpoint (a preset, a file or a folder) from its config.json or
    its header alone, without reading the weights: what a caller needs to check its
    inputs (e.g. texts against the context length) before loading the model. A preset
    needs no download at all."""
    key = PRESET_ALIASES.get(str(name_or_path), str(name_or_path))
    if key in PRESETS:
        return GPTConfig.from_preset(key)
    path, cfg, _ = resolve_checkpoint(name_or_path, offline, progress)
    header = read_header(path)
    return _checked_config(path, cfg, header, warn=False)


def _checked_config(path, cfg, header, warn=True):
    """The config of the checkpoint at `path`: config.json's (`cfg`), checked against the
    tensors' shapes, or without one the shapes' own, with a warning about the guess."""
    shapes = {n: s for n, (s, _, _) in header.items()}
    inferred = config_from_shapes(shapes, n_heads=cfg.n_heads if cfg else None)
    if cfg is None:
        if warn:  # the head count is not in the shapes: a wrong guess gives a wrong model silently
            warnings.warn(f"{path} has no {CONFIG_NAME} beside it: guessed n_heads = {inferred.n_heads} "
                          f"(width {inferred.emb_dim} / 64, as in GPT-2); if that is wrong, put a "
                          f"{CONFIG_NAME} with the right n_head beside it (Hugging Face layout)",
                          stacklevel=3)
        return inferred
    wrong = [f"{k}: config says {getattr(cfg, k)}, tensors say {getattr(inferred, k)}"
             for k in ("vocab_size", "context_length", "emb_dim", "n_layers", "qkv_bias")
             if getattr(cfg, k) != getattr(inferred, k)]
    if wrong:
        raise CheckpointError(f"{path}: the configuration disagrees with the tensors: " + "; ".join(wrong))
    return cfg


def load_pretrained(cls, name_or_path, dtype="float32", device=None, offline=None, progress=None):
    """Build a `cls` (GPTModel) from pretrained weights; see GPTModel.from_pretrained."""
    path, cfg, name = resolve_checkpoint(name_or_path, offline, progress)
    header = read_header(path)
    cfg = _checked_config(path, cfg, header)
    check_tensors(header, cfg, path)
    model = cls(cfg, dtype=dtype, device=device, init=False)
    heads = _heads(header, path)
    f = _open(path)
    for ours, (_, _, stored) in header.items():  # one tensor in host memory at a time
        if ours in HEAD_TENSORS and ours not in heads:
            continue  # the tied head's stored copy of wte: wte is the head
        array = f.get_tensor(stored)
        if ours == "lm_head.weight":
            array = np.ascontiguousarray(array.T)  # nn.Linear's (V, C) -> minilora's (C, V)
        # on the host, checked before it reaches a device: a NaN weight would only show up
        # as a NaN loss at step 0, blamed on the learning rate
        model.params[ours] = model._to_model(cast_finite(stored, array, model.dtype, CheckpointError, path))
    names = list(param_shapes(cfg)) + [n for n in HEAD_TENSORS if n in model.params]
    model.params = {n: model.params[n] for n in names}  # checkpoint order, the heads last
    model.trainable = list(model.params)
    model.name = name
    return model


# ---------------------------------------------------------------------------- writing


def write_checkpoint(params, path, prefix="", buffers=False):
    """Write a dict of arrays as a Hugging Face style model.safetensors, atomically.

    prefix: prepended to every name (e.g. "transformer."). buffers: also write the
    h.{i}.attn.bias causal-mask buffers that real Hugging Face files carry."""
    from safetensors.numpy import save_file

    from .backend import to_numpy

    tensors = {prefix + n: np.ascontiguousarray(to_numpy(a)) for n, a in params.items()}
    if buffers:
        layers = {int(m.group(1)) for n in params if (m := re.match(r"h\.(\d+)\.", n))}
        T = params["wpe.weight"].shape[0]
        for i in layers:
            tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((1, 1, T, T), dtype=np.float32))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return Path(path)


def hub_config(cfg, params, settings=None):
    """config.json of a checkpoint holding `params` (minilora's names): config_to_hf's,
    with "tie_word_embeddings": false where the LM head is a weight of its own
    (lm_head.weight; else transformers ties it to wte, as GPT-2's own files say), and for
    a classifier (out_head.*) a "minilora" note saying how to read its head (`settings`:
    the adapter's class_names, pool, pad, max_length, where known)."""
    config = config_to_hf(cfg)
    if "lm_head.weight" in params:
        config["tie_word_embeddings"] = False
    if "out_head.weight" in params:
        config["minilora"] = {"head": "out_head", "num_classes": int(params["out_head.weight"].shape[1]),
                              "note": HEAD_NOTE, **{k: v for k, v in (settings or {}).items() if v is not None}}
    return config


def write_hub_folder(folder, params, cfg, settings=None):
    """The one writer of the Hub's layout: `params` (minilora's names and layout: GPT-2's
    tensors, and lm_head.weight (C, V) / out_head.* where the model has them) as
    folder/model.safetensors, lm_head.weight transposed to nn.Linear's (V, C), and
    folder/config.json (hub_config); each file atomically. What load_pretrained reads
    back to the same model. Returns the folder."""
    from .backend import to_numpy

    folder = Path(folder)
    tensors = {n: to_numpy(a).T if n == "lm_head.weight" else a for n, a in params.items()}
    write_checkpoint(tensors, folder / WEIGHTS_NAME)
    write_text(folder / CONFIG_NAME, json.dumps(hub_config(cfg, params, settings), indent=2))
    return folder


def save_pretrained(model, folder, settings=None):
    """Write the model's own weights as folder/model.safetensors + folder/config.json in
    the Hub's layout (write_hub_folder): GPT-2's tensors, an untied LM head's
    lm_head.weight, a classifier's out_head.* (`settings` as hub_config's), so that
    from_pretrained(folder) is the same model. LoRA adapters are not written (save_adapter
    writes them; minilora.export.export_merged writes the model with them folded in).

    A model whose adapters are merged is refused: its weights are neither the base (the
    adapters are in them) nor marked as merged, and the adapters could not be taken out
    of the file again; unmerge first, or export it merged on purpose."""
    if model.lora is not None and model.lora.merged:
        raise CheckpointError("the model's LoRA adapters are merged into its weights: unmerge_lora(model) to save "
                              "the base model, or minilora.export.export_merged(model, folder) to save it with the "
                              "adapters folded in")
    names = list(param_shapes(model.cfg)) + [n for n in HEAD_TENSORS if n in model.params]
    return write_hub_folder(folder, {n: model.params[n] for n in names}, model.cfg, settings)
