"""``clipfold compile`` and ``clipfold engine build``."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipfold.cli import options as o
from clipfold.errors import ConfigError

COMPILE = "clipfold.compile.config:CompileConfig"
QUANT = "clipfold.compile.precision.config:QuantConfig"
GATE = "clipfold.compile.precision.config:GateConfig"
ENGINES = "clipfold.compile.tensorrt.engines:EngineBuildConfig"
BATCH_OPTIONS = ("min_batch", "opt_batch", "max_batch")


def _classes_or_off(text: str) -> int | None:
    if text == "off":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of classes or 'off', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 class (or 'off'), got {value}")
    return value


def _batch_profile(args: argparse.Namespace):
    from clipfold import BatchProfile

    return BatchProfile(min=args.min_batch, opt=args.opt_batch, max=args.max_batch)


def _config(args: argparse.Namespace):
    from clipfold import CompileConfig, GateConfig, QuantConfig
    from clipfold.compile.config import read_labels
    from clipfold.compile.precision.config import DEFAULT_KEEP_FLOAT

    if args.labels is None and (args.adapter is None or args.method is not None):
        raise ConfigError("compile needs --labels (a file or a comma list), or --adapter with a clipfold adapter "
                          "file whose labels are used")
    if args.backend != "tensorrt" and set(BATCH_OPTIONS) - args.defaulted:
        raise ConfigError("--min-batch, --opt-batch and --max-batch shape TensorRT engines: they need --backend tensorrt")
    return CompileConfig(
        labels=read_labels(args.labels) if args.labels is not None else None, out=args.out, model=args.model,
        pretrained=args.pretrained, templates=args.templates, top_k=args.top_k, overwrite=args.overwrite,
        adapter=args.adapter, method=args.method, method_options=o.key_values(args.set),
        precisions=args.precision, backend=args.backend, kernel_head_classes=args.kernel_head_classes,
        text=args.text, tokenizer=args.tokenizer,
        text_precisions=tuple(p for p in (args.text_precision or "").split(",") if p),
        if_faster=tuple(p for p in (args.if_faster or "").split(",") if p),
        quant=QuantConfig(calib=args.calib, calibration=args.calibration, calib_images=args.calib_images,
                          per_channel=args.per_channel, search=not args.no_search,
                          keep_float=DEFAULT_KEEP_FLOAT + tuple(args.keep_float or ())),
        gate=GateConfig(min_cosine=args.gate_min_cosine, min_top1_agreement=args.gate_min_top1,
                        min_top5_overlap=args.gate_min_top5, max_accuracy_drop=args.gate_max_accuracy_drop,
                        data=args.gate_data, images=args.gate_images, search_data=args.search_data),
    )


def _report(result) -> None:
    variant = result.manifest.variant()
    p = variant.parity
    print(f"wrote {result.path} in {result.seconds:.1f}s")
    print(f"parity vs open_clip eager ({p.images} images): cosine min {p.embedding_cosine_min:.7f} "
          f"mean {p.embedding_cosine_mean:.7f}, top-{variant.top_k} agreement {p.topk_agreement:.0%}, "
          f"max |score diff| {p.max_abs_score_diff:.2e}")
    for v in result.manifest.variants[1:]:
        g = v.gate
        if g is None:  # fp32-native: checked against open_clip eager like fp32, not gated against it
            q = v.parity
            print(f"{v.name} parity vs open_clip eager ({q.images} images): cosine min {q.embedding_cosine_min:.7f}, "
                  f"top-{v.top_k} agreement {q.topk_agreement:.0%}, max |score diff| {q.max_abs_score_diff:.2e}")
            continue
        accuracy = f", accuracy {g.accuracy:.1%} (fp32 {g.reference_accuracy:.1%})" if g.accuracy is not None else ""
        print(f"{v.name} vs fp32 ({g.images} held-out images): cosine min {g.embedding_cosine_min:.5f} mean "
              f"{g.embedding_cosine_mean:.5f}, top-1 agreement {g.top1_agreement:.1%}, top-5 overlap "
              f"{g.top5_overlap:.1%}{accuracy}" + (f"; {len(g.kept_float)} node(s) kept in float" if g.kept_float else ""))


def cmd_compile(args: argparse.Namespace) -> int:
    from clipfold import EngineBuildConfig, build_engines, compile_bundle

    config = _config(args)
    profile = _batch_profile(args) if config.backend == "tensorrt" else None
    result = compile_bundle(config, progress=o.progress())
    _report(result)
    if profile is None:
        return 0
    from clipfold.compile.tensorrt.build import tensorrt_available

    if not tensorrt_available():
        print(f"TensorRT is not installed here: the TensorRT-bound graphs were built and gated with ONNX Runtime. "
              f"Build their engines on the GPU that will run them: clipfold engine build {result.path} "
              f"--min-batch {profile.min} --opt-batch {profile.opt} --max-batch {profile.max}")
        return 0
    build_engines(EngineBuildConfig(result.path, profile=profile, gate=config.gate), progress=o.progress())
    print(f"added TensorRT engines to {result.path}")
    return 0


def cmd_engine_build(args: argparse.Namespace) -> int:
    from clipfold import EngineBuildConfig, GateConfig, build_engines

    config = EngineBuildConfig(args.bundle, variants=tuple(args.variant or ()), profile=_batch_profile(args),
                               gate=GateConfig(data=args.gate_data), workspace_gib=args.workspace_gib)
    manifest = build_engines(config, progress=o.progress())
    for v in manifest.variants:
        for e in v.engines:
            print(f"{v.name}: {e.file} ({e.gpu}, sm {e.compute_capability}, TensorRT {e.tensorrt}, batch "
                  f"{e.profile['min']}..{e.profile['max']})")
    return 0


def _compile_options(p) -> None:
    from clipfold.compile.adapters.registry import IMPORTERS  # names only; no torch import

    p.add_argument("--labels", default=None, help="a file with one label per line, or a comma list "
                   "(default with --adapter: the adapter's labels)")
    p.add_argument("--adapter", type=Path, default=None, help="a fitted adapter file (safetensors), or with "
                   "--method an official checkpoint, to fold in instead of the zero-shot head")
    p.add_argument("--method", default=None, choices=sorted(IMPORTERS),
                   help="import --adapter as this method's official checkpoint")
    o.add_set(p, "an option of the imported method, e.g. class_token_position=middle or alpha=0.5")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    o.add_model(p, COMPILE)
    p.add_argument("--templates", default=None, help="imagenet80, simple, tiny, label, or a file of '{}' templates "
                   "(default: tiny for the tiny model, imagenet80 otherwise)")
    o.add_top_k(p, o.default(COMPILE, "top_k"), "largest k the graph returns")
    o.add_overwrite(p, "replace an existing bundle")
    p.add_argument("--text", action="store_true",
                   help="also carry the text tower and CLIP's tokenizer, for text queries (Engine.embed_text)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="PATH",
                   help="a local Hugging Face tokenizer (a folder holding tokenizer.json, or the file) for models "
                        "that read text with one (SigLIP, SigLIP2); nothing is downloaded")
    p.add_argument("--text-precision", default=None, metavar="P[,P...]",
                   help="reduced-precision text graphs, each gated against fp32 text on held-out prompts: "
                        "int8-dynamic, int8-weight, int4-weight (an engine of the same variant name uses it)")
    p.add_argument("--kernel-head-classes", type=_classes_or_off, default=o.default(COMPILE, "kernel_head_classes"),
                   metavar="N|off", help="a linear head with at least N classes is scored by the fused top-k kernel "
                   "at run time instead of inside the graph; off: always in the graph")


def _precision_options(p) -> None:
    from clipfold.compile.precision.config import CALIBRATIONS, PRECISIONS

    q = p.add_argument_group("precision variants (each gated against fp32 before it is written)")
    q.add_argument("--precision", default=o.default(COMPILE, "precisions", o.joined), metavar="P[,P...]",
                   help=f"comma list of {', '.join(PRECISIONS)}; fp32 is always built; with --backend tensorrt: "
                        "fp16, int8, fp8")
    q.add_argument("--if-faster", default=None, metavar="P[,P...]",
                   help="fp32-native and/or bf16: built only where this CPU runs them, kept only where they measure "
                   "faster than fp32 at batch 1 (else skipped or dropped, saying why)")
    q.add_argument("--calib", type=Path, default=None, help="folder of calibration images (default: a fitted "
                   "adapter's support folder, else generated images)")
    q.add_argument("--calibration", default=o.default(QUANT, "calibration"), choices=CALIBRATIONS,
                   help="activation range method of int8-static (fp8 always uses the distribution)")
    q.add_argument("--calib-images", type=int, default=o.default(QUANT, "calib_images"), metavar="N",
                   help="calibration images to use")
    q.add_argument("--per-channel", action="store_true", help="per-channel int8 weights (off: ORT narrows them to 7 bits)")
    q.add_argument("--keep-float", action="append", metavar="OP_TYPE",
                   help="an operator type to keep in float, besides normalization, softmax and GELU (repeatable)")
    q.add_argument("--no-search", action="store_true", help="fail instead of returning sensitive nodes to float")
    q.add_argument("--gate-data", type=Path, default=None, help="labelled folder (class sub-folders) for the gate; adds accuracy")
    q.add_argument("--gate-images", type=int, default=o.default(GATE, "images"), metavar="N",
                   help="generated gate images without --gate-data")
    q.add_argument("--search-data", type=Path, default=None,
                   help="labelled folder for the sensitivity search's choices (default: half of --gate-data, "
                        "which the gate then does not report on)")
    q.add_argument("--gate-min-cosine", type=float, default=o.default(GATE, "min_cosine"), metavar="X",
                   help="minimum embedding cosine vs fp32")
    q.add_argument("--gate-min-top1", type=float, default=o.default(GATE, "min_top1_agreement"), metavar="X",
                   help="minimum top-1 agreement with fp32")
    q.add_argument("--gate-min-top5", type=float, default=o.default(GATE, "min_top5_overlap"), metavar="X",
                   help="minimum top-5 overlap with fp32")
    q.add_argument("--gate-max-accuracy-drop", type=float, default=o.default(GATE, "max_accuracy_drop"), metavar="X",
                   help="largest top-1 accuracy drop vs fp32, with --gate-data")


def register(sub) -> None:
    from clipfold.compile.config import BACKENDS

    p = o.command(sub, "compile", "compile a model and labels into a verified bundle", [
        "clipfold compile --labels cat,dog,car --out pets.bundle",
        "clipfold compile --adapter gda.safetensors --out gda.bundle --precision int8-static,int8-dynamic",
        "clipfold compile --labels a,b --out t.bundle --backend tensorrt --precision fp16,int8 --max-batch 32",
    ], cmd_compile)
    _compile_options(p)
    _precision_options(p)
    t = p.add_argument_group("TensorRT (--backend tensorrt --precision fp16,int8,fp8)")
    o.add_backend(t, "the runtime the reduced-precision variants are built for: tensorrt builds TensorRT-bound graphs "
                  "on standard operators, gated here, and their engines when TensorRT and a GPU are present",
                  default_value=o.default(COMPILE, "backend"), choices=BACKENDS, old=("--target",))
    o.add_batch_profile(t)

    engine = o.group(sub, "engine", "TensorRT engines of a bundle", ["clipfold engine build gda.bundle"])
    p = o.command(engine, "build", "build, gate and add TensorRT plans for this machine's GPU", [
        "clipfold engine build gda.bundle",
        "clipfold engine build gda.bundle --variant tensorrt-fp16 --max-batch 32",
    ], cmd_engine_build)
    p.add_argument("bundle", type=Path, help="a bundle compiled with --backend tensorrt")
    o.add_variant(p, "a TensorRT-bound variant (repeatable; default: all of them)", repeatable=True)
    p.add_argument("--gate-data", type=Path, default=None, help="labelled folder for the gate (default: generated images)")
    p.add_argument("--workspace-gib", type=float, default=o.default(ENGINES, "workspace_gib"), metavar="GIB",
                   help="TensorRT builder workspace")
    o.add_batch_profile(p)
