"""Hugging Face PEFT's LoRA format for GPT-2: export minilora's adapters, read PEFT's.

A PEFT LoRA folder (peft's ``utils/save_and_load.py``, ``tuners/lora/{config,layer}.py``):

    adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules, rank_pattern,
                               alpha_pattern, use_rslora, lora_dropout, bias, ... (PEFT drops
                               the keys it does not know)
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in) and
                               .lora_B.weight (out, r) for every targeted module

A PEFT LoRA module adds  s * lora_B(lora_A(dropout(x))) = s * (x @ lora_A^T) @ lora_B^T,
with s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora); rank_pattern and
alpha_pattern give a module its own r and lora_alpha (keys matched as regular
expressions against the end of the module's name). So minilora's A (in, r) and B (r, out)
are lora_A^T and lora_B^T, and the scale s is the same number.

GPT-2's modules (as GPT2LMHeadModel names them) and minilora's sites:

    transformer.h.{i}.attn.c_attn   h.{i}.attn.c_attn.{q,k,v}: three rank-r adapters over the
                                    column blocks of Q|K|V are one rank-3r adapter,
                                    A = [A_q | A_k | A_v] (C, 3r), B block-diagonal (3r, 3C);
                                    a missing block is zeros. PEFT's own default adapter over
                                    all of c_attn is minilora's site h.{i}.attn.c_attn.
    transformer.h.{i}.attn.c_proj   h.{i}.attn.c_proj      (and mlp.c_fc, mlp.c_proj alike)
    lm_head                         lm_head: beside the tied wte on both sides

Export writes use_rslora false and, per module, lora_alpha = s * r (rank_pattern /
alpha_pattern where a module differs from the common r and lora_alpha): PEFT's s is then
the trained s, whatever minilora scaling it was trained with. fan_in_fan_out (PEFT's one
flag for "the base weight is stored (in, out)") changes how PEFT merges, not what lora_A /
lora_B hold: GPT-2's Conv1D layers are (in, out), lm_head (nn.Linear) is not, and PEFT
corrects the flag for each module it wraps, in module order, warning each time it flips
it. Export writes true where a Conv1D is targeted (no warning for those; lm_head beside
them gets the one no value avoids) and false for lm_head alone (no warning).

A classifier's adapter has no exact PEFT form: GPT2ForSequenceClassification's score
head has no bias and reads the last non-pad token, the book's head has a bias and reads
the last position. It stays in minilora's format, or goes out merged (minilora.export).
"""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from .adapters import AdapterError, below_one, check_replaceable, json_ready
from .backend import to_numpy
from .config import PRESET_ALIASES
from .files import atomic_folder
from .lora import apply_lora
from .schema import Field, FileCheckError, Schema, read_json
from .tensors import cast_finite, read_float_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"  # older PEFT's default: a PyTorch pickle, which NumPy cannot read
MODEL_CARD = "README.md"  # PEFT's save_pretrained writes one beside the two files
PREFIX = "base_model.model."  # PEFT's name for the wrapped model, before the module names
FORMAT = "huggingface-peft-lora"  # the "format" of the minilora-form config read_peft_adapter returns

# module kind -> (inputs, outputs) in units of emb_dim C; None: the vocabulary
KINDS = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1), "lm_head": (1, None)}
BLOCK_KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
EMBEDDINGS = ("transformer.wte", "transformer.wpe")
# what PEFT's save_embedding_layers may add: copies of the (tied) token table, not adapter weights
EMBEDDING_COPIES = ("lm_head.base_layer.weight", "lm_head.weight", "transformer.wte.weight")

CLASSIFIER_REFUSAL = (
    "a classifier's adapter has no exact PEFT form: the book's head has a bias and reads the last "
    "position, GPT2ForSequenceClassification's score has no bias and reads the last non-pad token; "
    "use `minilora export --merged` (a whole checkpoint with the head as out_head.*) or keep the "
    "minilora adapter")


class PeftError(AdapterError):
    """A PEFT adapter that minilora cannot read exactly, or a model it cannot export."""


# ---------------------------------------------------------------------------- export


def export_peft(model, folder, base_model=None):
    """Write the LoRA adapter of a language model as a PEFT LoRA folder: what
    ``PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), folder)`` loads
    to the same logits. The adapter alone: no copy of the tied embedding.

    base_model: recorded as base_model_name_or_path (default: the Hugging Face repository
    of the model's preset, else the name it was loaded from). The folder is replaced
    whole (minilora.files.atomic_folder), so it must be new or hold a PEFT adapter
    alone. Nothing is written when the model cannot be exported. Returns the folder."""
    tensors, config = peft_contents(model, base_model)
    folder = Path(folder)
    check_replaceable(folder, (CONFIG_FILE, WEIGHTS_FILE, MODEL_CARD), "a PEFT adapter", PeftError)
    with atomic_folder(folder) as tmp:
        _write_peft_files(tmp, tensors, config)
    return folder


def peft_contents(model, base_model=None):
    """(tensors, config) of the PEFT folder of the model's adapter: the tensors under
    PEFT's names (host arrays in the model's dtype), the config as adapter_config.json."""
    state = model.lora
    if state is None:
        raise PeftError("the model has no LoRA adapters to export")
    if state.merged:
        raise PeftError("unmerge_lora(model) before exporting: merged weights hide the adapter")
    if "out_head.weight" in model.params:
        raise PeftError(CLASSIFIER_REFUSAL)
    modules = [_peft_module(model, linear, ads) for linear, ads in state.by_linear.items()]  # in site order
    r = _most_common(m["r"] for m in modules)
    alpha = _most_common(m["alpha"] for m in modules)
    tensors = {}
    for m in modules:
        tensors[f"{PREFIX}{m['name']}.lora_A.weight"] = m["lora_A"]
        tensors[f"{PREFIX}{m['name']}.lora_B.weight"] = m["lora_B"]
    names = [m["name"] for m in modules]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or base_model_name(model),
        "r": r, "lora_alpha": _json_number(alpha),
        "target_modules": _compact(names, model.cfg.n_layers),
        "rank_pattern": _pattern(modules, "r", r, model.cfg.n_layers),
        "alpha_pattern": _pattern(modules, "alpha", alpha, model.cfg.n_layers),
        "use_rslora": False, "lora_dropout": state.dropout,
        "fan_in_fan_out": any(m["name"] != "lm_head" for m in modules),  # a Conv1D targeted (docstring)
        "bias": "none", "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }
    return tensors, json_ready(config)


def _peft_module(model, linear, adapters):
    """One PEFT module from the minilora adapters on one linear: the adapters' A side by
    side, their B stacked, each B block in its own columns (zeros elsewhere), so that
    x A_all B_all = sum_j x A_j B_j[:, cols_j]. The first adapter's scale s is the
    module's; another adapter's own scale is folded into its B (s_j / s): exact when
    they are equal, as they are for the Q/K/V of one apply_lora."""
    p = model.params
    s = adapters[0].scale
    As = [to_numpy(p[ad.prefix + ".lora_A"]) for ad in adapters]
    n_out = model.cfg.vocab_size if linear == "lm_head" else p[linear + ".weight"].shape[1]
    R = sum(a.shape[1] for a in As)
    B_all = np.zeros((R, n_out), dtype=As[0].dtype)
    row = 0
    for ad, a in zip(adapters, As):
        b = to_numpy(p[ad.prefix + ".lora_B"])
        if ad.scale != s:
            b = b * b.dtype.type(ad.scale / s)
        B_all[row:row + a.shape[1], ad.cols] = b
        row += a.shape[1]
    A_all = np.concatenate(As, axis=1)  # [in, R]
    name = linear if linear == "lm_head" else "transformer." + linear
    return {"name": name, "r": R, "alpha": s * R,
            "lora_A": np.ascontiguousarray(A_all.T),  # [R, in], nn.Linear(in, R).weight
            "lora_B": np.ascontiguousarray(B_all.T)}  # [out, R], nn.Linear(R, out).weight


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _json_number(x):
    """16.0 -> 16: PEFT declares lora_alpha an int, and most alphas are whole."""
    return int(x) if float(x).is_integer() else float(x)


def _kind(name):
    """'transformer.h.3.mlp.c_fc' -> 'mlp.c_fc'; 'lm_head' -> 'lm_head'."""
    return "lm_head" if name == "lm_head" else name.split(".", 3)[3]


def _compact(names, n_layers):
    """target_modules for exactly these modules: a kind's name ("mlp.c_fc", matched by
    PEFT as a suffix) where every block has it, else each module's full name."""
    out = []
    for kind in (*BLOCK_KINDS, "lm_head"):
        mine = [n for n in names if _kind(n) == kind]
        if not mine:
            continue
        out += [kind] if kind == "lm_head" or len(mine) == n_layers else mine
    return out


def _pattern(modules, key, common, n_layers):
    """rank_pattern / alpha_pattern: the modules whose `key` differs from `common`, by
    kind where a kind's modules all share the value (and every block has one), else by
    full name. PEFT matches each key as a regular expression against the end of a
    module's name ("(.*\\.)?(key)$"): a full name's dots also match other characters,
    but no other GPT-2 module name matches it (tests/test_peft.py checks them all), and
    unescaped names stay readable to the tools that take the keys as plain names."""
    pattern = {}
    for kind in (*BLOCK_KINDS, "lm_head"):
        mine = [m for m in modules if _kind(m["name"]) == kind]
        values = {m[key] for m in mine}
        if not mine or values == {common}:
            continue
        if len(values) == 1 and (kind == "lm_head" or len(mine) == n_layers):
            pattern[kind] = _json_number(values.pop())
        else:
            pattern.update({m["name"]: _json_number(m[key]) for m in mine if m[key] != common})
    return pattern


def base_model_name(model):
    """The Hugging Face repository of the model's preset, else the name it was loaded
    from, a path made absolute (finetune.model_reference, as minilora's adapters record
    it) so that the folder names its base model from wherever it is read."""
    from .finetune import model_reference  # here: finetune brings the training modules (and pandas) with it
    from .weights import HF_REPOS

    name = model.name
    if name is None:
        return None
    preset = PRESET_ALIASES.get(name, name)
    return HF_REPOS[preset] if preset in HF_REPOS else model_reference(name)


def _preset_of(name):
    """A Hugging Face repository of GPT-2 ("openai-community/gpt2", "gpt2-medium") as
    minilora's preset name, which minilora can load; anything else as it is."""
    from .weights import HF_REPOS

    repo_preset = {repo: preset for preset, repo in HF_REPOS.items()}
    repo_preset.update({repo.split("/")[1]: preset for preset, repo in HF_REPOS.items()})
    return repo_preset.get(name, name)


def _write_peft_files(folder, tensors, config):
    from safetensors.numpy import save_file

    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})  # what PEFT writes and reads
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------- import

def _pattern_key_regex(key):
    """PEFT's get_pattern_key: a rank_pattern / alpha_pattern key is a regular expression
    matched against the end of a module's name."""
    return rf"(.*\.)?({key})$"


def _layers_regex(pattern):
    """PEFT's check_target_module_exists: a layers_pattern name, then the block's index."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def _regex_problem(text):
    """None when Python's re reads `text`, else why not (without the position, which
    counts from the start of the regular expression PEFT wraps the user's text in)."""
    try:
        re.compile(text)
    except re.error as e:
        return f"not a regular expression Python reads ({e.msg})"
    return None


def _one_or_list(key, item):
    """A relation: d[key] is null, one value that fits `item` (a Field) or a list of such
    values, as PEFT's Optional[Union[str, list[str]]] (or int, list[int]) fields hold."""
    def relation(d):
        value = d[key]
        if value is not None and any(item.problem(v) for v in (value if isinstance(value, list) else [value])):
            return key, f"expected {item.expected()} or a list of them, or null; found {_short(value)}"
        return None
    return relation


def _patterns_fit(key, value):
    """A relation: d[key] (rank_pattern or alpha_pattern) is null or maps regular
    expressions (_pattern_key_regex) to values that fit `value` (a Field)."""
    def relation(d):
        for pattern, v in (d[key] or {}).items():
            problem = value.problem(v) or _regex_problem(_pattern_key_regex(pattern))
            if problem:
                return f"{key}.{pattern}", problem
        return None
    return relation


def _regexes_compile(d):
    """target_modules and exclude_modules given as one string are regular expressions
    (PEFT re.fullmatch-es them), and every layers_pattern goes into one (_layers_regex)."""
    for key in ("target_modules", "exclude_modules"):
        problem = _regex_problem(d[key]) if isinstance(d[key], str) else None
        if problem:
            return key, problem
    patterns = d["layers_pattern"]
    for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
        problem = _regex_problem(_layers_regex(pattern))
        if problem:
            return "layers_pattern", problem
    return None


# adapter_config.json as far as minilora reads it; PEFT writes dozens of keys more
# (extra="ignore"). PEFT's union types (a name or a list of names) are checked by relations.
PEFT_CONFIG_SCHEMA = Schema("PEFT adapter config", {
    "peft_type": Field("str", choices=("LORA",)),
    "r": Field("int", least=1),
    "lora_alpha": Field("number", above=0),
    "lora_dropout": Field("number", least=0, required=False),
    "use_rslora": Field("bool", required=False),
    "rank_pattern": Field("dict", required=False, nullable=True),
    "alpha_pattern": Field("dict", required=False, nullable=True),
    "target_modules": Field("any", required=False, nullable=True),
    "exclude_modules": Field("any", required=False, nullable=True),
    "layers_to_transform": Field("any", required=False, nullable=True),
    "layers_pattern": Field("any", required=False, nullable=True),
    "bias": Field("str", required=False),
    "modules_to_save": Field("list", items=Field("str"), required=False, nullable=True),
    "task_type": Field("str", required=False, nullable=True),
    "base_model_name_or_path": Field("str", required=False, nullable=True),
    "init_lora_weights": Field("any", required=False, nullable=True),
}, relations=(below_one("lora_dropout"), _patterns_fit("rank_pattern", Field("int", least=1)),
              _patterns_fit("alpha_pattern", Field("number", above=0)),
              _one_or_list("target_modules", Field("str")), _one_or_list("exclude_modules", Field("str")),
              _one_or_list("layers_to_transform", Field("int", least=0)),
              _one_or_list("layers_pattern", Field("str")), _regexes_compile),
    extra="ignore",
    defaults={"lora_dropout": 0.0, "use_rslora": False, "bias": "none", "init_lora_weights": True})

# keys that, when set, make PEFT compute something other than x + s * (x A^T) B^T on a
# module: what each means, for the one-line refusal
NOT_PLAIN_LORA = {
    "use_dora": "DoRA rescales every weight column by a trained magnitude",
    "lora_bias": "lora_B carries a trained bias",
    "use_qalora": "QA-LoRA pools the inputs of lora_A",
    "alora_invocation_tokens": "aLoRA applies the adapter only after its invocation tokens",
    "use_bdlora": "BD-LoRA's factors are block-diagonal",
    "velora_config": "VeLoRA is a variant with its own backward",
    "kasa_config": "KaSA adds a trained diagonal between A and B and truncates the base weight",
    "monteclora_config": "MonteCLoRA samples its adapters",
    "arrow_config": "Arrow routes between several adapters",
    "layer_replication": "layer_replication stacks copies of blocks",
    "target_parameters": "target_parameters puts adapters on raw parameters",
    "trainable_token_indices": "trainable_token_indices trains rows of the embedding",
    "megatron_config": "the layers are Megatron's parallel ones",
}
# initializations that change the base weights too (the adapter needs the changed base)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_peft_adapter(folder, model_cfg=None):
    """(config, tensors) of a PEFT LoRA folder for GPT-2, in minilora's adapter form:
    config as minilora's adapter config (rank, alpha, scaling, dropout, targets, and
    ranks / alphas for modules of their own; "format" FORMAT), tensors by minilora's
    names, A (in, r) and B (r, out), NumPy arrays.

    model_cfg: the GPTConfig of the model it is meant for; then every module and every
    shape is checked against it (without it, against the adapter's own shapes and the
    blocks its tensors name). Anything minilora cannot compute exactly (DoRA and the other
    variants, bias "all", modules_to_save, embedding adapters, other architectures) is
    refused in one line naming it."""
    config, tensors, _ = _read(Path(folder), model_cfg)
    return config, tensors


def load_peft_adapter(model, folder):
    """Attach the PEFT LoRA adapter in `folder` to `model` (a GPT-2 language model without
    LoRA): PEFT's adapter over all of c_attn becomes minilora's site h.{i}.attn.c_attn;
    lora_dropout, use_rslora, rank_pattern and alpha_pattern are kept. Everything is
    checked before the model changes. Returns the minilora-form config."""
    folder = Path(folder)
    if model.lora is not None:
        raise PeftError("the model already has LoRA adapters; remove_lora(model) first")
    if "out_head.weight" in model.params:
        raise PeftError(f"{folder}: a PEFT adapter of a language model does not fit a model with a "
                        f"classifier head (replace_head)")
    config, tensors, copies = _read(folder, model.cfg)
    _check_embedding_copies(model, copies, folder / WEIGHTS_FILE)
    tensors = {n: cast_finite(n, t, model.dtype, PeftError, folder / WEIGHTS_FILE) for n, t in tensors.items()}
    try:
        apply_lora(model, rank=config["rank"], alpha=config["alpha"], scaling=config["scaling"],
                   targets=config["targets"], dropout=config["dropout"], ranks=config.get("ranks"),
                   alphas=config.get("alphas"))
    except ValueError as e:  # what PEFT allows and minilora does not (a rank above the width)
        raise PeftError(f"{folder / CONFIG_FILE}: {e}") from e
    for name in model.lora.param_names:
        model.params[name][...] = model._to_model(tensors[name])
    return config


def _read(folder, model_cfg):
    """(minilora-form config, tensors, embedding copies) of a PEFT folder, all checked."""
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise PeftError(f"not a PEFT adapter folder: {cfg_path} is missing")
    if not w_path.is_file():
        if (folder / PICKLE_FILE).is_file():
            raise PeftError(f"{folder / PICKLE_FILE} is a PyTorch pickle, which minilora does not read: save "
                            f"the adapter with safe_serialization=True (PEFT's default) to get {WEIGHTS_FILE}")
        raise PeftError(f"not a PEFT adapter folder: {w_path} is missing")
    try:
        cfg = read_json(cfg_path, PEFT_CONFIG_SCHEMA)
    except FileCheckError as e:  # one error class for every way a PEFT folder is refused
        raise PeftError(str(e)) from None
    _refuse_what_is_not_plain_lora(cfg, cfg_path)
    raw = read_float_tensors(w_path, PeftError)
    n_layers = model_cfg.n_layers if model_cfg is not None else _blocks_named(raw)
    modules = _targeted_modules(cfg, n_layers, cfg_path)
    lora, copies = _split_tensors(raw, modules, w_path, cfg_path)
    ranks = {m: _pattern_value(cfg["rank_pattern"], m, cfg["r"]) for m in modules}
    alphas = {m: _pattern_value(cfg["alpha_pattern"], m, cfg["lora_alpha"]) for m in modules}
    _check_shapes(lora, ranks, cfg["r"], model_cfg, w_path)
    tensors = {}
    for m in modules:
        prefix = _minilora_prefix(m)
        tensors[prefix + ".lora_A"] = np.ascontiguousarray(lora[m]["lora_A"].T)  # [r, in] -> [in, r]
        tensors[prefix + ".lora_B"] = np.ascontiguousarray(lora[m]["lora_B"].T)  # [out, r] -> [r, out]
    config = {"format": FORMAT, "rank": cfg["r"], "alpha": cfg["lora_alpha"],
              "scaling": "rslora" if cfg["use_rslora"] else "alpha_over_r",
              "dropout": cfg["lora_dropout"], "targets": [_minilora_prefix(m) for m in modules],
              "base_model": _preset_of(cfg.get("base_model_name_or_path")), "model_config": None,
              "num_classes": None, "class_names": None, "max_length": None,
              "pool": None, "pad": None, "batching": None}
    own_ranks = {_minilora_prefix(m): r for m, r in ranks.items() if r != cfg["r"]}
    own_alphas = {_minilora_prefix(m): a for m, a in alphas.items() if a != cfg["lora_alpha"]}
    if own_ranks:
        config["ranks"] = own_ranks
    if own_alphas:
        config["alphas"] = own_alphas
    return config, tensors, copies


def _refuse_what_is_not_plain_lora(cfg, path):
    for key, why in NOT_PLAIN_LORA.items():
        if cfg.get(key) not in (None, False, [], {}):
            raise PeftError(f"{path}: {key} {_short(cfg[key])}: {why}; minilora reads plain LoRA adapters only")
    if cfg["bias"] != "none":
        raise PeftError(f"{path}: bias {cfg['bias']!r}: PEFT trained the base layers' biases too; minilora's "
                        f"adapters hold lora_A and lora_B alone (bias \"none\")")
    if cfg.get("modules_to_save"):
        raise PeftError(f"{path}: modules_to_save {cfg['modules_to_save']}: whole modules trained beside the "
                        f"adapters (e.g. a classifier's score), which minilora's adapters do not hold")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise PeftError(f"{path}: task_type {cfg['task_type']!r}: minilora reads adapters of GPT-2's language "
                        f"model (task_type \"CAUSAL_LM\")")
    init = cfg["init_lora_weights"]
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise PeftError(f"{path}: init_lora_weights {init!r} changed the base weights too; convert the adapter "
                        f"to plain LoRA first (PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))")


def _short(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _blocks_named(raw):
    """The number of blocks the tensors' names reach (1 + the highest index)."""
    found = [int(m.group(1)) for n in raw if (m := re.match(rf"{re.escape(PREFIX)}transformer\.h\.(\d+)\.", n))]
    return max(found, default=-1) + 1


def _gpt2_module_names(n_layers):
    """Every module name of a GPT2LMHeadModel with n_layers blocks, in named_modules order:
    the keys PEFT matches target_modules against."""
    names = ["transformer", *EMBEDDINGS, "transformer.drop", "transformer.h"]
    for i in range(n_layers):
        h = f"transformer.h.{i}"
        names += [h, h + ".ln_1", h + ".attn", h + ".attn.c_attn", h + ".attn.c_proj", h + ".attn.attn_dropout",
                  h + ".attn.resid_dropout", h + ".ln_2", h + ".mlp", h + ".mlp.c_fc", h + ".mlp.c_proj",
                  h + ".mlp.act", h + ".mlp.dropout"]
    return names + ["transformer.ln_f", "lm_head"]


def _targeted_modules(cfg, n_layers, path):
    """The GPT-2 modules PEFT puts an adapter on for this config (its
    check_target_module_exists, for GPT-2's names), each a linear minilora has a site for."""
    targets = cfg.get("target_modules")
    if targets is None:
        targets = ["c_attn"]  # PEFT's default for model_type gpt2 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        targets = list(BLOCK_KINDS)  # every Conv1D; PEFT leaves the output layer (lm_head) out
    # PEFT_CONFIG_SCHEMA checked the types and that every regular expression compiles
    matched = [m for m in _gpt2_module_names(n_layers) if _peft_targets(cfg, targets, m)]
    linears = [m for m in matched if m == "lm_head" or _kind_or_none(m) in BLOCK_KINDS]
    embeddings = [m for m in matched if m in EMBEDDINGS]
    if embeddings:
        raise PeftError(f"{path}: target_modules {_short(targets)} put an adapter on {embeddings[0]}: embedding "
                        f"adapters (lora_embedding_A/B) have no minilora site")
    others = [m for m in matched if m not in linears]
    if others:
        raise PeftError(f"{path}: target_modules {_short(targets)} select {others[0]}, which is not a linear layer")
    if not linears:
        base = cfg.get("base_model_name_or_path")
        raise PeftError(f"{path}: target_modules {_short(targets)} select no layer of a {n_layers}-block GPT-2 "
                        f"(c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, lm_head): an adapter for another "
                        f"architecture{f' ({base})' if base else ''}")
    return linears


def _kind_or_none(name):
    parts = name.split(".", 3)
    return parts[3] if len(parts) == 4 and parts[:2] == ["transformer", "h"] else None


def _peft_targets(cfg, targets, key):
    """PEFT's check_target_module_exists (peft/tuners/tuners_utils.py) for one module name."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith("." + e) for e in exclude):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith("." + t) for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = cfg.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    for p in patterns:
        match = re.match(_layers_regex(p), key)
        if match:
            break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(pattern, module, default):
    """PEFT's get_pattern_key: the first key of rank_pattern / alpha_pattern that matches
    the end of the module's name, else the common value."""
    for key, value in (pattern or {}).items():
        if re.match(_pattern_key_regex(key), module):
            return value
    return default


def _split_tensors(raw, modules, w_path, cfg_path):
    """({module: {"lora_A": .., "lora_B": ..}}, {embedding copy name: array}) of the file's
    tensors; a missing or an unexpected tensor is refused, named as the file names it."""
    lora = {m: {} for m in modules}
    copies = {}
    for name, t in raw.items():
        short = name[len(PREFIX):] if name.startswith(PREFIX) else None
        if short in EMBEDDING_COPIES:
            copies[short] = t
            continue
        found = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", short or "")
        if found is None or found.group(1) not in lora:
            why = (f"not a module {cfg_path.name}'s target_modules select" if found else
                   "not a lora_A / lora_B weight of GPT-2")
            raise PeftError(f"{w_path}: unexpected tensor {name} ({why})")
        lora[found.group(1)][found.group(2)] = t
    for m in modules:
        for part in ("lora_A", "lora_B"):
            if part not in lora[m]:
                raise PeftError(f"{w_path}: missing tensor {PREFIX}{m}.{part}.weight (target_modules select {m})")
    return lora, copies


def _check_shapes(lora, ranks, common_rank, model_cfg, path):
    """lora_A (r, in) and lora_B (out, r) of every module: r its rank (r or rank_pattern),
    in and out the GPT-2 layer's, from model_cfg or else from the adapter's own width."""
    C = model_cfg.emb_dim if model_cfg is not None else None
    V = model_cfg.vocab_size if model_cfg is not None else None
    for m, parts in lora.items():
        kind = "lm_head" if m == "lm_head" else _kind_or_none(m)
        if C is None:
            C = parts["lora_A"].shape[-1] // KINDS[kind][0]
        n_in, n_out = C * KINDS[kind][0], (C * KINDS[kind][1] if KINDS[kind][1] else V)
        if V is None and kind == "lm_head":
            n_out = parts["lora_B"].shape[0]
        r = ranks[m]
        for part, want in (("lora_A", (r, n_in)), ("lora_B", (n_out, r))):
            have = tuple(parts[part].shape)
            if have != want:
                raise PeftError(f"{path}: {PREFIX}{m}.{part}.weight has shape {have}, expected {want} (rank {r}"
                                f"{' from rank_pattern' if r != common_rank else ''}, "
                                f"GPT-2 width {C})")


def _minilora_prefix(module):
    """'transformer.h.0.attn.c_attn' -> 'h.0.attn.c_attn' (one adapter over all of Q|K|V)."""
    return module if module == "lm_head" else module[len("transformer."):]


def _check_embedding_copies(model, copies, path):
    """PEFT saves the tied token table beside an lm_head adapter (save_embedding_layers),
    and its loading puts the copy into the model. minilora keeps the model's own wte, so
    the copy must equal it, in the copy's precision: else the adapter was trained on
    changed embeddings (or on another base model), which an adapter cannot hold."""
    wte = to_numpy(model.params["wte.weight"])
    for name, t in copies.items():
        # in the copy's own precision: PEFT saves it in the dtype the model was trained in
        # (a float16 GPT-2's copy is wte rounded to float16, not wte)
        mine = wte.astype(t.dtype) if t.shape == wte.shape else None
        if mine is None or not np.array_equal(t, mine):
            diff = (f"max difference {float(np.abs(t.astype(np.float64) - mine).max()):.3g} in {t.dtype}"
                    if mine is not None else f"shape {tuple(t.shape)}, wte {tuple(wte.shape)}")
            raise PeftError(f"{path}: {PREFIX}{name} is a copy of the token table that differs from this model's "
                            f"wte ({diff}): the adapter was trained with other embeddings")
