"""``clipfold profile``: every variant of the bundles (and open_clip eager) measured on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipfold.cli import options as o

PROFILE = "clipfold.compile.profiling.run:ProfileConfig"


def cmd_profile(args: argparse.Namespace) -> int:
    from clipfold import ProfileConfig, profile
    from clipfold.compile.profiling.run import parse_batches, table, write

    cfg = ProfileConfig(bundles=tuple(args.bundles), data=args.data, batches=parse_batches(args.batch),
                        backend=args.backend, threads=args.threads, rounds=args.rounds, eager=not args.no_eager,
                        eager_modes=tuple(m for m in args.eager.split(",") if m), out=args.out)
    rows = profile(cfg, progress=o.progress())
    print(table(rows, cfg.batches))
    if cfg.out is not None:
        json_path, png = write(rows, cfg)
        print(f"wrote {json_path}" + (f" and {png}" if png else " (no plot: matplotlib is not installed)"))
    return 0


def register(sub) -> None:
    p = o.command(sub, "profile", "measure every variant of the bundles (and open_clip eager) on this machine", [
        "clipfold profile pets.bundle",
        "clipfold profile pets.bundle gda.bundle --data test/ --batch 1,8,32 --out profile",
    ], cmd_profile)
    p.add_argument("bundles", nargs="+", type=Path, help="bundles to measure")
    p.add_argument("--data", type=Path, default=None, help="labelled folder (class sub-folders) for accuracy")
    p.add_argument("--batch", default=o.default(PROFILE, "batches", o.joined), metavar="B[,B...]",
                   help="comma list of batch sizes")
    o.add_backend(p, "the runtime that runs every variant: onnxruntime, onnxruntime-cuda, tensorrt or native "
                     "(default: each variant's own, onnxruntime for ONNX variants)")
    p.add_argument("--eager", default=o.default(PROFILE, "eager_modes", o.joined), metavar="MODE[,MODE...]",
                   help="open_clip eager references: comma list of cpu, cuda-fp16, cuda-bf16, cuda-fp16-compile")
    o.add_threads(p, "threads per engine (default: all usable cores)")
    p.add_argument("--rounds", type=int, default=o.default(PROFILE, "rounds"), metavar="N",
                   help="timed rounds per batch size")
    p.add_argument("--no-eager", action="store_true", help="skip the open_clip eager row")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and the Pareto plot OUT.png")
