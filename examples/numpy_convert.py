#!/usr/bin/env python3
"""coarsen on NumPy alone: prune a small network's weights, turn the mask into every structure,
see what each keeps, and run one layer on the packed kernels.

    python numpy_convert.py [--out DIR] [--sparsity 0.8]

Writes DIR/<pattern>.safetensors (masks that `coarsen inspect` and `coarsen export --mask`
read) and prints, per pattern, the density and the share of the weights' magnitude kept.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import coarsen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("coarsen-numpy-example"))
    ap.add_argument("--sparsity", type=float, default=0.8)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # A small CNN's weights in PyTorch's layout (stand-ins for a trained model's state_dict).
    rng = np.random.default_rng(0)
    weights = {
        "conv1.weight": rng.standard_normal((64, 32, 3, 3), dtype=np.float32),
        "conv2.weight": rng.standard_normal((128, 64, 3, 3), dtype=np.float32),
        "fc.weight": rng.standard_normal((10, 512), dtype=np.float32),
    }
    masks = coarsen.prune(weights, args.sparsity)
    print(f"magnitude mask: density {masks.density():.3f}")

    print(f"{'pattern':<16}{'density':>9}{'magnitude kept':>16}  layers structured")
    for to, options in [
        ("channel", {}),
        ("channel+", {}),
        ("group", {"parts": "auto"}),
        ("shuffled-block", {"block": 16}),
        ("block", {"block": 8}),
        ("nm", {"n": 2, "m": 4}),
    ]:
        structured, report = coarsen.convert(weights, masks, to=to, **options)
        coarsen.check(structured)  # every structured layer has the structure
        coarsen.write_masks(args.out / f"{to}.safetensors", structured)
        total = report["total"]
        kept = total.get("retained_magnitude")
        print(f"{to:<16}{total['density_out']:>9.3f}{kept:>16.3f}  {total['structured']} of {total['layers']}")

    # One layer on the packed kernels, against NumPy's dense product of the same weights.
    structured, _ = coarsen.convert(weights, masks, to="channel")
    w, m = weights["conv2.weight"], structured["conv2.weight"]
    packed = coarsen.pack(w, m)
    x = rng.standard_normal((packed.shape[1], 256), dtype=np.float32)
    dense = (w * m).reshape(packed.shape)
    def best_ms(f, reps=5):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return 1e3 * min(times)

    y, ref = packed.matmul(x), dense @ x
    err = float(np.abs(y - ref).max())
    ours, theirs = best_ms(lambda: packed.matmul(x)), best_ms(lambda: dense @ x)
    print(f"{packed}: max |packed - numpy| = {err:.2e}")
    print(f"best of 5: packed {ours:.2f} ms, numpy's dense product {theirs:.2f} ms (density {packed.density:.2f})")
    assert err < 1e-3


if __name__ == "__main__":
    main()
