"""CPU speed of the deployed student: PyTorch fp32 against onnxruntime fp32 and int8, in one interleaved run.

A DeiT of a preset (default ``deit_tiny`` at 224 px, 3 channels, 1000 classes: the size people deploy) with random
weights is wrapped as the export stage wraps the student (:class:`distill.export.DeployedStudent`: raw uint8
images in, probabilities out), exported to ONNX and quantised to int8 exactly as the stage does
(:func:`distill.export.export_onnx`, :func:`distill.export.quantize_int8`). Then :func:`distill.export.latency`
times the three sides in interleaved rounds (the order reversed every other round) at each thread count asked
for: batch-1 latency and batch throughput, with the ratios computed within each round. The CPU's name and its int8
instructions (VNNI, AMX) are printed and saved, since the int8 gain depends on them, with the load average.

Random weights make the speed figures and the fp32 parity meaningful; the int8 accuracy cost is measured on the
trained default student by the export stage (``metrics/export.json``), not here.

Usage:
    python bench/export_speed.py                                  # deit_tiny, 224 px, threads 1 and 2
    python bench/export_speed.py --threads 2 --rounds 7 --out bench/results/export_speed.json
    python bench/export_speed.py --quick                          # deit_nano at 16 px: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill import export as X  # noqa: E402
from distill.models.deit import build_deit, count_parameters  # noqa: E402

GOAL = 1.5  # int8 batch-1 throughput over PyTorch fp32's


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="deit_tiny")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, each its own run")
    ap.add_argument("--batch", type=int, default=64, help="the throughput batch")
    ap.add_argument("--iters", type=int, default=3, help="timed calls per side, round and measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--quick", action="store_true", help="deit_nano at 16 px, 10 classes, 2 rounds")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.img_size, args.classes, args.rounds, args.iters = "deit_nano", 16, 10, 2, 3
    return args


def build(args: argparse.Namespace, folder: Path) -> tuple[X.DeployedStudent, dict[str, Path], dict[str, Any]]:
    """The wrapped random-weight student, its fp32 and int8 ONNX files, and what they are."""
    torch.manual_seed(0)
    model = build_deit(args.preset, img_size=args.img_size, in_chans=3, num_classes=args.classes, drop_path_rate=0.0)
    student = X.DeployedStudent(model, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    files = {"onnxruntime_fp32": folder / "fp32.onnx", "onnxruntime_int8": folder / "int8.onnx"}
    X.export_onnx(student, files["onnxruntime_fp32"], image_size=args.img_size, channels=3, opset=args.opset)
    X.quantize_int8(files["onnxruntime_fp32"], files["onnxruntime_int8"])
    x = np.random.default_rng(1).integers(0, 256, (8, args.img_size, args.img_size, 3), dtype=np.uint8)
    with torch.inference_mode():
        ref = student(torch.from_numpy(x)).numpy()
    parity = {side: X.compare(ref, X.onnx_probabilities(X.session(path), x)) for side, path in files.items()}
    info = {"preset": args.preset, "img_size": args.img_size, "classes": args.classes,
            "params": count_parameters(model), "file_bytes": {k: p.stat().st_size for k, p in files.items()},
            "max_abs_prob_diff_vs_pytorch": {k: v["max_abs_prob_diff"] for k, v in parity.items()}}
    return student, files, info


def line(name: str, row: dict[str, Any]) -> str:
    return (f"  {name:18s} batch 1: {row['latency_ms_batch1']:8.2f} ms ({row['latency_ms_batch1_min']:.2f}-"
            f"{row['latency_ms_batch1_max']:.2f})   batch: {row['images_per_sec']:8.1f} images/s "
            f"({row['images_per_sec_min']:.1f}-{row['images_per_sec_max']:.1f})")


def ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}x ({row[key + '_min']:.2f}-{row[key + '_max']:.2f})"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cpu = X.cpu_info()
    result: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                              "onnxruntime": X.ort.__version__, "load_before": os.getloadavg(), "runs": {}}
    print(f"CPU: {cpu['name']}, {os.cpu_count()} cores; VNNI: {cpu['vnni']}, AMX: {cpu['amx']} "
          f"(flags: {', '.join(cpu['flags']) or 'none found'}); load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        student, files, info = build(args, Path(tmp))
        result["model"] = info
        print(f"{args.preset} at {args.img_size} px, {info['params'] / 1e6:.2f} M parameters; files "
              + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in info["file_bytes"].items())
              + "; max |dprob| vs PyTorch " + ", ".join(f"{k} {v:.1e}" for k, v in
                                                         info["max_abs_prob_diff_vs_pytorch"].items()))
        for threads in args.threads:
            out = X.latency(student, files, batch_size=args.batch, iters=args.iters, rounds=args.rounds,
                            threads=threads, warmup=args.warmup)
            out["load_after"] = os.getloadavg()
            result["runs"][str(threads)] = out
            report(out, threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


def report(out: dict[str, Any], threads: int) -> None:
    print(f"\n{threads} thread(s), load average after {out['load_after'][0]:.1f}:")
    for side in ("pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8"):
        print(line(side, out[side]))
    fp32, int8 = out["onnxruntime_fp32"], out["onnxruntime_int8"]
    print(f"  batch 1: onnxruntime fp32 / PyTorch fp32 {ratio(fp32, 'batch1_speedup_vs_pytorch_fp32')}; "
          f"int8 / onnxruntime fp32 {ratio(int8, 'batch1_speedup_vs_onnxruntime_fp32')}; "
          f"int8 / PyTorch fp32 {ratio(int8, 'batch1_speedup_vs_pytorch_fp32')}")
    print(f"  batch {out['batch_size']}: onnxruntime fp32 / PyTorch fp32 {ratio(fp32, 'speedup_vs_pytorch_fp32')}; "
          f"int8 / onnxruntime fp32 {ratio(int8, 'speedup_vs_onnxruntime_fp32')}; "
          f"int8 / PyTorch fp32 {ratio(int8, 'speedup_vs_pytorch_fp32')}")
    met = int8["batch1_speedup_vs_pytorch_fp32"] >= GOAL
    print(f"  goal: int8 at least {GOAL}x PyTorch fp32 at batch 1: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    raise SystemExit(main())
