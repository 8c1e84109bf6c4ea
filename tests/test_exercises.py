"""The exercise checker: `minilora gradcheck --module examples/exercises/layers.py` says
not implemented for the stubs as shipped, passed when they are filled with the solutions
file's backwards, and failed (naming the worst entry) for a broken one. What it says beyond that
(needs, parts, factors, invariants, one-line exceptions) is in test_checker_hints.py."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from minilora import cli, gradcheck

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ROOT / "examples" / "exercises" / "layers.py"
LAYERS = ["embedding", "linear", "layernorm", "gelu", "dropout", "attention", "attention_dropout",
          "attention_one_query", "cross_entropy", "masked_cross_entropy", "lora_linear"]


def solution_backwards():
    """The backwards of examples/exercises/solutions/layers.py, as source to append to the
    exercise file (whose forwards then stay the ones run, each backward replacing its stub).
    minilora/layers.py's own backwards would not drop in: its forwards keep other caches (n
    for layernorm, q for GELU, a pre-scaled q for attention, s xa for LoRA)."""
    source = (ROOT / "examples" / "exercises" / "solutions" / "layers.py").read_text()
    return "\n" + "\n\n".join(ast.get_source_segment(source, node) for node in ast.parse(source).body
                              if isinstance(node, ast.FunctionDef) and node.name.endswith("_backward")) + "\n"


SOLUTIONS = solution_backwards()
BROKEN_LAYERNORM = """
def layernorm_backward(dout, cache):
    x, w, mean, rstd = cache
    n = (x - mean) * rstd
    dn = dout * w
    dx = rstd * (dn - dn.mean(axis=-1, keepdims=True))  # dropped: - n * mean(dn * n)
    C = x.shape[-1]
    return dx, (dout * n).reshape(-1, C).sum(0), dout.reshape(-1, C).sum(0)
"""


def run_checker(capsys, path, *extra):
    status = cli.main(["gradcheck", "--module", str(path), "--json", *extra])
    report = json.loads(capsys.readouterr().out)
    return status, {c["name"]: c for c in report["checks"]}


def test_the_stubs_as_shipped_are_all_not_implemented(capsys):
    status, checks = run_checker(capsys, EXERCISES)
    assert status == 1
    assert list(checks) == LAYERS  # the layer checks only: the model checks test minilora's model
    # each layer's own stub raises first, so none is reported as waiting for another ("needs")
    assert all(c["status"] == "not implemented" and not c["passed"] and c["needs"] is None
               for c in checks.values()), checks


def test_the_stubs_filled_with_the_solutions_all_pass(capsys, tmp_path):
    solved = tmp_path / "solved.py"
    solved.write_text(EXERCISES.read_text() + SOLUTIONS)
    status, checks = run_checker(capsys, solved)
    assert status == 0
    assert list(checks) == LAYERS
    for c in checks.values():
        assert c["status"] == "passed" and c["max_rel_error"] < 1e-7, c


def test_one_broken_solution_fails_alone_and_names_its_worst_entry(capsys, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text(EXERCISES.read_text() + SOLUTIONS + BROKEN_LAYERNORM)
    status, checks = run_checker(capsys, broken)
    assert status == 1
    assert {n for n, c in checks.items() if not c["passed"]} == {"layernorm"}
    ln = checks["layernorm"]
    assert ln["status"] == "failed" and ln["max_rel_error"] > 1e-3
    assert ln["errors"]["b"] < 1e-7 and ln["errors"]["x"] > 1e-3  # the wrong one is dx
    worst = ln["worst"]
    assert worst["input"] == "x" and len(worst["index"]) == 3
    assert abs(worst["analytic"] - worst["numeric"]) > 1e-3

    # the table a learner reads names the same entry with both values
    assert cli.main(["gradcheck", "--module", str(broken), "--only", "layernorm"]) == 1
    out = capsys.readouterr().out
    i = ", ".join(map(str, worst["index"]))
    assert f"layernorm: worst entry x[{i}]: analytic {worst['analytic']:.6e}, numeric {worst['numeric']:.6e}" in out


def test_only_runs_the_named_layers_and_their_variants(capsys, tmp_path):
    solved = tmp_path / "solved.py"
    solved.write_text(EXERCISES.read_text() + SOLUTIONS)
    status, checks = run_checker(capsys, solved, "--only", "gelu,attention", "--only", "linear")
    assert status == 0
    assert list(checks) == ["linear", "gelu", "attention", "attention_dropout", "attention_one_query"]


def test_a_missing_function_is_not_implemented_and_an_exception_is_a_failure(capsys, tmp_path):
    partial = tmp_path / "partial.py"
    partial.write_text("from minilora.layers import linear_forward, gelu_forward\n"
                       "def linear_backward(dout, cache):\n"
                       "    return dout @ cache[1]  # wrong shape: dx needs w^T\n")
    status, checks = run_checker(capsys, partial, "--only", "linear,gelu")
    assert status == 1
    assert checks["gelu"]["status"] == "not implemented"
    # the learner's exception is one line: the function, its arguments' shapes, file:line and source
    assert checks["linear"]["status"] == "failed"
    assert checks["linear"]["problem"].startswith(
        'linear_backward(dout (2, 5, 3), cache [(2, 5, 7), (7, 3)]) raised ValueError at partial.py:3 '
        '"return dout @ cache[1]  # wrong shape: dx needs w^T": matmul: '), checks["linear"]["problem"]


def test_the_learners_functions_are_the_ones_checked():
    """The checker calls the module's own functions, not minilora's."""
    module = gradcheck.load_layers(EXERCISES)
    calls = []

    def linear_backward(dout, cache):
        calls.append(dout.shape)
        x, w = cache
        return dout @ w.T, np.einsum("btk,bto->ko", x, dout), dout.sum(axis=(0, 1))

    module.linear_backward = linear_backward
    (r,) = gradcheck.run_gradchecks(only=["linear"], fns=module)
    assert r.passed and calls == [(2, 5, 3)]


def test_unknown_check_name_is_a_clear_error(capsys):
    assert cli.main(["gradcheck", "--only", "layernrom"]) == 1
    err = capsys.readouterr().err
    assert "unknown check 'layernrom'" in err and "layernorm" in err and "gpt2_lora" in err


def test_a_missing_module_file_is_a_clear_error(capsys, tmp_path):
    assert cli.main(["gradcheck", "--module", str(tmp_path / "nope.py")]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gelu", "gpt2"])
def test_only_works_for_layer_and_model_checks(name):
    results = gradcheck.run_gradchecks(only=[name])
    assert [r.name for r in results][0] == name and all(r.passed for r in results)


def test_a_file_that_does_not_load_is_one_clear_line(tmp_path):
    """A learner's most likely mistake: a syntax error, or an import that fails."""
    import subprocess
    import sys

    for name, text in (("typo.py", "def layernorm_backward(dout, cache)\n    pass\n"),
                       ("imports.py", "import no_such_module\n")):
        (tmp_path / name).write_text(text)
        out = subprocess.run([sys.executable, "-m", "minilora", "gradcheck", "--module", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert f"cannot load {tmp_path / name}" in out.stderr, out.stderr
