"""The batch split into shards run side by side on the CPU cores: the same gradients as
one shard, every gradient still exact, BLAS threads limited only while the shards run."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import minilora as ml
from minilora import backend
from minilora.bench import build_step, layer_breakdown, matmul_floor_fn
from minilora.gradcheck import MODEL_TOL, check_model


def _blas_threads():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


@pytest.mark.parametrize("threads, batch, sizes", [(2, 8, [4, 4]), (2, 3, [1, 2]), (3, 5, [1, 2, 2]),
                                                   (4, 2, [1, 1]), (2, 1, [1]), (1, 8, [8])])
def test_batch_shards_cover_the_batch_once(monkeypatch, threads, batch, sizes):
    monkeypatch.setenv("MINILORA_NUM_THREADS", str(threads))
    shards = backend.batch_shards(batch, "cpu")
    assert [s.stop - s.start for s in shards] == sizes
    assert shards[0].start == 0 and shards[-1].stop == batch
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
    assert backend.batch_shards(batch, "cuda") == [slice(0, batch)]


def test_thread_count_setting(monkeypatch):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "3")
    assert backend.cpu_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MINILORA_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="MINILORA_NUM_THREADS"):
            backend.cpu_threads()
    monkeypatch.delenv("MINILORA_NUM_THREADS")
    assert backend.cpu_threads() >= 1


@pytest.fixture
def blas_at_two():
    """BLAS at 2 threads, so that a limit to 1 shows (on a 1-core machine, or with
    OPENBLAS_NUM_THREADS=1, BLAS would already be at 1 and a missing limit pass unseen)."""
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and all(n == 2 for n in before), before
        yield before


def test_run_parallel_keeps_order_raises_and_restores_blas_threads(monkeypatch, blas_at_two):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    seen = backend.run_parallel(lambda i: (i * i, _blas_threads()), [(1,), (2,), (3,)])
    assert [r for r, _ in seen] == [1, 4, 9]
    assert all(t == [1] * len(blas_at_two) for _, t in seen)  # 2 threads // 3 shards -> 1 each
    assert _blas_threads() == blas_at_two

    def fails(i):
        if i == 2:
            raise KeyError("shard 2")
        return i

    with pytest.raises(KeyError, match="shard 2"):
        backend.run_parallel(fails, [(1,), (2,), (3,)])
    assert _blas_threads() == blas_at_two


def test_run_parallel_lets_every_item_finish_before_raising(monkeypatch):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    finished = []

    def item(i):
        if i == 0:
            raise MemoryError("shard 0")
        time.sleep(0.3)
        finished.append(i)

    with pytest.raises(MemoryError, match="shard 0"):
        backend.run_parallel(item, [(0,), (1,)])
    assert finished == [1]


def test_run_parallel_nested_call_and_more_threads(monkeypatch):
    """A call from inside an item runs its items in turn instead of waiting on the busy
    pool forever; a larger $MINILORA_NUM_THREADS gets a larger pool (3 items that wait
    for each other only finish if all 3 run at once)."""
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    result = []
    outer = threading.Thread(target=lambda: result.extend(backend.run_parallel(
        lambda i: sum(backend.run_parallel(lambda j: i * j, [(1,), (2,)])), [(1,), (10,)])), daemon=True)
    outer.start()
    outer.join(timeout=10)
    assert not outer.is_alive(), "nested run_parallel deadlocked"
    assert result == [3, 30]

    monkeypatch.setenv("MINILORA_NUM_THREADS", "3")
    barrier = threading.Barrier(3, timeout=10)
    assert backend.run_parallel(lambda i: barrier.wait() * 0 + i, [(0,), (1,), (2,)]) == [0, 1, 2]


def test_concurrent_callers_take_turns_and_leave_blas_as_it_was(monkeypatch, blas_at_two, tiny_cfg, tiny_idx):
    """The BLAS limit is process-wide: evaluation forwards from several threads at once
    must neither mix their results nor leave BLAS at one thread."""
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    model = ml.GPTModel(tiny_cfg, seed=2, dtype="float64").eval()
    expected = model.forward(tiny_idx, keep_cache=False)
    with ThreadPoolExecutor(4) as callers:
        outs = list(callers.map(lambda _: model.forward(tiny_idx, keep_cache=False), range(12)))
    for out in outs:
        np.testing.assert_array_equal(out, expected)
    assert _blas_threads() == blas_at_two


def _lora_model(cfg, dtype="float64"):
    model = ml.GPTModel(cfg, seed=3, dtype=dtype).replace_head(3)
    ml.apply_lora(model, rank=2, alpha=3, seed=3)
    rng = np.random.default_rng(0)
    for name in model.lora.param_names:  # B != 0: every LoRA gradient is exercised
        model.params[name][...] = rng.standard_normal(model.params[name].shape)
    return model


@pytest.mark.parametrize("dtype, rtol, atol", [("float64", 1e-11, 1e-13), ("float32", 1e-4, 1e-5)])
@pytest.mark.parametrize("use_positions", [False, True])
def test_shards_give_the_gradients_of_one_shard(monkeypatch, tiny_cfg, use_positions, dtype, rtol, atol):
    """Uneven shards (5 sequences over 3 threads: 1 + 2 + 2) against the whole batch at
    once: equal up to the rounding of the gradient sums."""
    idx = np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, (5, 6))
    positions = np.array([5, 0, 3, 2, 5]) if use_positions else None
    model = _lora_model(tiny_cfg, dtype)
    results = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("MINILORA_NUM_THREADS", threads)
        logits = model.forward(idx, positions=positions)
        G = np.random.default_rng(2).standard_normal(logits.shape).astype(dtype)
        results[threads] = (logits, model.backward(G))
    (l1, g1), (l3, g3) = results["1"], results["3"]
    assert l3.dtype == np.dtype(dtype) and all(g.dtype == np.dtype(dtype) for g in g3.values())
    np.testing.assert_allclose(l3, l1, rtol=rtol, atol=atol)
    assert g1.keys() == g3.keys() and len(g1) == len(model.trainable)
    for name in g1:
        np.testing.assert_allclose(g3[name], g1[name], rtol=rtol, atol=atol, err_msg=name)


def test_sharded_gradients_match_finite_differences(monkeypatch, tiny_cfg):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "3")
    idx = np.array([[1, 3, 3, 0, 10], [3, 7, 1, 1, 3], [10, 10, 2, 4, 0]])
    model = _lora_model(tiny_cfg)
    result = check_model(model, idx, "gpt2_lora in 3 shards")
    assert set(result.errors) == set(model.trainable)
    assert result.passed and result.max_rel_error < MODEL_TOL, result.errors


@pytest.mark.parametrize("positions", [None, [4, 2, 0, 3, 1]])
def test_dropout_masks_do_not_depend_on_the_shards(monkeypatch, tiny_cfg, positions):
    """Masks are drawn sequence by sequence from generators seeded by the model's: 1, 2
    or 3 shards (and any thread order) give the same logits and gradients, and a second
    model with the same seed the same step again."""
    cfg = ml.GPTConfig(**{**tiny_cfg.to_dict(), "drop_rate": 0.3})
    idx = np.random.default_rng(7).integers(0, cfg.vocab_size, (5, 5))
    runs = []
    for threads in ("1", "2", "3", "3"):
        monkeypatch.setenv("MINILORA_NUM_THREADS", threads)
        model = ml.GPTModel(cfg, seed=5, dtype="float64")
        ml.apply_lora(model, rank=2, alpha=2, seed=3, dropout=0.2)
        logits = model.forward(idx, positions=positions)
        runs.append((logits, model.backward(np.ones_like(logits))))
    for logits, grads in runs[1:]:
        np.testing.assert_allclose(logits, runs[0][0], rtol=0, atol=1e-12)
        for name, g in runs[0][1].items():
            np.testing.assert_allclose(grads[name], g, rtol=0, atol=1e-12, err_msg=name)
    no_dropout = ml.GPTModel(cfg, seed=5, dtype="float64").eval().forward(idx, positions=positions)
    assert not np.allclose(runs[0][0], no_dropout)


def test_benchmark_profiles_and_floors_every_shard(monkeypatch, tiny_cfg):
    """The breakdown sees the layer functions every shard runs; the floor runs its two
    shards' products."""
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    _, step = build_step(tiny_cfg, batch=4, seq=5, rank=2)
    step()
    rows = layer_breakdown(step, shards=2)
    for name in ("linear_forward", "linear_backward", "attention_backward", "lora_forward", "gelu_backward"):
        assert name in rows, (name, rows)
    matmul_floor_fn(step)()
