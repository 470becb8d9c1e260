#!/usr/bin/env python3
"""The cost of calling the packed kernels from Python: `PackedMatrix.matmul` against the same
product timed inside Rust (`Plan::forward` on the same plan and operand, one preallocated
output, no Python in the loop), interleaved in one process so that both see the same machine.

    python bench/matmul_overhead.py [--rows 512 --cols 4608 --n 1024] [--rounds 30] [--json F]

Prints, per format, the median milliseconds of: Rust; Python `matmul(x)` (a new output array
each call); Python `matmul(x, out=y)` (no allocation); for the channel format also
`matmul(x, out=y, compact=True)` (the kept rows, as Rust computes them); and each Python
figure over Rust's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import coarsen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=4608)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--formats", default="dense,channel,group")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    x = rng.standard_normal((args.cols, args.n), dtype=np.float32)
    results = []
    for fmt in args.formats.split(","):
        if fmt == "dense":
            mask = np.ones_like(w, dtype=np.uint8)
        else:
            pruned = coarsen.prune({"w": w}, 1.0 - args.density)
            mask = coarsen.convert({"w": w}, pruned, to=fmt)[0]["w"]
        p = coarsen.pack(w, mask, fmt)
        y = np.empty((args.rows, args.n), np.float32)
        p.matmul(x, out=y)  # warm-up: first touch of every buffer
        p._time_forward(x, 2)
        # A channel matrix's kernel computes its kept rows only; Rust times that product.
        # Python gives the full W @ x by default (removed rows zero) and, with compact=True,
        # the same kept rows as Rust.
        compact = p.format == "channel"
        yc = np.empty((len(p.kept_rows), args.n), np.float32) if compact else None
        rust, alloc, into, comp = [], [], [], []
        for _ in range(args.rounds):
            rust.extend(p._time_forward(x, 1))
            t = time.perf_counter()
            p.matmul(x)
            alloc.append(time.perf_counter() - t)
            t = time.perf_counter()
            p.matmul(x, out=y)
            into.append(time.perf_counter() - t)
            if compact:
                t = time.perf_counter()
                p.matmul(x, out=yc, compact=True)
                comp.append(time.perf_counter() - t)
        r, a, o = (1e3 * statistics.median(v) for v in (rust, alloc, into))
        c = 1e3 * statistics.median(comp) if comp else None
        results.append({
            "format": p.format, "shape": [args.rows, args.cols, args.n], "density": p.density,
            "rust_ms": r, "python_ms": a, "python_out_ms": o,
            "python_over_rust": a / r, "python_out_over_rust": o / r, "isa": p.isa,
            "python_compact_out_ms": c, "python_compact_out_over_rust": None if c is None else c / r,
            "rounds": args.rounds,
        })
    print(f"{'format':<10}{'density':>8}{'rust ms':>10}{'py ms':>10}{'py out= ms':>12}"
          f"{'py/rust':>9}{'out=/rust':>11}{'compact/rust':>14}")
    for e in results:
        cr = e["python_compact_out_over_rust"]
        print(f"{e['format']:<10}{e['density']:>8.3f}{e['rust_ms']:>10.2f}{e['python_ms']:>10.2f}"
              f"{e['python_out_ms']:>12.2f}{e['python_over_rust']:>9.3f}{e['python_out_over_rust']:>11.3f}"
              f"{'-' if cr is None else f'{cr:.3f}':>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
