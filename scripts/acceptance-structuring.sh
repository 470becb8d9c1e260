#!/usr/bin/env bash
# Acceptance figures of the structuring engine on a CIFAR ResNet-18 (11M weights) with a random
# 80%-sparse global magnitude mask over its conv layers. Every figure printed here is read from
# coarsen's own JSON reports. Usage: scripts/acceptance-structuring.sh [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
cargo build --release -p coarsen-cli --manifest-path "$root/Cargo.toml" >/dev/null 2>&1
c="${CARGO_TARGET_DIR:-$root/target}/release/coarsen"
cd "$work"

"$c" synth --model resnet18 --seed 0 --out w.safetensors >/dev/null 2>&1
"$c" prune --weights w.safetensors --sparsity 0.8 --exclude '^fc\.' --out m.safetensors -q >/dev/null 2>&1

convert() { # label, then convert arguments; records wall seconds in $label.time
    local label=$1; shift
    local t0 t1
    t0=$(date +%s.%N)
    "$c" convert --weights w.safetensors --mask m.safetensors --out "$label.safetensors" \
        --report "$label.json" -q "$@" >/dev/null 2>&1
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc > "$label.time"
    "$c" inspect "$label.safetensors" -q > "$label.inspect"
}

convert channel --to channel
convert channel+ --to channel+
convert group --to group
convert group-random --to group --partitioner random
convert group-auto --to group --parts auto
convert shuffled-block --to shuffled-block
convert block --to block
convert nm --to nm
convert nm-permute --to nm --permute

python3 - <<'EOF'
import json
load = lambda k: json.load(open(f"{k}.json"))
secs = lambda k: float(open(f"{k}.time").read())
print("## Pattern properties and time (release build, whole file end to end)\n")
print("| pattern | layers structured | property check | density in → out | recall | wall time (s) |")
print("|---|---|---|---|---|---|")
for k in ["channel", "channel+", "group", "group-auto", "shuffled-block", "block", "nm", "nm-permute"]:
    r = load(k)["total"]
    lines = [l for l in open(f"{k}.inspect") if ".weight" in l]
    ok = sum(l.rstrip().endswith(" ok") for l in lines)
    bad = sum("VIOLATED" in l for l in lines)
    print(f"| {k} | {r['structured']}/{r['layers']} | {ok} ok, {bad} violated | "
          f"{r['density_in']:.4f} → {r['density_out']:.4f} | {r['recall']:.3f} | {secs(k):.2f} |")

print("\n## N:M 2:4: retained magnitude without / with --permute, per layer\n")
worse, gains = 0, []
for l in load("nm-permute")["layers"]:
    u = l["stats"]["retained_magnitude_unpermuted"]; p = l["retained_magnitude"]
    worse += p < u; gains.append(p - u)
    note = l["stats"].get("permute_skipped", "")
    print(f"- {l['name']}: {u:.4f} → {p:.4f} {('(' + note + ')') if note else ''}")
print(f"\nlayers with less magnitude after permutation: {worse}; mean gain {sum(gains)/len(gains):+.4f}")

print("\n## Regroup: METIS vs a random balanced partition (same rule)\n")
m, r = load("group")["layers"], load("group-random")["layers"]
both = [(a, b) for a, b in zip(m, r) if a["status"] == b["status"] == "structured"]
def agg(ls):
    w = sum(l["rows"] * l["cols"] for l in ls); i = sum(l["nnz_in"] for l in ls)
    o = sum(l["nnz_out"] for l in ls); k = sum(l["recall"] * l["nnz_in"] for l in ls)
    return o / w, k / i
dm, rm = agg([a for a, _ in both]); dr, rr = agg([b for _, b in both])
print(f"layers structured by both: {len(both)} ({sum(a['rows']*a['cols'] for a,_ in both)} weights)")
print(f"- METIS : density {dm:.4f}, recall {rm:.4f}")
print(f"- random: density {dr:.4f}, recall {rr:.4f}")
higher = sum(a["recall"] > b["recall"] for a, b in both)
notdenser = sum(a["density_out"] <= b["density_out"] for a, b in both)
print(f"- per layer: METIS recall higher on {higher}/{len(both)}, density not higher on {notdenser}/{len(both)}")
for a, b in both:
    print(f"  - {a['name']}: METIS d {a['density_out']:.4f} r {a['recall']:.4f} | random d {b['density_out']:.4f} r {b['recall']:.4f}")
only = [a["name"] for a, b in zip(m, r) if a["status"] == "structured" and b["status"] != "structured"]
print(f"- structured by METIS only: {len(only)} layers ({', '.join(only)})")

print("\n## Regroup --parts auto vs 8 parts\n")
for k in ["group", "group-auto"]:
    t = load(k)["total"]
    print(f"- {k}: {t['structured']}/{t['layers']} layers structured, density {t['density_out']:.4f}, "
          f"recall {t['recall']:.4f}, retained magnitude {t['retained_magnitude']:.4f}")
EOF
