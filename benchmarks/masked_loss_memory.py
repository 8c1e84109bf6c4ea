"""Peak memory of the masked token loss (forward + backward) against the plain pair, in
multiples of the logits: does masked_cross_entropy hold only one logits-sized array?

    python benchmarks/masked_loss_memory.py [--batch 8] [--time 256] [--vocab 50257] [--json]

Measured with tracemalloc, which sees NumPy's array buffers: the peak counts what the pair
allocates, not the logits, which exist before it starts. The masked pair writes softmax
into its one [N, V] buffer and turns that buffer into dlogits in place, so its peak should
be about 1x the logits; the plain pair keeps exp(z - max) and probs in the forward and a
copy for dlogits in the backward (about 3x). NumPy only (tracemalloc does not see a GPU).
"""

import argparse
import json
import tracemalloc

import numpy as np

from minilora.layers import (cross_entropy_backward, cross_entropy_forward, masked_cross_entropy_backward,
                             masked_cross_entropy_forward)

IGNORE = -100


def peak_bytes(step):
    """The largest traced allocation total while step() runs, the result freed after."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    B, T, V = args.batch, args.time, args.vocab
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((B, T, V), dtype=np.float32)  # [B, T, V], the training dtype
    targets = rng.integers(0, V, (B, T))  # [B, T]
    targets[:, (3 * T) // 4:] = IGNORE  # a quarter of each row is padding

    def masked():
        _, cache = masked_cross_entropy_forward(logits, targets)
        masked_cross_entropy_backward(1.0, cache)

    def plain():  # every row counted: the plain pair has no mask
        _, cache = cross_entropy_forward(logits.reshape(-1, V), targets.reshape(-1).clip(0))
        cross_entropy_backward(1.0, cache)

    size = logits.nbytes
    rows = [{"pair": name, "peak_bytes": peak_bytes(step), "logits_bytes": size}
            for name, step in (("masked_cross_entropy", masked), ("cross_entropy", plain))]
    if args.json:
        print(json.dumps({"shape": [B, T, V], "dtype": "float32", "rows": rows}, indent=2))
        return
    print(f"logits [{B}, {T}, {V}] float32: {size / 2**20:.0f} MiB; peak allocated by forward + backward:")
    for r in rows:
        print(f"  {r['pair']:<22}{r['peak_bytes'] / 2**20:>8.0f} MiB  = {r['peak_bytes'] / size:.3f}x the logits")


if __name__ == "__main__":
    main()
