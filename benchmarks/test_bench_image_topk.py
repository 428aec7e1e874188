"""Image → top-k, all in one run: open_clip eager, clipfold fp32 and its reduced-precision variants.

Speed: random-weight ViT-B-32 (latency does not depend on the weights). Pairs, as ratios of
medians (reference / candidate, > 1 means the candidate is faster):

* ``vitb32_image_to_top5_b{1,8}``: open_clip eager vs the fused fp32 ONNX Runtime engine;
* ``vitb32_native_image_to_top5_b{1,8}``: open_clip eager vs the fp32-native engine (the same fp32
  tower run by clipfold's own kernel, :mod:`clipfold.kernels.vit`; target >= 2.0x at b1), and
  ``vitb32_fp32_vs_native_b{1,8}``: the ONNX Runtime fp32 engine vs it;
* ``vitb32_{variant}_vs_fp32_b{1,8}``: the fp32 engine vs each variant (target >= 1.3x at b8 for
  the best int8 variant);
* ``vitb32_eager_vs_gemm_floor_b1`` and ``vitb32_fp32_vs_gemm_floor_b1``: the roofline. The fp32
  engine's weight multiplications alone, as plain ONNX Runtime MatMuls (:mod:`benchmarks.gemm_floor`),
  are the least time an engine doing that arithmetic on ONNX Runtime's MatMul needs here; eager over
  floor is the most such an engine can gain over eager, fp32 over floor how far it is from it.

Accuracy of the same recipes: the embedded tiny model, compiled with the same precisions and the
default gate (min cosine 0.99, top-1 agreement 99 %) on held-out images; its gate figures are
written beside the ratios. Random weights make ViT-B-32's own agreement figures meaningless, so
its variants are built with the gate's limits at zero and the search off (figures still recorded).

Both sides start from decoded PIL images and end at top-k labels, so preprocessing is counted on
both (torchvision on the eager side, Pillow + numpy in the runtime). Run with ``make bench``.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from clipfold.compile.adapters.fit import FitConfig, fit_adapter
from clipfold.compile.config import CompileConfig
from clipfold.compile.head import build_zero_shot_head
from clipfold.compile.load import load_model
from clipfold.compile.pipeline import compile_bundle
from clipfold.compile.precision import GateConfig, QuantConfig
from clipfold.compile.tiny import data
from clipfold.compile.tiny.samples import write_background_folder
from clipfold.runtime import Engine
from clipfold.runtime.backend import cpu_session_options
from clipfold.runtime.preprocess import preprocess

from benchmarks.gemm_floor import floor_model, gemm_shapes, gflop

LABELS = tuple(data.class_names())
MODEL = "ViT-B-32"
VARIANTS = ("int8-dynamic", "int8-static", "int4-weight")
RELAXED = GateConfig(min_cosine=0.0, min_top1_agreement=0.0, max_accuracy_drop=1.0, images=16)


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
                                       precisions=("fp32", "fp32-native", *VARIANTS), quant=QuantConfig(search=False),
                                       gate=RELAXED))
    engines = {v.name: Engine.open(vit.path, variant=v.name) for v in vit.manifest.variants}
    torch.manual_seed(0)
    loaded = load_model(MODEL)
    head = build_zero_shot_head(loaded.model, loaded.tokenizer, LABELS, ("{}",))
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms(MODEL)
    images = [s.image for s in data.generate(8, seed=3)]
    gates = {**_gate_figures(vit.manifest, "vitb32-random"), **_tiny_gates(tmp)}
    fp32 = vit.path / vit.manifest.variant("fp32").file
    shapes = gemm_shapes(fp32, {"pixels": preprocess(images[:1], vit.manifest.preprocess)})
    feeds = floor_model(shapes, tmp / "gemm_floor.onnx")
    # The engines' own session options (threads, thread-pool blocks), so the floor bounds them.
    floor = (ort.InferenceSession(str(tmp / "gemm_floor.onnx"), cpu_session_options(), providers=["CPUExecutionProvider"]),
             feeds, gflop(shapes))
    return engines, loaded.model, head, transform, images, gates, floor


def _tiny_gates(tmp) -> dict:
    """The same precisions on the tiny model's held-out images of the few-shot background task,
    gated with the defaults (a variant that misses would raise here)."""
    support = tmp / "support"
    test = tmp / "test"
    for folder, samples in ((support, data.per_background(12, 11)), (test, data.per_background(50, 99))):
        write_background_folder(folder, samples)
    adapter = tmp / "gda.safetensors"
    fit_adapter(FitConfig("gda", support, adapter, templates=("a photo on a {}.", "a {}."), cache_dir=None))
    tiny = compile_bundle(CompileConfig(labels=None, adapter=adapter, out=tmp / "tiny.bundle", precisions=("fp32", *VARIANTS),
                                        quant=QuantConfig(calib=support), gate=GateConfig(data=test)))
    return _gate_figures(tiny.manifest, "tiny-gda")


def _eager_topk(model, head, transform, images, k=5):
    with torch.inference_mode():
        x = torch.stack([transform(im) for im in images])
        f = F.normalize(model.encode_image(x), dim=-1)
        return head.scores(f).topk(k, dim=-1)


@pytest.mark.parametrize("batch", [1, 8])
def test_eager(benchmark, setup, batch):
    engines, model, head, transform, images, gates, floor = setup
    roles = {f"vitb32_image_to_top5_b{batch}": "reference", f"vitb32_native_image_to_top5_b{batch}": "reference",
             **({"vitb32_eager_vs_gemm_floor_b1": "reference"} if batch == 1 else {})}
    benchmark.extra_info.update(pairs=roles, gates=gates)
    benchmark.pedantic(_eager_topk, args=(model, head, transform, images[:batch]), rounds=15, warmup_rounds=2)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("variant", ["fp32", *VARIANTS])
def test_clipfold_onnxruntime(benchmark, setup, batch, variant):
    engines, model, head, transform, images, gates, floor = setup
    if variant == "fp32":
        roles = {f"vitb32_image_to_top5_b{batch}": "candidate", f"vitb32_fp32_vs_native_b{batch}": "reference",
                 **{f"vitb32_{v}_vs_fp32_b{batch}": "reference" for v in VARIANTS},
                 **({"vitb32_fp32_vs_gemm_floor_b1": "reference"} if batch == 1 else {})}
    else:
        roles = {f"vitb32_{variant}_vs_fp32_b{batch}": "candidate"}
    benchmark.extra_info.update(pairs=roles, variant=variant)
    result = benchmark.pedantic(engines[variant].classify, args=(images[:batch],), kwargs={"k": 5}, rounds=15,
                                warmup_rounds=2)
    assert len(result) == batch


@pytest.mark.parametrize("batch", [1, 8])
def test_clipfold_native(benchmark, setup, batch):
    engines, *_, images, gates, floor = setup
    benchmark.extra_info.update(pairs={f"vitb32_native_image_to_top5_b{batch}": "candidate",
                                       f"vitb32_fp32_vs_native_b{batch}": "candidate"}, variant="fp32-native")
    result = benchmark.pedantic(engines["fp32-native"].classify, args=(images[:batch],), kwargs={"k": 5}, rounds=15,
                                warmup_rounds=2)
    assert len(result) == batch


def test_gemm_floor(benchmark, setup):
    """The fp32 engine's weight GEMMs alone at batch 1 (see the module docstring)."""
    *_, (session, feeds, gflops) = setup
    benchmark.extra_info.update(pairs={"vitb32_eager_vs_gemm_floor_b1": "candidate",
                                       "vitb32_fp32_vs_gemm_floor_b1": "candidate"}, gflop=gflops)
    outputs = benchmark.pedantic(session.run, args=(None, feeds), rounds=15, warmup_rounds=2)
    assert len(outputs) == len(session.get_outputs())
    benchmark.extra_info["gflop_per_s"] = gflops / benchmark.stats.stats.median
