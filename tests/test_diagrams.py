"""docs/diagrams.md speaks the code's language: every parameter name it shows exists in a
GPTModel (with a head and LoRA), every (in, out) shape it gives a linear is that linear's
weight shape, and every function it names exists."""

import re
from pathlib import Path

import numpy as np

import minilora as ml
from minilora import layers, lora

TEXT = (Path(__file__).resolve().parent.parent / "docs" / "diagrams.md").read_text()
BLOCKS = re.findall(r"```mermaid\n(.*?)```", TEXT, flags=re.S)


def model_with_everything():
    cfg = ml.GPTConfig(vocab_size=11, context_length=7, emb_dim=8, n_heads=2, n_layers=2)
    model = ml.GPTModel(cfg, seed=0, dtype="float64").replace_head(3)
    ml.apply_lora(model, rank=2, alpha=4, targets="all")
    return model


def test_three_mermaid_flowcharts():
    assert len(BLOCKS) == 3
    for block in BLOCKS:
        assert block.startswith("flowchart ") and "subgraph fwd" in block and "subgraph bwd" in block


def test_every_parameter_name_exists():
    params = model_with_everything().params
    names = set(re.findall(r"\bh\.\{i\}\.[a-z_0-9.]*[a-z_0-9]", TEXT))
    names |= set(re.findall(r"\b(?:wte|wpe|ln_f|out_head)(?:\.[a-z_]+)?\b", TEXT))
    assert {"h.{i}.ln_1", "h.{i}.attn.c_attn", "h.{i}.attn.c_proj", "h.{i}.ln_2", "h.{i}.mlp.c_fc",
            "h.{i}.mlp.c_proj", "h.{i}.attn.c_attn.q", "wte.weight", "wpe.weight", "ln_f"} <= names
    for name in names:
        concrete = name.replace("{i}", "1")
        assert concrete in params or any(p.startswith(concrete + ".") for p in params), name


def test_every_linear_shape_is_its_weight_shape():
    model = model_with_everything()
    C, V, Tmax = model.cfg.emb_dim, model.cfg.vocab_size, model.cfg.context_length
    shapes = re.findall(r"(h\.\{i\}\.[a-z_.]+|wte\.weight|wpe\.weight) \(([^)]+)\)", TEXT)
    assert len(shapes) >= 7
    for name, shape in shapes:
        weight = name.replace("{i}", "0") + ("" if name.endswith(".weight") else ".weight")
        expected = tuple(eval(d, {"C": C, "V": V, "Tmax": Tmax, "r": 2}) for d in shape.replace("3C", "3*C")
                         .replace("4C", "4*C").split(","))
        assert model.params[weight].shape == expected, (name, shape)
    # the three Q/K/V adapters on the fused c_attn: A (C, r), B (r, C) each
    assert model.params["h.0.attn.c_attn.q.lora_A"].shape == (C, 2)
    assert model.params["h.0.attn.c_attn.v.lora_B"].shape == (2, C)


def test_every_function_named_exists_and_caches_what_the_picture_says():
    for fn in set(re.findall(r"\b(\w+_(?:forward|backward))\b", TEXT)) - {"name_forward", "name_backward"}:
        assert hasattr(layers, fn) or hasattr(lora, fn), fn
    rng = np.random.default_rng(0)
    B, T, C, NH = 2, 5, 8, 2
    x = rng.standard_normal((B, T, C))
    _, (n, w, mean, rstd) = layers.layernorm_forward(x, np.ones(C), np.zeros(C))  # n, w, mean, rstd [B, T, 1]
    assert n.shape == (B, T, C) and w.shape == (C,) and mean.shape == rstd.shape == (B, T, 1)
    _, (gx, q) = layers.gelu_forward(rng.standard_normal((B, T, 4 * C)))  # x, q [B, T, 4C]
    assert gx.shape == q.shape == (B, T, 4 * C)
    q, k, v, att, *_ = layers.attention_forward(rng.standard_normal((B, T, 3 * C)), NH)[1]
    assert q.shape == k.shape == v.shape == (B, NH, T, C // NH) and att.shape == (B, NH, T, T)
    _, (_, (xd, A, Bm, xa, s, _)) = lora.lora_linear_forward(x, np.ones((C, 3)), None, np.ones((C, 2)),
                                                               np.ones((2, 3)), 2.0)
    assert xa.shape == (B * T, 2)  # xa [N, r]
