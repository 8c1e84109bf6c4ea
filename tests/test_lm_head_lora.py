"""LoRA on GPT-2's tied LM head (site "lm_head"): logits = x @ wte^T + s * (x @ A) @ B,
wte frozen and still the embedding. Its gradients against finite differences, the fast
model against the reference, merge / unmerge / save / load, generation, the book's count."""

import numpy as np
import pytest

import minilora as ml
from minilora.backend import to_numpy
from minilora.generate import generate
from minilora.gradcheck import check_model
from minilora.lora import config_sites, select_targets
from test_reference import TOL, compare, random_model

IDX = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3], [9, 9, 2, 5, 0]])  # repeated ids, 3 sequences


def head_lora_model(cfg, device="cpu", seed=0):
    """A float64 language model with LoRA r=2 on the tied head alone, B non-zero."""
    model = ml.GPTModel(cfg, seed=seed, dtype="float64", device=device)
    ml.apply_lora(model, rank=2, alpha=3, targets=["lm_head"], seed=seed)
    B = model.params["lm_head.lora_B"]
    B[...] = model.xp.asarray(np.random.default_rng(seed + 1).standard_normal(B.shape) * 0.5)
    return model


def test_the_book_counts_7898384_trainable_for_gpt2_medium():
    """Exercise 7.4: r=16 on every linear and the LM head of gpt2-medium. Counted from the
    sites (no 355M-parameter model built) and by the formula r * (in + out) per adapter."""
    cfg = ml.GPTConfig.from_preset("gpt2-medium")
    sites = config_sites(cfg)  # a language model: no out_head, so the head site is lm_head
    chosen = select_targets(sites, cfg.n_layers, "all")
    assert chosen[-1] == "lm_head"
    r, C, V, L = 16, cfg.emb_dim, cfg.vocab_size, cfg.n_layers
    per_block = 3 * r * (C + C) + r * (C + C) + r * (C + 4 * C) + r * (4 * C + C)  # q k v, c_proj, c_fc, mlp.c_proj
    assert sum(r * (sites[p][2] + sites[p][3]) for p in chosen) == L * per_block + r * (C + V) == 7_898_384
    # and what apply_lora makes: a model without base weights (init=False), adapters alone (32 MB)
    model = ml.apply_lora(ml.GPTModel(cfg, init=False), rank=16, alpha=16, scaling="alpha", targets="all")
    assert model.num_params(trainable_only=True) == 7_898_384


def test_appendix_e_count_is_unchanged():
    cfg = ml.GPTConfig.from_preset("gpt2-small")
    sites = config_sites(cfg, head_outputs=2)  # a classifier: out_head, and no lm_head
    chosen = select_targets(sites, cfg.n_layers, "all")
    assert "lm_head" not in chosen
    assert sum(16 * (sites[p][2] + sites[p][3]) for p in chosen) == 2_666_528


def test_head_adapter_gradients_match_finite_differences(tiny_cfg):
    model = head_lora_model(tiny_cfg)
    assert model.trainable == ["lm_head.lora_A", "lm_head.lora_B"]
    r = check_model(model, IDX[:2], "lm_head_lora")
    assert r.passed and set(r.errors) == {"lm_head.lora_A", "lm_head.lora_B"}, r.errors


def test_a_head_adapter_backward_without_its_scale_fails(monkeypatch, tiny_cfg):
    """The check notices a broken head adapter: dA, dB and dx computed as if s were 1."""
    import minilora.model

    real = minilora.model.lora_backward

    def unscaled(dout, cache, need_dx=True):
        x, A, B, xa, scale, mask = cache
        return real(dout, (x, A, B, xa, 1.0, mask), need_dx)

    monkeypatch.setattr(minilora.model, "lora_backward", unscaled)
    r = check_model(head_lora_model(tiny_cfg), IDX[:2], "lm_head_lora_broken")
    assert not r.passed and r.max_rel_error > 1e-2  # s = 1.5 here: off by 1/3 of the norms


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("positions", [None, np.array([4, 1, 2])])
def test_fast_model_equals_reference_with_the_head_adapter(monkeypatch, tiny_cfg, threads, positions):
    monkeypatch.setenv("MINILORA_NUM_THREADS", threads)
    model = random_model(tiny_cfg, "cpu", None, "all")
    assert "lm_head.lora_A" in model.params
    worst, errors = compare(model, IDX, positions)
    assert worst < TOL, {n: e for n, e in errors.items() if e >= TOL}


def test_merge_leaves_the_embedding_alone_and_unmerge_restores_the_tied_head(tiny_cfg):
    model = head_lora_model(tiny_cfg)
    wte = to_numpy(model.params["wte.weight"]).copy()
    emb = wte[IDX] + to_numpy(model.params["wpe.weight"])[:5]  # what the embedding reads
    adapted = to_numpy(model.forward(IDX, keep_cache=False))
    ml.merge_lora(model)
    assert "lm_head.weight" in model.params  # the merged head has a weight of its own
    np.testing.assert_array_equal(to_numpy(model.params["wte.weight"]), wte)
    np.testing.assert_array_equal(to_numpy(model.params["wte.weight"])[IDX] + to_numpy(model.params["wpe.weight"])[:5], emb)
    merged = to_numpy(model.forward(IDX, keep_cache=False))
    # float64: W + s A B rounds once per entry, ~eps * |logit| ~ 1e-15
    np.testing.assert_allclose(merged, adapted, rtol=1e-12, atol=1e-12)
    ml.unmerge_lora(model)
    assert "lm_head.weight" not in model.params
    np.testing.assert_array_equal(to_numpy(model.forward(IDX, keep_cache=False)), adapted)  # nothing subtracted
    ml.disable_lora(model)
    plain = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    np.testing.assert_allclose(to_numpy(model.forward(IDX, keep_cache=False)),
                               to_numpy(plain.forward(IDX, keep_cache=False)), rtol=0, atol=1e-13)


def test_save_and_load_carry_the_head_adapter(tiny_cfg, tmp_path):
    model = head_lora_model(tiny_cfg)
    ml.save_adapter(model, tmp_path / "adapter")
    fresh = ml.GPTModel(tiny_cfg, seed=0, dtype="float64")
    ml.load_adapter(fresh, tmp_path / "adapter")
    np.testing.assert_array_equal(to_numpy(fresh.params["lm_head.lora_B"]), to_numpy(model.params["lm_head.lora_B"]))
    np.testing.assert_array_equal(to_numpy(fresh.forward(IDX, keep_cache=False)),
                                  to_numpy(model.forward(IDX, keep_cache=False)))


def test_generation_applies_the_head_adapter(device, tiny_cfg):
    """The KV-cache path runs the model's one head: the adapter changes the answer, and the
    tokens are the full forward's greedy argmax, step by step."""
    model = head_lora_model(tiny_cfg, device)
    B = model.params["lm_head.lora_B"]
    B *= 20.0  # large enough that the adapter decides the argmax
    prompt = np.array([[1, 3, 3]])
    got = to_numpy(generate(model, prompt, 4, kv_cache=True))
    seq = prompt.copy()
    for _ in range(4):
        nxt = to_numpy(model.forward(seq, keep_cache=False))[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(got, seq)
    ml.disable_lora(model)
    assert not np.array_equal(to_numpy(generate(model, prompt, 4, kv_cache=True)), got)


def test_the_head_is_a_target_only_where_it_exists(tiny_cfg):
    lm = ml.apply_lora(ml.GPTModel(tiny_cfg, seed=0), rank=2, targets="all", layers=[0])
    assert lm.lora.targets[-1] == "lm_head"  # the head is no block's: layers keeps it
    assert all(t.startswith("h.0.") for t in lm.lora.targets[:-1])
    assert lm.params["lm_head.lora_A"].shape == (tiny_cfg.emb_dim, 2)
    assert lm.params["lm_head.lora_B"].shape == (2, tiny_cfg.vocab_size) and not lm.params["lm_head.lora_B"].any()
    classifier = ml.GPTModel(tiny_cfg, seed=0).replace_head(2)
    with pytest.raises(ValueError, match="matches no linear"):
        ml.apply_lora(classifier, rank=2, targets=["lm_head"])
    ml.apply_lora(classifier, rank=2, targets="all")
    assert classifier.lora.targets[-1] == "out_head" and "lm_head" not in classifier.lora.targets


def test_a_frozen_wte_gets_no_head_dw(monkeypatch, tiny_cfg):
    """Frozen means no work: with the head adapter trained and wte frozen, the head's
    linear_backward is asked for dx alone; with wte trained, for its dW as well."""
    import minilora.model

    real, asked = minilora.model.linear_backward, []

    def recording(dout, cache, need_dx=True, need_dw=True, need_db=True):
        if dout.shape[-1] == tiny_cfg.vocab_size:  # the head: the only linear with V outputs
            asked.append(need_dw)
        return real(dout, cache, need_dx, need_dw, need_db)

    monkeypatch.setattr(minilora.model, "linear_backward", recording)
    model = head_lora_model(tiny_cfg)
    logits = model.forward(IDX)
    grads = model.backward(np.ones_like(logits))
    assert asked and not any(asked)  # one call per shard, none asks for dW
    assert set(grads) == {"lm_head.lora_A", "lm_head.lora_B"}
    model.trainable = model.trainable + ["wte.weight"]
    asked.clear()
    logits = model.forward(IDX)
    assert "wte.weight" in model.backward(np.ones_like(logits)) and asked and all(asked)


def test_a_merged_head_cannot_train_wte_and_remove_lora_deletes_it(tiny_cfg):
    """While merged the head reads lm_head.weight, not wte: a wte gradient would lack the
    head's share, so backward refuses; remove_lora unmerges, and the head is tied again."""
    model = head_lora_model(tiny_cfg)
    plain = to_numpy(ml.GPTModel(tiny_cfg, seed=0, dtype="float64").forward(IDX, keep_cache=False))
    ml.merge_lora(model)
    model.trainable = ["wte.weight"]
    logits = model.forward(IDX)
    with pytest.raises(RuntimeError, match="the LM head has a weight of its own, lm_head.weight"):
        model.backward(np.ones_like(logits))
    ml.remove_lora(model)
    assert "lm_head.weight" not in model.params and not any(".lora_" in n for n in model.params)
    np.testing.assert_array_equal(to_numpy(model.forward(IDX, keep_cache=False)), plain)


def test_a_merged_head_is_not_saved_as_a_tied_checkpoint(tiny_cfg, tmp_path):
    """save_pretrained writes GPT-2's tied layout (no lm_head.weight): a merged head would be
    dropped silently, so it is refused."""
    from minilora.weights import CheckpointError, save_pretrained

    model = head_lora_model(tiny_cfg)
    ml.merge_lora(model)
    with pytest.raises(CheckpointError, match="unmerge_lora"):
        save_pretrained(model, tmp_path / "merged")
    ml.unmerge_lora(model)
    save_pretrained(model, tmp_path / "unmerged")  # the base weights, tied, as they were loaded
