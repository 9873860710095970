"""Training speed of our DeiT (distill/models/deit.py) against timm's VisionTransformerDistilled, on CPU.

One training step = forward in train mode (both heads), loss = mean of the cross-entropies of the class and
distillation heads on random labels, backward, AdamW step. Both models get the same architecture, batch,
drop-path rate, thread count and random weights (ours loads timm's state dict). The sides are interleaved
over several rounds (A B, then B A, ...) so that drift in machine load hits both alike; the reported rate is
the median over rounds.

Usage:
    python bench/model_speed.py [--preset deit_tiny --img-size 224 --batch 32 --steps 10 --warmup 3 --rounds 3]
    python bench/model_speed.py --quick    # a small preset, a few seconds

Requires timm (a dev dependency); never downloads weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill.models.deit import build_deit, count_parameters  # noqa: E402
from distill.models.deit_config import PRESETS  # noqa: E402


def build_timm(preset: str, *, img_size: int, num_classes: int, drop_path_rate: float) -> nn.Module:
    """timm's VisionTransformerDistilled with the architecture of one of our presets."""
    from timm.models.deit import VisionTransformerDistilled

    cfg = PRESETS[preset]
    model = VisionTransformerDistilled(
        img_size=img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=num_classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        drop_path_rate=drop_path_rate,
    )
    model.set_distilled_training(True)  # else timm averages the heads in train mode too
    return model


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> None:
        cls_logits, dist_logits = model(x)
        loss = (F.cross_entropy(cls_logits, y) + F.cross_entropy(dist_logits, y)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step, steps: int) -> float:
    """Steps per second over ``steps`` consecutive steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="deit_tiny", choices=sorted(PRESETS))
    parser.add_argument("--img-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (interleaved)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--drop-path-rate", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true", help="deit_mini at 32 px, batch 64, few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.img_size, args.batch = "deit_mini", 32, 64
        args.steps, args.warmup, args.num_classes = 5, 2, 10

    import timm

    torch.set_num_threads(args.threads)
    img_size = args.img_size or PRESETS[args.preset].img_size
    torch.manual_seed(0)
    reference = build_timm(
        args.preset, img_size=img_size, num_classes=args.num_classes, drop_path_rate=args.drop_path_rate
    ).train()
    ours = build_deit(
        args.preset, img_size=img_size, num_classes=args.num_classes, drop_path_rate=args.drop_path_rate
    ).train()
    ours.load_state_dict(reference.state_dict(), strict=True)  # same weights: same work on both sides
    x = torch.randn(args.batch, 3, img_size, img_size)
    y = torch.randint(0, args.num_classes, (args.batch,))
    sides = {"ours": make_step(ours, x, y), "timm": make_step(reference, x, y)}

    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"cpu_count={os.cpu_count()} | torch.get_num_threads={torch.get_num_threads()}")
    print(f"python {platform.python_version()} | torch {torch.__version__} | timm {timm.__version__}")
    print(f"model: {args.preset} img={img_size} params={count_parameters(ours):,} batch={args.batch} "
          f"drop_path={args.drop_path_rate} | {args.rounds} rounds x {args.steps} steps per side, "
          f"{args.warmup} warm-up steps | step = fwd + bwd (CE on both heads, averaged) + AdamW")

    for step in sides.values():
        for _ in range(args.warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # ABBA: neither side always goes first
        for name in order:
            rates[name].append(timed(sides[name], args.steps))

    print()
    print(f"{'model':<6} {'median steps/s':>15} {'min':>8} {'max':>8} {'img/s':>9}   per round")
    for name, values in rates.items():
        med = statistics.median(values)
        per_round = " ".join(f"{v:.3f}" for v in values)
        spread = f"{min(values):>8.3f} {max(values):>8.3f}"
        print(f"{name:<6} {med:>15.3f} {spread} {med * args.batch:>9.1f}   {per_round}")
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["timm"])
    print(f"\nratio ours/timm (median steps/s): {ratio:.3f}x")


if __name__ == "__main__":
    main()
