"""LoRA: counts, init, gradients, scaling, targets, the adapter life cycle, save/load."""

import numpy as np
import pytest

import minilora as ml
from minilora.adapters import AdapterError, load_adapter, save_adapter
from minilora.backend import to_numpy
from minilora.gradcheck import MODEL_TOL, check_model
from minilora.layers import cross_entropy_backward, cross_entropy_forward


def lora_model(cfg, device="cpu", dtype="float64", classes=3, **kw):
    model = ml.GPTModel(cfg, seed=0, dtype=dtype, device=device)
    if classes:
        model.replace_head(classes)
    return ml.apply_lora(model, **{"rank": 2, "alpha": 3, **kw})


def randomize_B(model, seed=1, scale=0.5):
    rng = np.random.default_rng(seed)
    for n in model.lora.param_names:
        if n.endswith("lora_B"):
            model.params[n][...] = model.xp.asarray(rng.standard_normal(model.params[n].shape) * scale)


def test_appendix_e_counts():
    """GPT-2 small + 2-class head + rank-16 LoRA on every linear: 2,666,528 trainable."""
    model = ml.GPTModel(ml.GPTConfig.from_preset("gpt2-small"), init=False)
    model.replace_head(2)
    ml.apply_lora(model, rank=16, alpha=16, targets="all")
    assert model.num_params(trainable_only=True) == 2_666_528
    assert len(model.lora.adapters) == 12 * 6 + 1
    assert model.params["h.3.attn.c_attn.k.lora_A"].shape == (768, 16)
    assert model.params["h.3.mlp.c_fc.lora_B"].shape == (16, 3072)
    assert model.params["out_head.lora_B"].shape == (16, 2)
    assert "Trainable parameters:     2,666,528" in model.summary()


def test_every_base_parameter_is_frozen(tiny_cfg):
    model = lora_model(tiny_cfg)
    assert set(model.trainable) == set(model.lora.param_names)
    assert all(n.endswith((".lora_A", ".lora_B")) for n in model.trainable)
    assert "out_head.weight" not in model.trainable


def test_init_bounds_zero_B_and_no_op_at_init(device, tiny_cfg, tiny_idx):
    base = ml.GPTModel(tiny_cfg, seed=0, dtype="float64", device=device).replace_head(3)
    expected = to_numpy(base.forward(tiny_idx))
    model = ml.apply_lora(base, rank=4, alpha=8)
    for n in model.lora.param_names:
        p = to_numpy(model.params[n])
        if n.endswith("lora_A"):
            assert np.abs(p).max() <= 1 / np.sqrt(4) and np.abs(p).max() > 0.4  # uniform in +-1/2
        else:
            assert not p.any()
    np.testing.assert_array_equal(to_numpy(model.forward(tiny_idx)), expected)


def test_same_seed_same_adapters(tiny_cfg):
    a, b = lora_model(tiny_cfg, seed=7), lora_model(tiny_cfg, seed=7)
    c = lora_model(tiny_cfg, seed=8)
    assert all(np.array_equal(a.params[n], b.params[n]) for n in a.trainable)
    assert not np.array_equal(a.params["h.0.mlp.c_fc.lora_A"], c.params["h.0.mlp.c_fc.lora_A"])


@pytest.mark.parametrize("targets, layers", [("all", None), ("attention", None), (["c_fc", "out_head"], None),
                                             (["c_fc"], [1]), (["c_proj"], [1]), ("attention", [1])])
def test_lora_gradients_match_finite_differences(device, tiny_cfg, tiny_idx, targets, layers):
    """Also on subsets, where the backward stops early under the lowest trained layer."""
    model = lora_model(tiny_cfg, device=device, targets=targets, layers=layers)
    randomize_B(model)
    r = check_model(model, tiny_idx, "gpt2_lora")
    assert set(r.errors) == set(model.lora.param_names)
    assert r.max_rel_error < MODEL_TOL, r.errors


def test_lora_dropout_gradients(tiny_cfg, tiny_idx):
    """With LoRA dropout, a fixed mask (same generator state) gives exact gradients."""
    model = lora_model(tiny_cfg, dropout=0.3)
    randomize_B(model)
    G = np.random.default_rng(0).standard_normal((2, 5, 3))

    def loss():
        model._dropout_rng = np.random.default_rng(5)
        return float((model.forward(tiny_idx) * G).sum())

    loss()
    grads = model.backward(G)
    from minilora.gradcheck import numerical_gradient, rel_error

    for n in ["h.0.attn.c_attn.q.lora_A", "h.1.mlp.c_proj.lora_B"]:
        assert rel_error(grads[n], numerical_gradient(loss, model.params[n])) < 1e-7
    model.eval()  # no dropout at evaluation: deterministic
    np.testing.assert_array_equal(model.forward(tiny_idx), model.forward(tiny_idx))


def test_with_B_zero_dA_is_zero_and_first_step_moves_only_B(tiny_cfg, tiny_idx):
    model = lora_model(tiny_cfg)
    logits = model.forward(tiny_idx)
    loss, cache = cross_entropy_forward(logits[:, -1, :], np.array([0, 2]))
    dlast = cross_entropy_backward(1.0, cache)[0]
    dlogits = np.zeros_like(logits)
    dlogits[:, -1, :] = dlast
    grads = model.backward(dlogits)
    for n, g in grads.items():
        if n.endswith("lora_A"):
            assert not g.any(), n  # dA = s x^T (dy B^T) = 0 while B = 0
    assert any(grads[n].any() for n in grads if n.endswith("lora_B"))
    before = {n: model.params[n].copy() for n in model.trainable}
    ml.AdamW(model, lr=1e-2, weight_decay=0.0).step(grads)
    for n in model.trainable:
        moved = not np.array_equal(before[n], model.params[n])
        assert moved == n.endswith("lora_B") or not model.params[n].any(), n


@pytest.mark.parametrize("scaling, expected", [("alpha_over_r", 8 / 4), ("alpha", 8.0), ("rslora", 8 / 2)])
def test_scaling_conventions(tiny_cfg, tiny_idx, scaling, expected):
    """The adapter adds exactly s * (x A) B: checked on the head with B = identity-like."""
    model = lora_model(tiny_cfg, rank=4, alpha=8, scaling=scaling, targets=["out_head"])
    assert model.lora.scale == pytest.approx(expected)
    base = model.forward(tiny_idx).copy()
    B = np.random.default_rng(0).standard_normal((4, 3))
    model.params["out_head.lora_B"][...] = B
    # the head's input x: the final layernorm's output, read off the reference model
    _, acts = ml.reference.forward(model.params, tiny_idx, tiny_cfg.n_heads, model.lora.scale)
    x = acts["ln_f"]
    np.testing.assert_allclose(model.forward(tiny_idx) - base, expected * (x @ model.params["out_head.lora_A"]) @ B,
                               rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="scaling"):
        ml.apply_lora(ml.GPTModel(tiny_cfg), scaling="alpha_squared")


def test_targets_and_layers(tiny_cfg):
    m = lora_model(tiny_cfg, targets="attention")
    assert m.lora.targets == ["h.0.attn.c_attn.q", "h.0.attn.c_attn.v", "h.1.attn.c_attn.q", "h.1.attn.c_attn.v"]
    m = lora_model(tiny_cfg, targets=["h.*.mlp.c_fc", "c_attn.k"], layers=[1])
    assert m.lora.targets == ["h.1.attn.c_attn.k", "h.1.mlp.c_fc"]
    m = lora_model(tiny_cfg, classes=0)  # a language model: the tied LM head is a target too
    assert "out_head" not in m.lora.targets and m.lora.targets[-1] == "lm_head"
    assert len(m.lora.targets) == 2 * 6 + 1  # per block q, k, v, c_proj, c_fc, mlp.c_proj; the head
    with pytest.raises(ValueError, match="matches no linear"):
        lora_model(tiny_cfg, targets=["c_nope"])
    with pytest.raises(ValueError, match="out of range"):
        lora_model(tiny_cfg, layers=[5])
    with pytest.raises(ValueError, match="already has LoRA"):
        ml.apply_lora(m)


def _trained_adapter_model(cfg, device="cpu", dtype="float32"):
    model = lora_model(cfg, device=device, dtype=dtype)
    randomize_B(model, scale=0.3)
    return model


def test_merge_unmerge_enable_disable_remove(device, tiny_cfg, tiny_idx):
    model = _trained_adapter_model(tiny_cfg, device=device)
    base_w = to_numpy(model.params["h.0.attn.c_attn.weight"]).copy()
    adapted = to_numpy(model.forward(tiny_idx))
    ml.disable_lora(model)
    base_out = to_numpy(model.forward(tiny_idx))
    assert np.abs(base_out - adapted).max() > 1e-3
    ml.enable_lora(model)
    np.testing.assert_array_equal(to_numpy(model.forward(tiny_idx)), adapted)

    ml.merge_lora(model)
    merged = to_numpy(model.forward(tiny_idx))
    merge_err = np.abs(merged - adapted).max()
    assert merge_err < 1e-5, merge_err  # float32 rounding of W + s A B
    with pytest.raises(RuntimeError, match="unmerge"):
        model.backward(model.xp.ones_like(model.forward(tiny_idx)))
    ml.unmerge_lora(model)
    assert np.abs(to_numpy(model.params["h.0.attn.c_attn.weight"]) - base_w).max() < 1e-6
    np.testing.assert_allclose(to_numpy(model.forward(tiny_idx)), adapted, atol=1e-5)

    ml.remove_lora(model)
    assert model.lora is None and not any("lora" in n for n in model.params)
    np.testing.assert_allclose(to_numpy(model.forward(tiny_idx)), base_out, atol=1e-5)
    assert set(model.trainable) == set(model.params)  # back to what was trainable before


def test_merge_is_exact_in_float64(tiny_cfg, tiny_idx):
    model = _trained_adapter_model(tiny_cfg, dtype="float64")
    adapted = model.forward(tiny_idx)
    ml.merge_lora(model)
    np.testing.assert_allclose(model.forward(tiny_idx), adapted, rtol=1e-12, atol=1e-13)


def test_save_load_round_trip(tmp_path, tiny_cfg, tiny_idx):
    model = _trained_adapter_model(tiny_cfg)
    expected = model.forward(tiny_idx)
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.safetensors", ml.adapters.CONFIG_FILE]
    fresh = ml.GPTModel(tiny_cfg, seed=0, dtype="float32")  # same base, no head yet
    config = load_adapter(fresh, tmp_path / "adapter")
    assert config["rank"] == 2 and config["base_model"] == "tiny" and config["num_classes"] == 3
    np.testing.assert_array_equal(fresh.forward(tiny_idx), expected)
    assert fresh.trainable == model.trainable


def test_loading_into_the_wrong_model_fails_and_changes_nothing(tmp_path, tiny_cfg):
    from dataclasses import replace

    save_adapter(_trained_adapter_model(tiny_cfg), tmp_path / "a")
    other = ml.GPTModel(replace(tiny_cfg, emb_dim=12), seed=0)
    before = {n: p.copy() for n, p in other.params.items()}
    with pytest.raises(AdapterError, match="emb_dim: adapter was trained on 8, model has 12"):
        load_adapter(other, tmp_path / "a")
    assert other.lora is None and set(other.params) == set(before)
    assert all(np.array_equal(other.params[n], before[n]) for n in before)

    two_class = ml.GPTModel(tiny_cfg, seed=0).replace_head(2)
    with pytest.raises(AdapterError, match="3 classes, model has 2"):
        load_adapter(two_class, tmp_path / "a")
    assert two_class.lora is None and "out_head.lora_A" not in two_class.params


def test_corrupt_adapters_are_clear_errors(tmp_path, tiny_cfg):
    from safetensors.numpy import load_file, save_file

    folder = save_adapter(_trained_adapter_model(tiny_cfg), tmp_path / "a")
    tensors = load_file(str(folder / "adapter.safetensors"))
    tensors["h.0.mlp.c_fc.lora_A"] = np.zeros((8, 5), dtype=np.float32)
    del tensors["h.1.mlp.c_proj.lora_B"]
    save_file(tensors, str(folder / "adapter.safetensors"))
    with pytest.raises(AdapterError) as e:
        load_adapter(ml.GPTModel(tiny_cfg), folder)
    assert "missing tensor h.1.mlp.c_proj.lora_B" in str(e.value)
    assert "h.0.mlp.c_fc.lora_A: shape (8, 5) in the adapter, (8, 2) in the model" in str(e.value)
    (folder / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(ml.GPTModel(tiny_cfg), folder)
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(ml.GPTModel(tiny_cfg), tmp_path / "nowhere")


def _crash_save_at(where, monkeypatch):
    """Make the next save_adapter fail `where`: halfway through the weights (a full disk),
    after the weights while writing the config (Ctrl-C), or between atomic_folder's two
    renames (the old adapter moved aside, the new one not yet in place: a power cut)."""
    import errno
    import json
    import os
    import types

    from minilora import adapters, files

    if where == "weights":
        def save_file(tensors, path, *args, **kwargs):
            open(path, "wb").write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(adapters, "save_file", save_file)
    elif where == "config":
        def dumps(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(adapters, "json", types.SimpleNamespace(dumps=dumps, loads=json.loads,
                                                                   JSONDecodeError=json.JSONDecodeError))
    else:
        real, calls = os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:  # folder set aside (.folder.<random>.old); tmp -> folder is the crash
                raise KeyboardInterrupt
            return real(src, dst)
        monkeypatch.setattr(files.os, "replace", replace)


@pytest.mark.parametrize("where", ["weights", "config", "between_renames"])
def test_an_interrupted_save_keeps_the_old_adapter_whole(tmp_path, tiny_cfg, monkeypatch, where):
    from safetensors.numpy import load_file

    folder = tmp_path / "adapter"
    save_adapter(_trained_adapter_model(tiny_cfg), folder, class_names=["a", "b", "c"])
    old_config = (folder / ml.adapters.CONFIG_FILE).read_text()
    old_tensors = load_file(str(folder / "adapter.safetensors"))
    new = lora_model(tiny_cfg, rank=4)  # another rank: a mix of old and new files would not load
    randomize_B(new, scale=0.5)
    _crash_save_at(where, monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt, RuntimeError)):
        save_adapter(new, folder, class_names=["x", "y", "z"])
    monkeypatch.undo()
    # reading puts back the old adapter a crash between the renames left set aside
    config = load_adapter(ml.GPTModel(tiny_cfg, seed=0), folder)
    assert config["rank"] == 2 and config["class_names"] == ["a", "b", "c"]
    assert (folder / ml.adapters.CONFIG_FILE).read_text() == old_config
    tensors = load_file(str(folder / "adapter.safetensors"))
    assert set(tensors) == set(old_tensors) and all(np.array_equal(tensors[n], old_tensors[n]) for n in tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary, nothing set aside


@pytest.mark.parametrize("where", ["weights", "config"])
def test_an_interrupted_first_save_leaves_nothing(tmp_path, tiny_cfg, monkeypatch, where):
    _crash_save_at(where, monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt, RuntimeError)):
        save_adapter(_trained_adapter_model(tiny_cfg), tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_save_adapter_refuses_a_folder_holding_other_files(tmp_path, tiny_cfg):
    from minilora.adapters import write_adapter

    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(AdapterError, match="holds other files than an adapter \\(notes.txt\\)"):
        save_adapter(_trained_adapter_model(tiny_cfg), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    # a caller that writes the bigger folder atomically itself puts the two files beside its own
    write_adapter(_trained_adapter_model(tiny_cfg), tmp_path, class_names=["a", "b", "c"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", ml.adapters.CONFIG_FILE,
                                                         "notes.txt"]
    assert load_adapter(ml.GPTModel(tiny_cfg, seed=0), tmp_path)["class_names"] == ["a", "b", "c"]


def test_lora_training_on_a_toy_task_leaves_the_base_untouched(device, tiny_cfg):
    """Classify whether token 7 occurs in a sequence: the loss falls, base bits stay."""
    rng = np.random.default_rng(0)
    model = ml.GPTModel(tiny_cfg, seed=0, dtype="float32", device=device).replace_head(2)
    ml.apply_lora(model, rank=4, alpha=4)
    base = {n: to_numpy(p).copy() for n, p in model.params.items() if "lora" not in n}
    opt = ml.AdamW(model, lr=2e-2, weight_decay=0.0)
    idx = rng.integers(0, 7, size=(32, 6))
    labels = rng.integers(0, 2, size=32)
    idx[labels == 1, rng.integers(0, 6, size=int(labels.sum()))] = 7
    labels_dev = model.xp.asarray(labels)
    losses = []
    for _ in range(60):
        logits = model.forward(idx)
        loss, cache = cross_entropy_forward(logits[:, -1, :], labels_dev)
        dlogits = model.xp.zeros_like(logits)
        dlogits[:, -1, :] = cross_entropy_backward(1.0, cache)[0]
        opt.step(model.backward(dlogits))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    for n, p in base.items():
        np.testing.assert_array_equal(to_numpy(model.params[n]), p, err_msg=n)


# ---------------------------------------------------------------------------- stacked Q/K/V adapters

# (apply_lora keywords, {block: (its stacked parts, the blocks of c_attn they write)}) on the
# two-block tiny model; a block missing from the dict runs its adapters one by one
STACK_CASES = [
    ({}, {0: ("qkv", slice(0, 3, 1)), 1: ("qkv", slice(0, 3, 1))}),
    ({"targets": "attention"}, {0: ("qv", slice(0, 3, 2)), 1: ("qv", slice(0, 3, 2))}),
    ({"ranks": {"h.0.attn.c_attn.k": 1}}, {0: ("qv", slice(0, 3, 2)), 1: ("qkv", slice(0, 3, 1))}),
    ({"ranks": {"h.0.attn.c_attn.k": 1, "h.0.attn.c_attn.v": 3}}, {1: ("qkv", slice(0, 3, 1))}),
    ({"alphas": {"h.1.attn.c_attn.v": 5}}, {0: ("qkv", slice(0, 3, 1)), 1: ("qk", slice(0, 2, 1))}),
    ({"targets": ["c_attn"]}, {}),  # PEFT's one adapter over all of Q|K|V: nothing to stack
    ({"targets": ["c_attn", "c_attn.k", "c_attn.v"]}, {0: ("kv", slice(1, 3, 1)), 1: ("kv", slice(1, 3, 1))}),
]


@pytest.mark.parametrize("kw, expected", STACK_CASES)
def test_qkv_adapters_of_one_rank_and_scale_are_stacked(tiny_cfg, kw, expected):
    state = lora_model(tiny_cfg, **kw).lora
    got = {int(linear.split(".")[1]): ("".join(ad.prefix[-1] for ad in stack.adapters), stack.blocks)
           for linear, stack in state.stacks.items()}
    assert got == expected
    for stack in state.stacks.values():
        assert {ad.scale for ad in stack.adapters} == {stack.scale}


def count_stacked_calls(monkeypatch):
    """Record every lora_stack_forward the model makes (the number of stacks it ran)."""
    import minilora.model

    calls = []
    real = minilora.model.lora_stack_forward

    def counted(*args):
        calls.append(len(args[1]))  # how many adapters it stacked
        return real(*args)

    monkeypatch.setattr(minilora.model, "lora_stack_forward", counted)
    return calls


@pytest.mark.parametrize("kw, expected", STACK_CASES)
@pytest.mark.parametrize("positions", [None, np.array([4, 2])])
def test_stacked_adapters_give_the_results_of_adapters_one_by_one(monkeypatch, device, tiny_cfg, tiny_idx, kw,
                                                                   expected, positions):
    """Logits and every LoRA gradient, stacked against one by one (stacks removed)."""
    monkeypatch.setenv("MINILORA_NUM_THREADS", "1")  # one shard: one stack call per stacked block
    calls = count_stacked_calls(monkeypatch)
    model = lora_model(tiny_cfg, device=device, **kw)
    randomize_B(model)  # B = 0 would make every adapter's output and dA zero on both paths
    G = np.random.default_rng(3).standard_normal((2, 3) if positions is not None else (2, 5, 3))

    def run():
        logits = model.forward(tiny_idx, positions=positions)
        grads = model.backward(model.xp.asarray(G))
        return to_numpy(logits), {n: to_numpy(g) for n, g in grads.items()}

    stacked_logits, stacked = run()
    assert calls == [len(parts) for parts, _ in expected.values()]
    model.lora.stacks = {}
    logits, one_by_one = run()
    assert len(calls) == len(expected)  # no stack ran the second time
    # Both paths add the same products in other groupings (one (in, k r) product against k
    # (in, r) ones, sums over N = 10 rows batched or not): float64 rounding, each sum of
    # n <= 40 terms of size ~1 off by ~n * 1.1e-16 ~ 5e-15, carried through two blocks with
    # layernorm gains ~20: ~1e-13 relative to the largest entry. A wrong block or a lost
    # scale is off by the size of the adapter's term, ~1e-1.
    np.testing.assert_allclose(stacked_logits, logits, rtol=0, atol=1e-12 * np.abs(logits).max())
    assert set(stacked) == set(one_by_one) == set(model.lora.param_names)
    for n, g in one_by_one.items():
        np.testing.assert_allclose(stacked[n], g, rtol=0, atol=1e-12 * max(np.abs(g).max(), 1e-300), err_msg=n)


@pytest.mark.parametrize("parts, blocks", [("qkv", slice(0, 3, 1)), ("qv", slice(0, 3, 2)), ("kv", slice(1, 3, 1))])
def test_stacked_pair_gradients_match_finite_differences(rng, parts, blocks):
    """lora_stack_forward / backward on their own: delta per block is lora_forward's, and
    dx, every dA and dB agree with central differences (as gradcheck's layer checks)."""
    from minilora.gradcheck import LAYER_TOL, numerical_gradient, rel_error
    from minilora.lora import (
        AdapterStack,
        lora_forward,
        lora_stack_backward,
        lora_stack_forward,
    )

    B, T, n_in, r, w, s = 2, 5, 7, 2, 4, 1.5
    k = len(parts)
    x = rng.standard_normal((B, T, n_in))
    As = [rng.standard_normal((n_in, r)) for _ in parts]
    Bs = [rng.standard_normal((r, w)) for _ in parts]
    stack = AdapterStack(adapters=tuple(parts), blocks=blocks, scale=s)
    G = rng.standard_normal((B, T, 3 * w))  # the upstream gradient of a linear's (B, T, 3w) output

    def loss():
        y = np.zeros((B, T, 3 * w))
        y_blocks = stack.blocks_of(y)
        y_blocks += lora_stack_forward(x, As, Bs, s)[0]
        return float((y * G).sum())

    delta, cache = lora_stack_forward(x, As, Bs, s)
    assert delta.shape == (B, T, k, w)
    for j in range(k):  # the same numbers as one adapter at a time, up to rounding (~1e-15)
        np.testing.assert_allclose(delta[..., j, :], lora_forward(x, As[j], Bs[j], s)[0], rtol=0, atol=1e-13)
    dx, dAs, dBs = lora_stack_backward(stack.blocks_of(G), cache)
    assert rel_error(dx, numerical_gradient(loss, x)) < LAYER_TOL
    for j in range(k):
        assert rel_error(dAs[j], numerical_gradient(loss, As[j])) < LAYER_TOL, (parts[j], "A")
        assert rel_error(dBs[j], numerical_gradient(loss, Bs[j])) < LAYER_TOL, (parts[j], "B")
    no_dx, dAs2, dBs2 = lora_stack_backward(stack.blocks_of(G), cache, need_dx=False)
    assert no_dx is None
    for a, b in zip(dAs + dBs, dAs2 + dBs2):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("s", [1, 1.0, 1.5])
def test_one_adapter_gradients_match_finite_differences_at_scale_one_too(rng, s):
    """lora_forward / lora_backward at s = 1, the book's alpha = r, skip the multiply by s
    (no pass that changes no bit): delta is (x A) B and dx, dA, dB agree with central
    differences there as at s = 1.5 (gradcheck's own LoRA check runs at s = 1.7)."""
    from minilora.gradcheck import LAYER_TOL, numerical_gradient, rel_error
    from minilora.lora import lora_backward, lora_forward

    x, A, B = rng.standard_normal((2, 5, 7)), rng.standard_normal((7, 3)), rng.standard_normal((3, 4))
    G = rng.standard_normal((2, 5, 4))
    delta, cache = lora_forward(x, A, B, s)
    np.testing.assert_allclose(delta, s * (x @ A) @ B, rtol=0, atol=1e-13 * np.abs(delta).max())

    def loss():
        return float((lora_forward(x, A, B, s)[0] * G).sum())

    dx, dA, dB = lora_backward(G, cache)
    for got, wrt in ((dx, x), (dA, A), (dB, B)):
        assert rel_error(got, numerical_gradient(loss, wrt)) < LAYER_TOL


def test_with_lora_dropout_each_adapter_keeps_its_own_mask(monkeypatch, tiny_cfg, tiny_idx):
    """Training with LoRA dropout: Q, K and V each draw their own mask, so nothing is stacked
    and the output is bit for bit the one-by-one path's; in evaluation (no dropout) they stack."""
    monkeypatch.setenv("MINILORA_NUM_THREADS", "1")
    calls = count_stacked_calls(monkeypatch)
    model = lora_model(tiny_cfg, dropout=0.3)
    randomize_B(model)
    assert model.lora.stacks  # stackable: one rank, one scale

    def train_forward():
        model._dropout_rng = np.random.default_rng(5)
        return model.forward(tiny_idx)

    trained = train_forward()
    assert calls == []
    stacks, model.lora.stacks = model.lora.stacks, {}
    np.testing.assert_array_equal(trained, train_forward())
    evaluated = model.eval().forward(tiny_idx)
    model.lora.stacks = stacks
    np.testing.assert_allclose(model.forward(tiny_idx), evaluated, rtol=0, atol=1e-12 * np.abs(evaluated).max())
    assert calls == [3, 3]  # evaluation: both blocks stacked
    assert not np.allclose(trained, evaluated)  # the dropout did act in training
