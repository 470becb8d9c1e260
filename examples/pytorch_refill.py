#!/usr/bin/env python3
"""One round of iterative magnitude pruning (IMP) in PyTorch with coarsen's Refill.

    pip install torch        # not needed by coarsen itself
    python pytorch_refill.py [--rounds 2] [--sparsity 0.5] [--to channel]

A small CNN on random data stands in for your model and loader. Each round: train, prune the
smallest weights globally (`coarsen.prune` on the state_dict, keeping what earlier rounds
removed), make the mask structured (`coarsen.convert`, Refill by default: whole output
channels), rewind the surviving weights to their early values and train again under the mask.
The last mask is written where `coarsen export --mask` and `coarsen inspect` read it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import coarsen

try:
    import torch
    from torch import nn
except ImportError:  # coarsen never needs torch; this example does
    sys.exit("this example needs PyTorch: pip install torch")


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


def train(net: nn.Module, masks: dict, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(64, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        apply(net, masks)


def apply(net: nn.Module, masks: dict) -> None:
    """Zeroes the pruned weights (coarsen's masks are uint8 arrays of the weight's shape)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in masks:
                p.mul_(torch.from_numpy(masks[name]).to(p.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.5, help="of what remains, per round")
    ap.add_argument("--to", default="channel", choices=coarsen.PATTERNS)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="pytorch-refill-masks.safetensors")
    args = ap.parse_args()

    torch.manual_seed(0)
    net = model()
    layers = r"^(0|3|7)\.weight$"  # the conv and linear weights
    train(net, {}, args.steps // 5, seed=0)
    rewind = {k: v.clone() for k, v in net.state_dict().items()}  # weight rewinding point
    masks = coarsen.Masks()
    for r in range(1, args.rounds + 1):
        train(net, masks, args.steps, seed=r)
        state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
        # Prune the given rate of what remains (the structured mask may have moved the density).
        remaining = masks.density() if masks else 1.0
        target = 1.0 - remaining * (1.0 - args.sparsity)
        pruned = coarsen.prune(state, target, mask=masks or None, include=layers)
        masks, report = coarsen.convert(state, pruned, to=args.to)
        print(f"round {r}: {args.to} masks, density {masks.density():.3f}")
        print(report)
        net.load_state_dict(rewind)
        apply(net, masks)
    coarsen.write_masks(args.out, masks)
    print(f"wrote {args.out}; try: coarsen inspect {args.out}")
    assert all(np.array_equal(m, m.astype(bool)) for m in masks.values())


if __name__ == "__main__":
    main()
