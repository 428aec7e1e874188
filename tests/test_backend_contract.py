"""Every backend the registry names, on one bundle, against open_clip eager.

One small bundle (the embedded tiny model, with its fp32 ONNX variant and the ``fp32-native``
kernel variant) is compiled once; each backend of ``runtime/backends/registry.BACKENDS`` is opened
through the registry (``open_backend``) on the variant it runs, fed the same uint8 pixels, and must
give (a) image embeddings of cosine >= 0.9999 with open_clip's ``encode_image`` on the same pixels
normalized in the test, and (b) the same top-1 label as open_clip's own zero-shot classifier
(``open_clip.build_zero_shot_classifier``, open_clip/zero_shot_classifier.py) over the bundle's
labels and templates, scored as CLIP does (``logit_scale.exp() * f @ W``, as in open_clip's
``CLIP.forward``). A backend that cannot run on this machine (TensorRT and ONNX Runtime's CUDA
provider without an NVIDIA GPU, OpenVINO not installed, the native kernel without AVX2) is skipped
with the reason; a newly registered backend fails here until this test says which variant it runs.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfold.compile.tiny import data
from clipfold.runtime.backends.registry import BACKENDS, backend_class, open_backend
from clipfold.runtime.preprocess import preprocess

# registry name -> the bundle variant it runs here (None: no variant of this bundle; the reason is given)
VARIANT_FOR = {"onnxruntime": "fp32", "onnxruntime-cuda": "fp32", "openvino": "fp32", "native": "fp32-native",
               "tensorrt": None}


@pytest.fixture(scope="module")
def bundle(tiny_native_bundle):
    return tiny_native_bundle  # fp32 and fp32-native, compiled once per session (conftest.py); only read here


@pytest.fixture(scope="module")
def pixels(bundle):
    images = [s.image for s in data.generate(8, seed=2024)]
    noise = np.random.default_rng(5).integers(0, 256, (2, 3, *bundle.manifest.preprocess.image_size), dtype=np.uint8)
    return np.concatenate([preprocess(images, bundle.manifest.preprocess), noise])


@pytest.fixture(scope="module")
def reference(bundle, tiny, pixels):
    """(unit embeddings, logits) of open_clip eager on the pixels, in float64 where the test does the math."""
    from open_clip import build_zero_shot_classifier

    m = bundle.manifest
    spec = m.preprocess
    x = torch.from_numpy(pixels).double() / 255.0  # torchvision to_tensor, then Normalize(mean, std)
    x = ((x - torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1))
         / torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)).float()
    model = tiny.model.eval()
    with torch.no_grad():
        features = F.normalize(model.encode_image(x), dim=-1).double()
        classifier = build_zero_shot_classifier(
            model, tiny.tokenizer, list(m.labels), [lambda c, t=t: t.format(c) for t in m.head.templates],
            num_classes_per_batch=len(m.labels), device="cpu", use_tqdm=False).double()
        logits = model.logit_scale.exp().double() * features @ classifier
    return features.numpy(), logits.numpy()


def _unavailable(name: str, bundle) -> str | None:
    if name == "tensorrt":
        have = "installed" if importlib.util.find_spec("tensorrt") else "not installed"
        return (f"TensorRT runs tensorrt-* variants built on an NVIDIA GPU (compile --backend tensorrt, then engine "
                f"build; tests/test_gpu_engines.py); TensorRT is {have} here")
    if name == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} offers {ort.get_available_providers()}, no CUDA provider"
    if name == "openvino" and importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (pip install clipfold[openvino])"
    if name == "native":
        from clipfold.kernels.vit.tower import kernel_available

        if not kernel_available():
            return "the native ViT kernel needs x86-64 with AVX2 and FMA"
        if "fp32-native" not in [v.name for v in bundle.manifest.variants]:
            return "compile skipped the fp32-native variant here"
    return None


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_matches_open_clip_eager(name, bundle, pixels, reference):
    assert name in VARIANT_FOR, f"backend {name!r} is registered: add the variant it runs to VARIANT_FOR"
    reason = _unavailable(name, bundle)
    if reason is not None:
        pytest.skip(reason)
    variant = bundle.manifest.variant(VARIANT_FOR[name])
    backend = open_backend(name, variant, bundle.path / variant.file, threads=2)
    assert isinstance(backend, backend_class(name)) and backend.name == name
    out = backend.run({"pixels": pixels})

    features, logits = reference
    embedding = out["embedding"].astype(np.float64)
    cosine = np.sum(embedding * features, axis=1) / np.linalg.norm(embedding, axis=1)
    assert cosine.min() >= 0.9999, f"{name}: embedding cosine with open_clip eager {cosine.min():.6f}"
    top1 = out["indices"][:, 0]
    expected = logits.argmax(axis=1)
    # equal labels, or the engine's pick scores within 1e-6 of the reference's best (a tie)
    picked = np.take_along_axis(logits, top1[:, None].astype(np.int64), axis=1)[:, 0]
    assert np.all((top1 == expected) | (logits.max(axis=1) - picked <= 1e-6)), (name, top1, expected)
    assert out["indices"].shape == (len(pixels), variant.top_k)
