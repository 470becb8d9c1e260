#!/usr/bin/env bash
# Acceptance runs of the training engine on Fashion-MNIST with the default recipe (small CNN,
# 8 epochs per run): dense + IMP (7 rounds), IMP-Refill after rounds 3 and 4, each with naive
# channel pruning at the same channel sparsity, IMP-Regroup at round 5, DSB (b = 16) and RigL at
# 80%, N:M 2:4.
# Runs share IMP's stages with --reuse; an interrupted script resumes where it stopped.
# Usage: scripts/acceptance-training.sh [WORKDIR]   (prints the summary table at the end)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-acceptance-training}"
mkdir -p "$work"
[ -n "${COARSEN:-}" ] || cargo build --release -p coarsen-cli --manifest-path "$root/Cargo.toml" >/dev/null 2>&1
c="${COARSEN:-${CARGO_TARGET_DIR:-$root/target}/release/coarsen}"

train() { # run directory, then train arguments
    local dir="$work/$1"; shift
    if [ -f "$dir/results.json" ]; then return; fi
    if [ -d "$dir/checkpoint" ] || [ -d "$dir/checkpoint.old" ]; then
        "$c" train --out "$dir" --resume -q "$@"
    else
        "$c" train --out "$dir" -q "$@"
    fi
}

channel_sparsity() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['channel_sparsity'])" "$1"; }

train imp --method imp --rounds 7
for r in 3 4; do
    train "imp-refill-r$r" --method imp-refill --rounds 7 --post-round "$r" --reuse "$work/imp"
    train "naive-channel-r$r" --method naive-channel --reuse "$work/imp" \
        --sparsity "$(channel_sparsity "$work/imp-refill-r$r/results.json")"
done
train imp-regroup --method imp-regroup --rounds 7 --post-round 5 --parts auto --reuse "$work/imp"
train dsb --method dsb --sparsity 0.8 --block 16
train rigl --method rigl --sparsity 0.8
train nm --method nm --reuse "$work/imp"

"$c" train --summary "$work/imp" "$work/imp-refill-r3" "$work/naive-channel-r3" \
    "$work/imp-refill-r4" "$work/naive-channel-r4" "$work/imp-regroup" "$work/dsb" "$work/rigl" \
    "$work/nm" --json "$work/summary.json"
