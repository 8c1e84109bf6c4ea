"""Generation: the key/value cache gives the same logits and tokens as recomputing."""

import numpy as np
import pytest

import minilora as ml
from minilora.backend import to_numpy
from minilora.generate import KVCache, forward_incremental, generate, sample_next


@pytest.fixture
def lm(device):
    cfg = ml.GPTConfig(vocab_size=23, context_length=12, emb_dim=8, n_heads=2, n_layers=2)
    return ml.GPTModel(cfg, seed=3, dtype="float64", device=device)


def test_incremental_forward_matches_full_forward(lm):
    idx = np.random.default_rng(0).integers(0, 23, (2, 9))
    kv = KVCache(lm, 2)
    steps = [idx[:, :4], idx[:, 4:5], idx[:, 5:6], idx[:, 6:9]]  # a prompt, then tokens
    seen = 0
    for chunk in steps:
        seen += chunk.shape[1]
        got = to_numpy(forward_incremental(lm, chunk, kv))
        full = to_numpy(lm.forward(idx[:, :seen], keep_cache=False))[:, -1]
        np.testing.assert_allclose(got, full, rtol=1e-12, atol=1e-12)
    assert kv.length == 9


def test_cached_and_uncached_generation_agree_and_slide_past_the_window(lm):
    prompt = np.array([[1, 5, 5, 7]])
    a = generate(lm, prompt, 14, kv_cache=True)  # 4 + 14 > 12: falls back once the window is full
    b = generate(lm, prompt, 14, kv_cache=False)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 18) and (a[:, :4] == prompt).all()


def test_sampling_is_seeded_and_top_k_restricts(lm):
    prompt = np.array([[2, 3]])
    s1 = generate(lm, prompt, 6, temperature=1.5, top_k=3, seed=7)
    s2 = generate(lm, prompt, 6, temperature=1.5, top_k=3, seed=7)
    np.testing.assert_array_equal(s1, s2)
    logits = np.array([[0.0, 5.0, 1.0, 4.0, 3.0]])
    picks = {int(sample_next(logits, 10.0, top_k=2, rng=np.random.default_rng(i))[0]) for i in range(50)}
    assert picks == {1, 3}
    assert int(sample_next(logits)[0]) == 1  # greedy


def test_generate_needs_a_language_model_head(lm):
    lm.replace_head(2)
    with pytest.raises(ValueError, match="language-model head"):
        generate(lm, np.array([[1]]), 1)


def test_logits_that_are_not_finite_are_refused_not_turned_into_a_token(lm):
    """A NaN in the weights makes every logit NaN: argmax would answer token 0, so generation
    stops with the sequence named instead; -inf (a ruled-out token) is fine."""
    from minilora.generate import GenerationError

    assert int(sample_next(np.array([[-np.inf, 1.0, -np.inf]]))[0]) == 1
    for bad in (np.nan, np.inf):
        with pytest.raises(GenerationError, match=r"not finite .* sequence\(s\) \[1\]"):
            sample_next(np.array([[0.0, 1.0, 2.0], [0.0, bad, 2.0]]), temperature=0.5)
    with pytest.raises(GenerationError, match="not finite"):
        sample_next(np.array([[-np.inf, -np.inf]]))
    lm.params["ln_f.weight"][0] = np.nan
    with pytest.raises(GenerationError, match=r"sequence\(s\) \[0\]"):
        generate(lm, np.array([[1, 2]]), 3)
