"""Adapters that leave minilora: `minilora export` and merged checkpoints.

Two ways out:
- a PEFT LoRA folder (minilora.peft.export_peft): the adapter alone, for
  ``PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), folder)``; a
  language model's adapter only (peft.CLASSIFIER_REFUSAL says why);
- a merged checkpoint (export_merged): the base weights with every adapter folded in,
  written as a Hugging Face GPT-2 folder (model.safetensors in the Hub's layout, no
  ``transformer.`` prefix, Conv1D weights (in, out); config.json). An adapter on the
  tied LM head cannot fold into wte (wte is also the token embedding), so the head gets
  a weight of its own, ``lm_head.weight`` (V, C) as nn.Linear stores it, and the config
  says ``"tie_word_embeddings": false``. A classifier's head is written as
  ``out_head.weight`` (C, n) / ``out_head.bias`` (n) with a note in config.json
  ("minilora": how to read it); transformers' GPT2LMHeadModel loads the trunk and
  ignores the head. The files are written by weights.write_hub_folder, which
  weights.save_pretrained uses too: one writer of the layout GPTModel.from_pretrained reads.
"""

from pathlib import Path

import numpy as np

from .adapters import check_replaceable
from .backend import to_numpy
from .config import param_shapes
from .files import atomic_folder
from .peft import CLASSIFIER_REFUSAL, PeftError, base_model_name, export_peft
from .weights import CONFIG_NAME, HEAD_TENSORS, WEIGHTS_NAME, write_hub_folder


def merged_params(model):
    """name -> host array of the model with every active adapter folded in, in minilora's
    names and layout (plus lm_head.weight (C, V) where the head carries an adapter or has
    a weight of its own, and out_head.* for a classifier): what write_hub_folder writes.
    The model itself is not changed: the sums are made on copies, in float64, and cast
    back to the model's dtype once (one rounding per weight)."""
    p = model.params
    names = list(param_shapes(model.cfg)) + [n for n in HEAD_TENSORS if n in p]
    out = {n: to_numpy(p[n]) for n in names}  # lm_head.weight: already untied (merged in place, or its own)
    state = model.lora
    if state is None or state.merged or not state.enabled:
        return out
    for ad in state.adapters:
        delta = ad.scale * (to_numpy(p[ad.prefix + ".lora_A"]).astype(np.float64)
                            @ to_numpy(p[ad.prefix + ".lora_B"]).astype(np.float64))  # [in, cols]
        name = "lm_head.weight" if ad.linear == "lm_head" else ad.linear + ".weight"
        if name not in out:  # the tied head: wte^T is where its own weight starts
            out[name] = out["wte.weight"].T
        w = out[name].astype(np.float64)  # a fresh copy: the model's arrays are never written
        w[:, ad.cols] += delta
        out[name] = w.astype(model.dtype)
    return out


def export_merged(model, folder, settings=None):
    """Write the model with its adapters folded in as a Hugging Face GPT-2 folder
    (model.safetensors + config.json, by weights.write_hub_folder, the writer of
    save_pretrained too), atomically: the folder is replaced whole, so it must be new or
    hold such a checkpoint alone. `settings`: the adapter's class_names, pool, pad and
    max_length, for a classifier's note. The model is not changed. Returns the folder."""
    folder = Path(folder)
    check_replaceable(folder, (WEIGHTS_NAME, CONFIG_NAME), "a checkpoint", PeftError)
    params = merged_params(model)
    with atomic_folder(folder) as tmp:
        write_hub_folder(tmp, params, model.cfg, settings)
    return folder


# ---------------------------------------------------------------------------- the command


def add_export_parser(sub):
    """The `minilora export` subcommand, registered by cli.build_parser."""
    from .backend import DTYPES

    p = sub.add_parser("export", help="write an adapter for Hugging Face PEFT, or a merged checkpoint",
                       description="Write a language model's adapter as a Hugging Face PEFT LoRA folder "
                                   "(PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), DIR)), or "
                                   "with --merged the base model with the adapter folded in as a Hugging Face "
                                   "GPT-2 folder (GPT2LMHeadModel.from_pretrained(DIR); a classifier's head as "
                                   "out_head.*).")
    p.add_argument("adapter", help="the adapter folder (minilora's, or a PEFT LoRA folder with --merged)")
    p.add_argument("--out", required=True, help="the folder to write (replaced whole)")
    p.add_argument("--merged", action="store_true", help="write the merged model instead of the adapter")
    p.add_argument("--model", default=None, help="the base model (default: the one the adapter records, else "
                                                "gpt2-small): a preset, a model.safetensors file or a folder")
    p.add_argument("--base-name", default=None,
                   help="base_model_name_or_path to record in the PEFT config (default: the Hugging Face "
                        "repository of the base preset, else --model)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--offline", action="store_true", help="never touch the network (also MINILORA_OFFLINE=1)")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args):
    from .adapters import load_adapter, read_adapter
    from .cli import read_base_model
    from .model import GPTModel

    config, _ = read_adapter(args.adapter)
    if not args.merged and config.get("num_classes") is not None:  # before loading the base model
        raise PeftError(f"{args.adapter}: {CLASSIFIER_REFUSAL}")
    model = read_base_model(args, config, lambda name: GPTModel.from_pretrained(
        name, dtype=args.dtype, offline=args.offline or None))
    load_adapter(model, args.adapter)
    if args.merged:
        settings = {k: config.get(k) for k in ("class_names", "pool", "pad", "max_length")}
        export_merged(model, args.out, settings)
        kind = "classifier" if "out_head.weight" in model.params else "language model"
        print(f"wrote {args.out}: the merged {kind} ({WEIGHTS_NAME} + {CONFIG_NAME}, Hugging Face GPT-2 layout)")
        print(f"  transformers: GPT2LMHeadModel.from_pretrained({str(args.out)!r})")
        return 0
    export_peft(model, args.out, base_model=args.base_name)
    print(f"wrote {args.out}: a PEFT LoRA adapter ({len(model.lora.adapters)} minilora adapters on "
          f"{len(model.lora.by_linear)} modules)")
    base = args.base_name or base_model_name(model)
    print(f"  PEFT: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained({base!r}), {str(args.out)!r})")
    return 0
