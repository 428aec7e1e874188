"""Reduced-precision variants: build each from the verified fp32 graph, gate it, or refuse it.

For each precision after fp32: build the file into the bundle's staging directory, run it and
fp32 on held-out images, and compare (:mod:`.gate`). With ``search`` (the default), a variant that
misses returns its most sensitive nodes to float, 1, 2, 4, ... of them and then bisecting, and keeps
the fewest that pass; needing all of them is a miss (that would be fp32 under another name). A variant
that still misses raises :class:`~clipfold.errors.GateError` naming every figure that missed and
what the search left in float; the whole compile then writes nothing.

Every choice (whether to search, the ranking, each bisection step) is made on the *search*
images; the figures recorded and held to the limits come from the disjoint *gate* images, on which
nothing was chosen (:func:`~.image_sets.selection_images`; the split is recorded in ``Gate.selection``).

Sensitivity of a quantized node = how much error it *adds*: one minus the cosine of its output
against fp32, minus the same for its activation input, both measured with every node quantized.
That ranks the node where error appears, not the later nodes that merely inherit it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

import clipfold.compile.precision.float16 as float16
import clipfold.compile.precision.gate as gating
import clipfold.compile.precision.image_sets as image_sets
import clipfold.compile.precision.quantize as quantize
import clipfold.compile.precision.sensitivity as sensitivity
from clipfold.compile.config import VerifyConfig
from clipfold.compile.precision.config import CALIBRATED, PRECISIONS, GateConfig, QuantConfig
from clipfold.compile.stages.verify import Reference, compare
from clipfold.compile.tensorrt.build import check_tensorrt_graph
from clipfold.errors import BackendUnavailableError, ClipfoldError, ExportError, GateError
from clipfold.runtime.backends.kernel_head import KernelHead
from clipfold.runtime.bundle.agreement import Gate
from clipfold.runtime.bundle.layout import variant_file
from clipfold.runtime.bundle.schema import PreprocessSpec, TensorSpec, Variant
from clipfold.runtime.image_folders import read_folder

log = logging.getLogger(__name__)


@dataclass
class Sources:
    """The verified fp32 graphs the variants start from, and their tensor specs."""

    fused: Path
    portable: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    top_k: int
    head: KernelHead | None = None  # the head scored by the top-k kernel, when it is not in the graph


def check_early(precisions: Sequence[str], quant: QuantConfig, gate_cfg: GateConfig) -> None:
    """What can be refused before any model loads: a precision no backend here can run, missing
    calibration or gate folders."""
    wanted = [p for p in precisions if p != "fp32"]
    if "bf16" in wanted:  # OpenVINO on a CPU with AMX or AVX512-BF16, else refused with the reason
        from clipfold.compile.precision.bf16 import check_bf16

        check_bf16()
    if "fp32-native" in wanted:
        from clipfold.kernels.vit.tower import kernel_available

        if not kernel_available():
            raise BackendUnavailableError("fp32-native needs an x86-64 CPU with AVX2 and FMA to run and be verified; "
                                          "this one lacks them (the fp32 variant runs everywhere)")
    if wanted and quant.calib is not None and set(CALIBRATED) & set(wanted):
        image_sets.calibration_paths(quant)
    if wanted and gate_cfg.data is not None:
        read_folder(gate_cfg.data)
    if wanted and gate_cfg.search_data is not None:
        read_folder(gate_cfg.search_data)


def build_variants(precisions: Sequence[str], stage: Path, sources: Sources, spec: PreprocessSpec,
                   labels: Sequence[str], reference: Reference, verify: VerifyConfig, quant: QuantConfig,
                   gate_cfg: GateConfig, progress: Callable[[str], None] | None = None) -> list[Variant]:
    """Every precision but fp32, built, gated and described; files are written into ``stage``."""
    wanted = [p for p in precisions if p != "fp32"]
    if not wanted:
        return []
    check_early(precisions, quant, gate_cfg)
    say = progress or (lambda message: None)
    images = _judging_images(wanted, sources, spec, labels, quant, gate_cfg)
    say(f"gate: fp32 on {images.held.source}; choices on {images.search.source}")
    variants = []
    with quantize.scratch_dir(stage) as scratch:
        scratch = Path(scratch)
        graphs: dict[str, tuple[Path, list[str]]] = {}

        def source(kind: str) -> tuple[Path, list[str]]:
            if kind not in graphs:
                src = sources.portable if kind == "portable" else sources.fused
                path = scratch / f"{kind}.onnx"
                graphs[kind] = (path, quantize.prepare(src, path, unpack=kind == "unpacked"))
            return graphs[kind]

        for precision in wanted:
            say(f"building {precision}: {PRECISIONS[precision][0]}")
            if precision == "bf16":  # the fp32 graph itself, run in bf16: gated, nothing built
                variants.append(_bf16_variant(sources, spec, labels, reference, verify, gate_cfg, say))
                continue
            builder = _Builder(precision, stage / variant_file(precision), scratch, source, quant, images.calib,
                               images.search.pixels[:32])
            variants.append(_quantized_variant(builder, stage, sources, images, reference, verify, gate_cfg, say))
    return variants


@dataclass
class _JudgingImages:
    """The images every variant is judged on: ``held`` (the gate) and ``search`` (every choice) with
    fp32's outputs on each, the calibration images, and the record of the split kept in each gate."""

    held: image_sets.HeldOut
    search: image_sets.HeldOut
    fp32_held: dict[str, np.ndarray]
    fp32_search: dict[str, np.ndarray]
    record: dict
    calib: np.ndarray | None = None
    calib_source: str | None = None


def _judging_images(wanted: Sequence[str], sources: Sources, spec: PreprocessSpec, labels: Sequence[str],
                    quant: QuantConfig, gate_cfg: GateConfig) -> _JudgingImages:
    calib = calib_source = None
    calibrated = bool(set(CALIBRATED) & set(wanted))
    if calibrated:
        calib, calib_source = image_sets.calibration_images(spec, quant)
    calib_files = image_sets.calibration_paths(quant) if calibrated and quant.calib is not None else ()
    selection = image_sets.selection_images(spec, labels, gate_cfg, calib_files)
    held, search = selection.gate, selection.search
    record = {"calibration": calib_source, **selection.record} if calibrated else dict(selection.record)
    fp32_held = gating.run_graph(sources.fused, sources.inputs, sources.outputs, held.pixels, head=sources.head)
    fp32_search = gating.run_graph(sources.fused, sources.inputs, sources.outputs, search.pixels, head=sources.head)
    return _JudgingImages(held, search, fp32_held, fp32_search, record, calib, calib_source)


def _bf16_variant(sources: Sources, spec: PreprocessSpec, labels: Sequence[str], reference: Reference,
                  verify: VerifyConfig, gate_cfg: GateConfig, say: Callable[[str], None]) -> Variant:
    """bf16 makes no choice: every held-out image judges it (the search share included)."""
    from clipfold.compile.precision.bf16 import build_bf16

    every = image_sets.held_out_images(spec, labels, gate_cfg)
    every_out = gating.run_graph(sources.fused, sources.inputs, sources.outputs, every.pixels, head=sources.head)
    return build_bf16(sources, every, every_out, gate_cfg, verify.tie_tolerance,
                      lambda run: _eager_parity(run, reference, verify), say)


def _quantized_variant(builder: _Builder, stage: Path, sources: Sources, images: _JudgingImages, reference: Reference,
                       verify: VerifyConfig, gate_cfg: GateConfig, say: Callable[[str], None]) -> Variant:
    """Build ``builder``'s precision into ``stage``, gated (its search on the search images), and describe it."""
    precision, built = builder.precision, builder.out
    details, figures, kept = builder.build_and_gate(
        lambda path: gating.measure(images.fp32_held, _run_variant(precision, path, sources, images.held.pixels),
                                    images.held, gate_cfg, verify.tie_tolerance),
        lambda path: gating.measure(images.fp32_search, _run_variant(precision, path, sources, images.search.pixels),
                                    images.search, gate_cfg, verify.tie_tolerance), gate_cfg, say)
    if "tensorrt" in PRECISIONS[precision][1]:
        check_tensorrt_graph(built, precision)
    if images.calib_source is not None and "calibration" in details:
        details["calibration_source"] = images.calib_source
    figures = Gate(**{**figures.__dict__, "kept_float": tuple(kept), "selection": images.record})
    parity = _eager_parity(lambda pixels: _run_variant(precision, built, sources, pixels), reference, verify)
    say(f"  {precision}: min cosine {figures.embedding_cosine_min:.5f}, top-1 agreement "
        f"{figures.top1_agreement:.1%}" + (f", accuracy {figures.accuracy:.1%} (fp32 {figures.reference_accuracy:.1%})"
                                            if figures.accuracy is not None else "")
        + (f"; {len(kept)} node(s) returned to float" if kept else ""))
    return Variant(name=precision, file=variant_file(precision), format="onnx", precision=precision,
                   inputs=sources.inputs, outputs=sources.outputs, parity=parity, top_k=sources.top_k,
                   backends=PRECISIONS[precision][1], quantization=details, gate=figures,
                   fused_ops=quantize.fused_op_counts(built))


def _run_variant(precision: str, path: Path, sources: Sources, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX Runtime on a freshly built variant; its own failure is an export failure, named."""
    try:
        return gating.run_graph(path, sources.inputs, sources.outputs, pixels, head=sources.head)
    except ClipfoldError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for invalid graphs
        raise ExportError(f"the {precision} variant could not be run by ONNX Runtime: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]}") from exc


def _eager_parity(run: Callable[[np.ndarray], dict[str, np.ndarray]], reference: Reference, verify: VerifyConfig):
    """The same figures fp32 records against open_clip eager, for information (not enforced)."""
    out = run(reference.pixels)
    parity, _ = compare(reference, out["scores"], out["indices"], out["embedding"], verify, min_cosine=0.0)
    return parity


class _Builder:
    # The graph each precision starts from, and the operator types its quantizer can handle.
    KIND = {"int8-dynamic": "fused", "fp16": "fused", "fp8": "portable", "tensorrt-fp16": "portable",
            "tensorrt-int8": "portable"}
    OPS = {"int8-dynamic": ("MatMul", "Attention"), "int8-weight": ("MatMul",), "int4-weight": ("MatMul",)}

    def __init__(self, precision: str, out: Path, scratch: Path, source, quant: QuantConfig, calib,
                 probe: np.ndarray):
        self.precision, self.out, self.scratch, self.source, self.quant, self.calib = (
            precision, out, scratch, source, quant, calib)
        self.probe = probe  # a few held-out images for the sensitivity ranking
        src, always = source(self.KIND.get(precision, "unpacked"))
        self.src = src
        graph = onnx.load(str(src), load_external_data=False)  # names only: read once, weights stay on disk
        # Never quantized: the head, activation-by-activation MatMuls and every --keep-float type.
        self.float_nodes = sorted(set(always) | set(quantize.nodes_of_types(graph, quant.keep_float)))
        ops = self.OPS.get(precision, quantize.QUANTIZABLE)
        self.candidates = quantize.quantizable_nodes(graph, self.float_nodes, quant.keep_float, ops)

    def _build(self, returned: Sequence[str]) -> dict:
        p, q, exclude = self.precision, self.quant, sorted(set(self.float_nodes) | set(returned))
        if p == "int8-dynamic":
            return quantize.int8_dynamic(self.src, self.out, exclude, q)
        if p in ("int8-static", "fp8", "tensorrt-int8"):
            return quantize.int8_static(self.src, self.out, exclude, q, self.calib, self.scratch / f"ranges-{p}.json",
                                        fp8=p == "fp8", symmetric=p == "tensorrt-int8")
        if p in ("int8-weight", "int4-weight"):
            return quantize.weight_only(self.src, self.out, exclude, q, bits=8 if p == "int8-weight" else 4)
        if p in ("fp16", "tensorrt-fp16"):
            return float16.convert(self.src, self.out, exclude, q, residual_fp32=p == "fp16")
        raise AssertionError(p)

    def build_and_gate(self, gate, search, cfg: GateConfig, say) -> tuple[dict, Gate, list[str]]:
        """Build with every candidate quantized; if it misses on the search images, return nodes to float
        by rank (1, 2, 4, ... of them, then bisect, all on the search images) and keep the fewest that pass
        there. ``gate(path)`` / ``search(path)`` measure a built file on the gate / search images; the
        returned figures and the final verdict are the gate's, on images no choice was made on."""
        details = self._build(())
        first = missed = gating.failures(search(self.out), cfg)
        ranked: list[str] = []
        returned: list[str] = []
        if missed and self.quant.search:
            ranked = self._rank()
            passing, failing, count = None, 0, 1
            say(f"  {self.precision}: {'; '.join(missed)} on the search images; searching {len(ranked)} nodes for "
                "the fewest to keep in float")
            while failing < len(ranked) - 1 and (passing is None or passing - failing > 1):
                count = min(count, len(ranked) - 1) if passing is None else (failing + passing) // 2
                self._build(ranked[:count])
                missed = gating.failures(search(self.out), cfg)
                say(f"  {self.precision}: {count} of {len(ranked)} in float: {'; '.join(missed) or 'passes'}")
                if missed:
                    failing, count = count, count * 2
                else:
                    passing = count
            if passing is not None:
                returned = ranked[:passing]
                details = self._build(returned)
        figures = gate(self.out)
        missed = gating.failures(figures, cfg)
        if ranked and not returned:  # no passing count on the search images: a miss whatever the gate says
            missed = missed or first
        if missed and not first:
            first = missed
        if missed:
            self.out.unlink(missing_ok=True)
            if not self.quant.search:
                note = "The sensitivity search was off (--no-search)."
            elif returned:
                note = (f"The search kept {len(returned)} of {len(ranked)} quantizable nodes in float, which passes on "
                        f"the search images, but the gate's own images missed: {'; '.join(missed)}. A larger "
                        "--search-data folder makes the search's choice carry over.")
            elif not ranked:
                note = "No node could be returned to float: all quantized nodes are outside the search."
            else:
                note = (f"The search returned up to {len(ranked) - 1} of {len(ranked)} quantizable nodes to float "
                        f"(most sensitive first: {', '.join(ranked[:4])}{' ...' if len(ranked) > 4 else ''}) and "
                        "the gate still missed; all of them would leave the fp32 graph under another name.")
            raise GateError(
                f"variant {self.precision!r} misses the accuracy gate against fp32 on {figures.images} images "
                f"({figures.source}); fully quantized (on the search images):\n  - " + "\n  - ".join(first) +
                f"\n{note}\n"
                "Lower the limits (--gate-min-cosine, --gate-min-top1), gate on labelled data (--gate-data), "
                "keep operator types in float (--keep-float), or drop the variant.", first)
        if returned:
            details = {**details, "returned_to_float": len(returned), "quantizable": len(ranked)}
        return details, figures, returned

    def _rank(self) -> list[str]:
        """Quantized nodes ordered by the error they add (largest first)."""
        return sensitivity.rank_by_added_error(self.out, self.src, self.candidates, self.probe)
