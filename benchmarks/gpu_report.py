"""Run on a machine with an NVIDIA GPU: the test suite, the CUDA benchmark (PyTorch eager
alternated with the step where PyTorch has CUDA) and an end-to-end fine-tune on a tiny
checkpoint, written to <out>/<gpu-name>.json (default benchmarks/results).

    pip install -e ".[test,cuda12]"   # or cuda13
    python benchmarks/gpu_report.py [--out DIR]

On the device tool's machine, benchmarks/device_check.sh runs this with the data carried.
Each part has a time limit (a device session has 15 minutes in all), and the report is
written whatever fails: it holds device, gpu, tests (pytest's summary line, its skips and
slowest tests, the tail of its output on failure), step_seconds, matmul floor, step / floor,
dispatch step, step / torch, appendix_e_projected_seconds and the whole bench report.
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"tests": 330, "bench": 200, "finetune": 90}  # seconds: the sum fits one 10-minute device call


def run(part, cmd):
    """(returncode, stdout, stderr) of cmd; returncode None past the part's time limit."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=LIMITS[part])
        return done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return None, text(e.stdout), text(e.stderr) + f"\n[{part} stopped after {LIMITS[part]} s]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script where there is no GPU")
    ap.add_argument("--pytest-args", default="", help="more pytest arguments, e.g. '-k gpu' for a quick run")
    args = ap.parse_args()
    if args.device == "cuda":
        import cupy

        gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        out = {"device": "cuda", "gpu": gpu, "cupy": cupy.__version__}
    else:
        gpu, out = "cpu", {"device": "cpu", "gpu": None}
    rc, text, err = run("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                                  "--durations=10", *shlex.split(args.pytest_args)])
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    out.update(tests=summary[-1].strip("= ") if summary else None, tests_returncode=rc,
               tests_skipped=[ln for ln in text.splitlines() if ln.startswith("SKIPPED")],
               tests_slowest=[ln for ln in text.splitlines() if re.match(r"\d+\.\d+s (call|setup)", ln)])
    if rc != 0:
        out["tests_output_tail"] = (text + err)[-4000:]
    rc, text, err = run("bench", [sys.executable, "-m", "minilora", "bench", "--device", args.device, "--json"])
    out["bench_returncode"] = rc
    if rc == 0:
        bench = json.loads(text)
        keys = ("step_seconds", "matmul_floor_seconds", "step_over_floor", "dispatch_step_seconds",
                "eval_batch_seconds", "step_over_torch", "appendix_e_projected_seconds", "step_peak_bytes")
        out.update({k: bench.get(k) for k in keys}, torch=bench.get("torch"),
                   op_count_total=(bench.get("op_count") or {}).get("total"), bench=bench)
    else:
        out["bench_output_tail"] = (text + err)[-4000:]
    with tempfile.TemporaryDirectory() as tmp:
        import minilora as ml
        from minilora.weights import save_pretrained

        cfg = ml.GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2)
        save_pretrained(ml.GPTModel(cfg, seed=0), Path(tmp) / "tiny")
        rc, text, err = run("finetune", [sys.executable, "-m", "minilora", "finetune", "--device", args.device,
                                         "--model", str(Path(tmp) / "tiny"), "--epochs", "1",
                                         "--output-dir", str(Path(tmp) / "run"), "--offline"])
        out["finetune_returncode"] = rc
        metrics = Path(tmp) / "run" / "metrics.json"
        out["finetune_tiny"] = json.loads(metrics.read_text()) if rc == 0 and metrics.exists() else (text + err)[-2000:]
    path = Path(args.out) / (re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower() + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("bench", "finetune_tiny")}, indent=2))


if __name__ == "__main__":
    main()
