"""clipfold's bf16 variant against OpenVINO's default, interleaved: ``python -m benchmarks.bf16_interleaved``.

Both run OpenVINO's bf16 kernels (on an AMX CPU OpenVINO's default precision is bf16); the calls
alternate, 20 each per batch size, so load from other processes falls on both alike. Random-weight
ViT-B-32, the same weights on both sides, decoded images to top-5 labels (the peer: a plain
``torch.onnx`` export and open_clip's torchvision preprocessing, as in ``make bench``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main(rounds: int = 20) -> None:
    import open_clip
    import openvino as ov

    from benchmarks.image_peers import export_plain
    from clipfold.compile.config import CompileConfig
    from clipfold.compile.heads.zero_shot import build_zero_shot_head
    from clipfold.compile.pipeline import compile_bundle
    from clipfold.compile.precision.config import GateConfig
    from clipfold.compile.stages.load import load_model
    from clipfold.compile.tiny import data
    from clipfold.runtime import Engine

    labels = tuple(data.class_names())
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        bundle = compile_bundle(CompileConfig(labels=labels, out=Path(tmp) / "b.bundle", model="ViT-B-32", templates="label",
                                              top_k=5, precisions=("fp32", "bf16"),
                                              gate=GateConfig(min_cosine=0, min_top1_agreement=0, max_accuracy_drop=1,
                                                              images=16))).path
        torch.manual_seed(0)
        loaded = load_model("ViT-B-32")
        head = build_zero_shot_head(loaded.model, loaded.tokenizer, labels, ("{}",))
        _, _, transform = open_clip.create_model_and_transforms("ViT-B-32")
        plain = export_plain(loaded.model.eval(), head, Path(tmp) / "plain.onnx", 224)
        request = ov.Core().compile_model(str(plain), "CPU").create_infer_request()
        runs = {"openvino default": lambda ims: request.infer({"image": torch.stack([transform(i) for i in ims]).numpy()}),
                "clipfold bf16": Engine.open(bundle, variant="bf16").classify}
        images = [s.image for s in data.generate(8, seed=3)]
        for batch in (1, 8):
            chunk = images[:batch]
            for run in runs.values():
                run(chunk), run(chunk)
            times = {name: [] for name in runs}
            for _ in range(rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(chunk)
                    times[name].append(time.perf_counter() - start)
            med = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
            print(f"batch {batch}: " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in med.items())
                  + f"; ratio {med['openvino default'] / med['clipfold bf16']:.2f}x; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
