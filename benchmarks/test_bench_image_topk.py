"""Image → top-k, all in one run: clipfold's variants against the peers a user of this CPU would pick.

Speed: random-weight ViT-B-32 (latency does not depend on the weights), the same weights everywhere.
The peers (:mod:`benchmarks.image_peers`): open_clip eager fp32, open_clip eager under bf16 autocast
(where the CPU has bf16), a plain ``torch.onnx`` export in ONNX Runtime, OpenVINO's default on that
export (bf16 on AMX CPUs) and OpenVINO int8 through NNCF post-training quantization. clipfold: the
fused fp32 engine (ONNX Runtime, and the same graph on OpenVINO in f32), ``fp32-native`` (its own
AVX2 kernel), ``bf16`` (OpenVINO bf16, where the CPU has it) and the int8 / int4 variants.
Pairs, as ratios of medians (reference / candidate, > 1 means the candidate is faster):

* ``vitb32_best_peer_vs_best_clipfold_b{1,8}``: the fastest peer against the fastest clipfold variant
  (target on the AMX Xeon: >= 1.2x); the JSON names both;
* ``vitb32_openvino_default_vs_bf16_b{1,8}``: OpenVINO's default against clipfold's bf16 variant
  (target >= 1.0x at cosine >= 0.9999 to fp32);
* ``vitb32_image_to_top5_b{1,8}``: open_clip eager vs the fused fp32 ONNX Runtime engine;
  ``vitb32_native_image_to_top5_b{1,8}`` and ``vitb32_fp32_vs_native_b{1,8}``: eager and the fp32
  engine vs fp32-native (compile --if-faster keeps it only where the second is > 1);
* ``vitb32_fp32_vs_fp32_openvino_b{1,8}``: the fp32 graph on ONNX Runtime vs on OpenVINO (f32);
* ``vitb32_{variant}_vs_fp32_b{1,8}``: the fp32 engine vs each reduced-precision variant;
* the floors: ``vitb32_eager_vs_gemm_floor_b1`` / ``vitb32_fp32_vs_gemm_floor_b1`` (the fp32
  engine's weight multiplications alone as ONNX Runtime MatMuls, :mod:`benchmarks.gemm_floor`) and
  ``vitb32_openvino_default_vs_bf16_floor_b{1,8}`` (the same multiplications in OpenVINO bf16: the
  least time any engine spends on this arithmetic in bf16 with OpenVINO's GEMMs here).

Accuracy of the same recipes: the embedded tiny model, compiled with the same precisions and the
default gate (min cosine 0.99, top-1 agreement 99 %) on held-out images; its gate figures are
written beside the ratios. Random weights make ViT-B-32's own agreement figures meaningless, so
its variants are built with the gate's limits at zero and the search off (figures still recorded:
bf16's cosine to fp32 among them).

Both sides start from decoded PIL images and end at top-k labels, so preprocessing is counted on
both (torchvision on the peers' side, Pillow + numpy in the runtime). The JSON names the CPU (model
and flags) and the load average. Run with ``make bench``.
"""

from __future__ import annotations

import os

import onnxruntime as ort
import pytest
import torch

from benchmarks.gemm_floor import floor_model, gemm_shapes, gflop
from benchmarks.image_peers import peers
from clipfold.compile.adapters.fit import FitConfig, fit_adapter
from clipfold.compile.config import CompileConfig
from clipfold.compile.heads.zero_shot import build_zero_shot_head
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.precision.config import GateConfig, QuantConfig
from clipfold.compile.stages.load import load_model
from clipfold.compile.tiny import data
from clipfold.compile.tiny.samples import write_background_folder
from clipfold.runtime import Engine
from clipfold.runtime.backends.onnxruntime import cpu_session_options
from clipfold.runtime.backends.openvino import bf16_refusal
from clipfold.runtime.preprocess import preprocess

LABELS = tuple(data.class_names())
MODEL = os.environ.get("CLIPFOLD_BENCH_MODEL", "ViT-B-32")  # clipfold-tiny: a quick check of the benchmark itself
VARIANTS = ("int8-dynamic", "int8-static", "int4-weight")
BF16 = ("bf16",) if bf16_refusal() is None else ()
RELAXED = GateConfig(min_cosine=0.0, min_top1_agreement=0.0, max_accuracy_drop=1.0, images=16)
PEERS = ("eager", "eager-bf16", "onnxruntime", "openvino", "openvino-int8")
BATCHES = (1, 8)
ROUNDS, WARMUP = 15, 2


def _gate_figures(manifest, prefix: str) -> dict:
    return {f"{prefix}:{v.name}": {"min_cosine": v.gate.embedding_cosine_min, "mean_cosine": v.gate.embedding_cosine_mean,
                                   "top1_agreement": v.gate.top1_agreement, "accuracy": v.gate.accuracy,
                                   "fp32_accuracy": v.gate.reference_accuracy, "images": v.gate.images,
                                   "kept_float": len(v.gate.kept_float)}
            for v in manifest.variants if v.gate is not None}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    vit = compile_bundle(CompileConfig(labels=LABELS, out=tmp / "vitb32.bundle", model=MODEL, templates="label", top_k=5,
                                       precisions=("fp32", "fp32-native", *BF16, *VARIANTS),
                                       quant=QuantConfig(search=False), gate=RELAXED))
    engines = {v.name: Engine.open(vit.path, variant=v.name) for v in vit.manifest.variants}
    engines["fp32-openvino"] = Engine.open(vit.path, variant="fp32", backend="openvino")
    torch.manual_seed(0)
    loaded = load_model(MODEL)
    head = build_zero_shot_head(loaded.model, loaded.tokenizer, LABELS, ("{}",))
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms(MODEL)
    images = [s.image for s in data.generate(8, seed=3)]
    calib = [s.image for s in data.generate(32, seed=4)]  # NNCF's calibration: not the timed images
    runs = peers(loaded.model.eval(), head, transform, tmp, vit.manifest.preprocess.image_size[0], calib, LABELS)
    gates = {**_gate_figures(vit.manifest, "vitb32-random"), **_tiny_gates(tmp)}
    return engines, runs, images, gates, _floors(vit, images, tmp)


def _floors(vit, images, tmp) -> dict:
    """The fp32 engine's weight GEMMs alone: ONNX Runtime fp32 at batch 1, OpenVINO bf16 at 1 and 8."""
    fp32 = vit.path / vit.manifest.variant("fp32").file
    floors = {}
    for batch in BATCHES:
        shapes = gemm_shapes(fp32, {"pixels": preprocess(images[:batch], vit.manifest.preprocess)})
        path = tmp / f"gemm_floor_b{batch}.onnx"
        feeds = floor_model(shapes, path)
        if batch == 1:  # the engines' own session options (threads, thread-pool blocks), so the floor bounds them
            session = ort.InferenceSession(str(path), cpu_session_options(), providers=["CPUExecutionProvider"])
            floors["onnxruntime", batch] = (lambda s=session, f=feeds: s.run(None, f), gflop(shapes))
        if BF16:
            import openvino as ov

            request = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"}).create_infer_request()
            floors["openvino-bf16", batch] = (lambda r=request, f=feeds: r.infer(f), gflop(shapes))
    return floors


def _tiny_gates(tmp) -> dict:
    """The same precisions on the tiny model's held-out images of the few-shot background task,
    gated with the defaults (a variant that misses would raise here)."""
    support = tmp / "support"
    test = tmp / "test"
    for folder, samples in ((support, data.per_background(12, 11)), (test, data.per_background(50, 99))):
        write_background_folder(folder, samples)
    adapter = tmp / "gda.safetensors"
    fit_adapter(FitConfig("gda", support, adapter, templates=("a photo on a {}.", "a {}."), cache_dir=None))
    tiny = compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp / "tiny.bundle",
                                        precisions=("fp32", *BF16, *VARIANTS), quant=QuantConfig(calib=support),
                                        gate=GateConfig(data=test)))
    return _gate_figures(tiny.manifest, "tiny-gda")


BEST = "vitb32_best_peer_vs_best_clipfold_b{}"


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("peer", PEERS)
def test_peer(benchmark, setup, peer, batch):
    engines, runs, images, gates, floors = setup
    if peer not in runs:
        pytest.skip(f"peer {peer} does not run here (no bf16 for autocast, or openvino / nncf not installed)")
    roles = {BEST.format(batch): "reference"}
    if peer == "eager":
        roles.update({f"vitb32_image_to_top5_b{batch}": "reference", f"vitb32_native_image_to_top5_b{batch}": "reference",
                      **({"vitb32_eager_vs_gemm_floor_b1": "reference"} if batch == 1 else {})})
    if peer == "openvino":
        roles.update({f"vitb32_openvino_default_vs_bf16_b{batch}": "reference",
                      f"vitb32_openvino_default_vs_bf16_floor_b{batch}": "reference"})
    benchmark.extra_info.update(pairs=roles, gates=gates, peer=peer)
    result = benchmark.pedantic(runs[peer], args=(images[:batch],), rounds=ROUNDS, warmup_rounds=WARMUP)
    assert len(result) == batch


def _clipfold_roles(variant: str, batch: int) -> dict:
    roles = {BEST.format(batch): "candidate"}
    if variant == "fp32":
        roles.update({f"vitb32_image_to_top5_b{batch}": "candidate", f"vitb32_fp32_vs_native_b{batch}": "reference",
                      f"vitb32_fp32_vs_fp32_openvino_b{batch}": "reference",
                      **{f"vitb32_{v}_vs_fp32_b{batch}": "reference" for v in (*VARIANTS, *BF16)},
                      **({"vitb32_fp32_vs_gemm_floor_b1": "reference"} if batch == 1 else {})})
    elif variant == "fp32-native":
        roles.update({f"vitb32_native_image_to_top5_b{batch}": "candidate", f"vitb32_fp32_vs_native_b{batch}": "candidate"})
    elif variant == "fp32-openvino":
        roles[f"vitb32_fp32_vs_fp32_openvino_b{batch}"] = "candidate"
    else:
        roles[f"vitb32_{variant}_vs_fp32_b{batch}"] = "candidate"
        if variant == "bf16":
            roles[f"vitb32_openvino_default_vs_bf16_b{batch}"] = "candidate"
    return roles


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", ["fp32", "fp32-openvino", "fp32-native", "bf16", *VARIANTS])
def test_clipfold(benchmark, setup, variant, batch):
    engines, runs, images, gates, floors = setup
    if variant not in engines:
        pytest.skip(f"{variant} does not run on this CPU ({bf16_refusal()})")
    benchmark.extra_info.update(pairs=_clipfold_roles(variant, batch), variant=variant)
    result = benchmark.pedantic(engines[variant].classify, args=(images[:batch],), kwargs={"k": 5}, rounds=ROUNDS,
                                warmup_rounds=WARMUP)
    assert len(result) == batch


@pytest.mark.parametrize("floor,batch", [("onnxruntime", 1), ("openvino-bf16", 1), ("openvino-bf16", 8)])
def test_gemm_floor(benchmark, setup, floor, batch):
    """The fp32 engine's weight GEMMs alone (see the module docstring)."""
    *_, floors = setup
    if (floor, batch) not in floors:
        pytest.skip("no bf16 on this CPU")
    run, gflops = floors[floor, batch]
    roles = ({"vitb32_eager_vs_gemm_floor_b1": "candidate", "vitb32_fp32_vs_gemm_floor_b1": "candidate"}
             if floor == "onnxruntime" else {f"vitb32_openvino_default_vs_bf16_floor_b{batch}": "candidate"})
    benchmark.extra_info.update(pairs=roles, gflop=gflops)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP)
    if benchmark.stats is not None:  # (None under --benchmark-disable)
        benchmark.extra_info["gflop_per_s"] = gflops / benchmark.stats.stats.median
