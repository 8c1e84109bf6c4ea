"""Run on a machine with an NVIDIA GPU: the test suite, the CUDA benchmark and an end-to-end
fine-tune on a tiny checkpoint, written to benchmarks/results/<gpu-name>.json.

    pip install -e ".[test,cuda12]"   # or cuda13
    python benchmarks/gpu_report.py

The JSON holds at least: device, gpu, tests (pytest's summary line), step_seconds (the
appendix E step shape), appendix_e_projected_seconds, and the whole bench report.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    import cupy

    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                           capture_output=True, text=True)
    summary = [ln for ln in tests.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    bench = subprocess.run([sys.executable, "-m", "minilora", "bench", "--device", "cuda", "--json", "--no-torch"],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(bench.stdout)
    with tempfile.TemporaryDirectory() as tmp:
        import minilora as ml
        from minilora.weights import save_pretrained

        cfg = ml.GPTConfig(vocab_size=50257, context_length=128, emb_dim=64, n_heads=4, n_layers=2)
        save_pretrained(ml.GPTModel(cfg, seed=0), Path(tmp) / "tiny")
        ft = subprocess.run([sys.executable, "-m", "minilora", "finetune", "--device", "cuda", "--model",
                             str(Path(tmp) / "tiny"), "--epochs", "1", "--output-dir", str(Path(tmp) / "run"),
                             "--offline"], cwd=ROOT, capture_output=True, text=True)
        finetune = json.loads((Path(tmp) / "run" / "metrics.json").read_text()) if ft.returncode == 0 else None
    out = {"device": "cuda", "gpu": gpu, "tests": summary[-1].strip("= ") if summary else tests.stdout[-500:],
           "tests_returncode": tests.returncode, "step_seconds": report["step_seconds"],
           "appendix_e_projected_seconds": report["appendix_e_projected_seconds"],
           "finetune_tiny_cuda": finetune, "finetune_returncode": ft.returncode, "bench": report}
    path = ROOT / "benchmarks" / "results" / (re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower() + ".json")
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("gpu", "tests", "step_seconds", "appendix_e_projected_seconds")}, indent=2))


if __name__ == "__main__":
    main()
