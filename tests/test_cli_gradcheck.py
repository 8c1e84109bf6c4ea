"""`minilora gradcheck`: the table, the JSON contract, and the exit status."""

import json
import subprocess
import sys


from minilora import cli, layers

REQUIRED = {"embedding", "linear", "layernorm", "gelu", "attention", "cross_entropy",
            "lora_linear", "gpt2", "gpt2_lora"}


def test_gradcheck_json_as_a_user_runs_it():
    """A separate process, offline, exactly the documented contract."""
    out = subprocess.run([sys.executable, "-m", "minilora", "gradcheck", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["passed"] is True
    names = {c["name"] for c in report["checks"]}
    assert REQUIRED <= names
    for c in report["checks"]:
        assert set(c) >= {"name", "max_rel_error", "passed"} and c["passed"]
        assert c["max_rel_error"] < 1e-6


def test_gradcheck_table(capsys):
    assert cli.main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "gpt2_lora" in out and "checks passed" in out and "FAIL" not in out


def test_gradcheck_exits_1_when_a_backward_is_broken(monkeypatch, capsys):
    def broken_gelu_backward(dout, cache):
        x, t = cache
        return (dout * 0.5 * (1.0 + t),)  # dropped: the x * sech^2 term

    monkeypatch.setattr(layers, "gelu_backward", broken_gelu_backward)
    import minilora.gradcheck as gc
    import minilora.model as model_mod

    monkeypatch.setattr(gc.PROJECT_LAYERS, "gelu_backward", broken_gelu_backward)
    monkeypatch.setattr(model_mod, "gelu_backward", broken_gelu_backward)
    assert cli.main(["gradcheck", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    failed = {name for name, c in checks.items() if not c["passed"]}
    assert report["passed"] is False and {"gelu", "gpt2"} <= failed
    # each failure names its worst entry: the input (or parameter) name, index and both values
    worst = checks["gelu"]["worst"]
    assert worst["input"] == "x" and len(worst["index"]) == 3
    assert abs(worst["analytic"] - worst["numeric"]) > 1e-3
    worst = checks["gpt2"]["worst"]
    assert worst["input"] in checks["gpt2"]["errors"] and worst["input"].startswith("h.")  # a block parameter
    assert abs(worst["analytic"] - worst["numeric"]) > 1e-6

    assert cli.main(["gradcheck", "--only", "gelu"]) == 1
    out = capsys.readouterr().out
    i = ", ".join(map(str, checks["gelu"]["worst"]["index"]))
    assert f"gelu: worst entry x[{i}]: analytic " in out and "numeric " in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "gradcheck" in capsys.readouterr().out
