"""The ``clipfold`` command. Each subcommand parses its flags and calls one public function.

A ``ClipfoldError`` is printed as one ``error: ...`` line and exits non-zero, no traceback.
The compile stack (torch) is imported only by the subcommands that need it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from clipfold.errors import ClipfoldError, ConfigError


def _progress(start: float):
    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


# --- compile ---------------------------------------------------------------------------------
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


def cmd_compile(args: argparse.Namespace) -> int:
    from clipfold.compile.config import CompileConfig, read_labels
    from clipfold.compile.pipeline import compile_bundle
    from clipfold.compile.precision.config import DEFAULT_KEEP_FLOAT, GateConfig, QuantConfig

    if args.labels is None and (args.adapter is None or args.method is not None):
        raise ConfigError("compile needs --labels (a file or a comma list), or --adapter with a clipfold adapter "
                          "file whose labels are used")
    precisions = args.precision
    if args.target == "tensorrt":
        precisions = _tensorrt_precisions(args.precision)
        profile = _batch_profile(args)
    elif any(v is not None for v in (args.min_batch, args.opt_batch, args.max_batch)):
        raise ConfigError("--min-batch, --opt-batch and --max-batch shape TensorRT engines: they need --target tensorrt")
    config = CompileConfig(
        labels=read_labels(args.labels) if args.labels is not None else None, out=args.out, model=args.model,
        pretrained=args.pretrained, templates=args.templates, top_k=args.top_k, overwrite=args.overwrite,
        adapter=args.adapter, method=args.method, method_options=_options(args.set),
        precisions=precisions, kernel_head_classes=args.kernel_head_classes, text=args.text, tokenizer=args.tokenizer,
        text_precisions=tuple(p for p in (args.text_precision or "").split(",") if p),
        if_faster=tuple(p for p in (args.if_faster or "").split(",") if p),
        quant=QuantConfig(calib=args.calib, calibration=args.calibration, calib_images=args.calib_images,
                          per_channel=args.per_channel, search=not args.no_search,
                          keep_float=DEFAULT_KEEP_FLOAT + tuple(args.keep_float or ())),
        gate=GateConfig(min_cosine=args.gate_min_cosine, min_top1_agreement=args.gate_min_top1,
                        min_top5_overlap=args.gate_min_top5, max_accuracy_drop=args.gate_max_accuracy_drop,
                        data=args.gate_data, images=args.gate_images, search_data=args.search_data),
    )
    result = compile_bundle(config, progress=_progress(time.perf_counter()))
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
    if args.target == "tensorrt":
        from clipfold.compile.tensorrt.build import tensorrt_available
        from clipfold.compile.tensorrt.engines import EngineBuildConfig, build_engines

        if not tensorrt_available():
            print(f"TensorRT is not installed here: the TensorRT-bound graphs were built and gated with ONNX Runtime. "
                  f"Build their engines on the GPU that will run them: clipfold engine build {result.path} "
                  f"--min-batch {profile.min} --opt-batch {profile.opt} --max-batch {profile.max}")
            return 0
        build_engines(EngineBuildConfig(result.path, profile=profile, gate=config.gate), progress=_progress(time.perf_counter()))
        print(f"added TensorRT engines to {result.path}")
    return 0


def _tensorrt_precisions(spec: str) -> str:
    from clipfold.compile.tensorrt.build import TENSORRT_PRECISIONS

    names = [p.strip() for p in spec.split(",") if p.strip() and p.strip() != "fp32"]
    unknown = [p for p in names if p not in TENSORRT_PRECISIONS and p not in TENSORRT_PRECISIONS.values()]
    if not names or unknown:
        raise ConfigError(f"--target tensorrt takes --precision from {', '.join(TENSORRT_PRECISIONS)}; got {spec!r}")
    return ",".join(TENSORRT_PRECISIONS.get(p, p) for p in names)


def _batch_profile(args: argparse.Namespace):
    from clipfold.compile.tensorrt.build import BatchProfile

    default = BatchProfile()
    return BatchProfile(min=args.min_batch or default.min, opt=args.opt_batch or default.opt,
                        max=args.max_batch or default.max)


def cmd_engine_build(args: argparse.Namespace) -> int:
    from clipfold.compile.precision.config import GateConfig
    from clipfold.compile.tensorrt.engines import EngineBuildConfig, build_engines

    config = EngineBuildConfig(args.bundle, variants=tuple(args.variant or ()), profile=_batch_profile(args),
                               gate=GateConfig(data=args.gate_data), workspace_gib=args.workspace_gib)
    manifest = build_engines(config, progress=_progress(time.perf_counter()))
    for v in manifest.variants:
        for e in v.engines:
            print(f"{v.name}: {e.file} ({e.gpu}, sm {e.compute_capability}, TensorRT {e.tensorrt}, batch "
                  f"{e.profile['min']}..{e.profile['max']})")
    return 0


def _options(pairs: list[str] | None) -> dict[str, str]:
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = value.strip()
    return options


def _floats(spec: str, flag: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in spec.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ConfigError(f"{flag} expects {count} comma-separated numbers, got {spec!r}")
    return values


def cmd_fit(args: argparse.Namespace) -> int:
    from clipfold.compile.adapters.features import ViewConfig, default_cache_dir
    from clipfold.compile.adapters.fit import FitConfig, fit_adapter

    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    view_args = {"views": args.views, "flip": False if args.no_flip else None,
                 "crop_scale": _floats(args.crop_scale, "--crop-scale", 2) if args.crop_scale else None}
    views = ViewConfig(**{k: v for k, v in view_args.items() if v is not None})  # defaults live in ViewConfig
    config = FitConfig(method=args.method, support=args.support, out=args.out, model=args.model,
                       pretrained=args.pretrained, templates=args.templates, shots=args.shots, val=args.val,
                       views=views, cache_dir=cache_dir, seed=args.seed, options=_options(args.set))
    adapter = fit_adapter(config, progress=_progress(time.perf_counter()))
    hp = {k: v for k, v in adapter.hyperparameters.items()
          if k in ("alpha", "beta", "gamma", "val_accuracy", "selected_on", "cached_features")}
    print(f"wrote {config.out}: {adapter.head.method} over {len(adapter.labels)} classes; {hp}")
    return 0


def cmd_head_add(args: argparse.Namespace) -> int:
    from clipfold.compile.config import read_labels
    from clipfold.compile.heads.add import HeadAddConfig, add_head

    config = HeadAddConfig(bundle=args.bundle, name=args.name, adapter=args.adapter,
                           labels=read_labels(args.labels) if args.labels is not None else None,
                           templates=args.templates, method=args.method, method_options=_options(args.set),
                           top_k=args.top_k, replace=args.replace)
    manifest = add_head(config, progress=_progress(time.perf_counter()))
    head = manifest.extra_head(args.name)
    print(f"added head {head.name!r} to {args.bundle}: {head.head.method}, {len(head.labels)} labels, "
          f"top-{head.top_k}; parity on {head.parity.images} embeddings: top-k agreement "
          f"{head.parity.topk_agreement:.0%}, max |score diff| {head.parity.max_abs_score_diff:.2e}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from clipfold.compile.stages.load import list_models

    for name in list_models():
        print(name)
    return 0


# --- runtime ---------------------------------------------------------------------------------
def cmd_classify(args: argparse.Namespace) -> int:
    from clipfold.runtime import Engine

    engine = Engine.open(args.bundle, variant=args.variant, threads=args.threads, head=args.head, backend=args.backend)
    if engine.variant_reason:  # --variant auto: which variant, and the figures that chose it
        print(f"variant auto: {engine.variant.name}: {engine.variant_reason}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as clamped:  # a k above the graph's top-k: one note, not a warning
        warnings.simplefilter("always")
        k = engine.clamp_k(args.k)
    for note in clamped:
        print(f"note: {note.message}", file=sys.stderr)
    results = engine.classify(args.images, k=k)
    if args.json:
        payload = [
            {"image": str(image), "predictions": [{"label": p.label, "score": p.score, "index": p.index} for p in preds]}
            for image, preds in zip(args.images, results)
        ]
        print(json.dumps(payload, indent=2))
        return 0
    for image, preds in zip(args.images, results):
        print(image)
        for p in preds:
            print(f"  {p.score:8.4f}  {p.label}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from clipfold.runtime import Engine
    from clipfold.runtime.image_folders import evaluate_folder

    engine = Engine.open(args.bundle, variant=args.variant, threads=args.threads, head=args.head)
    result = evaluate_folder(engine, args.folder)
    if args.json:
        print(json.dumps({"images": result.images, "top1": result.top1, "per_class": result.per_class}, indent=2))
        return 0
    print(f"{args.bundle}: top-1 {result.top1:.1%} on {result.images} images of {len(result.per_class)} classes")
    for label, accuracy in result.per_class.items():
        print(f"  {accuracy:7.1%}  {label}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from clipfold.compile.profiling.run import ProfileConfig, parse_batches, profile, table, write

    cfg = ProfileConfig(bundles=tuple(args.bundles), data=args.data, batches=parse_batches(args.batch),
                        backend=args.backend, threads=args.threads, rounds=args.rounds, eager=not args.no_eager,
                        eager_modes=tuple(m for m in args.eager.split(",") if m), out=args.out)
    rows = profile(cfg, progress=_progress(time.perf_counter()))
    print(table(rows, cfg.batches))
    if cfg.out is not None:
        json_path, png = write(rows, cfg)
        print(f"wrote {json_path}" + (f" and {png}" if png else " (no plot: matplotlib is not installed)"))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from clipfold.runtime import Engine
    from clipfold.runtime.retrieval.index import build_index

    progress = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if args.ray:
        from clipfold.runtime.retrieval.ray_index import build_index_ray

        index = build_index_ray(args.bundle, args.folder, args.out, storage=args.storage, address=args.address,
                                actors=args.actors, threads_per_actor=args.threads or 1, progress=progress,
                                strict=args.strict)
    else:
        if args.address is not None:
            raise ConfigError("--address joins a Ray cluster: it needs --ray")
        engine = Engine.open(args.bundle, threads=args.threads)
        index = build_index(engine, args.folder, args.out, storage=args.storage, progress=progress,
                            strict=args.strict)
    print(f"{args.out}: {len(index):,} images, {index.meta['storage']}, built with {index.meta['bundle']['model']}")
    failed = index.failed
    if failed:  # the rest is indexed; exit 1 says some images were not
        print(f"{len(failed):,} image(s) could not be indexed (recorded in {args.out / 'index.json'}; the next run "
              "tries them again):", file=sys.stderr)
        for rel, reason in sorted(failed.items()):
            print(f"  {rel}: {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from clipfold.runtime import Engine
    from clipfold.runtime.retrieval.index import Index, ShardedIndex

    index = Index.open(args.index[0]) if len(args.index) == 1 else ShardedIndex.open(args.index)
    engine = Engine.open(args.bundle or index.meta["bundle_path"], threads=args.threads)
    result = index.search(engine, text=args.text, image=args.image, k=args.k)
    if args.json:
        print(json.dumps({"hits": [{"path": h.path, "score": h.score, **({"index": h.index} if h.index else {})}
                                   for h in result.hits],
                          "query_truncated": result.query_truncated}, indent=2))
        return 0
    if result.query_truncated:
        print("note: the text query was longer than the model's context and was cut", file=sys.stderr)
    for hit in result.hits:
        print(f"  {hit.score:8.4f}  {hit.path}" + (f"  ({hit.index})" if hit.index else ""))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from clipfold.runtime import Engine

    engine = Engine.open(args.bundle, verify_checksums=True)
    m = engine.manifest
    if args.json:
        print(m.to_json(), end="")
        return 0
    pre = m.preprocess
    print(f"bundle      {engine.path}  (schema {m.schema_version}, created {m.created})")
    print(f"model       {m.model.name} [{m.model.family}]  weights: {m.model.pretrained or 'random'}")
    print(f"labels      {len(m.labels)}: {', '.join(m.labels[:8])}{' ...' if len(m.labels) > 8 else ''}")
    print(f"head        {m.head.method}, {m.head.activation}, logit scale {m.head.logit_scale:.3f}, "
          f"{len(m.head.templates)} templates"
          + (f"; scored by the top-k kernel from {m.head.kernel}/ (not in the graph)" if m.head.kernel else ""))
    if m.text is not None:
        t = m.text
        print(f"text        {t.file} + {t.tokenizer}, context {t.context_length}; parity on {t.parity.prompts} prompts: "
              f"cosine min {t.parity.embedding_cosine_min:.7f}")
        for tv in t.variants:
            g = tv.gate
            print(f"text +      {tv.name}: {tv.file}; gate vs fp32 text on {g.prompts} prompts: cosine min "
                  f"{g.embedding_cosine_min:.5f}, top-1 agreement {g.top1_agreement:.1%}")
    print(f"preprocess  {pre.image_size[0]}x{pre.image_size[1]} {pre.resize_mode} {pre.interpolation}, "
          f"normalization {'folded into the graph' if pre.folded else 'in the runtime'}")
    for v in m.variants:
        p = v.parity
        star = "*" if v.name == m.default_variant else " "
        line = (f"variant{star}   {v.name}: {v.file} ({v.precision}, {'/'.join(v.backends)}), top-{v.top_k}; "
                f"parity on {p.images} images: cosine min {p.embedding_cosine_min:.7f}, top-k agreement {p.topk_agreement:.0%}")
        if v.gate is not None:
            g = v.gate
            line += (f"; gate vs fp32 on {g.images}: cosine min {g.embedding_cosine_min:.5f}, top-1 agreement "
                     f"{g.top1_agreement:.1%}" + (f", {len(g.kept_float)} node(s) in float" if g.kept_float else ""))
        print(line)
    for h in m.heads:
        print(f"head +      {h.name}: {h.head.method}, {len(h.labels)} labels, top-{h.top_k} ({h.file}); parity on "
              f"{h.parity.images} embeddings: top-k agreement {h.parity.topk_agreement:.0%}")
    print(f"checksums   {len(m.files)} files verified")
    print(f"digest      {engine.digest}  (pin it: clipfold serve --expect-digest NAME=DIGEST)")
    print(f"producer    {', '.join(f'{k} {v}' for k, v in m.producer.items())}")
    return 0


def _digests(pairs: list[str]) -> dict[str, str]:
    """``--expect-digest NAME=DIGEST`` pairs as {name: digest}."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, digest = pair.partition("=")
        if not sep or not name or not digest:
            raise ConfigError(f"--expect-digest expects NAME=DIGEST (clipfold inspect prints the digest), got {pair!r}")
        out[name] = digest
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from clipfold.runtime.serve.app import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                         max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                         max_image_pixels=args.max_image_pixels, max_items=args.max_items, timeout_s=args.timeout_s,
                         max_text_bytes=args.max_text_bytes, max_pixels_in_flight=args.max_pixels_in_flight,
                         max_header_bytes=args.max_header_bytes, header_timeout_s=args.header_timeout_s,
                         max_connections=args.max_connections,
                         threads=args.threads, spin=args.spin, preferred_batch=args.preferred_batch,
                         grpc_port=args.grpc_port, ui=args.ui)
    serve(args.bundles, config, variant=args.variant, indexes=args.index, expect_digests=_digests(args.expect_digest),
          progress=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def cmd_export_triton(args: argparse.Namespace) -> int:
    from clipfold.compile.triton_server.repository import TritonExportConfig, export_triton

    preferred = tuple(_positive_ints(args.preferred_batch, "--preferred-batch")) if args.preferred_batch else ()
    config = TritonExportConfig(bundle=args.bundle, out=args.out, name=args.name, variant=args.variant,
                                max_batch=args.max_batch, preferred_batch=preferred,
                                max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                                preprocess_instances=args.preprocess_instances, kind=args.kind, overwrite=args.overwrite,
                                platform=args.platform, compute_capability=args.compute_capability)
    path = export_triton(config)
    engine = f"{config.name}_{'trt' if config.platform == 'tensorrt' else 'onnx'}"
    print(f"wrote Triton model repository {path}: ensemble {config.name!r} (image bytes -> labels, scores, "
          f"indices, embedding) over {config.name}_preprocess, {engine} and {config.name}_labels; "
          f"every config.pbtxt validated")
    print(f"run it: tritonserver --model-repository {path}  (clipfold must be installed for the Python backend)")
    return 0


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} takes comma-separated positive integers, got {text!r}")
    return values


def _batch_options(group) -> None:
    group.add_argument("--min-batch", type=int, default=None, help="smallest batch the engine runs (default 1)")
    group.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT tunes for (default 8)")
    group.add_argument("--max-batch", type=int, default=None, help="largest batch the engine runs (default 64)")


def build_parser() -> argparse.ArgumentParser:
    from clipfold.compile.adapters.registry import FITTERS, IMPORTERS  # names only; no torch import
    from clipfold.compile.config import KERNEL_HEAD_CLASSES
    from clipfold.compile.precision.config import CALIBRATIONS, PRECISIONS

    parser = argparse.ArgumentParser(prog="clipfold", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile a model and labels into a verified bundle")
    p.add_argument("--labels", default=None, help="a file with one label per line, or a comma list "
                   "(default with --adapter: the adapter's labels)")
    p.add_argument("--adapter", type=Path, default=None,
                   help="a fitted adapter file (safetensors), or with --method an official checkpoint, "
                        "to fold in instead of the zero-shot head")
    p.add_argument("--method", default=None, choices=sorted(IMPORTERS),
                   help="import --adapter as this method's official checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="an option of the imported method, e.g. class_token_position=middle or alpha=0.5")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--model", default="clipfold-tiny", help="open_clip model name (default: clipfold-tiny)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint path")
    p.add_argument("--templates", default=None,
                   help="imagenet80, simple, tiny, label, or a file of '{}' templates "
                        "(default: tiny for the tiny model, imagenet80 otherwise)")
    p.add_argument("--top-k", type=int, default=10, help="largest k the graph returns (default 10)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--text", action="store_true",
                   help="also carry the text tower and CLIP's tokenizer, for text queries (Engine.embed_text)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="PATH",
                   help="a local Hugging Face tokenizer (a folder holding tokenizer.json, or the file) for models "
                        "that read text with one (SigLIP, SigLIP2); nothing is downloaded")
    p.add_argument("--text-precision", default=None, metavar="P[,P...]",
                   help="reduced-precision text graphs, each gated against fp32 text on held-out prompts: "
                        "int8-dynamic, int8-weight, int4-weight (an engine of the same variant name uses it)")
    p.add_argument("--kernel-head-classes", type=_classes_or_off, default=KERNEL_HEAD_CLASSES, metavar="N|off",
                   help="a linear head with at least N classes is scored by the fused top-k kernel at run time "
                        f"instead of inside the graph (default {KERNEL_HEAD_CLASSES}; off: always in the graph)")
    q = p.add_argument_group("precision variants (each gated against fp32 before it is written)")
    q.add_argument("--precision", default="fp32", help=f"comma list of {', '.join(PRECISIONS)} (fp32 is always built)")
    q.add_argument("--if-faster", default=None, metavar="P[,P...]",
                   help="fp32-native and/or bf16: built only where this CPU runs them, kept only where they measure "
                   "faster than fp32 at batch 1 (else skipped or dropped, saying why)")
    q.add_argument("--calib", type=Path, default=None, help="folder of calibration images (default: a fitted adapter's support folder, else generated images)")
    q.add_argument("--calibration", default="minmax", choices=CALIBRATIONS, help="activation range method of int8-static (fp8 always uses the distribution)")
    q.add_argument("--calib-images", type=int, default=32, help="calibration images to use (default 32)")
    q.add_argument("--per-channel", action="store_true", help="per-channel int8 weights (off: ORT narrows them to 7 bits)")
    q.add_argument("--keep-float", action="append", metavar="OP_TYPE", help="an operator type to keep in float (repeatable)")
    q.add_argument("--no-search", action="store_true", help="fail instead of returning sensitive nodes to float")
    q.add_argument("--gate-data", type=Path, default=None, help="labelled folder (class sub-folders) for the gate; adds accuracy")
    q.add_argument("--gate-images", type=int, default=128, help="generated gate images without --gate-data (default 128)")
    q.add_argument("--search-data", type=Path, default=None,
                   help="labelled folder for the sensitivity search's choices (default: half of --gate-data, "
                        "which the gate then does not report on)")
    q.add_argument("--gate-min-cosine", type=float, default=0.99, help="minimum embedding cosine vs fp32 (default 0.99)")
    q.add_argument("--gate-min-top1", type=float, default=0.99, help="minimum top-1 agreement with fp32 (default 0.99)")
    q.add_argument("--gate-min-top5", type=float, default=0.0, help="minimum top-5 overlap with fp32 (default 0)")
    q.add_argument("--gate-max-accuracy-drop", type=float, default=0.01, help="with --gate-data (default 0.01)")
    t = p.add_argument_group("TensorRT (--target tensorrt --precision fp16,int8,fp8)")
    t.add_argument("--target", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="tensorrt: TensorRT-bound graphs on standard operators, gated here, and their engines "
                        "when TensorRT and a GPU are present")
    _batch_options(t)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("engine", help="TensorRT engines of a bundle")
    engine_sub = p.add_subparsers(dest="engine_command", required=True)
    p = engine_sub.add_parser("build", help="build, gate and add TensorRT plans for this machine's GPU")
    p.add_argument("bundle", type=Path)
    p.add_argument("--variant", action="append", help="a TensorRT-bound variant (repeatable; default: all of them)")
    p.add_argument("--gate-data", type=Path, default=None, help="labelled folder for the gate (default: generated images)")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace (default 4 GiB)")
    _batch_options(p)
    p.set_defaults(func=cmd_engine_build)

    p = sub.add_parser("fit", help="fit a few-shot adapter on a support folder (one sub-folder per class)")
    p.add_argument("method", choices=sorted(FITTERS))
    p.add_argument("--support", required=True, type=Path, help="folder with one sub-folder of images per class")
    p.add_argument("--out", required=True, type=Path, help="adapter file to write (safetensors)")
    p.add_argument("--val", type=Path, default=None, help="validation folder for the hyperparameters "
                   "(default: a held-out quarter of the support shots)")
    p.add_argument("--shots", type=int, default=None, help="use the first N images of each class")
    p.add_argument("--model", default="clipfold-tiny", help="open_clip model name (default: clipfold-tiny)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint path")
    p.add_argument("--templates", default=None, help="prompt templates of the zero-shot branch (as for compile)")
    p.add_argument("--views", type=int, default=None, help="feature views per shot: 1 plain + N-1 augmented "
                   "(random resized crop and flip; default 11: the official caches' 10 augmented passes)")
    p.add_argument("--crop-scale", default=None, metavar="MIN,MAX",
                   help="RandomResizedCrop scale of the augmented views (default 0.5,1 as the official code)")
    p.add_argument("--no-flip", action="store_true", help="augmented views without the random horizontal flip")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a fitting option, e.g. an official per-dataset search range: search_scale=7,3 "
                        "(tip-adapter), feat_num=700 (ape), beta_grid=0.5,3,20 (proker), alpha_grid=0.5,1 (taskres)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where image features are cached (default: ~/.cache/clipfold/features)")
    p.add_argument("--no-cache", action="store_true", help="encode every image, cache nothing")
    p.add_argument("--seed", type=int, default=0, help="seed of trained methods")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("head", help="manage the extra heads of a bundle")
    head_sub = p.add_subparsers(dest="head_command", required=True)
    p = head_sub.add_parser("add", help="add a head (label set, fitted adapter or head-only checkpoint) "
                            "without re-exporting the image tower")
    p.add_argument("bundle", type=Path)
    p.add_argument("--name", required=True, help="the head's name; select it with --head NAME")
    p.add_argument("--adapter", type=Path, default=None, help="a fitted adapter file, or with --method a checkpoint")
    p.add_argument("--method", default=None, choices=sorted(IMPORTERS), help="import --adapter as this method's checkpoint")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="an option of the imported method")
    p.add_argument("--labels", default=None, help="a zero-shot label set (file or comma list), or an import's class names")
    p.add_argument("--templates", default=None, help="templates for a zero-shot head (as for compile)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--replace", action="store_true", help="replace an existing head of that name")
    p.set_defaults(func=cmd_head_add)

    p = sub.add_parser("classify", help="classify images with a bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("images", nargs="+")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--head", default=None, help="an extra head by name (default: the fused head)")
    p.add_argument("--variant", default=None, help="a variant name, or auto: the fastest this CPU runs, from the "
                   "bundle's profile for this CPU or a short measurement (default: the bundle's default)")
    p.add_argument("--backend", default=None, help="onnxruntime, onnxruntime-cuda, tensorrt, native or openvino "
                   "(default: the variant's own, onnxruntime for ONNX variants)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("evaluate", help="top-1 accuracy of a bundle on a folder with one sub-folder per class")
    p.add_argument("bundle", type=Path)
    p.add_argument("folder", type=Path)
    p.add_argument("--head", default=None, help="an extra head by name (default: the fused head)")
    p.add_argument("--variant", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("profile", help="measure every variant of the bundles (and open_clip eager) on this machine")
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--data", type=Path, default=None, help="labelled folder (class sub-folders) for accuracy")
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--backend", default=None, help="onnxruntime, onnxruntime-cuda, tensorrt or native "
                   "(default: the variant's own, onnxruntime for ONNX variants)")
    p.add_argument("--eager", default="cpu", help="open_clip eager references: comma list of cpu, cuda-fp16, "
                   "cuda-bf16, cuda-fp16-compile (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="threads per engine (default: all usable cores)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per batch size (default 10)")
    p.add_argument("--no-eager", action="store_true", help="skip the open_clip eager row")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and the Pareto plot OUT.png")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("inspect", help="show a bundle's manifest after checking its files")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("index", help="embed a folder of images into a searchable index (resumable)")
    p.add_argument("bundle", type=Path)
    p.add_argument("folder", type=Path, help="images to index (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="index folder (a re-run adds new or changed images)")
    p.add_argument("--storage", default="fp32", choices=("fp32", "fp16", "int8"), help="embedding storage (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (with --ray: per actor, default 1)")
    p.add_argument("--ray", action="store_true", help="embed with Ray Data: a pool of Engine actors (local Ray "
                   "instance unless --address)")
    p.add_argument("--address", default=None, help="with --ray: the cluster to join ('auto', 'ray://host:10001')")
    p.add_argument("--actors", type=int, default=2, help="with --ray: Engine actors (default 2)")
    p.add_argument("--strict", action="store_true", help="stop at the first image that cannot be read (default: "
                   "index the rest, record it, exit 1, try it again next run)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index by text (bundle compiled with --text) or by image")
    p.add_argument("index", type=Path, nargs="+", help="one index, or several of the same bundle searched as one")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", default=None)
    query.add_argument("--image", type=Path, default=None)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--bundle", type=Path, default=None, help="default: the bundle the index was built with")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="serve bundles over HTTP and gRPC (Open Inference Protocol v2), JSON and a page at /ui, "
                       "with dynamic batching")
    p.add_argument("bundles", nargs="+", type=Path, help="bundles to serve; each is a model named after its folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="rows per engine call (1: no batching; default 32)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill (default 5)")
    p.add_argument("--max-queue", type=int, default=512, help="rows waiting per model before 503 (default 512)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="largest decoded image (default 40M)")
    p.add_argument("--max-items", type=int, default=64, help="images or texts per classify/embed request (default 64)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request time limit (default 30)")
    p.add_argument("--max-text-bytes", type=int, default=8 * 1024, help="UTF-8 bytes per text query (default 8192)")
    p.add_argument("--max-pixels-in-flight", type=int, default=None,
                   help="decoded image pixels held at once across all requests (default: twice --max-image-pixels)")
    p.add_argument("--max-header-bytes", type=int, default=64 * 1024,
                   help="request line and headers of one request (default 65536)")
    p.add_argument("--header-timeout-s", type=float, default=10.0,
                   help="time for a request's headers to arrive (default 10)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open HTTP connections; at the cap the oldest one without a request is closed (default 512)")
    p.add_argument("--variant", default=None, help="variant of every bundle to serve, or auto: the fastest this CPU "
                   "runs, from the bundle's profile for this CPU or a short measurement (default: each bundle's default)")
    p.add_argument("--index", action="append", default=[], type=Path,
                   help="an index (clipfold index) to answer /search with; repeatable")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per graph")
    p.add_argument("--preferred-batch", type=int, default=None,
                   help="rows at which a batch starts without waiting for --max-delay-ms (default: measured at "
                        "start-up, the smallest batch within 10%% of the engine's best time per image)")
    p.add_argument("--expect-digest", action="append", default=[], metavar="NAME=DIGEST",
                   help="serve model NAME only if its bundle has this digest (clipfold inspect prints it); repeatable")
    p.add_argument("--spin", action="store_true",
                   help="let ONNX Runtime threads busy-wait between calls (off: they would take the event loop's cores)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="port of the Open Inference Protocol over gRPC (tritonclient.grpc; default 8001, 0: off)")
    p.add_argument("--ui", action=argparse.BooleanOptionalAction, default=None,
                   help="the page at /ui: classify dropped images, search the index (default: on when --host is "
                        "loopback; --no-ui turns it off)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="hand a bundle to another serving system")
    export_sub = p.add_subparsers(dest="export_command", required=True)
    p = export_sub.add_parser("triton", help="write a Triton Inference Server model repository (ensemble of "
                              "preprocessing, the ONNX engine and labels), validated against the graph")
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", required=True, type=Path, help="repository folder to write")
    p.add_argument("--name", default=None, help="ensemble model name (default: the bundle folder's name)")
    p.add_argument("--variant", default=None, help="variant to export (default: the bundle's default)")
    p.add_argument("--max-batch", type=int, default=32, help="max_batch_size of every model (default 32)")
    p.add_argument("--preferred-batch", default=None, help="dynamic batching's preferred sizes, e.g. 8,32 "
                   "(default: max batch / 4 and max batch)")
    p.add_argument("--max-queue-delay-us", type=int, default=5000, help="dynamic batching's max queue delay (default 5000)")
    p.add_argument("--instances", type=int, default=1, help="engine instances per device (default 1)")
    p.add_argument("--preprocess-instances", type=int, default=2, help="Python preprocessing instances (default 2)")
    p.add_argument("--kind", default=None, choices=("cpu", "gpu"),
                   help="where the engine instances run (default: gpu with --platform tensorrt, else cpu)")
    p.add_argument("--platform", default="onnxruntime", choices=("onnxruntime", "tensorrt"),
                   help="the engine model: the variant's ONNX graph (onnxruntime_onnx, default) or its TensorRT plan "
                        "(tensorrt_plan; built with clipfold engine build)")
    p.add_argument("--compute-capability", default=None, help="with --platform tensorrt: which GPU's plan, e.g. 8.7")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_triton)

    p = sub.add_parser("models", help="list the model names open_clip knows (plus clipfold-tiny)")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ClipfoldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
