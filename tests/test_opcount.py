"""The benchmark's operation counter (minilora.opcount): it counts exactly the operations
of known snippets, nothing for a view, each operation in the function it happens in,
and counting a training step changes none of its numbers."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

import minilora as ml
import minilora.bench
import minilora.bench_compare
from minilora import cli, layers, optim
from minilora import model as model_module
from minilora.bench import build_step, step_matmuls, step_op_count
from minilora.bench_compare import bench_config
from minilora.opcount import Counted, OpCounter, count_model, counting_numpy, one_shard

xp = counting_numpy


@pytest.fixture
def arrays():
    """a (3, 4), b (4, 2), c (3, 4), all Counted; idx an int index array."""
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((3, 4)).view(Counted), "b": rng.standard_normal((4, 2)).view(Counted),
            "c": rng.standard_normal((3, 4)).view(Counted), "idx": np.array([2, 0, 2])}


def add_in_place(a, b, idx, c):
    a += 1.0


def assign_rows(a, b, idx, c):
    a[idx] = 0.0


def scatter_add(a, b, idx, c):
    np.add.at(a, idx, c)


# (snippet, operations, their kind or None). One kernel each on a GPU; a view copies nothing.
SNIPPETS = [
    ("a + c", lambda a, b, idx, c: a + c, 1, "elementwise"),
    ("a @ b", lambda a, b, idx, c: a @ b, 1, "matmul"),
    ("a[idx]", lambda a, b, idx, c: a[idx], 1, "indexing"),
    ("a[a > 0]", lambda a, b, idx, c: a[a > 0], 2, None),  # the comparison, then the mask
    ("a.sum()", lambda a, b, idx, c: a.sum(), 1, "reduction"),
    ("a.mean(axis=-1)", lambda a, b, idx, c: a.mean(axis=-1), 1, "reduction"),  # NumPy: a sum and a divide
    ("np.concatenate([a, c])", lambda a, b, idx, c: np.concatenate([a, c]), 1, "copy"),
    ("a += 1", add_in_place, 1, "in_place"),
    ("np.exp(a, out=a)", lambda a, b, idx, c: np.exp(a, out=a), 1, "in_place"),
    ("a[idx] = 0", assign_rows, 1, "index_assignment"),
    ("np.add.at(a, idx, c)", scatter_add, 1, "index_assignment"),
    ("a.astype(float32)", lambda a, b, idx, c: a.astype(np.float32), 1, "copy"),
    ("a.T.reshape(-1)", lambda a, b, idx, c: a.T.reshape(-1), 1, "copy"),  # a transposed array must be copied
    ("xp.ascontiguousarray(a.T)", lambda a, b, idx, c: xp.ascontiguousarray(a.T), 1, "copy"),
    ("xp.arange(5)", lambda a, b, idx, c: xp.arange(5), 1, "creation"),
    ("xp.zeros((2, 3))", lambda a, b, idx, c: xp.zeros((2, 3)), 1, "creation"),
    ("-(a.sum())", lambda a, b, idx, c: -a.sum(), 2, None),  # a 0-d result is an array, as under CuPy
    ("(a + c) * c", lambda a, b, idx, c: (a + c) * c, 2, "elementwise"),  # results are counted too
    # views and allocations: no kernel
    ("a.reshape(4, 3)", lambda a, b, idx, c: a.reshape(4, 3), 0, None),
    ("np.reshape(a, -1)", lambda a, b, idx, c: np.reshape(a, -1), 0, None),
    ("a.T", lambda a, b, idx, c: a.T, 0, None),
    ("np.swapaxes(a, 0, 1)", lambda a, b, idx, c: np.swapaxes(a, 0, 1), 0, None),
    ("a[1:, :2]", lambda a, b, idx, c: a[1:, :2], 0, None),
    ("a[None]", lambda a, b, idx, c: a[None], 0, None),
    ("a.astype(float64, copy=False)", lambda a, b, idx, c: a.astype(np.float64, copy=False), 0, None),
    ("xp.ascontiguousarray(a)", lambda a, b, idx, c: xp.ascontiguousarray(a), 0, None),
    ("xp.empty((2, 3))", lambda a, b, idx, c: xp.empty((2, 3)), 0, None),
]


@pytest.mark.parametrize("snippet, fn, expected, kind", SNIPPETS, ids=[s[0] for s in SNIPPETS])
def test_the_counter_counts_exactly_the_operations_of_a_snippet(arrays, snippet, fn, expected, kind):
    a, b, idx, c = arrays["a"], arrays["b"], arrays["idx"], arrays["c"]
    plain = {k: np.array(v.view(np.ndarray)) for k, v in arrays.items()}  # copies, for NumPy's own answer
    with OpCounter() as ops:
        result = fn(a, b, idx, c)
    assert ops.total == expected, ops.counts
    if kind is not None:
        assert ops.by_kind() == {kind: expected}
    # NumPy's own result, from the plain copies: the counter only watches
    want = fn(plain["a"], plain["b"], plain["idx"], plain["c"])
    if want is None:  # an in-place snippet: compare what it wrote
        result, want = a, plain["a"]
    np.testing.assert_array_equal(np.asarray(result), np.asarray(want))
    if isinstance(want, np.ndarray):
        assert isinstance(result, Counted), type(result)  # so what is computed from it is counted too


def test_outside_a_counter_nothing_is_counted_and_counters_do_not_nest(arrays):
    a, c = arrays["a"], arrays["c"]
    a + c  # no counter active: passes through
    with OpCounter() as ops:
        pass
    assert ops.total == 0
    with OpCounter():
        with pytest.raises(RuntimeError, match="one at a time"):
            with OpCounter():
                pass


def test_plain_arrays_are_not_counted_and_get_numpy():
    a = np.ones(3)
    with OpCounter() as ops:
        a + a
    assert ops.total == 0
    assert ml.backend.get_array_module(a) is np
    assert ml.backend.get_array_module(a.view(Counted)) is counting_numpy
    assert ml.backend.device_of(a.view(Counted)) == "cpu"


def function_in(module, name, source):
    """The function `name` defined by `source`, compiled as if it were written in the file
    of `module`: the counter attributes by the file and name of the nearest frame."""
    namespace = {"np": np}
    exec(compile(source, module.__file__, "exec"), namespace)
    return namespace[name]


def test_an_operation_goes_to_the_nearest_function_of_layers_lora_model_or_optim(arrays):
    a, c = arrays["a"], arrays["c"]
    inner = function_in(layers, "inner_forward", "def inner_forward(a):\n    return a * a\n")
    outer = function_in(layers, "outer_forward",
                        "def outer_forward(a, c, inner):\n    return inner(a + c) - c\n")
    glue = function_in(model_module, "_some_glue", "def _some_glue(a, inner):\n    return inner(a) + a\n")
    update = function_in(optim, "_an_update", "def _an_update(a):\n    a *= 0.5\n")
    with OpCounter() as ops:
        outer(a, c, inner)  # a + c and - c in outer_forward, the product in inner_forward
        glue(a, inner)  # inner's product is inner's even when model.py called it
        update(a)
        a + c  # here, in a test: "other"
    assert ops.by_function() == {"outer_forward": 2, "inner_forward": 2, "model glue": 1, "AdamW": 1, "other": 1}
    assert ops.glue() == {"_some_glue": 1}
    assert ops.by_function_and_kind()["AdamW"] == {"in_place": 1}


def test_a_real_layer_function_gets_its_own_operations(rng):
    x = rng.standard_normal((2, 5, 8)).view(Counted)
    w, b = rng.standard_normal((8, 6)).view(Counted), rng.standard_normal(6).view(Counted)
    with OpCounter() as ops:
        y, cache = layers.linear_forward(x, w, b)
        layers.linear_backward(np.ones_like(y), cache)
    assert set(ops.by_function()) == {"linear_forward", "linear_backward", "other"}  # other: np.ones_like here
    assert ops.by_function_and_kind()["linear_forward"]["matmul"] == 1
    assert ops.by_function_and_kind()["linear_backward"]["matmul"] == 2  # dx and dW


def run_steps(step, n=2):
    """Run n training steps; [(loss, {name: gradient}, {name: parameter after})] as plain copies."""
    model = step.model
    seen, backward = [], model.backward

    def keep(*args, **kwargs):
        grads = backward(*args, **kwargs)
        seen.append({k: np.array(v.view(np.ndarray)) for k, v in grads.items()})
        return grads

    model.backward = keep
    out = []
    for _ in range(n):
        loss = step()
        out.append((np.array(np.asarray(loss)), seen[-1],
                    {k: np.array(p.view(np.ndarray)) for k, p in model.params.items()}))
    return out


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_counted_step_gives_exactly_the_uncounted_steps_numbers(monkeypatch, tiny_cfg, threads):
    """Loss, gradients and updated parameters equal bit for bit: the counter only watches.
    (On the CPU the counted AdamW runs on its whole buffer, the plain one in pieces: the
    update is elementwise, so every value sees the same operations.)"""
    monkeypatch.setenv("MINILORA_NUM_THREADS", threads)
    _, plain = build_step(tiny_cfg, 4, 5, 2, dtype="float32")
    _, counted = build_step(tiny_cfg, 4, 5, 2, dtype="float32")
    count_model(counted.model)
    want = run_steps(plain)
    with OpCounter() as ops:
        got = run_steps(counted)
    assert ops.total > 0
    for (loss, grads, params), (loss_c, grads_c, params_c) in zip(want, got):
        np.testing.assert_array_equal(loss_c, loss)
        assert grads_c.keys() == grads.keys() and params_c.keys() == params.keys()
        for name in grads:
            np.testing.assert_array_equal(grads_c[name], grads[name], err_msg=name)
        for name in params:
            np.testing.assert_array_equal(params_c[name], params[name], err_msg=name)


def test_each_shard_repeats_the_layer_functions_operations(monkeypatch, tiny_cfg):
    """Two shards in two threads run every layer function twice (the loss, on the whole
    batch, once): the counts from both threads all arrive."""
    def per_layer_function(threads):
        monkeypatch.setenv("MINILORA_NUM_THREADS", threads)
        _, step = build_step(tiny_cfg, 4, 5, 2)
        count_model(step.model)
        step()  # AdamW's first step also packs its buffers
        with OpCounter() as ops:
            step()
        rows = {}
        for (place, fn, _), n in ops.counts.items():
            if place in ("layers", "lora"):
                rows[fn] = rows.get(fn, 0) + n
        return rows

    one, two = per_layer_function("1"), per_layer_function("2")
    assert set(one) >= {"linear_forward", "attention_backward", "lora_backward"} and set(two) == set(one)
    loss = {"cross_entropy_forward", "cross_entropy_backward"}
    assert {fn: two[fn] for fn in one} == {fn: n if fn in loss else 2 * n for fn, n in one.items()}


@pytest.mark.parametrize("targets", [["out_head"], ["out_head", "h.1.mlp.c_fc"]])
def test_the_floor_lists_the_head_dx_only_when_something_under_it_trains(tiny_cfg, targets):
    """Only the head's adapter trains: the step takes no dx through the head, and neither
    does the floor's product list; with an adapter under it, both take it."""
    report = step_op_count(tiny_cfg, batch=3, seq=5, rank=2, targets=targets)
    model, _ = build_step(tiny_cfg, 3, 5, 2, targets=targets)
    assert report["by_kind"]["matmul"] == len(step_matmuls(model, 3, 5))


def test_the_step_count_has_one_matmul_per_product_of_the_floor(tiny_cfg):
    """An independent tally: bench.step_matmuls lists every product of one shard's step
    (what the floor times); the counted step (one shard) runs exactly those."""
    report = step_op_count(tiny_cfg, batch=3, seq=5, rank=2)
    model, _ = build_step(tiny_cfg, 3, 5, 2)
    assert report["by_kind"]["matmul"] == len(step_matmuls(model, 3, 5))
    assert report["total"] == sum(report["by_function"].values()) == sum(report["by_kind"].values())
    assert report["shards"] == 1
    for name in ("linear_forward", "lora_backward", "attention_forward", "layernorm_backward", "AdamW",
                 "cross_entropy_forward", "model glue"):
        assert name in report["by_function"], name
    assert "other" not in report["by_function"]  # every operation of the step is in a known file


def test_the_lm_steps_product_list_is_the_products_it_runs():
    """benchmarks/lm_step.py's floor lists the LoRA LM step's products (chapter 7's shape:
    every position scored, the tied head with its adapter, Q/K/V stacked): exactly as many
    as the counted step runs, and the FLOPs it reports are theirs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "lm_step.py"
    spec = importlib.util.spec_from_file_location("lm_step", path)
    lm_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm_step)
    cfg = ml.GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    with one_shard():
        step = lm_step.LMStep(cfg, 2, 8)
        count_model(step.model)
        step.opt.step({n: np.zeros_like(step.model.params[n]) for n in step.model.trainable})  # packs AdamW's buffers
        with OpCounter() as ops:
            step()
    prods = lm_step.lm_step_matmuls(step.model, 2, 8)
    # by hand: a block's forward is 14 products (c_attn 1 + its Q/K/V stack 2, attention 2, three
    # linears of 1 + 2), its backward 5 per adapted linear (dx, dB, g, dA, dx += g A^T), 4 for
    # attention and 3 + 1 for c_attn's stack (dB, g, dA; dx) plus its own dx, none of c_attn's dx
    # in block 0; the head 3 forward, 5 backward: 36 + 38 + 8
    assert ops.report()["by_kind"]["matmul"] == len(prods) == 82

def test_adamws_count_does_not_depend_on_the_number_of_values():
    """As on a GPU, the counted AdamW runs its update once on each whole flat buffer (on the
    CPU optim takes pieces of CPU_CHUNK values, for the cache, only for plain numpy)."""
    def count(n):
        params = SimpleNamespace(params={"w": np.zeros(n, np.float32).view(Counted)})  # trains all its params
        opt = ml.AdamW(params, lr=0.1)
        grads = {"w": np.ones(n, np.float32).view(Counted)}
        opt.step(grads)  # packs the flat buffers
        with OpCounter() as ops:
            opt.step(grads)
        return ops.total

    assert count(10) == count(3 * optim.CPU_CHUNK + 1) > 0


def test_one_shard_restores_the_thread_setting(monkeypatch):
    monkeypatch.setenv("MINILORA_NUM_THREADS", "2")
    with one_shard():
        assert len(ml.backend.batch_shards(8)) == 1
    assert len(ml.backend.batch_shards(8)) == 2
    monkeypatch.delenv("MINILORA_NUM_THREADS")
    with one_shard():
        pass
    assert "MINILORA_NUM_THREADS" not in os.environ


def test_count_model_refuses_a_gpu_model(tiny_cfg):
    model = ml.GPTModel(tiny_cfg)
    model.device = "cuda"  # what a CUDA model says; the count runs on the CPU
    with pytest.raises(ValueError, match="counted on the CPU"):
        count_model(model)


@pytest.fixture
def tiny_bench(monkeypatch):
    """`minilora bench --model gpt2-small` on bench_compare's tiny shape: the whole benchmark
    in seconds."""
    monkeypatch.setattr(ml.GPTConfig, "from_preset", classmethod(lambda cls, name: bench_config("tiny")))
    return ["bench", "--no-torch", "--no-generation", "--repeats", "1", "--batch-size", "2", "--seq", "6"]


def test_bench_prints_the_count_and_its_json_has_it(tiny_bench, capsys):
    want = step_op_count(bench_config("tiny"), batch=2, seq=6, rank=16)
    assert cli.main([*tiny_bench, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["op_count"]["total"] == want["total"]
    assert report["op_count"]["by_function"] == want["by_function"]
    assert cli.main(tiny_bench) == 0
    text = capsys.readouterr().out
    assert f"array operations per step: {want['total']:,}" in text
    for name in want["by_function"]:
        assert name in text, name


def test_bench_alternates_pytorch_with_the_step(tiny_bench, capsys, monkeypatch):
    """Where PyTorch is installed, its eager step takes a turn in every round (two warm-up
    steps, then one a round) on the bench's device, and step / torch is reported."""
    pytest.importorskip("torch")
    import minilora.bench_torch

    calls = []
    real = minilora.bench_torch.build_torch_step

    def counted(*args, **kwargs):
        step, info = real(*args, **kwargs)
        return (lambda: calls.append(1) or step()), info

    monkeypatch.setattr(minilora.bench_torch, "build_torch_step", counted)
    bench = [a for a in tiny_bench if a != "--no-torch"]
    assert cli.main([*bench, "--repeats", "3", "--no-ops", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(calls) == 2 + 3
    assert report["torch"]["torch_device"] == "cpu" and report["torch"]["torch_step_seconds"] > 0
    assert report["step_over_torch"] > 0


def test_bench_no_ops_skips_the_count(tiny_bench, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the step was counted")

    monkeypatch.setattr(minilora.bench, "step_op_count", refuse)
    assert cli.main([*tiny_bench, "--no-ops", "--json"]) == 0
    assert "op_count" not in json.loads(capsys.readouterr().out)


def test_bench_compare_refuses_no_ops(monkeypatch, capsys):
    monkeypatch.setattr(minilora.bench_compare, "run_compare", lambda *a, **k: pytest.fail("the comparison ran"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--compare", "--model", "tiny", "--no-ops"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "minilora bench: error: --no-ops cannot be used with --compare")
