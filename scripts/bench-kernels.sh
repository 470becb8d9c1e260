#!/usr/bin/env bash
# Kernel figures against the targets of the kernels issue: `coarsen bench` on the default shape
# table at densities 0.25 and 0.5 (2 threads), then a summary per format read from its JSON.
# Usage: scripts/bench-kernels.sh [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
cargo build --release -p coarsen-cli --manifest-path "$root/Cargo.toml" >/dev/null 2>&1
c="${CARGO_TARGET_DIR:-$root/target}/release/coarsen"

"$c" bench --threads 2 --density 0.25 --json "$work/d025.json" -q > "$work/d025.txt"
"$c" bench --threads 2 --density 0.5 \
    --formats group:32,shuffled-block:16,shuffled-block:32,bsr:16x16,bsr:32x32,channel,nm:2:4 \
    --json "$work/d050.json" -q > "$work/d050.txt"

python3 - "$work" <<'EOF'
import json, statistics, sys
work = sys.argv[1]
rows = {d: json.load(open(f"{work}/{d}.json")) for d in ["d025", "d050"]}
peak = rows["d025"][0]["peak_gflops"]
isa = rows["d025"][0]["isa"]
print(f"isa {isa}, 2 threads, measured FMA peak {peak:.1f} GFLOP/s\n")
# Large shapes: at least 1M weights (the layer3/layer4 convs and the MLPs).
large = lambda r: r["shape"][0] * r["shape"][1] >= 1 << 20
print("| format | density | target | median speedup (all 16 shapes) | median of ideal | median speedup (shapes ≥ 1M weights) | best |")
print("|---|---|---|---|---|---|---|")
targets = {
    ("group:32", "d025"): "≥ 3.0×", ("shuffled-block:16", "d025"): "≥ 3.0×", ("shuffled-block:32", "d025"): "≥ 3.0×",
    ("bsr:16x16", "d025"): "≥ 3.0×", ("bsr:32x32", "d025"): "≥ 3.0×", ("csr", "d025"): "reported",
    ("group:32", "d050"): "≥ 1.7×", ("shuffled-block:16", "d050"): "≥ 1.7×", ("shuffled-block:32", "d050"): "≥ 1.7×",
    ("bsr:16x16", "d050"): "reported", ("bsr:32x32", "d050"): "reported", ("channel", "d050"): "≥ 1.85×",
    ("nm:2:4", "d050"): "≥ 1.3×", ("channel", "d025"): "reported", ("nm:2:4", "d025"): "(2:4 is 0.5)",
}
for d in ["d025", "d050"]:
    fmts = sorted({r["format"] for r in rows[d]})
    for f in fmts:
        rs = [r for r in rows[d] if r["format"] == f]
        big = [r for r in rs if large(r)]
        med = statistics.median(r["speedup"] for r in rs)
        frac = statistics.median(r["fraction_of_ideal"] for r in rs)
        medbig = statistics.median(r["speedup"] for r in big) if big else float("nan")
        best = max(rs, key=lambda r: r["speedup"])
        dens = statistics.median(r["density"] for r in rs)
        print(f"| {f} | {dens:.2f} | {targets.get((f, d), '-')} | {med:.2f}× | {frac:.2f} | {medbig:.2f}× | "
              f"{best['speedup']:.2f}× ({best['label']}) |")
# The dense baseline is timed beside every record; per shape, take the median of its timings.
shapes = {}
for r in rows["d025"] + rows["d050"]:
    shapes.setdefault(tuple(r["shape"]), []).append(r["dense_gflops"])
per_shape = {s: statistics.median(v) for s, v in shapes.items()}
big = [g for s, g in per_shape.items() if s[0] * s[1] >= 1 << 20]
print(f"\ndense baseline (faer, threading tuned per shape): median {statistics.median(per_shape.values()):.1f} GFLOP/s "
      f"({100*statistics.median(per_shape.values())/peak:.0f}% of peak) over all shapes; "
      f"{statistics.median(big):.1f} GFLOP/s ({100*statistics.median(big)/peak:.0f}% of peak) on shapes ≥ 1M weights, "
      f"best {max(per_shape.values()):.1f} ({100*max(per_shape.values())/peak:.0f}%)")
EOF
