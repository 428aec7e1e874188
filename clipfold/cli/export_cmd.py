"""``clipfold export triton``: a bundle as a Triton Inference Server model repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipfold.cli import options as o

TRITON = "clipfold.compile.triton_server.repository:TritonExportConfig"


def cmd_export_triton(args: argparse.Namespace) -> int:
    from clipfold import TritonExportConfig, export_triton

    preferred = tuple(o.positive_ints(args.preferred_batch, "--preferred-batch")) if args.preferred_batch else ()
    config = TritonExportConfig(bundle=args.bundle, out=args.out, name=args.name, variant=args.variant,
                                max_batch=args.max_batch, preferred_batch=preferred,
                                max_queue_delay_us=round(args.max_delay_ms * 1000), instances=args.instances,
                                preprocess_instances=args.preprocess_instances, kind=args.device,
                                overwrite=args.overwrite, platform=args.backend,
                                compute_capability=args.compute_capability)
    path = export_triton(config)
    engine = f"{config.name}_{'trt' if config.platform == 'tensorrt' else 'onnx'}"
    print(f"wrote Triton model repository {path}: ensemble {config.name!r} (image bytes -> labels, scores, "
          f"indices, embedding) over {config.name}_preprocess, {engine} and {config.name}_labels; "
          f"every config.pbtxt validated")
    print(f"run it: tritonserver --model-repository {path}  (clipfold must be installed for the Python backend)")
    return 0


def register(sub) -> None:
    export = o.group(sub, "export", "hand a bundle to another serving system",
                     ["clipfold export triton pets.bundle --out triton-repo"])
    p = o.command(export, "triton", "write a Triton Inference Server model repository (ensemble of preprocessing, "
                  "the engine and labels), validated against the graph", [
                      "clipfold export triton pets.bundle --out triton-repo",
                      "clipfold export triton pets.bundle --out repo --max-batch 64 --preferred-batch 8,32 --device gpu",
                      "clipfold export triton gda.bundle --out repo --backend tensorrt --variant tensorrt-fp16",
                  ], cmd_export_triton)
    p.add_argument("bundle", type=Path, help="the bundle to export")
    p.add_argument("--out", required=True, type=Path, help="repository folder to write")
    p.add_argument("--name", default=None, help="ensemble model name (default: the bundle folder's name)")
    o.add_variant(p, "variant to export (default: the bundle's default)")
    p.add_argument("--max-batch", type=int, default=o.default(TRITON, "max_batch"), metavar="N",
                   help="max_batch_size of every model")
    p.add_argument("--preferred-batch", default=None, metavar="B[,B...]", help="dynamic batching's preferred sizes, "
                   "e.g. 8,32 (default: max batch / 4 and max batch)")
    o.add_max_delay_ms(p, o.default(TRITON, "max_queue_delay_us", lambda us: us / 1000),
                       "dynamic batching's max queue delay (written in microseconds to config.pbtxt)",
                       old_us="--max-queue-delay-us")
    p.add_argument("--instances", type=int, default=o.default(TRITON, "instances"), metavar="N",
                   help="engine instances per device")
    p.add_argument("--preprocess-instances", type=int, default=o.default(TRITON, "preprocess_instances"), metavar="N",
                   help="Python preprocessing instances")
    o.add_backend(p, "the engine model: the variant's ONNX graph run by onnxruntime (onnxruntime_onnx) or its "
                     "TensorRT plan (tensorrt_plan; built with clipfold engine build)",
                  default_value=o.default(TRITON, "platform"), choices=("onnxruntime", "tensorrt"), old=("--platform",))
    o.add_device(p, "the kind of device the engine instances run on (default: gpu with --backend tensorrt, else cpu)",
                 old=("--kind",))
    p.add_argument("--compute-capability", default=None, metavar="X.Y",
                   help="with --backend tensorrt: which GPU's plan, e.g. 8.7")
    o.add_overwrite(p, "replace an existing repository folder")
