"""The peers of the image -> top-k benchmark: what a user of this machine would run instead of clipfold.

Every peer starts, like clipfold, from decoded PIL images and ends at top-k labels, and runs the
same random-weight model:

* ``eager``: open_clip's ``encode_image`` + the zero-shot head in torch, fp32;
* ``eager-bf16``: the same under ``torch.autocast("cpu", torch.bfloat16)``, where the CPU has bf16;
* ``onnxruntime``: a plain ``torch.onnx.export`` of that classifier (image tensor in, top-k out),
  in ONNX Runtime with its default session options;
* ``openvino``: OpenVINO reading the same ONNX file with its default CPU configuration (on an AMX
  machine its default inference precision is bf16);
* ``openvino-int8``: that model quantized by NNCF's post-training quantization
  (``model_type=TRANSFORMER``, as NNCF documents for transformers) on generated calibration images
  disjoint from the timed ones, run by OpenVINO.

Peers preprocess with open_clip's torchvision transform (what each of them would use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CALIB_SEED = 99
CALIB_IMAGES = 16  # NNCF statistics on ViT-B-32 take minutes on 2 cores; the speed does not depend on them


class PlainClassifier(nn.Module):
    """open_clip's image tower, unit features, the zero-shot head's softmax, top-k."""

    def __init__(self, model, head, k: int):
        super().__init__()
        self.model, self.k = model, k
        self.register_buffer("weight", (head.logit_scale * head.class_embeddings.T).contiguous())

    def forward(self, image: torch.Tensor):
        features = F.normalize(self.model.encode_image(image), dim=-1)
        return (features @ self.weight).softmax(-1).topk(self.k, dim=-1)


def cpu_has_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return " avx512_bf16" in flags or " amx_bf16" in flags


def export_plain(model, head, path: Path, image_size: int, k: int = 5) -> Path:
    """``torch.onnx.export`` with defaults but a dynamic batch: the export a user would write."""
    example = torch.zeros(2, 3, image_size, image_size)  # torch.export specializes a dimension of size 1
    with torch.no_grad():
        program = torch.onnx.export(PlainClassifier(model, head, k).eval(), (example,), dynamo=True,
                                    input_names=["image"], output_names=["scores", "indices"],
                                    dynamic_shapes={"image": {0: torch.export.Dim("batch", max=1024)}})
    program.save(str(path))
    return path


def peers(model, head, transform, tmp: Path, image_size: int, calib_images: Sequence,
          labels: Sequence[str], k: int = 5) -> dict[str, Callable]:
    """name -> ``run(images) -> [[label, ...], ...]`` for each peer this machine has."""
    import onnxruntime as ort

    def tensor(images) -> torch.Tensor:
        return torch.stack([transform(im) for im in images])

    def labelled(indices) -> list[list[str]]:
        return [[labels[int(i)] for i in row] for row in np.asarray(indices)]

    @torch.inference_mode()
    def eager(images):
        f = F.normalize(model.encode_image(tensor(images)), dim=-1)
        return labelled(head.scores(f).topk(k, dim=-1).indices)

    out = {"eager": eager}
    if cpu_has_bf16():
        @torch.inference_mode()
        def eager_bf16(images):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                f = F.normalize(model.encode_image(tensor(images)).float(), dim=-1)
            return labelled(head.scores(f).topk(k, dim=-1).indices)

        out["eager-bf16"] = eager_bf16
    path = export_plain(model, head, tmp / "plain.onnx", image_size, k)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out["onnxruntime"] = lambda images: labelled(session.run(["indices"], {"image": tensor(images).numpy()})[0])
    try:
        import openvino as ov
    except ImportError:
        return out
    core = ov.Core()
    default = core.compile_model(str(path), "CPU").create_infer_request()
    out["openvino"] = lambda images: labelled(default.infer({"image": tensor(images).numpy()})["indices"])
    try:
        import nncf
    except ImportError:
        return out
    calib = [tensor([im]).numpy() for im in calib_images[:CALIB_IMAGES]]
    quantized = nncf.quantize(core.read_model(str(path)), nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calib))
    int8 = core.compile_model(quantized, "CPU").create_infer_request()
    out["openvino-int8"] = lambda images: labelled(int8.infer({"image": tensor(images).numpy()})["indices"])
    return out
