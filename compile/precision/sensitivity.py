"""The int8 sensitivity ranking: which quantized nodes add the most error (see :mod:`.variants`).

Both graphs run on the search images with every ranked node's input and output as extra graph
outputs, in batches that keep their activations within :data:`RANK_BATCH_BYTES` (ViT-L-14: about
420 MB per image per graph; all 32 images at once held over 20 GiB); only each tensor's per-image
cosine is kept between batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipfold.compile.precision.gate import row_cosine
from clipfold.compile.stages.streamed_save import save_streamed, without_weights

RANK_BATCH_BYTES = 1 << 30  # activations of both graphs held at once by the sensitivity ranking


def _with_outputs(path: Path, tensors: list[str], dst: Path) -> Path:
    """``path`` with ``tensors`` added as graph outputs, saved as ``dst`` (next to ``path``, so that
    external weight files resolve); nothing of the model is kept in memory afterwards."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    present = {o.name for o in model.graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    if not all(t in types for t in tensors):
        try:
            inferred = onnx.shape_inference.infer_shapes(without_weights(model))
            types = {**{v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}, **types}
            del inferred
        except Exception:  # inference is only a source of dtypes here; unknown ones default to float
            pass
    model.graph.output.extend(helper.make_tensor_value_info(t, types.get(t) or TensorProto.FLOAT, None)
                              for t in tensors if t not in present)
    save_streamed(model, dst)
    return dst


class _Activations:
    """An ONNX Runtime session returning ``tensors`` of a graph (those it has), without the CPU
    arena, so that what one batch held is returned before the next runs."""

    def __init__(self, path: Path, tensors: list[str]):
        import onnxruntime as ort

        dst = path.with_name(f".{path.stem}.rank.onnx")
        try:
            options = ort.SessionOptions()
            options.enable_cpu_mem_arena = False
            self.session = ort.InferenceSession(str(_with_outputs(path, tensors, dst)), options,
                                                providers=["CPUExecutionProvider"])
        finally:
            dst.unlink(missing_ok=True)
        wanted = set(tensors)
        self.names = [o.name for o in self.session.get_outputs() if o.name in wanted]

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, {"pixels": pixels})))


def rank_batch(one_image_bytes: int, images: int, budget: int) -> int:
    """Images per ranking batch: as many as keep both graphs' activations within ``budget``."""
    return max(1, min(images, budget // max(one_image_bytes, 1)))


def rank_by_added_error(quantized: Path, reference: Path, nodes: list[str], pixels: np.ndarray,
                        batch: int | None = None) -> list[str]:
    """``nodes`` sorted by the error each adds: (1 - cos) of its output minus that of its input.

    Streams: the images run in batches (``batch``, or as many as keep both graphs' activations
    within :data:`RANK_BATCH_BYTES`), and only each tensor's per-image cosines are kept. The
    cosine is per image, so the figures do not depend on the batching, except through
    int8-dynamic's activation scale, which its quantizer takes over the whole batch.
    """
    import onnx

    graph = onnx.load(str(reference), load_external_data=False).graph
    by_name = {n.name: n for n in graph.node}
    ios = {name: (by_name[name].input[0], by_name[name].output[0]) for name in nodes if name in by_name}
    del graph, by_name
    tensors = sorted({t for pair in ios.values() for t in pair})
    ref, got = _Activations(Path(reference), tensors), _Activations(Path(quantized), tensors)
    common = [t for t in ref.names if t in set(got.names)]
    if batch is None:
        one = sum(a.nbytes for a in ref(pixels[:1]).values()) + sum(a.nbytes for a in got(pixels[:1]).values())
        batch = rank_batch(one, len(pixels), RANK_BATCH_BYTES)
    cosines: dict[str, list[np.ndarray]] = {t: [] for t in common}
    for lo in range(0, len(pixels), batch):
        a, b = ref(pixels[lo:lo + batch]), got(pixels[lo:lo + batch])
        for t in common:
            cosines[t].append(row_cosine(a[t], b[t]))
        del a, b
    error = {t: float(np.mean(1.0 - np.concatenate(c))) for t, c in cosines.items()}
    added = {name: error.get(out, 0.0) - error.get(inp, 0.0) for name, (inp, out) in ios.items()}
    return sorted(added, key=lambda name: -added[name])
